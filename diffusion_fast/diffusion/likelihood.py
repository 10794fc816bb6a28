"""Closed-form pieces of the DDPM variational bound (Ho et al. 2020, Eqs. 5 and 13).

All functions are elementwise and broadcast; results are in nats, in the inputs' dtype.
They follow the official ``diffusion_utils_2.normal_kl`` and ``utils.discretized_gaussian_log_likelihood``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["normal_kl", "approx_standard_normal_cdf", "standard_normal_cdf", "discretized_gaussian_log_likelihood"]


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats:

        0.5 * (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2))
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) ≈ 0.5 (1 + tanh(sqrt(2/π) (x + 0.044715 x³))), the approximation the official code
    (and so the paper's reported bits/dim) uses; |error| < 2e-4."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) = 0.5 (1 + erf(x / sqrt(2))), exact."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor, *,
                                        exact_cdf: bool = False) -> Tensor:
    """log p(x) for 8-bit data under N(means, e^(2 log_scales)) integrated over x's bin (Eq. 13).

    x: data in [-1, 1], uint8 values rescaled as x = v / 127.5 - 1, so bins are [x - 1/255,
    x + 1/255]; the first bin extends to -inf and the last to +inf. means, log_scales: same
    shape as x. Returns log-probabilities in nats, same shape and dtype, with each bin's
    probability floored at 1e-12. ``exact_cdf=False`` uses the official tanh approximation of Φ.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"discretized_gaussian_log_likelihood: x, means and log_scales must have one shape, "
                         f"got {tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}")
    cdf = standard_normal_cdf if exact_cdf else approx_standard_normal_cdf
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
