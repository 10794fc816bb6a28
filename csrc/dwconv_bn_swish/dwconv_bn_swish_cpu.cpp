// CPU kernels of dwconv_bn_swish and bn_swish (math, dtypes and layouts: dwconv_bn_swish.h).
//
// Work is split by channel: a task owns one channel (NCHW) or a block of CB channels that share a
// 64-byte line (channels-last), for every sample, so the batch statistics of a channel never leave its
// thread and a channel's data stays in cache between passes. Per sample, the task copies its channels of
// x into zero-bordered fp32 planes (channels-last: transposed in one pass over the positions), H + 2R
// rows of Wp = ceil(W / VW) * VW + 2R, so that the k x k conv runs without bounds checks, VW outputs at
// a time in registers (VW = 8 or 16, K unrolled); channels-last outputs are transposed back the same way.
//   forward, training  pass 1: conv each plane, its mean and M2 (two passes over the plane in L1),
//                      merged over n with Chan's formula (double); pass 2: conv again (or read the
//                      channel's conv output back from a scratch buffer when N*H*W*CB*4 <= 1 MiB),
//                      y = swish(sc * z + sh) with sc = gamma * rstd, sh = beta - mean * sc.
//   forward, eval      one pass: conv, y = swish(sc * z + sh) from the running statistics.
//   backward           zhat = (z - mean) * rstd, dzn = dy * swish'(zn); training: pass A sums
//                      A = sum dzn, B = sum dzn * zhat (z and dzn kept in scratch when 2*N*H*W*CB*4 <=
//                      1 MiB, else rebuilt in pass B); pass B: dz = p * dzn + q * zhat + r with
//                      p = gamma * rstd, q = -p * B / M, r = -p * A / M (eval: q = r = 0 and A, B are
//                      summed in this one pass) into a zero-bordered plane, grad_x = conv(dz, flipped
//                      weight), grad_w[i][j] = sum dz * x[h+i-R][w+j-R], grad_conv_bias = sum dz,
//                      grad_bn_weight = B, grad_bn_bias = A.
// bn_swish is the same code with K = 1, weight 1 and no bias (z = x exactly).
// Inner loops are plain C++ that GCC vectorises; they are compiled for AVX-512, AVX2+FMA and baseline
// x86-64 and picked at run time (following ATEN_CPU_CAPABILITY), as in group_norm_silu_cpu.cpp.
#include "dwconv_bn_swish/dwconv_bn_swish.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

// GCC vector types are passed in registers only inside the flattened, target-specific kernels.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace diffusion_fast {
namespace {

// ---------------------------------------------------------------------------
// Element math (the exp fit of group_norm_silu_cpu.cpp: relative error < 2.4e-7).
// ---------------------------------------------------------------------------
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

// e^-z, with -z * log2(e) clamped to [-125, 57.7] (float; past it sigmoid is 1 or < 5e-18), exact for double.
inline float exp_neg(float z) { return exp2_approx(std::min(std::max(z * -1.44269504f, -125.0f), 57.7f)); }
inline double exp_neg(double z) { return std::exp(-z); }

// y = swish ? z * sigmoid(z) : z
template <bool SWISH, typename A>
inline A act(A z) {
  return SWISH ? z * (A(1) / (A(1) + exp_neg(z))) : z;
}

// dz = dy * act'(z) = dy * s * (1 + z * (1 - s)), s = sigmoid(z), for swish
template <bool SWISH, typename A>
inline A act_grad(A z, A dy) {
  if (!SWISH) return dy;
  const A s = A(1) / (A(1) + exp_neg(z));
  return dy * s * (A(1) + z * (A(1) - s));
}

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
  int64_t CB;      // channels per task

  int64_t plane(int64_t n, int64_t c) const { return cl ? n * HW * C + c : (n * C + c) * HW; }
  int64_t tasks() const { return (C + CB - 1) / CB; }
};

Geo make_geo(const DWConvBNShape& s, int64_t elem_size) {
  Geo g{};
  g.N = s.N, g.C = s.C, g.H = s.H, g.W = s.W, g.K = s.K, g.R = s.K / 2;
  g.HW = s.H * s.W;
  g.VW = s.W <= 8 ? 8 : 16;
  g.nb = (s.W + g.VW - 1) / g.VW;
  g.Wp = g.nb * g.VW + 2 * g.R;
  g.PS = (s.H + 2 * g.R) * g.Wp;
  g.cl = s.channels_last;
  g.CB = g.cl ? std::min<int64_t>(kMaxCB, 64 / elem_size) : 1;
  return g;
}

// ---------------------------------------------------------------------------
// Block copies: channels c0 .. c0 + cbn of sample n, between x, grad_y, y or grad_x and per-channel planes
// (NCHW: cbn == 1, a straight copy; channels-last: one pass over positions, each reading or writing the
// block's cbn contiguous channels, so every line of memory is touched once).
// ---------------------------------------------------------------------------
// Into the interiors of cbn zero-bordered padded planes, PS apart (the borders are never written).
template <typename T, typename A>
void load_padded(const T* x, const Geo& g, int64_t n, int64_t c0, int64_t cbn, A* pads) {
  const T* src = x + g.plane(n, c0);
  for (int64_t h = 0; h < g.H; ++h) {
    A* d = pads + (h + g.R) * g.Wp + g.R;
    if (!g.cl) {
      for (int64_t w = 0; w < g.W; ++w) d[w] = A(src[h * g.W + w]);
      continue;
    }
    for (int64_t w = 0; w < g.W; ++w) {
      const T* sp = src + (h * g.W + w) * g.C;
      for (int64_t j = 0; j < cbn; ++j) d[j * g.PS + w] = A(sp[j]);
    }
  }
}

// Into cbn dense planes, HW apart.
template <typename T, typename A>
void load_dense(const T* x, const Geo& g, int64_t n, int64_t c0, int64_t cbn, A* dst) {
  const T* src = x + g.plane(n, c0);
  if (!g.cl) {
    for (int64_t i = 0; i < g.HW; ++i) dst[i] = A(src[i]);
    return;
  }
  for (int64_t p = 0; p < g.HW; ++p)
    for (int64_t j = 0; j < cbn; ++j) dst[j * g.HW + p] = A(src[p * g.C + j]);
}

// From cbn dense planes, HW apart.
template <typename T, typename A>
void store_dense(const A* src, const Geo& g, int64_t n, int64_t c0, int64_t cbn, T* out) {
  T* dst = out + g.plane(n, c0);
  if (!g.cl) {
    for (int64_t i = 0; i < g.HW; ++i) dst[i] = T(src[i]);
    return;
  }
  for (int64_t p = 0; p < g.HW; ++p)
    for (int64_t j = 0; j < cbn; ++j) dst[p * g.C + j] = T(src[j * g.HW + p]);
}

// VW lanes of A as one GCC vector: lowered to one zmm (AVX-512), two ymm (AVX2) or xmm registers, so the
// conv's register blocking does not depend on the auto-vectoriser. Unaligned loads/stores go through memcpy.
template <typename A, int VW>
struct VecOf {
  typedef A type __attribute__((vector_size(VW * sizeof(A))));
};
template <typename A, int VW>
using Vec = typename VecOf<A, VW>::type;

template <int VW, typename A>
inline Vec<A, VW> loadu(const A* p) {
  Vec<A, VW> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// out[h * W + w] = bias + sum_{i,j} wt[i * K + j] * pad[(h + i) * Wp + w + j]
template <int K, int VW, typename A>
void conv_plane(const Geo& g, const A* pad, const A* wt, A bias, A* out) {
  using V = Vec<A, VW>;
  A wk[K * K];
  for (int t = 0; t < K * K; ++t) wk[t] = wt[t];
  for (int64_t h = 0; h < g.H; ++h) {
    for (int64_t b = 0; b < g.nb; ++b) {
      V acc = V{} + bias;
      for (int i = 0; i < K; ++i) {
        const A* row = pad + (h + i) * g.Wp + b * VW;
        for (int j = 0; j < K; ++j) acc += wk[i * K + j] * loadu<VW>(row + j);
      }
      A* o = out + h * g.W + b * VW;
      std::memcpy(o, &acc, sizeof(A) * std::min<int64_t>(VW, g.W - b * VW));
    }
  }
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
void apply_plane(int64_t n, const A* __restrict z, A sc, A sh, O* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = O(act<SWISH>(sc * z[i] + sh));
}

// Per-channel BatchNorm coefficients of one call.
template <typename A>
struct Coef {
  A mean, rstd, sc, sh;  // zn = sc * z + sh; sc = gamma * rstd, sh = beta - mean * sc
  A q, r;                // backward, training: dz = sc * dzn + q * zhat + r
};

// dzn = dy * act'(sc * z + sh) over a plane, into dzn; adds sum dzn and sum dzn * zhat to sa, sb.
template <bool SWISH, typename A>
void dzn_plane(int64_t n, const A* z, const A* dy, const Coef<A>& k, A* dzn, double& sa, double& sb) {
  A la[kLanes] = {}, lb[kLanes] = {};
  const auto step = [&](int64_t i, int j) {
    const A d = act_grad<SWISH>(k.sc * z[i] + k.sh, dy[i]);
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
  const T* x;
  const T* dy;                 // bwd: grad_y, x's layout
  T* out;                      // y (fwd) or grad_x (bwd)
  const A* w;                  // (C, K * K), or null for bn_swish (weight 1)
  const A *cb, *gamma, *beta;  // (C,) or null
  A *mean, *var;               // (C,): written by the training forward, read otherwise
  A *g_w, *g_cb, *g_gamma, *g_beta;  // bwd: (C, K * K), (C,) x 3; g_w and g_cb null without a conv
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

// z of planes c0 .. c0 + cbn of sample n into z_of(j): x copied into pads, then the conv (the identity
// for bn_swish).
template <typename T, typename A, typename ZOf>
void conv_block(const Args<T, A>& a, int64_t n, int64_t c0, int64_t cbn, A* pads, const ZOf& z_of) {
  const Geo& g = a.g;
  const A one(1);
  load_padded(a.x, g, n, c0, cbn, pads);
  with_kv(g, [&](auto K, auto VW) {
    for (int64_t j = 0; j < cbn; ++j) {
      const int64_t c = c0 + j;
      conv_plane<decltype(K)::value, decltype(VW)::value>(g, pads + j * g.PS, a.w ? a.w + c * g.K * g.K : &one,
                                                           a.cb ? a.cb[c] : A(0), z_of(j));
    }
  });
}

// Forward of tasks [t0, t1).
template <typename T, typename A>
void fwd_tasks(const Args<T, A>& a, int64_t t0, int64_t t1) {
  const Geo& g = a.g;
  const bool keep = a.training && g.N * g.CB * g.HW <= kMaxScratch;
  std::vector<A> pads(g.CB * g.PS, A(0)), zs((keep ? g.N : 1) * g.CB * g.HW), ob(g.cl ? g.CB * g.HW : 0);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = t * g.CB, cbn = std::min(g.CB, g.C - c0);
    const auto z_at = [&](int64_t n) {
      return [&, n](int64_t j) { return zs.data() + ((keep ? n * cbn : 0) + j) * g.HW; };
    };
    if (a.training) {  // batch statistics: per-plane (mean, M2), merged over n (Chan et al.)
      double mean[kMaxCB] = {}, m2[kMaxCB] = {};
      for (int64_t n = 0; n < g.N; ++n) {
        conv_block(a, n, c0, cbn, pads.data(), z_at(n));
        for (int64_t j = 0; j < cbn; ++j) {
          double pm, pm2;
          plane_stats(z_at(n)(j), g.HW, pm, pm2);
          const double delta = pm - mean[j], f = 1.0 / double(n + 1);
          mean[j] += delta * f;
          m2[j] += pm2 + delta * delta * double(g.HW) * double(n) * f;
        }
      }
      for (int64_t j = 0; j < cbn; ++j) {
        a.mean[c0 + j] = A(mean[j]);
        a.var[c0 + j] = A(m2[j] / double(g.N * g.HW));
      }
    }
    Coef<A> k[kMaxCB];
    for (int64_t j = 0; j < cbn; ++j) k[j] = coef_of(a, c0 + j);
    for (int64_t n = 0; n < g.N; ++n) {
      if (!keep) conv_block(a, n, c0, cbn, pads.data(), z_at(n));
      for (int64_t j = 0; j < cbn; ++j) {
        const A* z = z_at(n)(j);
        if (g.cl)
          a.swish ? apply_plane<true>(g.HW, z, k[j].sc, k[j].sh, ob.data() + j * g.HW)
                  : apply_plane<false>(g.HW, z, k[j].sc, k[j].sh, ob.data() + j * g.HW);
        else  // cbn == 1: straight into y
          a.swish ? apply_plane<true>(g.HW, z, k[j].sc, k[j].sh, a.out + g.plane(n, c0))
                  : apply_plane<false>(g.HW, z, k[j].sc, k[j].sh, a.out + g.plane(n, c0));
      }
      if (g.cl) store_dense(ob.data(), g, n, c0, cbn, a.out);
    }
  }
}

// Backward of tasks [t0, t1).
template <typename T, typename A>
void bwd_tasks(const Args<T, A>& a, int64_t t0, int64_t t1) {
  const Geo& g = a.g;
  const int64_t KK = g.K * g.K, block = g.CB * g.HW;
  const bool keep = a.training && 2 * g.N * block <= kMaxScratch;
  const int64_t kept = (keep ? g.N : 1) * block;
  std::vector<A> pads(g.CB * g.PS, A(0)), dzpad(g.PS, A(0)), zs(kept), dzns(kept), dyb(block), dxb(block);
  const double M = double(g.N * g.HW);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = t * g.CB, cbn = std::min(g.CB, g.C - c0);
    Coef<A> k[kMaxCB];
    double sa[kMaxCB] = {}, sb[kMaxCB] = {}, sdz[kMaxCB] = {}, unused_a[kMaxCB], unused_b[kMaxCB];
    std::vector<double> dw(cbn * KK, 0.0);
    const auto slot = [&](std::vector<A>& v, int64_t n, int64_t j) {
      return v.data() + ((keep ? n * cbn : 0) + j) * g.HW;
    };
    // z (conv; x left in pads) and dzn (from grad_y) of sample n; adds sum dzn, sum dzn * zhat to sa_, sb_
    const auto rebuild = [&](int64_t n, double* sa_, double* sb_) {
      conv_block(a, n, c0, cbn, pads.data(), [&](int64_t j) { return slot(zs, n, j); });
      load_dense(a.dy, g, n, c0, cbn, dyb.data());
      for (int64_t j = 0; j < cbn; ++j)
        a.swish ? dzn_plane<true>(g.HW, slot(zs, n, j), dyb.data() + j * g.HW, k[j], slot(dzns, n, j), sa_[j], sb_[j])
                : dzn_plane<false>(g.HW, slot(zs, n, j), dyb.data() + j * g.HW, k[j], slot(dzns, n, j), sa_[j], sb_[j]);
    };
    for (int64_t j = 0; j < cbn; ++j) k[j] = coef_of(a, c0 + j);  // q = r = 0 unless training
    if (a.training) {  // pass A: the sums that dz needs
      for (int64_t n = 0; n < g.N; ++n) rebuild(n, sa, sb);
      for (int64_t j = 0; j < cbn; ++j) {
        k[j].q = A(-double(k[j].sc) * sb[j] / M);
        k[j].r = A(-double(k[j].sc) * sa[j] / M);
      }
    }
    for (int64_t n = 0; n < g.N; ++n) {  // pass B: dz, grad_x, weight grads
      if (keep)
        load_padded(a.x, g, n, c0, cbn, pads.data());  // x for the weight grads
      else if (a.training)
        rebuild(n, unused_a, unused_b);  // the sums are complete
      else
        rebuild(n, sa, sb);  // eval: the sums are only outputs, summed in this one pass
      for (int64_t j = 0; j < cbn; ++j) {
        const int64_t c = c0 + j;
        sdz[j] += dz_plane(g, slot(zs, n, j), slot(dzns, n, j), k[j], dzpad.data());
        A wflip[25] = {A(1)};  // bn_swish: weight 1, grad_x = dz
        if (a.w)
          for (int64_t i = 0; i < KK; ++i) wflip[i] = a.w[c * KK + KK - 1 - i];
        with_kv(g, [&](auto K, auto VW) {
          constexpr int kK = decltype(K)::value, kVW = decltype(VW)::value;
          conv_plane<kK, kVW>(g, dzpad.data(), wflip, A(0), dxb.data() + j * g.HW);
          if (a.g_w) wgrad_plane<kK, kVW>(g, dzpad.data(), pads.data() + j * g.PS, dw.data() + j * KK);
        });
      }
      store_dense(dxb.data(), g, n, c0, cbn, a.out);
    }
    for (int64_t j = 0; j < cbn; ++j) {
      const int64_t c = c0 + j;
      a.g_gamma[c] = A(sb[j]);
      a.g_beta[c] = A(sa[j]);
      if (a.g_cb) a.g_cb[c] = A(sdz[j]);
      if (a.g_w)
        for (int64_t i = 0; i < KK; ++i) a.g_w[c * KK + i] = A(dw[j * KK + i]);
    }
  }
}

// ---------------------------------------------------------------------------
// Instruction-set dispatch: name##_isa(args, begin, end).
// ---------------------------------------------------------------------------
enum class Isa { base, avx2, avx512 };

#if defined(__x86_64__) && defined(__GNUC__)
Isa cpu_isa() {
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

// `flatten` inlines the whole stage into each wrapper, so it is compiled for the wrapper's target.
#define DF_MULTIVERSION(name)                                                                                \
  template <typename T, typename A>                                                                          \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"), flatten)) void name##_avx512(        \
      const Args<T, A>& a, int64_t begin, int64_t end) {                                                     \
    name(a, begin, end);                                                                                     \
  }                                                                                                          \
  template <typename T, typename A>                                                                          \
  __attribute__((target("avx2,fma"), flatten)) void name##_avx2(const Args<T, A>& a, int64_t begin,          \
                                                                int64_t end) {                               \
    name(a, begin, end);                                                                                     \
  }                                                                                                          \
  template <typename T, typename A>                                                                          \
  __attribute__((flatten)) void name##_base(const Args<T, A>& a, int64_t begin, int64_t end) {               \
    name(a, begin, end);                                                                                     \
  }                                                                                                          \
  template <typename T, typename A>                                                                          \
  void name##_isa(const Args<T, A>& a, int64_t begin, int64_t end) {                                         \
    switch (cpu_isa()) {                                                                                     \
      case Isa::avx512: return name##_avx512(a, begin, end);                                                 \
      case Isa::avx2: return name##_avx2(a, begin, end);                                                     \
      default: return name##_base(a, begin, end);                                                            \
    }                                                                                                        \
  }
#else
#define DF_MULTIVERSION(name)                                                   \
  template <typename T, typename A>                                             \
  void name##_isa(const Args<T, A>& a, int64_t begin, int64_t end) {            \
    name(a, begin, end);                                                        \
  }
#endif

DF_MULTIVERSION(fwd_tasks)
DF_MULTIVERSION(bwd_tasks)

// ---------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------
bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// Small optional tensors in the accumulation dtype, contiguous (undefined when absent).
at::Tensor to_acc(const OptTensor& t, at::ScalarType acc) {
  return present(t) ? t->to(acc).contiguous() : at::Tensor();
}

template <typename A>
const A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

template <typename A>
A* mut_or_null(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<A>() : nullptr;
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Grain 1: a task is a whole channel (block) over the batch.
template <typename F>
void run_tasks(const Geo& g, const F& f) {
  at::parallel_for(0, g.tasks(), 1, f);
}

Fwd fwd_impl(const at::Tensor& x, const OptTensor& conv_weight, const OptTensor& conv_bias,
             const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
             const OptTensor& running_var, bool training, double eps, bool swish) {
  const auto s = dwconv_bn_swish_shape(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                                       training);
  const auto acc = acc_type(x);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = training ? at::empty({s.C}, x.options().dtype(acc)) : running_mean->to(acc, false, true);
  at::Tensor var = training ? at::empty({s.C}, x.options().dtype(acc)) : running_var->to(acc, false, true);
  if (x.numel() == 0) return {y, training ? mean.fill_(NAN) : mean, training ? var.fill_(NAN) : var};
  const at::Tensor w = present(conv_weight) ? conv_weight->to(acc).contiguous() : at::Tensor();
  const at::Tensor cb = to_acc(conv_bias, acc), gamma = to_acc(bn_weight, acc), beta = to_acc(bn_bias, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_swish_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const Args<scalar_t, A> a{make_geo(s, sizeof(scalar_t)), training, swish, eps, x.const_data_ptr<scalar_t>(),
                              nullptr, y.mutable_data_ptr<scalar_t>(), ptr_or_null<A>(w), ptr_or_null<A>(cb),
                              ptr_or_null<A>(gamma), ptr_or_null<A>(beta), mean.mutable_data_ptr<A>(),
                              var.mutable_data_ptr<A>(), nullptr, nullptr, nullptr, nullptr};
    run_tasks(a.g, [&](int64_t b, int64_t e) { fwd_tasks_isa(a, b, e); });
  });
  return {y, mean, var};
}

// grad_x and the (C * K * K,), (C,) x 3 grads in the accumulation dtype (undefined when not wanted).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& conv_weight, const OptTensor& conv_bias,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const at::Tensor& mean, const at::Tensor& var,
    bool training, double eps, bool swish) {
  const auto s = dwconv_bn_swish_shape(x, conv_weight, conv_bias, bn_weight, bn_bias, OptTensor(), OptTensor(),
                                       /*training=*/true);
  dwconv_bn_swish_check_bwd(grad_y, x, s, mean, var);
  const auto acc = acc_type(x);
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor grad_x = at::empty_like(x);
  const bool conv = present(conv_weight);
  at::Tensor g_w = conv ? at::zeros({s.C * s.K * s.K}, acc_opts) : at::Tensor();
  at::Tensor g_cb = conv ? at::zeros({s.C}, acc_opts) : at::Tensor();
  at::Tensor g_gamma = at::zeros({s.C}, acc_opts), g_beta = at::zeros({s.C}, acc_opts);
  if (x.numel() == 0) return {grad_x, g_w, g_cb, g_gamma, g_beta};
  const at::Tensor w = conv ? conv_weight->to(acc).contiguous() : at::Tensor();
  const at::Tensor cb = to_acc(conv_bias, acc), gamma = to_acc(bn_weight, acc), beta = to_acc(bn_bias, acc);
  const at::Tensor mean_c = mean.contiguous(), var_c = var.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_swish_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    // mean/var are only read; Args shares one struct with the forward, which writes them.
    const Args<scalar_t, A> a{make_geo(s, sizeof(scalar_t)), training, swish, eps, x.const_data_ptr<scalar_t>(),
                              grad_y.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
                              ptr_or_null<A>(w), ptr_or_null<A>(cb), ptr_or_null<A>(gamma), ptr_or_null<A>(beta),
                              const_cast<A*>(mean_c.const_data_ptr<A>()), const_cast<A*>(var_c.const_data_ptr<A>()),
                              mut_or_null<A>(g_w), mut_or_null<A>(g_cb), g_gamma.mutable_data_ptr<A>(),
                              g_beta.mutable_data_ptr<A>()};
    run_tasks(a.g, [&](int64_t b, int64_t e) { bwd_tasks_isa(a, b, e); });
  });
  return {grad_x, g_w, g_cb, g_gamma, g_beta};
}

// A gradient in its input's dtype and shape, or an empty (0,) tensor when the input is absent.
at::Tensor grad_as(const OptTensor& t, const at::Tensor& g, const at::Tensor& x) {
  return present(t) ? g.reshape(t->sizes()).to(t->scalar_type(), false, /*copy=*/true) : at::empty({0}, x.options());
}

}  // namespace

Fwd dwconv_bn_swish_fwd_cpu(const at::Tensor& x, const at::Tensor& conv_weight, const OptTensor& conv_bias,
                            const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                            const OptTensor& running_var, bool training, double eps, bool swish) {
  return fwd_impl(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, eps, swish);
}

DWBwd dwconv_bn_swish_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& conv_weight,
                              const OptTensor& conv_bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
                              const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool swish) {
  auto [gx, gw, gcb, gg, gb] = bwd_impl(grad_y, x, conv_weight, conv_bias, bn_weight, bn_bias, mean, var, training,
                                        eps, swish);
  return {gx, grad_as(conv_weight, gw, x), grad_as(conv_bias, gcb, x), grad_as(bn_weight, gg, x),
          grad_as(bn_bias, gb, x)};
}

Fwd bn_swish_fwd_cpu(const at::Tensor& x, const OptTensor& bn_weight, const OptTensor& bn_bias,
                     const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps,
                     bool swish) {
  return fwd_impl(x, OptTensor(), OptTensor(), bn_weight, bn_bias, running_mean, running_var, training, eps, swish);
}

BNBwd bn_swish_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& bn_weight,
                       const OptTensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, bool training,
                       double eps, bool swish) {
  auto [gx, gw, gcb, gg, gb] = bwd_impl(grad_y, x, OptTensor(), OptTensor(), bn_weight, bn_bias, mean, var, training,
                                        eps, swish);
  return {gx, grad_as(bn_weight, gg, x), grad_as(bn_bias, gb, x)};
}

}  // namespace diffusion_fast
