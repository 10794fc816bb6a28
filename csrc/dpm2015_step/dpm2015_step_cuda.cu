// CUDA kernel of dpm2015_step (see dpm2015_step.h). A grid-stride loop over units of four
// consecutive Philox counters of one noise tile (csrc/philox.h): a unit's thread makes the 16
// normals of its counters and applies them to four runs of four consecutive elements
// (1024 * tile + 256 * k + j0 .. + 3, k = 0..3), one 4-wide vector load per tensor per run when
// every pointer is aligned, so a warp reads 32 x 4 contiguous elements per run. int64 indexing.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "dpm2015_step/dpm2015_step.h"
#include "philox.h"

namespace diffusion_fast {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kUnitCounters = 4;                                       // counters per thread unit
constexpr int64_t kUnitsPerTile = philox::kTileCounters / kUnitCounters;  // 64

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename scalar_t, typename acc_t, bool kNoise, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    dpm2015_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ z_mu,
                        const scalar_t* __restrict__ z_sigma, scalar_t* __restrict__ out,
                        const acc_t* __restrict__ beta_ptr, acc_t beta_value, int64_t numel, uint32_t key_lo,
                        uint32_t key_hi, uint32_t step) {
  const auto c = Dpm2015Coef<acc_t>::from_beta(beta_ptr != nullptr ? *beta_ptr : beta_value);
  const int64_t tiles = (numel + philox::kTileElements - 1) / philox::kTileElements;
  const int64_t units = tiles * kUnitsPerTile;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; unit < units; unit += stride) {
    const int64_t tile = unit / kUnitsPerTile;
    const int64_t j0 = (unit % kUnitsPerTile) * kUnitCounters;
    acc_t z[4][kUnitCounters];  // [run k][counter q]
    if (kNoise) {
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
      const auto element = [&](scalar_t xs, scalar_t mus, scalar_t sigmas, acc_t zv) {
        acc_t o = c.sqrt_keep * static_cast<acc_t>(xs) + c.sqrt_beta * static_cast<acc_t>(mus);
        if (kNoise) {  // sqrt(sigmoid(v)) = 1 / sqrt(1 + e^-v); 0 when exp overflows
          o += zv / sqrt(acc_t(1) + exp(-(static_cast<acc_t>(sigmas) + c.logit_beta)));
        }
        return static_cast<scalar_t>(o);
      };
      if (kVectorized && base + kUnitCounters <= numel) {
        const Vec4<scalar_t> xv = *reinterpret_cast<const Vec4<scalar_t>*>(x + base);
        const Vec4<scalar_t> mv = *reinterpret_cast<const Vec4<scalar_t>*>(z_mu + base);
        Vec4<scalar_t> sv = mv;  // read only with noise
        if (kNoise) sv = *reinterpret_cast<const Vec4<scalar_t>*>(z_sigma + base);
        Vec4<scalar_t> ov;
#pragma unroll
        for (int q = 0; q < kUnitCounters; ++q) ov.v[q] = element(xv.v[q], mv.v[q], sv.v[q], z[k][q]);
        *reinterpret_cast<Vec4<scalar_t>*>(out + base) = ov;
      } else {
#pragma unroll
        for (int q = 0; q < kUnitCounters; ++q) {
          const int64_t i = base + q;
          if (i < numel) out[i] = element(x[i], z_mu[i], kNoise ? z_sigma[i] : x[i], z[k][q]);
        }
      }
    }
  }
}

template <typename scalar_t>
bool aligned4(const scalar_t* p) {
  return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(scalar_t)) == 0;
}

}  // namespace

at::Tensor dpm2015_step_cuda(const at::Tensor& x, const at::Tensor& z_mu, const at::Tensor& z_sigma,
                             const std::optional<at::Tensor>& beta, double beta_value, int64_t seed, int64_t step,
                             bool add_noise) {
  check_dpm2015_step(x, z_mu, z_sigma, beta, beta_value, step);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const bool beta_in_memory = beta.has_value() && beta->defined();
  const int64_t units = (numel + philox::kTileElements - 1) / philox::kTileElements * kUnitsPerTile;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
                             (2048 / kThreads);
  const dim3 grid(static_cast<unsigned>(std::min((units + kThreads - 1) / kThreads, max_blocks)));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const uint64_t useed = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dpm2015_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = z_mu.data_ptr<scalar_t>();
    const scalar_t* sp = z_sigma.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t* bp = beta_in_memory ? beta->data_ptr<acc_t>() : nullptr;
    const bool vec = aligned4(xp) && aligned4(mp) && aligned4(sp) && aligned4(op);
    const auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(xp, mp, sp, op, bp, static_cast<acc_t>(beta_value), numel,
                                            static_cast<uint32_t>(useed), static_cast<uint32_t>(useed >> 32),
                                            static_cast<uint32_t>(step));
    };
    const auto launch_aligned = [&](auto vectorized, auto scalar) { vec ? launch(vectorized) : launch(scalar); };
    if (add_noise) {
      launch_aligned(dpm2015_step_kernel<scalar_t, acc_t, true, true>,
                     dpm2015_step_kernel<scalar_t, acc_t, true, false>);
    } else {
      launch_aligned(dpm2015_step_kernel<scalar_t, acc_t, false, true>,
                     dpm2015_step_kernel<scalar_t, acc_t, false, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace diffusion_fast
