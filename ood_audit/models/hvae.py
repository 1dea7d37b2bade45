"""A hierarchical VAE with top-down inference, a ladder VAE (Sønderby, Raiko, Maaløe,
Sønderby & Winther, "Ladder Variational Autoencoders", NeurIPS 2016): the model family of
Havtorn, Frellsen, Hauberg & Maaløe ("Hierarchical VAEs Know What They Don't Know", ICML
2021), as a :class:`~ood_audit.models.base.DensityModel` scored by the importance-weighted
bound (Burda et al. 2016).

Model, with L = ``len(latents)`` >= 3 stochastic layers, z_1 nearest the pixels:

- p(z_L) = N(0, I); p(z_i | z_>i) = N(mu_p, sigma_p^2) from the top-down state, i < L;
- p(k | z): a discretized logistic mixture per pixel (:mod:`~ood_audit.models.discretized`,
  as the VAE and PixelCNN++), from the top-down state at full resolution, which every
  z_i feeds (a deterministic skip path, as in Havtorn et al.'s HVAE).
- z_i, i < L, is a conv latent of ``latents[i-1]`` channels at 1/2^i of the image size;
  z_L a vector of ``latents[-1]`` dims.

Inference runs top-down like the generative model, q(z | x) = q(z_L | x) prod_{i<L}
q(z_i | z_>i, x): a bottom-up pass gives an estimate (mu_hat_i, sigma_hat_i) per layer,
and each layer's posterior is its precision-weighted merge with the layer's prior,
sigma_q^-2 = sigma_hat^-2 + sigma_p^-2, mu_q = (mu_hat sigma_hat^-2 + mu_p sigma_p^-2)
sigma_q^2 (Sønderby et al. 2016, section 2: the ladder's combination); q(z_L | x) is the
bottom-up estimate alone. So q(z_>k | x) never depends on z_<=k, and the bound L^>k
below needs no second inference pass.

Like the VAE, it is a model of the integer pixels k = floor(256 x) and reports
log p(x) = log P(k) + D log 256 (the constant sits in ``recon``). Terms of
:meth:`HVAE.log_prob_terms` (each ``[B]``, nats), from K = ``iw_samples`` ancestral draws
z^(j) ~ q(z | x) with log-weights w_j = log P(k | z^(j)) + sum_i [log p(z_i^(j) | z_>i^(j))
- log q(z_i^(j) | z_>i^(j), x)]:

- ``recon`` = mean_j log P(k | z^(j)) + D log 256;
- ``neg_kl_z{i}`` = mean_j [log p(z_i | z_>i) - log q(z_i | z_>i, x)], i = 1..L (Monte Carlo);
- ``iw_gain`` = log mean_j exp(w_j) - mean_j w_j >= 0.

Their sum is the K-sample IWAE bound + D log 256 <= log p(x): ``log_px``.

Extra columns (:meth:`HVAE.score_columns`, not in the sum): ``log_px_skip{k}``, k = 1..L-1,
Havtorn et al.'s bound L^>k: z_>k from q (the same draws as the terms), the k bottom
latents from the conditional prior p(z_<=k | z_>k), so
log w_j^>k = log P(k | z^(j)) + sum_{i>k} [log p(z_i | z_>i) - log q(z_i | z_>i, x)] and
``log_px_skip{k}`` = log mean_j exp(w_j^>k) + D log 256. With K = 1 this is the paper's
one-sample L^>k; for K > 1 it is importance sampling of the same p(x) with the proposal
q(z_>k | x) p(z_<=k | z_>k), so it stays a (looser) lower bound of log p(x). The
``llr-k`` detector reads them.

Training (:meth:`HVAE.training_loss`): -ELBO with one ancestral draw, each layer's KL in
closed form given the draws above it. With ``free_bits`` > 0, a layer whose KL for an
image is below ``free_bits`` nats passes no gradient through that KL (Kingma et al. 2016,
"Improved Variational Inference with Inverse Autoregressive Flow", free bits): the upper
layers are not switched off early (posterior collapse) in short CPU runs. The loss value
stays the true -ELBO, so training bits/dim are honest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ImportanceWeighted
from .discretized import (
    N_LEVELS,
    discretized_mix_logistic_log_prob,
    n_mix_params,
    pixels_from_unit,
    pixels_to_centered,
)

LOG_2PI = math.log(2 * math.pi)
MIN_LOG_VAR, MAX_LOG_VAR = -14.0, 10.0  # wide bounds: only stop exp() blow-ups
MAX_DECODE = 512  # images decoded at once when scoring K samples: bounds memory


@dataclass
class HVAEConfig:
    """Hierarchical VAE size: ``latents`` channels (dims, for the top one) of each
    stochastic layer, bottom first (at least 3); ``hidden`` conv channels; ``blocks``
    residual blocks per latent resolution in each path (none at full resolution, where
    every importance sample is decoded); ``n_mix`` logistic components per pixel;
    ``iw_samples`` K of the scored bounds; ``free_bits`` nats per layer and image below
    which a layer's KL passes no gradient (0: the plain ELBO)."""

    latents: list[int] = field(default_factory=lambda: [8, 16, 8])
    hidden: int = 64
    blocks: int = 1
    n_mix: int = 5
    iw_samples: int = 16
    free_bits: float = 0.0

    def __post_init__(self) -> None:
        lat = self.latents
        if (not isinstance(lat, (list, tuple)) or len(lat) < 3
                or not all(type(c) is int and c > 0 for c in lat)):
            raise ValueError("hvae latents must list at least 3 positive integers (the channels "
                             f"of each stochastic layer, bottom first), got {lat!r}")
        self.latents = list(lat)
        for name in ("hidden", "n_mix", "iw_samples"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"hvae {name} must be a positive integer, got {value!r}")
        if type(self.blocks) is not int or self.blocks < 0:
            raise ValueError(f"hvae blocks must be a non-negative integer, got {self.blocks!r}")
        if (isinstance(self.free_bits, bool) or not isinstance(self.free_bits, (int, float))
                or not 0 <= self.free_bits < math.inf):
            raise ValueError(f"hvae free_bits must be a number >= 0, got {self.free_bits!r}")


#: Named sizes. "paper" follows Havtorn et al.'s FashionMNIST HVAE (64 channels, 3
#: residual blocks per stage, 3 latent layers of 8 / 16 / 8, 2 free nats per layer).
HVAE_PRESETS: dict[str, dict] = {
    "tiny": {"latents": [2, 4, 4], "hidden": 8, "blocks": 0, "n_mix": 2},
    "small": {"latents": [8, 16, 16], "hidden": 32, "blocks": 1, "n_mix": 5, "free_bits": 2.0},
    "paper": {"latents": [8, 16, 8], "hidden": 64, "blocks": 3, "n_mix": 10, "free_bits": 2.0},
}


def _halved(n: int) -> int:
    return (n + 1) // 2  # a 3x3, stride-2, padding-1 conv maps n -> ceil(n / 2)


def gaussian_log_prob(z: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(z; mean, exp(log_var)) summed over all but the first dim, ``[N]``."""
    lp = -0.5 * ((z - mean) ** 2 * torch.exp(-log_var) + log_var + LOG_2PI)
    return lp.flatten(1).sum(1)


def gaussian_kl(mean_q: Tensor, log_var_q: Tensor, mean_p: Tensor, log_var_p: Tensor) -> Tensor:
    """KL(N(mean_q, var_q) || N(mean_p, var_p)) in closed form, summed per row, ``[N]``."""
    kl = 0.5 * (log_var_p - log_var_q
                + (torch.exp(log_var_q) + (mean_q - mean_p) ** 2) * torch.exp(-log_var_p) - 1.0)
    return kl.flatten(1).sum(1)


def precision_merge(mean_hat: Tensor, log_var_hat: Tensor, mean_p: Tensor, log_var_p: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """The ladder's posterior: N(mean_hat, var_hat) and N(mean_p, var_p) combined with
    their precisions as weights; returns (mean_q, log_var_q)."""
    log_var_q = -torch.logaddexp(-log_var_hat, -log_var_p)
    weight_hat = torch.sigmoid(log_var_p - log_var_hat)  # var_hat^-1 / (var_hat^-1 + var_p^-1)
    return weight_hat * mean_hat + (1 - weight_hat) * mean_p, log_var_q


def _noise(like: Tensor) -> Tensor:
    """Standard normal draws shaped like ``like``, in logical (not memory) order, so the
    draws do not depend on the activations' memory format."""
    return torch.randn(like.shape, dtype=like.dtype, device=like.device)


def _split(h: Tensor) -> tuple[Tensor, Tensor]:
    mean, log_var = h.chunk(2, dim=1)
    return mean, log_var.clamp(MIN_LOG_VAR, MAX_LOG_VAR)


class ResBlock(nn.Module):
    """x + conv3x3(ELU(conv3x3(ELU(x)))), channels and size kept."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


def _blocks(n: int, channels: int) -> nn.Sequential:
    return nn.Sequential(*(ResBlock(channels) for _ in range(n)))


class HVAE(ImportanceWeighted):
    """Ladder VAE over x in [0, 1)^D, shape ``[B, C, H, W]`` (module docstring)."""

    def __init__(self, config: HVAEConfig, input_shape: tuple[int, int, int]):
        super().__init__()
        channels, height, width = input_shape
        self.config = config
        self.input_shape = (channels, height, width)
        self.iw_samples = config.iw_samples
        lat, hid, n = config.latents, config.hidden, len(config.latents)
        self.n_layers = n
        # sizes[i]: the resolution of layer i's conv latent (sizes[0]: the image)
        self.sizes = [(height, width)]
        for _ in range(n - 1):
            h, w = self.sizes[-1]
            self.sizes.append((_halved(h), _halved(w)))
        top_h, top_w = self.sizes[-1]
        # bottom-up: stem, then per conv layer i a stride-2 conv + blocks -> d_i
        self.stem = nn.Conv2d(channels, hid, 3, padding=1)
        self.up_blocks = nn.ModuleList([_blocks(config.blocks, hid) for _ in range(n - 1)])
        self.down = nn.ModuleList([nn.Conv2d(hid, hid, 3, stride=2, padding=1)
                                   for _ in range(n - 1)])
        self.q_heads = nn.ModuleList([nn.Conv2d(hid, 2 * c, 1) for c in lat[:-1]])
        self.q_top = nn.Sequential(nn.Flatten(), nn.Linear(hid * top_h * top_w, 2 * hid),
                                   nn.ELU(), nn.Linear(2 * hid, 2 * lat[-1]))
        # top-down: z_L -> state at the top conv resolution; per layer i a prior head, the
        # z_i injection, blocks and a stride-2 transposed conv up to layer i-1's size
        self.from_top = nn.Linear(lat[-1], hid * top_h * top_w)
        self.td_blocks = nn.ModuleList([_blocks(config.blocks, hid) for _ in range(n - 1)])
        self.p_heads = nn.ModuleList([nn.Conv2d(hid, 2 * c, 1) for c in lat[:-1]])
        self.z_in = nn.ModuleList([nn.Conv2d(c, hid, 1) for c in lat[:-1]])
        self.up = nn.ModuleList([nn.ConvTranspose2d(hid, hid, 3, stride=2, padding=1)
                                 for _ in range(n - 1)])
        self.out = nn.Conv2d(hid, n_mix_params(channels, config.n_mix), 3, padding=1)
        for head in self.p_heads:  # priors start at N(0, I): a calm start for the merge
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    # -- the two passes -----------------------------------------------------------------
    def _pixels(self, x: Tensor) -> Tensor:
        return pixels_to_centered(pixels_from_unit(x))

    @property
    def dequant_constant(self) -> float:
        """D log 256: log p(x) of the dequantized density minus log P(k)."""
        return math.prod(self.input_shape) * math.log(N_LEVELS)

    def activation_memory_format(self) -> torch.memory_format:
        """Channels-last on CPU, where oneDNN's convolutions (the transposed ones above
        all) run several times faster in it; NCHW elsewhere."""
        device = next(self.parameters()).device
        return torch.channels_last if device.type == "cpu" else torch.contiguous_format

    def bottom_up(self, v: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(mean_hat, log_var_hat) of each layer, bottom first; v ``[B, C, H, W]`` on the
        [-1, 1] scale. Conv layers ``[B, c_i, h_i, w_i]``, the top one ``[B, c_L]``."""
        h = self.stem(v.contiguous(memory_format=self.activation_memory_format()))
        out = []
        for i in range(self.n_layers - 1):
            h = self.up_blocks[i](F.elu(self.down[i](F.elu(h))))
            out.append(_split(self.q_heads[i](F.elu(h))))
        out.append(_split(self.q_top(F.elu(h))))
        return out

    def _top_state(self, z_top: Tensor) -> Tensor:
        h, w = self.sizes[-1]
        state = self.from_top(z_top).view(-1, self.config.hidden, h, w)
        return state.contiguous(memory_format=self.activation_memory_format())

    def _layer_prior(self, i: int, state: Tensor) -> tuple[Tensor, Tensor]:
        """p(z_{i+1} | z_>i+1) from the top-down state at layer i+1's size (i 0-based)."""
        return _split(self.p_heads[i](F.elu(state)))

    def _after_layer(self, i: int, state: Tensor, z: Tensor) -> Tensor:
        """The state one resolution down, after layer i+1's draw z joined it (i 0-based)."""
        state = self.td_blocks[i](state + self.z_in[i](z))
        return self.up[i](F.elu(state), output_size=self.sizes[i])

    def _decode(self, state: Tensor) -> Tensor:
        return self.out(F.elu(state))

    def _recon(self, v: Tensor, state: Tensor) -> Tensor:
        """log P(k | z) summed over pixels and channels, ``[N]``."""
        params = self._decode(state)
        return discretized_mix_logistic_log_prob(v, params, self.config.n_mix).flatten(1).sum(1)

    def _descend(self, v: Tensor, q_hat: list, state: Tensor, top: int, prior_below: int,
                 record: dict | None = None) -> tuple[Tensor, list[Tensor]]:
        """Walk the conv layers ``top-1 .. 0`` (0-based) down from ``state``: layers below
        ``prior_below`` draw z from their prior, the others from q, each keeping its
        log p(z) - log q(z) ([N], top first). ``record[i]``: the state before layer i.
        Returns (log P(k | z) [N], those terms)."""
        terms = []
        for i in reversed(range(top)):
            if record is not None:
                record[i] = state
            mean_p, log_var_p = self._layer_prior(i, state)
            if i < prior_below:
                z = mean_p + torch.exp(0.5 * log_var_p) * _noise(mean_p)
            else:
                mean_q, log_var_q = precision_merge(*q_hat[i], mean_p, log_var_p)
                z = mean_q + torch.exp(0.5 * log_var_q) * _noise(mean_q)
                terms.append(gaussian_log_prob(z, mean_p, log_var_p)
                             - gaussian_log_prob(z, mean_q, log_var_q))
            state = self._after_layer(i, state, z)
        return self._recon(v, state), terms

    def _sample_top(self, q_top: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        mean, log_var = q_top
        z = mean + torch.exp(0.5 * log_var) * _noise(mean)
        zeros = torch.zeros_like(z)
        return z, gaussian_log_prob(z, zeros, zeros) - gaussian_log_prob(z, mean, log_var)

    # -- scoring ------------------------------------------------------------------------
    def _draws(self, v: Tensor, skips: bool = True
               ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """K draws per image, in slices of <= MAX_DECODE images: recon ``[K, B]``, each
        layer's log p - log q (bottom first) and each L^>k's log-weights (``skips``; else
        none), ``[K, B]`` each."""
        b, n = v.shape[0], self.n_layers
        q_hat = self.bottom_up(v)
        per = max(1, MAX_DECODE // max(b, 1))
        recon, layers, bounds = [], [], []
        for start in range(0, self.iw_samples, per):
            s = min(per, self.iw_samples - start)
            vs = v.repeat(s, 1, 1, 1)
            qs = [(m.repeat(s, *[1] * (m.dim() - 1)), lv.repeat(s, *[1] * (lv.dim() - 1)))
                  for m, lv in q_hat]
            z_top, top_term = self._sample_top(qs[-1])
            states: dict[int, Tensor] = {}
            rec, terms = self._descend(vs, qs, self._top_state(z_top), n - 1, 0, states)
            per_layer = [*reversed(terms), top_term]  # bottom first
            recon.append(rec.view(s, b))
            layers.append(torch.stack(per_layer).view(n, s, b))
            # L^>k: the same z_>k, then z_<=k from the prior, from the recorded state
            skip = []
            for k in range(1, n if skips else 1):
                rec_k, _ = self._descend(vs, qs, states[k - 1], k, k)
                above = torch.stack(per_layer[k:]).sum(0)
                skip.append((rec_k + above).view(s, b))
            bounds.append(torch.stack(skip) if skip else torch.zeros(0, s, b).to(v))
        return torch.cat(recon), list(torch.cat(layers, dim=1)), list(torch.cat(bounds, dim=1))

    def _terms(self, recon: Tensor, layers: list[Tensor]) -> dict[str, Tensor]:
        log_w = recon + torch.stack(layers).sum(0)  # [K, B]
        mean_w = log_w.mean(0)
        # log mean exp(w) - mean(w) from centred weights: >= 0 up to rounding
        iw_gain = (torch.logsumexp(log_w - mean_w, dim=0) - math.log(len(log_w))).clamp(min=0.0)
        terms = {"recon": recon.mean(0) + self.dequant_constant}
        terms.update({f"neg_kl_z{i + 1}": t.mean(0) for i, t in enumerate(layers)})
        terms["iw_gain"] = iw_gain
        return terms

    def score_columns(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The terms (module docstring) and the extra columns ``log_px_skip{k}``."""
        recon, layers, skips = self._draws(self._pixels(x))
        extras = {f"log_px_skip{i + 1}": torch.logsumexp(w, dim=0) - math.log(len(w))
                  + self.dequant_constant for i, w in enumerate(skips)}
        return self._terms(recon, layers), extras

    def log_prob_terms(self, x: Tensor) -> dict[str, Tensor]:
        """``recon``, ``neg_kl_z{i}``, ``iw_gain`` (module docstring), each ``[B]``; their
        sum is the K-sample IWAE bound plus D log 256 (the L^>k bounds are not drawn)."""
        recon, layers, _ = self._draws(self._pixels(x), skips=False)
        return self._terms(recon, layers)

    # -- training -----------------------------------------------------------------------
    def _one_draw(self, v: Tensor) -> tuple[Tensor, list[Tensor]]:
        """One ancestral draw z ~ q(z | x): log P(k | z) ``[B]`` and each layer's KL in
        closed form given the draws above it, bottom first, ``[B]`` each."""
        q_hat = self.bottom_up(v)
        mean_t, log_var_t = q_hat[-1]
        z = mean_t + torch.exp(0.5 * log_var_t) * _noise(mean_t)
        zeros = torch.zeros_like(mean_t)
        kls = [gaussian_kl(mean_t, log_var_t, zeros, zeros)]
        state = self._top_state(z)
        for i in reversed(range(self.n_layers - 1)):
            mean_p, log_var_p = self._layer_prior(i, state)
            mean_q, log_var_q = precision_merge(*q_hat[i], mean_p, log_var_p)
            z = mean_q + torch.exp(0.5 * log_var_q) * _noise(mean_q)
            kls.append(gaussian_kl(mean_q, log_var_q, mean_p, log_var_p))
            state = self._after_layer(i, state, z)
        return self._recon(v, state), kls[::-1]

    def training_loss(self, x: Tensor) -> Tensor:
        """-ELBO per image in nats (with -D log 256, so bpd reads off it): one ancestral
        draw, each layer's KL in closed form; free bits mask only the gradient."""
        recon, kls = self._one_draw(self._pixels(x))
        lam = float(self.config.free_bits)
        kl = sum(torch.where(k >= lam, k, k.detach()) if lam > 0 else k for k in kls)
        return -(recon - kl + self.dequant_constant)

    def elbo(self, x: Tensor) -> Tensor:
        """The one-draw, closed-form-KL ELBO + D log 256: for monitoring and tests."""
        recon, kls = self._one_draw(self._pixels(x))
        return recon - sum(kls) + self.dequant_constant

    def kl_per_layer(self, x: Tensor) -> list[Tensor]:
        """Each layer's KL (one draw), bottom first, ``[B]`` each: the nats each layer
        carries; a collapsed layer carries ~0."""
        return self._one_draw(self._pixels(x))[1]

    def extra_metadata(self) -> dict[str, str]:
        return {"iw_samples": str(self.iw_samples), "decoder": "discretized_logistic_mixture",
                "n_mix": str(self.config.n_mix), "latents": ",".join(map(str, self.config.latents)),
                "inference": "top-down (ladder, precision-weighted)",
                "free_bits": f"{self.config.free_bits:g}"}
