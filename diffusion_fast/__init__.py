"""diffusion_fast: custom Triton and C++/CUDA kernels for diffusion models.

    import diffusion_fast as df
    y = df.group_norm_silu(x, 32, weight, bias, pre_bias=temb)   # fused op
    with df.use_backend("triton"): ...                           # force a backend
    o = df.attention(q, k, v, causal=False)                      # (B, H, S, D) flash attention
    df.env_info()                                                # what loaded, and why not
    report = df.patch(diffusers_unet)                            # speed up a model in place
"""

__version__ = "0.1.0"

from diffusion_fast import backends
from diffusion_fast.backends import BACKENDS, env_info, use_backend

backends.load_extension()  # first: _C's kernels attach to the op schemas the modules below define

from diffusion_fast.ops import group_norm_silu, group_norm_silu_ref  # noqa: E402
from diffusion_fast.ops import ddim_coefficients, ddim_step, ddpm_coefficients, ddpm_step  # noqa: E402
from diffusion_fast.ops import langevin_step, langevin_step_ref  # noqa: E402
from diffusion_fast.ops import dpm2015_step, dpm2015_step_ref  # noqa: E402
from diffusion_fast.ops import attention, attention_ref  # noqa: E402
from diffusion_fast.ops import bn_swish, dwconv_bn_swish  # noqa: E402

from diffusion_fast import nn  # noqa: E402
from diffusion_fast import schedulers  # noqa: E402
from diffusion_fast.patching import patch, unpatch  # noqa: E402

__all__ = [
    "BACKENDS",
    "env_info",
    "use_backend",
    "nn",
    "schedulers",
    "patch",
    "unpatch",
    "group_norm_silu",
    "group_norm_silu_ref",
    "ddpm_step",
    "ddpm_coefficients",
    "ddim_step",
    "ddim_coefficients",
    "langevin_step",
    "langevin_step_ref",
    "dpm2015_step",
    "dpm2015_step_ref",
    "attention",
    "attention_ref",
    "dwconv_bn_swish",
    "bn_swish",
]
