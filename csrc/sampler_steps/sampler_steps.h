// Fused sampler steps ddpm_step and ddim_step: one pass reads x_t and eps, writes x_{t-1}
// (and optionally the predicted x0), with Gaussian noise generated in the kernel from
// (seed, step, element index) by csrc/philox.h. Both ops share one kernel; they differ only
// in the coefficient row the Python side picks from its schedule table:
//
//   x0  = a * x - b * eps;   x0 = clamp(x0, -clip, clip) when clip is given
//   out = c1 * x0 + c2 * x + c3 * eps + sigma * z          coef = (a, b, c1, c2, c3, sigma)
//
// x, eps, noise (optional override of z), out, x0: contiguous, one shape and one floating
// dtype; math in float32 (float64 for float64 x). coef: (6,) contiguous, float32 (float64
// for float64 x), on x's device; read by the kernel, never synchronized to the host.
// sigma == 0 skips the noise (t = 0 of DDPM, eta = 0 of DDIM). x0 is an empty (0,) tensor
// unless return_x0. seed is a uint64 stored in an int64; step must fit in 32 bits.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace diffusion_fast {

constexpr int64_t kSamplerCoefs = 6;

// Validates the arguments (TORCH_CHECK with clear messages); shared by the CPU and CUDA paths.
void check_sampler_step(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& coef,
                        const std::optional<at::Tensor>& noise, int64_t step);

std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(const at::Tensor& x, const at::Tensor& eps,
                                                    const at::Tensor& coef, const std::optional<at::Tensor>& noise,
                                                    int64_t seed, int64_t step, std::optional<double> clip,
                                                    bool return_x0);

std::tuple<at::Tensor, at::Tensor> sampler_step_cuda(const at::Tensor& x, const at::Tensor& eps,
                                                     const at::Tensor& coef, const std::optional<at::Tensor>& noise,
                                                     int64_t seed, int64_t step, std::optional<double> clip,
                                                     bool return_x0);

}  // namespace diffusion_fast
