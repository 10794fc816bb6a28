"""``DDIMScheduler``: diffusers' DDIM scheduler API, each step one fused ``ddim_step``.

DDIM (Song et al. 2021, Eq. 12) from t to t' = t - T // num_inference_steps, as diffusers
does it (t' is the next timestep for "leading" spacing, not always for "linspace"/"trailing"),
with abar_{t'} = final_alpha_cumprod when t' < 0 (1 with ``set_alpha_to_one``, else abar_0):

    x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                       (clipped if clip_sample)
    sigma_t = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t')
    x_t' = sqrt(abar_t') x0 + sqrt(1 - abar_t' - sigma_t^2) eps + sigma_t z

which is ``ddim_coefficients`` row by row. Noise: see ``diffusion_fast.schedulers.base``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from diffusion_fast.ops.sampler_steps import ddim_coefficients, ddim_step
from diffusion_fast.schedulers.base import FusedScheduler, SchedulerOutput
from diffusion_fast.schedulers.config import check_flag, spaced_timesteps

__all__ = ["DDIMScheduler"]


class DDIMScheduler(FusedScheduler):
    """Drop-in for ``diffusers.DDIMScheduler`` (same constructor, config, ``set_timesteps``,
    ``step``, ``add_noise``), stepping with the fused ``ddim_step``.

    Supported: beta_schedule "linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid" or
    trained_betas; prediction_type "epsilon", "sample", "v_prediction" (folded into the table);
    clip_sample/clip_sample_range; set_alpha_to_one; every timestep_spacing and steps_offset;
    ``step``'s eta >= 0 and use_clipped_model_output. Refused with a ValueError: thresholding,
    rescale_betas_zero_snr. ``seed`` (not a diffusers field): the Philox seed used when
    ``step`` gets neither ``generator`` nor ``variance_noise``; None draws one per ``set_timesteps``.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False, *, seed: int | None = None):
        check_flag("DDIMScheduler", "set_alpha_to_one", set_alpha_to_one)
        fields = {k: v for k, v in locals().items() if k not in ("self", "seed", "__class__")}
        self._setup(fields, seed)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device = None) -> None:
        """``num_inference_steps`` timesteps spaced by ``config.timestep_spacing``; sets
        ``self.timesteps`` (int64, on ``device``)."""
        self._check_num_steps(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self._use_timesteps(spaced_timesteps(self.config, self.num_inference_steps), device)

    def _use_timesteps(self, timesteps, device) -> None:
        super()._use_timesteps(timesteps, device)
        self._rows = {t: i for i, t in enumerate(timesteps)}

    def _build_table(self, key) -> Tensor:
        """(S, 6) float64 table, row i stepping from timesteps[i] to timesteps[i] - T // S.

        ``ddim_coefficients`` steps to the next timestep of its list: rows whose t' is the next
        timestep share one call, others get a call with their own [t, t']."""
        eta, clipped = key
        ts, abar = self._timesteps, self.alphas_cumprod.double()
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        final = float(self.final_alpha_cumprod)
        parts, start = [], 0
        for i, t in enumerate(ts):
            prev = t - ratio
            if i + 1 < len(ts) and prev == ts[i + 1]:
                continue
            chain = ts[start:i + 1] + ([prev] if prev >= 0 else [])
            parts.append(ddim_coefficients(abar, chain, eta, use_clipped_model_output=clipped,
                                           final_alpha_cumprod=final, dtype=torch.float64)[: i + 1 - start])
            start = i + 1
        return self._for_prediction(torch.cat(parts), abar[ts], self.config.prediction_type)

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool | None = False, generator=None,
             variance_noise: Tensor | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """One fused DDIM step from ``timestep`` (an int or one-element tensor in ``self.timesteps``).

        ``model_output``: the model's prediction (``config.prediction_type``), shaped like
        ``sample``. ``eta`` >= 0 (0: deterministic DDIM, 1: DDPM's posterior variance).
        ``use_clipped_model_output`` recomputes eps from the clipped x0 (None: False, as
        diffusers' pipelines pass). Noise z (only when eta > 0): ``variance_noise``, else drawn
        from ``generator`` as diffusers draws it, else Philox in the kernel (module doc of ``base``).
        Returns ``SchedulerOutput(prev_sample, pred_original_sample)``, or that tuple.
        """
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler.step: call set_timesteps(num_inference_steps) first")
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"DDIMScheduler.step: eta must be a finite number >= 0, got {eta!r}")
        if use_clipped_model_output is not None and not isinstance(use_clipped_model_output, bool):
            raise TypeError(f"DDIMScheduler.step: use_clipped_model_output must be a bool or None, "
                            f"got {type(use_clipped_model_output).__name__}")
        t = self._timestep(timestep)
        row = self._row(t)
        self._check_step_tensors(model_output, sample, variance_noise)
        if variance_noise is not None and generator is not None:
            raise ValueError("DDIMScheduler.step: pass at most one of generator and variance_noise")
        key = (float(eta), bool(use_clipped_model_output))
        table = self._table_for(key, sample)
        noise, seed = None, 0
        if eta > 0:
            noise = variance_noise
            if noise is None and generator is not None:
                noise = self._draw_noise(generator, model_output)
            elif noise is None and self._sigma(key, row) != 0.0:
                seed = self._philox_seed()
        out = ddim_step(sample, model_output, table, row, seed=seed, clip_x0=bool(self.config.clip_sample),
                        clip_range=float(self.config.clip_sample_range), noise=noise, return_x0=True)
        return self._finish(out, return_dict)
