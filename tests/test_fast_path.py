"""The exact path's engineering (caches, GEMM convolutions) and each opt-in fast path
against the plain computation, with stated tolerances, on a tiny Glow.

Tolerances (log p(x) of a 1x8x8 image is a few hundred nats):
- exact vs naive (library convs, no caches): 1e-5 relative (float32 rounding);
- channels_last: 1e-5 relative; compile: 1e-5 relative;
- bf16 coupling networks: 1e-2 bits/dim.
"""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch

from ood_audit.data import bits_per_dim
from ood_audit.errors import UserError
from ood_audit.models.fastpath import FastPath, tune_cpu_allocator
from ood_audit.models.flows import ActNorm, EdgeConv2d, InvConv1x1
from ood_audit.models.glow import Glow, GlowConfig
from ood_audit.scoring.loader import dequantized_batches
from ood_audit.scoring.noise import NOISE_CHUNK, Shard, dequantized_chunks

SHAPE = (1, 8, 8)
D = math.prod(SHAPE)


def _glow(coupling: str = "affine", seed: int = 0) -> Glow:
    """A float32 tiny Glow with every parameter moved off its init (zero-init convs would
    make couplings and priors trivial)."""
    torch.manual_seed(seed)
    model = Glow(GlowConfig(levels=2, steps=2, hidden=16, coupling=coupling), SHAPE)
    model.data_init(torch.rand(16, *SHAPE))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _log_px(model: Glow, x: torch.Tensor, **fast: bool) -> torch.Tensor:
    for name, value in fast.items():
        model.set_fast_path(name, value)
    with torch.inference_mode():
        return model.log_prob(x).clone()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_exact_path_equals_naive_path(coupling, x):
    """Caches and GEMM convs compute the same function as library convs, uncached."""
    model = _glow(coupling)
    naive = _log_px(model, x, naive=True)
    exact = _log_px(model, x, naive=False)
    torch.testing.assert_close(exact, naive, rtol=1e-5, atol=0)
    assert _log_px(model, x).equal(exact)  # second batch, from the caches: same numbers


def test_cpu_exact_path_convolves_channels_last_and_naive_nchw(x):
    """The exact path's layout on CPU (channels-last, oneDNN's fastest), the naive path's
    NCHW: checked on what every coupling convolution actually receives."""
    model = _glow()
    seen: list[bool] = []
    # channel stride 1 (NHWC; a coupling's xa is a channel slice of such a tensor) vs NCHW
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(
        args[0].stride(1) == 1 and not args[0].is_contiguous()))
        for m in model.modules() if isinstance(m, EdgeConv2d)]
    try:
        for naive in (False, True):
            seen.clear()
            _log_px(model, x, naive=naive)
            assert seen and all(v != naive for v in seen), (naive, seen)
    finally:
        for h in hooks:
            h.remove()


def test_training_step_equals_naive_path(x):
    """One Adam step on the exact path (channels-last on CPU, fused Adam) and on the naive
    path (NCHW, per-tensor Adam) from the same weights: same loss, same gradients, same
    updated weights up to float32 rounding."""
    losses, grads, weights = [], [], []
    for naive in (True, False):
        model = _glow().train()
        model.set_fast_path("naive", naive)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=not naive)
        loss = model.training_loss(x).mean()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        losses.append(loss.detach())
        weights.append([p.detach().clone() for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(weights[1], weights[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _cached_kernel(layer: InvConv1x1) -> torch.Tensor:
    return next(v for k, v in layer._cache.values() if v.dim() == 4)


def test_invconv_cache_equals_rebuilt_weight_and_is_invalidated_by_a_step(x):
    model = _glow()
    layer = next(m for m in model.modules() if isinstance(m, InvConv1x1))
    _log_px(model, x)
    c = layer.log_s.shape[0]
    before = _cached_kernel(layer)
    torch.testing.assert_close(before, layer.weight().detach().view(c, c, 1, 1), rtol=0, atol=0)

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.training_loss(x).mean().backward()
    opt.step()
    model.eval()
    after_step = _log_px(model, x)
    after = _cached_kernel(layer)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, layer.weight().detach().view(c, c, 1, 1), rtol=0, atol=0)
    # And the scores follow the new weights: equal to an uncached forward.
    torch.testing.assert_close(after_step, _log_px(model, x, naive=True), rtol=1e-5, atol=0)


def test_fused_adam_steps_do_not_leave_stale_caches(x):
    """Fused Adam (the trainer's) writes parameters without bumping version counters, so
    the version check alone would miss its steps: evaluation after training must still
    follow the new weights (the trainer's epoch loop: train, step, eval, score)."""
    model = _glow()
    model.eval()
    _log_px(model, x)  # fills the caches
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    for _ in range(2):
        model.train()
        opt.zero_grad()
        model.training_loss(x).mean().backward()
        opt.step()
        model.eval()
        cached_path = _log_px(model, x, naive=False)
        torch.testing.assert_close(cached_path, _log_px(model, x, naive=True), rtol=1e-5, atol=0)


def test_load_state_dict_invalidates_caches(x):
    """A checkpoint loaded into a model that already scored gives the checkpoint's scores."""
    model, other = _glow(seed=0), _glow(seed=1)
    _log_px(model, x)  # fills the caches
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(_log_px(model, x), _log_px(other, x), rtol=1e-6, atol=0)


def test_no_cache_while_training_or_with_autograd(x):
    model = _glow()
    layer = next(m for m in model.modules() if isinstance(m, ActNorm))
    model.train()
    model.log_prob(x).sum().backward()  # autograd on: every value recomputed, nothing stored
    assert not getattr(layer, "_cache", {})
    assert layer.logs.grad is not None and layer.logs.grad.abs().sum() > 0


def test_channels_last_matches_exact(x):
    model = _glow()
    exact = _log_px(model, x)
    fast = _log_px(model, x, channels_last=True)
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=0)
    assert model.extra_metadata()["fast_path"] == "channels_last"


def test_bf16_couplings_within_a_hundredth_of_a_bit(x):
    model = _glow()
    exact = bits_per_dim(_log_px(model, x), D)
    fast = bits_per_dim(_log_px(model, x, bf16=True), D)
    assert (fast - exact).abs().max() < 1e-2
    assert not fast.equal(exact)  # bf16 really ran
    # The log-dets and the 1x1 conv stay float32 (only the coupling networks are bf16).
    with torch.inference_mode():
        terms = model.log_prob_terms(x)
    assert all(t.dtype == torch.float32 for t in terms.values())


def test_bf16_training_step_has_finite_float32_grads(x):
    model = _glow()
    model.set_fast_path("bf16", True)
    model.train()
    model.training_loss(x).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_compile_captures_one_graph_and_matches_exact(x):
    """fullgraph=True: any graph break in the forward is an error. The quick "eager"
    backend checks the capture; the inductor test below checks the compiled kernels."""
    model = _glow()
    exact = _log_px(model, x)
    model.compile_backend = "eager"
    fast = _log_px(model, x, compile=True)
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=0)
    # A short last batch is padded to the compiled batch: same rows, no recompilation.
    with torch.inference_mode():
        short = model.log_prob(x[:4])
    torch.testing.assert_close(short, exact[:4], rtol=1e-5, atol=0)
    assert model.extra_metadata()["fast_path"] == "compile"


@pytest.mark.skipif(os.environ.get("OOD_AUDIT_TEST_COMPILE") != "1",
                    reason="inductor compilation of even a tiny Glow takes minutes on 2 cores; "
                           "set OOD_AUDIT_TEST_COMPILE=1 to run it")
def test_compile_inductor_matches_exact(x):
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: torch.compile cannot build CPU kernels here")
    model = _glow()
    exact = _log_px(model, x)
    torch.testing.assert_close(_log_px(model, x, compile=True), exact, rtol=1e-5, atol=0)


def test_compile_without_a_compiler_is_a_user_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    model = _glow()
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        model.set_fast_path("compile", True)
    assert not model.fast.compile


def test_tf32_off_cuda_and_bad_values_are_user_errors():
    model = _glow()
    with pytest.raises(UserError, match="CUDA"):
        model.set_score_option("tf32", True)
    with pytest.raises(UserError, match="true or false"):
        model.set_score_option("bf16", 1)
    with pytest.raises(UserError, match="no scoring option"):
        model.set_score_option("iw_samples", 4)
    assert "fast_path" not in model.extra_metadata()  # the exact path


def test_fast_path_description():
    fast = FastPath()
    assert fast.describe() == "exact"
    fast.set("bf16", True)
    fast.set("channels_last", True)
    assert fast.describe() == "channels_last+bf16"


def test_allocator_tuning_is_idempotent_and_keeps_numbers(x):
    model = _glow()
    before = _log_px(model, x)
    state = tune_cpu_allocator()
    assert tune_cpu_allocator() == state
    assert _log_px(model, x).equal(before)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_gives_the_scorers_batches(workers):
    """Same images, same noise as the scorer's in-process chunks, whatever the workers,
    also for one shard of two processes."""
    images = torch.randint(0, 256, (2 * NOISE_CHUNK + 40, *SHAPE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    for shard in (Shard(), Shard(rank=1, world=2)):
        expected = list(dequantized_chunks(images, seed=3, key=7, shard=shard))
        got = list(dequantized_batches(images, shard.chunks(len(images)), batch_size=300, seed=3, key=7,
                                       device=torch.device("cpu"), workers=workers))
        for first, block in expected:  # batches never straddle a noise chunk
            mine = [(s, x) for _, s, x in got if first <= s < first + len(block)]
            assert [s for s, _ in mine] == list(range(first, first + len(block), 300))
            np.testing.assert_array_equal(torch.cat([x for _, x in mine]).numpy(), block.numpy())
        assert sum(len(x) for *_, x in got) == shard.size(len(images))


def _train_cli(tmp_path, tiny_data, capsys, out: str, *flags: str):
    from ood_audit.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "glow", "--data", str(tiny_data), "--preset", "tiny",
              "--epochs", "1", "--limit", "32", "--batch-size", "32", "--device", "cpu",
              "--out", str(tmp_path / out), *flags])
    return exc.value.code, capsys.readouterr().err


def test_train_channels_last_records_the_flag_and_matches_the_exact_path(tmp_path, tiny_data, capsys,
                                                                          monkeypatch):
    import pandas as pd
    import yaml

    from ood_audit.checkpoint import read_metadata
    from ood_audit.runs import RunDir

    monkeypatch.chdir(tmp_path)
    code, err = _train_cli(tmp_path, tiny_data, capsys, "exact")
    assert code == 0, err
    code, err = _train_cli(tmp_path, tiny_data, capsys, "cl", "--channels-last")
    assert code == 0, err
    exact, cl = RunDir(tmp_path / "exact"), RunDir(tmp_path / "cl")
    assert yaml.safe_load(cl.config.read_text())["train"]["fast_path"] == ["channels_last"]
    assert yaml.safe_load(exact.config.read_text())["train"]["fast_path"] == []
    assert read_metadata(cl.model)["model.fast_path"] == "channels_last"
    assert "model.fast_path" not in read_metadata(exact.model)
    # One step per epoch (32 images, batch 32): the epoch's train bits/dim is the first
    # step's loss; the test bits/dim is after that step.
    m_exact, m_cl = pd.read_parquet(exact.metrics), pd.read_parquet(cl.metrics)
    assert m_exact["step"].tolist() == [1] == m_cl["step"].tolist()
    for column in ("train_bpd", "test_bpd"):
        assert m_cl[column].iloc[0] == pytest.approx(m_exact[column].iloc[0], rel=1e-4)

    # --resume (train longer) keeps the run's fast paths, from its config.yaml.
    code, err = _train_cli(tmp_path, tiny_data, capsys, "cl", "--resume", "--epochs", "2")
    assert code == 0, err
    assert yaml.safe_load(cl.config.read_text())["train"]["fast_path"] == ["channels_last"]
    assert read_metadata(cl.model)["model.fast_path"] == "channels_last"


def test_train_fast_path_user_errors(tmp_path, tiny_data, capsys):
    from ood_audit.config import TrainConfig, from_dict

    with pytest.raises(UserError, match="choose from channels_last, compile, bf16, tf32"):
        from_dict(TrainConfig, {"fast_path": ["channels_last", "warp"]}, where="c.yaml")
    from_dict(TrainConfig, {"fast_path": ["bf16"]}, where="c.yaml")  # a known one is fine
    code, err = _train_cli(tmp_path, tiny_data, capsys, "v", "--model", "vae", "--channels-last")
    assert code == 2 and "glow only" in err
    code, err = _train_cli(tmp_path, tiny_data, capsys, "t", "--tf32")
    assert code == 2 and "CUDA" in err
