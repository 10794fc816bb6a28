// Fused depthwise k x k conv + BatchNorm + Swish, and fused BatchNorm + Swish (math and pass counts:
// diffusion_fast/ops/dwconv_bn_swish.py).
//
//   z  = dwconv(x, conv_weight) + conv_bias      (stride 1, zero padding R = K / 2; bn_swish: z = x)
//   zn = (z - mean[c]) * rstd[c] * bn_weight[c] + bn_bias[c],   rstd = 1 / sqrt(var + eps)
//   y  = swish ? zn * sigmoid(zn) : zn
//
// x, y, grad_y, grad_x: (N, C, H, W), NCHW-contiguous or channels-last, float16/bfloat16/float32/float64.
// conv_weight: (C, 1, K, K) with K in {1, 3, 5}; conv_bias, bn_weight, bn_bias, running_mean, running_var:
// (C,) of any floating dtype, or undefined. mean, var: (C,) float32 (float64 for float64 x), the statistics
// y was normalised with: the batch's (biased variance) when training, else copies of the running ones.
// needs_grad (forward): whether a backward may follow; a hint only, results are the same either way (the
// CPU channels-last training forward runs the conv once when no backward follows, see forward_cl).
// Backward returns grad_x (layout of x) and the grads of conv_weight, conv_bias, bn_weight, bn_bias, each
// in its input's dtype, or an empty (0,) tensor when that input is absent. grad_y must have x's layout.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace diffusion_fast {

using OptTensor = std::optional<at::Tensor>;

struct DWConvBNShape {
  int64_t N, C, H, W;
  int64_t K;           // kernel size; 1 with no conv_weight (bn_swish: identity)
  bool channels_last;  // C innermost (offset ((n*H + h)*W + w)*C + c); else (n*C + c)*H*W + h*W + w
};

// Validates x and every optional tensor (TORCH_CHECK with clear messages); never trusts Python.
DWConvBNShape dwconv_bn_swish_shape(const at::Tensor& x, const OptTensor& conv_weight, const OptTensor& conv_bias,
                                    const OptTensor& bn_weight, const OptTensor& bn_bias,
                                    const OptTensor& running_mean, const OptTensor& running_var, bool training);

// Checks grad_y, mean and var of a backward call against x.
void dwconv_bn_swish_check_bwd(const at::Tensor& grad_y, const at::Tensor& x, const DWConvBNShape& s,
                               const at::Tensor& mean, const at::Tensor& var);

using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using DWBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BNBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Fwd dwconv_bn_swish_fwd_cpu(const at::Tensor& x, const at::Tensor& conv_weight, const OptTensor& conv_bias,
                            const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                            const OptTensor& running_var, bool training, double eps, bool swish,
                            bool needs_grad);
DWBwd dwconv_bn_swish_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& conv_weight,
                              const OptTensor& conv_bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
                              const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool swish);
Fwd bn_swish_fwd_cpu(const at::Tensor& x, const OptTensor& bn_weight, const OptTensor& bn_bias,
                     const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps,
                     bool swish, bool needs_grad);
BNBwd bn_swish_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& bn_weight,
                       const OptTensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, bool training,
                       double eps, bool swish);

Fwd dwconv_bn_swish_fwd_cuda(const at::Tensor& x, const at::Tensor& conv_weight, const OptTensor& conv_bias,
                             const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                             const OptTensor& running_var, bool training, double eps, bool swish,
                             bool needs_grad);
DWBwd dwconv_bn_swish_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& conv_weight,
                               const OptTensor& conv_bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
                               const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool swish);
// The shared-memory tiled forward (dwconv_bn_swish_cuda_tiled.cu) that dwconv_bn_swish_fwd_cuda runs, and the
// backward below that dwconv_bn_swish_bwd_cuda runs, where they support the input: NCHW-contiguous non-empty x of
// float32/float16/bfloat16, K in {3, 5}, 32-bit tile indexing.
// w: (C, 1, K, K) and cb, gamma, beta: (C,) or undefined, contiguous, each float32/float64/float16/bfloat16 (read
// as they are: no fp32 copies); y: x's shape, contiguous;
// mean, var: (C,) float32, written when training, read (the running statistics) when not.
bool dwconv_bn_swish_tiled_supports(const at::Tensor& x, int64_t K);
void dwconv_bn_swish_fwd_cuda_tiled(const at::Tensor& x, const at::Tensor& w, const at::Tensor& cb,
                                    const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& y, at::Tensor& mean,
                                    at::Tensor& var, bool training, double eps, bool swish);
// Its backward (same inputs; grad_y and grad_x contiguous): writes grad_x and each defined tensor of grads
// (contiguous, float32/float64/float16/bfloat16, shaped like its parameter): the grads of conv_weight, conv_bias,
// bn_weight (sum dzn * zhat) and bn_bias (sum dzn).
struct ParamGrads {
  at::Tensor w, cb, gamma, beta;
};
void dwconv_bn_swish_bwd_cuda_tiled(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w,
                                    const at::Tensor& cb, const at::Tensor& gamma, const at::Tensor& beta,
                                    const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
                                    bool swish, at::Tensor& grad_x, const ParamGrads& grads);
Fwd bn_swish_fwd_cuda(const at::Tensor& x, const OptTensor& bn_weight, const OptTensor& bn_bias,
                      const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps,
                      bool swish, bool needs_grad);
BNBwd bn_swish_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& bn_weight,
                        const OptTensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, bool training,
                        double eps, bool swish);

}  // namespace diffusion_fast
