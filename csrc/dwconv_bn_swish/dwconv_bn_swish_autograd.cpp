// Autograd of dwconv_bn_swish_fwd and bn_swish_fwd and of their Triton twins, in C++ (why, and how the ops
// are called: autograd_util.h and group_norm_silu_autograd.cpp). diffusion_fast/ops/dwconv_bn_swish.py
// registers the same backward from Python only when this extension did not load. The running statistics
// are inputs of the fwd ops but not differentiated (the public functions update them after the call).
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_util.h"
#include "dwconv_bn_swish/dwconv_bn_swish.h"

namespace diffusion_fast {
namespace {

using namespace autograd_util;  // NOLINT: find_ops, like_layout, saved, optional, grad_if, records_grad, ...
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (y, mean, var)

using DwFwdFn = Stats(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, const OptTensor&, bool, double, bool, bool);
using DwBwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const at::Tensor&, const at::Tensor&, bool, double, bool);
using BnFwdFn = Stats(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool,
                      double, bool, bool);
using BnBwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                                const OptTensor&, const at::Tensor&, const at::Tensor&,
                                                                bool, double, bool);

// The fwd/bwd op pairs of one backend, looked up on first use.
template <bool TRITON>
const OpPair<DwFwdFn, DwBwdFn>& dw_ops() {
  static const auto pair = TRITON ? find_ops<DwFwdFn, DwBwdFn>("diffusion_fast::dwconv_bn_swish_triton_fwd",
                                                               "diffusion_fast::dwconv_bn_swish_triton_bwd")
                                  : find_ops<DwFwdFn, DwBwdFn>("diffusion_fast::dwconv_bn_swish_fwd",
                                                               "diffusion_fast::dwconv_bn_swish_bwd");
  return pair;
}

template <bool TRITON>
const OpPair<BnFwdFn, BnBwdFn>& bn_ops() {
  static const auto pair = TRITON ? find_ops<BnFwdFn, BnBwdFn>("diffusion_fast::bn_swish_triton_fwd",
                                                               "diffusion_fast::bn_swish_triton_bwd")
                                  : find_ops<BnFwdFn, BnBwdFn>("diffusion_fast::bn_swish_fwd",
                                                               "diffusion_fast::bn_swish_bwd");
  return pair;
}

// The flags every backward needs.
void save_flags(AutogradContext* ctx, bool training, double eps, bool swish) {
  ctx->saved_data["training"] = training;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["swish"] = swish;
}

template <bool TRITON>
struct DWConvBNSwishFunction : public torch::autograd::Function<DWConvBNSwishFunction<TRITON>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& conv_weight,
                               const OptTensor& conv_bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
                               const OptTensor& running_mean, const OptTensor& running_var, bool training,
                               double eps, bool swish, bool needs_grad) {
    auto [y, mean, var] = call_below_autograd(dw_ops<TRITON>().fwd, x, conv_weight, conv_bias, bn_weight, bn_bias,
                                              running_mean, running_var, training, eps, swish, needs_grad);
    ctx->save_for_backward({x, conv_weight, saved(conv_bias), saved(bn_weight), saved(bn_bias), mean, var});
    save_flags(ctx, training, eps, swish);
    ctx->mark_non_differentiable({mean, var});
    return {y, mean, var};
  }

  // Gradients of x, conv_weight, conv_bias, bn_weight, bn_bias; none for the running statistics and flags.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    auto [gx, gw, gcb, gbw, gbb] =
        dw_ops<TRITON>().bwd.call(like_layout(grads[0], s[0]), s[0], s[1], optional(s[2]), optional(s[3]),
                                  optional(s[4]), s[5], s[6], d["training"].toBool(), d["eps"].toDouble(),
                                  d["swish"].toBool());
    return {gx, gw, grad_if(s[2], gcb), grad_if(s[3], gbw), grad_if(s[4], gbb), {}, {}, {}, {}, {}, {}};
  }
};

template <bool TRITON>
struct BNSwishFunction : public torch::autograd::Function<BNSwishFunction<TRITON>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& bn_weight,
                               const OptTensor& bn_bias, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training, double eps, bool swish,
                               bool needs_grad) {
    auto [y, mean, var] = call_below_autograd(bn_ops<TRITON>().fwd, x, bn_weight, bn_bias, running_mean,
                                              running_var, training, eps, swish, needs_grad);
    ctx->save_for_backward({x, saved(bn_weight), saved(bn_bias), mean, var});
    save_flags(ctx, training, eps, swish);
    ctx->mark_non_differentiable({mean, var});
    return {y, mean, var};
  }

  // Gradients of x, bn_weight, bn_bias; none for the running statistics and flags.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    auto [gx, gbw, gbb] = bn_ops<TRITON>().bwd.call(like_layout(grads[0], s[0]), s[0], optional(s[1]),
                                                    optional(s[2]), s[3], s[4], d["training"].toBool(),
                                                    d["eps"].toDouble(), d["swish"].toBool());
    return {gx, grad_if(s[1], gbw), grad_if(s[2], gbb), {}, {}, {}, {}, {}, {}};
  }
};

template <bool TRITON>
Stats dw_autograd(const at::Tensor& x, const at::Tensor& conv_weight, const OptTensor& conv_bias,
                  const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                  const OptTensor& running_var, bool training, double eps, bool swish, bool needs_grad) {
  if (!records_grad(x, conv_weight, conv_bias, bn_weight, bn_bias)) {
    return call_below_autograd(dw_ops<TRITON>().fwd, x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
                               running_var, training, eps, swish, needs_grad);
  }
  const variable_list out = DWConvBNSwishFunction<TRITON>::apply(
      x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, eps, swish, needs_grad);
  return {out[0], out[1], out[2]};
}

template <bool TRITON>
Stats bn_autograd(const at::Tensor& x, const OptTensor& bn_weight, const OptTensor& bn_bias,
                  const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps,
                  bool swish, bool needs_grad) {
  if (!records_grad(x, bn_weight, bn_bias)) {
    return call_below_autograd(bn_ops<TRITON>().fwd, x, bn_weight, bn_bias, running_mean, running_var, training,
                               eps, swish, needs_grad);
  }
  const variable_list out = BNSwishFunction<TRITON>::apply(x, bn_weight, bn_bias, running_mean, running_var, training,
                                                           eps, swish, needs_grad);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace diffusion_fast

TORCH_LIBRARY_IMPL(diffusion_fast, Autograd, m) {
  m.impl("dwconv_bn_swish_fwd", &diffusion_fast::dw_autograd<false>);
  m.impl("dwconv_bn_swish_triton_fwd", &diffusion_fast::dw_autograd<true>);
  m.impl("bn_swish_fwd", &diffusion_fast::bn_autograd<false>);
  m.impl("bn_swish_triton_fwd", &diffusion_fast::bn_autograd<true>);
}
