// Autograd of attention_triton_fwd (the op has Triton kernels only: kernels/attention.py) in C++, for the
// reason and in the way of csrc/group_norm_silu/group_norm_silu_autograd.cpp. diffusion_fast/ops/attention.py
// registers the same backward from Python only when this extension did not load.
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_util.h"

namespace diffusion_fast {
namespace {

using namespace autograd_util;  // NOLINT: find_op
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (q, k, v, causal, scale) -> (out, lse); lse (B, H, Sq) float32 is not differentiable.
using FwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, double);
using BwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              bool, double);

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               bool causal, double scale) {
    static const auto fwd = find_op<FwdFn>("diffusion_fast::attention_triton_fwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = fwd.call(q, k, v, causal, scale);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  // Gradients of q, k, v; none for causal and scale.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = find_op<BwdFn>("diffusion_fast::attention_triton_bwd");
    const variable_list s = ctx->get_saved_variables();
    auto [gq, gk, gv] = bwd.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["causal"].toBool(),
                                 ctx->saved_data["scale"].toDouble());
    return {gq, gk, gv, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> fwd_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                bool causal, double scale) {
  const variable_list out = AttentionFunction::apply(q, k, v, causal, scale);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace diffusion_fast

TORCH_LIBRARY_IMPL(diffusion_fast, Autograd, m) { m.impl("attention_triton_fwd", &diffusion_fast::fwd_autograd); }
