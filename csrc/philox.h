// Counter-based Gaussian noise shared by every C++ and CUDA kernel of diffusion_fast.
//
// The noise is a pure function of (seed, step, element index e); the same definition lives
// in diffusion_fast/ops/philox.py (plain PyTorch reference) and kernels/philox.py (Triton):
//
//   tile = e / 1024, k = (e % 1024) / 256, j = e % 256, c = 256 * tile + j   (64-bit)
//   (r0, r1, r2, r3) = Philox4x32-10(counter = (c_lo, c_hi, step, 0), key = (seed_lo, seed_hi))
//   u(r) = (2 * (r >> 9) + 1) * 2^-24                     exact in float32, in (0, 1)
//   z[k] = sqrt(-2 ln u(r0)) * (cos, sin)(2 pi u(r1))     for k = 0, 1
//          sqrt(-2 ln u(r2)) * (cos, sin)(2 pi u(r3))     for k = 2, 3
//
// One Philox call feeds four elements 256 apart, so a tile of 256 consecutive counters covers
// 1024 consecutive elements in four contiguous runs: loads stay contiguous on every backend.
// The uniforms agree bit for bit everywhere; the normals to float rounding (a few ulp).
// 2 pi u = (pi / 2) * (q + f) with q = round(4u) and f = 4u - q computed exactly in integers,
// so sin/cos only see |angle| <= pi / 4.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DF_HOST_DEVICE inline
#endif

namespace diffusion_fast {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;  // Random123 PHILOX_M4x32_0
constexpr uint32_t kMul1 = 0xCD9E8D57u;  // Random123 PHILOX_M4x32_1
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // key increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
constexpr int64_t kTileCounters = 256;                   // counters per noise tile
constexpr int64_t kTileElements = 4 * kTileCounters;     // elements per noise tile

DF_HOST_DEVICE void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// Philox4x32-10 (Salmon et al., SC'11), in place on the counter words (c0, c1, c2, c3).
DF_HOST_DEVICE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMul0, c0, hi0, lo0);
    mulhilo(kMul1, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
}

// The odd integer N in u = N * 2^-24.
DF_HOST_DEVICE uint32_t uniform_numerator(uint32_t r) { return ((r >> 9) << 1) | 1u; }

DF_HOST_DEVICE float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
#endif
}

DF_HOST_DEVICE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
#endif
}

// a / b and sqrt(v) for the float32 normals: on the GPU the hardware approximations (2 ulp; the IEEE
// versions cost a range check and a slow-path branch each, and the 16-bit noise kernels are bound by
// instruction issue), elsewhere IEEE. b is in [1.7, 2.5] and v > 0 wherever they are used here.
DF_HOST_DEVICE float div_approx(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}

DF_HOST_DEVICE float sqrt_approx(float v) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  return std::sqrt(v);
#endif
}

// -2 ln u for u = N * 2^-24 in float32 without libm (branch-free, so loops vectorize):
// u = m * 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m - 1) / (m + 1).
DF_HOST_DEVICE float minus_two_log(uint32_t numerator) {
  const float u = static_cast<float>(numerator) * 5.9604644775390625e-08f;  // 2^-24, exact
  const uint32_t bits = float_to_bits(u);
  const bool high = (bits & 0x007FFFFFu) > 0x3504F3u;  // mantissa above sqrt(2)
  const int32_t e = static_cast<int32_t>(bits >> 23) - 127 + (high ? 1 : 0);
  const float m = bits_to_float((bits & 0x007FFFFFu) | (high ? 0x3F000000u : 0x3F800000u));
  const float s = div_approx(m - 1.0f, m + 1.0f);  // m - 1 is exact
  const float z = s * s;
  const float atanh_s =
      s + s * z * (0.333333333f + z * (0.2f + z * (0.142857143f + z * (0.111111111f + z * 0.0909090909f))));
  const float ef = static_cast<float>(e);
  const float log_u = ef * 0.693145752f + (ef * 1.42860677e-06f + 2.0f * atanh_s);  // ln2 split hi + lo
  return -2.0f * log_u;
}

// (cos, sin)(2 pi u) for u = N * 2^-24 in float32 without libm.
DF_HOST_DEVICE void sincos_two_pi(uint32_t numerator, float& c, float& s) {
  const uint32_t q = (numerator + (1u << 21)) >> 22;  // round(4u), 0..4
  const int32_t d = static_cast<int32_t>(numerator) - static_cast<int32_t>(q << 22);
  const float a = static_cast<float>(d) * (2.384185791015625e-07f * 1.57079632679f);  // (4u - q) * pi / 2
  const float a2 = a * a;
  const float sa = a + a * a2 * (-1.66666667e-01f + a2 * (8.33333333e-03f + a2 * (-1.98412698e-04f +
                                                                                   a2 * 2.75573192e-06f)));
  const float ca = 1.0f + a2 * (-0.5f + a2 * (4.16666667e-02f + a2 * (-1.38888889e-03f +
                                                                     a2 * (2.48015873e-05f + a2 * -2.75573192e-07f))));
  const uint32_t quadrant = q & 3u;
  const float c01 = quadrant == 0u ? ca : -sa;
  const float s01 = quadrant == 0u ? sa : ca;
  const float c23 = quadrant == 2u ? -ca : sa;
  const float s23 = quadrant == 2u ? -sa : -ca;
  c = quadrant < 2u ? c01 : c23;
  s = quadrant < 2u ? s01 : s23;
}

// The same in double with libm (float64 inputs on the CPU and GPU).
DF_HOST_DEVICE double minus_two_log_f64(uint32_t numerator) {
  return -2.0 * log(static_cast<double>(numerator) * 5.9604644775390625e-08);
}

DF_HOST_DEVICE void sincos_two_pi_f64(uint32_t numerator, double& c, double& s) {
  const double angle = static_cast<double>(numerator) * (5.9604644775390625e-08 * 6.283185307179586476925);
  c = cos(angle);
  s = sin(angle);
}

// The four normals of one counter's Philox words: out0..out3 belong to elements j, j + 256,
// j + 512, j + 768 of a tile.
template <typename acc_t>
DF_HOST_DEVICE void box_muller4(uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3, acc_t& out0, acc_t& out1,
                                acc_t& out2, acc_t& out3) {
  if constexpr (sizeof(acc_t) == sizeof(float)) {
    const float rad0 = sqrt_approx(minus_two_log(uniform_numerator(r0)));
    const float rad1 = sqrt_approx(minus_two_log(uniform_numerator(r2)));
    float c0, s0, c1, s1;
    sincos_two_pi(uniform_numerator(r1), c0, s0);
    sincos_two_pi(uniform_numerator(r3), c1, s1);
    out0 = rad0 * c0;
    out1 = rad0 * s0;
    out2 = rad1 * c1;
    out3 = rad1 * s1;
  } else {
    const double rad0 = sqrt(minus_two_log_f64(uniform_numerator(r0)));
    const double rad1 = sqrt(minus_two_log_f64(uniform_numerator(r2)));
    double c0, s0, c1, s1;
    sincos_two_pi_f64(uniform_numerator(r1), c0, s0);
    sincos_two_pi_f64(uniform_numerator(r3), c1, s1);
    out0 = rad0 * c0;
    out1 = rad0 * s0;
    out2 = rad1 * c1;
    out3 = rad1 * s1;
  }
}

// The four normals of counter c = (counter_hi << 32) + counter_lo.
template <typename acc_t>
DF_HOST_DEVICE void normals4(uint32_t counter_lo, uint32_t counter_hi, uint32_t step, uint32_t key_lo,
                             uint32_t key_hi, acc_t& out0, acc_t& out1, acc_t& out2, acc_t& out3) {
  uint32_t r0 = counter_lo, r1 = counter_hi, r2 = step, r3 = 0u;
  philox4x32_10(r0, r1, r2, r3, key_lo, key_hi);
  box_muller4(r0, r1, r2, r3, out0, out1, out2, out3);
}

}  // namespace philox
}  // namespace diffusion_fast
