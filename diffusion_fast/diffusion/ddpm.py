"""DDPM forward process, training loss and variational bound in bits/dim (Ho et al. 2020).

Every function takes the ε-prediction network as ``model(x_t, t) -> eps`` (x_t: (B, ...) float,
t: (B,) int64) and a ``DiffusionSchedule``. Data x_0 lies in [-1, 1] (8-bit images rescaled as
v / 127.5 - 1). Timesteps are 0-based indices t = 0..T-1 standing for the paper's 1..T, as in the
official ``diffusion_utils_2.GaussianDiffusion2``, which these functions follow. Schedule entries
are float64 and are cast to the data's dtype at use.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from diffusion_fast.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
from diffusion_fast.diffusion.schedules import DiffusionSchedule, gather

__all__ = [
    "q_mean_variance", "q_sample", "q_posterior_mean_variance", "predict_xstart_from_eps", "p_mean_variance",
    "loss_simple", "vb_terms_bpd", "prior_bpd", "calc_bpd_loop", "BPDResult", "VAR_TYPES",
]

VAR_TYPES = ("fixedlarge", "fixedsmall")  # σ_t² = β_t (CIFAR-10 runs) or β̃_t (Sec. 3.2)


# ---------------------------------------------------------------------------
# Argument checks: ValueError/TypeError naming the argument.
# ---------------------------------------------------------------------------
def _check_data(name: str, x, fn: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{fn}: {name} must have shape (B, ...) with B >= 1, got {tuple(x.shape)}")


def _check_like(name: str, y, x: Tensor, fn: str) -> None:
    _check_data(name, y, fn)
    if y.shape != x.shape:
        raise ValueError(f"{fn}: {name} must have x_start's shape {tuple(x.shape)}, got {tuple(y.shape)}")


def _check_schedule(schedule, fn: str) -> None:
    if not isinstance(schedule, DiffusionSchedule):
        raise TypeError(f"{fn}: schedule must be a DiffusionSchedule, got {type(schedule).__name__}")


def _check_t(t, x: Tensor, schedule: DiffusionSchedule, fn: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: t must be a Tensor of int timesteps, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{fn}: t must be an integer tensor (indices 0..T-1), got {t.dtype}")
    if tuple(t.shape) != (x.shape[0],):
        raise ValueError(f"{fn}: t must have shape ({x.shape[0]},), one timestep per sample, got {tuple(t.shape)}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= schedule.num_timesteps:
        raise ValueError(f"{fn}: t must be in [0, {schedule.num_timesteps - 1}], got values in [{lo}, {hi}]")


def _check_var_type(var_type: str, fn: str) -> None:
    if var_type not in VAR_TYPES:
        raise ValueError(f"{fn}: var_type must be one of {VAR_TYPES}, got {var_type!r}")


def _randn_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


# ---------------------------------------------------------------------------
# Forward process q and its posterior
# ---------------------------------------------------------------------------
def q_mean_variance(schedule: DiffusionSchedule, x_start: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) (Eq. 4): (mean, variance, log_variance),
    the mean shaped like x_start, the others (B, 1, ..., 1)."""
    _check_schedule(schedule, "q_mean_variance")
    _check_data("x_start", x_start, "q_mean_variance")
    _check_t(t, x_start, schedule, "q_mean_variance")
    mean = gather(schedule.sqrt_alphas_cumprod, t, x_start) * x_start
    variance = gather(1.0 - schedule.alphas_cumprod, t, x_start)
    return mean, variance, gather(schedule.log_one_minus_alphas_cumprod, t, x_start)


def q_sample(schedule: DiffusionSchedule, x_start: Tensor, t: Tensor, noise: Optional[Tensor] = None, *,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, ε ~ N(0, I) (Eq. 4, reparametrised).

    x_start: (B, ...) float; t: (B,) int in [0, T); noise: like x_start (drawn with
    ``generator`` when None). Returns x_t like x_start.
    """
    _check_schedule(schedule, "q_sample")
    _check_data("x_start", x_start, "q_sample")
    _check_t(t, x_start, schedule, "q_sample")
    if noise is None:
        noise = _randn_like(x_start, generator)
    _check_like("noise", noise, x_start, "q_sample")
    return _q_sample(schedule, x_start, t, noise)


def _q_sample(schedule: DiffusionSchedule, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    return (gather(schedule.sqrt_alphas_cumprod, t, x_start) * x_start
            + gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)


def q_posterior_mean_variance(schedule: DiffusionSchedule, x_start: Tensor, x_t: Tensor,
                              t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I) (Eqs. 6-7): (mean like x_t, variance and clipped
    log-variance shaped (B, 1, ..., 1))."""
    _check_schedule(schedule, "q_posterior_mean_variance")
    _check_data("x_start", x_start, "q_posterior_mean_variance")
    _check_like("x_t", x_t, x_start, "q_posterior_mean_variance")
    _check_t(t, x_start, schedule, "q_posterior_mean_variance")
    return _q_posterior(schedule, x_start, x_t, t)


def _q_posterior(schedule: DiffusionSchedule, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    mean = (gather(schedule.posterior_mean_coef1, t, x_t) * x_start
            + gather(schedule.posterior_mean_coef2, t, x_t) * x_t)
    return mean, gather(schedule.posterior_variance, t, x_t), gather(schedule.posterior_log_variance_clipped, t, x_t)


def predict_xstart_from_eps(schedule: DiffusionSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t) = sqrt(1/ᾱ_t) x_t - sqrt(1/ᾱ_t - 1) ε (Eq. 4 solved for x_0).

    x_t, eps: (B, ...) float; t: (B,) int in [0, T). Returns x̂_0 like x_t."""
    _check_schedule(schedule, "predict_xstart_from_eps")
    _check_data("x_t", x_t, "predict_xstart_from_eps")
    _check_like("eps", eps, x_t, "predict_xstart_from_eps")
    _check_t(t, x_t, schedule, "predict_xstart_from_eps")
    return _xstart_from_eps(schedule, x_t, t, eps)


def _xstart_from_eps(schedule: DiffusionSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    return (gather(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - gather(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


# ---------------------------------------------------------------------------
# Reverse process p_θ
# ---------------------------------------------------------------------------
def p_mean_variance(model, schedule: DiffusionSchedule, x_t: Tensor, t: Tensor, *, clip_denoised: bool = True,
                    var_type: str = "fixedlarge") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """p_θ(x_{t-1} | x_t) = N(μ_θ, σ_t² I) with ε-prediction (Eq. 11, computed as the official
    code does: μ_θ = μ̃_t(x̂_0, x_t) with x̂_0 from ``predict_xstart_from_eps``, clipped to [-1, 1]
    when ``clip_denoised``). Returns (mean, variance, log_variance, pred_xstart); the variance
    terms are (B, 1, ..., 1): β_t for "fixedlarge" (log-variance at t = 0 uses β̃_2), β̃_t for "fixedsmall".
    """
    _check_schedule(schedule, "p_mean_variance")
    _check_data("x_t", x_t, "p_mean_variance")
    _check_t(t, x_t, schedule, "p_mean_variance")
    _check_var_type(var_type, "p_mean_variance")
    return _p_mean_variance(model, schedule, x_t, t, clip_denoised, var_type)


def _p_mean_variance(model, schedule, x_t, t, clip_denoised, var_type):
    eps = model(x_t, t)
    if not isinstance(eps, Tensor) or eps.shape != x_t.shape:
        raise ValueError(f"model(x_t, t) must return a tensor shaped like x_t {tuple(x_t.shape)}, "
                         f"got {getattr(eps, 'shape', type(eps).__name__)}")
    if var_type == "fixedlarge":
        variance, log_variance = schedule.betas, schedule.fixed_large_log_variance
    else:
        variance, log_variance = schedule.posterior_variance, schedule.posterior_log_variance_clipped
    pred_xstart = _xstart_from_eps(schedule, x_t, t, eps)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1.0, 1.0)
    mean, _, _ = _q_posterior(schedule, pred_xstart, x_t, t)
    return mean, gather(variance, t, x_t), gather(log_variance, t, x_t), pred_xstart


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------
def loss_simple(model, schedule: DiffusionSchedule, x_start: Tensor, *, t: Optional[Tensor] = None,
                noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """L_simple (Eq. 14, Algorithm 1): mean over pixels of (ε - ε_θ(sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, t))².

    x_start: (B, ...) float in [-1, 1]; t: (B,) int, drawn uniformly from [0, T) when None;
    noise: like x_start, standard normal when None (both drawn with ``generator``).
    Returns the per-example loss, (B,) in x_start's dtype; its mean is the training loss.
    """
    _check_schedule(schedule, "loss_simple")
    _check_data("x_start", x_start, "loss_simple")
    if t is None:
        device = generator.device if generator is not None else x_start.device
        t = torch.randint(0, schedule.num_timesteps, (x_start.shape[0],), generator=generator, device=device)
        t = t.to(x_start.device)
    else:
        _check_t(t, x_start, schedule, "loss_simple")
    if noise is None:
        noise = _randn_like(x_start, generator)
    _check_like("noise", noise, x_start, "loss_simple")
    eps = model(_q_sample(schedule, x_start, t, noise), t)
    if not isinstance(eps, Tensor) or eps.shape != x_start.shape:
        raise ValueError(f"loss_simple: model(x_t, t) must return a tensor shaped like x_start "
                         f"{tuple(x_start.shape)}, got {getattr(eps, 'shape', type(eps).__name__)}")
    return _mean_flat((noise - eps) ** 2)


def vb_terms_bpd(model, schedule: DiffusionSchedule, x_start: Tensor, x_t: Tensor, t: Tensor, *,
                 clip_denoised: bool = True, var_type: str = "fixedlarge") -> Tuple[Tensor, Tensor]:
    """One term of the variational bound (Eq. 5), in bits per dimension, per example.

    t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t));  t = 0: L_0 = -log p_θ(x_0 | x_1)
    with the discretized Gaussian decoder (Eq. 13). Both are averaged over dimensions and divided
    by log 2. Returns (bpd (B,), pred_xstart like x_start).
    """
    _check_schedule(schedule, "vb_terms_bpd")
    _check_data("x_start", x_start, "vb_terms_bpd")
    _check_like("x_t", x_t, x_start, "vb_terms_bpd")
    _check_t(t, x_start, schedule, "vb_terms_bpd")
    _check_var_type(var_type, "vb_terms_bpd")
    return _vb_terms_bpd(model, schedule, x_start, x_t, t, clip_denoised, var_type)


def _vb_terms_bpd(model, schedule, x_start, x_t, t, clip_denoised, var_type):
    true_mean, _, true_log_var = _q_posterior(schedule, x_start, x_t, t)
    mean, _, log_var, pred_xstart = _p_mean_variance(model, schedule, x_t, t, clip_denoised, var_type)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
    log_scales = (0.5 * log_var).expand_as(x_start)
    decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, mean, log_scales)) / math.log(2.0)
    return torch.where(t == 0, decoder_nll, kl), pred_xstart


def prior_bpd(schedule: DiffusionSchedule, x_start: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per example: (B,).

    Has no parameters (Sec. 3.1); with the paper's schedule it is ~1e-5 bits/dim.
    """
    _check_schedule(schedule, "prior_bpd")
    _check_data("x_start", x_start, "prior_bpd")
    return _prior_bpd(schedule, x_start)


def _prior_bpd(schedule, x_start):
    t = torch.full((x_start.shape[0],), schedule.num_timesteps - 1, dtype=torch.long, device=x_start.device)
    mean = gather(schedule.sqrt_alphas_cumprod, t, x_start) * x_start
    log_var = gather(schedule.log_one_minus_alphas_cumprod, t, x_start).expand_as(x_start)
    zero = torch.zeros_like(x_start)
    return _mean_flat(normal_kl(mean, log_var, zero, zero)) / math.log(2.0)


class BPDResult(NamedTuple):
    """Output of ``calc_bpd_loop``: total (B,), each term L_0..L_{T-1} (B, T), prior L_T (B,),
    and the MSE of x̂_0 against x_0 at every t (B, T); all bits/dim except mse."""

    total_bpd: Tensor
    terms_bpd: Tensor
    prior_bpd: Tensor
    mse: Tensor


@torch.no_grad()
def calc_bpd_loop(model, schedule: DiffusionSchedule, x_start: Tensor, *, clip_denoised: bool = True,
                  var_type: str = "fixedlarge", generator: Optional[torch.Generator] = None) -> BPDResult:
    """Negative log-likelihood bound -log p(x_0) <= L_0 + ... + L_{T-1} + L_T (Eq. 5) in bits/dim.

    Runs the model T times (t = T-1 down to 0), each on a fresh x_t ~ q(x_t | x_0) drawn with
    ``generator``; the official ``calc_bpd_loop``. Put the model in eval mode (no dropout) and
    use the EMA weights to reproduce the paper's numbers (CIFAR-10 test set: <= 3.75 bits/dim).
    x_start: (B, ...) float in [-1, 1] on 8-bit bins. Returns a ``BPDResult`` in x_start's dtype.
    """
    _check_schedule(schedule, "calc_bpd_loop")
    _check_data("x_start", x_start, "calc_bpd_loop")
    _check_var_type(var_type, "calc_bpd_loop")
    b, steps = x_start.shape[0], schedule.num_timesteps
    terms = x_start.new_zeros((b, steps))
    mse = x_start.new_zeros((b, steps))
    for step in reversed(range(steps)):
        t = torch.full((b,), step, dtype=torch.long, device=x_start.device)
        x_t = _q_sample(schedule, x_start, t, _randn_like(x_start, generator))
        terms[:, step], pred_xstart = _vb_terms_bpd(model, schedule, x_start, x_t, t, clip_denoised, var_type)
        mse[:, step] = _mean_flat((pred_xstart - x_start) ** 2)
    prior = _prior_bpd(schedule, x_start)
    return BPDResult(terms.sum(dim=1) + prior, terms, prior, mse)
