"""Models built from diffusion_fast's fused blocks, with the papers' configs and checkpoint converters."""

from diffusion_fast.models.attention import attention
from diffusion_fast.models.clip_convert import clip_text_from_open_clip
from diffusion_fast.models.clip_loss import ContrastiveHead, clip_loss
from diffusion_fast.models.clip_text import CLIPTextEncoder
from diffusion_fast.models.clip_tokenizer import clip_tokenize
from diffusion_fast.models.convert import ddpm_unet_from_diffusers, diffusers_config, to_diffusers_state_dict
from diffusion_fast.models.ddpm_unet import DDPMUNet
from diffusion_fast.models.dpm2015 import RBFReverseNet
from diffusion_fast.models.nvae import NVAE
from diffusion_fast.models.ncsnv2 import NCSNv2, ncsn_sigmas, official_state_dict

__all__ = ["DDPMUNet", "attention", "ddpm_unet_from_diffusers", "diffusers_config", "to_diffusers_state_dict",
           "CLIPTextEncoder", "clip_text_from_open_clip", "clip_tokenize", "clip_loss", "ContrastiveHead",
           "NCSNv2", "ncsn_sigmas", "official_state_dict", "RBFReverseNet", "NVAE"]
