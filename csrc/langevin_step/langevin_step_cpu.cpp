// CPU kernel of langevin_step (see langevin_step.h), and the argument checks shared with the
// CUDA file. The loop over noise tiles is philox_cpu.h's; this file gives its epilogue, a
// branch-free loop over one contiguous run of elements, written for the auto-vectorizer.
#include "langevin_step/langevin_step.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>

#include "noise_step.h"
#include "philox_cpu.h"

namespace diffusion_fast {

void check_langevin_step(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& alpha,
                         const std::optional<at::Tensor>& noise, int64_t step, bool add_noise) {
  constexpr const char* op = "langevin_step";
  noise_step::check_x(op, x);
  noise_step::check_like_x(op, "score", score, x);
  if (noise.has_value() && noise->defined()) {
    noise_step::check_like_x(op, "noise", *noise, x);
    TORCH_CHECK(add_noise, "langevin_step: noise was given but add_noise is false");
  }
  if (alpha.has_value() && alpha->defined()) {
    noise_step::check_param(op, "alpha", *alpha, x);
    TORCH_CHECK(alpha->dim() == 1 && alpha->size(0) == 1, "langevin_step: alpha must be a (1,) tensor, got shape ",
                alpha->sizes());
  }
  noise_step::check_step(op, step);
}

namespace {

enum class Noise { kNone, kPhilox, kGiven };

// One contiguous run of `len` elements; z_gen (kPhilox) or z_given (kGiven) is its noise.
template <Noise kNoise, typename scalar_t, typename acc_t>
inline void step_run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ score,
                     const acc_t* __restrict__ z_gen, const scalar_t* __restrict__ z_given, scalar_t* __restrict__ out,
                     int64_t len, acc_t alpha, acc_t noise_scale) {
  for (int64_t i = 0; i < len; ++i) {
    acc_t o = static_cast<acc_t>(x[i]) + alpha * static_cast<acc_t>(score[i]);
    if constexpr (kNoise == Noise::kPhilox) o += noise_scale * z_gen[i];
    if constexpr (kNoise == Noise::kGiven) o += noise_scale * static_cast<acc_t>(z_given[i]);
    out[i] = static_cast<scalar_t>(o);
  }
}

template <Noise kNoise, typename scalar_t, typename acc_t>
void langevin_step_kernel(const scalar_t* x, const scalar_t* score, const scalar_t* noise, scalar_t* out,
                          int64_t numel, acc_t alpha, uint64_t seed, uint32_t step) {
  const acc_t noise_scale = std::sqrt(acc_t(2) * alpha);
  philox::for_each_noise_run<acc_t, kNoise == Noise::kPhilox>(
      numel, seed, step, [=](int64_t first, int64_t len, const acc_t* z) {
        step_run<kNoise>(x + first, score + first, z, kNoise == Noise::kGiven ? noise + first : nullptr, out + first,
                         len, alpha, noise_scale);
      });
}

}  // namespace

at::Tensor langevin_step_cpu(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& alpha,
                             double alpha_value, const std::optional<at::Tensor>& noise, int64_t seed, int64_t step,
                             bool add_noise) {
  check_langevin_step(x, score, alpha, noise, step, add_noise);
  at::Tensor out = noise_step::empty_cpu_like(x);
  const bool given = noise.has_value() && noise->defined();
  const bool alpha_in_memory = alpha.has_value() && alpha->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "langevin_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t a = alpha_in_memory ? *alpha->data_ptr<acc_t>() : static_cast<acc_t>(alpha_value);
    const auto launch = [&](auto kernel) {
      kernel(x.data_ptr<scalar_t>(), score.data_ptr<scalar_t>(), given ? noise->data_ptr<scalar_t>() : nullptr,
             out.data_ptr<scalar_t>(), x.numel(), a, static_cast<uint64_t>(seed), static_cast<uint32_t>(step));
    };
    if (!add_noise) {
      launch(langevin_step_kernel<Noise::kNone, scalar_t, acc_t>);
    } else if (given) {
      launch(langevin_step_kernel<Noise::kGiven, scalar_t, acc_t>);
    } else {
      launch(langevin_step_kernel<Noise::kPhilox, scalar_t, acc_t>);
    }
  });
  return out;
}

}  // namespace diffusion_fast
