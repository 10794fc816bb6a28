// CPU kernels of group_norm_silu (math, dtypes and layouts: group_norm_silu.h).
//
// Both directions run three stages over "units", blocks of <= ~16 KiB of x:
//   1. partials, from one read of each unit: fwd, mean and M2 of h = x + pre_bias (two passes; the
//      second hits L1/L2); bwd, per-channel sums of dz, dz * u and u.
//   2. combine, per (n, g) group: merge the partials (fwd: Chan's formula, robust when |mean| >> std)
//      into mean/rstd and per-(n, c) coefficients.
//   3. apply: y = act(ca * u + cb) (fwd) or grad_x = cp * dz + cq * u + cr (bwd), u = x - mx = h - mean.
// NCHW: a unit is a chunk of one channel row, or (fwd) several short rows of one group. Channels-last
// (and S == 1): a unit is a block of positions of one sample with all C channels, vectorised over c.
// With >= 4 segments (NCHW: a group; channels-last: a sample) per thread, each thread runs the three
// stages segment by segment while it is in cache: the forward prefetches the next segment during
// apply, the backward keeps dz in a scratch buffer instead of recomputing the sigmoid. Memory traffic
// is then one read of x (and grad_y) and one write of the output; with fewer segments each stage is
// its own parallel loop and the inputs are read twice.
// NCHW groups of <= kGroupMax elements (at 32 groups: 32x32 maps up to 128 channels, 16x16 up to 512)
// skip the units instead: a group is one contiguous run of D rows of S positions, and each thread takes
// whole groups, in blocks, stage by stage (fwd_groups; bwd_groups for rows of < kBlock positions). Rows
// get only cheap affine passes; sums that need no per-row term and the sigmoid run as flat loops over
// the block (through a scratch buffer), so a 2x2 map's 4-element rows pay no scalar sigmoid, and there
// is no per-row reduction tree, partial, division or dispatch.
// Inner loops are plain C++ that GCC vectorises; they are compiled for AVX-512, AVX2+FMA and baseline
// x86-64 and picked at run time (cpu_vec.h, shared with dwconv_bn_swish), so the build needs no -march flag.
#include "group_norm_silu/group_norm_silu.h"

#include "cpu_params.h"
#include "cpu_vec.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace diffusion_fast {
namespace {

using cpu_params::acc_type;
using cpu_params::ptr_or_null;
using cpu_params::to_acc;
using cpu_vec::act;
using cpu_vec::act_grad;
using cpu_vec::ExpBounds;
using cpu_vec::loadu;
using cpu_vec::loadu_as;
using cpu_vec::prefetch;
using cpu_vec::sum_rows8;
using cpu_vec::Vec;

constexpr int kLanes = 32;            // accumulators per sum
constexpr int64_t kBlock = 128;      // elements between prefetches in apply loops
constexpr int64_t kGrain = 32768;    // elements per task, as ATen's
constexpr int64_t kUnitMax = 4096;   // NCHW elements per unit (make_plan), at most
constexpr int64_t kGroupMax = 4096;  // NCHW groups up to this size are taken whole (16 KiB of fp32)

// Adds the kLanes lanes as a shallow tree (GCC keeps the first levels in vector registers).
template <typename A>
inline A reduce_lanes(const A* l) {
  static_assert(kLanes == 32, "the tree below adds 32 lanes");
  A t[8];
  for (int j = 0; j < 8; ++j) t[j] = (l[j] + l[j + 8]) + (l[j + 16] + l[j + 24]);
  return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
}

// Adds f(0), ..., f(n - 1) into kLanes independent lanes (vectorisable without -ffast-math).
template <typename A, typename F>
inline void lane_add(A* lanes, int64_t n, const F& f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += f(i + j);
  for (int j = 0; i < n; ++i, ++j) lanes[j] += f(i);
}

// f(0) + ... + f(n - 1) in kLanes lanes (enough independent adds to hide their latency), then in 8 lanes
// and a scalar for the tail, then a tree; every index constant after unrolling, so the lanes live in
// vector registers.
template <typename A, typename F>
inline A lane_sum(int64_t n, const F& f) {
  static_assert(kLanes == 32, "the folds below take 32 lanes to 8");
  A l[kLanes] = {}, t = 0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) l[j] += f(i + j);
  for (int j = 0; j < 8; ++j) l[j] = (l[j] + l[j + 8]) + (l[j + 16] + l[j + 24]);
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) l[j] += f(i + j);
  for (; i < n; ++i) t += f(i);
  return (((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))) + t;
}

// M2 of a group whose D rows of S positions (at x) each have their own mean: sum of (x - mx_r)^2,
// mx_r = m - pb[r]. The squares gather in vector lanes across the rows (one horizontal sum per group,
// not one per row); positions past the last 16 of a row in a scalar.
template <typename A, typename T>
inline A group_m2(int64_t D, int64_t S, const T* __restrict x, A m, const A* __restrict pb) {
  if (S < 16) {  // short rows (a 2x2 map's 4 positions): one chain per position, across the rows
    A t[16] = {};
    for (int64_t r = 0; r < D; ++r)
      for (int64_t i = 0; i < S; ++i) {
        const A d = A(x[r * S + i]) - (m - pb[r]);
        t[i] += d * d;
      }
    A sum = 0;
    for (int64_t i = 0; i < S; ++i) sum += t[i];
    return sum;
  }
  using V = Vec<A, 16>;
  V acc[2] = {};  // alternate rows: two dependency chains
  A tail = 0;
  for (int64_t r = 0; r < D; ++r) {
    const T* xr = x + r * S;
    const A mx = m - pb[r];
    const V mv = V{} + mx;
    int64_t i = 0;
    for (; i + 16 <= S; i += 16) {
      const V d = loadu_as<16, A>(xr + i) - mv;
      acc[r & 1] += d * d;
    }
    for (; i < S; ++i) {
      const A d = A(xr[i]) - mx;
      tail += d * d;
    }
  }
  const V t = acc[0] + acc[1];
  for (int j = 0; j < 16; ++j) tail += t[j];
  return tail;
}

template <typename A>
struct Sum3 {
  A s0, s1, s2;
};

// Sums of dz, dz * u and u over n elements, u = x - mx (x of type T, dz of type A or T): 32 lanes per sum
// in two vectors each, kept in registers (the array lanes of lane_add were spilled to the stack here).
template <typename A, typename T, typename D>
inline Sum3<A> dz_sums(int64_t n, const T* __restrict x, const D* __restrict dz, A mx) {
  using V = Vec<A, 16>;
  Sum3<A> r{0, 0, 0};
  int64_t i = 0;
  if (n >= 32) {  // (short rows, e.g. the 4 positions of a 2x2 map, skip the lane sums)
    const V m = V{} + mx;
    V s0[2] = {}, s1[2] = {}, s2[2] = {};
    for (; i + 32 <= n; i += 32)
      for (int h = 0; h < 2; ++h) {
        const V d = loadu_as<16, A>(dz + i + 16 * h), u = loadu_as<16, A>(x + i + 16 * h) - m;
        s0[h] += d, s1[h] += d * u, s2[h] += u;
      }
    const V t0 = s0[0] + s0[1], t1 = s1[0] + s1[1], t2 = s2[0] + s2[1];
    for (int j = 0; j < 16; ++j) r.s0 += t0[j], r.s1 += t1[j], r.s2 += t2[j];
  }
  for (; i < n; ++i) {
    const A d = A(dz[i]), u = A(x[i]) - mx;
    r.s0 += d, r.s1 += d * u, r.s2 += u;
  }
  return r;
}

// ---------------------------------------------------------------------------
// Work split.
// ---------------------------------------------------------------------------
struct Plan {
  int64_t N, C, G, D, S;  // D = C / G channels per group
  bool cl;                // C innermost (channels-last, or S == 1)
  int64_t rows;           // NCHW: channel rows per unit (a divisor of D); 1 for cl
  int64_t chunks;         // units per row block (NCHW) or per sample (cl)
  int64_t len;            // spatial positions per unit and row (fewer in the last chunk)

  int64_t units() const { return (cl ? N : N * C / rows) * chunks; }
  int64_t count(int64_t k) const { return std::min(len, S - k * len); }
  // Element offset of unit u; units tile memory in order.
  int64_t offset(int64_t u) const {
    const int64_t block = u / chunks, start = (u % chunks) * len;
    return cl ? (block * S + start) * C : block * rows * S + start;
  }
  // Index of the per-channel partials of channel c of sample n in its k-th unit (cl, or rows == 1).
  int64_t part(int64_t n, int64_t c, int64_t k) const { return cl ? (n * chunks + k) * C + c : (n * C + c) * chunks + k; }
  // A segment is a run of whole groups and the units covering them: a group (NCHW) or a sample (cl).
  int64_t segments() const { return cl ? N : N * G; }
  int64_t seg_units() const { return cl ? chunks : D / rows * chunks; }
  int64_t seg_groups() const { return cl ? G : 1; }
};

// row_blocks: NCHW units may span several channel rows of a group (partials per unit, not per channel).
Plan make_plan(const GroupNormSiLUShape& s, bool row_blocks) {
  Plan p{s.N, s.C, s.G, s.C / s.G, s.S, s.channels_last || s.S == 1, 1, 0, 0};
  // ~16 KiB of fp32 per NCHW unit; >= 64 positions per cl unit (bounds the partials to numel / 32).
  const int64_t target = p.cl ? std::max<int64_t>(64, 4096 / std::max<int64_t>(p.C, 1)) : kUnitMax;
  if (!p.cl && row_blocks)
    for (int64_t r = std::min(p.D, target / std::max<int64_t>(p.S, 1)); r > 1; --r)
      if (p.D % r == 0) {
        p.rows = r;
        break;
      }
  p.chunks = (p.S + target - 1) / target;
  p.len = p.chunks == 0 ? 0 : (p.S + p.chunks - 1) / p.chunks;
  return p;
}

// What the fused schedule gives a stage for one segment.
template <typename A>
struct Seg {
  A* dz = nullptr;        // bwd: scratch for dz over the segment (else recomputed)
  bool prefetch = false;  // fwd apply: prefetch the next segment, overlapping its loads with this one's math
};

// Runs stats(units), combine(groups), apply(units) over index ranges [begin, end): per segment on one
// thread when there are enough segments (with a dz scratch buffer if use_scratch, prefetching the next
// segment during apply if prefetch), else stage by stage.
template <typename A, typename Stats, typename Combine, typename Apply>
void schedule(const Plan& p, bool use_scratch, bool prefetch, const Stats& stats, const Combine& combine,
              const Apply& apply) {
  constexpr int64_t kMaxScratch = 1 << 17;  // segment elements to keep in cache (512 KiB of fp32)
  const int64_t numel = p.N * p.C * p.S, units = p.units(), segments = p.segments();
  if (units == 0) {
    combine(0, p.N * p.G);
    return;
  }
  if (segments >= 4 * at::get_num_threads()) {
    const int64_t U = p.seg_units(), K = p.seg_groups(), seg_numel = numel / segments;
    const bool keep = use_scratch && seg_numel <= kMaxScratch;
    at::parallel_for(0, segments, kGrain / seg_numel + 1, [&](int64_t begin, int64_t end) {
      std::vector<A> scratch(keep ? seg_numel : 0);
      const Seg<A> seg{keep ? scratch.data() : nullptr, prefetch && seg_numel <= kMaxScratch};
      for (int64_t i = begin; i < end; ++i) {
        stats(i * U, (i + 1) * U, seg);
        combine(i * K, (i + 1) * K);
        apply(i * U, (i + 1) * U, seg);
      }
    });
  } else {
    const int64_t grain = kGrain * units / numel + 1;
    at::parallel_for(0, units, grain, [&](int64_t b, int64_t e) { stats(b, e, Seg<A>{}); });
    at::parallel_for(0, p.N * p.G, 64, combine);
    at::parallel_for(0, units, grain, [&](int64_t b, int64_t e) { apply(b, e, Seg<A>{}); });
  }
}

// NCHW groups taken whole (fwd_groups, bwd_groups): small enough, and enough of them for every thread.
bool whole_groups(const Plan& p) {
  return !p.cl && p.S > 0 && p.D * p.S <= kGroupMax && p.N * p.G >= 4 * at::get_num_threads();
}

// Groups per block of fwd_groups and bwd_groups.
int64_t block_groups(const Plan& p) { return std::max<int64_t>(1, kGroupMax / (p.D * p.S)); }

// f(begin, end, buf) over ranges of the N * G groups, buf a scratch of one group's elements.
template <typename A, typename F>
void run_groups(const Plan& p, const F& f) {
  const int64_t L = p.D * p.S;
  at::parallel_for(0, p.N * p.G, kGrain / L + 1, [&](int64_t begin, int64_t end) {
    const std::unique_ptr<A[]> buf(new A[std::min(end - begin, block_groups(p)) * L]);
    f(begin, end, buf.get());
  });
}

// ---------------------------------------------------------------------------
// Data of one call. A is the accumulation type (double for double x, else float).
// Per (n, c): u = x - mx = h - mean, z = ca * u + cb.
// ---------------------------------------------------------------------------
template <typename T, typename A>
struct Args {
  Plan p;
  bool silu;
  ExpBounds eb;
  double eps;             // fwd
  const T* x;             // (N, C, S) in the layout of p
  const T* dy;            // bwd: grad_y, same layout
  T* out;                 // y (fwd) or grad_x (bwd)
  const A *w, *b;         // (C,) or null
  const A *pb, *sc, *sh;  // (N, C) or null
  A *mean, *rstd;         // (N, G)
  A *mx, *ca, *cb;        // (N, C)
  A *cp, *cq, *cr;        // (N, C) bwd: grad_x = cp * dz + cq * u + cr
  A *p0, *p1, *p2;        // partials (Plan::part): fwd mean, M2; bwd sum dz, sum dz * u, sum u
  A* g[5];                // bwd (N, C) each: grads of pre_bias, scale, shift; weight, bias per n
};

// xhat = rstd * u; a one-element group has xhat == 0 exactly, which rstd = 0 keeps exact.
template <typename T, typename A>
A effective_rstd(const Args<T, A>& a, int64_t ng) {
  return a.p.D * a.p.S > 1 ? a.rstd[ng] : A(0);
}

template <typename T, typename A>
void set_coefficients(const Args<T, A>& a, int64_t n, int64_t c, int64_t ng) {
  const int64_t nc = n * a.p.C + c;
  const A scale1 = a.sc ? A(1) + a.sc[nc] : A(1);
  a.mx[nc] = a.mean[ng] - (a.pb ? a.pb[nc] : A(0));
  a.ca[nc] = effective_rstd(a, ng) * (a.w ? a.w[c] : A(1)) * scale1;
  a.cb[nc] = (a.b ? a.b[c] : A(0)) * scale1 + (a.sh ? a.sh[nc] : A(0));
}

// ---------------------------------------------------------------------------
// One spatial row of a channels-last unit (C channels, contiguous). __restrict lets GCC vectorise
// over c without run-time overlap checks between the many arrays.
// ---------------------------------------------------------------------------
template <typename T, typename A>
inline void cl_sum_row(int64_t C, const T* __restrict x, A* __restrict sum) {
  for (int64_t c = 0; c < C; ++c) sum[c] += A(x[c]);
}

template <typename T, typename A>
inline void cl_m2_row(int64_t C, const T* __restrict x, const A* __restrict mean, A* __restrict m2) {
  for (int64_t c = 0; c < C; ++c) {
    const A d = A(x[c]) - mean[c];
    m2[c] += d * d;
  }
}

// The same for n positions of one NCHW channel (scalar coefficients).
template <bool silu, typename T, typename A>
inline void nchw_fwd_row(int64_t n, const T* __restrict x, A mx, A ca, A cb, T* __restrict y, ExpBounds eb) {
  for (int64_t i = 0; i < n; ++i) y[i] = T(act<silu>(ca * (A(x[i]) - mx) + cb, eb));
}

template <bool silu, typename T, typename A>
inline void cl_fwd_row(int64_t C, const T* __restrict x, const A* __restrict mx, const A* __restrict ca,
                       const A* __restrict cb, T* __restrict y, ExpBounds eb) {
  for (int64_t c = 0; c < C; ++c) y[c] = T(act<silu>(ca[c] * (A(x[c]) - mx[c]) + cb[c], eb));
}

// Adds dz, dz * u and u per channel into s0, s1, s2; stores dz too if keep.
template <bool silu, bool keep, typename T, typename A>
inline void cl_bwd_sums_row(int64_t C, const T* __restrict x, const T* __restrict dy, const A* __restrict mx,
                            const A* __restrict ca, const A* __restrict cb, A* __restrict s0, A* __restrict s1,
                            A* __restrict s2, A* __restrict dz_out, ExpBounds eb) {
  for (int64_t c = 0; c < C; ++c) {
    const A xu = A(x[c]) - mx[c], dz = act_grad<silu>(ca[c] * xu + cb[c], A(dy[c]), eb);
    if (keep) dz_out[c] = dz;
    s0[c] += dz, s1[c] += dz * xu, s2[c] += xu;
  }
}

// grad_x = cp * dz + cq * u + cr, dz read back if keep, else recomputed.
template <bool silu, bool keep, typename T, typename A>
inline void nchw_bwd_row(int64_t n, const T* __restrict x, const T* __restrict dy, const A* __restrict dz_in, A mx,
                         A ca, A cb, A cp, A cq, A cr, T* __restrict dx, ExpBounds eb) {
  for (int64_t i = 0; i < n; ++i) {
    const A xu = A(x[i]) - mx;
    const A dz = keep ? dz_in[i] : act_grad<silu>(ca * xu + cb, A(dy[i]), eb);
    dx[i] = T(cp * dz + cq * xu + cr);
  }
}

template <bool silu, bool keep, typename T, typename A>
inline void cl_bwd_row(int64_t C, const T* __restrict x, const T* __restrict dy, const A* __restrict dz_in,
                       const A* __restrict mx, const A* __restrict ca, const A* __restrict cb, const A* __restrict cp,
                       const A* __restrict cq, const A* __restrict cr, T* __restrict dx, ExpBounds eb) {
  for (int64_t c = 0; c < C; ++c) {
    const A xu = A(x[c]) - mx[c];
    const A dz = keep ? dz_in[c] : act_grad<silu>(ca[c] * xu + cb[c], A(dy[c]), eb);
    dx[c] = T(cp[c] * dz + cq[c] * xu + cr[c]);
  }
}

// ---------------------------------------------------------------------------
// Forward stages.
// ---------------------------------------------------------------------------
// Per unit: mean and M2 of h = x + pre_bias, two passes (the unit is in L1/L2 for the second).
template <typename T, typename A>
void fwd_stats(const Args<T, A>& a, int64_t begin, int64_t end, Seg<A>) {
  const Plan& p = a.p;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t cnt = p.count(u % p.chunks);
    const T* x = a.x + p.offset(u);
    if (!p.cl) {  // p.rows channel rows of cnt contiguous positions: one partial
      const int64_t row0 = (u / p.chunks) * p.rows;
      A lanes[kLanes] = {};
      for (int64_t r = 0; r < p.rows; ++r) {
        const T* xr = x + r * p.S;
        const A pb = a.pb ? a.pb[row0 + r] : A(0);
        lane_add(lanes, cnt, [&](int64_t i) { return A(xr[i]) + pb; });
      }
      const A m = reduce_lanes(lanes) / A(p.rows * cnt);
      std::fill(lanes, lanes + kLanes, A(0));
      for (int64_t r = 0; r < p.rows; ++r) {
        const T* xr = x + r * p.S;
        const A pb_m = (a.pb ? a.pb[row0 + r] : A(0)) - m;
        lane_add(lanes, cnt, [&](int64_t i) { const A d = A(xr[i]) + pb_m; return d * d; });
      }
      a.p0[u] = m;
      a.p1[u] = reduce_lanes(lanes);
    } else {  // cnt positions x C channels: one partial per channel
      const int64_t C = p.C;
      A *m = a.p0 + u * C, *m2 = a.p1 + u * C;
      std::fill(m, m + C, A(0));
      std::fill(m2, m2 + C, A(0));
      for (int64_t s = 0; s < cnt; ++s) cl_sum_row(C, x + s * C, m);
      for (int64_t c = 0; c < C; ++c) m[c] /= A(cnt);
      for (int64_t s = 0; s < cnt; ++s) cl_m2_row(C, x + s * C, m, m2);
      if (a.pb)
        for (int64_t c = 0; c < C; ++c) m[c] += a.pb[(u / p.chunks) * C + c];
    }
  }
}

// Chan's merge of the group's partials: mean, and M2 = sum of M2_i + count_i * (mean_i - mean)^2.
template <typename T, typename A>
void fwd_combine(const Args<T, A>& a, int64_t begin, int64_t end) {
  const Plan& p = a.p;
  for (int64_t ng = begin; ng < end; ++ng) {
    const int64_t n = ng / p.G, c0 = (ng % p.G) * p.D;
    // f(count, partial index) over the group's partials, as sum over chunks k of (sum over the partials
    // of chunk k): the inner sums are independent, so the double adds do not form one chain of D * chunks
    // (channels-last 8x128x32x32, 64 partials a group: 191 -> 145 us a call with x in cache, 2 threads; with x
    // coming from memory the call is bandwidth-bound and did not change).
    const auto sum_pieces = [&](const auto& f) {
      double total = 0;
      if (p.cl) {
        for (int64_t k = 0; k < p.chunks; ++k) {
          double t = 0;
          for (int64_t c = c0; c < c0 + p.D; ++c) t += f(p.count(k), p.part(n, c, k));
          total += t;
        }
      } else {
        const int64_t u0 = (n * p.C + c0) / p.rows * p.chunks;
        for (int64_t u = u0; u < u0 + p.seg_units(); ++u) total += f(p.rows * p.count(u % p.chunks), u);
      }
      return total;
    };
    const double total = double(p.D * p.S);  // double: a group may hold ~1e9 elements in ~1e5 partials
    const double sum = sum_pieces([&](int64_t cnt, int64_t i) { return double(cnt) * a.p0[i]; });
    const double mean = total > 0 ? sum / total : 0.0;
    const double m2 = sum_pieces([&](int64_t cnt, int64_t i) {
      const double d = a.p0[i] - mean;
      return a.p1[i] + double(cnt) * d * d;
    });
    a.mean[ng] = A(mean);
    a.rstd[ng] = A(1.0 / std::sqrt((total > 0 ? m2 / total : 0.0) + a.eps));
    for (int64_t c = c0; c < c0 + p.D; ++c) set_coefficients(a, n, c, ng);
  }
}

template <bool silu, typename T, typename A>
void fwd_apply_impl(const Args<T, A>& a, int64_t begin, int64_t end, Seg<A> seg) {
  const Plan& p = a.p;
  const ExpBounds eb = a.eb;  // a local copy stays in registers
  const int64_t ahead = seg.prefetch ? (p.offset(end) - p.offset(begin)) * sizeof(T) : 0;  // bytes
  for (int64_t u = begin; u < end; ++u) {
    const int64_t cnt = p.count(u % p.chunks), off = p.offset(u);
    const T* x = a.x + off;
    T* y = a.out + off;
    const uintptr_t next = reinterpret_cast<uintptr_t>(x) + ahead;
    if (!p.cl) {
      for (int64_t r = 0; r < p.rows; ++r) {
        const int64_t row = (u / p.chunks) * p.rows + r, o = r * p.S;
        const A mx = a.mx[row], ca = a.ca[row], cb = a.cb[row];
        for (int64_t i0 = 0; i0 < cnt; i0 += kBlock) {
          const int64_t i1 = std::min(cnt, i0 + kBlock);
          if (ahead) prefetch(next + (o + i0) * sizeof(T), (i1 - i0) * sizeof(T));
          nchw_fwd_row<silu>(i1 - i0, x + o + i0, mx, ca, cb, y + o + i0, eb);
        }
      }
    } else {
      const int64_t C = p.C, nc = (u / p.chunks) * C;
      const A *mx = a.mx + nc, *ca = a.ca + nc, *cb = a.cb + nc;
      for (int64_t s = 0; s < cnt; ++s) {
        if (ahead) prefetch(next + s * C * sizeof(T), C * sizeof(T));
        cl_fwd_row<silu>(C, x + s * C, mx, ca, cb, y + s * C, eb);
      }
    }
  }
}

template <typename T, typename A>
void fwd_apply(const Args<T, A>& a, int64_t begin, int64_t end, Seg<A> seg) {
  a.silu ? fwd_apply_impl<true>(a, begin, end, seg) : fwd_apply_impl<false>(a, begin, end, seg);
}

// ---------------------------------------------------------------------------
// Backward stages. Per element: u = x - mx, z = ca * u + cb, dz = act'(z) * dy. With a scratch
// buffer (covering units [begin, end)), stats stores dz there and apply reads it back.
// ---------------------------------------------------------------------------
template <bool silu, bool keep, typename T, typename A>
void bwd_stats_impl(const Args<T, A>& a, int64_t begin, int64_t end, A* buf) {
  const Plan& p = a.p;
  const ExpBounds eb = a.eb;
  alignas(64) A tmp[silu && !keep ? kUnitMax : 1];  // dz of one NCHW unit without a scratch buffer
  const int64_t off0 = p.offset(begin);
  for (int64_t u = begin; u < end; ++u) {
    const int64_t cnt = p.count(u % p.chunks), off = p.offset(u);
    const T *x = a.x + off, *dy = a.dy + off;
    A* dzs = keep ? buf + (off - off0) : nullptr;
    if (!p.cl) {  // dz = act'(z) * dy into dzs (or tmp), then its sums; without the activation dz is dy
      const int64_t row = u / p.chunks;
      const A mx = a.mx[row], ca = a.ca[row], cb = a.cb[row];
      Sum3<A> t;
      if (silu) {
        A* dz = keep ? dzs : tmp;
        for (int64_t i = 0; i < cnt; ++i) dz[i] = act_grad<silu>(ca * (A(x[i]) - mx) + cb, A(dy[i]), eb);
        t = dz_sums(cnt, x, dz, mx);
      } else {
        t = dz_sums(cnt, x, dy, mx);
      }
      a.p0[u] = t.s0, a.p1[u] = t.s1, a.p2[u] = t.s2;
    } else {
      const int64_t C = p.C, nc = (u / p.chunks) * C;
      const A *mx = a.mx + nc, *ca = a.ca + nc, *cb = a.cb + nc;
      A *s0 = a.p0 + u * C, *s1 = a.p1 + u * C, *s2 = a.p2 + u * C;
      std::fill(s0, s0 + C, A(0));
      std::fill(s1, s1 + C, A(0));
      std::fill(s2, s2 + C, A(0));
      for (int64_t s = 0; s < cnt; ++s)
        cl_bwd_sums_row<silu, keep>(C, x + s * C, dy + s * C, mx, ca, cb, s0, s1, s2, keep ? dzs + s * C : nullptr, eb);
    }
  }
}

template <typename T, typename A>
void bwd_stats(const Args<T, A>& a, int64_t begin, int64_t end, Seg<A> seg) {
  A* buf = seg.dz;
  if (buf) return a.silu ? bwd_stats_impl<true, true>(a, begin, end, buf) : bwd_stats_impl<false, true>(a, begin, end, buf);
  a.silu ? bwd_stats_impl<true, false>(a, begin, end, buf) : bwd_stats_impl<false, false>(a, begin, end, buf);
}

// dh = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = k * dz, k = (1 + scale) * w,
// xhat = rstd * u: grad_x = cp * dz + cq * u + cr. Writes the per-(n, c) grads into a.g[0..4].
template <typename T, typename A>
void bwd_combine(const Args<T, A>& a, int64_t begin, int64_t end) {
  const Plan& p = a.p;
  A *g_pre_bias = a.g[0], *g_scale = a.g[1], *g_shift = a.g[2], *g_weight = a.g[3], *g_bias = a.g[4];
  for (int64_t ng = begin; ng < end; ++ng) {
    const int64_t n = ng / p.G, c0 = (ng % p.G) * p.D;
    const double rstd = effective_rstd(a, ng), total = double(p.D * p.S);
    struct Sums {
      double dz = 0, dzu = 0, u = 0, k = 0;  // sums of dz, dz * u, u over the channel; k = (1 + scale) * w
    };
    const auto channel = [&](int64_t c) {  // in double: a channel may hold ~1e9 elements in ~1e5 partials
      Sums t;
      for (int64_t k = 0; k < p.chunks; ++k) {
        const int64_t i = p.part(n, c, k);
        t.dz += a.p0[i], t.dzu += a.p1[i], t.u += a.p2[i];
      }
      const int64_t nc = n * p.C + c;
      t.k = (a.sc ? 1.0 + a.sc[nc] : 1.0) * (a.w ? a.w[c] : A(1));
      return t;
    };
    // u = h - mean with the saved mean rounded to A: e = mean(u) is that rounding (0 in exact arithmetic), and
    // xhat = rstd * (u - e). Left in, it costs grad_x O(rstd^2 * e) where a group's spread is tiny against its
    // mean (a 2-element group of near-equal values: rstd ~ 300 in float32, errors of ~1e-2).
    double e = 0;
    for (int64_t c = c0; c < c0 + p.D; ++c) e += channel(c).u;
    e = total > 0 ? e / total : 0.0;
    double m1 = 0, m2 = 0;  // means of dxhat and dxhat * xhat over the group
    for (int64_t c = c0; c < c0 + p.D; ++c) {
      const int64_t nc = n * p.C + c;
      const Sums t = channel(c);
      const double scale1 = a.sc ? 1.0 + a.sc[nc] : 1.0, dz_xhat = rstd * (t.dzu - e * t.dz);
      g_scale[nc] = A((a.w ? a.w[c] : A(1)) * dz_xhat + (a.b ? a.b[c] : A(0)) * t.dz);  // sum dz * zn
      g_shift[nc] = A(t.dz);
      g_weight[nc] = A(scale1 * dz_xhat);
      g_bias[nc] = A(scale1 * t.dz);
      m1 += t.k * t.dz;
      m2 += t.k * dz_xhat;
    }
    m1 = total > 0 ? m1 / total : 0.0;
    m2 = total > 0 ? m2 / total : 0.0;
    for (int64_t c = c0; c < c0 + p.D; ++c) {
      const int64_t nc = n * p.C + c;
      const Sums t = channel(c);
      const double cp = rstd * t.k, cq = -rstd * rstd * m2, cr = -rstd * m1 - cq * e;  // cq * (u - e)
      a.cp[nc] = A(cp), a.cq[nc] = A(cq), a.cr[nc] = A(cr);
      g_pre_bias[nc] = A(cp * t.dz + cq * t.u + cr * double(p.S));  // sum dh
    }
  }
}

template <bool silu, bool keep, typename T, typename A>
void bwd_apply_impl(const Args<T, A>& a, int64_t begin, int64_t end, Seg<A> seg) {
  const Plan& p = a.p;
  const ExpBounds eb = a.eb;
  const int64_t off0 = p.offset(begin);
  for (int64_t u = begin; u < end; ++u) {
    const int64_t cnt = p.count(u % p.chunks), off = p.offset(u);
    const T *x = a.x + off, *dy = a.dy + off;
    const A* dzs = keep ? seg.dz + (off - off0) : nullptr;
    T* dx = a.out + off;
    if (!p.cl) {
      const int64_t row = u / p.chunks;
      const A mx = a.mx[row], ca = a.ca[row], cb = a.cb[row], cp = a.cp[row], cq = a.cq[row], cr = a.cr[row];
      nchw_bwd_row<silu, keep>(cnt, x, dy, dzs, mx, ca, cb, cp, cq, cr, dx, eb);
    } else {
      const int64_t C = p.C, nc = (u / p.chunks) * C;
      const A *mx = a.mx + nc, *ca = a.ca + nc, *cb = a.cb + nc, *cp = a.cp + nc, *cq = a.cq + nc, *cr = a.cr + nc;
      for (int64_t s = 0; s < cnt; ++s)
        cl_bwd_row<silu, keep>(C, x + s * C, dy + s * C, keep ? dzs + s * C : nullptr, mx, ca, cb, cp, cq, cr,
                               dx + s * C, eb);
    }
  }
}

template <typename T, typename A>
void bwd_apply(const Args<T, A>& a, int64_t begin, int64_t end, Seg<A> seg) {
  if (seg.dz) return bwd_apply_impl<false, true>(a, begin, end, seg);
  a.silu ? bwd_apply_impl<true, false>(a, begin, end, seg) : bwd_apply_impl<false, false>(a, begin, end, seg);
}

// ---------------------------------------------------------------------------
// Whole NCHW groups [begin, end): group ng is D rows of S positions, L = D * S elements from x + ng * L,
// channels ng * D ... in (N, C) order. They go in blocks of B = kGroupMax / L groups, stage by stage, so
// that the groups of a block overlap their dependency chains (sum, mean, M2, rsqrt, coefficients) in the
// out-of-order core; buf holds z or dz for one block.
// ---------------------------------------------------------------------------
// z = ca * (x - mx) + cb for one row
template <typename T, typename A>
inline void z_row(int64_t n, const T* __restrict x, A mx, A ca, A cb, A* __restrict z) {
  for (int64_t i = 0; i < n; ++i) z[i] = ca * (A(x[i]) - mx) + cb;
}

// Forward: mean = (sum x + S * sum pre_bias) / L and M2 about it (flat; with pre_bias, group_m2);
// z per row into buf with the coefficients of set_coefficients; y = act(z) flat over the block,
// prefetching the next block meanwhile.
template <bool silu, typename T, typename A>
void fwd_groups_impl(const Args<T, A>& a, int64_t begin, int64_t end, A* buf) {
  const Plan& p = a.p;
  const ExpBounds eb = a.eb;
  const int64_t D = p.D, S = p.S, L = D * S, B = block_groups(p);
  const A inv_L = A(1) / A(L);
  for (int64_t b0 = begin; b0 < end; b0 += B) {
    const int64_t b1 = std::min(end, b0 + B);
    // Two short loops rather than one long one: more groups in flight for the out-of-order core.
    for (int64_t ng = b0; ng < b1; ++ng) {
      const T* x = a.x + ng * L;
      A pb_sum = 0;
      if (a.pb)
        for (int64_t nc = ng * D; nc < (ng + 1) * D; ++nc) pb_sum += a.pb[nc];
      a.mean[ng] = (lane_sum<A>(L, [&](int64_t i) { return A(x[i]); }) + A(S) * pb_sum) * inv_L;
    }
    for (int64_t ng = b0; ng < b1; ++ng) {
      const T* x = a.x + ng * L;
      const A m = a.mean[ng];
      A m2 = 0;
      if (a.pb) {
        m2 = group_m2(D, S, x, m, a.pb + ng * D);
      } else {
        m2 = lane_sum<A>(L, [&](int64_t i) { const A d = A(x[i]) - m; return d * d; });
      }
      a.rstd[ng] = A(1) / std::sqrt(m2 * inv_L + A(a.eps));  // as ATen's, in the accumulation type
    }
    // Rows of >= kBlock positions: y = act(z) per row (as fwd_apply); shorter: z per row, then act flat.
    const int64_t len = (b1 - b0) * L;
    const bool direct = S >= kBlock;
    const uintptr_t next = b1 < end ? reinterpret_cast<uintptr_t>(a.x + b1 * L) : 0;  // prefetched meanwhile
    for (int64_t ng = b0, c = b0 * D % p.C; ng < b1; ++ng) {
      const A m = a.mean[ng], rstd = effective_rstd(a, ng);
      for (int64_t nc = ng * D, o = (ng - b0) * L; nc < (ng + 1) * D; ++nc, ++c, o += S) {
        const A scale1 = a.sc ? A(1) + a.sc[nc] : A(1);
        const A ca = rstd * (a.w ? a.w[c] : A(1)) * scale1;
        const A cb = (a.b ? a.b[c] : A(0)) * scale1 + (a.sh ? a.sh[nc] : A(0));
        const A mx = m - (a.pb ? a.pb[nc] : A(0));
        const T* x = a.x + b0 * L + o;
        if (!direct) {
          z_row(S, x, mx, ca, cb, buf + o);
          continue;
        }
        T* y = a.out + b0 * L + o;
        for (int64_t i0 = 0; i0 < S; i0 += kBlock) {
          const int64_t i1 = std::min(S, i0 + kBlock);
          if (next) prefetch(next + (o + i0) * sizeof(T), (i1 - i0) * sizeof(T));
          nchw_fwd_row<silu>(i1 - i0, x + i0, mx, ca, cb, y + i0, eb);
        }
      }
      if (c == p.C) c = 0;
    }
    if (direct) continue;
    T* y = a.out + b0 * L;
    for (int64_t i0 = 0; i0 < len; i0 += kBlock) {
      const int64_t i1 = std::min(len, i0 + kBlock);
      if (next) prefetch(next + i0 * sizeof(T), (i1 - i0) * sizeof(T));
      for (int64_t i = i0; i < i1; ++i) y[i] = T(act<silu>(buf[i], eb));
    }
  }
}

template <typename T, typename A>
void fwd_groups(const Args<T, A>& a, int64_t begin, int64_t end, A* buf) {
  a.silu ? fwd_groups_impl<true>(a, begin, end, buf) : fwd_groups_impl<false>(a, begin, end, buf);
}

// Sums of dz, dz * u and u over each of the rows [r0, r1) of bwd_groups (row nc: S positions of x and of
// dz at offset (nc - r0) * S) into its partials p0, p1, p2[nc]. Rows of a multiple of 8 positions go 8 at a
// time: each folded to 8 lanes, then the 8 rows' lanes summed together (sum_rows8), not row by row.
template <typename T, typename A>
void bwd_row_sums(const Args<T, A>& a, int64_t r0, int64_t r1, const T* __restrict x, const A* __restrict dz) {
  const int64_t S = a.p.S;
  if (S % 8 != 0) {
    for (int64_t nc = r0; nc < r1; ++nc) {
      const Sum3<A> t = dz_sums(S, x + (nc - r0) * S, dz + (nc - r0) * S, a.mx[nc]);
      a.p0[nc] = t.s0, a.p1[nc] = t.s1, a.p2[nc] = t.s2;
    }
    return;
  }
  using V = Vec<A, 8>;
  for (int64_t q0 = r0; q0 < r1; q0 += 8) {
    const int64_t rows = std::min<int64_t>(8, r1 - q0);
    V v0[8] = {}, v1[8] = {}, v2[8] = {};  // rows past r1 stay zero
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = (q0 + r - r0) * S;
      const V mx = V{} + a.mx[q0 + r];
      V s0 = {}, s1 = {}, s2 = {};
      for (int64_t i = o; i < o + S; i += 8) {
        const V d = loadu<8>(dz + i), u = loadu_as<8, A>(x + i) - mx;
        s0 += d, s1 += d * u, s2 += u;
      }
      v0[r] = s0, v1[r] = s1, v2[r] = s2;
    }
    const V s0 = sum_rows8<A>(v0), s1 = sum_rows8<A>(v1), s2 = sum_rows8<A>(v2);
    for (int64_t r = 0; r < rows; ++r) a.p0[q0 + r] = s0[r], a.p1[q0 + r] = s1[r], a.p2[q0 + r] = s2[r];
  }
}

// Backward: coefficients and z per row into buf; dz = act'(z) * dy flat, in place; per-row sums of dz,
// dz * u and u as bwd_combine's partials (one per channel: Plan::part with one chunk); grad_x per row.
template <bool silu, typename T, typename A>
void bwd_groups_impl(const Args<T, A>& a, int64_t begin, int64_t end, A* buf) {
  const Plan& p = a.p;
  const ExpBounds eb = a.eb;
  const int64_t D = p.D, S = p.S, L = D * S, B = block_groups(p);
  for (int64_t b0 = begin; b0 < end; b0 += B) {
    const int64_t b1 = std::min(end, b0 + B), len = (b1 - b0) * L;
    const T *x = a.x + b0 * L, *dy = a.dy + b0 * L;
    for (int64_t ng = b0, n = b0 / p.G, c = b0 * D % p.C; ng < b1; ++ng) {
      for (int64_t r = 0; r < D; ++r, ++c) set_coefficients(a, n, c, ng);
      if (c == p.C) c = 0, ++n;
    }
    if (silu)
      for (int64_t nc = b0 * D; nc < b1 * D; ++nc) {
        const int64_t o = (nc - b0 * D) * S;
        z_row(S, x + o, a.mx[nc], a.ca[nc], a.cb[nc], buf + o);
      }
    for (int64_t i = 0; i < len; ++i) buf[i] = act_grad<silu>(silu ? buf[i] : A(0), A(dy[i]), eb);
    bwd_row_sums(a, b0 * D, b1 * D, x, buf);
    bwd_combine(a, b0, b1);
    for (int64_t nc = b0 * D; nc < b1 * D; ++nc) {
      const int64_t o = (nc - b0 * D) * S;
      const A mx = a.mx[nc], cp = a.cp[nc], cq = a.cq[nc], cr = a.cr[nc];
      const T* xr = x + o;
      const A* dz = buf + o;
      T* dx = a.out + b0 * L + o;
      for (int64_t i = 0; i < S; ++i) dx[i] = T(cp * dz[i] + cq * (A(xr[i]) - mx) + cr);
    }
  }
}

template <typename T, typename A>
void bwd_groups(const Args<T, A>& a, int64_t begin, int64_t end, A* buf) {
  a.silu ? bwd_groups_impl<true>(a, begin, end, buf) : bwd_groups_impl<false>(a, begin, end, buf);
}

// ---------------------------------------------------------------------------
// Instruction-set dispatch of the hot stages (cpu_vec.h): name##_isa(args, begin, end, seg).
// ---------------------------------------------------------------------------
DF_MULTIVERSION(fwd_stats)
DF_MULTIVERSION(fwd_apply)
DF_MULTIVERSION(bwd_stats)
DF_MULTIVERSION(bwd_apply)
DF_MULTIVERSION(fwd_groups)
DF_MULTIVERSION(bwd_groups)

}  // namespace

// ---------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_fwd_cpu(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& pre_bias,
    const OptTensor& scale, const OptTensor& shift, int64_t num_groups, double eps, bool silu) {
  const auto shape = group_norm_silu_shape(x, weight, bias, pre_bias, scale, shift, num_groups);
  const Plan p = make_plan(shape, /*row_blocks=*/true);
  const auto acc = acc_type(x);
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({p.N, p.G}, acc_opts), rstd = at::empty({p.N, p.G}, acc_opts);
  at::Tensor w = to_acc(weight, acc), b = to_acc(bias, acc), pb = to_acc(pre_bias, acc);
  at::Tensor sc = to_acc(scale, acc), sh = to_acc(shift, acc);
  const bool whole = whole_groups(p);  // fwd_groups needs neither coefficients nor partials
  at::Tensor coef = whole ? at::Tensor() : at::empty({3, p.N * p.C}, acc_opts);
  at::Tensor parts = whole ? at::Tensor() : at::empty({2, p.N * p.C * p.chunks}, acc_opts);  // >= the partials needed
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t nc = p.N * p.C, np = nc * p.chunks;
    const auto part = [&](const at::Tensor& t, int64_t i, int64_t size) {  // i-th piece of t, or null
      return t.defined() ? t.data_ptr<A>() + i * size : nullptr;
    };
    const Args<scalar_t, A> a{p, silu, {}, eps, x.const_data_ptr<scalar_t>(), nullptr, y.data_ptr<scalar_t>(),
                              ptr_or_null<A>(w), ptr_or_null<A>(b), ptr_or_null<A>(pb), ptr_or_null<A>(sc),
                              ptr_or_null<A>(sh), mean.data_ptr<A>(), rstd.data_ptr<A>(), part(coef, 0, nc),
                              part(coef, 1, nc), part(coef, 2, nc), nullptr, nullptr, nullptr, part(parts, 0, np),
                              part(parts, 1, np), nullptr, {}};
    if (whole) {
      run_groups<A>(p, [&](int64_t b0, int64_t b1, A* buf) { fwd_groups_isa(a, b0, b1, buf); });
      return;
    }
    schedule<A>(
        p, false, true, [&](int64_t b0, int64_t b1, Seg<A> seg) { fwd_stats_isa(a, b0, b1, seg); },
        [&](int64_t b0, int64_t b1) { fwd_combine(a, b0, b1); },
        [&](int64_t b0, int64_t b1, Seg<A> seg) { fwd_apply_isa(a, b0, b1, seg); });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& pre_bias, const OptTensor& scale, const OptTensor& shift, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool silu) {
  const auto shape = group_norm_silu_shape(x, weight, bias, pre_bias, scale, shift, num_groups);
  const Plan p = make_plan(shape, /*row_blocks=*/false);  // per-channel partials
  const auto acc = acc_type(x);
  const auto acc_opts = x.options().dtype(acc);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              "group_norm_silu_bwd: grad_y must match x in shape, dtype and device");
  TORCH_CHECK(shape.channels_last ? grad_y.movedim(1, -1).is_contiguous() : grad_y.is_contiguous(),
              "group_norm_silu_bwd: grad_y must have the memory layout of x, got strides ", grad_y.strides(),
              " for x strides ", x.strides());
  TORCH_CHECK(mean.sizes() == at::IntArrayRef({p.N, p.G}) && rstd.sizes() == mean.sizes(),
              "group_norm_silu_bwd: mean and rstd must have shape (N, num_groups)");
  TORCH_CHECK(mean.scalar_type() == acc && rstd.scalar_type() == acc && mean.device() == x.device() &&
                  rstd.device() == x.device(),
              "group_norm_silu_bwd: mean and rstd must be ", acc, " tensors on x's device");
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor w = to_acc(weight, acc), b = to_acc(bias, acc), pb = to_acc(pre_bias, acc);
  at::Tensor sc = to_acc(scale, acc), sh = to_acc(shift, acc);
  // One scratch (a few ATen calls cost as much as the kernel on small maps): coefficients (6, N, C),
  // partials (3, N, C, chunks), per-n grads of weight and bias (2, N, C), and of any absent per-(n, c) input.
  const int64_t nc = p.N * p.C, np = nc * p.chunks;
  const bool has_nc[3] = {pb.defined(), sc.defined(), sh.defined()};
  const int64_t absent = 3 - has_nc[0] - has_nc[1] - has_nc[2];
  at::Tensor scratch = at::empty({(8 + absent) * nc + 3 * np}, acc_opts);
  at::Tensor g_nc[3];  // grads of pre_bias, scale, shift, (N, C) in A, written by the kernel
  for (int k = 0; k < 3; ++k)
    if (has_nc[k]) g_nc[k] = at::empty({p.N, p.C}, acc_opts);
  at::Tensor g_wb[2];  // grads of weight and bias, (C,) in A: the per-n grads summed over n
  for (int k = 0; k < 2; ++k)
    if (k == 0 ? w.defined() : b.defined()) g_wb[k] = at::empty({p.C}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    A *cf = scratch.data_ptr<A>(), *pt = cf + 6 * nc, *gs = pt + 3 * np;
    A* g[5] = {nullptr, nullptr, nullptr, gs, gs + nc};
    for (int k = 0, j = 2; k < 3; ++k) g[k] = has_nc[k] ? g_nc[k].data_ptr<A>() : gs + j++ * nc;
    // mean/rstd are only read; Args shares one struct with the forward, which writes them.
    const Args<scalar_t, A> a{p, silu, {}, 0.0, x.const_data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(),
                              grad_x.data_ptr<scalar_t>(), ptr_or_null<A>(w), ptr_or_null<A>(b), ptr_or_null<A>(pb),
                              ptr_or_null<A>(sc), ptr_or_null<A>(sh), const_cast<A*>(mean_c.const_data_ptr<A>()),
                              const_cast<A*>(rstd_c.const_data_ptr<A>()), cf, cf + nc, cf + 2 * nc, cf + 3 * nc,
                              cf + 4 * nc, cf + 5 * nc, pt, pt + np, pt + 2 * np, {g[0], g[1], g[2], g[3], g[4]}};
    if (whole_groups(p) && p.S < kBlock) {  // longer rows: the unit schedule measured ~8% faster
      run_groups<A>(p, [&](int64_t b0, int64_t b1, A* buf) { bwd_groups_isa(a, b0, b1, buf); });
    } else {
      for (int64_t n = 0; n < p.N; ++n)
        for (int64_t c = 0; c < p.C; ++c) set_coefficients(a, n, c, n * p.G + c / p.D);
      schedule<A>(  // prefetching the backward's two input streams measured no faster
          p, silu, false, [&](int64_t b0, int64_t b1, Seg<A> seg) { bwd_stats_isa(a, b0, b1, seg); },
          [&](int64_t b0, int64_t b1) { bwd_combine(a, b0, b1); },
          [&](int64_t b0, int64_t b1, Seg<A> seg) { bwd_apply_isa(a, b0, b1, seg); });
    }
    std::vector<double> sum(g_wb[0].defined() || g_wb[1].defined() ? p.C : 0);
    for (int k = 0; k < 2; ++k) {
      if (!g_wb[k].defined()) continue;
      std::fill(sum.begin(), sum.end(), 0.0);
      for (int64_t n = 0; n < p.N; ++n)  // rows of the per-n grads in order (vectorised over c)
        for (int64_t c = 0; c < p.C; ++c) sum[c] += g[3 + k][n * p.C + c];
      A* out = g_wb[k].data_ptr<A>();
      for (int64_t c = 0; c < p.C; ++c) out[c] = A(sum[c]);
    }
  });
  // The grad of an optional input in its dtype (v in A), or an empty tensor when it is absent.
  const auto grad = [&](const OptTensor& t, const at::Tensor& v) {
    if (!t.has_value() || !t->defined()) return at::empty({0}, x.options());
    return v.scalar_type() == t->scalar_type() ? v : v.to(t->scalar_type());
  };
  return {grad_x, grad(weight, g_wb[0]), grad(bias, g_wb[1]), grad(pre_bias, g_nc[0]), grad(scale, g_nc[1]),
          grad(shift, g_nc[2])};
}

}  // namespace diffusion_fast
