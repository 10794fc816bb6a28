// CUDA kernel of ddpm_step / ddim_step (see sampler_steps.h). A grid-stride loop over units of
// four consecutive Philox counters of one noise tile (csrc/philox.h): a unit's thread makes the
// 16 normals of its counters and applies them to four runs of four consecutive elements
// (1024 * tile + 256 * k + j0 .. + 3, k = 0..3), one 4-wide vector load per tensor per run when
// every pointer is aligned, so a warp reads 32 x 4 contiguous elements per run. int64 indexing.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>

#include "philox.h"
#include "sampler_steps/sampler_steps.h"

namespace diffusion_fast {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kUnitCounters = 4;                                       // counters per thread unit
constexpr int64_t kUnitsPerTile = philox::kTileCounters / kUnitCounters;  // 64

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename scalar_t, typename acc_t, bool kGivenNoise, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    sampler_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ eps,
                        const scalar_t* __restrict__ noise, scalar_t* __restrict__ out, scalar_t* __restrict__ x0_out,
                        const acc_t* __restrict__ coef, int64_t numel, uint32_t key_lo, uint32_t key_hi, uint32_t step,
                        acc_t clip) {
  const acc_t a = coef[0], b = coef[1], c1 = coef[2], c2 = coef[3], c3 = coef[4], sigma = coef[5];
  const bool make_noise = !kGivenNoise && sigma != acc_t(0);  // the same in every thread: no divergence
  const int64_t tiles = (numel + philox::kTileElements - 1) / philox::kTileElements;
  const int64_t units = tiles * kUnitsPerTile;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; unit < units; unit += stride) {
    const int64_t tile = unit / kUnitsPerTile;
    const int64_t j0 = (unit % kUnitsPerTile) * kUnitCounters;
    acc_t z[4][kUnitCounters];  // [run k][counter q]
#pragma unroll
    for (int q = 0; q < kUnitCounters; ++q) {
      z[0][q] = z[1][q] = z[2][q] = z[3][q] = acc_t(0);
    }
    if (make_noise) {
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
      const auto element = [&](scalar_t xs, scalar_t es, acc_t zv, scalar_t& o, scalar_t& x0s) {
        const acc_t xv = static_cast<acc_t>(xs), ev = static_cast<acc_t>(es);
        const acc_t raw = a * xv - b * ev;
        const acc_t x0 = raw < -clip ? -clip : (raw > clip ? clip : raw);  // NaN stays NaN, as in torch.clamp
        o = static_cast<scalar_t>(c1 * x0 + c2 * xv + c3 * ev + sigma * zv);
        x0s = static_cast<scalar_t>(x0);
      };
      if (kVectorized && base + kUnitCounters <= numel) {
        const Vec4<scalar_t> xv = *reinterpret_cast<const Vec4<scalar_t>*>(x + base);
        const Vec4<scalar_t> ev = *reinterpret_cast<const Vec4<scalar_t>*>(eps + base);
        Vec4<scalar_t> nv;
        if (kGivenNoise) nv = *reinterpret_cast<const Vec4<scalar_t>*>(noise + base);
        Vec4<scalar_t> ov, x0v;
#pragma unroll
        for (int q = 0; q < kUnitCounters; ++q) {
          element(xv.v[q], ev.v[q], kGivenNoise ? static_cast<acc_t>(nv.v[q]) : z[k][q], ov.v[q], x0v.v[q]);
        }
        *reinterpret_cast<Vec4<scalar_t>*>(out + base) = ov;
        if (x0_out != nullptr) *reinterpret_cast<Vec4<scalar_t>*>(x0_out + base) = x0v;
      } else {
#pragma unroll
        for (int q = 0; q < kUnitCounters; ++q) {
          const int64_t i = base + q;
          if (i < numel) {
            scalar_t o, x0s;
            element(x[i], eps[i], kGivenNoise ? static_cast<acc_t>(noise[i]) : z[k][q], o, x0s);
            out[i] = o;
            if (x0_out != nullptr) x0_out[i] = x0s;
          }
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

std::tuple<at::Tensor, at::Tensor> sampler_step_cuda(const at::Tensor& x, const at::Tensor& eps,
                                                     const at::Tensor& coef, const std::optional<at::Tensor>& noise,
                                                     int64_t seed, int64_t step, std::optional<double> clip,
                                                     bool return_x0) {
  check_sampler_step(x, eps, coef, noise, step);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  auto x0 = return_x0 ? at::empty_like(x) : x.new_empty({0});
  const int64_t numel = x.numel();
  if (numel == 0) return {out, x0};
  const bool given = noise.has_value() && noise->defined();
  const int64_t units = (numel + philox::kTileElements - 1) / philox::kTileElements * kUnitsPerTile;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
                             (2048 / kThreads);
  const dim3 grid(static_cast<unsigned>(std::min((units + kThreads - 1) / kThreads, max_blocks)));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const uint64_t useed = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampler_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ep = eps.data_ptr<scalar_t>();
    const scalar_t* np = given ? noise->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* x0p = return_x0 ? x0.data_ptr<scalar_t>() : nullptr;
    const acc_t bound = clip.has_value() ? static_cast<acc_t>(*clip) : std::numeric_limits<acc_t>::infinity();
    const bool vec = aligned4(xp) && aligned4(ep) && aligned4(np) && aligned4(op) && aligned4(x0p);
    const auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(xp, ep, np, op, x0p, coef.data_ptr<acc_t>(), numel,
                                            static_cast<uint32_t>(useed), static_cast<uint32_t>(useed >> 32),
                                            static_cast<uint32_t>(step), bound);
    };
    if (given) {
      vec ? launch(sampler_step_kernel<scalar_t, acc_t, true, true>)
          : launch(sampler_step_kernel<scalar_t, acc_t, true, false>);
    } else {
      vec ? launch(sampler_step_kernel<scalar_t, acc_t, false, true>)
          : launch(sampler_step_kernel<scalar_t, acc_t, false, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, x0};
}

}  // namespace diffusion_fast
