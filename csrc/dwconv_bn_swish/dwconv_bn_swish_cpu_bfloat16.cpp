// The bfloat16 instantiation of the CPU dwconv_bn_swish kernels (dwconv_bn_swish_cpu_kernels.h).
#include "dwconv_bn_swish/dwconv_bn_swish_cpu_kernels.h"

namespace diffusion_fast {
namespace dwconv_cpu {

template void forward<at::BFloat16>(const Args<at::BFloat16, at::opmath_type<at::BFloat16>>& a);
template void backward<at::BFloat16>(const Args<at::BFloat16, at::opmath_type<at::BFloat16>>& a);

}  // namespace dwconv_cpu
}  // namespace diffusion_fast
