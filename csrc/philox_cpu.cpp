// The CPU pick of philox_cpu.h's noise loops.
#include "philox_cpu.h"

namespace diffusion_fast {
namespace philox {

CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return CpuIsa::avx512;
    if (__builtin_cpu_supports("avx2")) return CpuIsa::avx2;
#endif
    return CpuIsa::base;
  }();
  return isa;
}

}  // namespace philox
}  // namespace diffusion_fast
