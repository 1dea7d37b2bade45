"""Likelihood regret (Xiao, Yan & Amit, "Likelihood Regret: An Out-of-Distribution
Detection Score For Variational Auto-encoder", NeurIPS 2020): how much a VAE's bound on
log p(x) improves when its amortised posterior is replaced by one fitted to x alone.

The paper's score is LR(x) = L(x; tau_hat(x), theta) - L(x; phi, theta), the bound under
the posterior optimised for the single input minus the bound under the trained encoder
phi. Its released code (XavierXiao/Likelihood-Regret, ``compute_LR.py``) reaches
tau_hat(x) by re-fitting a copy of the whole encoder to the one image: Adam (lr 2e-4,
betas 0.9 / 0.999, L2 weight decay 5e-5), 100 steps, each on the one-draw ELBO with the
KL in closed form, then compares importance-weighted bounds before and after. We do the
same, for a batch of images at once: every image gets its own copy of the encoder (its
parameters stacked along a leading axis and run with ``torch.func.vmap``); Adam acts
elementwise, so one optimiser over the stacked copies is B independent ones.

Both bounds use the same ``iw_samples`` draws eps ~ N(0, I) (common random numbers, so
their difference is not swamped by Monte Carlo noise), and the regret is clamped at 0:
tau_hat(x) is by definition at least as good as the trained encoder, so a re-fit that
ends worse on these draws is not taken. The draws for image i come from a generator
seeded by ``seeds[i]``, so a regret does not depend on the batch it was computed in.

A model takes part by exposing ``encoder`` (the module re-fit, input ``v``, output the
posterior's raw parameters), ``posterior(h) -> (mean, log_std)`` of q(z | x) = N(mean,
std^2) with a N(0, I) prior, ``encoder_input(x) -> v`` and ``decoder_log_prob(v, z)`` =
log p(x | z) per row (:class:`~ood_audit.models.vae.VAE` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from ..seeds import seeded

LOG_2PI = math.log(2 * math.pi)
MAX_DECODE = 512  # images decoded at once for the importance-weighted bounds


@dataclass(frozen=True)
class RefitSettings:
    """The per-image optimisation; the defaults are the released code's."""

    steps: int = 100
    lr: float = 2e-4
    weight_decay: float = 5e-5
    iw_samples: int = 16


def supports_refit(model) -> bool:
    """Whether ``model`` exposes what :func:`likelihood_regret` re-fits."""
    return all(hasattr(model, a) for a in ("encoder", "posterior", "encoder_input",
                                           "decoder_log_prob"))


def _log_normal(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    return (-0.5 * ((z - mean) * torch.exp(-log_std)) ** 2 - log_std - 0.5 * LOG_2PI).sum(-1)


def _bound(model, v: Tensor, h: Tensor, eps: Tensor) -> Tensor:
    """log (1/K) sum_j p(x, z_j) / q(z_j | x), z_j = mean + std * eps_j; eps ``[B, K, L]``."""
    mean, log_std = model.posterior(h)
    b, k, _ = eps.shape
    z = mean[:, None] + torch.exp(log_std)[:, None] * eps  # [B, K, L]
    log_w = _log_normal(z, torch.zeros_like(z), torch.zeros_like(z)) - _log_normal(
        z, mean[:, None], log_std[:, None])
    per = max(1, MAX_DECODE // max(b, 1))
    recon = torch.cat([
        model.decoder_log_prob(v.repeat_interleave(z_s.shape[1], dim=0),
                               z_s.reshape(-1, z.shape[-1])).view(b, -1)
        for z_s in z.split(per, dim=1)], dim=1)  # [B, K]
    return torch.logsumexp(log_w + recon, dim=1) - math.log(k)


def likelihood_regret(model, x: Tensor, seeds: list[int],
                      settings: RefitSettings = RefitSettings()) -> Tensor:
    """The likelihood regret of each image of ``x`` ``[B, C, H, W]``, in nats, ``[B]``,
    >= 0: ``max(0, after - before)`` of :func:`refit_bounds`."""
    before, after = refit_bounds(model, x, seeds, settings)
    return (after - before).clamp(min=0.0)


def refit_bounds(model, x: Tensor, seeds: list[int],
                 settings: RefitSettings = RefitSettings()) -> tuple[Tensor, Tensor]:
    """The K-sample importance-weighted bound of each image's log-likelihood (for a VAE
    log P(k), without the dequantization constant) under the trained encoder and under its
    re-fit copy, ``[B]`` each, on the same draws. ``seeds[i]`` seeds image i's draws (its ``steps`` training
    draws, then its ``iw_samples`` evaluation draws). The model is not modified."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone()  # a normal tensor, even when x was made in inference mode
        v = model.encoder_input(x)
        b = v.shape[0]
        latent = model.posterior(model.encoder(v[:1]))[0].shape[-1]
        gens = [seeded(s, 7_331) for s in seeds]
        eps_fit = torch.stack([torch.randn(settings.steps, latent, generator=g) for g in gens])
        eps_eval = torch.stack([torch.randn(settings.iw_samples, latent, generator=g)
                                for g in gens])
        eps_fit, eps_eval = eps_fit.to(v), eps_eval.to(v)
        params = {name: p.detach().unsqueeze(0).repeat(b, *[1] * p.dim()).requires_grad_()
                  for name, p in model.encoder.named_parameters()}
        buffers = dict(model.encoder.named_buffers())

        def encode(stacked: dict[str, Tensor]) -> Tensor:
            def one(p, v1):
                return functional_call(model.encoder, {**p, **buffers}, (v1.unsqueeze(0),))[0]
            return vmap(one)(stacked, v)

        with torch.no_grad():
            before = _bound(model, v, encode(params), eps_eval)
        opt = torch.optim.Adam(list(params.values()), lr=settings.lr, betas=(0.9, 0.999),
                               weight_decay=settings.weight_decay,
                               fused=v.device.type in ("cpu", "cuda"))
        for step in range(settings.steps):
            mean, log_std = model.posterior(encode(params))
            z = mean + torch.exp(log_std) * eps_fit[:, step]
            kl = 0.5 * (mean**2 + torch.exp(2 * log_std) - 1.0 - 2 * log_std).sum(-1)
            loss = -(model.decoder_log_prob(v, z) - kl)  # [B], each image its own copy
            grads = torch.autograd.grad(loss.sum(), list(params.values()))
            for p, g in zip(params.values(), grads, strict=True):
                p.grad = g
            opt.step()
        with torch.no_grad():
            after = _bound(model, v, encode(params), eps_eval)
        return before.detach(), after.detach()
