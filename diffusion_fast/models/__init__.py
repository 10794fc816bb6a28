"""Models built from diffusion_fast's fused blocks, with the papers' configs and checkpoint converters."""

from diffusion_fast.models.attention import attention
from diffusion_fast.models.convert import ddpm_unet_from_diffusers, diffusers_config, to_diffusers_state_dict
from diffusion_fast.models.ddpm_unet import DDPMUNet
from diffusion_fast.models.nvae import NVAE

__all__ = ["DDPMUNet", "NVAE", "attention", "ddpm_unet_from_diffusers", "diffusers_config", "to_diffusers_state_dict"]
