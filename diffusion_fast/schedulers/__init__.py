"""Schedulers with diffusers' API whose ``step`` runs our fused ``ddpm_step``/``ddim_step``.

    from diffusion_fast.schedulers import DDIMScheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)   # a diffusers pipeline

Same constructor fields, ``config``, ``set_timesteps``, ``timesteps``, ``step``, ``add_noise``
as diffusers'; diffusers itself is never imported. How each step's noise is made (a
``generator`` reproduces diffusers' samples; without one, Philox noise in the kernel) is
described in ``diffusion_fast.schedulers.base``; config fields in ``.config``.
"""

from diffusion_fast.schedulers.base import SchedulerOutput
from diffusion_fast.schedulers.config import SchedulerConfig
from diffusion_fast.schedulers.ddim import DDIMScheduler
from diffusion_fast.schedulers.ddpm import DDPMScheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "SchedulerConfig", "SchedulerOutput"]
