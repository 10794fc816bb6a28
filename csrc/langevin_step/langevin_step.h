// Fused Langevin step (Song & Ermon 2019, Algorithm 1): one pass reads x and the score and
// writes
//
//   out = x + alpha * score + sqrt(2 alpha) * z
//
// with z generated in the kernel from (seed, step, element index) by csrc/philox.h, or read
// from `noise`, or left out (add_noise = false: out = x + alpha * score).
//
// x, score, noise (optional override of z), out: contiguous, one shape and one floating dtype;
// math in float32 (float64 for float64 x). alpha: a (1,) contiguous tensor on x's device,
// float32 (float64 for float64 x), read by the kernel and never synchronized to the host; when
// it is absent the number alpha_value is the step size. seed is a uint64 stored in an int64;
// step must fit in 32 bits.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace diffusion_fast {

// Validates the arguments (TORCH_CHECK with clear messages); shared by the CPU and CUDA paths.
void check_langevin_step(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& alpha,
                         const std::optional<at::Tensor>& noise, int64_t step, bool add_noise);

at::Tensor langevin_step_cpu(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& alpha,
                             double alpha_value, const std::optional<at::Tensor>& noise, int64_t seed, int64_t step,
                             bool add_noise);

at::Tensor langevin_step_cuda(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& alpha,
                              double alpha_value, const std::optional<at::Tensor>& noise, int64_t seed, int64_t step,
                              bool add_noise);

}  // namespace diffusion_fast
