// Philox4x32-10 of one noise tile (csrc/philox.h) for CPU kernels, 8 or 16 counters at a time
// with AVX2 / AVX-512 where the CPU has them (picked once at run time), else the portable
// loop. Compilers vectorize the portable loop poorly: they widen each 32x32->64-bit product
// with cross-lane shuffles, where the even/odd-lane _mm*_mul_epu32 form below needs none.
// The 32-bit halves of the products are regrouped with (masked) shuffles rather than shifts, which
// would compete with the multiplies for the same execution port (one per round trip on AVX-512).
// Every path gives the same bits (tests compare them with the Python reference).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "philox.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#include <immintrin.h>
#define DF_PHILOX_X86 1
#endif

namespace diffusion_fast {
namespace philox {

// r[k * 256 + j] = word k of Philox4x32-10(counter = (lo + j, hi, step, 0), key = (k0, k1)),
// j < 256; lo must be a multiple of 256 (lo + j never carries).
using TileFn = void (*)(uint32_t lo, uint32_t hi, uint32_t step, uint32_t k0, uint32_t k1, uint32_t* r);

inline void philox_tile_portable(uint32_t lo, uint32_t hi, uint32_t step, uint32_t k0, uint32_t k1, uint32_t* r) {
  for (uint32_t j = 0; j < kTileCounters; ++j) {
    uint32_t c0 = lo + j, c1 = hi, c2 = step, c3 = 0u;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    r[j] = c0;
    r[j + kTileCounters] = c1;
    r[j + 2 * kTileCounters] = c2;
    r[j + 3 * kTileCounters] = c3;
  }
}

#ifdef DF_PHILOX_X86
// (hi, lo) of a * m in every 32-bit lane: products of the even lanes, then of the odd ones.
__attribute__((target("avx2"))) inline void mulhilo_avx2(__m256i a, __m256i m, __m256i& h, __m256i& l) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // lanes 0, 2, 4, 6 as 64-bit
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  h = _mm256_blend_epi32(_mm256_shuffle_epi32(even, 0xF5), odd, 0xAA);  // high words: shuffles, not shifts,
  l = _mm256_blend_epi32(even, _mm256_shuffle_epi32(odd, 0xA0), 0xAA);  // spare the multiplier's ports
}

// GCC 12 flags the _mm512_undefined_epi32() inside its own srli/mul intrinsics as uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
__attribute__((target("avx512f"))) inline void mulhilo_avx512(__m512i a, __m512i m, __m512i& h, __m512i& l) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  h = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);  // even lanes: high words of `even`
  l = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);  // odd lanes: low words of `odd`
}

__attribute__((target("avx2"))) inline void philox_tile_avx2(uint32_t lo, uint32_t hi, uint32_t step, uint32_t k0,
                                                             uint32_t k1, uint32_t* r) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kMul0)), m1 = _mm256_set1_epi32(static_cast<int>(kMul1));
  for (uint32_t j = 0; j < kTileCounters; j += 8) {
    __m256i c0 = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(lo + j)));
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(hi)), c2 = _mm256_set1_epi32(static_cast<int>(step));
    __m256i c3 = _mm256_setzero_si256();
    uint32_t a = k0, b = k1;
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_avx2(c0, m0, hi0, lo0);
      mulhilo_avx2(c2, m1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(a)));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(b)));
      c3 = lo0;
      a += kWeyl0;
      b += kWeyl1;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r + j), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r + j + kTileCounters), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r + j + 2 * kTileCounters), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r + j + 3 * kTileCounters), c3);
  }
}

__attribute__((target("avx512f"))) inline void philox_tile_avx512(uint32_t lo, uint32_t hi, uint32_t step,
                                                                  uint32_t k0, uint32_t k1, uint32_t* r) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kMul0)), m1 = _mm512_set1_epi32(static_cast<int>(kMul1));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (uint32_t j = 0; j < kTileCounters; j += 16) {
    __m512i c0 = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(lo + j)));
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(hi)), c2 = _mm512_set1_epi32(static_cast<int>(step));
    __m512i c3 = _mm512_setzero_si512();
    uint32_t a = k0, b = k1;
    for (int round = 0; round < 10; ++round) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo_avx512(c0, m0, hi0, lo0);
      mulhilo_avx512(c2, m1, hi1, lo1);
      c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(a)), 0x96);  // three-way xor
      c1 = lo1;
      c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(b)), 0x96);
      c3 = lo0;
      a += kWeyl0;
      b += kWeyl1;
    }
    _mm512_storeu_si512(r + j, c0);
    _mm512_storeu_si512(r + j + kTileCounters, c1);
    _mm512_storeu_si512(r + j + 2 * kTileCounters, c2);
    _mm512_storeu_si512(r + j + 3 * kTileCounters, c3);
  }
}
#pragma GCC diagnostic pop
#endif

// The fastest path this CPU runs, chosen on first use; DIFFUSION_FAST_CPU_PHILOX=portable, avx2
// or avx512 forces one (tests use it to compare every path with the reference).
inline TileFn philox_tile_fn() {
#ifdef DF_PHILOX_X86
  static const TileFn fn = [] {
    const char* env = std::getenv("DIFFUSION_FAST_CPU_PHILOX");
    const std::string want = env == nullptr ? "" : env;
    const bool avx512 = __builtin_cpu_supports("avx512f") && (want.empty() || want == "avx512");
    const bool avx2 = __builtin_cpu_supports("avx2") && (want.empty() || want == "avx2");
    return avx512 ? philox_tile_avx512 : avx2 ? philox_tile_avx2 : philox_tile_portable;
  }();
  return fn;
#else
  return philox_tile_portable;
#endif
}

}  // namespace philox
}  // namespace diffusion_fast
