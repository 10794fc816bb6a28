// Helpers shared by the C++ CPU entry points (group_norm_silu_cpu.cpp, dwconv_bn_swish_cpu.cpp): the small
// optional parameter tensors (weights, biases, per-(n, c) terms) as contiguous tensors of the accumulation
// dtype A (double for double x, else float), and their data pointers for the kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace diffusion_fast {
namespace cpu_params {

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// t as a contiguous tensor of dtype acc, itself when it already is one (no dispatch: ~0.3 us a call that
// counts on small tensors); undefined when absent.
inline at::Tensor to_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!present(t)) return at::Tensor();
  return t->scalar_type() == acc && t->is_contiguous() ? *t : t->to(acc).contiguous();
}

template <typename A>
const A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

}  // namespace cpu_params
}  // namespace diffusion_fast
