"""The Gaussian diffusion of Ho et al. 2020: schedules, forward process, L_simple and the bound in bits/dim."""

from diffusion_fast.diffusion.ddpm import (
    VAR_TYPES,
    BPDResult,
    calc_bpd_loop,
    loss_simple,
    p_mean_variance,
    predict_xstart_from_eps,
    prior_bpd,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    vb_terms_bpd,
)
from diffusion_fast.diffusion.likelihood import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
    standard_normal_cdf,
)
from diffusion_fast.diffusion.schedules import DiffusionSchedule, gather, linear_betas, linear_schedule

__all__ = [
    "DiffusionSchedule", "linear_betas", "linear_schedule", "gather",
    "q_mean_variance", "q_sample", "q_posterior_mean_variance", "predict_xstart_from_eps", "p_mean_variance",
    "loss_simple", "vb_terms_bpd", "prior_bpd", "calc_bpd_loop", "BPDResult", "VAR_TYPES",
    "normal_kl", "approx_standard_normal_cdf", "standard_normal_cdf", "discretized_gaussian_log_likelihood",
]
