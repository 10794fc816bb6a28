// The float64 instantiation of the CPU dwconv_bn_swish kernels (dwconv_bn_swish_cpu_kernels.h).
#include "dwconv_bn_swish/dwconv_bn_swish_cpu_kernels.h"

namespace diffusion_fast {
namespace dwconv_cpu {

template void forward<double>(const Args<double, at::opmath_type<double>>& a);
template void backward<double>(const Args<double, at::opmath_type<double>>& a);

}  // namespace dwconv_cpu
}  // namespace diffusion_fast
