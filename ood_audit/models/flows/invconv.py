"""The invertible 1x1 convolution (Glow, section 3.2), LU-parameterised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FlowLayer, _per_sample
from .cache import cached


class InvConv1x1(FlowLayer):
    """Invertible 1x1 convolution with an LU-decomposed weight (Glow, section 3.2).

    ``W = P @ (L * lower_mask + I) @ (U * upper_mask + diag(sign_s * exp(log_s)))``: ``P``
    and ``sign_s`` are fixed buffers, ``L``, ``U`` and ``log_s`` are learned, so
    ``log|det W| = sum(log_s)`` costs O(C). Initialised from a random orthogonal matrix
    (QR of a Gaussian drawn from torch's global RNG). ``logabsdet = H * W * sum(log_s)``.

    Scoring (eval, autograd off) reuses ``W``, ``W^-1`` and ``sum(log_s)`` between batches
    until a parameter changes (:func:`cached`). ``float64 = True`` (set by the fast paths
    that lower conv precision: TF32) runs this conv in float64, so it stays exact.
    """

    #: run the 1x1 conv in float64 (kept exact while TF32 / bf16 speed up other convs)
    float64: bool = False

    def __init__(self, channels: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        # Masks and identity are derived from ``channels``: not persisted.
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1),
                             persistent=False)
        self.register_buffer("upper_mask", torch.triu(torch.ones(channels, channels), 1),
                             persistent=False)
        self.register_buffer("eye", torch.eye(channels), persistent=False)
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def _factors(self) -> tuple[Tensor, Tensor]:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.upper_mask + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def weight(self) -> Tensor:
        """The ``[C, C]`` matrix ``W`` (forward: ``z[:, i] = sum_j W[i, j] x[:, j]``)."""
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def weight_inverse(self) -> Tensor:
        """``W^-1`` from triangular solves in float64 (exact up to rounding, never inv(W))."""
        lower, upper = (f.double() for f in self._factors())
        eye = self.eye.double()
        lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        upper_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        # P is a permutation matrix, so P^-1 = P^T.
        return (upper_inv @ lower_inv @ self.perm.double().T).to(self.log_s.dtype)

    def _params(self) -> tuple[Tensor, ...]:
        return (self.lower, self.upper, self.log_s, self.perm, self.sign_s)

    def _logabsdet(self, x: Tensor) -> Tensor:
        log_det_w = cached(self, "logdet", (self.log_s,),
                           lambda: self.log_s.double().sum().to(self.log_s.dtype))
        return _per_sample(x.shape[2] * x.shape[3] * log_det_w, x.shape[0])

    def _conv(self, x: Tensor, name: str, matrix) -> Tensor:
        c = x.shape[1]
        dtype = torch.float64 if self.float64 else x.dtype
        kernel = cached(self, f"{name}.{dtype}", self._params(),
                        lambda: matrix().to(dtype).view(c, c, 1, 1))
        return F.conv2d(x.to(dtype), kernel).to(x.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._conv(x, "weight", self.weight), self._logabsdet(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._conv(z, "weight_inverse", self.weight_inverse), -self._logabsdet(z)
