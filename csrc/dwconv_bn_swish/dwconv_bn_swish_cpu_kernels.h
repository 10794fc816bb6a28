// CPU kernels of dwconv_bn_swish and bn_swish (math, dtypes and layouts: dwconv_bn_swish.h).
// forward<T> and backward<T> below run one call on x of dtype T after the entry points' checks
// (dwconv_bn_swish_cpu.cpp); each entry point and dtype is instantiated in its own file (instances/, see the
// end of this file) so that the build compiles them in parallel (in one file: 7.5 min, the build's longest step
// by far).
//
// Forward, eval: BatchNorm is folded into the conv, y = swish(conv(x, sc * w) + sc * cb + sh) with
// sc = gamma * rstd, sh = beta - mean * sc from the running statistics: one pass, x read once, y written once.
// NCHW training forward and the backward: a task owns whole channels over the batch, so a channel's batch
// statistics never leave its thread and its data stays in cache between passes.
//   NCHW: per (n, c) plane, x is copied into a zero-bordered fp32 plane of H + 2R rows of
//     Wp = ceil(W / VW) * VW + 2R, so that the k x k conv runs without bounds checks, VW outputs of RB rows
//     at a time in registers (VW = 8 or 16, RB = 4: each padded row is loaded once per RB output rows);
//     fp32 planes 8 wide (NVAE's 8 x 8 scale) put two rows in one 16-lane vector instead (conv_plane_w8).
//     Eval tasks are planes in memory order instead; training forward tasks own a block of channels
//     (fwd_block) for every sample, backward tasks one channel.
//   channels-last forward: a task is a band of output rows of one sample with all its channels, so x is
//     read and y written in memory order; input rows enter a ring of K rows laid out block-major
//     [64-byte channel block][W + 2R][lanes] (see cl_fwd_units), the conv is one lane-wise FMA per tap.
//     Training runs it twice: conv -> per-unit sums of z - shift and its square (shift: the unit's first row
//     mean), as (mean, M2) merged over bands and samples (Chan et al.),
//     then conv with BatchNorm folded -> swish.
//   channels-last backward: a task owns the LN = 64 / sizeof(T) channels of one 64-byte line of x, held as
//     the LN lanes of one vector per position (padded [H + 2R][W + 2R][LN] copies, no transposes).
//   forward, training NCHW  pass 1: conv each plane, its mean and M2 (two passes over the plane in L1),
//                      merged over n with Chan's formula (double); pass 2: conv again (or read the
//                      task's conv output back from a scratch buffer when N*H*W*4 <= 1 MiB),
//                      y = swish(sc * z + sh).
//   backward           zhat = (z - mean) * rstd, dzn = dy * swish'(zn); training: pass A sums
//                      A = sum dzn, B = sum dzn * zhat (z and dzn kept in scratch when 2*N*H*W*CB*4 <=
//                      1 MiB, else rebuilt in pass B); pass B: dz = p * dzn + q * zhat + r with
//                      p = gamma * rstd, q = -p * B / M, r = -p * A / M (eval: q = r = 0 and A, B are
//                      summed in this one pass) into a zero-bordered plane, grad_x = conv(dz, flipped
//                      weight), grad_w[i][j] = sum dz * x[h+i-R][w+j-R], grad_conv_bias = sum dz,
//                      grad_bn_weight = B, grad_bn_bias = A.
// Memory traffic (activation-sized reads R and writes W): eval fwd 1R + 1W; training fwd NCHW 1R + 1W while
// a task's channels fit the scratch (its second pass reads cache), else 2R + 1W; training fwd channels-last
// 2R + 1W; training bwd 2R + 1W (x, dy; dx), else 4R + 1W; eval bwd 2R + 1W. Eager PyTorch: fwd 4R + 3W,
// bwd 8R + 3W.
// bn_swish is the same code with K = 1, weight 1 and no bias (z = x exactly).
// The conv and weight-grad register blocks use GCC vector types; the element loops are plain C++ that GCC
// vectorises. All are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at run time (cpu_vec.h,
// shared with group_norm_silu_cpu.cpp).
#pragma once

#include "dwconv_bn_swish/dwconv_bn_swish.h"

#include "cpu_vec.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace diffusion_fast {
namespace dwconv_cpu {

using cpu_vec::act;
using cpu_vec::act_grad;
using cpu_vec::ExpBounds;
using cpu_vec::loadu;
using cpu_vec::opaque;
using cpu_vec::prefetch;
using cpu_vec::storeu;
using cpu_vec::stream_fence;
using cpu_vec::stream_line;
using cpu_vec::Vec;

constexpr int kLanes = 16;                 // independent accumulators per sum (vectorisable without fast-math)
constexpr int kMaxCB = 32;                 // channels per task, at most (channels-last: one 64-byte line)
constexpr int64_t kMaxScratch = 1 << 18;   // fp32 elements of per-task scratch kept across passes (1 MiB)

template <typename A>
inline A lane_sum(const A* l) {
  A s = A(0);
  for (int j = 0; j < kLanes; ++j) s += l[j];
  return s;
}

// ---------------------------------------------------------------------------
// Geometry.
// ---------------------------------------------------------------------------
struct Geo {
  int64_t N, C, H, W, K, R;
  int64_t HW;
  int VW;          // outputs per register block: 8 or 16
  int64_t nb, Wp;  // blocks per row; padded row length nb * VW + 2R
  int64_t PS;      // padded plane size (H + 2R) * Wp
  bool cl;
  int64_t CB;      // channels per task: 1 (NCHW), or the lanes of a 64-byte line of x (channels-last)
  int64_t Wq, PQ;  // channels-last: padded row length W + 2R and padded plane size (H + 2R) * Wq, in positions

  int64_t plane(int64_t n, int64_t c) const { return cl ? n * HW * C + c : (n * C + c) * HW; }
  int64_t tasks() const { return (C + CB - 1) / CB; }
};

inline Geo make_geo(const DWConvBNShape& s, int64_t elem_size) {
  Geo g{};
  g.N = s.N, g.C = s.C, g.H = s.H, g.W = s.W, g.K = s.K, g.R = s.K / 2;
  g.HW = s.H * s.W;
  g.VW = s.W <= 8 ? 8 : 16;
  g.nb = (s.W + g.VW - 1) / g.VW;
  g.Wp = g.nb * g.VW + 2 * g.R;
  g.PS = (s.H + 2 * g.R) * g.Wp;
  g.cl = s.channels_last;
  g.CB = g.cl ? std::min<int64_t>(kMaxCB, 64 / elem_size) : 1;
  g.Wq = s.W + 2 * g.R;
  g.PQ = (s.H + 2 * g.R) * g.Wq;
  return g;
}

// ---------------------------------------------------------------------------
// NCHW planes: a task owns one channel; its plane of sample n is H x W contiguous elements.
// ---------------------------------------------------------------------------
// Into the interior of a zero-bordered padded plane (the border is never written).
template <typename T, typename A>
void load_padded(const T* src, const Geo& g, A* pad) {
  for (int64_t h = 0; h < g.H; ++h) {
    A* d = pad + (h + g.R) * g.Wp + g.R;
    for (int64_t w = 0; w < g.W; ++w) d[w] = A(src[h * g.W + w]);
  }
}

template <typename I, typename O>
void copy_plane(int64_t n, const I* __restrict src, O* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = O(src[i]);
}

// out[h * W + w] = bias + sum_{i,j} wv[i * K + j] * pad[(h + i) * Wp + w + j] for the RB rows h0 .. h0 + RB - 1:
// each of their K + RB - 1 padded input rows is loaded once per tap column j (K shifted vectors) for all RB
// accumulators. Register budget (32 vector registers): the j loop stays rolled so that only column j's K
// weights are live beside the 2 * RB accumulators; with all K * K weights live GCC ran out of registers and
// folded a (cache-line-splitting) load of the input into every FMA. Two partial sums per row (even / odd
// weight row i) give 2 * RB = 8 independent FMA chains: an FMA takes 4 cycles and two issue per cycle.
template <int K, int VW, int RB, typename A>
inline void conv_rows(const Geo& g, const A* pad, const Vec<A, VW>* wv, A bias, int64_t h0, A* out) {
  using V = Vec<A, VW>;
  for (int64_t b = 0; b < g.nb; ++b) {
    V acc[RB][2];
#pragma GCC unroll 8
    for (int o = 0; o < RB; ++o) acc[o][0] = V{} + bias, acc[o][1] = V{};
    const A* col = pad + h0 * g.Wp + b * VW;
#pragma GCC unroll 1
    for (int j = 0; j < K; ++j) {
      V wj[K];
#pragma GCC unroll 5
      for (int i = 0; i < K; ++i) wj[i] = wv[i * K + j];
#pragma GCC unroll 8
      for (int r = 0; r < K + RB - 1; ++r) {
        const V v = loadu<VW>(col + r * g.Wp + j);
#pragma GCC unroll 8
        for (int o = 0; o < RB; ++o)
          if (r - o >= 0 && r - o < K) acc[o][(r - o) & 1] += wj[r - o] * v;
      }
    }
    const int64_t n = std::min<int64_t>(VW, g.W - b * VW);
    for (int o = 0; o < RB; ++o) {
      const V sum = acc[o][0] + acc[o][1];
      A* dst = out + (h0 + o) * g.W + b * VW;
      if (n == VW)
        storeu<VW>(dst, sum);
      else
        std::memcpy(dst, &sum, sizeof(A) * n);
    }
  }
}

// out[h * W + w] = bias + sum_{i,j} wt[i * K + j] * pad[(h + i) * Wp + w + j], RB = 4 rows at a time.
template <int K, int VW, typename A>
void conv_plane(const Geo& g, const A* pad, const A* wt, A bias, A* out) {
  using V = Vec<A, VW>;
  constexpr int RB = 4;
  V wv[K * K];
  for (int t = 0; t < K * K; ++t) wv[t] = V{} + wt[t];
  int64_t h = 0;
  for (; h + RB <= g.H; h += RB) conv_rows<K, VW, RB>(g, pad, wv, bias, h, out);
  for (; h < g.H; ++h) conv_rows<K, VW, 1>(g, pad, wv, bias, h, out);
}

// dw[i * K + j] += sum_{h,w} dz[h][w] * x[h + i - R][w + j - R], from zero-bordered padded planes.
template <int K, int VW, typename A>
void wgrad_plane(const Geo& g, const A* dzpad, const A* xpad, double* dw) {
  using V = Vec<A, VW>;
  for (int i = 0; i < K; ++i) {
    V acc[K] = {};
    for (int64_t h = 0; h < g.H; ++h) {
      const A* d = dzpad + (h + g.R) * g.Wp + g.R;
      const A* xr = xpad + (h + i) * g.Wp;
      for (int64_t b = 0; b < g.nb; ++b) {  // dz is zero past W, so whole blocks are exact
        const V dv = loadu<VW>(d + b * VW);
        for (int j = 0; j < K; ++j) acc[j] += dv * loadu<VW>(xr + b * VW + j);
      }
    }
    for (int j = 0; j < K; ++j) {
      double s = 0;
      for (int l = 0; l < VW; ++l) s += acc[j][l];
      dw[i * K + j] += s;
    }
  }
}

// W == 8, float: two output rows per 16-lane vector (a row is only 8 lanes). The plane sits in buf (64-byte
// aligned) with row stride 8 and R + 1 zero rows above and below (x row r at buf + (r + R + 1) * 8, zeros
// elsewhere), so the 16 lanes at buffer row r, column j - R hold rows r and r + 1 shifted by j - R; its lanes
// whose column w + j - R leaves [0, 8) read the neighbouring row, and their weights are zero (wm). (Non-finite
// x thus reaches outputs up to one row further than the k x k window.) PB row pairs share each window.
// Windows are cut from aligned vectors by constant-index shuffles (valignd): as unaligned loads, 4 in 5 of
// them split a cache line, and GCC folded them into every FMA (100 loads of 2 lines a plane, not 55 of 1),
// which made the loads, not the FMAs, the bound.
template <int O, typename V, int... I>
inline V window_of(const V& a, const V& b, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(a, b, (O + I)...);
}

// Lanes O .. O + 15 of the concatenation z[0], z[1], ... of 16-lane vectors.
template <int O, typename V>
inline V window(const V* z) {
  if constexpr (O % 16 == 0)
    return z[O / 16];
  else
    return window_of<O % 16>(z[O / 16], z[O / 16 + 1], std::make_integer_sequence<int, 16>{});
}

// f(integral_constant<int, 0>), ..., f(integral_constant<int, N - 1>): a loop whose index is a constant.
template <typename F, int... I>
inline void static_for_impl(const F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline void static_for(const F& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

// Window rows s outside [kLo, kHi) are skipped: the caller knows they hold only zeros (see conv_plane_w8).
template <int K, int PB, int kLo = 0, int kHi = 2 * (PB - 1) + K, typename A>
inline void conv_pairs(const A* buf, const Vec<A, 16>* wm, A bias, int64_t p0, int64_t H, A* out) {
  using V = Vec<A, 16>;
  constexpr int R = K / 2, S = 2 * (PB - 1) + K;  // S windows rows per column shift
  constexpr int NZ = (8 + 8 * (S - 1) - R + K - 1) / 16 + 2;
  V z[NZ], acc[PB][2];  // acc: even / odd weight rows i apart, 2 * PB independent FMA chains (see conv_rows)
  const A* base = buf + 16 * p0;  // row pair p0 starts a 64-byte line
  for (int k = 0; k < NZ; ++k) z[k] = loadu<16>(base + 16 * k);
  for (int q = 0; q < PB; ++q) acc[q][0] = V{} + bias, acc[q][1] = V{};
  static_for<S>([&](auto s_) {
    static_for<K>([&](auto j_) {
      constexpr int s = decltype(s_)::value, j = decltype(j_)::value;
      if constexpr (s >= kLo && s < kHi) {
        const V v = window<8 + 8 * s - R + j>(z);
        static_for<PB>([&](auto q_) {
          constexpr int q = decltype(q_)::value, i = s - 2 * q;
          if constexpr (i >= 0 && i < K) acc[q][i & 1] += wm[i * K + j] * v;
        });
      }
    });
  });
  for (int q = 0; q < PB; ++q) {
    const int64_t h = 2 * (p0 + q);
    const V sum = acc[q][0] + acc[q][1];
    if (h + 1 < H)  // constant sizes: a variable-size memcpy is a library call
      storeu<16>(out + h * 8, sum);
    else
      std::memcpy(out + h * 8, &sum, sizeof(A) * 8);
  }
}

// kColMask.m[d + 2][l] = 1 where the column l % 8 + d of lane l is inside an 8-wide row, else 0; d in [-2, 2].
struct ColMask {
  float m[5][16];
};
constexpr ColMask make_col_mask() {
  ColMask c{};
  for (int d = -2; d <= 2; ++d)
    for (int l = 0; l < 16; ++l) c.m[d + 2][l] = l % 8 + d >= 0 && l % 8 + d < 8 ? 1.0f : 0.0f;
  return c;
}
constexpr ColMask kColMask = make_col_mask();

// Buffer size of conv_plane_w8 (fp32 elements): (H + 1) / 2 row pairs of 16 plus the windows' reach past the
// last pair (at most 4 vectors of 16) and 15 elements to align the start to 64 bytes.
inline int64_t w8_buffer(const Geo& g) { return 16 * ((g.H + 1) / 2 + 4) + 15; }

// buf aligned up to 64 bytes (w8_buffer leaves room).
template <typename A>
inline A* align64(A* buf) {
  return reinterpret_cast<A*>((reinterpret_cast<uintptr_t>(buf) + 63) & ~uintptr_t(63));
}

template <int K, typename A>
void conv_plane_w8(const Geo& g, const A* buf, const A* wt, A bias, A* out) {
  using V = Vec<A, 16>;
  constexpr int R = K / 2, PB = 4;
  V wm[K * K];
#pragma GCC unroll 25
  for (int t = 0; t < K * K; ++t) wm[t] = loadu<16>(kColMask.m[t % K - R + 2]) * wt[t];
  if (g.H == 2 * PB) {  // 8 x 8 (NVAE's smallest scale), one block: window row s holds x rows s - R and
    // s - R + 1 (its other lanes have zero weights), so s < R - 1 and s >= 8 + R read zeros only (K = 5:
    // 10 of 100 FMAs and 10 of 55 windows)
    conv_pairs<K, PB, std::max(0, R - 1), 2 * PB + R>(buf, wm, bias, 0, g.H, out);
    return;
  }
  const int64_t pairs = (g.H + 1) / 2;
  int64_t p = 0;
  for (; p + PB <= pairs; p += PB) conv_pairs<K, PB>(buf, wm, bias, p, g.H, out);
  for (; p < pairs; ++p) conv_pairs<K, 1>(buf, wm, bias, p, g.H, out);
}

// 8 < W <= 16, float: one output row per 16-lane vector. The plane sits in buf (64-byte aligned) with row
// stride 32: x row h at buf + (h + R) * 32 + R, zeros elsewhere (R zero rows above and below, the lanes beside
// each row), so output row h at tap (i, j) reads lanes j .. j + 15 of buffer row h + i: a window cut from that
// row's two aligned vectors by a constant shuffle, as in conv_pairs (with unaligned loads from a plane of
// rows W + 2R apart, GCC folded a mostly line-splitting load into each FMA: the loads were the bound).
// RB output rows share each window; two partial sums per row (see conv_rows).
template <int K, int RB, typename A>
inline void conv_rows_w16(const A* buf, const Vec<A, 16>* wv, A bias, int64_t h0, int64_t W, A* out) {
  using V = Vec<A, 16>;
  V acc[RB][2];
  for (int o = 0; o < RB; ++o) acc[o][0] = V{} + bias, acc[o][1] = V{};
  const A* base = buf + h0 * 32;
  static_for<K + RB - 1>([&](auto s_) {
    constexpr int s = decltype(s_)::value;
    const V z[2] = {loadu<16>(base + s * 32), loadu<16>(base + s * 32 + 16)};
    static_for<K>([&](auto j_) {
      constexpr int j = decltype(j_)::value;
      const V v = window<j>(z);
      static_for<RB>([&](auto o_) {
        constexpr int o = decltype(o_)::value, i = s - o;
        if constexpr (i >= 0 && i < K) acc[o][i & 1] += wv[i * K + j] * v;
      });
    });
  });
  for (int o = 0; o < RB; ++o) {
    const V sum = acc[o][0] + acc[o][1];
    A* dst = out + (h0 + o) * W;
    if (W == 16)
      storeu<16>(dst, sum);
    else
      std::memcpy(dst, &sum, sizeof(A) * W);
  }
}

// Buffer size of conv_plane_w16 (fp32 elements): H + 2R rows of 32, and 15 to align the start to 64 bytes.
inline int64_t w16_buffer(const Geo& g) { return 32 * (g.H + 2 * g.R) + 15; }

// Elements of the zeroed buffer conv_fwd_plane takes, for any of its paths.
inline int64_t fwd_buffer(const Geo& g) { return std::max({g.PS, w8_buffer(g), w16_buffer(g)}); }

template <int K, typename A>
void conv_plane_w16(const Geo& g, const A* buf, const A* wt, A bias, A* out) {
  using V = Vec<A, 16>;
  constexpr int RB = 4;
  V wv[K * K];
  for (int t = 0; t < K * K; ++t) wv[t] = V{} + wt[t];
  int64_t h = 0;
  for (; h + RB <= g.H; h += RB) conv_rows_w16<K, RB>(buf, wv, bias, h, g.W, out);
  for (; h < g.H; ++h) conv_rows_w16<K, 1>(buf, wv, bias, h, g.W, out);
}

// Forward conv of one NCHW plane src (H x W) into z (H x W): z = conv(src, wt) + bias. pad: a zeroed buffer of
// fwd_buffer(g) elements, used by this call's geometry only (the paths below write only the lanes they read
// as x, so its zeros stay zero from plane to plane).
template <typename T, typename A>
void conv_fwd_plane(const Geo& g, const T* src, const A* wt, A bias, A* pad, A* z) {
  if constexpr (sizeof(A) == 4) {
    if (g.W == 8) {
      A* buf = align64(pad);
      copy_plane(g.HW, src, buf + (g.R + 1) * 8);
      with_k(g, [&](auto K) { conv_plane_w8<decltype(K)::value>(g, buf, wt, bias, z); });
      return;
    }
    if (g.W > 8 && g.W <= 16) {
      A* buf = align64(pad);
      for (int64_t h = 0; h < g.H; ++h) copy_plane(g.W, src + h * g.W, buf + (h + g.R) * 32 + g.R);
      with_k(g, [&](auto K) { conv_plane_w16<decltype(K)::value>(g, buf, wt, bias, z); });
      return;
    }
  }
  load_padded(src, g, pad);
  with_kv(g, [&](auto K, auto VW) { conv_plane<decltype(K)::value, decltype(VW)::value>(g, pad, wt, bias, z); });
}

// Calls f(integral_constant K) for the geometry's kernel size.
template <typename F>
void with_k(const Geo& g, const F& f) {
  switch (g.K) {
    case 5: return f(std::integral_constant<int, 5>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}

// Calls f(integral_constant K, integral_constant VW) for the geometry's kernel size and block width.
template <typename F>
void with_kv(const Geo& g, const F& f) {
  using std::integral_constant;
  const bool wide = g.VW == 16;
  switch (g.K) {
    case 5: return wide ? f(integral_constant<int, 5>{}, integral_constant<int, 16>{})
                        : f(integral_constant<int, 5>{}, integral_constant<int, 8>{});
    case 3: return wide ? f(integral_constant<int, 3>{}, integral_constant<int, 16>{})
                        : f(integral_constant<int, 3>{}, integral_constant<int, 8>{});
    default: return wide ? f(integral_constant<int, 1>{}, integral_constant<int, 16>{})
                         : f(integral_constant<int, 1>{}, integral_constant<int, 8>{});
  }
}

// (mean, M2) of n values, two passes (the plane is in L1 for the second).
template <typename A>
void plane_stats(const A* z, int64_t n, double& mean, double& m2) {
  A l[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) l[j] += z[i + j];
  for (int j = 0; i < n; ++i, ++j) l[j] += z[i];
  const A m = lane_sum(l) / A(n);
  std::fill(l, l + kLanes, A(0));
  for (i = 0; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) l[j] += (z[i + j] - m) * (z[i + j] - m);
  for (int j = 0; i < n; ++i, ++j) l[j] += (z[i] - m) * (z[i] - m);
  mean = double(m);
  m2 = double(lane_sum(l));
}

// dst[i] = act(sc * z[i] + sh) over a dense plane
template <bool SWISH, typename O, typename A>
void apply_plane(int64_t n, const A* __restrict z, A sc, A sh, O* __restrict dst, ExpBounds eb) {
  for (int64_t i = 0; i < n; ++i) dst[i] = O(act<SWISH>(sc * z[i] + sh, eb));
}

// Per-channel BatchNorm coefficients of one call.
template <typename A>
struct Coef {
  A mean, rstd, sc, sh;  // zn = sc * z + sh; sc = gamma * rstd, sh = beta - mean * sc
  A q, r;                // backward, training: dz = sc * dzn + q * zhat + r
};

// dzn = dy * act'(sc * z + sh) over a plane, into dzn; adds sum dzn and sum dzn * zhat to sa, sb.
template <bool SWISH, typename A>
void dzn_plane(int64_t n, const A* z, const A* dy, const Coef<A>& k, A* dzn, double& sa, double& sb,
               ExpBounds eb) {
  A la[kLanes] = {}, lb[kLanes] = {};
  const auto step = [&](int64_t i, int j) {
    const A d = act_grad<SWISH>(k.sc * z[i] + k.sh, dy[i], eb);
    dzn[i] = d;
    la[j] += d;
    lb[j] += d * ((z[i] - k.mean) * k.rstd);
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) step(i + j, j);
  for (int j = 0; i < n; ++i, ++j) step(i, j);
  sa += double(lane_sum(la));
  sb += double(lane_sum(lb));
}

// dz = sc * dzn + q * zhat + r into the interior of a zero-bordered padded plane; returns sum dz.
template <typename A>
double dz_plane(const Geo& g, const A* z, const A* dzn, const Coef<A>& k, A* dzpad) {
  A l[kLanes] = {};
  for (int64_t h = 0; h < g.H; ++h) {
    const A *zr = z + h * g.W, *dr = dzn + h * g.W;
    A* o = dzpad + (h + g.R) * g.Wp + g.R;
    const auto step = [&](int64_t w, int j) {
      const A d = k.sc * dr[w] + k.q * ((zr[w] - k.mean) * k.rstd) + k.r;
      o[w] = d;
      l[j] += d;
    };
    int64_t w = 0;
    for (; w + kLanes <= g.W; w += kLanes)
      for (int j = 0; j < kLanes; ++j) step(w + j, j);
    for (int j = 0; w < g.W; ++w, ++j) step(w, j);
  }
  return double(lane_sum(l));
}

// ---------------------------------------------------------------------------
// Data of one call. A is the accumulation type (double for double x, else float).
// ---------------------------------------------------------------------------
template <typename T, typename A>
struct Args {
  Geo g;
  bool training, swish;
  double eps;
  ExpBounds eb;
  const T* x;
  const T* dy;                 // bwd: grad_y, x's layout
  T* out;                      // y (fwd) or grad_x (bwd)
  const A* w;                  // (C, K * K), or null for bn_swish (weight 1)
  const A *cb, *gamma, *beta;  // (C,) or null
  A *mean, *var;               // (C,): written by the training forward, read otherwise
  A *g_w, *g_cb, *g_gamma, *g_beta;  // bwd: (C, K * K), (C,) x 3; g_w and g_cb null without a conv
  bool z_in_y = false;  // channels-last training fwd, T == A: the statistics pass stores z in y (forward_cl)
};

template <typename T, typename A>
Coef<A> coef_of(const Args<T, A>& a, int64_t c) {
  Coef<A> k{};
  k.mean = a.mean[c];
  k.rstd = A(1.0 / std::sqrt(double(a.var[c]) + a.eps));
  k.sc = (a.gamma ? a.gamma[c] : A(1)) * k.rstd;
  k.sh = (a.beta ? a.beta[c] : A(0)) - k.mean * k.sc;
  return k;
}

// z of plane (n, c): x copied into pad, then the conv (the identity for bn_swish).
template <typename T, typename A>
void conv_of(const Args<T, A>& a, int64_t n, int64_t c, A* pad, A* z) {
  const Geo& g = a.g;
  const A one(1);
  load_padded(a.x + g.plane(n, c), g, pad);
  with_kv(g, [&](auto K, auto VW) {
    conv_plane<decltype(K)::value, decltype(VW)::value>(g, pad, a.w ? a.w + c * g.K * g.K : &one,
                                                         a.cb ? a.cb[c] : A(0), z);
  });
}

// Chan et al.: merges a plane's (mean pm, M2 pm2) of HW values into the running (mean, m2) of n planes.
inline void merge_plane(double& mean, double& m2, double pm, double pm2, int64_t n, int64_t hw) {
  const double delta = pm - mean, f = 1.0 / double(n + 1);
  mean += delta * f;
  m2 += pm2 + delta * delta * double(hw) * double(n) * f;
}

// Channels per task of the NCHW training forward: enough that a task reads x and writes y in runs of about
// 4 KiB per sample (CB consecutive planes), not one small plane per C * H * W stride (8 x 8 maps: 256 bytes
// at a stride no prefetcher follows; x then comes from memory at latency, not bandwidth), while its conv
// outputs fit the scratch and every thread still gets several tasks. Maps of 32 x 32 and more: one channel.
inline int64_t fwd_block(const Geo& g) {
  int64_t cb = std::max<int64_t>(1, 1024 / g.HW);
  cb = std::min(cb, std::max<int64_t>(1, kMaxScratch / (g.N * g.HW)));
  cb = std::min(cb, std::max<int64_t>(1, g.C / (4 * at::get_num_threads())));
  return std::min(cb, g.C);
}

// NCHW training forward of the channel blocks [t0, t1) of CB channels (fwd_block). Per sample a block's
// planes are consecutive in memory: the next sample's are prefetched while the current ones are convolved.
template <typename T, typename A>
void fwd_tasks(const Args<T, A>& a, int64_t CB, int64_t t0, int64_t t1) {
  const Geo& g = a.g;
  const int64_t KK = g.K * g.K;
  std::vector<A> pad(fwd_buffer(g), A(0)), zs, wt(CB * KK), bias(CB);
  std::vector<double> mean(CB), m2(CB);
  std::vector<Coef<A>> k(CB);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = t * CB, nc = std::min(CB, g.C - c0);
    const bool keep = g.N * nc * g.HW <= kMaxScratch;
    zs.resize((keep ? g.N * nc : 1) * g.HW);
    const auto z_of = [&](int64_t n, int64_t j) { return zs.data() + (keep ? (n * nc + j) * g.HW : 0); };
    const auto fetch = [&](int64_t n) {
      if (n < g.N) prefetch(reinterpret_cast<uintptr_t>(a.x + g.plane(n, c0)), nc * g.HW * int64_t(sizeof(T)));
    };
    for (int64_t j = 0; j < nc; ++j) {
      for (int64_t i = 0; i < KK; ++i) wt[j * KK + i] = a.w ? a.w[(c0 + j) * KK + i] : A(1);
      bias[j] = a.cb ? a.cb[c0 + j] : A(0);
    }
    const auto conv = [&](int64_t n, int64_t j) {
      conv_fwd_plane(g, a.x + g.plane(n, c0 + j), wt.data() + j * KK, bias[j], pad.data(), z_of(n, j));
    };
    std::fill(mean.begin(), mean.end(), 0.0);  // batch statistics: per-plane (mean, M2), merged over n
    std::fill(m2.begin(), m2.end(), 0.0);
    for (int64_t n = 0; n < g.N; ++n) {
      fetch(n + 1);
      for (int64_t j = 0; j < nc; ++j) {
        conv(n, j);
        double pm, pm2;
        plane_stats(z_of(n, j), g.HW, pm, pm2);
        merge_plane(mean[j], m2[j], pm, pm2, n, g.HW);
      }
    }
    for (int64_t j = 0; j < nc; ++j) {
      a.mean[c0 + j] = A(mean[j]);
      a.var[c0 + j] = A(m2[j] / double(g.N * g.HW));
      k[j] = coef_of(a, c0 + j);
    }
    for (int64_t n = 0; n < g.N; ++n) {
      if (!keep) fetch(n + 1);
      for (int64_t j = 0; j < nc; ++j) {
        if (!keep) conv(n, j);
        T* y = a.out + g.plane(n, c0 + j);
        a.swish ? apply_plane<true>(g.HW, z_of(n, j), k[j].sc, k[j].sh, y, a.eb)
                : apply_plane<false>(g.HW, z_of(n, j), k[j].sc, k[j].sh, y, a.eb);
      }
    }
  }
}

// The conv weights and bias of every channel with BatchNorm folded in: wf[c][t] = sc * w[c][t] (sc without a
// conv), bf[c] = sc * cb + sh.
template <typename T, typename A>
void fold_weights(const Args<T, A>& a, std::vector<A>& wf, std::vector<A>& bf) {
  const int64_t KK = a.g.K * a.g.K;
  wf.resize(a.g.C * KK);
  bf.resize(a.g.C);
  for (int64_t c = 0; c < a.g.C; ++c) {
    const Coef<A> k = coef_of(a, c);
    for (int64_t t = 0; t < KK; ++t) wf[c * KK + t] = (a.w ? a.w[c * KK + t] : A(1)) * k.sc;
    bf[c] = (a.cb ? a.cb[c] : A(0)) * k.sc + k.sh;
  }
}

// NCHW eval forward of planes [p0, p1) in memory order (p = n * C + c): y = act(conv(x, wf[c]) + bf[c]),
// BatchNorm folded into wf, bf (fold_weights).
template <typename T, typename A>
void fwd_eval_planes(const Args<T, A>& a, const A* wf, const A* bf, int64_t p0, int64_t p1) {
  const Geo& g = a.g;
  // With BatchNorm folded into the conv, act applies alike to every plane: it runs flat over runs of
  // planes (consecutive in y) of up to ~4096 elements, so a 2x2 map's 4-element planes pay no scalar tail.
  const int64_t run = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.HW));
  std::vector<A> pad(fwd_buffer(g), A(0)), z(std::min(run, p1 - p0) * g.HW);
  for (int64_t r0 = p0; r0 < p1; r0 += run) {
    const int64_t r1 = std::min(p1, r0 + run);
    for (int64_t p = r0; p < r1; ++p) {
      const int64_t c = p % g.C;
      conv_fwd_plane(g, a.x + p * g.HW, wf + c * g.K * g.K, bf[c], pad.data(), z.data() + (p - r0) * g.HW);
    }
    T* y = a.out + r0 * g.HW;
    const int64_t n = (r1 - r0) * g.HW;
    a.swish ? apply_plane<true>(n, z.data(), A(1), A(0), y, a.eb) : apply_plane<false>(n, z.data(), A(1), A(0), y, a.eb);
  }
}

// NCHW backward of channels [t0, t1).
template <typename T, typename A>
void bwd_tasks(const Args<T, A>& a, int64_t t0, int64_t t1) {
  const Geo& g = a.g;
  const int64_t KK = g.K * g.K;
  const bool keep = a.training && 2 * g.N * g.HW <= kMaxScratch;
  const int64_t kept = (keep ? g.N : 1) * g.HW;
  std::vector<A> pad(g.PS, A(0)), dzpad(g.PS, A(0)), zs(kept), dzns(kept), buf(g.HW);
  const double M = double(g.N * g.HW);
  const auto slot = [&](std::vector<A>& v, int64_t n) { return v.data() + (keep ? n * g.HW : 0); };
  for (int64_t c = t0; c < t1; ++c) {
    Coef<A> k = coef_of(a, c);  // q = r = 0 unless training
    double sa = 0, sb = 0, sdz = 0, unused_a = 0, unused_b = 0, dw[25] = {};
    // z (conv; x left in pad) and dzn (from grad_y) of plane (n, c); adds sum dzn, sum dzn * zhat to sa_, sb_
    const auto rebuild = [&](int64_t n, double& sa_, double& sb_) {
      conv_of(a, n, c, pad.data(), slot(zs, n));
      copy_plane(g.HW, a.dy + g.plane(n, c), buf.data());
      a.swish ? dzn_plane<true>(g.HW, slot(zs, n), buf.data(), k, slot(dzns, n), sa_, sb_, a.eb)
              : dzn_plane<false>(g.HW, slot(zs, n), buf.data(), k, slot(dzns, n), sa_, sb_, a.eb);
    };
    if (a.training) {  // pass A: the sums that dz needs
      for (int64_t n = 0; n < g.N; ++n) rebuild(n, sa, sb);
      k.q = A(-double(k.sc) * sb / M);
      k.r = A(-double(k.sc) * sa / M);
    }
    A wflip[25] = {A(1)};  // bn_swish: weight 1, grad_x = dz
    if (a.w)
      for (int64_t i = 0; i < KK; ++i) wflip[i] = a.w[c * KK + KK - 1 - i];
    for (int64_t n = 0; n < g.N; ++n) {  // pass B: dz, grad_x, weight grads
      if (keep)
        load_padded(a.x + g.plane(n, c), g, pad.data());  // x for the weight grads
      else if (a.training)
        rebuild(n, unused_a, unused_b);  // the sums are complete
      else
        rebuild(n, sa, sb);  // eval: the sums are only outputs, summed in this one pass
      sdz += dz_plane(g, slot(zs, n), slot(dzns, n), k, dzpad.data());
      with_kv(g, [&](auto K, auto VW) {
        constexpr int kK = decltype(K)::value, kVW = decltype(VW)::value;
        conv_plane<kK, kVW>(g, dzpad.data(), wflip, A(0), buf.data());
        if (a.g_w) wgrad_plane<kK, kVW>(g, dzpad.data(), pad.data(), dw);
      });
      copy_plane(g.HW, buf.data(), a.out + g.plane(n, c));
    }
    a.g_gamma[c] = A(sb);
    a.g_beta[c] = A(sa);
    if (a.g_cb) a.g_cb[c] = A(sdz);
    if (a.g_w)
      for (int64_t i = 0; i < KK; ++i) a.g_w[c * KK + i] = A(dw[i]);
  }
}

// ---------------------------------------------------------------------------
// Channels-last: a task owns LN = 64 / sizeof(T) channels (one 64-byte line of x), the LN lanes of one
// vector per position. Lane planes are [position][LN] arrays of A, padded ones (H + 2R) x Wq positions
// with a zero border; every step is lane-wise, so lanes past the last channel (cbn < LN) only carry
// values that are never stored.
// ---------------------------------------------------------------------------
// The n <= LN channels of one position into LN lanes, zero past n (one vector copy when n == LN: through
// possibly aliasing pointers and a run-time count GCC copied element by element).
template <int LN, typename T, typename A>
inline void load_lanes(const T* __restrict s, int64_t n, A* __restrict d) {
  if (n == LN)
    for (int l = 0; l < LN; ++l) d[l] = A(s[l]);
  else
    for (int l = 0; l < LN; ++l) d[l] = l < n ? A(s[l]) : A(0);
}

// The first n <= LN lanes back to one position's channels.
template <int LN, typename T, typename A>
inline void store_lanes(const A* __restrict s, int64_t n, T* __restrict d) {
  if (n == LN)
    for (int l = 0; l < LN; ++l) d[l] = T(s[l]);
  else
    for (int64_t l = 0; l < n; ++l) d[l] = T(s[l]);
}

template <int LN, typename T, typename A>
void cl_load_padded(const T* src, const Geo& g, int64_t cbn, A* pad) {
  for (int64_t h = 0; h < g.H; ++h)
    for (int64_t w = 0; w < g.W; ++w)
      load_lanes<LN>(src + (h * g.W + w) * g.C, cbn, pad + ((h + g.R) * g.Wq + w + g.R) * LN);
}

// dw[(i * K + j) * LN + l] += sum_p dz[p][l] * x[h + i - R][w + j - R][l], from padded lane planes.
template <int K, int LN, typename A>
void cl_wgrad(const Geo& g, const A* dzpad, const A* xpad, double* dw) {
  using V = Vec<A, LN>;
  V acc[K * K] = {};
  for (int64_t h = 0; h < g.H; ++h)
    for (int64_t w = 0; w < g.W; ++w) {
      const V d = loadu<LN>(dzpad + ((h + g.R) * g.Wq + w + g.R) * LN);
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j) acc[i * K + j] += d * loadu<LN>(xpad + ((h + i) * g.Wq + w + j) * LN);
    }
  for (int t = 0; t < K * K; ++t)
    for (int l = 0; l < LN; ++l) dw[t * LN + l] += acc[t][l];
}

// Per-lane BatchNorm coefficients (as Coef).
template <typename A>
struct LaneCoef {
  A mean[kMaxCB] = {}, rstd[kMaxCB] = {}, sc[kMaxCB] = {}, sh[kMaxCB] = {}, q[kMaxCB] = {}, r[kMaxCB] = {};
};

// dzn[p][l] = dy * act'(sc z + sh); adds sum dzn and sum dzn * zhat per lane to sa, sb (row by row).
template <bool SWISH, int LN, typename T, typename A>
void cl_dzn(const Geo& g, const A* z, const T* dy, const LaneCoef<A>& k, int64_t cbn, A* dzn, double* sa,
            double* sb, ExpBounds eb) {
  for (int64_t h = 0; h < g.H; ++h) {
    A ra[LN] = {}, rb[LN] = {};
    for (int64_t w = 0; w < g.W; ++w) {
      const int64_t p = h * g.W + w;
      A dl[LN];  // lanes past cbn: dy = 0, so dzn = 0 there
      load_lanes<LN>(dy + p * g.C, cbn, dl);
      for (int l = 0; l < LN; ++l) {
        const A zz = z[p * LN + l], d = act_grad<SWISH>(k.sc[l] * zz + k.sh[l], dl[l], eb);
        dzn[p * LN + l] = d;
        ra[l] += d;
        rb[l] += d * ((zz - k.mean[l]) * k.rstd[l]);
      }
    }
    for (int l = 0; l < LN; ++l) sa[l] += ra[l], sb[l] += rb[l];
  }
}

// dz = sc * dzn + q * zhat + r into the interior of a zero-bordered padded lane plane; adds sum dz to sdz.
template <int LN, typename A>
void cl_dz(const Geo& g, const A* z, const A* dzn, const LaneCoef<A>& k, A* dzpad, double* sdz) {
  for (int64_t h = 0; h < g.H; ++h) {
    A rs[LN] = {};
    for (int64_t w = 0; w < g.W; ++w) {
      const int64_t p = h * g.W + w;
      A* o = dzpad + ((h + g.R) * g.Wq + w + g.R) * LN;
      for (int l = 0; l < LN; ++l) {
        const A d = k.sc[l] * dzn[p * LN + l] + k.q[l] * ((z[p * LN + l] - k.mean[l]) * k.rstd[l]) + k.r[l];
        o[l] = d;
        rs[l] += d;
      }
    }
    for (int l = 0; l < LN; ++l) sdz[l] += rs[l];
  }
}

template <int LN, typename T, typename A>
void cl_store(const Geo& g, const A* src, int64_t cbn, T* dst) {
  for (int64_t p = 0; p < g.HW; ++p) store_lanes<LN>(src + p * LN, cbn, dst + p * g.C);
}

// Lane-major conv weights of channels c0 .. c0 + cbn: wl[t * LN + l] = w[c0 + l][t] (flipped: t -> KK - 1 - t),
// weight 1 without a conv; bl[l] = conv bias.
template <int LN, typename T, typename A>
void cl_weights(const Args<T, A>& a, int64_t c0, int64_t cbn, bool flip, A* wl, A* bl) {
  const int64_t KK = a.g.K * a.g.K;
  for (int64_t t = 0; t < KK; ++t)
    for (int l = 0; l < LN; ++l)
      wl[t * LN + l] = l >= cbn ? A(0) : a.w ? a.w[(c0 + l) * KK + (flip ? KK - 1 - t : t)] : A(1);
  for (int l = 0; l < LN; ++l) bl[l] = a.cb && l < cbn ? a.cb[c0 + l] : A(0);
}

template <typename T, typename A>
LaneCoef<A> lane_coef_of(const Args<T, A>& a, int64_t c0, int64_t cbn) {
  LaneCoef<A> k;
  for (int64_t l = 0; l < cbn; ++l) {
    const Coef<A> c = coef_of(a, c0 + l);
    k.mean[l] = c.mean, k.rstd[l] = c.rstd, k.sc[l] = c.sc, k.sh[l] = c.sh;
  }
  return k;
}

// ---------------------------------------------------------------------------
// Channels-last forward. A unit is a band of output rows of one sample with all its channels, so x is read
// and y written in memory order. Each input row enters a ring of K rows, laid out block-major
// [channel block][Wq][LN] (LN = 64 bytes of A; zero columns either side of W, zero lanes past C), so one
// block's K input rows are contiguous strips in L1; rows outside the image are null, their taps skipped. The conv of
// one block and row keeps WB positions in registers: per tap row, WB + K - 1 input vectors and K weight
// vectors serve K * WB lane-wise FMAs.
// ---------------------------------------------------------------------------
struct Bands {
  int64_t per_sample, rows;  // bands per sample, output rows per band (the last may have fewer)
};

// Whole samples when there are enough of them; else the rows are split so that every thread gets work.
inline Bands make_bands(const Geo& g) {
  const int64_t want = 4 * at::get_num_threads();
  const int64_t per = g.N >= want ? 1 : std::min<int64_t>(g.H, (want + g.N - 1) / g.N);
  const int64_t rows = (g.H + per - 1) / per;
  return {(g.H + rows - 1) / rows, rows};
}

// Lane-major weights of every channel block: wl[(b * KK + t) * LN + l] = s[c] * w[c][t], bl[b * LN + l] =
// s[c] * cb[c] + t[c] for c = b * LN + l (zero past C), with BatchNorm folded in (s = sc, t = sh) or not
// (s = 1, t = 0). Weight 1 without a conv.
template <int LN, typename T, typename A>
void cl_block_weights(const Args<T, A>& a, bool fold, std::vector<A>& wl, std::vector<A>& bl) {
  const int64_t KK = a.g.K * a.g.K, nblk = (a.g.C + LN - 1) / LN;
  wl.assign(nblk * KK * LN, A(0));
  bl.assign(nblk * LN, A(0));
  for (int64_t c = 0; c < a.g.C; ++c) {
    const int64_t b = c / LN, l = c % LN;
    A s = A(1), t = A(0);
    if (fold) {
      const Coef<A> k = coef_of(a, c);
      s = k.sc, t = k.sh;
    }
    for (int64_t i = 0; i < KK; ++i) wl[(b * KK + i) * LN + l] = (a.w ? a.w[c * KK + i] : A(1)) * s;
    bl[b * LN + l] = (a.cb ? a.cb[c] : A(0)) * s + t;
  }
}

// One input row x[n][r] (W * C values) into a ring row: dst[(b * Wq + w + R) * LN + l] = x[n][r][w][b * LN + l].
template <int LN, typename T, typename A>
void cl_ring_load(const Geo& g, const T* __restrict src, A* __restrict dst) {
  const int64_t full = g.C / LN, tail = g.C - full * LN;
  for (int64_t w = 0; w < g.W; ++w) {
    const T* s = src + w * g.C;
    A* d = dst + (w + g.R) * LN;
    for (int64_t b = 0; b < full; ++b)
      for (int l = 0; l < LN; ++l) d[b * g.Wq * LN + l] = A(s[b * LN + l]);
    for (int64_t l = 0; l < tail; ++l) d[full * g.Wq * LN + l] = A(s[full * LN + l]);
  }
}

// z[(w + o) * LN + l] = bias[l] + sum_{i,j} wt[(i * K + j) * LN + l] * rows[i][(w + o + j) * LN + l], o < WB;
// a null rows[i] is a row of zeros (outside the image), skipped. Per tap row i, the K weight vectors are loaded
// once and the WB + K - 1 input vectors stream through, each feeding the (up to K) outputs it touches: WB
// accumulators + K weights + 1 input stay in registers (holding all of a row's inputs at once instead made GCC
// spill a third of the loop to the stack, ~1.6x slower). kEdges: the block is a whole row (w = 0, W = WB), so
// its first and last R inputs are the zero columns beside the image, skipped too (at 8 x 8 and K = 5 the
// skipped rows and columns are 28% of the taps).
template <int K, int LN, int WB, bool kEdges, typename A>
inline void cl_conv_positions(const A* const* rows, const A* wt, const A* bias, int64_t w, A* z) {
  using V = Vec<A, LN>;
  constexpr int R = K / 2, t0 = kEdges ? R : 0, t1 = WB + K - 1 - t0;
  V acc[WB];
  const V bv = loadu<LN>(bias);
#pragma GCC unroll 16
  for (int o = 0; o < WB; ++o) acc[o] = bv;
#pragma GCC unroll 5
  for (int i = 0; i < K; ++i) {
    if (!rows[i]) continue;
    const A* r = rows[i] + w * LN;
    V wv[K];
#pragma GCC unroll 5
    for (int j = 0; j < K; ++j) wv[j] = loadu<LN>(wt + (i * K + j) * LN);
#pragma GCC unroll 20
    for (int t = t0; t < t1; ++t) {
      const V in = loadu<LN>(r + t * LN);
#pragma GCC unroll 5
      for (int j = 0; j < K; ++j)
        if (t - j >= 0 && t - j < WB) acc[t - j] += wv[j] * in;
    }
  }
#pragma GCC unroll 16
  for (int o = 0; o < WB; ++o) storeu<LN>(z + (w + o) * LN, acc[o]);
}

// One output row of one channel block: z[w * LN + l], w < W.
template <int K, int LN, typename A>
void cl_conv_row(const Geo& g, const A* const* rows, const A* wt, const A* bias, A* z) {
  constexpr int WB = 8;
  if (g.W == WB) {
    cl_conv_positions<K, LN, WB, true>(rows, wt, bias, 0, z);
    return;
  }
  int64_t w = 0;
  for (; w + WB <= g.W; w += WB) {
    opaque(wt);  // the K * K weight vectors are reloaded per block: hoisted out of the loop, they spilled
    cl_conv_positions<K, LN, WB, false>(rows, wt, bias, w, z);
  }
  for (; w < g.W; ++w) {
    opaque(wt);
    cl_conv_positions<K, LN, 1, false>(rows, wt, bias, w, z);
  }
}

// A whole zero-bordered lane plane (the backward's): out[p] = bias + sum_{i,j} wt[(i * K + j) * LN] *
// pad[(h + i) * Wq + w + j], per lane, row by row through the forward's register blocks.
template <int K, int LN, typename A>
void cl_conv(const Geo& g, const A* pad, const A* wt, const A* bias, A* out) {
  for (int64_t h = 0; h < g.H; ++h) {
    const A* rows[K];
    for (int i = 0; i < K; ++i) rows[i] = pad + (h + i) * g.Wq * LN;
    cl_conv_row<K, LN>(g, rows, wt, bias, out + h * g.W * LN);
  }
}

// Chan et al.: merges (mean mb, M2 m2b) of nb values into the running (mean, m2) of na values.
// The factors depend on the counts alone: in a loop over channels with the same counts the compiler
// hoists the divisions (written as delta * nb / n they would run once per channel).
inline void merge_stats(double& mean, double& m2, int64_t na, double mb, double m2b, int64_t nb) {
  const double fb = double(nb) / double(na + nb), fab = double(na) * fb, delta = mb - mean;
  mean += delta * fb;
  m2 += m2b + delta * delta * fab;
}

// Whether the channels-last forward stores y = act(z) around the caches (stream_line): float32 and float64 y
// (C a multiple of LN, y 64-byte aligned: one line per channel block and position) when x and y together pass
// 16 MiB, half the L3 of one Zen 5 CCD. A normal store first reads each line of y in (y is not cached at that
// size). Measured (Zen 5, 2 threads, eval, fp32, same process): 32x192x32x32 (2 x 25 MB) 7-20% faster,
// 64x192x16x16 (2 x 12.6 MB) 13-30%; 32x192x16x16 (2 x 6.3 MB) no change, 32x384x8x8 (2 x 3.1 MB) 9% slower,
// y being still in cache. The NCHW eval forward (y written in runs of whole planes) gained nothing from it.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

template <typename T, typename A>
bool streams_y(const Args<T, A>& a) {
  constexpr int LN = 64 / sizeof(A);
  return std::is_same_v<T, A> && a.g.C % LN == 0 && reinterpret_cast<uintptr_t>(a.out) % 64 == 0 &&
         2 * a.g.N * a.g.HW * a.g.C * int64_t(sizeof(T)) > kStreamBytes;
}

// Units [u0, u1) of the channels-last forward. STATS (training, first pass): z = conv(x, w) + cb, per-channel
// (mean, M2) of each unit into pm, pm2 [unit][C]. Else y = act(z) with wl, bl holding BatchNorm folded in.
template <bool STATS, bool SWISH, int K, typename T, typename A>
void cl_fwd_units_impl(const Args<T, A>& a, const Bands& bd, const A* wl, const A* bl, double* pm, double* pm2,
                       int64_t u0, int64_t u1) {
  constexpr int LN = 64 / sizeof(A);
  const Geo& g = a.g;
  const int64_t nblk = (g.C + LN - 1) / LN, strip = g.Wq * LN, row = nblk * strip, KK = g.K * g.K;
  std::vector<A> ring(K * row, A(0)), z(g.W * LN);
  // STATS: per channel (nblk * LN, lanes past C unused), the unit's shift (its first row's mean) and the sums
  // of z - shift and (z - shift)^2: rows add their float partials in double, with no per-row merge.
  std::vector<A> shift(STATS ? nblk * LN : 0);
  std::vector<double> s1(STATS ? nblk * LN : 0), s2(STATS ? nblk * LN : 0);
  const ExpBounds eb = a.eb;
  const bool stream = !STATS && streams_y(a);
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t n = u / bd.per_sample, h0 = (u % bd.per_sample) * bd.rows, h1 = std::min(g.H, h0 + bd.rows);
    int64_t held[K];  // the input row each ring slot holds
    std::fill(held, held + K, int64_t(-1));
    if (STATS) std::fill(s1.begin(), s1.end(), 0.0), std::fill(s2.begin(), s2.end(), 0.0);
    for (int64_t h = h0; h < h1; ++h) {
      // the next input row to enter the ring, prefetched a part per channel block
      const int64_t next = h + g.R + 1, part = (g.W * g.C * int64_t(sizeof(T)) + nblk - 1) / nblk;
      const uintptr_t next_row = reinterpret_cast<uintptr_t>(a.x + (n * g.H + next) * g.W * g.C);
      const A* rows[K];
      for (int i = 0; i < K; ++i) {
        const int64_t r = h + i - g.R;
        if (r < 0 || r >= g.H) {
          rows[i] = nullptr;  // zeros: skipped
          continue;
        }
        A* slot = ring.data() + (r % K) * row;
        if (held[r % K] != r) {
          cl_ring_load<LN>(g, a.x + (n * g.H + r) * g.W * g.C, slot);
          held[r % K] = r;
        }
        rows[i] = slot;
      }
      T* y = a.out + (n * g.H + h) * g.W * g.C;
      for (int64_t b = 0; b < nblk; ++b) {
        const A* brows[K];
        for (int i = 0; i < K; ++i) brows[i] = rows[i] ? rows[i] + b * strip : nullptr;
        if (next < std::min(g.H, h1 + g.R)) prefetch(next_row + b * part, part);
        cl_conv_row<K, LN>(g, brows, wl + b * KK * LN, bl + b * LN, z.data());
        const int64_t c0 = b * LN, cbn = std::min<int64_t>(LN, g.C - c0);
        if (STATS) {  // this row's sums of z - shift and its square per lane, in float, added to the unit's
          if constexpr (std::is_same_v<T, A>)
            if (a.z_in_y)
              for (int64_t w = 0; w < g.W; ++w) store_lanes<LN>(z.data() + w * LN, cbn, y + w * g.C + c0);
          using V = Vec<A, LN>;
          if (h == h0) {
            V m = loadu<LN>(z.data());
            for (int64_t w = 1; w < g.W; ++w) m += loadu<LN>(z.data() + w * LN);
            storeu<LN>(shift.data() + c0, m / A(g.W));
          }
          const V sh = loadu<LN>(shift.data() + c0);
          V r1 = {}, r2 = {};
          for (int64_t w = 0; w < g.W; ++w) {
            const V d = loadu<LN>(z.data() + w * LN) - sh;
            r1 += d;
            r2 += d * d;
          }
          using VD = Vec<double, LN>;
          storeu<LN>(s1.data() + c0, loadu<LN>(s1.data() + c0) + __builtin_convertvector(r1, VD));
          storeu<LN>(s2.data() + c0, loadu<LN>(s2.data() + c0) + __builtin_convertvector(r2, VD));
        } else if (stream) {  // y = act(z): z in place, then streamed to y line by line
          if constexpr (std::is_same_v<T, A>) {
            for (int64_t i = 0; i < g.W * LN; ++i) z[i] = act<SWISH>(z[i], eb);
            for (int64_t w = 0; w < g.W; ++w) stream_line(y + w * g.C + c0, z.data() + w * LN);
          }
        } else if (cbn == LN) {
          for (int64_t w = 0; w < g.W; ++w)
            for (int l = 0; l < LN; ++l) y[w * g.C + c0 + l] = T(act<SWISH>(z[w * LN + l], eb));
        } else {
          for (int64_t w = 0; w < g.W; ++w)
            for (int64_t l = 0; l < cbn; ++l) y[w * g.C + c0 + l] = T(act<SWISH>(z[w * LN + l], eb));
        }
      }
    }
    if (STATS) {  // the unit's (mean, M2) per channel: mean = shift + s1 / n, M2 = s2 - s1^2 / n
      const double count = double((h1 - h0) * g.W);
      for (int64_t c = 0; c < g.C; ++c) {
        const double d = s1[c] / count;
        pm[u * g.C + c] = double(shift[c]) + d;
        pm2[u * g.C + c] = std::max(0.0, s2[c] - s1[c] * d);
      }
    }
  }
  if (stream) stream_fence();
}

template <typename T, typename A>
void cl_fwd_units(const Args<T, A>& a, const Bands& bd, const A* wl, const A* bl, double* pm, double* pm2,
                  int64_t u0, int64_t u1) {
  with_k(a.g, [&](auto K) {
    constexpr int kK = decltype(K)::value;
    if (pm)
      cl_fwd_units_impl<true, false, kK>(a, bd, wl, bl, pm, pm2, u0, u1);
    else if (a.swish)
      cl_fwd_units_impl<false, true, kK>(a, bd, wl, bl, pm, pm2, u0, u1);
    else
      cl_fwd_units_impl<false, false, kK>(a, bd, wl, bl, pm, pm2, u0, u1);
  });
}

// Channels-last backward of channel blocks [t0, t1) (the passes of bwd_tasks), kernel size kK (== g.K).
template <typename T, typename A, int kK>
void bwd_tasks_cl(const Args<T, A>& a, std::integral_constant<int, kK>, int64_t t0, int64_t t1) {
  constexpr int LN = 64 / sizeof(T);
  const Geo& g = a.g;
  const int64_t KK = g.K * g.K, plane = g.HW * LN;
  const bool keep = a.training && 2 * g.N * plane <= kMaxScratch;
  const int64_t kept = (keep ? g.N : 1) * plane;
  std::vector<A> pad(g.PQ * LN, A(0)), dzpad(g.PQ * LN, A(0)), zs(kept), dzns(kept), buf(plane);
  std::vector<A> wl(KK * LN), wf(KK * LN), bl(LN), zero(LN, A(0));
  std::vector<double> dw(KK * LN);
  const double M = double(g.N * g.HW);
  const auto slot = [&](std::vector<A>& v, int64_t n) { return v.data() + (keep ? n * plane : 0); };
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = t * LN, cbn = std::min<int64_t>(LN, g.C - c0);
    cl_weights<LN>(a, c0, cbn, false, wl.data(), bl.data());
    cl_weights<LN>(a, c0, cbn, true, wf.data(), bl.data());
    LaneCoef<A> k = lane_coef_of(a, c0, cbn);  // q = r = 0 unless training
    double sa[LN] = {}, sb[LN] = {}, sdz[LN] = {}, unused_a[LN], unused_b[LN];
    std::fill(dw.begin(), dw.end(), 0.0);
    const auto rebuild = [&](int64_t n, double* sa_, double* sb_) {
      cl_load_padded<LN>(a.x + g.plane(n, c0), g, cbn, pad.data());
      cl_conv<kK, LN>(g, pad.data(), wl.data(), bl.data(), slot(zs, n));
      const T* dy = a.dy + g.plane(n, c0);
      a.swish ? cl_dzn<true, LN>(g, slot(zs, n), dy, k, cbn, slot(dzns, n), sa_, sb_, a.eb)
              : cl_dzn<false, LN>(g, slot(zs, n), dy, k, cbn, slot(dzns, n), sa_, sb_, a.eb);
    };
    if (a.training) {  // pass A: the sums that dz needs
      for (int64_t n = 0; n < g.N; ++n) rebuild(n, sa, sb);
      for (int64_t l = 0; l < cbn; ++l) {
        k.q[l] = A(-double(k.sc[l]) * sb[l] / M);
        k.r[l] = A(-double(k.sc[l]) * sa[l] / M);
      }
    }
    for (int64_t n = 0; n < g.N; ++n) {  // pass B: dz, grad_x, weight grads
      if (keep)
        cl_load_padded<LN>(a.x + g.plane(n, c0), g, cbn, pad.data());  // x for the weight grads
      else if (a.training)
        rebuild(n, unused_a, unused_b);  // the sums are complete
      else
        rebuild(n, sa, sb);  // eval: the sums are only outputs, summed in this one pass
      cl_dz<LN>(g, slot(zs, n), slot(dzns, n), k, dzpad.data(), sdz);
      cl_conv<kK, LN>(g, dzpad.data(), wf.data(), zero.data(), buf.data());
      if (a.g_w) cl_wgrad<kK, LN>(g, dzpad.data(), pad.data(), dw.data());
      cl_store<LN>(g, buf.data(), cbn, a.out + g.plane(n, c0));
    }
    for (int64_t l = 0; l < cbn; ++l) {
      const int64_t c = c0 + l;
      a.g_gamma[c] = A(sb[l]);
      a.g_beta[c] = A(sa[l]);
      if (a.g_cb) a.g_cb[c] = A(sdz[l]);
      if (a.g_w)
        for (int64_t i = 0; i < KK; ++i) a.g_w[c * KK + i] = A(dw[i * LN + l]);
    }
  }
}

// Channels-last rows [p0, p1) of y (C values each), in place: y = act(sc[c] * y + sh[c]).
template <typename T, typename A>
void cl_apply_rows(const Args<T, A>& a, const A* sc, const A* sh, int64_t p0, int64_t p1) {
  const int64_t C = a.g.C;
  for (int64_t p = p0; p < p1; ++p) {
    T* y = a.out + p * C;
    if (a.swish)
      for (int64_t c = 0; c < C; ++c) y[c] = T(act<true>(sc[c] * A(y[c]) + sh[c], a.eb));
    else
      for (int64_t c = 0; c < C; ++c) y[c] = T(act<false>(sc[c] * A(y[c]) + sh[c], a.eb));
  }
}

// ---------------------------------------------------------------------------
// Instruction-set dispatch (cpu_vec.h): name##_isa(args...).
// ---------------------------------------------------------------------------
DF_MULTIVERSION(fwd_tasks)
DF_MULTIVERSION(fwd_eval_planes)
DF_MULTIVERSION(bwd_tasks)
DF_MULTIVERSION(cl_fwd_units)
DF_MULTIVERSION(cl_apply_rows)
DF_MULTIVERSION(bwd_tasks_cl)

// Channels-last forward: (training) conv -> per-unit statistics -> per-channel mean and biased variance,
// then conv with BatchNorm folded -> act; or, with a.z_in_y, the first pass also stores z in y and the
// second is an in-place y = act(sc * y + sh): one conv instead of two, for one more write and read of y.
// On this CPU that is 30-45% faster, but a backward right after then finds x cold and loses more than
// that, so fwd_impl sets z_in_y only when no gradient is needed.
template <typename T>
void forward_cl(const Args<T, at::opmath_type<T>>& a) {
  using A = at::opmath_type<T>;
  constexpr int LN = 64 / sizeof(A);
  const Geo& g = a.g;
  const Bands bd = make_bands(g);
  const int64_t units = g.N * bd.per_sample;
  std::vector<A> wl, bl;
  if (a.training) {
    cl_block_weights<LN>(a, false, wl, bl);
    std::vector<double> pm(units * g.C), pm2(units * g.C);
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      cl_fwd_units_isa(a, bd, wl.data(), bl.data(), pm.data(), pm2.data(), u0, u1);
    });
    at::parallel_for(0, g.C, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double mean = 0, m2 = 0;
        int64_t count = 0;
        for (int64_t u = 0; u < units; ++u) {
          const int64_t h0 = (u % bd.per_sample) * bd.rows, nu = (std::min(g.H, h0 + bd.rows) - h0) * g.W;
          merge_stats(mean, m2, count, pm[u * g.C + c], pm2[u * g.C + c], nu);
          count += nu;
        }
        a.mean[c] = A(mean);
        a.var[c] = A(m2 / double(count));
      }
    });
    if (a.z_in_y) {
      std::vector<A> sc(g.C), sh(g.C);
      for (int64_t c = 0; c < g.C; ++c) {
        const Coef<A> k = coef_of(a, c);
        sc[c] = k.sc, sh[c] = k.sh;
      }
      at::parallel_for(0, g.N * g.HW, 1 + (1 << 15) / g.C,
                       [&](int64_t p0, int64_t p1) { cl_apply_rows_isa(a, sc.data(), sh.data(), p0, p1); });
      return;
    }
  }
  cl_block_weights<LN>(a, true, wl, bl);
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    cl_fwd_units_isa(a, bd, wl.data(), bl.data(), static_cast<double*>(nullptr), static_cast<double*>(nullptr), u0, u1);
  });
}

// NCHW forward: y (and, training, the batch mean and biased variance) from a.
template <typename T>
void forward_nchw(const Args<T, at::opmath_type<T>>& a) {
  using A = at::opmath_type<T>;
  if (a.training) {
    const int64_t cb = fwd_block(a.g);
    at::parallel_for(0, (a.g.C + cb - 1) / cb, 1, [&](int64_t b, int64_t e) { fwd_tasks_isa(a, cb, b, e); });
  } else {
    std::vector<A> wf, bf;
    fold_weights(a, wf, bf);
    at::parallel_for(0, a.g.N * a.g.C, 1 + (1 << 15) / std::max<int64_t>(1, a.g.HW),
                     [&](int64_t b, int64_t e) { fwd_eval_planes_isa(a, wf.data(), bf.data(), b, e); });
  }
}

// The forward of one call: y (and, training, the batch mean and biased variance) from a.
template <typename T>
void forward(const Args<T, at::opmath_type<T>>& a) {
  a.g.cl ? forward_cl<T>(a) : forward_nchw<T>(a);
}

// The backward of one call: grad_x and the parameter grads of a, NCHW or channels-last. Grain 1: a task is a
// whole channel (block) over the batch.
template <typename T>
void backward_nchw(const Args<T, at::opmath_type<T>>& a) {
  at::parallel_for(0, a.g.tasks(), 1, [&](int64_t b, int64_t e) { bwd_tasks_isa(a, b, e); });
}

template <typename T, int kK>
void backward_cl(const Args<T, at::opmath_type<T>>& a) {
  const std::integral_constant<int, kK> k;
  at::parallel_for(0, a.g.tasks(), 1, [&](int64_t b, int64_t e) { bwd_tasks_cl_isa(a, k, b, e); });
}

template <typename T>
void backward(const Args<T, at::opmath_type<T>>& a) {
  if (!a.g.cl) return backward_nchw<T>(a);
  with_k(a.g, [&](auto K) { backward_cl<T, decltype(K)::value>(a); });
}

// forward_nchw<T>, forward_cl<T>, backward_nchw<T> and backward_cl<T, K> are instantiated one per file, in
// instances/dwconv_bn_swish_cpu_<entry>_<dtype>.cpp (DF_DWCONV_CPU_INSTANCE(, entry, T)) and
// instances/dwconv_bn_swish_cpu_backward_cl_k<K>_<dtype>.cpp (DF_DWCONV_CPU_CL_BWD_INSTANCE(, T, K)), nowhere
// else (extern here): each is compiled for three instruction sets, and a build with more cores compiles them in
// parallel. On a 2-core x86-64 machine they take 13-46 s each; one file per dtype took up to 190 s (the GPU machines'
// build's longest step), the 16-bit channels-last backwards of all kernel sizes in one file 135 s.
#define DF_DWCONV_CPU_INSTANCE(prefix, entry, T) prefix template void entry<T>(const Args<T, at::opmath_type<T>>& a);
#define DF_DWCONV_CPU_CL_BWD_INSTANCE(prefix, T, K) \
  prefix template void backward_cl<T, K>(const Args<T, at::opmath_type<T>>& a);
#define DF_DWCONV_CPU_EXTERN(T)                      \
  DF_DWCONV_CPU_INSTANCE(extern, forward_nchw, T)  \
  DF_DWCONV_CPU_INSTANCE(extern, forward_cl, T)    \
  DF_DWCONV_CPU_INSTANCE(extern, backward_nchw, T) \
  DF_DWCONV_CPU_CL_BWD_INSTANCE(extern, T, 1)      \
  DF_DWCONV_CPU_CL_BWD_INSTANCE(extern, T, 3)      \
  DF_DWCONV_CPU_CL_BWD_INSTANCE(extern, T, 5)
DF_DWCONV_CPU_EXTERN(float)
DF_DWCONV_CPU_EXTERN(double)
DF_DWCONV_CPU_EXTERN(at::Half)
DF_DWCONV_CPU_EXTERN(at::BFloat16)
#undef DF_DWCONV_CPU_EXTERN

}  // namespace dwconv_cpu
}  // namespace diffusion_fast
