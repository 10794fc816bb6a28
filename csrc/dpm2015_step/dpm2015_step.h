// Fused reverse step of Sohl-Dickstein et al. 2015 (Sec. 2.2, App. D.1): one pass reads x^t and the
// network's outputs (z_mu, z_sigma) and writes
//
//   x_prev = sqrt(1 - beta) x + sqrt(beta) z_mu + sqrt(sigmoid(z_sigma + logit beta)) z
//
// with z generated in the kernel from (seed, step, element index) by csrc/philox.h, or left out
// (add_noise = false: x_prev = the mean).
//
// x, z_mu, z_sigma, out: contiguous, one shape and one floating dtype; math in float32 (float64
// for float64 x). beta: a (1,) contiguous tensor on x's device, float32 (float64 for float64 x),
// read by the kernel and never synchronized to the host; when it is absent the number beta_value
// is beta. seed is a uint64 stored in an int64; step must fit in 32 bits.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "philox.h"

namespace diffusion_fast {

// Validates the arguments (TORCH_CHECK with clear messages); shared by the CPU and CUDA paths.
void check_dpm2015_step(const at::Tensor& x, const at::Tensor& z_mu, const at::Tensor& z_sigma,
                        const std::optional<at::Tensor>& beta, double beta_value, int64_t step);

at::Tensor dpm2015_step_cpu(const at::Tensor& x, const at::Tensor& z_mu, const at::Tensor& z_sigma,
                            const std::optional<at::Tensor>& beta, double beta_value, int64_t seed, int64_t step,
                            bool add_noise);

at::Tensor dpm2015_step_cuda(const at::Tensor& x, const at::Tensor& z_mu, const at::Tensor& z_sigma,
                             const std::optional<at::Tensor>& beta, double beta_value, int64_t seed, int64_t step,
                             bool add_noise);

// The per-call constants of one beta: sqrt(1 - beta), sqrt(beta), logit(beta) = ln beta - ln(1 - beta).
template <typename acc_t>
struct Dpm2015Coef {
  acc_t sqrt_keep, sqrt_beta, logit_beta;

  DF_HOST_DEVICE static Dpm2015Coef from_beta(acc_t beta) {
    return {sqrt(acc_t(1) - beta), sqrt(beta), log(beta) - log1p(-beta)};
  }
};

}  // namespace diffusion_fast
