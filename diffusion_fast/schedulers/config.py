"""Scheduler configs as diffusers writes them: the read-only config, betas, field checks, timestep spacings.

Field names, defaults and formulas follow diffusers' ``DDPMScheduler``/``DDIMScheduler``; betas
and ``alphas_cumprod`` are float32, computed as diffusers computes them. Every unusable value
gets a ValueError (TypeError for a wrong type) naming the field.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["CONFIG_NAME", "SchedulerConfig", "check_choice", "check_common", "check_flag", "check_int", "make_betas",
           "spaced_timesteps"]

CONFIG_NAME = "scheduler_config.json"
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SPACINGS = ("leading", "linspace", "trailing")


class SchedulerConfig(dict):
    """Read-only dict with attribute access (``config.num_train_timesteps``), like diffusers' FrozenDict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _read_only(self, *args, **kwargs):
        raise TypeError("a scheduler's config is read-only: build a new one with from_config(config, **changes)")

    __setitem__ = __delitem__ = __setattr__ = clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self):
        return type(self), (dict(self),)


# ---------------------------------------------------------------------------
# Betas, in float32 as diffusers computes them.
# ---------------------------------------------------------------------------
def _cosine_betas(n: int, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: abar(t) = cos^2((t/T + s)/(1 + s) pi/2), s = 0.008,
    beta_t = min(1 - abar(t+1)/abar(t), max_beta)."""
    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def make_betas(cls: str, c: Mapping) -> Tensor:
    """(T,) float32 betas of a config; ValueError naming the field when they are unusable."""
    n = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        try:
            betas = torch.as_tensor(np.asarray(c["trained_betas"], dtype=np.float64)).float()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{cls}: trained_betas must be a sequence of numbers ({exc})") from None
        if betas.dim() != 1 or betas.numel() != n:
            raise ValueError(f"{cls}: trained_betas must hold num_train_timesteps={n} values, "
                             f"got shape {tuple(betas.shape)}")
        source = "trained_betas"
    else:
        check_choice(cls, "beta_schedule", c["beta_schedule"], BETA_SCHEDULES)
        for name in ("beta_start", "beta_end"):
            if isinstance(c[name], bool) or not isinstance(c[name], numbers.Real):
                raise TypeError(f"{cls}: {name} must be a number, got {c[name]!r}")
        start, end = float(c["beta_start"]), float(c["beta_end"])
        schedule = c["beta_schedule"]
        if schedule == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float32)
        elif schedule == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta)
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(n)
        else:  # sigmoid (GeoDiff)
            betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (end - start) + start
        source = f"beta_schedule={schedule!r}, beta_start={start}, beta_end={end}"
    if not ((betas > 0) & (betas < 1)).all():
        raise ValueError(f"{cls}: every beta must lie in (0, 1); {source} gives values in "
                         f"[{betas.min().item():.3g}, {betas.max().item():.3g}]")
    return betas


# ---------------------------------------------------------------------------
# Field checks.
# ---------------------------------------------------------------------------
def check_choice(cls: str, name: str, value, allowed: Sequence, why: str = "") -> None:
    if value not in allowed:
        raise ValueError(f"{cls}: {name} must be one of {tuple(allowed)}, got {value!r}{why}")


def check_flag(cls: str, name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{cls}: {name} must be a bool, got {value!r}")


def check_int(cls: str, name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{cls}: {name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{cls}: {name} must be an int >= {low}, got {value!r}")


def check_common(cls: str, c: Mapping) -> None:
    check_int(cls, "num_train_timesteps", c["num_train_timesteps"], 2)
    check_flag(cls, "clip_sample", c["clip_sample"])
    r = c["clip_sample_range"]
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not (math.isfinite(r) and r > 0):
        raise ValueError(f"{cls}: clip_sample_range must be a finite number > 0, got {r!r}")
    check_choice(cls, "prediction_type", c["prediction_type"], PREDICTION_TYPES)
    check_choice(cls, "timestep_spacing", c["timestep_spacing"], SPACINGS)
    check_int(cls, "steps_offset", c["steps_offset"], 0)
    if c["thresholding"]:
        raise ValueError(f"{cls}: thresholding=True is not supported (dynamic thresholding needs a per-sample "
                         "quantile of x0, which the fused step cannot take); use diffusers' scheduler for it")
    if c["rescale_betas_zero_snr"]:
        raise ValueError(f"{cls}: rescale_betas_zero_snr=True is not supported (it makes alphas_cumprod[-1] = 0, "
                         "where the step's 1/sqrt(alphas_cumprod) is infinite)")


def spaced_timesteps(c: Mapping, num_inference_steps: int) -> list[int]:
    """diffusers' timestep spacings (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Table 2), descending; numpy mirrors diffusers' rounding."""
    n, steps = c["num_train_timesteps"], num_inference_steps
    if c["timestep_spacing"] == "linspace":
        ts = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    elif c["timestep_spacing"] == "leading":
        ts = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + c["steps_offset"]
    else:  # trailing
        ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    return [int(t) for t in ts]
