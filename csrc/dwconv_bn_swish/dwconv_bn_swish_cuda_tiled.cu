// Shared-memory tiled CUDA forward and backward of dwconv_bn_swish (training and eval) for NCHW-contiguous x,
// K in {3, 5}, float32 / float16 / bfloat16: the path dwconv_bn_swish_fwd_cuda / _bwd_cuda take for those inputs
// (other inputs run the kernels of dwconv_bn_swish_cuda.cu; DIFFUSION_FAST_DWCONV_TILED=0 turns this path off).
// The forward's kernels passed a float64-reference check on an H100 (2026-11-27) as a standalone probe: odd and
// NVAE shapes, every dtype, K 3 and 5, y preset to NaN, determinism; the backward has not run on a GPU yet.
// tests/dwconv_tiled_emulate.py replays the index math of both on the CPU.
//
// Equations (R = K / 2, zero padding, stride 1; all arithmetic fp32, the finalize merge fp64)
//   z'[n,c,h,w] = sum_{i,j < K} w[c,i,j] * x[n,c,h+i-R,w+j-R]          the conv without its bias cb
//   training: mean'[c], var[c] = mean and biased variance of z' over (N, H, W); mean = mean' + cb
//   eval:     mean, var = the running statistics;                        mean' = mean - cb
//   sc = gamma * rsqrt(var + eps),  sh = beta - mean' * sc               =>  sc * z' + sh == BN(z' + cb)
//   y = swish ? zn * sigmoid(zn) : zn,  zn = sc * z' + sh
//
// Tiling (a "tile" is a TH x TW block of outputs of one (n, c) plane; tiles are numbered in memory order,
// tile = ((n*C + c) * tiles_y + ty) * tiles_x + tx; a block of PB * NT threads works PB consecutive tiles)
//   smem per tile: SR = TH + 2R rows x P = TW + 4 cols of fp32; row r, col j <-> x[y0 - R + r][x0 - 2 + j],
//     zero outside the plane (the inner loop has no bounds checks). The left halo is 2 columns for both K so
//     that 2-element global loads stay aligned (x0 is even) and each thread's window starts on a 16-byte
//     boundary; K = 3 uses window columns 1..6 of 0..7.
//   loader: the tile's NT threads read element pairs along rows, coalesced, all loads of a thread in flight
//     before its smem stores; scalar loads when W is odd or x is misaligned.
//   compute: a thread owns RY rows x 4 adjacent columns of outputs; for each of its RY + 2R input rows it
//     reads 8 floats (two float4 loads) of smem and does the K x K FMAs of every output row that input row
//     touches: one smem word feeds up to 4K FMAs. 32-bit index math inside a plane.
//   configs (by W): L  W > 16:     TW 32, TH 32, RY 4, NT 64, PB 2  -> 128 threads, smem 10.1 KB (K=5)
//                   M  8 < W <= 16: TW 16, TH 16, RY 4, NT 16, PB 8  -> 128 threads, smem 12.5 KB
//                   S  W <= 8:      TW  8, TH  8, RY 2, NT  8, PB 16 -> 128 threads, smem  9.0 KB
// Passes (deterministic: fixed reduction orders, no atomics)
//   1 stats (training; grid tiles / PB): per thread the exact mean and M2 of its valid outputs, Chan-merged
//     across the tile -> part[0|1|2][tile] = count, mean', M2.
//   2 finalize (training; one warp per channel): merges the channel's N * tiles_per_plane partials in fp64
//     -> mean, var, coef = (sc, sh). Eval: coef_kernel, one thread per channel.
//   3 apply (grid tiles / PB): reloads the tile, recomputes the conv, y = act(sc z' + sh).
//   HBM traffic: training x read twice, y written once; eval x read once, y written once.
//   16-bit x, training (store_z): pass 1 also writes z' - (its tile's mean') into y, and pass 3 is apply_z: y read,
//     y = act(sc (y + tile mean') + sh) written in place, no conv. x read once, y written twice and read once: one
//     more write and read of y than above, against 25 fewer FMAs per output (for K = 5), which bound these kernels
//     at 16 bits (H100, ncu: the stats and apply kernels ran at 20-32% of DRAM bandwidth, FMA- and issue-bound).
// Backward (the statistics y was normalised with; dy NCHW-contiguous), zhat = (z' - mean') rstd, dzn = act'(zn) dy:
//   A[c] = sum dzn, B[c] = sum dzn zhat (the grads of beta and gamma); dz = sc dzn + q zhat + r, training
//   q = -sc B / M, r = -sc A / M (M = N H W), eval q = r = 0; dx = conv(dz, flipped w) with zero padding;
//   dw[c][i][j] = sum dz[h][w] x[h+i-R][w+j-R], dcb = sum dz.
//   coef (one thread per channel): sc, sh, mean', rstd.
//   1 sums (grid tiles / PB): the stats pass's tile and conv, dy read per output -> part[tile] = (A, B) partials;
//     channel_sums_kernel sums each channel's tiles (a fixed order) -> sums (C, 2), and the bn grads.
//   2 dx (grid tiles / PB): smem X = x over the tile + 2R halo (rows TH + 4R, pitch TW + 8, left halo 4 for both
//     K); dz over the tile + R halo into smem D, laid out as the forward's conv input (so conv_tile with flipped
//     weights gives dx), 0 outside the plane; per tile the dw and dcb partials -> channel_sums_kernel: the conv grads.
//   HBM traffic: x read twice, dy read twice, dx written once (the untiled kernels also write and read an fp32
//   dz, and read x and dz once per tap from L1/L2). Redundant work: dz over the halo, (TH+2R)(TW+4)/(TH TW) of it.
#include "dwconv_bn_swish/dwconv_bn_swish.h"

#include "cuda_param.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace diffusion_fast {
namespace dwconv_tiled {
namespace {

using cuda_param::OutParam;
using cuda_param::Param;
using cuda_param::out_of;
using cuda_param::param_of;

constexpr int kV = 4;  // adjacent outputs per thread along w

template <int TW_, int TH_, int RY_, int PB_>
struct Cfg {
  static constexpr int TW = TW_;           // tile width (outputs)
  static constexpr int TH = TH_;           // tile height (outputs)
  static constexpr int RY = RY_;           // output rows per thread
  static constexpr int PB = PB_;           // tiles per block
  static constexpr int TX = TW / kV;       // threads along w in a tile
  static constexpr int TY = TH / RY;       // threads along h in a tile
  static constexpr int NT = TX * TY;       // threads per tile
  static constexpr int THREADS = NT * PB;  // threads per block
  static constexpr int P = TW + 4;         // smem row pitch in floats (TW + 2 halo columns each side)
  static_assert(TW % kV == 0 && TH % RY == 0, "tile must split into whole threads");
  static_assert((NT & (NT - 1)) == 0 && (NT <= 32 || NT % 32 == 0), "NT: a power of two; tiles align to warps");
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block size");
};
using CfgL = Cfg<32, 32, 4, 2>;  // W > 16
using CfgM = Cfg<16, 16, 4, 8>;  // 8 < W <= 16
using CfgS = Cfg<8, 8, 2, 16>;   // W <= 8

struct Geo {
  int N, C, H, W;
  int tiles_x, tiles_plane;  // tiles along w per plane; tiles per plane (tiles_x * tiles_y)
  int tiles;                 // N * C * tiles_plane
  int pair_load;             // x read 2 elements at a time: W even and x 2-element aligned
  int vec_store;             // y written 4 elements at a time: W % 4 == 0 and y 4-element aligned
};

// ---------------------------------------------------------------------------
// Element access: fp32 in registers, T in memory.
// ---------------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static __device__ __forceinline__ float load1(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ float2 load2(const float* p) { return __ldg(reinterpret_cast<const float2*>(p)); }
  static __device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
  static __device__ __forceinline__ void store1(float* p, float a) { *p = a; }
  static __device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
    *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
  }
};

template <typename T, typename Bits>
struct Elem16 {  // 16-bit floats: Bits converts the raw bits
  static __device__ __forceinline__ float load1(const T* p) {
    return Bits::to_f(__ldg(reinterpret_cast<const unsigned short*>(p)));
  }
  static __device__ __forceinline__ float2 load2(const T* p) {
    const unsigned int u = __ldg(reinterpret_cast<const unsigned int*>(p));  // element 0 in the low half
    return make_float2(Bits::to_f(static_cast<unsigned short>(u & 0xffffu)),
                       Bits::to_f(static_cast<unsigned short>(u >> 16)));
  }
  static __device__ __forceinline__ float4 load4(const T* p) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    return make_float4(Bits::to_f(static_cast<unsigned short>(u.x & 0xffffu)),
                       Bits::to_f(static_cast<unsigned short>(u.x >> 16)),
                       Bits::to_f(static_cast<unsigned short>(u.y & 0xffffu)),
                       Bits::to_f(static_cast<unsigned short>(u.y >> 16)));
  }
  static __device__ __forceinline__ void store1(T* p, float a) {
    *reinterpret_cast<unsigned short*>(p) = Bits::of_f(a);
  }
  static __device__ __forceinline__ void store4(T* p, float a, float b, float c, float d) {
    const unsigned int lo = unsigned(Bits::of_f(a)) | (unsigned(Bits::of_f(b)) << 16);
    const unsigned int hi = unsigned(Bits::of_f(c)) | (unsigned(Bits::of_f(d)) << 16);
    *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
  }
};

struct BF16Bits {
  static __device__ __forceinline__ float to_f(unsigned short b) { return __uint_as_float(unsigned(b) << 16); }
  static __device__ __forceinline__ unsigned short of_f(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};
struct F16Bits {
  static __device__ __forceinline__ float to_f(unsigned short b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ unsigned short of_f(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
template <>
struct Elem<c10::BFloat16> : Elem16<c10::BFloat16, BF16Bits> {};
template <>
struct Elem<c10::Half> : Elem16<c10::Half, F16Bits> {};

// ---------------------------------------------------------------------------
// Tile decode, loader, conv.
// ---------------------------------------------------------------------------
struct Tile {
  int id, plane, c, x0, y0;
  bool on;  // id < tiles (the last block may hold fewer than PB tiles)
};

template <class CF>
__device__ __forceinline__ Tile tile_of(const Geo& g, int p) {
  Tile t;
  t.id = int(blockIdx.x) * CF::PB + p;
  t.on = t.id < g.tiles;
  const int id = t.on ? t.id : 0;
  t.plane = id / g.tiles_plane;  // n * C + c
  const int r = id - t.plane * g.tiles_plane;
  const int ty = r / g.tiles_x;
  t.x0 = (r - ty * g.tiles_x) * CF::TW;
  t.y0 = ty * CF::TH;
  t.c = t.plane % g.C;
  return t;
}

// Fills smem s[SR][P] with the plane's region whose top-left element is (gy0, gx0): s[r*P + j] = x[gy0 + r][gx0 + j],
// 0 outside the plane. gx0 and P are even (pair loads: W even, so a pair is wholly in or out). xp: the plane. Thread
// lt of NT takes elements (or pairs) lt, lt + NT, ...; all of its loads are issued before its stores.
template <int SR, int P, int NT, typename T>
__device__ __forceinline__ void load_region(const T* __restrict__ xp, float* __restrict__ s, int lt, int gy0, int gx0,
                                            const Geo& g) {
  static_assert(P % 2 == 0, "pair loads need an even pitch");
  if (g.pair_load) {
    constexpr int PP = P / 2, TOT = SR * PP, IT = (TOT + NT - 1) / NT;  // pairs per row; pairs in the region
    float2 v[IT];
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      const int e = lt + i * NT, r = e / PP, q = e - r * PP;
      const int gy = gy0 + r, gx = gx0 + 2 * q;
      v[i] = make_float2(0.f, 0.f);
      if (e < TOT && unsigned(gy) < unsigned(g.H) && unsigned(gx) < unsigned(g.W))
        v[i] = Elem<T>::load2(xp + gy * g.W + gx);
    }
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      const int e = lt + i * NT;  // smem offset r * P + 2q == 2e
      if (e < TOT) *reinterpret_cast<float2*>(s + 2 * e) = v[i];
    }
  } else {
    constexpr int TOT = SR * P, IT = (TOT + NT - 1) / NT;
    float v[IT];
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      const int e = lt + i * NT, r = e / P, j = e - r * P;
      const int gy = gy0 + r, gx = gx0 + j;
      v[i] = 0.f;
      if (e < TOT && unsigned(gy) < unsigned(g.H) && unsigned(gx) < unsigned(g.W))
        v[i] = Elem<T>::load1(xp + gy * g.W + gx);
    }
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      const int e = lt + i * NT;
      if (e < TOT) s[e] = v[i];
    }
  }
}

// The tile's conv input: s[SR][P], s[r*P + j] = x[y0 - R + r][x0 - 2 + j] (SR = TH + 2R, P = TW + 4).
template <class CF, int K, typename T>
__device__ __forceinline__ void load_tile(const T* __restrict__ xp, float* __restrict__ s, int lt, int x0, int y0,
                                          const Geo& g) {
  load_region<CF::TH + 2 * (K / 2), CF::P, CF::NT>(xp, s, lt, y0 - K / 2, x0 - 2, g);
}

template <int K>
__device__ __forceinline__ void load_weights(const Param& wt, int c, float (&w)[K * K]) {
  wt.get_n<K * K>(int64_t(c) * (K * K), w);
}

// acc[i][v] = z' at output (ty*RY + i, 4*tx + v) of the tile, from smem s: input row ty*RY + i + ii, window
// column OFF + v + jj (tap ii, jj), OFF = 2 - R. Taps are summed row-major (ii, then jj).
template <class CF, int K>
__device__ __forceinline__ void conv_tile(const float* __restrict__ s, const float (&w)[K * K], int tx, int ty,
                                          float (&acc)[CF::RY][kV]) {
  constexpr int R = K / 2, OFF = 2 - R, RY = CF::RY, P = CF::P;
#pragma unroll
  for (int i = 0; i < RY; ++i)
#pragma unroll
    for (int v = 0; v < kV; ++v) acc[i][v] = 0.f;
  const float* base = s + ty * RY * P + kV * tx;  // 16-byte aligned: P and kV * tx are multiples of 4
#pragma unroll
  for (int rr = 0; rr < RY + 2 * R; ++rr) {
    const float4 a = *reinterpret_cast<const float4*>(base + rr * P);
    const float4 b = *reinterpret_cast<const float4*>(base + rr * P + 4);
    const float win[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < RY; ++i) {
      const int ii = rr - i;  // tap row of output row i that reads input row rr
      if (ii < 0 || ii >= K) continue;
#pragma unroll
      for (int jj = 0; jj < K; ++jj)
#pragma unroll
        for (int v = 0; v < kV; ++v) acc[i][v] = fmaf(w[ii * K + jj], win[OFF + v + jj], acc[i][v]);
    }
  }
}

// Chan et al.'s merge of (nb, mb, m2b) into (n, m, m2); either count may be 0.
template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& m, A& m2, A nb, A mb, A m2b) {
  const A nn = n + nb;
  const A f = nn > A(0) ? nb / nn : A(0);
  const A d = mb - m;
  m += d * f;
  m2 += m2b + d * d * n * f;
  n = nn;
}

// Sums v[0..NV) over the NT threads of each tile (xor butterfly within warp segments, then the tile's warps in
// order: deterministic); the tile's thread lt == 0 gets the totals. red: NV * THREADS / 32 floats of smem. Every
// thread of the block must call it (it may sync).
template <class CF, int NV>
__device__ __forceinline__ void tile_sum(float (&v)[NV], float* red, int lt) {
  constexpr int SEG = CF::NT < 32 ? CF::NT : 32, WARPS = CF::THREADS / 32;
#pragma unroll
  for (int o = 1; o < SEG; o <<= 1)
#pragma unroll
    for (int q = 0; q < NV; ++q) v[q] += __shfl_xor_sync(0xffffffffu, v[q], o);
  if constexpr (CF::NT > 32) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int q = 0; q < NV; ++q) red[q * WARPS + warp] = v[q];
    }
    __syncthreads();
    if (lt == 0) {  // warp == p * NT / 32: the tile's first
#pragma unroll
      for (int k = 1; k < CF::NT / 32; ++k)
#pragma unroll
        for (int q = 0; q < NV; ++q) v[q] += red[q * WARPS + warp + k];
    }
  }
}

// Stores a thread's RY x 4 outputs o at rows gy0.., columns gx0..gx0+3 of the plane out, those inside it only.
template <class CF, typename T>
__device__ __forceinline__ void store_rows(T* __restrict__ out, const float (&o)[CF::RY][kV], int gy0, int gx0,
                                           const Geo& g) {
#pragma unroll
  for (int i = 0; i < CF::RY; ++i) {
    const int gy = gy0 + i;
    if (gy >= g.H || gx0 >= g.W) break;
    T* row = out + gy * g.W + gx0;
    if (g.vec_store) {  // W % 4 == 0 and gx0 % 4 == 0: all 4 columns are inside the plane
      Elem<T>::store4(row, o[i][0], o[i][1], o[i][2], o[i][3]);
    } else {
#pragma unroll
      for (int v = 0; v < kV; ++v)
        if (gx0 + v < g.W) Elem<T>::store1(row + v, o[i][v]);
    }
  }
}

// Loads what store_rows stores: o[i][v] = in[gy0 + i][gx0 + v], 0 outside the plane. Plain loads (not __ldg):
// apply_z_kernel overwrites what it reads.
template <class CF, typename T>
__device__ __forceinline__ void load_rows(const T* in, float (&o)[CF::RY][kV], int gy0, int gx0, const Geo& g) {
#pragma unroll
  for (int i = 0; i < CF::RY; ++i) {
#pragma unroll
    for (int v = 0; v < kV; ++v) o[i][v] = 0.f;
    const int gy = gy0 + i;
    if (gy >= g.H || gx0 >= g.W) continue;
    const T* row = in + gy * g.W + gx0;
    if (g.vec_store) {
      const float4 a = Elem<T>::load4(row);
      o[i][0] = a.x, o[i][1] = a.y, o[i][2] = a.z, o[i][3] = a.w;
    } else {
#pragma unroll
      for (int v = 0; v < kV; ++v)
        if (gx0 + v < g.W) o[i][v] = static_cast<float>(row[v]);
    }
  }
}

// ---------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------
// Pass 1, grid ceil(tiles / PB): part[0|1|2][tile] = count, mean', M2 of z' over the tile's valid outputs.
// kStoreZ: also zres[n,c,h,w] = z' - part[1][tile], in T (the tile's mean taken out first, so the rounding to
// 16 bits is relative to the spread of z', not to |mean'|), for apply_z_kernel.
template <class CF, int K, typename T, bool kStoreZ>
__global__ void __launch_bounds__(CF::THREADS) stats_kernel(const T* __restrict__ x, const Param wt,
                                                            float* __restrict__ part, T* __restrict__ zres, Geo g) {
  constexpr int R = K / 2, TS = (CF::TH + 2 * R) * CF::P;  // floats of smem per tile
  __shared__ __align__(16) float sm[CF::PB * TS];
  __shared__ float red[3][CF::THREADS / 32];
  __shared__ float tile_mean[CF::PB];
  const int p = threadIdx.x / CF::NT, lt = threadIdx.x % CF::NT, tx = lt % CF::TX, ty = lt / CF::TX;
  const Tile t = tile_of<CF>(g, p);
  float* s = sm + p * TS;
  const int64_t plane_off = int64_t(t.plane) * g.H * g.W;
  if (t.on) load_tile<CF, K>(x + plane_off, s, lt, t.x0, t.y0, g);
  __syncthreads();
  float n = 0.f, m = 0.f, m2 = 0.f;
  float acc[CF::RY][kV];
  if (t.on) {
    float w[K * K];
    load_weights<K>(wt, t.c, w);
    conv_tile<CF, K>(s, w, tx, ty, acc);
    const int ny = min(max(g.H - (t.y0 + ty * CF::RY), 0), CF::RY);  // valid rows, columns of this thread
    const int nx = min(max(g.W - (t.x0 + tx * kV), 0), kV);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < CF::RY; ++i)
#pragma unroll
      for (int v = 0; v < kV; ++v) sum += (i < ny && v < nx) ? acc[i][v] : 0.f;
    n = float(ny * nx);
    if (ny * nx > 0) {
      m = sum / n;
#pragma unroll
      for (int i = 0; i < CF::RY; ++i)
#pragma unroll
        for (int v = 0; v < kV; ++v) {
          const float d = acc[i][v] - m;
          m2 += (i < ny && v < nx) ? d * d : 0.f;
        }
    }
  }
  // Merge over the tile: lanes of a warp segment of min(NT, 32) (aligned: NT is a power of two) ...
  constexpr int SEG = CF::NT < 32 ? CF::NT : 32;
#pragma unroll
  for (int o = 1; o < SEG; o <<= 1) {
    const float nb = __shfl_xor_sync(0xffffffffu, n, o), mb = __shfl_xor_sync(0xffffffffu, m, o),
                m2b = __shfl_xor_sync(0xffffffffu, m2, o);
    chan_merge(n, m, m2, nb, mb, m2b);
  }
  // ... then, for tiles of several warps, the tile's warps in order.
  if constexpr (CF::NT > 32) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
      red[0][warp] = n;
      red[1][warp] = m;
      red[2][warp] = m2;
    }
    __syncthreads();
    if (lt == 0) {  // warp == p * NT / 32: the tile's first
#pragma unroll
      for (int k = 1; k < CF::NT / 32; ++k)
        chan_merge(n, m, m2, red[0][warp + k], red[1][warp + k], red[2][warp + k]);
    }
  }
  if (t.on && lt == 0) {
    part[t.id] = n;
    part[g.tiles + t.id] = m;
    part[2 * g.tiles + t.id] = m2;
  }
  if constexpr (kStoreZ) {
    if (lt == 0) tile_mean[p] = m;  // the value stored in part above, for every thread of the tile
    __syncthreads();
    if (t.on) {
      const float shift = tile_mean[p];
#pragma unroll
      for (int i = 0; i < CF::RY; ++i)
#pragma unroll
        for (int v = 0; v < kV; ++v) acc[i][v] -= shift;
      store_rows<CF>(zres + plane_off, acc, t.y0 + ty * CF::RY, t.x0 + tx * kV, g);
    }
  }
}

// One warp per channel c: the sums over (n, t) of the per-tile partials part[((n * C + c) * tiles_plane + t) * Q + q],
// q < Q, in fp64 and a fixed order (lanes stride over (n, t), then an xor tree): deterministic. Lane 0 writes them to
// dense[c * Q + q] (fp32; skipped when null) and, in the grads' own dtypes, q < Q0 to lo[c * Q0 + q] and q >= Q0 to
// hi[c * (Q - Q0) + q - Q0] (dropped where null): the backward's parameter grads without ATen sums and casts.
template <int Q, int Q0>
__global__ void channel_sums_kernel(const float* __restrict__ part, Geo g, float* __restrict__ dense,
                                    const OutParam lo, const OutParam hi) {
  const int c = int(blockIdx.x) * int(blockDim.x / 32) + int(threadIdx.x / 32), lane = threadIdx.x % 32;
  if (c >= g.C) return;  // the whole warp
  double acc[Q];
#pragma unroll
  for (int q = 0; q < Q; ++q) acc[q] = 0.0;
  const int J = g.N * g.tiles_plane;
  for (int j = lane; j < J; j += 32) {
    const int b = j / g.tiles_plane;
    const float* row = part + (int64_t(b * g.C + c) * g.tiles_plane + (j - b * g.tiles_plane)) * Q;
#pragma unroll
    for (int q = 0; q < Q; ++q) acc[q] += double(row[q]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
#pragma unroll
    for (int q = 0; q < Q; ++q) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], o);
  if (lane != 0) return;
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    if (dense != nullptr) dense[c * Q + q] = float(acc[q]);
    if (q < Q0) {
      lo.set(int64_t(c) * Q0 + q, acc[q]);
    } else {
      hi.set(int64_t(c) * (Q - Q0) + (q - Q0), acc[q]);
    }
  }
}

// Pass 2, one warp per channel: mean, var (C,), coef[0|1][c] = sc, sh. Optional vectors may be null.
__global__ void finalize_kernel(const float* __restrict__ part, const Param cb, const Param gamma, const Param beta,
                                float* __restrict__ mean, float* __restrict__ var, float* __restrict__ coef, Geo g,
                                double eps) {
  const int c = int(blockIdx.x) * int(blockDim.x / 32) + int(threadIdx.x / 32), lane = threadIdx.x % 32;
  if (c >= g.C) return;  // the whole warp
  double n = 0.0, m = 0.0, m2 = 0.0;
  const int J = g.N * g.tiles_plane;  // the channel's tiles: tile = (b * C + c) * tiles_plane + t
  for (int j = lane; j < J; j += 32) {
    const int b = j / g.tiles_plane, tile = (b * g.C + c) * g.tiles_plane + (j - b * g.tiles_plane);
    chan_merge(n, m, m2, double(part[tile]), double(part[g.tiles + tile]), double(part[2 * g.tiles + tile]));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const double nb = __shfl_xor_sync(0xffffffffu, n, o), mb = __shfl_xor_sync(0xffffffffu, m, o),
                 m2b = __shfl_xor_sync(0xffffffffu, m2, o);
    chan_merge(n, m, m2, nb, mb, m2b);
  }
  if (lane == 0) {
    const double v = m2 / n, sc = gamma.get<double>(c, 1.0) / sqrt(v + eps);
    mean[c] = float(m + cb.get<double>(c, 0.0));
    var[c] = float(v);
    coef[c] = float(sc);
    coef[g.C + c] = float(beta.get<double>(c, 0.0) - m * sc);
  }
}

__device__ __forceinline__ float act(float z, bool swish) {
  // z * sigmoid(z) = z / (1 + e^-z); for z < -88 e^-z = inf and the approximate division gives -0.
  return swish ? __fdividef(z, 1.0f + __expf(-z)) : z;
}

// Pass 3, grid ceil(tiles / PB): y = act(sc * z' + sh) in x's dtype.
template <class CF, int K, typename T>
__global__ void __launch_bounds__(CF::THREADS) apply_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                            const Param wt,
                                                            const float* __restrict__ coef, Geo g, bool swish) {
  constexpr int R = K / 2, TS = (CF::TH + 2 * R) * CF::P;
  __shared__ __align__(16) float sm[CF::PB * TS];
  const int p = threadIdx.x / CF::NT, lt = threadIdx.x % CF::NT, tx = lt % CF::TX, ty = lt / CF::TX;
  const Tile t = tile_of<CF>(g, p);
  float* s = sm + p * TS;
  const int64_t plane_off = int64_t(t.plane) * g.H * g.W;
  if (t.on) load_tile<CF, K>(x + plane_off, s, lt, t.x0, t.y0, g);
  __syncthreads();  // the only barrier: threads may leave after it
  if (!t.on) return;
  float w[K * K];
  load_weights<K>(wt, t.c, w);
  const float sc = __ldg(coef + t.c), sh = __ldg(coef + g.C + t.c);
  float acc[CF::RY][kV];
  conv_tile<CF, K>(s, w, tx, ty, acc);
#pragma unroll
  for (int i = 0; i < CF::RY; ++i)
#pragma unroll
    for (int v = 0; v < kV; ++v) acc[i][v] = act(fmaf(sc, acc[i][v], sh), swish);
  store_rows<CF>(y + plane_off, acc, t.y0 + ty * CF::RY, t.x0 + tx * kV, g);
}

// Pass 3 after a kStoreZ stats pass, in place on y (grid ceil(tiles / PB), the stats pass's threads and outputs):
// z' = y + part[1][tile], y = act(sc * z' + sh). No conv: one read and one write of y.
template <class CF, typename T>
__global__ void __launch_bounds__(CF::THREADS) apply_z_kernel(T* __restrict__ y, const float* __restrict__ part,
                                                              const float* __restrict__ coef, Geo g, bool swish) {
  const int p = threadIdx.x / CF::NT, lt = threadIdx.x % CF::NT, tx = lt % CF::TX, ty = lt / CF::TX;
  const Tile t = tile_of<CF>(g, p);
  if (!t.on) return;
  const float shift = __ldg(part + g.tiles + t.id), sc = __ldg(coef + t.c), sh = __ldg(coef + g.C + t.c);
  T* out = y + int64_t(t.plane) * g.H * g.W;
  const int gy0 = t.y0 + ty * CF::RY, gx0 = t.x0 + tx * kV;
  float z[CF::RY][kV];
  load_rows<CF>(out, z, gy0, gx0, g);
#pragma unroll
  for (int i = 0; i < CF::RY; ++i)
#pragma unroll
    for (int v = 0; v < kV; ++v) z[i][v] = act(fmaf(sc, z[i][v] + shift, sh), swish);
  store_rows<CF>(out, z, gy0, gx0, g);
}

// One thread per channel: coef[0..3][c] = sc, sh, mean', rstd from given statistics (eval: the running ones;
// backward: those the forward normalised with). Optional vectors may be null.
__global__ void coef_kernel(const float* __restrict__ mean, const float* __restrict__ var,
                            const Param cb, const Param gamma, const Param beta, float* __restrict__ coef, int C,
                            double eps) {
  const int c = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= C) return;
  const double rstd = 1.0 / sqrt(double(var[c]) + eps), sc = gamma.get<double>(c, 1.0) * rstd;
  const double mean_conv = double(mean[c]) - cb.get<double>(c, 0.0);  // mean' of z' = z - cb
  coef[c] = float(sc);
  coef[C + c] = float(beta.get<double>(c, 0.0) - mean_conv * sc);
  coef[2 * C + c] = float(mean_conv);
  coef[3 * C + c] = float(rstd);
}

// d act(z) / dz * dy = dy * s * (1 + z * (1 - s)), s = sigmoid(z), for swish; dy otherwise.
__device__ __forceinline__ float act_grad(float z, float dy, bool swish) {
  if (!swish) return dy;
  const float sg = 1.0f / (1.0f + __expf(-z));  // z < -88: e^-z = inf, sg = 0
  return dy * sg * (1.0f + z * (1.0f - sg));
}

struct BwdCoef {
  float sc, sh, mean, rstd;  // mean: mean' (of z' = z - cb)
};

__device__ __forceinline__ BwdCoef bwd_coef(const float* __restrict__ coef, int c, int C) {
  return {__ldg(coef + c), __ldg(coef + C + c), __ldg(coef + 2 * C + c), __ldg(coef + 3 * C + c)};
}

// Backward pass 1, grid ceil(tiles / PB): part[tile][0|1] = sum dzn, sum dzn * zhat over the tile's valid outputs,
// dzn = act'(sc z' + sh) dy, zhat = (z' - mean') rstd. dy: NCHW-contiguous like x.
template <class CF, int K, typename T>
__global__ void __launch_bounds__(CF::THREADS) bwd_sums_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                                               const Param wt,
                                                               const float* __restrict__ coef,
                                                               float* __restrict__ part, Geo g, bool swish) {
  constexpr int R = K / 2, TS = (CF::TH + 2 * R) * CF::P;
  __shared__ __align__(16) float sm[CF::PB * TS];
  __shared__ float red[2 * CF::THREADS / 32];
  const int p = threadIdx.x / CF::NT, lt = threadIdx.x % CF::NT, tx = lt % CF::TX, ty = lt / CF::TX;
  const Tile t = tile_of<CF>(g, p);
  float* s = sm + p * TS;
  const int64_t plane_off = int64_t(t.plane) * g.H * g.W;
  if (t.on) load_tile<CF, K>(x + plane_off, s, lt, t.x0, t.y0, g);
  __syncthreads();
  float v[2] = {0.f, 0.f};
  if (t.on) {
    float w[K * K];
    load_weights<K>(wt, t.c, w);
    const BwdCoef k = bwd_coef(coef, t.c, g.C);
    float acc[CF::RY][kV];
    conv_tile<CF, K>(s, w, tx, ty, acc);
    const int gy0 = t.y0 + ty * CF::RY, gx0 = t.x0 + tx * kV;
    const T* dyp = dy + plane_off;
#pragma unroll
    for (int i = 0; i < CF::RY; ++i)
#pragma unroll
      for (int c = 0; c < kV; ++c) {
        if (gy0 + i >= g.H || gx0 + c >= g.W) continue;
        const float dzn = act_grad(fmaf(k.sc, acc[i][c], k.sh), Elem<T>::load1(dyp + (gy0 + i) * g.W + gx0 + c), swish);
        v[0] += dzn;
        v[1] = fmaf(dzn, (acc[i][c] - k.mean) * k.rstd, v[1]);
      }
  }
  tile_sum<CF, 2>(v, red, lt);
  if (t.on && lt == 0) {
    part[2 * t.id] = v[0];
    part[2 * t.id + 1] = v[1];
  }
}

// Backward pass 2, grid ceil(tiles / PB): dx, and per tile the conv-weight and conv-bias grad partials.
//   X: x over the tile + 2R halo, X[r*PX + j] = x[y0 - 2R + r][x0 - 4 + j] (rows TH + 4R, PX = TW + 8);
//   D: dz over the tile + R halo in the conv input layout, D[r*P + j] = dz[y0 - R + r][x0 - 2 + j], 0 outside the
//      plane; dz = sc dzn + q zhat + r (training: q = -sc B / M, r = -sc A / M from sums (C, 2) = (A, B); eval 0);
//   dx = conv_tile(D, flipped w); part_w[tile][i*K + j] = sum dz[h][w] x[h + i - R][w + j - R], [K*K] = sum dz,
//   over the tile's valid outputs.
template <class CF, int K, typename T>
__global__ void __launch_bounds__(CF::THREADS) bwd_dx_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                                             T* __restrict__ dx, const Param wt,
                                                             const float* __restrict__ coef,
                                                             const float* __restrict__ sums,
                                                             float* __restrict__ part_w, Geo g, float inv_m,
                                                             bool training, bool swish) {
  constexpr int R = K / 2, KK = K * K, SR = CF::TH + 2 * R, P = CF::P, SRX = CF::TH + 4 * R, PX = CF::TW + 8;
  constexpr int TS = SR * P, TSX = SRX * PX;
  __shared__ __align__(16) float smx[CF::PB * TSX];
  __shared__ __align__(16) float smd[CF::PB * TS];
  __shared__ float red[(KK + 1) * CF::THREADS / 32];
  const int p = threadIdx.x / CF::NT, lt = threadIdx.x % CF::NT, tx = lt % CF::TX, ty = lt / CF::TX;
  const Tile t = tile_of<CF>(g, p);
  float* X = smx + p * TSX;
  float* D = smd + p * TS;
  const int64_t plane_off = int64_t(t.plane) * g.H * g.W;
  if (t.on) load_region<SRX, PX, CF::NT>(x + plane_off, X, lt, t.y0 - 2 * R, t.x0 - 4, g);
  __syncthreads();
  float w[KK];
  if (t.on) {
    load_weights<K>(wt, t.c, w);
    const BwdCoef k = bwd_coef(coef, t.c, g.C);
    const float q = training ? -k.sc * __ldg(sums + 2 * t.c + 1) * inv_m : 0.f;
    const float r0 = training ? -k.sc * __ldg(sums + 2 * t.c) * inv_m : 0.f;
    const T* dyp = dy + plane_off;
    for (int e = lt; e < TS; e += CF::NT) {  // dz at every slot of D
      const int rd = e / P, jd = e - rd * P, gy = t.y0 - R + rd, gx = t.x0 - 2 + jd;
      float dz = 0.f;
      if (unsigned(gy) < unsigned(g.H) && unsigned(gx) < unsigned(g.W)) {
        const float* xs = X + rd * PX + jd + 2 - R;  // x[gy - R][gx - R]
        float z = 0.f;
#pragma unroll
        for (int i = 0; i < K; ++i)
#pragma unroll
          for (int j = 0; j < K; ++j) z = fmaf(w[i * K + j], xs[i * PX + j], z);
        const float dzn = act_grad(fmaf(k.sc, z, k.sh), Elem<T>::load1(dyp + gy * g.W + gx), swish);
        dz = fmaf(k.sc, dzn, fmaf(q, (z - k.mean) * k.rstd, r0));
      }
      D[e] = dz;
    }
  }
  __syncthreads();
  float part[KK + 1];
#pragma unroll
  for (int i = 0; i <= KK; ++i) part[i] = 0.f;
  if (t.on) {
    float wf[KK];  // flipped: wf[i][j] = w[K-1-i][K-1-j]
#pragma unroll
    for (int i = 0; i < KK; ++i) wf[i] = w[KK - 1 - i];
    float acc[CF::RY][kV];
    conv_tile<CF, K>(D, wf, tx, ty, acc);
    const int gy0 = t.y0 + ty * CF::RY, gx0 = t.x0 + tx * kV;
    store_rows<CF>(dx + plane_off, acc, gy0, gx0, g);
#pragma unroll
    for (int i = 0; i < CF::RY; ++i) {
      if (gy0 + i >= g.H || gx0 >= g.W) break;
#pragma unroll
      for (int c = 0; c < kV; ++c) {
        if (gx0 + c >= g.W) continue;
        const float d = D[(ty * CF::RY + i + R) * P + kV * tx + c + 2];  // dz[gy0 + i][gx0 + c]
        const float* xs = X + (ty * CF::RY + i + R) * PX + kV * tx + c + 4 - R;  // x[gy0 + i - R][gx0 + c - R]
        part[KK] += d;
#pragma unroll
        for (int ii = 0; ii < K; ++ii)
#pragma unroll
          for (int jj = 0; jj < K; ++jj) part[ii * K + jj] = fmaf(d, xs[ii * PX + jj], part[ii * K + jj]);
      }
    }
  }
  tile_sum<CF, KK + 1>(part, red, lt);
  if (t.on && lt == 0) {
#pragma unroll
    for (int i = 0; i <= KK; ++i) part_w[int64_t(t.id) * (KK + 1) + i] = part[i];
  }
}

// The geometry of x for config CF; out: the tensor written (vector stores where its alignment allows).
template <class CF, typename T>
Geo geo_of(const at::Tensor& x, const at::Tensor& out) {
  Geo g{};
  g.N = int(x.size(0)), g.C = int(x.size(1)), g.H = int(x.size(2)), g.W = int(x.size(3));
  g.tiles_x = (g.W + CF::TW - 1) / CF::TW;
  const int tiles_y = (g.H + CF::TH - 1) / CF::TH;
  const int64_t tiles_plane = int64_t(g.tiles_x) * tiles_y;
  g.tiles_plane = int(tiles_plane), g.tiles = int(int64_t(g.N) * g.C * tiles_plane);  // checked by supported()
  const auto addr = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  g.pair_load = g.W % 2 == 0 && addr(x.const_data_ptr()) % (2 * sizeof(T)) == 0;
  g.vec_store = g.W % 4 == 0 && addr(out.const_data_ptr()) % (4 * sizeof(T)) == 0;
  return g;
}

template <class CF>
unsigned blocks_of(const Geo& g) {
  return unsigned((int64_t(g.tiles) + CF::PB - 1) / CF::PB);
}

constexpr int kCoefThreads = 256;

void launch_coef(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& cb, const at::Tensor& gamma,
                 const at::Tensor& beta, at::Tensor& coef, int C, double eps, cudaStream_t stream) {
  coef_kernel<<<unsigned((C + kCoefThreads - 1) / kCoefThreads), kCoefThreads, 0, stream>>>(
      mean.const_data_ptr<float>(), var.const_data_ptr<float>(), param_of(cb), param_of(gamma),
      param_of(beta), coef.mutable_data_ptr<float>(), C, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether the training forward keeps z' (less its tile mean) in y between its passes instead of recomputing the
// conv: for 16-bit x, where the second conv's 25 FMAs per output cost more than a write and a read of y
// (DIFFUSION_FAST_DWCONV_STORE_Z=0 turns it off, read per call: bench_nvae_cell's "cuda+conv_twice" times both);
// float32 keeps the conv (twice the bytes).
template <typename T>
bool store_z() {
  const char* v = std::getenv("DIFFUSION_FAST_DWCONV_STORE_Z");
  return sizeof(T) == 2 && (v == nullptr || std::string(v) != "0");
}

template <class CF, int K, typename T>
void run(const at::Tensor& x, at::Tensor& y, const at::Tensor& w, const at::Tensor& cb, const at::Tensor& gamma,
         const at::Tensor& beta, at::Tensor& mean, at::Tensor& var, bool training, double eps, bool swish) {
  const Geo g = geo_of<CF, T>(x, y);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor coef = at::empty({4, g.C}, fopts);  // rows 2, 3: for the backward only
  const unsigned blocks = blocks_of<CF>(g);
  const T* xp = x.const_data_ptr<T>();
  const bool z_in_y = training && store_z<T>();
  at::Tensor part;
  if (training) {
    part = at::empty({3, int64_t(g.tiles)}, fopts);
    if (z_in_y) {
      stats_kernel<CF, K, T, true><<<blocks, CF::THREADS, 0, stream>>>(
          xp, param_of(w), part.mutable_data_ptr<float>(), y.mutable_data_ptr<T>(), g);
    } else {
      stats_kernel<CF, K, T, false><<<blocks, CF::THREADS, 0, stream>>>(
          xp, param_of(w), part.mutable_data_ptr<float>(), nullptr, g);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_kernel<<<unsigned((g.C + kCoefThreads / 32 - 1) / (kCoefThreads / 32)), kCoefThreads, 0, stream>>>(
        part.const_data_ptr<float>(), param_of(cb), param_of(gamma), param_of(beta),
        mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>(), coef.mutable_data_ptr<float>(), g, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    launch_coef(mean, var, cb, gamma, beta, coef, g.C, eps, stream);
  }
  if (z_in_y) {
    apply_z_kernel<CF, T><<<blocks, CF::THREADS, 0, stream>>>(y.mutable_data_ptr<T>(), part.const_data_ptr<float>(),
                                                              coef.const_data_ptr<float>(), g, swish);
  } else {
    apply_kernel<CF, K, T><<<blocks, CF::THREADS, 0, stream>>>(xp, y.mutable_data_ptr<T>(), param_of(w),
                                                               coef.const_data_ptr<float>(), g, swish);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Backward: dx, and the parameter grads (each undefined or contiguous in its parameter's kernel dtype): sum dzn ->
// g_beta, sum dzn zhat -> g_gamma, the conv-weight grad -> g_w, the conv-bias grad -> g_cb.
template <class CF, int K, typename T>
void run_bwd(const at::Tensor& dy, const at::Tensor& x, at::Tensor& dx, const at::Tensor& w, const at::Tensor& cb,
             const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
             bool training, double eps, bool swish, const ParamGrads& grads) {
  constexpr int KK = K * K;
  const Geo g = geo_of<CF, T>(x, dx);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor coef = at::empty({4, g.C}, fopts);
  launch_coef(mean, var, cb, gamma, beta, coef, g.C, eps, stream);
  const unsigned blocks = blocks_of<CF>(g);
  at::Tensor part = at::empty({int64_t(g.tiles), 2}, fopts);  // tile = (n * C + c) * tiles_plane + t
  bwd_sums_kernel<CF, K, T><<<blocks, CF::THREADS, 0, stream>>>(x.const_data_ptr<T>(), dy.const_data_ptr<T>(),
                                                                param_of(w), coef.const_data_ptr<float>(),
                                                                part.mutable_data_ptr<float>(), g, swish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor sums = at::empty({g.C, 2}, fopts);  // (sum dzn, sum dzn zhat) per channel, for bwd_dx_kernel
  const unsigned sum_blocks = unsigned((g.C + kCoefThreads / 32 - 1) / (kCoefThreads / 32));
  channel_sums_kernel<2, 1><<<sum_blocks, kCoefThreads, 0, stream>>>(
      part.const_data_ptr<float>(), g, sums.mutable_data_ptr<float>(), out_of(grads.beta), out_of(grads.gamma));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor part_w = at::empty({int64_t(g.tiles), KK + 1}, fopts);
  const float inv_m = float(1.0 / (double(g.N) * g.H * g.W));
  bwd_dx_kernel<CF, K, T><<<blocks, CF::THREADS, 0, stream>>>(
      x.const_data_ptr<T>(), dy.const_data_ptr<T>(), dx.mutable_data_ptr<T>(), param_of(w),
      coef.const_data_ptr<float>(), sums.const_data_ptr<float>(), part_w.mutable_data_ptr<float>(), g, inv_m, training,
      swish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  channel_sums_kernel<KK + 1, KK><<<sum_blocks, kCoefThreads, 0, stream>>>(part_w.const_data_ptr<float>(), g, nullptr,
                                                                          out_of(grads.w), out_of(grads.cb));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f(CF{}, integral_constant<int, K>{}) with the tile config for W: L for W > 16, M for 8 < W <= 16, S else.
template <typename F>
void with_cfg(int64_t K, int64_t W, const F& f) {
  const auto by_w = [&](auto k_c) {
    if (W > 16) return f(CfgL{}, k_c);
    if (W > 8) return f(CfgM{}, k_c);
    return f(CfgS{}, k_c);
  };
  if (K == 5) return by_w(std::integral_constant<int, 5>{});
  return by_w(std::integral_constant<int, 3>{});
}

// Calls f(T{}) for x's dtype (float32, float16 or bfloat16).
template <typename F>
void with_dtype(const at::Tensor& x, const F& f) {
  switch (x.scalar_type()) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    default: return f(c10::BFloat16{});
  }
}

// Tiles of the largest config an input of this size can get (the S config: 8 x 8 outputs per tile).
int64_t max_tiles(const at::Tensor& x) {
  return x.size(0) * x.size(1) * ((x.size(2) + 7) / 8) * ((x.size(3) + 7) / 8);
}

}  // namespace
}  // namespace dwconv_tiled

bool dwconv_bn_swish_tiled_supports(const at::Tensor& x, int64_t K) {
  const auto dt = x.scalar_type();
  return (K == 3 || K == 5) && (dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) && x.dim() == 4 &&
         x.is_contiguous() && x.numel() > 0 && x.size(2) * x.size(3) <= INT_MAX / 2 &&
         dwconv_tiled::max_tiles(x) <= int64_t(INT_MAX) / 4;  // part[2 * tiles + tile] stays an int
}

void dwconv_bn_swish_fwd_cuda_tiled(const at::Tensor& x, const at::Tensor& w, const at::Tensor& cb,
                                    const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& y, at::Tensor& mean,
                                    at::Tensor& var, bool training, double eps, bool swish) {
  using namespace dwconv_tiled;
  const int64_t K = w.size(-1);
  TORCH_CHECK(dwconv_bn_swish_tiled_supports(x, K) && y.is_contiguous() && mean.scalar_type() == at::kFloat &&
                  var.scalar_type() == at::kFloat,
              "dwconv_bn_swish_fwd_cuda_tiled: unsupported input (caller must check dwconv_bn_swish_tiled_supports)");
  const at::Tensor wk = w.reshape({x.size(1), K * K}).contiguous();
  with_dtype(x, [&](auto t) {
    with_cfg(K, x.size(3), [&](auto cf, auto k) {
      run<decltype(cf), decltype(k)::value, decltype(t)>(x, y, wk, cb, gamma, beta, mean, var, training, eps, swish);
    });
  });
}

void dwconv_bn_swish_bwd_cuda_tiled(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w,
                                    const at::Tensor& cb, const at::Tensor& gamma, const at::Tensor& beta,
                                    const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
                                    bool swish, at::Tensor& grad_x, const ParamGrads& grads) {
  using namespace dwconv_tiled;
  const int64_t K = w.size(-1);
  TORCH_CHECK(dwconv_bn_swish_tiled_supports(x, K) && grad_y.is_contiguous() && grad_x.is_contiguous() &&
                  mean.scalar_type() == at::kFloat && var.scalar_type() == at::kFloat && mean.is_contiguous() &&
                  var.is_contiguous(),
              "dwconv_bn_swish_bwd_cuda_tiled: unsupported input (caller must check dwconv_bn_swish_tiled_supports)");
  const at::Tensor wk = w.reshape({x.size(1), K * K}).contiguous();
  for (const at::Tensor* t : {&grads.w, &grads.cb, &grads.gamma, &grads.beta})
    TORCH_CHECK(!t->defined() || (t->is_contiguous() && cuda_param::kernel_dtype(t->scalar_type())),
                "dwconv_bn_swish_bwd_cuda_tiled: parameter grads must be contiguous, of a kernel dtype");
  with_dtype(x, [&](auto t) {
    with_cfg(K, x.size(3), [&](auto cf, auto k) {
      run_bwd<decltype(cf), decltype(k)::value, decltype(t)>(grad_y, x, grad_x, wk, cb, gamma, beta, mean, var,
                                                             training, eps, swish, grads);
    });
  });
}

}  // namespace diffusion_fast
