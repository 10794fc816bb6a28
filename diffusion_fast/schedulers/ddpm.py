"""``DDPMScheduler``: diffusers' DDPM scheduler API, each step one fused ``ddpm_step``.

Ancestral sampling (Ho et al. 2020, Alg. 2) over any decreasing subsequence of timesteps, as
diffusers does it: from t to the next timestep t' (-1 after the last), with abar_{-1} = 1,

    x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)              (clipped if clip_sample)
    x_t' = sqrt(abar_t') beta'_t / (1 - abar_t) x0 + sqrt(alpha'_t) (1 - abar_t') / (1 - abar_t) x_t + sigma_t z
    alpha'_t = abar_t / abar_t',  beta'_t = 1 - alpha'_t,
    sigma_t^2 = beta'_t (fixed_large) or (1 - abar_t') / (1 - abar_t) beta'_t (fixed_small, fixed_small_log)

which is ``ddpm_coefficients`` of the "effective" betas beta'. Noise: see ``diffusion_fast.schedulers.base``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from diffusion_fast.ops.sampler_steps import ddpm_coefficients, ddpm_step
from diffusion_fast.schedulers.base import FusedScheduler, SchedulerOutput
from diffusion_fast.schedulers.config import check_choice, spaced_timesteps

__all__ = ["DDPMScheduler"]

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


class DDPMScheduler(FusedScheduler):
    """Drop-in for ``diffusers.DDPMScheduler`` (same constructor, config, ``set_timesteps``,
    ``step``, ``add_noise``), stepping with the fused ``ddpm_step``.

    Supported: beta_schedule "linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid" or
    trained_betas; variance_type "fixed_small", "fixed_small_log" (the same sigma), "fixed_large";
    prediction_type "epsilon", "sample", "v_prediction" (folded into the coefficient table, so
    still one kernel); clip_sample/clip_sample_range; every timestep_spacing and steps_offset.
    Refused with a ValueError: "fixed_large_log" (diffusers takes the square root of a
    log-variance: NaN), "learned"/"learned_range" (per-element variance), thresholding,
    rescale_betas_zero_snr. ``seed`` (not a diffusers field): the Philox seed used when ``step``
    gets neither ``generator`` nor ``variance_noise``; None draws one per ``set_timesteps``.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, *, seed: int | None = None):
        why = (" (diffusers' fixed_large_log step takes the square root of a log-variance, which is NaN)"
               if variance_type == "fixed_large_log" else "")
        check_choice("DDPMScheduler", "variance_type", variance_type, VARIANCE_TYPES, why)
        fields = {k: v for k, v in locals().items() if k not in ("self", "seed", "why", "__class__")}
        self._setup(fields, seed)
        self.custom_timesteps = False

    @property
    def variance_type(self) -> str:
        return self.config.variance_type

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device = None,
                      timesteps: list[int] | None = None) -> None:
        """Sampling timesteps: ``num_inference_steps`` spaced by ``config.timestep_spacing``, or a
        custom decreasing list ``timesteps``. Sets ``self.timesteps`` (int64, on ``device``)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("DDPMScheduler.set_timesteps: pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None:
            ts = timesteps.tolist() if isinstance(timesteps, Tensor) else list(timesteps)
            if not ts or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in ts):
                raise ValueError(f"DDPMScheduler.set_timesteps: timesteps must be a non-empty list of ints, got {ts!r}")
            ts = [int(t) for t in ts]
            self.num_inference_steps, self.custom_timesteps = None, True
        else:
            self._check_num_steps(num_inference_steps)
            self.num_inference_steps, self.custom_timesteps = int(num_inference_steps), False
            ts = spaced_timesteps(self.config, self.num_inference_steps)
        self._use_timesteps(ts, device)

    def _use_timesteps(self, timesteps: list[int], device) -> None:
        super()._use_timesteps(timesteps, device)
        self._rows = {t: len(timesteps) - 1 - i for i, t in enumerate(timesteps)}  # row k: k-th smallest timestep

    def previous_timestep(self, timestep) -> int:
        """The timestep after ``timestep`` in the sampling order (-1 after the last)."""
        row = self._row(self._timestep(timestep))
        return self._timesteps[len(self._timesteps) - row] if row > 0 else -1

    def _build_table(self, key) -> Tensor:
        """(S, 6) float64 ``ddpm_coefficients`` table, row k for the k-th smallest timestep."""
        ascending = self._timesteps[::-1]
        abar = self.alphas_cumprod.double()[ascending]
        betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])  # effective betas beta'
        large = self.config.variance_type == "fixed_large"
        variance = "fixedlarge" if large else "fixedsmall"
        # ddpm_coefficients needs two rows; row 0 depends on betas[0] alone
        table = ddpm_coefficients(betas.repeat(2) if betas.numel() == 1 else betas, variance, dtype=torch.float64)
        table = table[: betas.numel()].clone()
        if ascending[0] > 0:  # diffusers' last step adds noise unless t = 0: sigma^2 = beta' (fixed_large), else
            # the posterior variance, 0 here, clamped to 1e-20
            table[0, 5] = math.sqrt(betas[0]) if large else 1e-10
        return self._for_prediction(table, abar, self.config.prediction_type)

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True, *,
             variance_noise: Tensor | None = None) -> SchedulerOutput | tuple:
        """One fused DDPM step from ``timestep`` (an int or one-element tensor in ``self.timesteps``).

        ``model_output``: the model's prediction (``config.prediction_type``), shaped like
        ``sample``. Noise z: ``variance_noise``, else drawn from ``generator`` as diffusers draws
        it (only for timestep > 0), else Philox in the kernel (module doc of ``base``).
        Returns ``SchedulerOutput(prev_sample, pred_original_sample)``, or that tuple.
        """
        t = self._timestep(timestep)
        row = self._row(t)
        self._check_step_tensors(model_output, sample, variance_noise)
        if variance_noise is not None and generator is not None:
            raise ValueError("DDPMScheduler.step: pass at most one of generator and variance_noise")
        table = self._table_for(None, sample)
        noise, seed = variance_noise, 0
        if noise is None and generator is not None and t > 0:
            noise = self._draw_noise(generator, model_output)
        elif noise is None and generator is None and self._sigma(None, row) != 0.0:
            seed = self._philox_seed()
        out = ddpm_step(sample, model_output, table, row, seed=seed, clip_x0=bool(self.config.clip_sample),
                        clip_range=float(self.config.clip_sample_range), noise=noise, return_x0=True)
        return self._finish(out, return_dict)
