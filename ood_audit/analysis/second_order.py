"""The paper's second-order prediction of the OOD likelihood gap (Nalisnick et al., ICLR
2019, section 5; paper.md item 4), set beside the measured gap.

Expanding log p(x) to second order around a shared point x0 and taking expectations,

    E_q[log p(x)] - E_p*[log p(x)]  ~  1/2 Tr(H (Sigma_q - Sigma_p*)),  H = Hessian at x0,

when both sets have mean x0. Three numbers estimate the right-hand side:

- **general** (any flow): Tr(H Sigma) = mean over centred images v of v^T H v, each a
  Hessian-vector product through autograd (double backward), so no D x D matrix is
  formed. With Sigma the set's sample covariance (1/N, centred on the set's own mean) this
  is exact, not an approximation; the standard error reported is the spread of v^T H v
  over images / sqrt(N), i.e. how much another sample of N images would move it.
  Assumes only that the expansion holds (x near x0, third-order terms small).
- **closed form, paper** (glow-cv only): the paper's formula applied per level l of our
  multi-scale Glow, in the level's squeezed channel space,
  ``-1/(2 s_l^2) sum_{c factored out} (prod_k sum_j u_{k,c,j})^2 sum_{h,w} dvar_l[c,h,w]``
  with u_k = W_k diag(s_k), s_k the ActNorm scales (ActNorm is a diagonal 1x1 convolution the
  paper's CV-Glow has not got), dvar_l the per-position variance difference of the
  level's squeezed input under the linear part of the flow, c over the channels the level
  hands to its prior (z2 of a split; all at the top), and 1/s_l^2 the mean prior precision
  exp(-2 logs) over those coordinates at x0 (a split prior's logs evaluated on x0's z1).
  Literal: it mixes the row index of u with the channel index of the variance, and
  ignores covariances; exact only when the 1x1 convs are diagonal.
- **closed form, linear-Gaussian** (glow-cv only): the same frozen-coupling assumptions
  done exactly: with couplings as identity and each prior a fixed Gaussian (its logs at
  x0, its dependence on z1 ignored), log p(x) is quadratic with H = -sum_l A_l^T S_l^-2 A_l,
  A_l the product of squeezes, ActNorm scales and 1x1 convs up to level l's latent. We
  evaluate 1/2 sum_d H_dd (var_q[d] - var_p*[d]) over pixels d (per-pixel variances, as
  the paper's formula uses; covariances dropped). It equals the general estimate when
  the couplings' and split priors' nets output zero and the 1x1 convs are diagonal.
  ``closed_form_linear_full`` keeps the full covariance instead (pushes the centred images
  through A): it equals the general estimate whenever those nets output zero. On real
  images pixel correlations are strong, so the per-pixel version can be far off (even in
  sign) where the full one is not.

The mean-shift term g.(mu_q - x0) + 1/2 (mu_q - x0)^T H (mu_q - x0), which the paper's
shared-mean assumption drops, is reported beside the prediction so its size is visible.

PixelCNN++ and the VAE model integer pixels k = floor(256 x): their log p(x) is piecewise
constant in x, so it has no useful Hessian; they are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoint import load_checkpoint
from ..config import SECOND_ORDER_CENTERS, DecomposeConfig
from ..device import pick_device
from ..errors import UserError
from ..models.glow import Glow
from ..runs import RunDir, atomic_write_text
from ..scoring.jobs import build_jobs
from ..scoring.noise import dequantized_chunks


class SecondOrderProgress:
    """Progress callbacks the CLI implements; the defaults stay silent."""

    def start(self, label: str, total: int) -> None:
        """Hessian-vector products for ``total`` images of ``label`` start."""

    def advance(self, n: int) -> None:
        """``n`` more images are done."""


# ---------------------------------------------------------------- general estimate

def check_differentiable(model) -> None:
    """UserError unless log p(x) is a smooth function of x (a flow)."""
    if not isinstance(model, Glow):
        raise UserError(f"{type(model).__name__} models integer pixels (log p(x) is piecewise "
                        "constant in x), so it has no Hessian: --second-order needs a flow "
                        "(glow or glow-cv)")
    for m in model.modules():
        if hasattr(m, "initialized") and not bool(m.initialized):
            raise ValueError("ActNorm is not initialised: call model.data_init(x) first, or "
                             "the first forward pass would initialise it on x0")


def hvp_rows(model, x0: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(grad log p(x0), H(x0) v_i per row), each shaped like ``v`` ``[B, C, H, W]``.

    x0 is replicated B times; log p is a per-sample sum, so the gradient of the batch sum
    is every row's own gradient, and one more gradient of sum(g * v) is every row's H v.
    """
    x = x0.reshape(1, *v.shape[1:]).to(v.dtype).expand_as(v).clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(model.log_prob(x).sum(), x, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), x)
    return g.detach(), hv


def quadratic_forms(model, x0: Tensor, v: Tensor, batch_size: int = DecomposeConfig.second_order_batch,
                    progress: SecondOrderProgress | None = None) -> Tensor:
    """v_i^T H(x0) v_i for every row of ``v`` ``[N, C, H, W]``, shape ``[N]``."""
    out = []
    for start in range(0, len(v), batch_size):
        chunk = v[start:start + batch_size]
        _, hv = hvp_rows(model, x0, chunk)
        out.append((hv * chunk).flatten(1).sum(1).detach())
        if progress is not None:
            progress.advance(len(chunk))
    return torch.cat(out)


def trace_h_sigma(model, x0: Tensor, x: Tensor, batch_size: int = DecomposeConfig.second_order_batch,
                  progress: SecondOrderProgress | None = None) -> tuple[float, float]:
    """(Tr(H(x0) Sigma), its standard error), Sigma the sample covariance (1/N) of ``x``
    centred on its own mean."""
    q = quadratic_forms(model, x0, x - x.mean(0, keepdim=True), batch_size, progress).double()
    se = float(q.std(correction=1) / math.sqrt(len(q))) if len(q) > 1 else float("nan")
    return float(q.mean()), se


def mean_shift_term(model, x0: Tensor, mean: Tensor) -> float:
    """g.(mean - x0) + 1/2 (mean - x0)^T H (mean - x0): what the shared-mean assumption drops."""
    delta = (mean - x0).reshape(1, *x0.shape[-3:])
    g, hv = hvp_rows(model, x0, delta)
    return float((g * delta).sum() + 0.5 * (hv * delta).sum())


def pixel_variances(x: Tensor) -> Tensor:
    """Per-pixel variance over the set (1/N), ``[C, H, W]``."""
    return x.double().var(0, correction=0)


# ---------------------------------------------------------------- closed forms (glow-cv)

@dataclass
class LinearLevel:
    u: Tensor  # the level's squeezed input [B, C_l, H_l, W_l]
    z1: Tensor | None  # what continues to the next level (None at the top)
    z2: Tensor  # what the level's prior scores


def check_closed_form(model) -> None:
    if not (isinstance(model, Glow) and model.config.coupling == "additive"):
        raise UserError("the closed form holds for glow-cv only (additive coupling); for this "
                        "model use the general estimate (Hessian-vector products)")


def linear_levels(model: Glow, x: Tensor, affine: bool = True) -> list[LinearLevel]:
    """``x`` through the flow's linear part: squeeze, ActNorm, 1x1 conv; couplings skipped
    (identity). ``affine=False`` drops the -0.5 shift and ActNorm biases (the map A itself).
    Written from the parameters, not the layers' forward, so tests check one against the other."""
    z = x - 0.5 if affine else x
    levels = []
    last = len(model.levels) - 1
    for i, (steps, prior) in enumerate(zip(model.levels, model.priors, strict=True)):
        z, _ = model.squeeze(z)
        u = z
        for step in steps:
            an, conv = step["actnorm"], step["invconv"]
            z = (z + an.bias.to(z.dtype) if affine else z) * torch.exp(an.log_scale().to(z.dtype))
            c = z.shape[1]
            z = F.conv2d(z, conv.weight().to(z.dtype).view(c, c, 1, 1))
        if i < last:
            levels.append(LinearLevel(u, z[:, :prior.c1], z[:, prior.c1:]))
            z = z[:, :prior.c1]
        else:
            levels.append(LinearLevel(u, None, z))
    return levels


def prior_precisions(model: Glow, x0: Tensor) -> list[Tensor]:
    """exp(-2 logs) of each level's prior over its z2 coordinates, ``[C', H_l, W_l]``; a
    split prior's logs evaluated on x0's z1 under the linear part."""
    levels = linear_levels(model, x0.reshape(1, *model.input_shape), affine=True)
    out = []
    for lev, prior in zip(levels, model.priors, strict=True):
        logs = prior.logs if lev.z1 is None else prior._mean_logs(lev.z1)[1]
        out.append(torch.exp(-2.0 * logs.to(lev.z2.dtype))[0].detach())
    return out


def linear_hessian_diag(model: Glow, x0: Tensor) -> Tensor:
    """diag(H) = -diag(sum_l A_l^T S_l^-2 A_l) per input pixel, ``[C, H, W]``.

    The linear part acts per position within blocks of 2^L x 2^L pixels with shared
    weights, so A's columns are read off C * 4^L basis images of one block; only the
    prior precisions vary from block to block. No D x D matrix is formed.
    """
    c, h, w = model.input_shape
    bs = 2 ** len(model.levels)
    dtype = x0.dtype
    n_b = c * bs * bs
    basis = torch.eye(n_b, dtype=dtype, device=x0.device).view(n_b, c, bs, bs)
    levels = linear_levels(model, basis, affine=False)
    total = torch.zeros(h // bs, w // bs, n_b, dtype=dtype, device=x0.device)
    for lev, prec in zip(levels, prior_precisions(model, x0), strict=True):
        m = lev.z2.shape[-1]  # positions per block side at this level
        cp, hl, wl = prec.shape
        blocks = prec.view(cp, hl // m, m, wl // m, m).permute(1, 3, 0, 2, 4)  # [bh, bw, C', m, m]
        total += torch.einsum("bcij,xycij->xyb", lev.z2.detach() ** 2, blocks)
    diag = total.view(h // bs, w // bs, c, bs, bs).permute(2, 0, 3, 1, 4).reshape(c, h, w)
    return -diag


def closed_form_linear(model: Glow, x0: Tensor, var_q: Tensor, var_p: Tensor) -> float:
    """1/2 sum_d H_dd (var_q[d] - var_p[d]) with the linear-Gaussian H (module docstring)."""
    check_closed_form(model)
    with torch.no_grad():
        diag = linear_hessian_diag(model, x0)
    return float(0.5 * (diag.double() * (var_q - var_p).double()).sum())


def linear_trace_full(model: Glow, x0: Tensor, x: Tensor) -> float:
    """Tr(H Sigma) with the linear-Gaussian H and the full sample covariance of ``x``:
    -mean over centred images v of sum_l |S_l^-1 A_l v|^2 (v pushed through the map A)."""
    check_closed_form(model)
    with torch.no_grad():
        v = x - x.mean(0, keepdim=True)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for lev, prec in zip(linear_levels(model, v, affine=False), prior_precisions(model, x0),
                             strict=True):
            total -= (lev.z2.double() ** 2 * prec.double()).sum() / len(x)
    return float(total)


def paper_curvature(model: Glow, x0: Tensor) -> list[tuple[Tensor, float, int]]:
    """Per level: ((prod_k sum_j u_{k,c,j})^2 over all C_l channels, 1/s_l^2, index of the
    first channel the level's prior scores)."""
    out = []
    with torch.no_grad():
        for steps, prior, prec in zip(model.levels, model.priors, prior_precisions(model, x0),
                                      strict=True):
            rows = torch.ones(steps[0]["actnorm"].logs.numel(), dtype=torch.float64,
                              device=prec.device)
            for step in steps:
                u = step["invconv"].weight().double() * torch.exp(
                    step["actnorm"].log_scale().double().flatten())[None, :]  # W diag(exp(logs))
                rows = rows * u.sum(1)
            first = prior.c1 if hasattr(prior, "c1") else 0
            out.append((rows.cpu() ** 2, float(prec.double().mean()), first))
    return out


def level_variance_sums(model: Glow, x: Tensor) -> list[Tensor]:
    """Per level: variance over the set of the squeezed input u_l (linear part), summed
    over positions, ``[C_l]`` in float64."""
    with torch.no_grad():
        levels = linear_levels(model, x, affine=False)
    return [lev.u.double().var(0, correction=0).sum((1, 2)).cpu() for lev in levels]


def closed_form_paper(model: Glow, x0: Tensor, sums_q: list[Tensor], sums_p: list[Tensor]) -> float:
    """The paper's CV-Glow formula, per level (module docstring); ``sums_*`` from
    :func:`level_variance_sums`."""
    check_closed_form(model)
    total = 0.0
    for (rows2, inv_s2, first), sq, sp in zip(paper_curvature(model, x0), sums_q, sums_p,
                                              strict=True):
        total += -0.5 * inv_s2 * float((rows2[first:] * (sq - sp)[first:]).sum())
    return total


# ---------------------------------------------------------------- the run-level analysis

def channel_variances(var: Tensor) -> dict[str, list[float]]:
    """Per input channel: the per-pixel variance averaged over (h, w), and summed over it
    (the paper's sum_{h,w} var[h, w, c])."""
    return {"channel_var_mean": [float(v) for v in var.mean((1, 2))],
            "channel_var_sum": [float(v) for v in var.sum((1, 2))]}


def _log_px(model, x: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([model.log_prob(x[i:i + batch_size]).double()
                          for i in range(0, len(x), batch_size)])


def _set_stats(model, x0, x, lp, batch_size, progress, label) -> dict:
    progress.start(label, len(x))
    tr, se = trace_h_sigma(model, x0, x, batch_size, progress)
    return {"n": len(x), "mean_log_px": float(lp.mean()),
            "sd_log_px": float(lp.std(correction=1)) if len(lp) > 1 else float("nan"),
            "trace_h_sigma": tr, "trace_se": se, **channel_variances(pixel_variances(x))}


def second_order(model, images: dict[str, Tensor], reference: str, *,
                 center: str = DecomposeConfig.second_order_center,
                 batch_size: int = DecomposeConfig.second_order_batch,
                 progress: SecondOrderProgress | None = None) -> dict:
    """Predicted vs measured gap of every OOD set in ``images`` (name -> dequantized
    ``[N, C, H, W]``) against ``images[reference]``. JSON-ready dict (see the CLI)."""
    check_differentiable(model)
    if center not in SECOND_ORDER_CENTERS:
        raise UserError(f"center must be one of {', '.join(SECOND_ORDER_CENTERS)}, got {center!r}")
    if batch_size <= 0:
        raise UserError(f"--second-order-batch must be positive, got {batch_size}")
    progress = progress or SecondOrderProgress()
    cv = isinstance(model, Glow) and model.config.coupling == "additive"
    x_in = images[reference]
    lp_in = _log_px(model, x_in, batch_size)
    ref_cache: dict[str, dict] = {}
    sets = []
    for name, x in images.items():
        if name == reference:
            continue
        x0 = x_in.mean(0) if center == "in" else torch.cat([x_in, x]).mean(0)
        key = "in" if center == "in" else name
        if key not in ref_cache:
            ref_cache[key] = _set_stats(model, x0, x_in, lp_in, batch_size, progress, reference)
        ref = ref_cache[key]
        lp = _log_px(model, x, batch_size)
        st = _set_stats(model, x0, x, lp, batch_size, progress, name)
        measured = st["mean_log_px"] - ref["mean_log_px"]
        predicted = 0.5 * (st["trace_h_sigma"] - ref["trace_h_sigma"])
        shift = mean_shift_term(model, x0, x.mean(0)) - mean_shift_term(model, x0, x_in.mean(0))
        row = {"dataset": name, **st, "reference_trace_h_sigma": ref["trace_h_sigma"],
               "measured_gap": measured,
               "measured_gap_se": math.sqrt(st["sd_log_px"] ** 2 / st["n"]
                                            + ref["sd_log_px"] ** 2 / ref["n"]),
               "predicted_gap": predicted,
               "predicted_gap_se": 0.5 * math.hypot(st["trace_se"], ref["trace_se"]),
               "signs_agree": bool(np.sign(predicted) == np.sign(measured)),
               "mean_shift_term": shift, "predicted_with_mean_shift": predicted + shift,
               "closed_form_paper": None, "closed_form_linear": None,
               "closed_form_linear_full": None}
        if cv:
            row["closed_form_linear"] = closed_form_linear(
                model, x0, pixel_variances(x), pixel_variances(x_in))
            row["closed_form_linear_full"] = 0.5 * (linear_trace_full(model, x0, x)
                                                    - linear_trace_full(model, x0, x_in))
            row["closed_form_paper"] = closed_form_paper(
                model, x0, level_variance_sums(model, x), level_variance_sums(model, x_in))
        sets.append(row)
    first_ref = next(iter(ref_cache.values()), None)
    return {"reference": reference, "center": center, "closed_form": cv,
            "reference_stats": first_ref, "sets": sets}


def _dequantized(images: Tensor, seed: int, key: int) -> Tensor:
    """The scorer's dequantization, so these are the very x the scores were computed on."""
    return torch.cat([chunk for _, chunk in dequantized_chunks(images, seed, key)])


def second_order_run(rd: RunDir, ood: list[str], *, limit: int = DecomposeConfig.second_order_limit,
                     root: Path | None = None, download: bool = False,
                     batch_size: int = DecomposeConfig.second_order_batch, device: str = "auto",
                     seed: int = 0, center: str = DecomposeConfig.second_order_center,
                     progress: SecondOrderProgress | None = None) -> dict:
    """Load the run's model and the first ``limit`` images of its in-distribution test set
    and of each OOD set, dequantized with the scorer's seeded noise; write and return
    ``rd.second_order``."""
    if limit <= 0:
        raise UserError(f"--second-order-limit must be positive, got {limit}")
    dev = pick_device(device)
    model, info = load_checkpoint(rd.model, dev)
    check_differentiable(model)
    model.eval().requires_grad_(False)  # gradients w.r.t. x only
    jobs = build_jobs(info, ood, root=root, download=download, limit=limit, train_limit=0,
                      seed=seed, notify=lambda message: None)
    images = {j.images.name: _dequantized(j.images.images, seed, j.key).to(dev) for j in jobs}
    result = second_order(model, images, jobs[0].images.name, center=center,
                          batch_size=batch_size, progress=progress)
    result.update(model=info.model, in_dataset=info.dataset, limit=limit, dequant_seed=seed,
                  dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                  assumptions=ASSUMPTIONS)
    atomic_write_text(rd.second_order, json.dumps(result, indent=2, allow_nan=True) + "\n")
    return result



ASSUMPTIONS = {
    "predicted_gap": "1/2 Tr(H (Sigma_ood - Sigma_in)), H the Hessian of log p at x0, each "
                     "Sigma a set's sample covariance about its own mean; exact mean of v^T H v "
                     "over the images (Hessian-vector products), +- its standard error",
    "mean_shift_term": "first- and second-order terms of the sets' mean offsets from x0, "
                       "dropped by the paper's shared-mean assumption",
    "closed_form_paper": "glow-cv: the paper's formula per level, couplings frozen, u_k = "
                         "W_k diag(exp(actnorm logs)), 1/s^2 = mean prior precision at x0",
    "closed_form_linear": "glow-cv: exact for a linear flow (couplings identity, priors "
                          "fixed at x0), per-pixel variances only",
    "closed_form_linear_full": "glow-cv: the same linear flow with the full covariance "
                               "(pixel correlations kept)",
}
