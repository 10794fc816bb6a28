// The float32 instantiation of the CPU dwconv_bn_swish kernels' channels-last backward for kernel size 1
// (dwconv_bn_swish_cpu_kernels.h).
#include "dwconv_bn_swish/dwconv_bn_swish_cpu_kernels.h"

namespace diffusion_fast::dwconv_cpu {
DF_DWCONV_CPU_CL_BWD_INSTANCE(, float, 1)
}  // namespace diffusion_fast::dwconv_cpu
