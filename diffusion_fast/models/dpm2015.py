"""The reverse-kernel network of the swiss-roll model of Sohl-Dickstein et al. 2015, "Deep
Unsupervised Learning using Nonequilibrium Thermodynamics" (Sec. 3.1, Appendix D.1.1).

A normalised radial-basis-function network with one hidden layer of 16 units, shared by every
timestep and by both outputs, and a linear readout learned separately for each timestep:

    h_k(x) = softmax_k( -||x - c_k||² / (2 w_k²) )                  (N, H): centres c, widths w
    z_μ = h · A_μ[t] + a_μ[t],   z_Σ = h · A_Σ[t] + a_Σ[t]          (N, D) each, t = 1..T

``diffusion_fast.diffusion.dpm2015`` turns (z_μ, z_Σ) into the mean and diagonal covariance of
p(x^(t-1) | x^(t)). The readouts start at zero, where that kernel is the forward step's own
reversal under N(0, I) (the bound then equals L_null).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn

__all__ = ["RBFReverseNet"]


class RBFReverseNet(nn.Module):
    """forward(x: (N, dim) float, t: (N,) int64 timesteps in 1..num_steps) -> (z_mu, z_sigma), each
    (N, dim) in x's dtype. Centres start on a regular grid over [-2, 2]^dim (as many points per
    axis as fit in ``n_hidden``, the rest random), widths at 1, readouts at 0."""

    def __init__(self, dim: int = 2, num_steps: int = 40, n_hidden: int = 16) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_steps", num_steps), ("n_hidden", n_hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RBFReverseNet: {name} must be a positive int, got {value!r}")
        self.dim, self.num_steps, self.n_hidden = dim, num_steps, n_hidden
        self.centers = nn.Parameter(self._initial_centers(dim, n_hidden))
        self.log_widths = nn.Parameter(torch.zeros(n_hidden))
        self.readout_mu = nn.Parameter(torch.zeros(num_steps, n_hidden, dim))
        self.bias_mu = nn.Parameter(torch.zeros(num_steps, dim))
        self.readout_sigma = nn.Parameter(torch.zeros(num_steps, n_hidden, dim))
        self.bias_sigma = nn.Parameter(torch.zeros(num_steps, dim))

    @staticmethod
    def _initial_centers(dim: int, n: int) -> Tensor:
        per_axis = max(int(math.floor(n ** (1.0 / dim) + 1e-9)), 1)
        axis = torch.linspace(-2.0, 2.0, per_axis) if per_axis > 1 else torch.zeros(1)
        grid = torch.stack(torch.meshgrid(*[axis] * dim, indexing="ij"), -1).reshape(-1, dim)
        return torch.cat([grid, torch.randn(n - grid.shape[0], dim)])

    def hidden(self, x: Tensor) -> Tensor:
        """The normalised RBF activations h(x): (N, n_hidden), rows summing to 1."""
        sq_dist = (x[:, None, :] - self.centers[None]).square().sum(-1)  # (N, H)
        return torch.softmax(-0.5 * sq_dist * torch.exp(-2.0 * self.log_widths), dim=1)

    def forward(self, x: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"RBFReverseNet: x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (x.shape[0],):
            raise ValueError(f"RBFReverseNet: t must be an int64 tensor of shape ({x.shape[0]},)")
        h = self.hidden(x)
        i = t - 1  # readouts are stored for t = 1..T at rows 0..T-1
        z_mu = torch.einsum("nh,nhd->nd", h, self.readout_mu[i]) + self.bias_mu[i]
        z_sigma = torch.einsum("nh,nhd->nd", h, self.readout_sigma[i]) + self.bias_sigma[i]
        return z_mu, z_sigma

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_steps={self.num_steps}, n_hidden={self.n_hidden}"
