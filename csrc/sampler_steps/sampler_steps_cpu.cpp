// CPU kernel of ddpm_step / ddim_step (see sampler_steps.h), and the argument checks shared
// with the CUDA file. The loop over noise tiles is philox_cpu.h's; this file gives its
// epilogue, a branch-free loop over one contiguous run of elements, written for the
// auto-vectorizer.
#include "sampler_steps/sampler_steps.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <limits>

#include "noise_step.h"
#include "philox_cpu.h"

namespace diffusion_fast {

void check_sampler_step(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& coef,
                        const std::optional<at::Tensor>& noise, int64_t step) {
  constexpr const char* op = "sampler_step";
  noise_step::check_x(op, x);
  noise_step::check_like_x(op, "eps", eps, x);
  if (noise.has_value() && noise->defined()) noise_step::check_like_x(op, "noise", *noise, x);
  noise_step::check_param(op, "coef", coef, x);
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == kSamplerCoefs && coef.is_contiguous(),
              "sampler_step: coef must be a contiguous (", kSamplerCoefs, ",) tensor, got shape ", coef.sizes());
  noise_step::check_step(op, step);
}

namespace {

enum class Noise { kNone, kPhilox, kGiven };

template <typename acc_t>
struct StepCoefs {
  acc_t a, b, c1, c2, c3, sigma, clip;
};

// One contiguous run of `len` elements; z_gen (kPhilox) or z_given (kGiven) is its noise.
template <Noise kNoise, typename scalar_t, typename acc_t>
inline void step_run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ eps, const acc_t* __restrict__ z_gen,
                     const scalar_t* __restrict__ z_given, scalar_t* __restrict__ out, scalar_t* __restrict__ x0_out,
                     int64_t len, const StepCoefs<acc_t>& k) {
  for (int64_t i = 0; i < len; ++i) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t ev = static_cast<acc_t>(eps[i]);
    const acc_t x0 = std::min(std::max(k.a * xv - k.b * ev, -k.clip), k.clip);
    acc_t o = k.c1 * x0 + k.c2 * xv + k.c3 * ev;
    if constexpr (kNoise == Noise::kPhilox) o += k.sigma * z_gen[i];
    if constexpr (kNoise == Noise::kGiven) o += k.sigma * static_cast<acc_t>(z_given[i]);
    out[i] = static_cast<scalar_t>(o);
    if (x0_out != nullptr) x0_out[i] = static_cast<scalar_t>(x0);
  }
}

template <Noise kNoise, typename scalar_t, typename acc_t>
void sampler_step_kernel(const scalar_t* x, const scalar_t* eps, const scalar_t* noise, scalar_t* out,
                         scalar_t* x0_out, int64_t numel, const StepCoefs<acc_t>& k, uint64_t seed, uint32_t step) {
  philox::for_each_noise_run<acc_t, kNoise == Noise::kPhilox>(
      numel, seed, step, [=, &k](int64_t first, int64_t len, const acc_t* z) {
        step_run<kNoise>(x + first, eps + first, z, kNoise == Noise::kGiven ? noise + first : nullptr, out + first,
                         x0_out == nullptr ? nullptr : x0_out + first, len, k);
      });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(const at::Tensor& x, const at::Tensor& eps,
                                                    const at::Tensor& coef, const std::optional<at::Tensor>& noise,
                                                    int64_t seed, int64_t step, std::optional<double> clip,
                                                    bool return_x0) {
  check_sampler_step(x, eps, coef, noise, step);
  auto out = noise_step::empty_cpu_like(x);
  auto x0 = return_x0 ? noise_step::empty_cpu_like(x) : x.new_empty({0});
  const bool given = noise.has_value() && noise->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampler_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* c = coef.data_ptr<acc_t>();
    const StepCoefs<acc_t> k{c[0], c[1], c[2], c[3], c[4], c[5],
                             clip.has_value() ? static_cast<acc_t>(*clip) : std::numeric_limits<acc_t>::infinity()};
    const scalar_t* noise_ptr = given ? noise->data_ptr<scalar_t>() : nullptr;
    scalar_t* x0_ptr = return_x0 ? x0.data_ptr<scalar_t>() : nullptr;
    const auto launch = [&](auto kernel) {
      kernel(x.data_ptr<scalar_t>(), eps.data_ptr<scalar_t>(), noise_ptr, out.data_ptr<scalar_t>(), x0_ptr, x.numel(),
             k, static_cast<uint64_t>(seed), static_cast<uint32_t>(step));
    };
    if (k.sigma == acc_t(0)) {
      launch(sampler_step_kernel<Noise::kNone, scalar_t, acc_t>);
    } else if (given) {
      launch(sampler_step_kernel<Noise::kGiven, scalar_t, acc_t>);
    } else {
      launch(sampler_step_kernel<Noise::kPhilox, scalar_t, acc_t>);
    }
  });
  return {out, x0};
}

}  // namespace diffusion_fast
