// The float32 instantiation of the CPU dwconv_bn_swish kernels (dwconv_bn_swish_cpu_kernels.h).
#include "dwconv_bn_swish/dwconv_bn_swish_cpu_kernels.h"

namespace diffusion_fast {
namespace dwconv_cpu {

template void forward<float>(const Args<float, at::opmath_type<float>>& a);
template void backward<float>(const Args<float, at::opmath_type<float>>& a);

}  // namespace dwconv_cpu
}  // namespace diffusion_fast
