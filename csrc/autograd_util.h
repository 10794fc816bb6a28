// Helpers of the ops' autograd in C++ (csrc/<op>/<op>_autograd.cpp): a torch::autograd::Function per
// fwd op, registered at the Autograd key, that calls the op's fwd and bwd schemas below autograd through
// the dispatcher, so their CPU, CUDA, Triton and fake kernels stay the ones registered for the schemas.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

namespace diffusion_fast {
namespace autograd_util {

// The op "diffusion_fast::<name>", typed; call it on first use (the schemas are defined from Python).
template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// The fwd/bwd op pair of one backend.
template <typename Fwd, typename Bwd>
struct OpPair {
  c10::TypedOperatorHandle<Fwd> fwd;
  c10::TypedOperatorHandle<Bwd> bwd;
};

template <typename Fwd, typename Bwd>
OpPair<Fwd, Bwd> find_ops(const char* fwd, const char* bwd) {
  return {find_op<Fwd>(fwd), find_op<Bwd>(bwd)};
}

// t in x's memory layout, as the _bwd ops take grad_y: C innermost (channels-last) or NC*-contiguous.
inline at::Tensor like_layout(const at::Tensor& t, const at::Tensor& x) {
  const bool c_innermost = x.dim() >= 3 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
  return c_innermost ? t.movedim(1, -1).contiguous().movedim(-1, 1) : t.contiguous();
}

// Optional inputs are saved as undefined tensors when absent.
inline at::Tensor saved(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }
inline std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Whether autograd records a call on these tensor inputs: grad mode on and one of them requiring grad.
// When not (inference), the Autograd kernels call the fwd op below autograd directly: no graph node,
// saved tensors or saved_data map to build (~1 us of a ~5 us call on small tensors).
inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && requires_grad(*t); }
template <typename... Ts>
bool records_grad(const Ts&... inputs) {
  return at::GradMode::is_enabled() && (requires_grad(inputs) || ...);
}

// op(args...) called below autograd (the fwd op from its Autograd kernel: in Function::forward, and directly for
// inference calls).
template <typename Fn, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Fn>& op, const Args&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(args...);
}

// The gradient of an optional input: none when it was absent (the _bwd ops return an empty tensor then).
inline at::Tensor grad_if(const at::Tensor& input, const at::Tensor& grad) { return input.defined() ? grad : at::Tensor(); }

}  // namespace autograd_util
}  // namespace diffusion_fast
