// Entry points of the CPU dwconv_bn_swish and bn_swish ops: checks, outputs and dtype dispatch. The kernels
// are in dwconv_bn_swish_cpu_kernels.h, instantiated per entry point and dtype in instances/.
#include "dwconv_bn_swish/dwconv_bn_swish_cpu_kernels.h"
#include "cpu_params.h"

#include <ATen/Dispatch.h>

#include <cmath>
#include <tuple>
#include <type_traits>

namespace diffusion_fast {
namespace {

using dwconv_cpu::Args;
using dwconv_cpu::make_geo;
using cpu_vec::ExpBounds;
using cpu_params::acc_type;
using cpu_params::present;
using cpu_params::ptr_or_null;
using cpu_params::to_acc;

template <typename A>
A* mut_or_null(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<A>() : nullptr;
}

Fwd fwd_impl(const at::Tensor& x, const OptTensor& conv_weight, const OptTensor& conv_bias,
             const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
             const OptTensor& running_var, bool training, double eps, bool swish, bool needs_grad) {
  const auto s = dwconv_bn_swish_shape(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                                       training);
  const auto acc = acc_type(x);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = training ? at::empty({s.C}, x.options().dtype(acc)) : running_mean->to(acc, false, true);
  at::Tensor var = training ? at::empty({s.C}, x.options().dtype(acc)) : running_var->to(acc, false, true);
  if (x.numel() == 0) return {y, training ? mean.fill_(NAN) : mean, training ? var.fill_(NAN) : var};
  const at::Tensor w = to_acc(conv_weight, acc);
  const at::Tensor cb = to_acc(conv_bias, acc), gamma = to_acc(bn_weight, acc), beta = to_acc(bn_bias, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_swish_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const Args<scalar_t, A> a{make_geo(s, sizeof(scalar_t)), training, swish, eps, ExpBounds{}, x.const_data_ptr<scalar_t>(),
                              nullptr, y.mutable_data_ptr<scalar_t>(), ptr_or_null<A>(w), ptr_or_null<A>(cb),
                              ptr_or_null<A>(gamma), ptr_or_null<A>(beta), mean.mutable_data_ptr<A>(),
                              var.mutable_data_ptr<A>(), nullptr, nullptr, nullptr, nullptr,
                              /*z_in_y=*/training && !needs_grad && std::is_same_v<scalar_t, A> && w.defined()};
    dwconv_cpu::forward<scalar_t>(a);
  });
  return {y, mean, var};
}

// grad_x and the (C * K * K,), (C,) x 3 grads in the accumulation dtype (undefined when not wanted).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& conv_weight, const OptTensor& conv_bias,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const at::Tensor& mean, const at::Tensor& var,
    bool training, double eps, bool swish) {
  const auto s = dwconv_bn_swish_shape(x, conv_weight, conv_bias, bn_weight, bn_bias, OptTensor(), OptTensor(),
                                       /*training=*/true);
  dwconv_bn_swish_check_bwd(grad_y, x, s, mean, var);
  const auto acc = acc_type(x);
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor grad_x = at::empty_like(x);
  const bool conv = present(conv_weight);
  at::Tensor g_w = conv ? at::zeros({s.C * s.K * s.K}, acc_opts) : at::Tensor();
  at::Tensor g_cb = conv ? at::zeros({s.C}, acc_opts) : at::Tensor();
  at::Tensor g_gamma = at::zeros({s.C}, acc_opts), g_beta = at::zeros({s.C}, acc_opts);
  if (x.numel() == 0) return {grad_x, g_w, g_cb, g_gamma, g_beta};
  const at::Tensor w = conv ? conv_weight->to(acc).contiguous() : at::Tensor();
  const at::Tensor cb = to_acc(conv_bias, acc), gamma = to_acc(bn_weight, acc), beta = to_acc(bn_bias, acc);
  const at::Tensor mean_c = mean.contiguous(), var_c = var.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_swish_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    // mean/var are only read; Args shares one struct with the forward, which writes them.
    const Args<scalar_t, A> a{make_geo(s, sizeof(scalar_t)), training, swish, eps, ExpBounds{}, x.const_data_ptr<scalar_t>(),
                              grad_y.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
                              ptr_or_null<A>(w), ptr_or_null<A>(cb), ptr_or_null<A>(gamma), ptr_or_null<A>(beta),
                              const_cast<A*>(mean_c.const_data_ptr<A>()), const_cast<A*>(var_c.const_data_ptr<A>()),
                              mut_or_null<A>(g_w), mut_or_null<A>(g_cb), g_gamma.mutable_data_ptr<A>(),
                              g_beta.mutable_data_ptr<A>()};
    dwconv_cpu::backward<scalar_t>(a);
  });
  return {grad_x, g_w, g_cb, g_gamma, g_beta};
}

// A gradient in its input's dtype and shape, or an empty (0,) tensor when the input is absent.
at::Tensor grad_as(const OptTensor& t, const at::Tensor& g, const at::Tensor& x) {
  return present(t) ? g.reshape(t->sizes()).to(t->scalar_type(), false, /*copy=*/true, at::MemoryFormat::Contiguous)
                     : at::empty({0}, x.options());
}

}  // namespace

Fwd dwconv_bn_swish_fwd_cpu(const at::Tensor& x, const at::Tensor& conv_weight, const OptTensor& conv_bias,
                            const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                            const OptTensor& running_var, bool training, double eps, bool swish,
                            bool needs_grad) {
  return fwd_impl(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, eps, swish,
                  needs_grad);
}

DWBwd dwconv_bn_swish_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& conv_weight,
                              const OptTensor& conv_bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
                              const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool swish) {
  auto [gx, gw, gcb, gg, gb] = bwd_impl(grad_y, x, conv_weight, conv_bias, bn_weight, bn_bias, mean, var, training,
                                        eps, swish);
  return {gx, grad_as(conv_weight, gw, x), grad_as(conv_bias, gcb, x), grad_as(bn_weight, gg, x),
          grad_as(bn_bias, gb, x)};
}

Fwd bn_swish_fwd_cpu(const at::Tensor& x, const OptTensor& bn_weight, const OptTensor& bn_bias,
                     const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps,
                     bool swish, bool needs_grad) {
  return fwd_impl(x, OptTensor(), OptTensor(), bn_weight, bn_bias, running_mean, running_var, training, eps, swish,
                  needs_grad);
}

BNBwd bn_swish_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& bn_weight,
                       const OptTensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, bool training,
                       double eps, bool swish) {
  auto [gx, gw, gcb, gg, gb] = bwd_impl(grad_y, x, OptTensor(), OptTensor(), bn_weight, bn_bias, mean, var, training,
                                        eps, swish);
  return {gx, grad_as(bn_weight, gg, x), grad_as(bn_bias, gb, x)};
}

}  // namespace diffusion_fast
