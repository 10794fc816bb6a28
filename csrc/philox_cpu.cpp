// CPU noise tiles (philox_cpu.h): Philox through philox_x86.h, Box-Muller through box_muller4.
#include "philox_cpu.h"

#include "philox.h"
#include "philox_x86.h"

namespace diffusion_fast {
namespace philox {

namespace {

// The Box-Muller loop is worth wider vectors than the x86-64 baseline (SSE2): GCC builds it for
// each listed target and picks one at load time (an ifunc; the rest of the file stays baseline).
// Elsewhere (clang, MSVC, other CPUs) the loop is built for the baseline only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DF_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DF_VECTOR_CLONES
#endif

template <typename acc_t>
DF_VECTOR_CLONES void box_muller_tile(const uint32_t* __restrict__ r, acc_t* __restrict__ z) {
  constexpr int64_t n = kTileCounters;
  for (int64_t j = 0; j < n; ++j) {
    box_muller4<acc_t>(r[j], r[j + n], r[j + 2 * n], r[j + 3 * n], z[j], z[j + n], z[j + 2 * n], z[j + 3 * n]);
  }
}

}  // namespace

template <typename acc_t>
void tile_noise(int64_t tile, uint32_t step, uint32_t key_lo, uint32_t key_hi, acc_t* z) {
  static const TileFn philox_tile = philox_tile_fn();
  const uint64_t first = static_cast<uint64_t>(tile) * kTileCounters;
  alignas(64) uint32_t r[kTileElements];
  philox_tile(static_cast<uint32_t>(first), static_cast<uint32_t>(first >> 32), step, key_lo, key_hi, r);
  box_muller_tile<acc_t>(r, z);
}

template void tile_noise<float>(int64_t, uint32_t, uint32_t, uint32_t, float*);
template void tile_noise<double>(int64_t, uint32_t, uint32_t, uint32_t, double*);

}  // namespace philox
}  // namespace diffusion_fast
