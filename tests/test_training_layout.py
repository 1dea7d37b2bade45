"""Parameter layout for DDP: kernels follow the activations' memory format, so every
gradient arrives with its parameter's exact strides (what DDP's reducer compares), and
fused Adam's moments follow their parameter's strides."""

from __future__ import annotations

import pytest
import torch

from ood_audit.models.registry import build_model, resolve_model_config
from ood_audit.training.ddp import LossOf
from ood_audit.training.layout import align_optimizer_state, is_kernel, kernels_to

SHAPE = (1, 16, 16)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    mc, _ = resolve_model_config(name, "tiny", {}, SHAPE)
    model = build_model(name, mc, SHAPE)
    model.train()
    model.data_init(torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(1)))
    return model


def _mismatched_grads(model: torch.nn.Module, batch: int) -> list[str]:
    model.zero_grad(set_to_none=True)
    x = torch.rand(batch, *SHAPE, generator=torch.Generator().manual_seed(2))
    LossOf(model)(x).sum().backward()
    return [n for n, p in model.named_parameters() if p.grad.stride() != p.stride()]


@pytest.mark.parametrize("batch", [0, 1, 8, 32])  # 0: a rank's empty slice of a ragged batch
def test_glow_kernels_take_channels_last_and_grads_match_exactly(batch):
    model = _model("glow")
    assert model.activation_memory_format() is torch.channels_last  # CPU, exact path
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert kernels_to(model, model.activation_memory_format()) > 0
    assert _mismatched_grads(model, batch) == []
    kernels = [p for p in model.parameters() if is_kernel(p)]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    for n, p in model.named_parameters():  # a layout change only
        assert torch.equal(p.detach(), before[n]), n


def test_nchw_models_keep_their_layout():
    model = _model("pixelcnn")
    assert model.activation_memory_format() is torch.contiguous_format
    assert kernels_to(model, model.activation_memory_format()) == 0


def test_the_vae_lays_its_kernels_out_like_its_cpu_activations():
    # the VAE's decoder runs channels-last on CPU (oneDNN's transposed convolutions), so
    # DDP must move its kernels too, and a second pass finds nothing left to move
    model = _model("vae")
    assert model.activation_memory_format() is torch.channels_last
    assert kernels_to(model, model.activation_memory_format()) > 0
    assert kernels_to(model, model.activation_memory_format()) == 0


def test_per_channel_parameters_are_not_kernels():
    assert is_kernel(torch.zeros(8, 4, 1, 1))
    assert not is_kernel(torch.zeros(1, 8, 1, 1))  # ActNorm bias: broadcast over the batch
    assert not is_kernel(torch.zeros(8, 4))


def _adam_after(steps: int, relayout_at: int | None, align: bool) -> torch.Tensor:
    torch.manual_seed(0)
    w0 = torch.randn(8, 4, 3, 3)
    grads = [torch.randn(8, 4, 3, 3) for _ in range(steps)]
    p = torch.nn.Parameter(w0)
    opt = torch.optim.Adam([p], lr=1e-2, fused=True)
    for i, g in enumerate(grads):
        if i == relayout_at:
            kernels_to(torch.nn.ParameterList([p]), torch.channels_last)
            if align:
                align_optimizer_state(opt)
        p.grad = torch.empty_like(p).copy_(g)  # autograd's contract: the param's strides
        opt.step()
    return p.detach().contiguous()


def test_fused_adam_moments_follow_a_relaid_parameter():
    reference = _adam_after(4, None, align=False)
    torch.testing.assert_close(_adam_after(4, 2, align=True), reference, rtol=0, atol=0)
    # the hazard the alignment removes: moments in another layout mix elements silently
    assert not torch.allclose(_adam_after(4, 2, align=False), reference, atol=1e-4)
