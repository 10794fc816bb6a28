// Argument checks and layout shared by the CPU and CUDA kernels of group_norm_silu.
#include "group_norm_silu/group_norm_silu.h"

namespace diffusion_fast {

namespace {

void check_optional(const OptTensor& t, const char* name, const at::Tensor& x, at::IntArrayRef shape) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device() == x.device(), "group_norm_silu: ", name, " is on ", t->device(), " but x is on ",
              x.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "group_norm_silu: ", name,
              " must be a floating tensor, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, "group_norm_silu: ", name, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), "group_norm_silu: ", name, " must be contiguous");
}

}  // namespace

GroupNormSiLUShape group_norm_silu_shape(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                         const OptTensor& pre_bias, const OptTensor& scale,
                                         const OptTensor& shift, int64_t num_groups) {
  TORCH_CHECK(x.dim() >= 2, "group_norm_silu: x must have shape (N, C, *), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "group_norm_silu: x must be float16, bfloat16, float32 or float64, got ", dtype);
  GroupNormSiLUShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.G = num_groups;
  TORCH_CHECK(num_groups > 0 && s.C % num_groups == 0, "group_norm_silu: num_groups (", num_groups,
              ") must be positive and divide the channels of x (", s.C, ")");
  s.S = s.N * s.C == 0 ? 0 : x.numel() / (s.N * s.C);
  s.channels_last = x.dim() >= 3 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
  TORCH_CHECK(x.is_contiguous() || s.channels_last,
              "group_norm_silu: x must be contiguous or channels-last, got strides ", x.strides());
  s.stride_c = s.channels_last ? 1 : s.S;
  s.stride_s = s.channels_last ? s.C : 1;
  check_optional(weight, "weight", x, {s.C});
  check_optional(bias, "bias", x, {s.C});
  check_optional(pre_bias, "pre_bias", x, {s.N, s.C});
  check_optional(scale, "scale", x, {s.N, s.C});
  check_optional(shift, "shift", x, {s.N, s.C});
  return s;
}

}  // namespace diffusion_fast
