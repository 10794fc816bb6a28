// CUDA kernels of every op, attached to the schemas defined in diffusion_fast/ops/*.py.
// Compiled only when setup.py builds the CUDA part.
#include <torch/library.h>

#include "attention/attention.h"
#include "dpm2015_step/dpm2015_step.h"
#include "dwconv_bn_swish/dwconv_bn_swish.h"
#include "group_norm_silu/group_norm_silu.h"
#include "langevin_step/langevin_step.h"
#include "sampler_steps/sampler_steps.h"

TORCH_LIBRARY_IMPL(diffusion_fast, CUDA, m) {
  m.impl("attention_fwd", &diffusion_fast::attention_fwd_cuda);
  m.impl("attention_bwd", &diffusion_fast::attention_bwd_cuda);
  m.impl("group_norm_silu_fwd", &diffusion_fast::group_norm_silu_fwd_cuda);
  m.impl("group_norm_silu_bwd", &diffusion_fast::group_norm_silu_bwd_cuda);
  m.impl("ddpm_step", &diffusion_fast::sampler_step_cuda);  // one kernel, two names
  m.impl("ddim_step", &diffusion_fast::sampler_step_cuda);
  m.impl("langevin_step", &diffusion_fast::langevin_step_cuda);
  m.impl("dpm2015_step", &diffusion_fast::dpm2015_step_cuda);
  m.impl("dwconv_bn_swish_fwd", &diffusion_fast::dwconv_bn_swish_fwd_cuda);
  m.impl("dwconv_bn_swish_bwd", &diffusion_fast::dwconv_bn_swish_bwd_cuda);
  m.impl("bn_swish_fwd", &diffusion_fast::bn_swish_fwd_cuda);
  m.impl("bn_swish_bwd", &diffusion_fast::bn_swish_bwd_cuda);
}
