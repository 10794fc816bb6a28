// The one CPU loop of every kernel that draws Gaussian noise (sampler_steps, langevin_step):
// per noise tile (1024 elements, csrc/philox.h), Philox for its 256 counters (philox_x86.h),
// Box-Muller into 1024 normals, then the op's epilogue on the tile's four contiguous runs of
// 256 elements. Tiles are split over at::parallel_for.
//
//   for_each_noise_run<acc_t, kNoise>(numel, seed, step, epilogue)
//   epilogue(first, len, z): elements first .. first + len - 1 (len <= 256), z[i] the noise of
//                            element first + i (kNoise), or nullptr (!kNoise: no noise drawn)
//
// The whole tile body, the epilogue inlined, is compiled for AVX-512F, AVX2 and baseline x86-64
// and picked from the CPU once, so the op's element loop runs at the CPU's vector width. The
// targets are exactly "avx512f" (which lets GCC contract to FMA) and "avx2" (no FMA): the
// normals' bits depend on the CPU alone, never on the Philox path (DIFFUSION_FAST_CPU_PHILOX,
// philox_x86.h) or ATEN_CPU_CAPABILITY, and match the other backends to a few ulp.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "philox.h"
#include "philox_x86.h"

namespace diffusion_fast {
namespace philox {

enum class CpuIsa { base, avx2, avx512 };

CpuIsa cpu_isa();  // philox_cpu.cpp: avx512 with AVX-512F, avx2 with AVX2, else base

namespace detail {

template <typename acc_t, bool kNoise, typename Epilogue>
inline void noise_tiles(int64_t begin, int64_t end, int64_t numel, uint32_t step, uint32_t key_lo, uint32_t key_hi,
                        TileFn philox_tile, const Epilogue& epilogue) {
  constexpr int64_t n = kTileCounters;
  alignas(64) uint32_t r[kNoise ? kTileElements : 1];
  alignas(64) acc_t z[kNoise ? kTileElements : 1];
  for (int64_t tile = begin; tile < end; ++tile) {
    if constexpr (kNoise) {
      const uint64_t counter = static_cast<uint64_t>(tile) * n;
      philox_tile(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), step, key_lo, key_hi, r);
      for (int64_t j = 0; j < n; ++j) {
        box_muller4<acc_t>(r[j], r[j + n], r[j + 2 * n], r[j + 3 * n], z[j], z[j + n], z[j + 2 * n], z[j + 3 * n]);
      }
    }
    for (int64_t k = 0; k < 4; ++k) {
      const int64_t first = tile * kTileElements + k * n;
      const int64_t len = std::min(n, numel - first);
      if (len <= 0) break;
      epilogue(first, len, kNoise ? z + k * n : nullptr);
    }
  }
}

// `flatten` inlines Box-Muller and the epilogue, so they are compiled for the wrapper's target.
#if defined(__GNUC__)
#define DF_FLATTEN __attribute__((flatten))
#else
#define DF_FLATTEN
#endif

#if defined(__x86_64__) && defined(__GNUC__)
template <typename acc_t, bool kNoise, typename Epilogue>
__attribute__((target("avx512f"), flatten)) void noise_tiles_avx512(int64_t begin, int64_t end, int64_t numel,
                                                                    uint32_t step, uint32_t key_lo, uint32_t key_hi,
                                                                    TileFn philox_tile, const Epilogue& epilogue) {
  noise_tiles<acc_t, kNoise>(begin, end, numel, step, key_lo, key_hi, philox_tile, epilogue);
}

template <typename acc_t, bool kNoise, typename Epilogue>
__attribute__((target("avx2"), flatten)) void noise_tiles_avx2(int64_t begin, int64_t end, int64_t numel,
                                                               uint32_t step, uint32_t key_lo, uint32_t key_hi,
                                                               TileFn philox_tile, const Epilogue& epilogue) {
  noise_tiles<acc_t, kNoise>(begin, end, numel, step, key_lo, key_hi, philox_tile, epilogue);
}
#endif

template <typename acc_t, bool kNoise, typename Epilogue>
DF_FLATTEN void noise_tiles_base(int64_t begin, int64_t end, int64_t numel, uint32_t step, uint32_t key_lo,
                                 uint32_t key_hi, TileFn philox_tile, const Epilogue& epilogue) {
  noise_tiles<acc_t, kNoise>(begin, end, numel, step, key_lo, key_hi, philox_tile, epilogue);
}

}  // namespace detail

// Runs epilogue over elements 0 .. numel - 1 of the noise stream (seed, step) (header comment).
template <typename acc_t, bool kNoise, typename Epilogue>
void for_each_noise_run(int64_t numel, uint64_t seed, uint32_t step, const Epilogue& epilogue) {
  const int64_t tiles = (numel + kTileElements - 1) / kTileElements;
  const uint32_t key_lo = static_cast<uint32_t>(seed), key_hi = static_cast<uint32_t>(seed >> 32);
  const TileFn philox_tile = philox_tile_fn();
  const CpuIsa isa = cpu_isa();
  // Threads from 16 tiles (16384 elements) with noise, whose Philox rounds dominate; without it the loop only
  // streams memory, so from ATen's grain for elementwise ops (at::internal::GRAIN_SIZE, 32768 elements), as the
  // eager formula does.
  const int64_t grain = kNoise ? 16 : std::max<int64_t>(1, int64_t(32768) / kTileElements);
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (isa == CpuIsa::avx512) {
      return detail::noise_tiles_avx512<acc_t, kNoise>(begin, end, numel, step, key_lo, key_hi, philox_tile, epilogue);
    }
    if (isa == CpuIsa::avx2) {
      return detail::noise_tiles_avx2<acc_t, kNoise>(begin, end, numel, step, key_lo, key_hi, philox_tile, epilogue);
    }
#endif
    detail::noise_tiles_base<acc_t, kNoise>(begin, end, numel, step, key_lo, key_hi, philox_tile, epilogue);
  });
}

}  // namespace philox
}  // namespace diffusion_fast
