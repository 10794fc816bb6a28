"""NVAE's building layers: weight-normalised conv, squeeze-excitation, factorised reduction.

Vahdat & Kautz 2020, "NVAE: A Deep Hierarchical Variational Autoencoder", Sec. 3.1 and App. A;
the layer choices follow the official code (NVlabs/NVAE ``neural_operations.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_fast.models.param_cache import derived_params

__all__ = ["FactorizedReduce", "SqueezeExcitation", "WNConv2d"]


def _weight_norm(v: Tensor, log_norm: Tensor) -> Tensor:
    return torch.exp(log_norm) * v / (torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True) + 1e-5)


class WNConv2d(nn.Conv2d):
    """``nn.Conv2d`` with NVAE's weight normalisation (Salimans & Kingma 2016):

        W[o] = exp(log_weight_norm[o]) * V[o] / (||V[o]||_2 + 1e-5)     (V = ``self.weight``, per output channel)

    ``log_weight_norm`` (C_out, 1, 1, 1) starts at ``log(||V[o]|| + 1e-2)``. ``data_init=True`` sets it and the
    bias from the first training batch so each output channel has mean 0 and std 1/5 (the official
    ``data_init``). ``weight_norm=False`` is a plain conv (the official Conv2D inside its inverted-residual
    cells). x: (N, C_in, H, W) -> (N, C_out, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, bias: bool = True, *, weight_norm: bool = True, data_init: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.log_weight_norm = None
        if weight_norm:
            init = torch.linalg.vector_norm(self.weight.detach(), dim=(1, 2, 3), keepdim=True)
            self.log_weight_norm = nn.Parameter(torch.log(init + 1e-2))
        self.data_init = data_init and weight_norm
        self.register_buffer("init_done", torch.tensor(not self.data_init), persistent=False)

    def normalized_weight(self) -> Tensor:
        """The (C_out, C_in / groups, k, k) weight the conv applies; kept between sampling calls while the
        parameters are unchanged (``derived_params``: outside autograd and compile only)."""
        if self.log_weight_norm is None:
            return self.weight
        return derived_params(self, "_normalized_weight", (self.weight, self.log_weight_norm), _weight_norm)

    @torch.no_grad()
    def _data_init(self, x: Tensor) -> None:
        w = self.weight / (torch.linalg.vector_norm(self.weight, dim=(1, 2, 3), keepdim=True) + 1e-5)
        out = F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)
        mean, std = out.mean(dim=(0, 2, 3)), 5 * out.std(dim=(0, 2, 3))
        if self.bias is not None:
            self.bias.copy_(-mean / (std + 1e-5))
        self.log_weight_norm.copy_(-torch.log(std + 1e-5).view(-1, 1, 1, 1))
        self.init_done.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not bool(self.init_done):
            self._data_init(x)
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_norm={self.log_weight_norm is not None}, data_init={self.data_init}"


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) as NVAE uses it: x * sigmoid(W2 relu(W1 mean_hw(x))),
    hidden width max(C // 16, 4). x: (N, C, H, W) -> same shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 16, 4)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels),
                                nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class FactorizedReduce(nn.Module):
    """The skip path of a stride-2 encoder cell: swish, then four 1x1 stride-2 convs on the input shifted by
    (0,0), (1,1), (0,1), (1,0), concatenated to C_out channels. (N, C_in, H, W) -> (N, C_out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        quarter = out_channels // 4
        widths = [quarter, quarter, quarter, out_channels - 3 * quarter]
        self.convs = nn.ModuleList(WNConv2d(in_channels, c, 1, stride=2) for c in widths)

    def forward(self, x: Tensor) -> Tensor:
        x = F.silu(x)
        shifts = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        return torch.cat([conv(s) for conv, s in zip(self.convs, shifts)], dim=1)
