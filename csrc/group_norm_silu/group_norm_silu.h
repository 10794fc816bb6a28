// Fused GroupNorm + SiLU (with optional per-(n,c) pre_bias, scale, shift).
//
//   h = x + pre_bias[n,c]
//   z = (h - mean[n,g]) * rstd[n,g] * weight[c] + bias[c]
//   z = z * (1 + scale[n,c]) + shift[n,c]
//   y = silu ? z * sigmoid(z) : z
//
// x, y: (N, C, *) with S = prod(*) elements per channel, either NC*-contiguous
// (offset n*C*S + c*S + s) or channels-last (offset n*S*C + s*C + c).
// weight, bias: (C,) or undefined. pre_bias, scale, shift: (N, C) contiguous or undefined.
// mean, rstd: (N, G), float32 (float64 for float64 x).
// Backward returns grad_x (layout of x) and grads of weight, bias, pre_bias, scale, shift,
// each an empty (0,) tensor when that input is absent. grad_y must have x's layout.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace diffusion_fast {

using OptTensor = std::optional<at::Tensor>;

// Sizes and strides shared by every backend, validated once.
struct GroupNormSiLUShape {
  int64_t N, C, G, S;     // batch, channels, groups, spatial elements per channel
  int64_t stride_c;       // element stride between channels (S, or 1 for channels-last)
  int64_t stride_s;       // element stride between spatial positions (1, or C for channels-last)
  bool channels_last;
};

// Validates x and the optional tensors (TORCH_CHECK with clear messages); never trusts Python.
GroupNormSiLUShape group_norm_silu_shape(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                         const OptTensor& pre_bias, const OptTensor& scale,
                                         const OptTensor& shift, int64_t num_groups);

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_fwd_cpu(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& pre_bias,
    const OptTensor& scale, const OptTensor& shift, int64_t num_groups, double eps, bool silu);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& pre_bias, const OptTensor& scale, const OptTensor& shift, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool silu);

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_fwd_cuda(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& pre_bias,
    const OptTensor& scale, const OptTensor& shift, int64_t num_groups, double eps, bool silu);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& pre_bias, const OptTensor& scale, const OptTensor& shift, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool silu);

}  // namespace diffusion_fast
