// CUDA kernel of dpm2015_step (see dpm2015_step.h): the epilogue of philox_cuda.cuh's noise loop,
// out = sqrt(1 - beta) x + sqrt(beta) z_mu + sqrt(sigmoid(z_sigma + logit beta)) z on runs of four.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "dpm2015_step/dpm2015_step.h"
#include "philox_cuda.cuh"

namespace diffusion_fast {

namespace {

template <typename scalar_t, typename acc_t, bool kNoise, bool kVectorized>
__global__ void __launch_bounds__(philox::kNoiseThreads)
    dpm2015_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ z_mu,
                        const scalar_t* __restrict__ z_sigma, scalar_t* __restrict__ out,
                        const acc_t* __restrict__ beta_ptr, acc_t beta_value, int64_t numel, uint32_t key_lo,
                        uint32_t key_hi, uint32_t step) {
  const auto c = Dpm2015Coef<acc_t>::from_beta(beta_ptr != nullptr ? *beta_ptr : beta_value);
  const auto load = [&](int64_t base) {
    return philox::load3<kVectorized>(x, z_mu, kNoise ? z_sigma : nullptr, base, numel);
  };
  const auto epilogue = [&](int64_t base, const philox::Loaded<scalar_t, 3>& in, const acc_t(&z)[4]) {
    acc_t o[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      o[q] = c.sqrt_keep * static_cast<acc_t>(in.v[0][q]) + c.sqrt_beta * static_cast<acc_t>(in.v[1][q]);
      if (kNoise)  // sqrt(sigmoid(z_sigma + logit beta)); 0 on overflow
        o[q] += z[q] / sqrt(acc_t(1) + exp(-(static_cast<acc_t>(in.v[2][q]) + c.logit_beta)));
    }
    philox::store4<kVectorized>(out, base, numel, o);
  };
  philox::for_each_noise_run<acc_t, kNoise>(numel, key_lo, key_hi, step, kNoise, load, epilogue);
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
  const auto l = philox::noise_launch(seed, step);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dpm2015_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = z_mu.data_ptr<scalar_t>();
    const scalar_t* sp = z_sigma.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t* bp = beta_in_memory ? beta->data_ptr<acc_t>() : nullptr;
    const bool vec = philox::aligned4(xp) && philox::aligned4(mp) && philox::aligned4(sp) && philox::aligned4(op);
    const auto launch = [&](auto kernel) {
      const dim3 grid = philox::noise_grid(kernel, numel);
      kernel<<<grid, philox::kNoiseThreads, 0, l.stream>>>(xp, mp, sp, op, bp, static_cast<acc_t>(beta_value),
                                                           numel, l.key_lo, l.key_hi, l.step);
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
