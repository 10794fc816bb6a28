// CUDA kernel of langevin_step (see langevin_step.h): the epilogue of philox_cuda.cuh's noise
// loop, out = x + alpha * score + sqrt(2 alpha) * z on runs of four elements.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "langevin_step/langevin_step.h"
#include "philox_cuda.cuh"

namespace diffusion_fast {

namespace {

enum NoiseKind { kNone = 0, kPhilox = 1, kGiven = 2 };

template <typename scalar_t, typename acc_t, int kNoise, bool kVectorized>
__global__ void __launch_bounds__(philox::kNoiseThreads)
    langevin_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ score,
                         const scalar_t* __restrict__ noise, scalar_t* __restrict__ out,
                         const acc_t* __restrict__ alpha_ptr, acc_t alpha_value, int64_t numel, uint32_t key_lo,
                         uint32_t key_hi, uint32_t step) {
  const acc_t alpha = alpha_ptr != nullptr ? *alpha_ptr : alpha_value;
  const acc_t noise_scale = sqrt(acc_t(2) * alpha);
  const auto load = [&](int64_t base) {
    return philox::load3<kVectorized>(x, score, kNoise == kGiven ? noise : nullptr, base, numel);
  };
  const auto epilogue = [&](int64_t base, const philox::Loaded<scalar_t, 3>& in, const acc_t(&z)[4]) {
    acc_t o[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      o[q] = static_cast<acc_t>(in.v[0][q]) + alpha * static_cast<acc_t>(in.v[1][q]);
      if (kNoise != kNone) o[q] += noise_scale * (kNoise == kGiven ? static_cast<acc_t>(in.v[2][q]) : z[q]);
    }
    philox::store4<kVectorized>(out, base, numel, o);
  };
  philox::for_each_noise_run<acc_t, kNoise == kPhilox>(numel, key_lo, key_hi, step, kNoise == kPhilox, load, epilogue);
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
  const auto l = philox::noise_launch(seed, step);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "langevin_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sp = score.data_ptr<scalar_t>();
    const scalar_t* np = given ? noise->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t* ap = alpha_in_memory ? alpha->data_ptr<acc_t>() : nullptr;
    const bool vec = philox::aligned4(xp) && philox::aligned4(sp) && philox::aligned4(np) && philox::aligned4(op);
    const auto launch = [&](auto kernel) {
      const dim3 grid = philox::noise_grid(kernel, numel);
      kernel<<<grid, philox::kNoiseThreads, 0, l.stream>>>(xp, sp, np, op, ap, static_cast<acc_t>(alpha_value),
                                                           numel, l.key_lo, l.key_hi, l.step);
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
