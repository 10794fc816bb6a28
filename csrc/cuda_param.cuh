// Small per-channel tensors ((C,) or (N, C), contiguous) of any kernel float dtype, passed to CUDA kernels as a
// pointer and a dtype tag and converted on load, so that a bf16 model's weights need no fp32 copy (one ATen cast
// kernel each) before every call. Used by group_norm_silu and dwconv_bn_swish.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

namespace diffusion_fast {
namespace cuda_param {

enum Kind : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// An optional input, read as A; null when absent.
struct Param {
  const void* ptr;
  int kind;

  template <typename A>
  __device__ __forceinline__ A get(int64_t i, A absent) const {
    if (ptr == nullptr) return absent;
    switch (kind) {
      case kF64: return static_cast<A>(static_cast<const double*>(ptr)[i]);
      case kF16: return static_cast<A>(static_cast<float>(static_cast<const at::Half*>(ptr)[i]));
      case kBF16: return static_cast<A>(static_cast<float>(static_cast<const at::BFloat16*>(ptr)[i]));
      default: return static_cast<A>(static_cast<const float*>(ptr)[i]);
    }
  }

  // out[t] = element first + t for t < N (ptr not null), one dtype switch for all N loads.
  template <int N, typename A>
  __device__ __forceinline__ void get_n(int64_t first, A (&out)[N]) const {
    switch (kind) {
      case kF64: return load_n<N>(static_cast<const double*>(ptr) + first, out);
      case kF16: return load_n<N>(static_cast<const at::Half*>(ptr) + first, out);
      case kBF16: return load_n<N>(static_cast<const at::BFloat16*>(ptr) + first, out);
      default: return load_n<N>(static_cast<const float*>(ptr) + first, out);
    }
  }

 private:
  template <int N, typename S, typename A>
  static __device__ __forceinline__ void load_n(const S* p, A (&out)[N]) {
#pragma unroll
    for (int t = 0; t < N; ++t) {
      if constexpr (std::is_floating_point_v<S>) {
        out[t] = static_cast<A>(p[t]);  // float64 stays exact for float64 kernels
      } else {
        out[t] = static_cast<A>(static_cast<float>(p[t]));  // 16-bit: through float
      }
    }
  }
};

// A gradient output; writes are dropped when null.
struct OutParam {
  void* ptr;
  int kind;

  template <typename A>
  __device__ __forceinline__ void set(int64_t i, A v) const {
    if (ptr == nullptr) return;
    switch (kind) {
      case kF64: static_cast<double*>(ptr)[i] = static_cast<double>(v); break;
      case kF16: static_cast<at::Half*>(ptr)[i] = static_cast<at::Half>(static_cast<float>(v)); break;
      case kBF16: static_cast<at::BFloat16*>(ptr)[i] = static_cast<at::BFloat16>(static_cast<float>(v)); break;
      default: static_cast<float*>(ptr)[i] = static_cast<float>(v); break;
    }
  }
};

inline bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline int kind_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return kF32;
  }
}

// An optional input as the kernels read it: contiguous, and a float32 copy of other dtypes (e.g. float8).
inline at::Tensor as_input(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return kernel_dtype(t->scalar_type()) ? t->contiguous() : t->to(at::kFloat).contiguous();
}

inline Param param_of(const at::Tensor& t) {
  return t.defined() ? Param{t.const_data_ptr(), kind_of(t.scalar_type())} : Param{nullptr, kF32};
}

inline OutParam out_of(const at::Tensor& t) {
  return t.defined() ? OutParam{t.data_ptr(), kind_of(t.scalar_type())} : OutParam{nullptr, kF32};
}

}  // namespace cuda_param
}  // namespace diffusion_fast
