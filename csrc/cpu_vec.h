// Pieces shared by the C++ CPU kernels (group_norm_silu_cpu.cpp, dwconv_bn_swish_cpu.cpp):
//   * element math written branch-free so that GCC vectorises the loops that call it: e^-z from a
//     polynomial fit of 2^f, swish/SiLU y = z * sigmoid(z) (Ramachandran et al. 2017; Elfwing et al.
//     2018) and its derivative;
//   * GCC vector types for hand-blocked register tiles, a cache prefetch hint and non-temporal line stores;
//   * run-time instruction-set dispatch: a stage compiled for AVX-512, AVX2+FMA and baseline x86-64,
//     picked once per process following ATen's choice (ATEN_CPU_CAPABILITY), so the build needs no -march
//     (float64 stages: baseline only).
#pragma once

#include <ATen/Version.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// GCC vector types are passed in registers only inside the flattened, target-specific stages.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace diffusion_fast {
namespace cpu_vec {

// ---------------------------------------------------------------------------
// Element math.
// ---------------------------------------------------------------------------

// 2^t for t in [-125, 125]: 2^n * p(f), n = round(t), |f| <= 1/2, p a degree-5 near-minimax fit of 2^f
// (relative error < 2.4e-7, i.e. 4 ulp; sigmoid and swish outputs are far less sensitive).
inline float exp2_approx(float t) {
  const float round = 12582912.0f;  // 1.5 * 2^23: t + round holds round(t) in its low mantissa bits
  const float k = t + round;
  const float f = t - (k - round);
  float p = 1.3278164e-3f;
  p = p * f + 9.6755559e-3f;
  p = p * f + 5.5507079e-2f;
  p = p * f + 2.4022119e-1f;
  p = p * f + 6.9314694e-1f;
  p = p * f + 1.0000001f;
  return p * c10::bit_cast<float>((c10::bit_cast<int32_t>(k) - (c10::bit_cast<int32_t>(round) - 127)) << 23);
}

// Bounds of exp2's argument in exp_neg, passed at run time: as compile-time constants, GCC splits the
// vectorised loops into clamped/unclamped paths that each pay a division. Past them sigmoid(z) is 1
// or < 5e-18 anyway; wider bounds make the selects produce denormals (microcode assists, ~10x slower).
struct ExpBounds {
  float lo = -125.0f, hi = 57.7f;  // e^-z in [2^-125, e^40]
};

// e^-z with -z * log2(e) clamped to the bounds (float); exact std::exp (double).
inline float exp_neg(float z, ExpBounds eb) { return exp2_approx(std::min(std::max(z * -1.44269504f, eb.lo), eb.hi)); }
inline double exp_neg(double z, ExpBounds) { return std::exp(-z); }

// sigmoid(z) = 1 / (1 + e^-z), with a true division. On the AMD Zen 5 hosts these kernels are timed on, a
// vector division beats a division-free reciprocal (a bit-trick guess and three Newton steps, 7 FMA-port
// operations): 1.95 against 2.96 ns per 16 lanes of swish (AVX-512), 4.1 against 6.4 ns (AVX2), and it frees
// the FMA ports that a fused conv or norm shares. Not measured on Intel cores, some of which divide slowly
// (Skylake: one 8-lane vdivps per 5 cycles); there the Newton form (in git history) may win again.
template <typename A>
inline A sigmoid(A z, ExpBounds eb) {
  return A(1) / (A(1) + exp_neg(z, eb));
}

// y = swish ? z * sigmoid(z) = z / (1 + e^-z) : z
template <bool swish, typename A>
inline A act(A z, ExpBounds eb) {
  return swish ? z / (A(1) + exp_neg(z, eb)) : z;
}

// dz = dy * act'(z) = dy * s * (1 + z * (1 - s)), s = sigmoid(z), for swish
template <bool swish, typename A>
inline A act_grad(A z, A dy, ExpBounds eb) {
  if (!swish) return dy;
  const A s = sigmoid(z, eb);
  return dy * s * (A(1) + z * (A(1) - s));
}

// Hints the cache to fetch the bytes [addr, addr + bytes); prefetches never fault, addr may be past the data.
inline void prefetch(uintptr_t addr, int64_t bytes) {
#if defined(__GNUC__)
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(reinterpret_cast<const void*>(addr + b));
#endif
}

// Writes the 64 bytes at src to the 64-byte aligned line dst around the caches (a non-temporal store: the line
// is not read first, nor kept). Streamed lines are ordered with other stores only after stream_fence().
template <typename A>
inline void stream_line(A* dst, const A* src) {
#if defined(__x86_64__)
  for (int b = 0; b < 64; b += 16) {  // SSE2 (baseline x86-64): four 16-byte stores fill the line's write buffer
    __m128i v;
    std::memcpy(&v, reinterpret_cast<const char*>(src) + b, 16);
    _mm_stream_si128(reinterpret_cast<__m128i*>(reinterpret_cast<char*>(dst) + b), v);
  }
#else
  std::memcpy(dst, src, 64);
#endif
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Makes p opaque to the optimiser at this point, so loads through it are not hoisted out of the enclosing
// loop (where too many hoisted vectors would be spilled to the stack and reloaded: worse than loading them).
template <typename P>
inline void opaque(P& p) {
#if defined(__GNUC__)
  asm volatile("" : "+r"(p));
#endif
}

// ---------------------------------------------------------------------------
// GCC vector types: N lanes of A, lowered to one zmm (AVX-512), two ymm (AVX2) or xmm registers, so that
// register blocking does not depend on the auto-vectoriser. Unaligned loads/stores go through memcpy.
// ---------------------------------------------------------------------------
template <typename A, int N>
struct VecOf {
  typedef A type __attribute__((vector_size(N * sizeof(A))));
};
template <typename A, int N>
using Vec = typename VecOf<A, N>::type;

template <int N, typename A>
inline Vec<A, N> loadu(const A* p) {
  Vec<A, N> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// N elements of another type T converted to A (a plain load when T is A).
template <int N, typename A, typename T>
inline Vec<A, N> loadu_as(const T* p) {
  if constexpr (std::is_same_v<T, A>) {
    return loadu<N>(p);
  } else {
    Vec<A, N> v;
    for (int j = 0; j < N; ++j) v[j] = A(p[j]);
    return v;
  }
}

template <int N, typename A>
inline void storeu(A* p, const Vec<A, N>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Constant-index shuffle of two Vec<A, 8> a, b (indices 0-7 pick from a, 8-15 from b).
#if defined(__clang__)
#define DF_SHUFFLE8(A, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define DF_SHUFFLE8(A, a, b, ...) \
  __builtin_shuffle(a, b, (::diffusion_fast::cpu_vec::Vec<std::conditional_t<sizeof(A) == 4, int32_t, int64_t>, 8>{__VA_ARGS__}))
#endif

// Lane r of the result = the sum of the 8 lanes of v[r], for 8 rows at once: a transposing tree of 7 adds
// and 14 shuffles, where one horizontal tree per row would cost ~3 shuffles and 3 adds per row.
template <typename A>
inline Vec<A, 8> sum_rows8(const Vec<A, 8>* v) {
  Vec<A, 8> t[4], u[2];
  for (int k = 0; k < 4; ++k)  // lane 2i: row 2k, lane 2i + 1: row 2k + 1; lanes 2i, 2i + 1 of each added
    t[k] = DF_SHUFFLE8(A, v[2 * k], v[2 * k + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           DF_SHUFFLE8(A, v[2 * k], v[2 * k + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int k = 0; k < 2; ++k)  // lanes 0-3: rows 4k..4k+3 over their lanes 0-3; lanes 4-7: over lanes 4-7
    u[k] = DF_SHUFFLE8(A, t[2 * k], t[2 * k + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           DF_SHUFFLE8(A, t[2 * k], t[2 * k + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return DF_SHUFFLE8(A, u[0], u[1], 0, 1, 2, 3, 8, 9, 10, 11) + DF_SHUFFLE8(A, u[0], u[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// ---------------------------------------------------------------------------
// Instruction-set dispatch.
// ---------------------------------------------------------------------------
enum class Isa { base, avx2, avx512 };

// Whether a stage's first argument is an Args<T, double>: float64 runs where results are checked (gradcheck,
// float64 references), never where they are timed, so its stages get the baseline copy only.
template <typename X>
struct is_float64_args : std::false_type {};
template <template <typename, typename> class S, typename T>
struct is_float64_args<S<T, double>> : std::true_type {};

#if defined(__x86_64__) && defined(__GNUC__)
inline Isa cpu_isa() {
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();  // ATen's choice, lowered by ATEN_CPU_CAPABILITY
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (cap == "AVX512" && avx512) return Isa::avx512;
    if ((cap == "AVX512" || cap == "AVX2") && avx2) return Isa::avx2;
    return Isa::base;
  }();
  return isa;
}

// name##_isa(args...) calls name(args...) compiled for the best instruction set of this CPU. `flatten`
// inlines the whole stage into each wrapper, so it is compiled for the wrapper's target.
#define DF_MULTIVERSION(name)                                                                                \
  template <typename... P>                                                                                   \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"), flatten)) void name##_avx512(        \
      const P&... p) {                                                                                       \
    name(p...);                                                                                              \
  }                                                                                                          \
  template <typename... P>                                                                                   \
  __attribute__((target("avx2,fma"), flatten)) void name##_avx2(const P&... p) {                             \
    name(p...);                                                                                              \
  }                                                                                                          \
  template <typename... P>                                                                                   \
  __attribute__((flatten)) void name##_base(const P&... p) {                                                 \
    name(p...);                                                                                              \
  }                                                                                                          \
  template <typename P0, typename... P>                                                                       \
  void name##_isa(const P0& p0, const P&... p) {                                                             \
    if constexpr (::diffusion_fast::cpu_vec::is_float64_args<P0>::value) {                                   \
      return name##_base(p0, p...);                                                                          \
    } else {                                                                                                 \
      switch (::diffusion_fast::cpu_vec::cpu_isa()) {                                                        \
        case ::diffusion_fast::cpu_vec::Isa::avx512: return name##_avx512(p0, p...);                         \
        case ::diffusion_fast::cpu_vec::Isa::avx2: return name##_avx2(p0, p...);                             \
        default: return name##_base(p0, p...);                                                               \
      }                                                                                                      \
    }                                                                                                        \
  }
#else
inline Isa cpu_isa() { return Isa::base; }

#define DF_MULTIVERSION(name)     \
  template <typename... P>        \
  void name##_isa(const P&... p) { \
    name(p...);                   \
  }
#endif

}  // namespace cpu_vec
}  // namespace diffusion_fast
