// Autograd of attention_fwd (C++ kernels) and attention_triton_fwd (kernels/attention.py) in C++, for the
// reason and in the way of csrc/group_norm_silu/group_norm_silu_autograd.cpp. diffusion_fast/ops/attention.py
// registers the same backward from Python only when this extension did not load.
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_util.h"

namespace diffusion_fast {
namespace {

using namespace autograd_util;  // NOLINT: find_ops, OpPair, records_grad, call_below_autograd
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (q, k, v, causal, scale) -> (out, lse); lse (B, H, Sq) is not differentiable.
using FwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, double);
using BwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              bool, double);

// The fwd/bwd op pair of one backend, looked up on first use.
template <bool TRITON>
const OpPair<FwdFn, BwdFn>& ops() {
  static const auto pair =
      TRITON ? find_ops<FwdFn, BwdFn>("diffusion_fast::attention_triton_fwd", "diffusion_fast::attention_triton_bwd")
             : find_ops<FwdFn, BwdFn>("diffusion_fast::attention_fwd", "diffusion_fast::attention_bwd");
  return pair;
}

template <bool TRITON>
struct AttentionFunction : public torch::autograd::Function<AttentionFunction<TRITON>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               bool causal, double scale) {
    auto [out, lse] = call_below_autograd(ops<TRITON>().fwd, q, k, v, causal, scale);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  // Gradients of q, k, v; none for causal and scale.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    auto [gq, gk, gv] = ops<TRITON>().bwd.call(grads[0], s[0], s[1], s[2], s[3], s[4],
                                               ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble());
    return {gq, gk, gv, at::Tensor(), at::Tensor()};
  }
};

template <bool TRITON>
std::tuple<at::Tensor, at::Tensor> fwd_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                bool causal, double scale) {
  if (!records_grad(q, k, v)) {
    return call_below_autograd(ops<TRITON>().fwd, q, k, v, causal, scale);
  }
  const variable_list out = AttentionFunction<TRITON>::apply(q, k, v, causal, scale);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace diffusion_fast

TORCH_LIBRARY_IMPL(diffusion_fast, Autograd, m) {
  m.impl("attention_fwd", &diffusion_fast::fwd_autograd<false>);
  m.impl("attention_triton_fwd", &diffusion_fast::fwd_autograd<true>);
}
