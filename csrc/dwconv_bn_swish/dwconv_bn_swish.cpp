// Argument checks shared by the CPU and CUDA kernels of dwconv_bn_swish and bn_swish.
#include "dwconv_bn_swish/dwconv_bn_swish.h"

namespace diffusion_fast {

namespace {

void check_channel_vector(const OptTensor& t, const char* name, const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device() == x.device(), "dwconv_bn_swish: ", name, " is on ", t->device(), " but x is on ",
              x.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "dwconv_bn_swish: ", name, " must be a floating tensor, got ",
              t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), "dwconv_bn_swish: ", name, " must have shape (",
              x.size(1), ",), got ", t->sizes());
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

}  // namespace

DWConvBNShape dwconv_bn_swish_shape(const at::Tensor& x, const OptTensor& conv_weight, const OptTensor& conv_bias,
                                    const OptTensor& bn_weight, const OptTensor& bn_bias,
                                    const OptTensor& running_mean, const OptTensor& running_var, bool training) {
  TORCH_CHECK(x.dim() == 4, "dwconv_bn_swish: x must have shape (N, C, H, W), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "dwconv_bn_swish: x must be float16, bfloat16, float32 or float64, got ", dtype);
  DWConvBNShape s{x.size(0), x.size(1), x.size(2), x.size(3), 1, false};
  s.channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.is_contiguous() || s.channels_last, "dwconv_bn_swish: x must be contiguous or channels-last, got "
              "strides ", x.strides());
  if (present(conv_weight)) {
    const at::Tensor& w = *conv_weight;
    TORCH_CHECK(w.device() == x.device(), "dwconv_bn_swish: conv_weight is on ", w.device(), " but x is on ",
                x.device());
    TORCH_CHECK(at::isFloatingType(w.scalar_type()), "dwconv_bn_swish: conv_weight must be a floating tensor");
    TORCH_CHECK(w.dim() == 4 && w.size(0) == s.C && w.size(1) == 1 && w.size(2) == w.size(3),
                "dwconv_bn_swish: conv_weight must have shape (C, 1, K, K), got ", w.sizes());
    s.K = w.size(2);
    TORCH_CHECK(s.K == 1 || s.K == 3 || s.K == 5, "dwconv_bn_swish: kernel size must be 1, 3 or 5, got ", s.K);
  }
  check_channel_vector(conv_bias, "conv_bias", x);
  check_channel_vector(bn_weight, "bn_weight", x);
  check_channel_vector(bn_bias, "bn_bias", x);
  check_channel_vector(running_mean, "running_mean", x);
  check_channel_vector(running_var, "running_var", x);
  TORCH_CHECK(training || (present(running_mean) && present(running_var)),
              "dwconv_bn_swish: running_mean and running_var are needed when training=False");
  return s;
}

void dwconv_bn_swish_check_bwd(const at::Tensor& grad_y, const at::Tensor& x, const DWConvBNShape& s,
                               const at::Tensor& mean, const at::Tensor& var) {
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() &&
                  grad_y.device() == x.device(),
              "dwconv_bn_swish_bwd: grad_y must match x in shape, dtype and device");
  TORCH_CHECK(s.channels_last ? grad_y.is_contiguous(at::MemoryFormat::ChannelsLast) : grad_y.is_contiguous(),
              "dwconv_bn_swish_bwd: grad_y must have the memory layout of x, got strides ", grad_y.strides(),
              " for x strides ", x.strides());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&mean, &var}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == s.C && t->scalar_type() == acc && t->device() == x.device(),
                "dwconv_bn_swish_bwd: mean and var must be (C,) ", acc, " tensors on x's device, got ",
                t->sizes(), " ", t->scalar_type());
  }
}

}  // namespace diffusion_fast
