// Autograd of group_norm_silu_fwd and of its Triton twin group_norm_silu_triton_fwd, in C++: the graph
// node, its saved tensors and the call of the matching _bwd op run without Python. Registered from Python
// instead (torch.library.register_autograd), the wrapper cost ~25 us per forward and ~75 us per backward
// on the 2-core CPU machine: more than the kernels at 8x128x8x8, and on a GPU it would leave the device
// idle between kernels. diffusion_fast/ops/group_norm_silu.py registers the Python version only when
// this extension did not load. Both ops are called through the dispatcher below autograd, so their CPU,
// CUDA and fake (torch.compile) kernels are the ones the schemas already have.
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_util.h"
#include "group_norm_silu/group_norm_silu.h"

namespace diffusion_fast {
namespace {

using namespace autograd_util;  // NOLINT: find_ops, like_layout, saved, optional, grad_if, records_grad, ...
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&, const OptTensor&,
                                                             const OptTensor&, const OptTensor&, const OptTensor&,
                                                             int64_t, double, bool);
using BwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const at::Tensor&, const at::Tensor&, int64_t, bool);

// The fwd/bwd op pair of one backend, looked up on first use.
template <bool TRITON>
const OpPair<FwdFn, BwdFn>& ops() {
  static const auto pair = TRITON ? find_ops<FwdFn, BwdFn>("diffusion_fast::group_norm_silu_triton_fwd",
                                                           "diffusion_fast::group_norm_silu_triton_bwd")
                                  : find_ops<FwdFn, BwdFn>("diffusion_fast::group_norm_silu_fwd",
                                                           "diffusion_fast::group_norm_silu_bwd");
  return pair;
}

template <bool TRITON>
struct GroupNormSiLUFunction : public torch::autograd::Function<GroupNormSiLUFunction<TRITON>> {
  // -> (y, mean, rstd); mean and rstd (N, G) are not differentiable.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& pre_bias, const OptTensor& scale,
                               const OptTensor& shift, int64_t num_groups, double eps, bool silu) {
    auto [y, mean, rstd] =
        call_below_autograd(ops<TRITON>().fwd, x, weight, bias, pre_bias, scale, shift, num_groups, eps, silu);
    ctx->save_for_backward({x, saved(weight), saved(bias), saved(pre_bias), saved(scale), saved(shift), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["silu"] = silu;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  // One gradient per forward input: x, the five optional tensors (undefined where absent), then none for
  // num_groups, eps and silu.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor& x = s[0];
    auto [gx, gw, gb, gpb, gsc, gsh] = ops<TRITON>().bwd.call(
        like_layout(grads[0], x), x, optional(s[1]), optional(s[2]), optional(s[3]), optional(s[4]), optional(s[5]),
        s[6], s[7],
        ctx->saved_data["num_groups"].toInt(), ctx->saved_data["silu"].toBool());
    return {gx, grad_if(s[1], gw), grad_if(s[2], gb), grad_if(s[3], gpb), grad_if(s[4], gsc), grad_if(s[5], gsh),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

template <bool TRITON>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_autograd(const at::Tensor& x, const OptTensor& weight,
                                                            const OptTensor& bias, const OptTensor& pre_bias,
                                                            const OptTensor& scale, const OptTensor& shift,
                                                            int64_t num_groups, double eps, bool silu) {
  if (!records_grad(x, weight, bias, pre_bias, scale, shift)) {
    return call_below_autograd(ops<TRITON>().fwd, x, weight, bias, pre_bias, scale, shift, num_groups, eps, silu);
  }
  const variable_list out =
      GroupNormSiLUFunction<TRITON>::apply(x, weight, bias, pre_bias, scale, shift, num_groups, eps, silu);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace diffusion_fast

TORCH_LIBRARY_IMPL(diffusion_fast, Autograd, m) {
  m.impl("group_norm_silu_fwd", &diffusion_fast::fwd_autograd<false>);
  m.impl("group_norm_silu_triton_fwd", &diffusion_fast::fwd_autograd<true>);
}
