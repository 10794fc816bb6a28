"""NVAE's distributions (Vahdat & Kautz 2020, Sec. 3.2; official ``distributions.py``).

* ``Normal``: diagonal Gaussian with NVAE's parameter guards, mu = 5 tanh(mu / 5),
  sigma = exp(5 tanh(log_sigma / 5)) + 1e-2, and a sampling temperature t (sigma *= t).
* ``residual_normal``: the residual posterior q = N(mu_p + dmu, sigma_p * dsigma) (Eq. 2), built from
  the prior's raw parameters plus the encoder's offsets in log space.
* ``residual_normal_kl``: its KL to the prior, Eq. 3: 0.5 * (dmu^2 / sigma_p^2 + dsigma^2 - log dsigma^2 - 1).
* ``DiscMixLogistic``: discretised mixture of logistics over 2^bits levels (Salimans et al. 2017,
  PixelCNN++), with the channel-autoregressive mean coefficients for C > 1.
* ``BernoulliDecoder``: per-pixel Bernoulli for binary data.
Decoder distributions take x in [0, 1], (N, C, H, W), and return log-likelihoods (N, H, W).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BernoulliDecoder", "DiscMixLogistic", "Normal", "residual_normal", "residual_normal_kl", "soft_clamp"]


def soft_clamp(x: Tensor, bound: float = 5.0) -> Tensor:
    """bound * tanh(x / bound): smooth clamp to (-bound, bound)."""
    return bound * torch.tanh(x / bound)


def residual_normal_kl(delta_mu: Tensor, delta_sigma: Tensor, sigma_p: Tensor) -> Tensor:
    """KL(N(mu_p + delta_mu, sigma_p * delta_sigma) || N(mu_p, sigma_p)), elementwise (Eq. 3)."""
    return 0.5 * ((delta_mu / sigma_p) ** 2 + delta_sigma ** 2 - 2 * torch.log(delta_sigma) - 1)


class Normal:
    """Diagonal Gaussian; mu, log_sigma: same shape (N, L, H, W); ``temp`` scales sigma (sampling only)."""

    def __init__(self, mu: Tensor, log_sigma: Tensor, temp: float = 1.0) -> None:
        self.mu = soft_clamp(mu)
        self.sigma = (torch.exp(soft_clamp(log_sigma)) + 1e-2) * temp

    def rsample(self) -> Tensor:
        """Reparameterised sample mu + sigma * eps, eps ~ N(0, I)."""
        return self.mu + self.sigma * torch.randn_like(self.mu)

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * ((z - self.mu) / self.sigma) ** 2 - torch.log(self.sigma) - 0.5 * math.log(2 * math.pi)

    def kl(self, prior: Normal) -> Tensor:
        """KL(self || prior) elementwise, written in the residual form of Eq. 3."""
        return residual_normal_kl(self.mu - prior.mu, self.sigma / prior.sigma, prior.sigma)


def residual_normal(mu_p: Tensor, log_sigma_p: Tensor, delta_mu: Tensor, delta_log_sigma: Tensor) -> Normal:
    """q(z | x) = N(mu_p + delta_mu, sigma_p * delta_sigma) with delta_sigma = exp(delta_log_sigma) (Eq. 2),
    parameterised as in the official code: N(mu_p + delta_mu, log_sigma_p + delta_log_sigma) before the guards."""
    return Normal(mu_p + delta_mu, log_sigma_p + delta_log_sigma)


def _num_coeffs(channels: int) -> int:
    return channels * (channels - 1) // 2


class DiscMixLogistic:
    """Discretised logistic mixture. params: (N, K * (1 + 2C + C(C-1)/2), H, W) =
    [K mixture logits | per channel: K means, K log-scales | C(C-1)/2 x K mean coefficients (tanh)].
    Channel c's mean is mu_c + sum_{j<c} coeff_{c,j} x_j (PixelCNN++), with x in [-1, 1]."""

    def __init__(self, params: Tensor, num_mix: int, channels: int, num_bits: int = 8) -> None:
        n, p, h, w = params.shape
        if p != self.num_params(num_mix, channels):
            raise ValueError(f"DiscMixLogistic: params must have {self.num_params(num_mix, channels)} channels for "
                             f"num_mix={num_mix}, channels={channels}, got {p}")
        self.num_mix, self.channels, self.max_val = num_mix, channels, 2.0 ** num_bits - 1
        self.logit_probs = params[:, :num_mix]                                    # (N, K, H, W)
        rest = params[:, num_mix:]
        self.means = rest[:, :channels * num_mix].view(n, channels, num_mix, h, w)
        log_scales = rest[:, channels * num_mix:2 * channels * num_mix].view(n, channels, num_mix, h, w)
        self.log_scales = torch.clamp(log_scales, min=-7.0)
        coeffs = rest[:, 2 * channels * num_mix:].view(n, _num_coeffs(channels), num_mix, h, w)
        self.coeffs = torch.tanh(coeffs)

    @staticmethod
    def num_params(num_mix: int, channels: int) -> int:
        return num_mix * (1 + 2 * channels + _num_coeffs(channels))

    def _means(self, x: Tensor) -> Tensor:
        """Channel-autoregressive means given x (N, C, 1, H, W) in [-1, 1] -> (N, C, K, H, W)."""
        means, k = [self.means[:, 0]], 0
        for c in range(1, self.channels):
            m = self.means[:, c]
            for j in range(c):
                m = m + self.coeffs[:, k] * x[:, j]
                k += 1
            means.append(m)
        return torch.stack(means, dim=1)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) for x (N, C, H, W) on the grid {i / max_val} in [0, 1] -> (N, H, W)."""
        x = (2 * x - 1).unsqueeze(2)                                              # (N, C, 1, H, W) in [-1, 1]
        centered = x - self._means(x)
        inv_s = torch.exp(-self.log_scales)
        half_bin = 1.0 / self.max_val
        plus_in, min_in, mid_in = inv_s * (centered + half_bin), inv_s * (centered - half_bin), inv_s * centered
        log_cdf_plus = plus_in - F.softplus(plus_in)                              # log sigmoid(plus_in)
        log_one_minus_cdf_min = -F.softplus(min_in)                               # log(1 - sigmoid(min_in))
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        log_pdf_mid = mid_in - self.log_scales - 2 * F.softplus(mid_in)           # density at the bin centre
        log_mid = torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-10)),
                              log_pdf_mid - math.log(self.max_val / 2))
        log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid))
        log_probs = log_probs.sum(dim=1) + F.log_softmax(self.logit_probs, dim=1)  # (N, K, H, W)
        return torch.logsumexp(log_probs, dim=1)

    def sample(self, t: float = 1.0) -> Tensor:
        """A sample (N, C, H, W) in [0, 1]: Gumbel-max mixture choice, then a logistic sample per channel with
        scale multiplied by t."""
        u = torch.rand_like(self.logit_probs).clamp(1e-5, 1 - 1e-5)
        pick = F.one_hot(torch.argmax(self.logit_probs / t - torch.log(-torch.log(u)), dim=1), self.num_mix)
        pick = pick.permute(0, 3, 1, 2).unsqueeze(1).to(self.means.dtype)       # (N, 1, K, H, W)
        means, log_scales = (self.means * pick).sum(2), (self.log_scales * pick).sum(2)  # (N, C, H, W)
        coeffs = (self.coeffs * pick).sum(2)
        u = torch.rand_like(means).clamp(1e-5, 1 - 1e-5)
        noisy = means + torch.exp(log_scales) * t * (torch.log(u) - torch.log1p(-u))
        xs, k = [], 0
        for c in range(self.channels):
            v = noisy[:, c]
            for j in range(c):
                v = v + coeffs[:, k] * xs[j]
                k += 1
            xs.append(v.clamp(-1, 1))
        return (torch.stack(xs, dim=1) + 1) / 2

    def mean(self) -> Tensor:
        """Mixture-weighted mean of the channel means ignoring the coefficients, (N, C, H, W) in [0, 1]."""
        w = torch.softmax(self.logit_probs, dim=1).unsqueeze(1)
        return ((self.means * w).sum(2).clamp(-1, 1) + 1) / 2


class BernoulliDecoder:
    """Per-pixel Bernoulli; logits (N, C, H, W)."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x), x in {0, 1} (N, C, H, W) -> (N, H, W)."""
        return -F.binary_cross_entropy_with_logits(self.logits, x, reduction="none").sum(dim=1)

    def sample(self, t: float = 1.0) -> Tensor:
        return torch.bernoulli(torch.sigmoid(self.logits / t))

    def mean(self) -> Tensor:
        return torch.sigmoid(self.logits)
