"""Noise schedules of the diffusion q(x_t | x_{t-1}) = N(sqrt(1 - β_t) x_{t-1}, β_t I) (Ho et al. 2020, Eq. 2).

``DiffusionSchedule`` holds β_1..β_T and every quantity derived from them, computed in float64
on the CPU (as the official ``GaussianDiffusion2`` does in NumPy). Index i = 0..T-1 stands for
the paper's t = i + 1, as in the official code. ``gather`` casts an entry to the data's dtype
and device at use time.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["DiffusionSchedule", "linear_betas", "linear_schedule", "gather"]


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """β_t spaced linearly from beta_start to beta_end (the paper's 1e-4 -> 0.02, T = 1000; Sec. 4).

    Returns a (num_timesteps,) float64 tensor.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"linear_betas: num_timesteps must be a positive int, got {num_timesteps!r}")
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"linear_betas: {name} must be a number in (0, 1), got {value!r}")
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


@dataclasses.dataclass(frozen=True)
class DiffusionSchedule:
    """β_t and its derived quantities, each a (T,) float64 tensor (Ho et al. 2020, Eqs. 4, 6, 7).

    alphas_cumprod            ᾱ_t = prod_{s<=t} (1 - β_s)
    alphas_cumprod_prev       ᾱ_{t-1} (1 at t = 1)
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod,
    sqrt_recip_alphas_cumprod (1/sqrt(ᾱ_t)), sqrt_recipm1_alphas_cumprod (sqrt(1/ᾱ_t - 1))
    posterior_variance        β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)                       (Eq. 7)
    posterior_log_variance_clipped   log β̃_t with β̃_1 (= 0) replaced by β̃_2
    posterior_mean_coef1      sqrt(ᾱ_{t-1}) β_t / (1 - ᾱ_t)      (multiplies x_0,  Eq. 7)
    posterior_mean_coef2      sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t) (multiplies x_t, Eq. 7)
    fixed_large_log_variance  log β_t with β_1 replaced by β̃_2 (the official "fixedlarge"
                              variance σ_t² = β_t; the replacement gives a better decoder NLL)

    Build with ``DiffusionSchedule.from_betas(betas)`` or ``linear_schedule()``.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    log_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    fixed_large_log_variance: Tensor

    @classmethod
    def from_betas(cls, betas: Union[Tensor, Sequence[float]]) -> "DiffusionSchedule":
        """Derive everything from betas: a 1-D sequence or tensor, each value in (0, 1), T >= 2."""
        if isinstance(betas, Tensor):
            if betas.dtype == torch.bool or betas.is_complex():
                raise TypeError(f"DiffusionSchedule: betas must be real numbers, got {betas.dtype}")
            b = betas.detach().to(device="cpu", dtype=torch.float64)
        else:
            try:
                b = torch.tensor(list(betas), dtype=torch.float64)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"DiffusionSchedule: betas must be a sequence of numbers ({exc})") from None
        if b.dim() != 1 or b.numel() < 2:
            raise ValueError(f"DiffusionSchedule: betas must be 1-D with at least 2 entries, "
                             f"got shape {tuple(b.shape)}")
        if not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
            bad = b[~(torch.isfinite(b) & (b > 0) & (b < 1))]
            raise ValueError(f"DiffusionSchedule: every beta must be in (0, 1), got {bad[:5].tolist()}")
        alphas = 1.0 - b
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([b.new_ones(1), ac[:-1]])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        return cls(
            betas=b,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=ac.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(),
            log_one_minus_alphas_cumprod=torch.log(1.0 - ac),
            sqrt_recip_alphas_cumprod=(1.0 / ac).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1.0).sqrt(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            posterior_mean_coef1=b * ac_prev.sqrt() / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            fixed_large_log_variance=torch.log(torch.cat([post_var[1:2], b[1:]])),
        )

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device: Union[str, torch.device]) -> "DiffusionSchedule":
        """The same schedule with every tensor on ``device`` (still float64), so ``gather`` copies nothing."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiffusionSchedule:
    """The paper's schedule: ``DiffusionSchedule.from_betas(linear_betas(...))``."""
    return DiffusionSchedule.from_betas(linear_betas(num_timesteps, beta_start, beta_end))


def gather(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """values[t] as a (B, 1, ..., 1) tensor in x's dtype and on x's device, to broadcast against x.

    values: (T,) float64 schedule entry; t: (B,) int64 indices in [0, T); x: (B, ...).
    """
    out = values.to(x.device)[t.to(x.device)].to(x.dtype)
    return out.reshape((t.shape[0],) + (1,) * (x.dim() - 1))

