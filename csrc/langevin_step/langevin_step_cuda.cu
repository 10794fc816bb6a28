// CUDA kernel of langevin_step (see langevin_step.h). A grid-stride loop over units of four
// consecutive Philox counters of one noise tile (csrc/philox.h): a unit's thread makes the 16
// normals of its counters and applies them to four runs of four consecutive elements
// (1024 * tile + 256 * k + j0 .. + 3, k = 0..3), one 4-wide vector load per tensor per run when
// every pointer is aligned, so a warp reads 32 x 4 contiguous elements per run. int64 indexing.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "langevin_step/langevin_step.h"
#include "philox.h"

namespace diffusion_fast {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kUnitCounters = 4;                                       // counters per thread unit
constexpr int64_t kUnitsPerTile = philox::kTileCounters / kUnitCounters;  // 64

enum NoiseKind { kNone = 0, kPhilox = 1, kGiven = 2 };

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename scalar_t, typename acc_t, int kNoise, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    langevin_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ score,
                         const scalar_t* __restrict__ noise, scalar_t* __restrict__ out,
                         const acc_t* __restrict__ alpha_ptr, acc_t alpha_value, int64_t numel, uint32_t key_lo,
                         uint32_t key_hi, uint32_t step) {
  const acc_t alpha = alpha_ptr != nullptr ? *alpha_ptr : alpha_value;
  const acc_t noise_scale = sqrt(acc_t(2) * alpha);
  const int64_t tiles = (numel + philox::kTileElements - 1) / philox::kTileElements;
  const int64_t units = tiles * kUnitsPerTile;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; unit < units; unit += stride) {
    const int64_t tile = unit / kUnitsPerTile;
    const int64_t j0 = (unit % kUnitsPerTile) * kUnitCounters;
    acc_t z[4][kUnitCounters];  // [run k][counter q]
    if (kNoise == kPhilox) {
      const uint64_t first = static_cast<uint64_t>(tile) * philox::kTileCounters + j0;
#pragma unroll
      for (int q = 0; q < kUnitCounters; ++q) {
        philox::normals4<acc_t>(static_cast<uint32_t>(first) + q, static_cast<uint32_t>(first >> 32), step, key_lo,
                                key_hi, z[0][q], z[1][q], z[2][q], z[3][q]);
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t base = tile * philox::kTileElements + k * philox::kTileCounters + j0;
      const auto element = [&](scalar_t xs, scalar_t ss, acc_t zv) {
        acc_t o = static_cast<acc_t>(xs) + alpha * static_cast<acc_t>(ss);
        if (kNoise != kNone) o += noise_scale * zv;
        return static_cast<scalar_t>(o);
      };
      if (kVectorized && base + kUnitCounters <= numel) {
        const Vec4<scalar_t> xv = *reinterpret_cast<const Vec4<scalar_t>*>(x + base);
        const Vec4<scalar_t> sv = *reinterpret_cast<const Vec4<scalar_t>*>(score + base);
        Vec4<scalar_t> nv;
        if (kNoise == kGiven) nv = *reinterpret_cast<const Vec4<scalar_t>*>(noise + base);
        Vec4<scalar_t> ov;
#pragma unroll
        for (int q = 0; q < kUnitCounters; ++q) {
          ov.v[q] = element(xv.v[q], sv.v[q], kNoise == kGiven ? static_cast<acc_t>(nv.v[q]) : z[k][q]);
        }
        *reinterpret_cast<Vec4<scalar_t>*>(out + base) = ov;
      } else {
#pragma unroll
        for (int q = 0; q < kUnitCounters; ++q) {
          const int64_t i = base + q;
          if (i < numel) out[i] = element(x[i], score[i], kNoise == kGiven ? static_cast<acc_t>(noise[i]) : z[k][q]);
        }
      }
    }
  }
}

template <typename scalar_t>
bool aligned4(const scalar_t* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (4 * sizeof(scalar_t)) == 0;
}

}  // namespace

at::Tensor langevin_step_cuda(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& alpha,
                              double alpha_value, const std::optional<at::Tensor>& noise, int64_t seed, int64_t step,
                              bool add_noise) {
  check_langevin_step(x, score, alpha, noise, step, add_noise);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const bool given = noise.has_value() && noise->defined();
  const bool alpha_in_memory = alpha.has_value() && alpha->defined();
  const int64_t units = (numel + philox::kTileElements - 1) / philox::kTileElements * kUnitsPerTile;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
                             (2048 / kThreads);
  const dim3 grid(static_cast<unsigned>(std::min((units + kThreads - 1) / kThreads, max_blocks)));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const uint64_t useed = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "langevin_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sp = score.data_ptr<scalar_t>();
    const scalar_t* np = given ? noise->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t* ap = alpha_in_memory ? alpha->data_ptr<acc_t>() : nullptr;
    const bool vec = aligned4(xp) && aligned4(sp) && aligned4(np) && aligned4(op);
    const auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(xp, sp, np, op, ap, static_cast<acc_t>(alpha_value), numel,
                                            static_cast<uint32_t>(useed), static_cast<uint32_t>(useed >> 32),
                                            static_cast<uint32_t>(step));
    };
    const auto launch_aligned = [&](auto vectorized, auto scalar) { vec ? launch(vectorized) : launch(scalar); };
    if (!add_noise) {
      launch_aligned(langevin_step_kernel<scalar_t, acc_t, kNone, true>,
                     langevin_step_kernel<scalar_t, acc_t, kNone, false>);
    } else if (given) {
      launch_aligned(langevin_step_kernel<scalar_t, acc_t, kGiven, true>,
                     langevin_step_kernel<scalar_t, acc_t, kGiven, false>);
    } else {
      launch_aligned(langevin_step_kernel<scalar_t, acc_t, kPhilox, true>,
                     langevin_step_kernel<scalar_t, acc_t, kPhilox, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace diffusion_fast
