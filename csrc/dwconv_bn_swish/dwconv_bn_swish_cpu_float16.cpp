// The float16 instantiation of the CPU dwconv_bn_swish kernels (dwconv_bn_swish_cpu_kernels.h).
#include "dwconv_bn_swish/dwconv_bn_swish_cpu_kernels.h"

namespace diffusion_fast {
namespace dwconv_cpu {

template void forward<at::Half>(const Args<at::Half, at::opmath_type<at::Half>>& a);
template void backward<at::Half>(const Args<at::Half, at::opmath_type<at::Half>>& a);

}  // namespace dwconv_cpu
}  // namespace diffusion_fast
