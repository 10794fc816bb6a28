// CUDA kernels of group_norm_silu (math, layouts and contract: group_norm_silu.h).
//
// A group (n, g) of M = (C/G) * S elements is viewed as a rows x cols array of vectors of VEC
// consecutive elements (16 bytes when sizes and alignment allow, else 8, 4 or one element):
//   NCHW:          rows = C/G channels,    cols = S / VEC,       row stride S;  a vector is in channel `row`
//   channels-last: rows = S positions,     cols = (C/G) / VEC,   row stride C;  a vector holds channels
//                  (or S == 1)                                                   col*VEC .. col*VEC+VEC-1
// A block of T threads is a (T/TC) x TC grid with TC threads along cols, so loads coalesce. While a
// thread runs its inner loop its channels stay fixed (NCHW: one row; channels-last: one column), so
// per-channel coefficients sit in registers and per-channel sums reduce with shuffles and a little
// shared memory, in a fixed order: results are deterministic, no atomics.
//
// Forward, y = act(ca[c] * (h - mean) + cb[c]) with h = x + pre_bias, ca = rstd * w * (1 + scale),
// cb = b * (1 + scale) + shift. The statistics are shift-invariant: with x0, pb0 the group's first
// element and its pre_bias, Welford/Chan runs on h - K = (x - x0) + (pb[c] - pb0), K = x0 + pb0, and pass 2
// uses h - mean = (x - x0) - (mean' - (pb[c] - pb0)), mean' = mean - K: nothing of the size of |mean| is
// ever rounded, so |mean| >> std costs no accuracy (the fp32 mean output itself is K + mean').
//   fused (N*G >= #SMs): one block per group.
//     pass 1: read x once, keep it in shared memory (up to ~227 KB per group; any overflow is re-read,
//             mostly from L2), Welford statistics of h - K;
//     pass 2: y from the shared-memory copy. HBM traffic: one read of x, one write of y.
//   split (N*G < #SMs): the spatial axis of each group is cut into `splits` tiles (blockIdx.y);
//     launch 1 (kPass1) stores per-tile Welford partials, launch 2 (kPass2) merges them and writes y.
// Backward, with mx = mean - pre_bias (mean, rstd as saved by the forward), xhat = (x - mx) * rstd,
// z = xhat * wsc + cb, wsc = w * (1 + scale):
//     pass 1: read x and dy (kept in shared memory); dz = act'(z) * dy, dxhat = dz * wsc;
//             per channel sum dz and sum dz*xhat; per group sum dxhat and sum dxhat*xhat;
//     pass 2: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat*xhat)); per channel sum dx.
//   Same fused/split choice (split: the group sums travel through a small workspace). Per-(n, c, tile)
//   sums then go through gns_param_grads_kernel, which writes the weight/bias/pre_bias/scale/shift grads.
// Statistics and sums are fp32 (fp64 for fp64 x); mean/rstd are (N, G) in that type.
#include "group_norm_silu/group_norm_silu.h"

#include "cuda_param.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

namespace diffusion_fast {
namespace {

using cuda_param::OutParam;
using cuda_param::Param;
using cuda_param::as_input;
using cuda_param::out_of;
using cuda_param::param_of;

constexpr int kMaxThreads = 512;         // threads per block, at most
// Vectors (of x) a thread loads before it uses them: 4, but 2 for 8-wide (16-bit) vectors, which at 4 took 92
// registers (bf16): 5 blocks of 128 threads per SM, so DDPM's 32x256x32x32 ran in 1.55 waves at 25% occupancy
// (ncu, h100-2026-11-28); at 2 it takes 64 (fp16 56, where 4 spilled), 8 blocks, one wave.
template <int VEC>
constexpr int kUnrollFwd = VEC >= 8 ? 2 : 4;
constexpr int kUnrollBwd = 2;            // vectors (of x and of dy) a thread loads before it uses them
constexpr int64_t kVecsPerThread = 8;    // work per thread aimed at when sizing a block
constexpr int64_t kMinTileVecs = 1024;   // split path: smallest tile (in vectors) worth a block
constexpr int64_t kMaxSplits = 1024;     // split path: tiles per group, at most
constexpr int64_t kSmemReserve = 2048;   // bytes of shared memory left for static arrays
enum Mode : int { kFused = 0, kPass1 = 1, kPass2 = 2 };

// ---------------------------------------------------------------------------
// Small types.
// ---------------------------------------------------------------------------
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Where a group's vectors are, and how a block walks them (see the top of the file).
struct Geom {
  int64_t C, G, S, cpg;   // channels, groups, spatial elements per channel, channels per group
  int64_t rows, cols;     // a group as rows x cols vectors
  int64_t row_stride;     // elements between consecutive rows
  int64_t extent;         // length of the spatial axis in the rows x cols view: cols (NCHW) or rows (CL)
  int64_t tile;           // its length per block (blockIdx.y picks the tile)
  int64_t splits;         // tiles per group (gridDim.y)
  int64_t cache_vecs;     // kFused: vectors of the group kept in shared memory (the rest is re-read)
  int tc;                 // threads along cols (power of two; <= 32 for channels-last)
};

// ---------------------------------------------------------------------------
// Element math.
// ---------------------------------------------------------------------------
__device__ __forceinline__ float exp_fast(float v) { return __expf(v); }
__device__ __forceinline__ double exp_fast(double v) { return ::exp(v); }
// a / b; b may be +inf (z -> -inf), which gives 0 for finite a.
__device__ __forceinline__ float div_fast(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ double div_fast(double a, double b) { return a / b; }

// y = silu ? z * sigmoid(z) : z
template <bool SILU, typename A>
__device__ __forceinline__ A act(A z) {
  if constexpr (SILU) return div_fast(z, A(1) + exp_fast(-z));
  return z;
}

// dz = dy * d act(z) / dz = dy * sig * (1 + z * (1 - sig)) for silu
template <bool SILU, typename A>
__device__ __forceinline__ A act_grad(A z, A dy) {
  if constexpr (SILU) {
    const A s = div_fast(A(1), A(1) + exp_fast(-z));
    return dy * s * (A(1) + z * (A(1) - s));
  }
  return dy;
}

// Runs f(std::integral_constant<bool, silu>): the element loops get no per-element branch.
template <typename F>
__device__ __forceinline__ void with_silu(bool silu, F&& f) {
  if (silu)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// Vector loads and stores go through an integer type of the same size, so that they compile to one
// 16/8/4/2-byte access: a plain struct store of a Pack gets split into 2- or 4-byte stores, so the
// store uses __stwb (st.global.wb, the default write-back policy) on the integer vector.
template <int BYTES> struct Raw;
template <> struct Raw<16> { using type = uint4; };
template <> struct Raw<8> { using type = uint2; };
template <> struct Raw<4> { using type = unsigned int; };
template <> struct Raw<2> { using type = unsigned short; };

template <typename V, typename T>
__device__ __forceinline__ V load_vec(const T* p) {
  using R = typename Raw<sizeof(V)>::type;
  const R r = *reinterpret_cast<const R*>(p);
  V v;
  memcpy(&v, &r, sizeof(V));
  return v;
}

template <typename V, typename T>
__device__ __forceinline__ void store_vec(T* p, const V& v) {
  using R = typename Raw<sizeof(V)>::type;
  R r;
  memcpy(&r, &v, sizeof(V));
  __stwb(reinterpret_cast<R*>(p), r);
}

// ---------------------------------------------------------------------------
// Reductions.
// ---------------------------------------------------------------------------
template <typename A>
struct Welford {
  A n, mean, m2;  // count, mean, sum of squared deviations from the mean
};

// Chan et al.'s pairwise merge.
template <typename A>
__device__ __forceinline__ Welford<A> welford_merge(const Welford<A>& a, const Welford<A>& b) {
  if (b.n == A(0)) return a;
  if (a.n == A(0)) return b;
  const A n = a.n + b.n;
  const A d = b.mean - a.mean;
  const A fb = b.n / n;
  return {n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
}

// Adds the VEC elements h = (x - x0) + dp of one vector: their own mean and M2 first, then one merge.
template <bool CL, int VEC, typename T, typename A>
__device__ __forceinline__ void welford_add(Welford<A>& st, const Pack<T, VEC>& x, A x0, const A (&dp)[CL ? VEC : 1]) {
  A h[VEC];
  A sum = A(0);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    h[k] = (static_cast<A>(x.v[k]) - x0) + dp[CL ? k : 0];
    sum += h[k];
  }
  const A m = sum * (A(1) / A(VEC));  // VEC is a power of two: exact
  A m2 = A(0);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const A d = h[k] - m;
    m2 += d * d;
  }
  st.n += A(VEC);
  const A d = m - st.mean;
  const A f = A(VEC) / st.n;
  st.mean += d * f;
  st.m2 += m2 + d * d * (st.n - A(VEC)) * f;
}

template <typename A>
__device__ __forceinline__ Welford<A> shfl_down(const Welford<A>& w, int o) {
  return {__shfl_down_sync(0xffffffffu, w.n, o), __shfl_down_sync(0xffffffffu, w.mean, o),
          __shfl_down_sync(0xffffffffu, w.m2, o)};
}

// Merges the states of all threads of the block (fixed order); every thread gets the result.
// sm: 33 entries of shared memory. All threads must call it.
template <typename A>
__device__ Welford<A> block_welford(Welford<A> w, Welford<A>* sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) w = welford_merge(w, shfl_down(w, o));  // lane 0 holds the warp's
  if (lane == 0) sm[warp] = w;
  __syncthreads();
  if (warp == 0) {
    w = lane < nwarps ? sm[lane] : Welford<A>{A(0), A(0), A(0)};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) w = welford_merge(w, shfl_down(w, o));
    if (lane == 0) sm[32] = w;
  }
  __syncthreads();
  return sm[32];
}

// Block-wide sums of two values (fixed order); every thread gets them. sm: 66 entries. All threads call it.
template <typename A>
__device__ void block_sum2(A& s1, A& s2, A* sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    s1 += __shfl_down_sync(0xffffffffu, s1, o);
    s2 += __shfl_down_sync(0xffffffffu, s2, o);
  }
  if (lane == 0) {
    sm[2 * warp] = s1;
    sm[2 * warp + 1] = s2;
  }
  __syncthreads();
  if (warp == 0) {
    s1 = lane < nwarps ? sm[2 * lane] : A(0);
    s2 = lane < nwarps ? sm[2 * lane + 1] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      s1 += __shfl_down_sync(0xffffffffu, s1, o);
      s2 += __shfl_down_sync(0xffffffffu, s2, o);
    }
    if (lane == 0) {
      sm[64] = s1;
      sm[65] = s2;
    }
  }
  __syncthreads();
  s1 = sm[64];
  s2 = sm[65];
}

// Per-channel sums of v[q][k] (quantity q, element k of this thread's vectors) over the threads that
// share the channel, written to out[q * stride + (nc0 + channel) * splits + split], channel being the
// channel in the group. i: this thread's row (NCHW) or column (CL); i0: the block's first column of
// this step (CL); on: whether i exists. red: shared scratch, (T/32) * NQ * (CL ? tc * VEC : 1) entries.
// All threads must call it (it may sync).
template <bool CL, int VEC, int NQ, typename A>
__device__ __forceinline__ void channel_sums(A (&v)[NQ][CL ? VEC : 1], bool on, int64_t i, int64_t i0, const Geom& g,
                                             A* red, A* out, int64_t stride, int64_t nc0, int64_t split) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if constexpr (!CL) {
    // Channel = row i, shared by the tc consecutive threads of one row slot (part of a warp, or whole warps).
    const int span = g.tc < 32 ? g.tc : 32;
#pragma unroll
    for (int q = 0; q < NQ; ++q)
      for (int o = span / 2; o > 0; o >>= 1) v[q][0] += __shfl_xor_sync(0xffffffffu, v[q][0], o);
    const bool leader = on && threadIdx.x % g.tc == 0;
    if (g.tc <= 32) {
      if (leader)
        for (int q = 0; q < NQ; ++q) out[q * stride + (nc0 + i) * g.splits + split] = v[q][0];
    } else {
      const int warps_per_row = g.tc / 32;
      if (lane == 0)
        for (int q = 0; q < NQ; ++q) red[warp * NQ + q] = v[q][0];
      __syncthreads();
      if (leader) {  // lane 0 of the row slot's first warp
        for (int q = 0; q < NQ; ++q) {
          A s = A(0);
          for (int j = 0; j < warps_per_row; ++j) s += red[(warp + j) * NQ + q];
          out[q * stride + (nc0 + i) * g.splits + split] = s;
        }
      }
      __syncthreads();
    }
  } else {
    // Channels of column tc = threadIdx.x % tc; lanes lane, lane ^ tc, ... of a warp share it.
#pragma unroll
    for (int q = 0; q < NQ; ++q)
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        for (int o = 16; o >= g.tc; o >>= 1) v[q][k] += __shfl_xor_sync(0xffffffffu, v[q][k], o);
    const int per_warp = g.tc * NQ * VEC;
    if (lane < g.tc)  // lane == its column index here
#pragma unroll
      for (int q = 0; q < NQ; ++q)
#pragma unroll
        for (int k = 0; k < VEC; ++k) red[warp * per_warp + (lane * NQ + q) * VEC + k] = v[q][k];
    __syncthreads();
    for (int t = threadIdx.x; t < per_warp; t += blockDim.x) {
      A s = A(0);
      for (int w = 0; w < nwarps; ++w) s += red[w * per_warp + t];
      const int k = t % VEC, q = (t / VEC) % NQ;
      const int64_t c = i0 + t / (VEC * NQ);
      if (c < g.cols) out[q * stride + (nc0 + c * VEC + k) * g.splits + split] = s;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Walk over a tile [lo, hi) of the spatial axis of one group (both passes use the same order, so a
// thread reads back exactly the cache slots it wrote):
//   outer(on, i)          at each outer step: i = this thread's row (NCHW) or column (CL),
//                         on = false when i is past the end (the thread idles in this step);
//   inner(b)              for a batch of up to UNROLL vectors of row/column i (Batch below);
//   after(on, i, i0)      after the inner loop; i0 = the block's first row/column of this step.
// The outer loop has the same trip count in every thread, so after() may synchronise the block.
// ---------------------------------------------------------------------------
struct Batch {
  int64_t off, off_step;  // element offset (from the group's base) of vector u: off + u * off_step
  int64_t idx, idx_step;  // its index in the tile (cache slot): idx + u * idx_step
  int count;              // vectors u < count exist
};

template <bool CL, int VEC, int UNROLL, typename Outer, typename Inner, typename After>
__device__ __forceinline__ void visit_tile(const Geom& g, int64_t lo, int64_t hi, Outer&& outer, Inner&& inner,
                                           After&& after) {
  const int tc = threadIdx.x % g.tc;
  const int tr = threadIdx.x / g.tc;
  const int nr = blockDim.x / g.tc;  // row slots
  if constexpr (!CL) {
    const int64_t width = hi - lo;
    for (int64_t r0 = 0; r0 < g.rows; r0 += nr) {
      const int64_t r = r0 + tr;
      const bool on = r < g.rows;
      outer(on, r);
      if (on) {
        for (int64_t c = lo + tc; c < hi; c += int64_t(g.tc) * UNROLL) {
          const int64_t rem = hi - c;
          const int count = rem >= int64_t(g.tc) * UNROLL ? UNROLL : int((rem + g.tc - 1) / g.tc);
          inner(Batch{r * g.row_stride + c * VEC, int64_t(g.tc) * VEC, r * width + (c - lo), int64_t(g.tc), count});
        }
      }
      after(on, r, r0);
    }
  } else {
    for (int64_t c0 = 0; c0 < g.cols; c0 += g.tc) {
      const int64_t c = c0 + tc;
      const bool on = c < g.cols;
      outer(on, c);
      if (on) {
        for (int64_t r = lo + tr; r < hi; r += int64_t(nr) * UNROLL) {
          const int64_t rem = hi - r;
          const int count = rem >= int64_t(nr) * UNROLL ? UNROLL : int((rem + nr - 1) / nr);
          inner(Batch{r * g.row_stride + c * VEC, int64_t(nr) * g.row_stride, (r - lo) * g.cols + c,
                      int64_t(nr) * g.cols, count});
        }
      }
      after(on, c, c0);
    }
  }
}

// Element offset of group (n, grp) and the channel-in-group of element k of this thread's vectors.
template <bool CL>
__device__ __forceinline__ int64_t group_base(const Geom& g, int64_t n, int64_t grp) {
  return CL ? n * g.S * g.C + grp * g.cpg : (n * g.C + grp * g.cpg) * g.S;
}

template <bool CL, int VEC>
__device__ __forceinline__ int64_t channel_of(int64_t i, int k) {
  return CL ? i * VEC + k : i;
}

// ---------------------------------------------------------------------------
// Forward. Grid (N*G, splits); block: see make_plan.
// ---------------------------------------------------------------------------
template <typename T, typename A>
struct FwdArgs {
  const T* x;          // (N, C, *) in the layout of the geometry
  T* y;                // same shape and layout
  Param w, b;          // (C,) or absent (1, 0)
  Param pb, sc, sh;    // (N, C) or absent (0)
  A* mean;             // (N, G) out
  A* rstd;             // (N, G) out
  A* ws;               // split path: (N*G, splits, 3) Welford partials (count, mean, M2); else null
  Geom geo;
  A eps;
  bool silu;
  int mode;            // kFused (splits == 1), or kPass1 then kPass2
};

template <typename T, typename A, int VEC, bool CL>
__global__ void __launch_bounds__(kMaxThreads) gns_fwd_kernel(const FwdArgs<T, A> a) {
  using V = Pack<T, VEC>;
  constexpr int PV = CL ? VEC : 1;  // distinct channels in one vector
  extern __shared__ __align__(16) unsigned char smem_raw[];
  V* cache = reinterpret_cast<V*>(smem_raw);  // kFused: cache_vecs vectors of x
  __shared__ Welford<A> red[33];

  const Geom& g = a.geo;
  const int64_t ng = blockIdx.x, n = ng / g.G, grp = ng % g.G;
  const int64_t split = blockIdx.y;
  const int64_t lo = split * g.tile;
  const int64_t hi = lo + g.tile < g.extent ? lo + g.tile : g.extent;
  const int64_t base = group_base<CL>(g, n, grp);
  const T* __restrict__ x = a.x + base;
  T* __restrict__ y = a.y + base;
  const int64_t c0 = grp * g.cpg;       // first channel of the group
  const int64_t nc0 = n * g.C + c0;     // its index in (N, C)
  const bool fused = a.mode == kFused;
  // Shift K = x0 + pb0: the group's first element (channel c0, position 0), the same for every tile.
  const A x0 = static_cast<A>(x[0]);
  const A pb0 = a.pb.get(nc0, A(0));

  // Pass 1: statistics of h - K = (x - x0) + (pb[c] - pb0) over the tile (the whole group when fused).
  Welford<A> st{A(0), A(0), A(0)};
  if (a.mode != kPass2) {
    A dp[PV];
    visit_tile<CL, VEC, kUnrollFwd<VEC>>(
        g, lo, hi,
        [&](bool on, int64_t i) {
#pragma unroll
          for (int k = 0; k < PV; ++k) dp[k] = on ? a.pb.get(nc0 + channel_of<CL, VEC>(i, k), A(0)) - pb0 : A(0);
        },
        [&](const Batch& bt) {
          V v[kUnrollFwd<VEC>];
#pragma unroll
          for (int u = 0; u < kUnrollFwd<VEC>; ++u)
            if (u < bt.count) v[u] = load_vec<V>(x + bt.off + u * bt.off_step);
#pragma unroll
          for (int u = 0; u < kUnrollFwd<VEC>; ++u) {
            if (u >= bt.count) continue;
            const int64_t idx = bt.idx + u * bt.idx_step;
            if (fused && idx < g.cache_vecs) cache[idx] = v[u];
            welford_add<CL>(st, v[u], x0, dp);
          }
        },
        [](bool, int64_t, int64_t) {});
    st = block_welford(st, red);
    if (a.mode == kPass1) {
      if (threadIdx.x == 0) {
        A* w = a.ws + (ng * g.splits + split) * 3;
        w[0] = st.n;
        w[1] = st.mean;
        w[2] = st.m2;
      }
      return;
    }
  } else {
    if (threadIdx.x == 0) {  // merge the tiles' partials in a fixed order
      const A* w = a.ws + ng * g.splits * 3;
      for (int64_t s = 0; s < g.splits; ++s) st = welford_merge(st, Welford<A>{w[3 * s], w[3 * s + 1], w[3 * s + 2]});
      red[32] = st;
    }
    __syncthreads();
    st = red[32];
  }
  const A count = static_cast<A>(g.cpg * g.S);
  const A mean_k = st.mean;  // mean - K
  const A var = st.m2 / count > A(0) ? st.m2 / count : A(0);  // biased
  const A rstd = A(1) / sqrt(var + a.eps);
  if (split == 0 && threadIdx.x == 0) {
    a.mean[ng] = (x0 + pb0) + mean_k;
    a.rstd[ng] = rstd;
  }

  // Pass 2: y = act(ca * ((x - x0) - mx) + cb), mx = mean' - (pb - pb0); x from the cache where it is.
  A mx[PV], ca[PV], cb[PV];
  visit_tile<CL, VEC, kUnrollFwd<VEC>>(
      g, lo, hi,
      [&](bool on, int64_t i) {
#pragma unroll
        for (int k = 0; k < PV; ++k) {
          const int64_t ch = channel_of<CL, VEC>(i, k);
          const A s1 = on ? A(1) + a.sc.get(nc0 + ch, A(0)) : A(1);
          mx[k] = on ? mean_k - (a.pb.get(nc0 + ch, A(0)) - pb0) : A(0);
          ca[k] = on ? rstd * a.w.get(c0 + ch, A(1)) * s1 : A(0);
          cb[k] = on ? a.b.get(c0 + ch, A(0)) * s1 + a.sh.get(nc0 + ch, A(0)) : A(0);
        }
      },
      [&](const Batch& bt) {
        V v[kUnrollFwd<VEC>];
#pragma unroll
        for (int u = 0; u < kUnrollFwd<VEC>; ++u) {
          if (u >= bt.count) continue;
          const int64_t idx = bt.idx + u * bt.idx_step;
          v[u] = fused && idx < g.cache_vecs ? cache[idx] : load_vec<V>(x + bt.off + u * bt.off_step);
        }
        with_silu(a.silu, [&](auto silu_c) {
#pragma unroll
          for (int u = 0; u < kUnrollFwd<VEC>; ++u) {
            if (u >= bt.count) continue;
            V o;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const int j = CL ? k : 0;
              const A hm = (static_cast<A>(v[u].v[k]) - x0) - mx[j];  // h - mean
              o.v[k] = static_cast<T>(act<decltype(silu_c)::value>(ca[j] * hm + cb[j]));
            }
            store_vec(y + bt.off + u * bt.off_step, o);
          }
        });
      },
      [](bool, int64_t, int64_t) {});
}

// ---------------------------------------------------------------------------
// Channels-last forward over slabs, the default where it applies (DIFFUSION_FAST_GNS_CL_SLABS=0 turns it off; H100,
// bf16, 32x256x32x32: 25 against 40 us of kernel time, 1x512x8x8 the same; the Triton kernels do the same). The kernel above gives a block one
// group and so reads one group's cpg * sizeof(T) bytes (8-16 for DDPM's norms) out of every row of C channels.
// Here a group's channels at one position are one vector (CPG * sizeof(T) of 4, 8 or 16 bytes) and a block
// takes GB consecutive groups of one sample (GB * CPG * sizeof(T) <= 128 bytes: whole rows of the slab). Lane l
// of a warp takes group l % GB at the warp's row slots l / GB, l / GB + 32 / GB, ...; a thread's Welford state is
// its group's, merged over the lanes of its group (xor shuffles at offsets GB, 2 GB, ...), then over warps in
// order. Grid (N * G / GB, splits); splits > 1: pass 1 stores per-(group, split) partials, pass 2 merges them
// (as the kernel above). Pass 2 re-reads x (mostly from L2). Statistics shifted as above (K = x0 + pb0).
// ---------------------------------------------------------------------------
constexpr int kSlabThreads = 256;

template <typename T, typename A>
struct SlabArgs {
  const T* x;        // (N, S, C) channels-last
  T* y;              // same
  Param w, b;        // (C,) or absent
  Param pb, sc, sh;  // (N, C) or absent
  A* mean;           // (N, G) out
  A* rstd;           // (N, G) out
  A* ws;             // splits > 1: (N*G, splits, 3) Welford partials; else null
  int64_t C, G, S, gb, tile, splits;
  A eps;
  bool silu;
  int mode;
};

template <typename A>
__device__ __forceinline__ Welford<A> shfl_xor(const Welford<A>& w, int o) {
  return {__shfl_xor_sync(0xffffffffu, w.n, o), __shfl_xor_sync(0xffffffffu, w.mean, o),
          __shfl_xor_sync(0xffffffffu, w.m2, o)};
}

template <typename T, typename A, int CPG>
__global__ void __launch_bounds__(kSlabThreads) gns_fwd_slab_kernel(const SlabArgs<T, A> a) {
  using V = Pack<T, CPG>;
  __shared__ Welford<A> red[kSlabThreads / 32][32];  // [warp][group of the slab]
  __shared__ Welford<A> total[32];
  const int gb = int(a.gb), lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int q = lane % gb;                              // this thread's group in the slab
  const int slots = nwarps * (32 / gb);                 // row slots of the block
  const int slot = warp * (32 / gb) + lane / gb;        // this thread's
  const int64_t slabs = a.G / gb, n = blockIdx.x / slabs, grp0 = (blockIdx.x % slabs) * gb;
  const int64_t grp = grp0 + q, c0 = grp * CPG, nc0 = n * a.C + c0;
  const int64_t split = blockIdx.y, lo = split * a.tile, hi = lo + a.tile < a.S ? lo + a.tile : a.S;
  const T* __restrict__ x = a.x + n * a.S * a.C + c0;  // the group's channels at position 0
  T* __restrict__ y = a.y + n * a.S * a.C + c0;
  const A x0 = static_cast<A>(x[0]), pb0 = a.pb.get(nc0, A(0));

  Welford<A> st{A(0), A(0), A(0)};
  if (a.mode != kPass2) {
    A dp[CPG];
#pragma unroll
    for (int k = 0; k < CPG; ++k) dp[k] = a.pb.get(nc0 + k, A(0)) - pb0;
    for (int64_t r = lo + slot; r < hi; r += slots) welford_add<true>(st, load_vec<V>(x + r * a.C), x0, dp);
    for (int o = gb; o < 32; o <<= 1) st = welford_merge(st, shfl_xor(st, o));
    if (lane < gb) red[warp][lane] = st;
    __syncthreads();
    if (threadIdx.x < gb) {  // one thread per group merges the warps in order
      Welford<A> t = red[0][threadIdx.x];
      for (int w = 1; w < nwarps; ++w) t = welford_merge(t, red[w][threadIdx.x]);
      if (a.mode == kPass1) {
        A* p = a.ws + ((n * a.G + grp0 + threadIdx.x) * a.splits + split) * 3;
        p[0] = t.n;
        p[1] = t.mean;
        p[2] = t.m2;
      }
      total[threadIdx.x] = t;
    }
    if (a.mode == kPass1) return;
  } else if (threadIdx.x < gb) {  // merge the group's tiles in a fixed order
    const A* p = a.ws + (n * a.G + grp0 + threadIdx.x) * a.splits * 3;
    Welford<A> t{A(0), A(0), A(0)};
    for (int64_t j = 0; j < a.splits; ++j) t = welford_merge(t, Welford<A>{p[3 * j], p[3 * j + 1], p[3 * j + 2]});
    total[threadIdx.x] = t;
  }
  __syncthreads();
  st = total[q];
  const A count = static_cast<A>(CPG * a.S);
  const A var = st.m2 / count > A(0) ? st.m2 / count : A(0);  // biased
  const A rstd = A(1) / sqrt(var + a.eps);  // as gns_fwd_kernel (a one-element group's h - mean is exactly 0)
  if (split == 0 && threadIdx.x < gb) {
    a.mean[n * a.G + grp] = (x0 + pb0) + st.mean;
    a.rstd[n * a.G + grp] = rstd;
  }

  // Pass 2: y = act(ca * ((x - x0) - mx) + cb), mx = mean' - (pb - pb0), per channel of the group.
  A mx[CPG], ca[CPG], cb[CPG];
#pragma unroll
  for (int k = 0; k < CPG; ++k) {
    const A s1 = A(1) + a.sc.get(nc0 + k, A(0));
    mx[k] = st.mean - (a.pb.get(nc0 + k, A(0)) - pb0);
    ca[k] = rstd * a.w.get(c0 + k, A(1)) * s1;
    cb[k] = a.b.get(c0 + k, A(0)) * s1 + a.sh.get(nc0 + k, A(0));
  }
  with_silu(a.silu, [&](auto silu_c) {
    for (int64_t r = lo + slot; r < hi; r += slots) {
      const V v = load_vec<V>(x + r * a.C);
      V o;
#pragma unroll
      for (int k = 0; k < CPG; ++k)
        o.v[k] = static_cast<T>(act<decltype(silu_c)::value>(ca[k] * ((static_cast<A>(v.v[k]) - x0) - mx[k]) + cb[k]));
      store_vec(y + r * a.C, o);
    }
  });
}

// ---------------------------------------------------------------------------
// Backward. Grid (N*G, splits); block: see make_plan.
// ---------------------------------------------------------------------------
template <typename T, typename A>
struct BwdArgs {
  const T* dy;          // (N, C, *) grad_y, layout of x
  const T* x;           // (N, C, *)
  T* dx;                // (N, C, *) out, layout of x
  Param w, b;           // (C,) or absent (1, 0)
  Param pb, sc, sh;     // (N, C) or absent (0)
  const A* mean;        // (N, G)
  const A* rstd;        // (N, G)
  A* ws;                // split path: (N*G, splits, 2) sums of dxhat, dxhat * xhat; else null
  A* part;              // (3, N*C, splits): per tile sum dz, sum dz * xhat, sum dx; null when unused
  int64_t part_stride;  // N*C*splits
  bool need_ab;         // write part[0], part[1] (weight, bias, scale or shift present)
  bool need_p;          // write part[2] (pre_bias present)
  int64_t red_bytes;    // leading bytes of dynamic shared memory used by channel_sums
  Geom geo;
  bool silu;
  int mode;
};

template <typename T, typename A, int VEC, bool CL>
__global__ void __launch_bounds__(kMaxThreads) gns_bwd_kernel(const BwdArgs<T, A> a) {
  using V = Pack<T, VEC>;
  constexpr int PV = CL ? VEC : 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* red = reinterpret_cast<A*>(smem_raw);
  V* cache_x = reinterpret_cast<V*>(smem_raw + a.red_bytes);  // kFused: cache_vecs vectors of x,
  V* cache_dy = cache_x + a.geo.cache_vecs;                     // then as many of dy
  __shared__ A sums[66];

  const Geom& g = a.geo;
  const int64_t ng = blockIdx.x, n = ng / g.G, grp = ng % g.G;
  const int64_t split = blockIdx.y;
  const int64_t lo = split * g.tile;
  const int64_t hi = lo + g.tile < g.extent ? lo + g.tile : g.extent;
  const int64_t base = group_base<CL>(g, n, grp);
  const T* __restrict__ x = a.x + base;
  const T* __restrict__ dy = a.dy + base;
  T* __restrict__ dx = a.dx + base;
  const int64_t c0 = grp * g.cpg;
  const int64_t nc0 = n * g.C + c0;
  const bool fused = a.mode == kFused;
  const A count = static_cast<A>(g.cpg * g.S);
  // A one-element group has xhat == 0 exactly; rstd = 0 keeps it exact (x - mx is only ~0 after rounding
  // of mean and pre_bias, and rstd = 1/sqrt(eps) would amplify that), as the CPU kernels do.
  const A mean = a.mean[ng], rstd = g.cpg * g.S > 1 ? a.rstd[ng] : A(0);

  // Per-channel coefficients of this thread's row/column: xhat = (x - mx) * rstd, z = xhat * wsc + zb.
  A mx[PV], wsc[PV], zb[PV];
  auto set_coefficients = [&](bool on, int64_t i) {
#pragma unroll
    for (int k = 0; k < PV; ++k) {
      const int64_t ch = channel_of<CL, VEC>(i, k);
      const A s1 = on ? A(1) + a.sc.get(nc0 + ch, A(0)) : A(1);
      mx[k] = on ? mean - a.pb.get(nc0 + ch, A(0)) : A(0);
      wsc[k] = on ? a.w.get(c0 + ch, A(1)) * s1 : A(0);
      zb[k] = on ? a.b.get(c0 + ch, A(0)) * s1 + a.sh.get(nc0 + ch, A(0)) : A(0);
    }
  };
  auto load2 = [&](V (&vx)[kUnrollBwd], V (&vdy)[kUnrollBwd], const Batch& bt, bool from_cache) {
#pragma unroll
    for (int u = 0; u < kUnrollBwd; ++u) {
      if (u >= bt.count) continue;
      const int64_t idx = bt.idx + u * bt.idx_step;
      if (from_cache && idx < g.cache_vecs) {
        vx[u] = cache_x[idx];
        vdy[u] = cache_dy[idx];
      } else {
        vx[u] = load_vec<V>(x + bt.off + u * bt.off_step);
        vdy[u] = load_vec<V>(dy + bt.off + u * bt.off_step);
      }
    }
  };

  // Pass 1: per-channel sums of dz and dz * xhat (this thread's part), then group sums of dxhat and
  // dxhat * xhat, which are sum_c wsc[c] * (those channel sums).
  A m1, m2;  // mean(dxhat), mean(dxhat * xhat) over the group
  if (a.mode != kPass2) {
    A s1 = A(0), s2 = A(0);
    A acc[2][PV];
    visit_tile<CL, VEC, kUnrollBwd>(
        g, lo, hi,
        [&](bool on, int64_t i) {
          set_coefficients(on, i);
#pragma unroll
          for (int k = 0; k < PV; ++k) acc[0][k] = acc[1][k] = A(0);
        },
        [&](const Batch& bt) {
          V vx[kUnrollBwd], vdy[kUnrollBwd];
          load2(vx, vdy, bt, false);
#pragma unroll
          for (int u = 0; u < kUnrollBwd; ++u) {
            if (u >= bt.count) continue;
            const int64_t idx = bt.idx + u * bt.idx_step;
            if (fused && idx < g.cache_vecs) {
              cache_x[idx] = vx[u];
              cache_dy[idx] = vdy[u];
            }
          }
          with_silu(a.silu, [&](auto silu_c) {
#pragma unroll
            for (int u = 0; u < kUnrollBwd; ++u) {
              if (u >= bt.count) continue;
#pragma unroll
              for (int k = 0; k < VEC; ++k) {
                const int j = CL ? k : 0;
                const A xhat = (static_cast<A>(vx[u].v[k]) - mx[j]) * rstd;
                const A dz = act_grad<decltype(silu_c)::value>(xhat * wsc[j] + zb[j], static_cast<A>(vdy[u].v[k]));
                acc[0][j] += dz;
                acc[1][j] += dz * xhat;
              }
            }
          });
        },
        [&](bool on, int64_t i, int64_t i0) {
          // dxhat = dz * wsc with wsc fixed per channel: the group sums follow from the channel sums.
#pragma unroll
          for (int k = 0; k < PV; ++k) {
            s1 += wsc[k] * acc[0][k];
            s2 += wsc[k] * acc[1][k];
          }
          if (a.need_ab) channel_sums<CL, VEC, 2>(acc, on, i, i0, g, red, a.part, a.part_stride, nc0, split);
        });
    block_sum2(s1, s2, sums);
    if (a.mode == kPass1) {
      if (threadIdx.x == 0) {
        A* w = a.ws + (ng * g.splits + split) * 2;
        w[0] = s1;
        w[1] = s2;
      }
      return;
    }
    m1 = s1 / count;
    m2 = s2 / count;
  } else {
    if (threadIdx.x == 0) {  // add the tiles' sums in a fixed order
      const A* w = a.ws + ng * g.splits * 2;
      A t1 = A(0), t2 = A(0);
      for (int64_t s = 0; s < g.splits; ++s) {
        t1 += w[2 * s];
        t2 += w[2 * s + 1];
      }
      sums[64] = t1;
      sums[65] = t2;
    }
    __syncthreads();
    m1 = sums[64] / count;
    m2 = sums[65] / count;
  }

  // Pass 2: dx = rstd * (dxhat - m1 - xhat * m2); per-channel sum of dx (grad of pre_bias).
  A acc[1][PV];
  visit_tile<CL, VEC, kUnrollBwd>(
      g, lo, hi,
      [&](bool on, int64_t i) {
        set_coefficients(on, i);
#pragma unroll
        for (int k = 0; k < PV; ++k) acc[0][k] = A(0);
      },
      [&](const Batch& bt) {
        V vx[kUnrollBwd], vdy[kUnrollBwd];
        load2(vx, vdy, bt, fused);
        with_silu(a.silu, [&](auto silu_c) {
#pragma unroll
          for (int u = 0; u < kUnrollBwd; ++u) {
            if (u >= bt.count) continue;
            V o;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const int j = CL ? k : 0;
              const A xhat = (static_cast<A>(vx[u].v[k]) - mx[j]) * rstd;
              const A dz = act_grad<decltype(silu_c)::value>(xhat * wsc[j] + zb[j], static_cast<A>(vdy[u].v[k]));
              const A dh = rstd * (dz * wsc[j] - m1 - xhat * m2);
              o.v[k] = static_cast<T>(dh);
              acc[0][j] += dh;
            }
            store_vec(dx + bt.off + u * bt.off_step, o);
          }
        });
      },
      [&](bool on, int64_t i, int64_t i0) {
        if (a.need_p)
          channel_sums<CL, VEC, 1>(acc, on, i, i0, g, red, a.part + 2 * a.part_stride, a.part_stride, nc0, split);
      });
}

// Parameter gradients from the per-(n, c, tile) sums: one thread per channel c, looping over n and
// tiles in order. A = sum dz, B = sum dz * xhat, P = sum dx over (tiles, s):
//   d_shift = A, d_scale = w * B + b * A, d_pre_bias = P, d_bias = sum_n (1 + scale) A,
//   d_weight = sum_n (1 + scale) B.
template <typename A>
__global__ void gns_param_grads_kernel(const A* part, int64_t stride, int64_t N, int64_t C, int64_t splits,
                                       bool need_ab, bool need_p, Param w, Param b, Param sc, OutParam dw,
                                       OutParam db, OutParam dpb, OutParam dsc, OutParam dsh) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x) {
    const A wc = w.get(c, A(1)), bc = b.get(c, A(0));
    A gw = A(0), gb = A(0);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t nc = n * C + c;
      A sa = A(0), sb = A(0), sp = A(0);
      for (int64_t k = 0; k < splits; ++k) {
        if (need_ab) {
          sa += part[nc * splits + k];
          sb += part[stride + nc * splits + k];
        }
        if (need_p) sp += part[2 * stride + nc * splits + k];
      }
      const A s1 = A(1) + sc.get(nc, A(0));
      dsh.set(nc, sa);
      dsc.set(nc, wc * sb + bc * sa);
      dpb.set(nc, sp);
      gw += s1 * sb;
      gb += s1 * sa;
    }
    dw.set(c, gw);
    db.set(c, gb);
  }
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t pow2_ceil(int64_t v) {  // smallest power of two >= v (v clamped to [1, 2^20])
  v = std::min<int64_t>(std::max<int64_t>(v, 1), int64_t(1) << 20);
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

struct Plan {
  Geom g;
  int threads;
  int64_t red_bytes;  // backward: channel_sums scratch at the start of dynamic shared memory
  int64_t smem;       // dynamic shared memory of the fused launch (cache included)
  int64_t smem_split; // ... of the split launches (no cache)
};

// Largest vector width (elements) with VEC * elem <= 16 bytes that keeps every vector inside one
// channel row (NCHW: S % VEC == 0) or one group (CL: cpg % VEC == 0) and every pointer aligned.
int pick_vec(const GroupNormSiLUShape& s, bool cl, int64_t elem, std::initializer_list<const void*> ptrs) {
  const int64_t along = cl ? s.C / s.G : s.S;
  for (int v = int(16 / elem); v > 1; v /= 2) {
    bool ok = along % v == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % uintptr_t(v * elem) == 0;
    if (ok) return v;
  }
  return 1;
}

// kVecsPerThread, or DIFFUSION_FAST_GNS_VECS_PER_THREAD (an integer in [1, 64], read once) for tuning
// sweeps on a GPU without rebuilding (benchmarks/probes/group_norm_silu_sweep.py).
int64_t vecs_per_thread() {
  static const int64_t v = [] {
    const char* env = std::getenv("DIFFUSION_FAST_GNS_VECS_PER_THREAD");
    if (env == nullptr || *env == '\0') return kVecsPerThread;
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    TORCH_CHECK(*end == '\0' && n >= 1 && n <= 64,
                "DIFFUSION_FAST_GNS_VECS_PER_THREAD must be an integer in [1, 64], got '", env, "'");
    return int64_t(n);
  }();
  return v;
}

Plan make_plan(const GroupNormSiLUShape& s, bool cl, int vec, int64_t elem, int64_t acc_size, bool backward,
               int unroll) {
  Plan p{};
  Geom& g = p.g;
  g.C = s.C;
  g.G = s.G;
  g.S = s.S;
  g.cpg = s.C / s.G;
  if (cl) {
    g.rows = s.S;
    g.cols = g.cpg / vec;
    g.row_stride = s.C;
    g.extent = g.rows;
  } else {
    g.rows = g.cpg;
    g.cols = s.S / vec;
    g.row_stride = s.S;
    g.extent = g.cols;
  }
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t sms = prop->multiProcessorCount;
  const int64_t groups = s.N * s.G;
  const int64_t group_vecs = g.rows * g.cols;

  // Tiles per group: one (fused) unless the groups alone leave SMs idle.
  int64_t splits = 1;
  if (groups < sms) {
    splits = ceil_div(4 * sms, groups);
    splits = std::min({splits, std::max<int64_t>(1, group_vecs / kMinTileVecs), g.extent, kMaxSplits});
  }
  g.tile = ceil_div(g.extent, splits);
  g.splits = ceil_div(g.extent, g.tile);  // no empty tile

  // Threads: ~kVecsPerThread vectors each, a power of two in [32, 512], no more row slots than rows.
  // NCHW: tc threads per channel row, each with ~unroll vectors of the row per step (loads in flight),
  // more when rows are few; channels-last: tc covers the group's columns (at most 32).
  const int64_t tile_vecs = g.tile * (cl ? g.cols : g.rows);
  int64_t threads = std::min<int64_t>(std::max<int64_t>(pow2_ceil(ceil_div(tile_vecs, vecs_per_thread())), 32), kMaxThreads);
  int64_t tc;
  if (cl) {
    tc = std::min<int64_t>(32, pow2_ceil(g.cols));
    threads = std::min(threads, std::max<int64_t>(32, tc * pow2_ceil(g.tile)));
  } else {
    tc = std::max(pow2_ceil(ceil_div(g.tile, unroll)), threads / pow2_ceil(g.rows));
    tc = std::min({tc, pow2_ceil(g.tile), threads});
    threads = std::min(threads, std::max<int64_t>(32, tc * pow2_ceil(g.rows)));
  }
  g.tc = int(tc);
  p.threads = int(threads);

  // Shared memory: channel_sums scratch (backward), then the cache of the fused launch.
  const int64_t nwarps = threads / 32;
  const int64_t red_elems = backward ? nwarps * 2 * (cl ? g.tc * vec : 1) : 0;
  p.red_bytes = ceil_div(red_elems * acc_size, 16) * 16;
  p.smem_split = p.red_bytes;
  g.cache_vecs = 0;
  p.smem = p.red_bytes;
  if (g.splits == 1) {
    const int64_t per_vec = vec * elem * (backward ? 2 : 1);
    const int64_t budget = std::max<int64_t>(0, int64_t(prop->sharedMemPerBlockOptin) - kSmemReserve - p.red_bytes);
    g.cache_vecs = std::min(group_vecs, budget / per_vec);
    p.smem = p.red_bytes + g.cache_vecs * per_vec;
  }
  return p;
}

template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// Runs `kernel` over grid (N*G, splits): one fused launch when splits == 1, else pass 1 then
// pass 2 through a workspace of `ws_per_split` accumulators per (group, split) (args.ws).
template <typename Kernel, typename Args>
void launch_fused_or_split(Kernel kernel, Args& args, const Plan& p, int64_t groups, int64_t ws_per_split,
                           const at::TensorOptions& acc_options, cudaStream_t stream) {
  const dim3 grid(unsigned(groups), unsigned(p.g.splits));
  if (p.g.splits == 1) {
    allow_smem(kernel, p.smem);
    kernel<<<grid, p.threads, p.smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  using Acc = std::remove_pointer_t<decltype(args.ws)>;
  at::Tensor ws = at::empty({groups * p.g.splits * ws_per_split}, acc_options);
  args.ws = ws.mutable_data_ptr<Acc>();
  args.geo.cache_vecs = 0;
  allow_smem(kernel, p.smem_split);
  for (const int mode : {kPass1, kPass2}) {
    args.mode = mode;
    kernel<<<grid, p.threads, p.smem_split, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Calls f(std::integral_constant<int, VEC>) for vec in {8, 4, 2, 1}, within 16 bytes of T.
template <typename T, typename F>
void with_vec(int vec, const F& f) {
  switch (vec) {
    case 8:
      if constexpr (sizeof(T) * 8 <= 16) return f(std::integral_constant<int, 8>{});
      break;
    case 4:
      if constexpr (sizeof(T) * 4 <= 16) return f(std::integral_constant<int, 4>{});
      break;
    case 2:
      if constexpr (sizeof(T) * 2 <= 16) return f(std::integral_constant<int, 2>{});
      break;
    default:
      break;
  }
  f(std::integral_constant<int, 1>{});
}

template <typename F>
void with_layout(bool cl, const F& f) {
  if (cl)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// DIFFUSION_FAST_GNS_CL_SLABS=0 turns the channels-last slab forward off. Read at each call (a getenv, far
// below a launch), so that one process (bench_group_norm_silu's cuda+groupwise) can time both forwards.
bool cl_slabs_enabled() {
  const char* v = std::getenv("DIFFUSION_FAST_GNS_CL_SLABS");
  return v == nullptr || !(v[0] == '0' && v[1] == '\0');
}

// Runs the slab forward and returns true where it applies: channels-last x of float/half/bfloat16 whose group is
// one vector of 4, 8 or 16 bytes, at least two groups per slab, x and y aligned to that vector.
template <typename T, typename A>
bool try_fwd_slabs(const GroupNormSiLUShape& s, bool cl, const at::Tensor& x, at::Tensor& y, const at::Tensor& w,
                   const at::Tensor& b, const at::Tensor& pb, const at::Tensor& sc, const at::Tensor& sh,
                   at::Tensor& mean, at::Tensor& rstd, double eps, bool silu, at::ScalarType acc,
                   cudaStream_t stream) {
  const int64_t cpg = s.C / s.G, vbytes = cpg * int64_t(sizeof(T));
  if (!cl || !cl_slabs_enabled() || std::is_same_v<T, double> || (vbytes != 4 && vbytes != 8 && vbytes != 16))
    return false;
  int64_t gb = 1;
  while (2 * gb * vbytes <= 128 && 2 * gb <= 32 && s.G % (2 * gb) == 0) gb *= 2;
  const auto aligned = [&](const void* p) { return reinterpret_cast<uintptr_t>(p) % uintptr_t(vbytes) == 0; };
  if (gb < 2 || !aligned(x.const_data_ptr()) || !aligned(y.const_data_ptr())) return false;
  const int64_t blocks = s.N * s.G / gb, sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t slots = kSlabThreads / 32 * (32 / gb);  // rows a block reads per step
  int64_t splits = blocks < 2 * sms ? std::min(ceil_div(4 * sms, blocks), std::max<int64_t>(1, s.S / (8 * slots))) : 1;
  splits = std::min(splits, kMaxSplits);
  const int64_t tile = ceil_div(s.S, splits);
  splits = ceil_div(s.S, tile);
  SlabArgs<T, A> args{x.const_data_ptr<T>(), y.mutable_data_ptr<T>(), param_of(w), param_of(b), param_of(pb),
                      param_of(sc), param_of(sh), mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>(), nullptr,
                      s.C, s.G, s.S, gb, tile, splits, static_cast<A>(eps), silu, kFused};
  at::Tensor ws;
  if (splits > 1) {
    ws = at::empty({s.N * s.G * splits * 3}, x.options().dtype(acc));
    args.ws = ws.mutable_data_ptr<A>();
  }
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  // Launches for a group of CPG channels; false where its vector would exceed 16 bytes.
  const auto launch = [&](auto cpg_c) {
    constexpr int CPG = decltype(cpg_c)::value;
    if constexpr (CPG * sizeof(T) > 16) {
      return false;
    } else {
      const int modes[2] = {kPass1, kPass2};
      for (int m = 0; m < (splits > 1 ? 2 : 1); ++m) {
        args.mode = splits > 1 ? modes[m] : kFused;
        gns_fwd_slab_kernel<T, A, CPG><<<grid, kSlabThreads, 0, stream>>>(args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return true;
    }
  };
  switch (cpg) {
    case 1: return launch(std::integral_constant<int, 1>{});
    case 2: return launch(std::integral_constant<int, 2>{});
    case 4: return launch(std::integral_constant<int, 4>{});
    case 8: return launch(std::integral_constant<int, 8>{});
    default: return false;
  }
}

void check_grid(const GroupNormSiLUShape& s) {
  TORCH_CHECK(s.N * s.G <= int64_t(std::numeric_limits<int32_t>::max()),
              "group_norm_silu (CUDA): N * num_groups must be < 2^31, got ", s.N * s.G);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_fwd_cuda(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& pre_bias,
    const OptTensor& scale, const OptTensor& shift, int64_t num_groups, double eps, bool silu) {
  const auto s = group_norm_silu_shape(x, weight, bias, pre_bias, scale, shift, num_groups);
  TORCH_CHECK(x.is_cuda(), "group_norm_silu_fwd_cuda: x must be a CUDA tensor, got ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({s.N, s.G}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({s.N, s.G}, x.options().dtype(acc));
  if (s.N * s.G == 0) return {y, mean, rstd};
  if (x.numel() == 0) {  // empty groups (C or S is 0): mean 0, var 0, as the CPU kernels
    mean.zero_();
    rstd.fill_(1.0 / std::sqrt(eps));
    return {y, mean, rstd};
  }
  check_grid(s);
  const bool cl = s.channels_last || s.S == 1;  // with S == 1 both layouts are the same
  const at::Tensor w = as_input(weight), b = as_input(bias), pb = as_input(pre_bias);
  const at::Tensor sc = as_input(scale), sh = as_input(shift);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    if (try_fwd_slabs<scalar_t, A>(s, cl, x, y, w, b, pb, sc, sh, mean, rstd, eps, silu, acc, stream)) return;
    const int vec = pick_vec(s, cl, sizeof(scalar_t), {x.const_data_ptr(), y.const_data_ptr()});
    with_layout(cl, [&](auto cl_c) {
      constexpr bool CL = decltype(cl_c)::value;
      with_vec<scalar_t>(vec, [&](auto vec_c) {
        constexpr int VEC = decltype(vec_c)::value;
        const Plan p = make_plan(s, CL, VEC, sizeof(scalar_t), sizeof(A), /*backward=*/false, kUnrollFwd<VEC>);
        FwdArgs<scalar_t, A> args{x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                  param_of(w), param_of(b), param_of(pb), param_of(sc), param_of(sh),
                                  mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>(), nullptr, p.g,
                                  static_cast<A>(eps), silu, kFused};
        launch_fused_or_split(gns_fwd_kernel<scalar_t, A, VEC, CL>, args, p, s.N * s.G, /*ws_per_split=*/3,
                              x.options().dtype(acc), stream);
      });
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& pre_bias, const OptTensor& scale, const OptTensor& shift, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool silu) {
  const auto s = group_norm_silu_shape(x, weight, bias, pre_bias, scale, shift, num_groups);
  TORCH_CHECK(x.is_cuda(), "group_norm_silu_bwd_cuda: x must be a CUDA tensor, got ", x.device());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              "group_norm_silu_bwd: grad_y must match x in shape, dtype and device");
  TORCH_CHECK(s.channels_last ? grad_y.movedim(1, -1).is_contiguous() : grad_y.is_contiguous(),
              "group_norm_silu_bwd: grad_y must have the memory layout of x, got strides ", grad_y.strides(),
              " for x strides ", x.strides());
  TORCH_CHECK(mean.sizes() == at::IntArrayRef({s.N, s.G}) && rstd.sizes() == mean.sizes(),
              "group_norm_silu_bwd: mean and rstd must have shape (N, num_groups)");
  TORCH_CHECK(mean.scalar_type() == acc && rstd.scalar_type() == acc && mean.is_contiguous() && rstd.is_contiguous(),
              "group_norm_silu_bwd: mean and rstd must be contiguous ", acc, " tensors");
  TORCH_CHECK(mean.device() == x.device() && rstd.device() == x.device(),
              "group_norm_silu_bwd: mean and rstd must be on the device of x");
  c10::cuda::CUDAGuard guard(x.device());

  // Outputs: grad_x in x's layout; parameter grads in their parameter's dtype, (0,) when absent.
  const auto present = [](const OptTensor& t) { return t.has_value() && t->defined(); };
  const auto grad_of = [&](const OptTensor& t) {
    return present(t) ? at::empty(t->sizes(), t->options().memory_format(at::MemoryFormat::Contiguous))
                      : at::empty({0}, x.options());
  };
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor gw = grad_of(weight), gb = grad_of(bias), gpb = grad_of(pre_bias), gsc = grad_of(scale),
             gsh = grad_of(shift);
  if (x.numel() == 0) {  // sums over nothing
    for (at::Tensor* t : {&gw, &gb, &gpb, &gsc, &gsh}) t->zero_();
    return {grad_x, gw, gb, gpb, gsc, gsh};
  }
  check_grid(s);
  const bool cl = s.channels_last || s.S == 1;
  const at::Tensor w = as_input(weight), b = as_input(bias), pb = as_input(pre_bias);
  const at::Tensor sc = as_input(scale), sh = as_input(shift);
  const bool need_ab = w.defined() || b.defined() || sc.defined() || sh.defined();
  const bool need_p = pb.defined();
  // Kernel-side outputs: the grads themselves, or float32 buffers for exotic dtypes (copied back below).
  const auto kernel_out = [](const at::Tensor& t) {
    const bool exotic = t.numel() > 0 && !cuda_param::kernel_dtype(t.scalar_type());
    return exotic ? at::empty(t.sizes(), t.options().dtype(at::kFloat)) : t;
  };
  at::Tensor kw = present(weight) ? kernel_out(gw) : at::Tensor(), kb = present(bias) ? kernel_out(gb) : at::Tensor();
  at::Tensor kpb = present(pre_bias) ? kernel_out(gpb) : at::Tensor();
  at::Tensor ksc = present(scale) ? kernel_out(gsc) : at::Tensor(), ksh = present(shift) ? kernel_out(gsh) : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor dy = grad_y;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const int vec =
        pick_vec(s, cl, sizeof(scalar_t), {x.const_data_ptr(), dy.const_data_ptr(), grad_x.const_data_ptr()});
    with_layout(cl, [&](auto cl_c) {
      constexpr bool CL = decltype(cl_c)::value;
      with_vec<scalar_t>(vec, [&](auto vec_c) {
        constexpr int VEC = decltype(vec_c)::value;
        const Plan p = make_plan(s, CL, VEC, sizeof(scalar_t), sizeof(A), /*backward=*/true, kUnrollBwd);
        const int64_t part_stride = s.N * s.C * p.g.splits;
        at::Tensor part;
        if (need_ab || need_p) part = at::empty({3 * part_stride}, x.options().dtype(acc));
        BwdArgs<scalar_t, A> args{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                  grad_x.mutable_data_ptr<scalar_t>(), param_of(w), param_of(b), param_of(pb),
                                  param_of(sc), param_of(sh), mean.const_data_ptr<A>(), rstd.const_data_ptr<A>(),
                                  nullptr, part.defined() ? part.mutable_data_ptr<A>() : nullptr, part_stride,
                                  need_ab, need_p, p.red_bytes, p.g, silu, kFused};
        launch_fused_or_split(gns_bwd_kernel<scalar_t, A, VEC, CL>, args, p, s.N * s.G, /*ws_per_split=*/2,
                              x.options().dtype(acc), stream);
        if (part.defined()) {
          const int threads = 256;
          const int blocks = int(std::max<int64_t>(1, std::min<int64_t>(ceil_div(s.C, threads), 65535)));
          gns_param_grads_kernel<A><<<blocks, threads, 0, stream>>>(
              part.const_data_ptr<A>(), part_stride, s.N, s.C, p.g.splits, need_ab, need_p, param_of(w),
              param_of(b), param_of(sc), out_of(kw), out_of(kb), out_of(kpb), out_of(ksc), out_of(ksh));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  });
  // Exotic parameter dtypes: copy the float32 results into the real outputs.
  const std::pair<const at::Tensor*, at::Tensor*> results[] = {{&kw, &gw}, {&kb, &gb}, {&kpb, &gpb}, {&ksc, &gsc}, {&ksh, &gsh}};
  for (const auto& r : results)
    if (r.first->defined() && !r.first->is_same(*r.second)) r.second->copy_(*r.first);
  return {grad_x, gw, gb, gpb, gsc, gsh};
}

}  // namespace diffusion_fast
