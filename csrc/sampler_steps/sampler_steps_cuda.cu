// CUDA kernel of ddpm_step / ddim_step (see sampler_steps.h): the epilogue of philox_cuda.cuh's
// noise loop, x0 and x_prev on runs of four elements.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "philox_cuda.cuh"
#include "sampler_steps/sampler_steps.h"

namespace diffusion_fast {

namespace {

template <typename scalar_t, typename acc_t, bool kGivenNoise, bool kVectorized>
__global__ void __launch_bounds__(philox::kNoiseThreads)
    sampler_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ eps,
                        const scalar_t* __restrict__ noise, scalar_t* __restrict__ out, scalar_t* __restrict__ x0_out,
                        const acc_t* __restrict__ coef, int64_t numel, uint32_t key_lo, uint32_t key_hi, uint32_t step,
                        acc_t clip) {
  const acc_t a = coef[0], b = coef[1], c1 = coef[2], c2 = coef[3], c3 = coef[4], sigma = coef[5];
  const bool make_noise = !kGivenNoise && sigma != acc_t(0);
  const auto load = [&](int64_t base) {
    return philox::load3<kVectorized>(x, eps, kGivenNoise ? noise : nullptr, base, numel);
  };
  const auto epilogue = [&](int64_t base, const philox::Loaded<scalar_t, 3>& in, const acc_t(&z)[4]) {
    acc_t o[4], x0[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const acc_t xv = static_cast<acc_t>(in.v[0][q]), ev = static_cast<acc_t>(in.v[1][q]);
      const acc_t raw = a * xv - b * ev;
      x0[q] = raw < -clip ? -clip : (raw > clip ? clip : raw);  // NaN stays NaN, as in torch.clamp
      o[q] = c1 * x0[q] + c2 * xv + c3 * ev + sigma * (kGivenNoise ? static_cast<acc_t>(in.v[2][q]) : z[q]);
    }
    philox::store4<kVectorized>(out, base, numel, o);
    if (x0_out != nullptr) philox::store4<kVectorized>(x0_out, base, numel, x0);
  };
  philox::for_each_noise_run<acc_t, !kGivenNoise>(numel, key_lo, key_hi, step, make_noise, load, epilogue);
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
  const auto l = philox::noise_launch(seed, step);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampler_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ep = eps.data_ptr<scalar_t>();
    const scalar_t* np = given ? noise->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* x0p = return_x0 ? x0.data_ptr<scalar_t>() : nullptr;
    const acc_t bound = clip.has_value() ? static_cast<acc_t>(*clip) : std::numeric_limits<acc_t>::infinity();
    const bool vec = philox::aligned4(xp) && philox::aligned4(ep) && philox::aligned4(np) && philox::aligned4(op) &&
                     philox::aligned4(x0p);
    const auto launch = [&](auto kernel) {
      const dim3 grid = philox::noise_grid(kernel, numel);
      kernel<<<grid, philox::kNoiseThreads, 0, l.stream>>>(xp, ep, np, op, x0p, coef.data_ptr<acc_t>(), numel,
                                                           l.key_lo, l.key_hi, l.step, bound);
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
