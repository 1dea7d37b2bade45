"""A convolutional VAE (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014)
scored by the importance-weighted bound (Burda, Grosse & Salakhutdinov, "Importance
Weighted Autoencoders", ICLR 2016), as a :class:`~ood_audit.models.base.DensityModel`.

Model: z ~ N(0, I) (a flat ``latent``-dim vector); the decoder maps z to a discretized
logistic mixture (Salimans et al. 2017, :mod:`~ood_audit.models.discretized`) over the
256 values of every pixel, channels coupled within a pixel as in PixelCNN++. The
mixture was chosen over a 256-way softmax: it shares code with PixelCNN++, knows that
neighbouring pixel values are close, and needs 3 * n_mix (gray) or 10 * n_mix (RGB)
outputs per pixel instead of 256 per channel. q(z | x) is a diagonal Gaussian from a
strided conv encoder.

The VAE is a model of the integer pixels k: it reads k = floor(256 x) (clamped to
0..255) from the dequantized input, so its scores do not depend on the dequantization
noise. To share the flows' convention (log p(x) is a density on [0, 1)^D), it reports
the piecewise-constant density of x = (k + u) / 256, p(x) = P(k) * 256^D, so that
``bits_per_dim(log_px)`` = -log2 P(k) / D. The constant D * log 256 sits in ``recon``.

Terms written by :meth:`VAE.log_prob_terms` (each ``[B]``, nats), from K = ``iw_samples``
draws z_k ~ q(z | x) with log-weights w_k = log P(k | z_k) + log p(z_k) - log q(z_k | x):

- ``recon``   = mean_k log P(k | z_k) + D log 256;
- ``neg_kl``  = mean_k [log p(z_k) - log q(z_k | x)] (a Monte Carlo -KL);
- ``iw_gain`` = log mean_k exp(w_k) - mean_k w_k >= 0 (Jensen), the IWAE bound's gain
  over the K-sample ELBO estimate.

``recon + neg_kl + iw_gain`` is the IWAE bound L_K + D log 256 <= log p(x): ``log_px``.
It is stochastic: z is drawn from torch's global RNG (the scorer may seed it), and it
tightens (in expectation) as K grows. Training minimises -ELBO (one reparameterised z,
analytic KL), see :meth:`VAE.training_loss`.

``encoder``, :meth:`VAE.posterior`, :meth:`VAE.encoder_input` and
:meth:`VAE.decoder_log_prob` are what likelihood regret re-fits per image
(:mod:`~ood_audit.models.regret`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
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
MAX_DECODE = 512  # images decoded at once when scoring K samples: bounds memory


@dataclass
class VAEConfig:
    """VAE size: ``latent`` dims of z, ``hidden`` conv channels (doubled after the first
    stride), ``n_mix`` logistic components per pixel, ``iw_samples`` K of the scored
    IWAE bound (16 keeps CPU scoring affordable; the scorer can change it)."""

    latent: int = 64
    hidden: int = 64
    n_mix: int = 5
    iw_samples: int = 16

    def __post_init__(self) -> None:
        for name in ("latent", "hidden", "n_mix", "iw_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"vae {name} must be a positive integer, got {value!r}")


#: Named sizes. docs/paper.md does not fix the paper's VAE; "paper" is a CIFAR-scale one.
VAE_PRESETS: dict[str, dict] = {
    "tiny": {"latent": 8, "hidden": 16, "n_mix": 2},
    "small": {"latent": 32, "hidden": 32, "n_mix": 5},
    "paper": {"latent": 128, "hidden": 128, "n_mix": 10},
}


def _halved(n: int) -> int:
    return (n + 1) // 2  # a 3x3, stride-2, padding-1 conv maps n -> ceil(n / 2)


def gaussian_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Sum over the last dim of log N(z; mean, exp(log_std)^2)."""
    return (-0.5 * ((z - mean) * torch.exp(-log_std)) ** 2 - log_std - 0.5 * LOG_2PI).sum(-1)


class VAE(ImportanceWeighted):
    """Conv encoder -> q(z | x) = N(mu, sigma^2); z -> deconv decoder -> per-pixel
    discretized logistic mixture. Input x in [0, 1)^D, shape ``[B, C, H, W]``."""

    def __init__(self, config: VAEConfig, input_shape: tuple[int, int, int]):
        super().__init__()
        channels, height, width = input_shape
        self.config = config
        self.input_shape = (channels, height, width)
        self.iw_samples = config.iw_samples
        h1, w1 = _halved(height), _halved(width)
        self.sizes = [(height, width), (h1, w1), (_halved(h1), _halved(w1))]
        hid, wide = config.hidden, 2 * config.hidden
        self.flat = wide * self.sizes[2][0] * self.sizes[2][1]
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, hid, 3, padding=1), nn.ELU(),
            nn.Conv2d(hid, wide, 3, stride=2, padding=1), nn.ELU(),
            nn.Conv2d(wide, wide, 3, stride=2, padding=1), nn.ELU(),
            nn.Flatten(),
            nn.Linear(self.flat, 2 * config.latent),
        )
        self.dec_in = nn.Sequential(nn.Linear(config.latent, self.flat), nn.ELU())
        # kernel 3, stride 2, padding 1 upsamples n -> 2n - 1 or 2n (output_size picks),
        # undoing the encoder's ceil(n / 2) exactly for odd and even sizes.
        self.up1 = nn.ConvTranspose2d(wide, wide, 3, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(wide, hid, 3, stride=2, padding=1)
        self.out = nn.Conv2d(hid, n_mix_params(channels, config.n_mix), 3, padding=1)
        self.act = nn.ELU()

    # -- the two networks ---------------------------------------------------------------
    def encode(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """q(z | x): (mean, log_std), each ``[B, latent]``; v on the [-1, 1] scale."""
        return self.posterior(self.encoder(v))

    def posterior(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log_std) of q(z | x) from the encoder's output ``h`` ``[B, 2 latent]``."""
        mean, log_std = h.chunk(2, dim=-1)
        return mean, log_std.clamp(-10.0, 5.0)  # wide bounds: only stop exp() blow-ups

    def activation_memory_format(self) -> torch.memory_format:
        """Channels-last on CPU, where oneDNN's transposed convolutions run several times
        faster in it (the same function up to float rounding); NCHW elsewhere."""
        device = next(self.parameters()).device
        return torch.channels_last if device.type == "cpu" else torch.contiguous_format

    def decode(self, z: Tensor) -> Tensor:
        """Mixture parameters ``[N, P, H, W]`` of p(k | z) for z ``[N, latent]``."""
        (h0, w0), (h1, w1), (h2, w2) = self.sizes
        h = self.dec_in(z).view(-1, 2 * self.config.hidden, h2, w2)
        h = h.contiguous(memory_format=self.activation_memory_format())
        h = self.act(self.up1(h, output_size=(h1, w1)))
        h = self.act(self.up2(h, output_size=(h0, w0)))
        return self.out(h)

    def decoder_log_prob(self, v: Tensor, z: Tensor) -> Tensor:
        """log P(k | z) summed over pixels and channels, ``[N]``; v ``[N, C, H, W]``."""
        params = self.decode(z)
        return discretized_mix_logistic_log_prob(v, params, self.config.n_mix).flatten(1).sum(1)

    def encoder_input(self, x: Tensor) -> Tensor:
        """The encoder's input: the integer pixels of x on PixelCNN++'s [-1, 1] scale."""
        return pixels_to_centered(pixels_from_unit(x))

    @property
    def dequant_constant(self) -> float:
        """D log 256: log p(x) of the dequantized density minus log P(k)."""
        return math.prod(self.input_shape) * math.log(N_LEVELS)

    # -- DensityModel -------------------------------------------------------------------
    def log_prob_terms(self, x: Tensor) -> dict[str, Tensor]:
        """``recon``, ``neg_kl``, ``iw_gain`` (module docstring), each ``[B]``; their sum
        is the K-sample IWAE bound plus D log 256, a stochastic lower bound of log p(x)."""
        v = self.encoder_input(x)
        b, k = v.shape[0], self.iw_samples
        mean, log_std = self.encode(v)
        # z: [K, B, latent] from the global RNG; decode in slices of <= MAX_DECODE images.
        z = mean + torch.exp(log_std) * torch.randn(k, *mean.shape, dtype=mean.dtype,
                                                    device=mean.device)
        log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))  # [K, B]
        log_qz = gaussian_log_prob(z, mean, log_std)  # [K, B]
        per = max(1, MAX_DECODE // max(b, 1))
        recon = torch.cat([
            self.decoder_log_prob(v.expand(z_s.shape[0], *v.shape).reshape(-1, *v.shape[1:]),
                                 z_s.reshape(-1, z.shape[-1])).view(-1, b)
            for z_s in z.split(per, dim=0)
        ])  # [K, B]
        log_w = recon + log_pz - log_qz
        mean_w = log_w.mean(0)
        # log mean exp(w) - mean(w) from centred weights: >= 0 up to rounding, exactly 0
        # at K = 1; the clamp removes rounding noise only.
        iw_gain = (torch.logsumexp(log_w - mean_w, dim=0) - math.log(k)).clamp(min=0.0)
        return {
            "recon": recon.mean(0) + self.dequant_constant,
            "neg_kl": (log_pz - log_qz).mean(0),
            "iw_gain": iw_gain,
        }

    def training_loss(self, x: Tensor) -> Tensor:
        """-ELBO per image (nats, including -D log 256 so bpd reads off it): one
        reparameterised z ~ q(z | x) for the reconstruction, the Gaussian KL in closed
        form (Kingma & Welling 2014, eq. 10) for lower variance."""
        v = self.encoder_input(x)
        mean, log_std = self.encode(v)
        z = mean + torch.exp(log_std) * torch.randn_like(mean)
        kl = 0.5 * (mean**2 + torch.exp(2 * log_std) - 1.0 - 2 * log_std).sum(-1)
        return -(self.decoder_log_prob(v, z) - kl + self.dequant_constant)

    def elbo(self, x: Tensor) -> Tensor:
        """The analytic-KL ELBO + D log 256, one z per image: for monitoring and tests."""
        return -self.training_loss(x)

    def extra_metadata(self) -> dict[str, str]:
        return {"iw_samples": str(self.iw_samples), "decoder": "discretized_logistic_mixture",
                "n_mix": str(self.config.n_mix), "latent": str(self.config.latent)}
