// CPU kernel of dpm2015_step (see dpm2015_step.h), and the argument checks shared with the CUDA
// file. The loop over noise tiles is philox_cpu.h's; this file gives its epilogue, a branch-free
// loop over one contiguous run of elements, written for the auto-vectorizer.
#include "dpm2015_step/dpm2015_step.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "noise_step.h"
#include "philox_cpu.h"

namespace diffusion_fast {

void check_dpm2015_step(const at::Tensor& x, const at::Tensor& z_mu, const at::Tensor& z_sigma,
                        const std::optional<at::Tensor>& beta, double beta_value, int64_t step) {
  constexpr const char* op = "dpm2015_step";
  noise_step::check_x(op, x);
  noise_step::check_like_x(op, "z_mu", z_mu, x);
  noise_step::check_like_x(op, "z_sigma", z_sigma, x);
  if (beta.has_value() && beta->defined()) {
    noise_step::check_param(op, "beta", *beta, x);
    TORCH_CHECK(beta->dim() == 1 && beta->size(0) == 1, "dpm2015_step: beta must be a (1,) tensor, got shape ",
                beta->sizes());
  } else {
    TORCH_CHECK(beta_value > 0.0 && beta_value < 1.0, "dpm2015_step: beta_value must be in (0, 1), got ",
                beta_value);
  }
  noise_step::check_step(op, step);
}

namespace {

// e^y in float, branch-free so that the loop below vectorises: y = n ln2 + r with n = round(y / ln2)
// and ln2 split in two (Cody-Waite), so |r| <= ln2 / 2 holds no rounding of n; e^r by its Taylor
// series to degree 7 (truncation < 5e-9); 2^n from the exponent bits. y is clamped to [-87, 88], where
// e^y stays a finite normal float: past it 1 / sqrt(1 + e^y) is 1 or below 8e-20, as needed here.
inline float exp_clamped(float y) {
  y = std::min(std::max(y, -87.0f), 88.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (y * 1.44269504f + shifter) - shifter;
  const float r = (y - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 = 0.693359375 - 2.12194440e-4
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * c10::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

inline double exp_clamped(double y) { return std::exp(y); }

// One contiguous run of `len` elements; z (kNoise) is its noise. Inlined into philox_cpu.h's loop,
// which compiles it for the CPU's vector width.
template <bool kNoise, typename scalar_t, typename acc_t>
inline void step_run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ z_mu,
                     const scalar_t* __restrict__ z_sigma, const acc_t* __restrict__ z, scalar_t* __restrict__ out,
                     int64_t len, Dpm2015Coef<acc_t> c) {
  for (int64_t i = 0; i < len; ++i) {
    acc_t o = c.sqrt_keep * static_cast<acc_t>(x[i]) + c.sqrt_beta * static_cast<acc_t>(z_mu[i]);
    if constexpr (kNoise) {
      const acc_t v = static_cast<acc_t>(z_sigma[i]) + c.logit_beta;
      o += z[i] / std::sqrt(acc_t(1) + exp_clamped(-v));  // sqrt(sigmoid(v))
    }
    out[i] = static_cast<scalar_t>(o);
  }
}

template <bool kNoise, typename scalar_t, typename acc_t>
void dpm2015_step_kernel(const scalar_t* x, const scalar_t* z_mu, const scalar_t* z_sigma, scalar_t* out,
                         int64_t numel, Dpm2015Coef<acc_t> coef, uint64_t seed, uint32_t step) {
  philox::for_each_noise_run<acc_t, kNoise>(numel, seed, step, [=](int64_t first, int64_t len, const acc_t* z) {
    step_run<kNoise>(x + first, z_mu + first, z_sigma + first, z, out + first, len, coef);
  });
}

}  // namespace

at::Tensor dpm2015_step_cpu(const at::Tensor& x, const at::Tensor& z_mu, const at::Tensor& z_sigma,
                            const std::optional<at::Tensor>& beta, double beta_value, int64_t seed, int64_t step,
                            bool add_noise) {
  check_dpm2015_step(x, z_mu, z_sigma, beta, beta_value, step);
  auto out = noise_step::empty_cpu_like(x);
  const bool beta_in_memory = beta.has_value() && beta->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dpm2015_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const double b = beta_in_memory ? static_cast<double>(*beta->data_ptr<acc_t>()) : beta_value;
    const Dpm2015Coef<double> wide = Dpm2015Coef<double>::from_beta(b);  // in double, then rounded once
    const Dpm2015Coef<acc_t> coef{static_cast<acc_t>(wide.sqrt_keep), static_cast<acc_t>(wide.sqrt_beta),
                                  static_cast<acc_t>(wide.logit_beta)};
    const auto launch = [&](auto kernel) {
      kernel(x.data_ptr<scalar_t>(), z_mu.data_ptr<scalar_t>(), z_sigma.data_ptr<scalar_t>(),
             out.data_ptr<scalar_t>(), x.numel(), coef, static_cast<uint64_t>(seed), static_cast<uint32_t>(step));
    };
    if (add_noise) {
      launch(dpm2015_step_kernel<true, scalar_t, acc_t>);
    } else {
      launch(dpm2015_step_kernel<false, scalar_t, acc_t>);
    }
  });
  return out;
}

}  // namespace diffusion_fast
