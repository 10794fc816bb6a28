// The float64 instantiation of the CPU dwconv_bn_swish kernels' channels-last backward for kernel size 3
// (dwconv_bn_swish_cpu_kernels.h).
#include "dwconv_bn_swish/dwconv_bn_swish_cpu_kernels.h"

namespace diffusion_fast::dwconv_cpu {
DF_DWCONV_CPU_CL_BWD_INSTANCE(, double, 3)
}  // namespace diffusion_fast::dwconv_cpu
