"""decompose --second-order: the Hessian-vector estimate against exact Hessians, the glow-cv
closed forms against the estimate and against each other, and the flag end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ood_audit.analysis import second_order as so
from ood_audit.errors import UserError
from ood_audit.models.glow import Glow, GlowConfig


def make_glow(shape=(1, 4, 4), levels=2, coupling="affine", seed=0) -> Glow:
    torch.manual_seed(seed)
    model = Glow(GlowConfig(levels=levels, steps=2, hidden=4, coupling=coupling), shape).double()
    model.data_init(torch.rand(16, *shape, dtype=torch.float64))
    model.eval()
    return model


def randomize_nets(model: Glow, scale: float = 0.3) -> None:
    """Nonzero coupling and split-prior nets: a genuinely nonlinear log p(x)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".nn." in name or name.startswith("priors"):
                p.add_(scale * torch.randn_like(p))


def diagonal_convs(model: Glow) -> None:
    """1x1 convs W = diag(sign * exp(log_s)): P = I, L = I, U = 0 off the diagonal."""
    with torch.no_grad():
        for steps in model.levels:
            for step in steps:
                conv = step["invconv"]
                conv.perm.copy_(torch.eye(len(conv.perm)))
                conv.lower.zero_()
                conv.upper.zero_()
                conv.log_s.copy_(0.4 * torch.randn_like(conv.log_s))
                conv.sign_s.copy_(torch.where(torch.rand_like(conv.sign_s) < 0.5, -1.0, 1.0))


def random_actnorm_and_top(model: Glow, top: bool = True) -> None:
    with torch.no_grad():
        for steps in model.levels:
            for step in steps:
                step["actnorm"].logs.add_(0.3 * torch.randn_like(step["actnorm"].logs))
        if top:
            model.priors[-1].logs.copy_(0.3 * torch.randn_like(model.priors[-1].logs))
            model.priors[-1].mean.copy_(torch.randn_like(model.priors[-1].mean))


def exact_hessian(model: Glow, x0: torch.Tensor) -> torch.Tensor:
    shape = (1, *model.input_shape)
    return torch.autograd.functional.hessian(
        lambda flat: model.log_prob(flat.view(shape)).sum(), x0.flatten())


def sets(shape, seed=3):
    g = torch.Generator().manual_seed(seed)
    p = 0.3 + 0.2 * torch.rand(20, *shape, generator=g, dtype=torch.float64)
    q = 0.5 + 0.05 * torch.rand(15, *shape, generator=g, dtype=torch.float64)
    return p, q


def covariance(x: torch.Tensor) -> np.ndarray:
    """Population covariance of flattened images, by numpy (independent of the module)."""
    return np.cov(x.flatten(1).numpy(), rowvar=False, bias=True)


# ---------------------------------------------------------------- general estimate

def test_hvp_rows_equal_exact_hessian_times_v():
    model = make_glow()
    randomize_nets(model)
    x0 = torch.rand(1, 4, 4, dtype=torch.float64)
    v = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    H = exact_hessian(model, x0)
    assert not torch.allclose(H, torch.diag(torch.diagonal(H)))  # a full, mixed Hessian
    _, hv = so.hvp_rows(model, x0, v)
    torch.testing.assert_close(hv.flatten(1), v.flatten(1) @ H.T, rtol=1e-8, atol=1e-8)


def test_trace_h_sigma_equals_exact_trace():
    model = make_glow()
    randomize_nets(model)
    p, _ = sets((1, 4, 4))
    x0 = p.mean(0)
    H = exact_hessian(model, x0).numpy()
    want = float(np.trace(H @ covariance(p)))
    got, se = so.trace_h_sigma(model, x0, p, batch_size=7)  # batches of uneven size
    assert got == pytest.approx(want, rel=1e-9)
    assert se > 0
    # and the standard error is the spread of v^T H v over images / sqrt(N)
    v = (p - p.mean(0)).flatten(1).numpy()
    q = np.einsum("nd,de,ne->n", v, H, v)
    assert se == pytest.approx(q.std(ddof=1) / np.sqrt(len(q)), rel=1e-9)


def test_mean_shift_term_is_the_quadratic_model_of_the_offset():
    model = make_glow()
    randomize_nets(model)
    x0 = torch.rand(1, 4, 4, dtype=torch.float64)
    mean = x0 + 0.05 * torch.randn_like(x0)
    flat = x0.flatten().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.log_prob(flat.view(1, 1, 4, 4)).sum(), flat)
    d = (mean - x0).flatten()
    want = float(g @ d + 0.5 * d @ exact_hessian(model, x0) @ d)
    assert so.mean_shift_term(model, x0, mean) == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------- closed forms

def frozen_cv(shape=(1, 8, 8), diagonal=True, top=True, seed=0) -> Glow:
    """glow-cv whose coupling and split-prior nets output zero (as constructed)."""
    model = make_glow(shape, coupling="additive", seed=seed)
    if diagonal:
        diagonal_convs(model)
    random_actnorm_and_top(model, top=top)
    return model


def test_linear_diag_equals_exact_hessian_diag_with_mixing_convs():
    model = frozen_cv((2, 8, 8), diagonal=False)  # 2 channels, 4 blocks of 4x4
    x0 = torch.rand(2, 8, 8, dtype=torch.float64)
    H = exact_hessian(model, x0)
    diag = so.linear_hessian_diag(model, x0)
    torch.testing.assert_close(diag.flatten(), torch.diagonal(H), rtol=1e-9, atol=1e-10)
    assert diag.std() > 0  # the top prior's per-position scales make the pixels differ


def test_linear_closed_form_equals_general_estimate_on_frozen_cv():
    model = frozen_cv()
    p, q = sets((1, 8, 8))
    x0 = p.mean(0)
    tr_p, _ = so.trace_h_sigma(model, x0, p)
    tr_q, _ = so.trace_h_sigma(model, x0, q)
    general = 0.5 * (tr_q - tr_p)
    linear = so.closed_form_linear(model, x0, so.pixel_variances(q), so.pixel_variances(p))
    assert linear == pytest.approx(general, rel=1e-10)
    assert general > 0  # q has the smaller variance: the paper's direction


def test_full_covariance_linear_form_equals_general_with_mixing_convs():
    model = frozen_cv((2, 8, 8), diagonal=False)
    p, q = sets((2, 8, 8))
    p = p + 0.1 * p[:, :1]  # correlated pixels, so covariances matter
    x0 = p.mean(0)
    for x in (p, q):
        want = float(np.trace(exact_hessian(model, x0).numpy() @ covariance(x)))
        assert so.linear_trace_full(model, x0, x) == pytest.approx(want, rel=1e-9)
    # the per-pixel form drops the covariances: not the same number here
    full = 0.5 * (so.linear_trace_full(model, x0, q) - so.linear_trace_full(model, x0, p))
    diag = so.closed_form_linear(model, x0, so.pixel_variances(q), so.pixel_variances(p))
    assert diag != pytest.approx(full, rel=1e-3)


def test_paper_form_equals_linear_form_with_diagonal_convs():
    model = frozen_cv(top=False)  # every prior standard normal, one s per level
    p, q = sets((1, 8, 8))
    x0 = p.mean(0)
    paper = so.closed_form_paper(model, x0, so.level_variance_sums(model, q),
                                 so.level_variance_sums(model, p))
    linear = so.closed_form_linear(model, x0, so.pixel_variances(q), so.pixel_variances(p))
    assert paper == pytest.approx(linear, rel=1e-10)


def squeeze_np(x: np.ndarray) -> np.ndarray:
    """[N, C, H, W] -> [N, 4C, H/2, W/2], channel c*4 + 2i + j <- pixel (2h+i, 2w+j)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(
        n, 4 * c, h // 2, w // 2)


def test_paper_form_is_the_literal_formula_on_one_level():
    model = make_glow((1, 4, 4), levels=1, coupling="additive")  # mixing convs, top prior only
    random_actnorm_and_top(model, top=False)
    with torch.no_grad():
        model.priors[-1].logs.fill_(0.2)  # s = exp(0.2) everywhere
    p, q = sets((1, 4, 4))
    rows = np.ones(4)
    for step in model.levels[0]:
        u = step["invconv"].weight().detach().numpy() * np.exp(
            step["actnorm"].log_scale().detach().numpy().ravel())[None, :]
        rows *= u.sum(axis=1)
    dvar = squeeze_np(q.numpy()).var(0).sum((1, 2)) - squeeze_np(p.numpy()).var(0).sum((1, 2))
    want = -1 / (2 * np.exp(0.4)) * float(np.sum(rows**2 * dvar))
    got = so.closed_form_paper(model, p.mean(0), so.level_variance_sums(model, q),
                               so.level_variance_sums(model, p))
    assert got == pytest.approx(want, rel=1e-10)


def test_closed_form_refuses_affine_glow_and_general_refuses_discrete_models():
    model = make_glow()
    with pytest.raises(UserError, match="glow-cv only"):
        so.closed_form_linear(model, torch.rand(1, 4, 4, dtype=torch.float64),
                              torch.ones(1, 4, 4), torch.ones(1, 4, 4))
    from ood_audit.models.registry import MODELS, resolve_model_config

    for name in ("vae", "pixelcnn"):
        config, _ = resolve_model_config(name, "tiny", {}, (1, 8, 8))
        with pytest.raises(UserError, match="no Hessian"):
            so.check_differentiable(MODELS[name].build(config, (1, 8, 8)))


def test_second_order_signs_and_fields_on_frozen_cv():
    model = frozen_cv(top=False)
    p, q = sets((1, 8, 8))
    res = so.second_order(model, {"p": p, "q": q}, "p", batch_size=8)
    (row,) = res["sets"]
    assert row["closed_form_linear_full"] == pytest.approx(row["predicted_gap"], rel=1e-9)
    assert row["predicted_gap"] > 0 and row["closed_form_linear"] == pytest.approx(
        row["predicted_gap"], rel=1e-9) and row["closed_form_paper"] == pytest.approx(
        row["predicted_gap"], rel=1e-9)
    lp = lambda x: float(model.log_prob(x).detach().mean())  # noqa: E731
    assert row["measured_gap"] == pytest.approx(lp(q) - lp(p), rel=1e-12)
    assert row["signs_agree"] == (row["measured_gap"] > 0)
    # a linear-Gaussian model is exactly quadratic: prediction + mean shift = measured gap
    assert row["predicted_with_mean_shift"] == pytest.approx(row["measured_gap"], rel=1e-9)
    assert res["reference_stats"]["channel_var_mean"][0] == pytest.approx(
        float(p.var(0, correction=0).mean()), rel=1e-12)


# ---------------------------------------------------------------- CLI end to end

def test_decompose_second_order_cli(tiny_run, tiny_ood, tmp_path, capsys):
    from ood_audit.cli.app import main
    from ood_audit.runs import RunDir
    from ood_audit.scoring.parquet import read_scores

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # tiny_run is shared read-only
    for argv in (["score", "--run", str(run), "--ood", str(tiny_ood), "--limit", "40",
                  "--train-limit", "0", "--device", "cpu"],
                 ["decompose", "--run", str(run), "--second-order", "--second-order-limit", "24",
                  "--second-order-batch", "16", "--device", "cpu"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        captured = capsys.readouterr()
        assert exc.value.code == 0, captured.err
    words = set(captured.out.split())  # rich may wrap titles and headers at any width
    assert {"Second-order", "predicted", "signs", "Tr(H"} <= words
    result = json.loads(RunDir(run).second_order.read_text())
    (row,) = result["sets"]
    assert row["n"] == 24 and result["closed_form"] is False and row["closed_form_paper"] is None
    # the measured gap is the scorer's log p(x) on the same 24 images, same noise
    df, _ = read_scores(RunDir(run).scores if RunDir(run).scores.exists()
                        else RunDir(run).legacy_scores)
    ood = df[df["role"] == "ood"].sort_values("index")["log_px"].to_numpy()[:24]
    ref = df[(df["role"] == "in") & (df["split"] == "test")].sort_values("index")["log_px"]
    assert row["measured_gap"] == pytest.approx(ood.mean() - ref.to_numpy()[:24].mean(), abs=1e-3)
    assert np.isfinite(row["predicted_gap"]) and row["predicted_gap_se"] >= 0

    # the report shows the section when second_order.json exists
    from ood_audit.report.build import build_report

    build_report([RunDir(run)], tmp_path / "rep", formats=["md"])
    assert "Second-order prediction" in (tmp_path / "rep" / "report.md").read_text()
