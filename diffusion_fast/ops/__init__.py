"""Our ops: each module holds the reference, the torch.library schema and the public function."""

from diffusion_fast.ops.attention import attention, attention_ref
from diffusion_fast.ops.dpm2015_step import dpm2015_step, dpm2015_step_ref
from diffusion_fast.ops.dwconv_bn_swish import bn_swish, bn_swish_ref, dwconv_bn_swish, dwconv_bn_swish_ref
from diffusion_fast.ops.group_norm_silu import group_norm_silu, group_norm_silu_ref
from diffusion_fast.ops.langevin_step import langevin_step, langevin_step_ref
from diffusion_fast.ops.philox import philox_normal_ref
from diffusion_fast.ops.sampler_steps import (
    ddim_coefficients,
    ddim_step,
    ddim_step_ref,
    ddpm_coefficients,
    ddpm_step,
    ddpm_step_ref,
)

__all__ = ["group_norm_silu", "group_norm_silu_ref",
           "ddpm_step", "ddpm_step_ref", "ddpm_coefficients", "ddim_step", "ddim_step_ref", "ddim_coefficients",
           "philox_normal_ref",
           "langevin_step", "langevin_step_ref",
           "dpm2015_step", "dpm2015_step_ref",
           "attention", "attention_ref",
           "dwconv_bn_swish", "dwconv_bn_swish_ref", "bn_swish", "bn_swish_ref"]
