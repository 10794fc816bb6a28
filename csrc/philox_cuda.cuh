// The one CUDA loop of every kernel that draws Gaussian noise (sampler_steps, langevin_step): a
// grid-stride loop over units of four consecutive Philox counters of one noise tile
// (csrc/philox.h). A unit's thread makes the 16 normals of its counters and hands the op's
// epilogue four runs of four consecutive elements, 1024 * tile + 256 * k + j0 .. + 3 (k = 0..3),
// so a warp covers 32 x 4 contiguous elements per run; load4/store4 move one run with one
// 4-wide vector access when the pointers are aligned. int64 indexing.
//
//   for_each_noise_run<acc_t, kMayNoise>(numel, key_lo, key_hi, step, make_noise, load, epilogue)
//   kMayNoise:             false for a kernel that never draws noise (make_noise then ignored): it loads all
//                          four runs before their epilogues (one run at a time left 16-bit given-noise and
//                          Langevin-denoise steps at 65-81% of copy bandwidth on an H100, where Triton's
//                          reach 89-91%: benchmarks/results/h100-2026-11-28). A separate instantiation,
//                          so that the noise path keeps its registers (48 for bf16 DDPM; 80 with both).
//   load(base) -> in:      the op's inputs at elements base .. base + 3 (those < numel), e.g. a Loaded;
//                          with noise, called just before each run's epilogue, after the unit's noise is made.
//                          Loading all four runs first (to overlap the loads with Philox) was tried for
//                          16-bit dtypes: on an H100 they fell from 43-55% of copy bandwidth to 33-37%
//                          (benchmarks/results/h100-2026-11-27c; fp32 stays at 88-94% either way)
//   epilogue(base, in, z): writes elements base .. base + 3; z[q] the noise of element base + q
//                          (0 when !make_noise)
//
// launched with noise_grid(kernel, numel) blocks of kNoiseThreads, on noise_launch(seed, step)'s stream and words.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "philox.h"

namespace diffusion_fast {
namespace philox {

constexpr int kNoiseThreads = 256;                                 // threads per block
constexpr int64_t kUnitCounters = 4;                               // counters per thread unit
constexpr int64_t kUnitsPerTile = kTileCounters / kUnitCounters;  // 64

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
bool aligned4(const T* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

// The values of N input tensors at one run's four elements, in their own dtype (the epilogue converts).
template <typename T, int N>
struct Loaded {
  T v[N][4];
};

// v[q] = p[base + q] as acc_t (0 past numel); one vector load when kVectorized and all four exist.
template <bool kVectorized, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load4(const scalar_t* __restrict__ p, int64_t base, int64_t numel, acc_t (&v)[4]) {
  if (kVectorized && base + 4 <= numel) {
    const Vec4<scalar_t> t = *reinterpret_cast<const Vec4<scalar_t>*>(p + base);
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = static_cast<acc_t>(t.v[q]);
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = base + q < numel ? static_cast<acc_t>(p[base + q]) : acc_t(0);
  }
}

// p[base + q] = v[q] in scalar_t for base + q < numel.
template <bool kVectorized, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store4(scalar_t* __restrict__ p, int64_t base, int64_t numel, const acc_t (&v)[4]) {
  if (kVectorized && base + 4 <= numel) {
    Vec4<scalar_t> t;
#pragma unroll
    for (int q = 0; q < 4; ++q) t.v[q] = static_cast<scalar_t>(v[q]);
    *reinterpret_cast<Vec4<scalar_t>*>(p + base) = t;
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (base + q < numel) p[base + q] = static_cast<scalar_t>(v[q]);
    }
  }
}

// The values of a, b and, where c is not null, c at elements base .. base + 3 (an op's load).
template <bool kVectorized, typename T>
__device__ __forceinline__ Loaded<T, 3> load3(const T* __restrict__ a, const T* __restrict__ b,
                                              const T* __restrict__ c, int64_t base, int64_t numel) {
  Loaded<T, 3> in;
  load4<kVectorized>(a, base, numel, in.v[0]);
  load4<kVectorized>(b, base, numel, in.v[1]);
  if (c != nullptr) load4<kVectorized>(c, base, numel, in.v[2]);
  return in;
}

template <typename acc_t, bool kMayNoise, typename Load, typename Epilogue>
__device__ __forceinline__ void for_each_noise_run(int64_t numel, uint32_t key_lo, uint32_t key_hi, uint32_t step,
                                                   bool make_noise, const Load& load, const Epilogue& epilogue) {
  const int64_t units = (numel + kTileElements - 1) / kTileElements * kUnitsPerTile;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; unit < units; unit += stride) {
    const int64_t tile = unit / kUnitsPerTile;
    const int64_t j0 = (unit % kUnitsPerTile) * kUnitCounters;
    acc_t z[4][kUnitCounters];  // [run k][counter q]
#pragma unroll
    for (int q = 0; q < kUnitCounters; ++q) {
      z[0][q] = z[1][q] = z[2][q] = z[3][q] = acc_t(0);
    }
    if constexpr (!kMayNoise) {  // nothing to hide the loads behind: all four runs' loads in flight at once
      int64_t base[4];
      decltype(load(0)) in[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        base[k] = tile * kTileElements + k * kTileCounters + j0;
        if (base[k] < numel) in[k] = load(base[k]);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (base[k] < numel) epilogue(base[k], in[k], z[k]);
      }
      continue;
    }
    if (make_noise) {  // the same in every thread: no divergence
      const uint64_t first = static_cast<uint64_t>(tile) * kTileCounters + j0;
#pragma unroll
      for (int q = 0; q < kUnitCounters; ++q) {
        normals4<acc_t>(static_cast<uint32_t>(first) + q, static_cast<uint32_t>(first >> 32), step, key_lo, key_hi,
                        z[0][q], z[1][q], z[2][q], z[3][q]);
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t base = tile * kTileElements + k * kTileCounters + j0;
      if (base < numel) epilogue(base, load(base), z[k]);
    }
  }
}

// Blocks of kNoiseThreads of kernel that fit on one SM of the current device at once (its registers decide:
// 48 per thread, as the bf16 DDPM step takes, fit 5 blocks, not 2048 / 256 = 8). Asked once per kernel and device.
inline int resident_blocks(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, kernel);
  auto it = known.find(key);
  if (it == known.end()) {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kNoiseThreads, 0));
    it = known.emplace(key, std::max(blocks, 1)).first;
  }
  return it->second;
}

// kernel's grid for numel elements: one thread per unit, at most one full wave of resident blocks, so that the
// grid-stride loop gives every block the same work at once (8 blocks per SM for 5 resident ran 1.6 waves).
template <typename Kernel>
dim3 noise_grid(Kernel kernel, int64_t numel) {
  const int64_t units = (numel + kTileElements - 1) / kTileElements * kUnitsPerTile;
  const int64_t wave = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
                       resident_blocks(reinterpret_cast<const void*>(kernel));
  return dim3(static_cast<unsigned>(std::min((units + kNoiseThreads - 1) / kNoiseThreads, wave)));
}

// What every launcher of a for_each_noise_run kernel computes besides its grid (noise_grid): its stream, and the
// kernel's (key_lo, key_hi, step) words from the uint64 seed (stored in an int64) and the step.
struct NoiseLaunch {
  cudaStream_t stream;
  uint32_t key_lo, key_hi, step;
};

inline NoiseLaunch noise_launch(int64_t seed, int64_t step) {
  const uint64_t useed = static_cast<uint64_t>(seed);
  return {at::cuda::getCurrentCUDAStream(), static_cast<uint32_t>(useed), static_cast<uint32_t>(useed >> 32),
          static_cast<uint32_t>(step)};
}

}  // namespace philox
}  // namespace diffusion_fast
