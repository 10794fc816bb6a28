"""NVAE's spectral regularisation and BatchNorm-scale penalty (Vahdat & Kautz 2020, Sec. 3.2, Eq. 4).

L_SR = lambda * sum_i s(W_i), s(W) the largest singular value of the conv weight reshaped to
(C_out, C_in/groups * k * k), estimated by power iteration on persistent u, v (Yoshida & Miyato 2017;
Miyato et al. 2018): v <- normalize(W^T u), u <- normalize(W v), s = u^T W v. Weights of one shape are
iterated together as a batch, as in the official ``spectral_norm_parallel``. The BN penalty is
sum over BN layers of max_c |gamma_c| (official ``batchnorm_loss``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SpectralRegularizer", "batchnorm_loss"]


class SpectralRegularizer:
    """Keeps the power-iteration vectors between steps. ``__call__(weights)`` -> sum of the spectral norm
    estimates (a scalar with gradient through the weights). The first call for a shape runs 10 x n_iter
    iterations from random vectors, later calls n_iter (the official schedule, n_iter = 4)."""

    def __init__(self, n_iter: int = 4) -> None:
        self.n_iter = n_iter
        self.u: dict = {}
        self.v: dict = {}

    def sigmas(self, weights: Iterable[Tensor]) -> list:
        """Spectral norm estimates, one (scalar) per weight, in order."""
        weights = list(weights)
        groups: dict = {}
        for i, w in enumerate(weights):
            m = w.reshape(w.shape[0], -1)
            groups.setdefault(tuple(m.shape), []).append((i, m))
        out = [None] * len(weights)
        for shape, items in groups.items():
            mats = torch.stack([m for _, m in items])                          # (B, rows, cols)
            with torch.no_grad():
                n_iter = self.n_iter
                if shape not in self.u or self.u[shape].shape[0] != mats.shape[0]:
                    self.u[shape] = F.normalize(torch.randn(mats.shape[:2], dtype=mats.dtype, device=mats.device),
                                                dim=1, eps=1e-3)
                    self.v[shape] = F.normalize(torch.randn(mats.shape[0], mats.shape[2], dtype=mats.dtype,
                                                            device=mats.device), dim=1, eps=1e-3)
                    n_iter = 10 * self.n_iter
                u, v = self.u[shape].to(mats.dtype), self.v[shape].to(mats.dtype)
                for _ in range(n_iter):
                    v = F.normalize(torch.bmm(u.unsqueeze(1), mats).squeeze(1), dim=1, eps=1e-3)
                    u = F.normalize(torch.bmm(mats, v.unsqueeze(2)).squeeze(2), dim=1, eps=1e-3)
                self.u[shape], self.v[shape] = u, v
            sigma = torch.bmm(u.unsqueeze(1), torch.bmm(mats, v.unsqueeze(2))).view(-1)
            for (i, _), s in zip(items, sigma):
                out[i] = s
        return out

    def __call__(self, weights: Iterable[Tensor]) -> Tensor:
        return torch.stack(self.sigmas(weights)).sum()


def batchnorm_loss(bn_layers: Iterable[nn.BatchNorm2d]) -> Tensor:
    """sum over layers of max_c |gamma_c| for affine BN layers."""
    terms = [bn.weight.abs().max() for bn in bn_layers if bn.affine]
    return torch.stack(terms).sum()
