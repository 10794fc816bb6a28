// The float32 instantiation of the CPU dwconv_bn_swish kernels' channels-last forward (dwconv_bn_swish_cpu_kernels.h).
#include "dwconv_bn_swish/dwconv_bn_swish_cpu_kernels.h"

namespace diffusion_fast::dwconv_cpu {
DF_DWCONV_CPU_INSTANCE(, forward_cl, float)
}  // namespace diffusion_fast::dwconv_cpu
