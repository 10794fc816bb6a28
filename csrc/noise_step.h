// Argument checks shared by the fused noise-step ops (sampler_steps, langevin_step, dpm2015_step),
// CPU and CUDA alike: each op's check_<op> calls them with its name, which opens every message.
// The Triton launchers' counterpart is noise_launch in kernels/philox.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <cstdint>
#include <limits>

namespace diffusion_fast {
namespace noise_step {

// x: contiguous, float16, bfloat16, float32 or float64.
inline void check_x(const char* op, const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, op,
              ": x must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
}

// Tensor `name` read alongside x, element for element: x's device, dtype and shape, contiguous.
inline void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Parameter tensor `name` the kernel reads (a step size, a coefficient row): x's device, and float32
// (float64 for float64 x); its shape is the op's to check.
inline void check_param(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  const auto dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " for ", x.scalar_type(), " x, got ",
              t.scalar_type());
}

// step: the uint32 step of the noise stream.
inline void check_step(const char* op, int64_t step) {
  TORCH_CHECK(step >= 0 && step <= std::numeric_limits<uint32_t>::max(), op, ": step must be in [0, 2**32), got ",
              step);
}

// The CPU kernels' output: contiguous, x's shape and dtype, allocated directly rather than through
// the dispatcher (at::empty_like), which at one small image is a tenth of the op's fixed cost.
inline at::Tensor empty_cpu_like(const at::Tensor& x) { return at::detail::empty_cpu(x.sizes(), x.scalar_type()); }

}  // namespace noise_step
}  // namespace diffusion_fast
