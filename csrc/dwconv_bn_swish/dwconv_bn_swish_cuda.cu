// CUDA kernels of dwconv_bn_swish and bn_swish (math, layouts and contract: dwconv_bn_swish.h). The
// passes are those of the Triton kernels (kernels/dwconv_bn_swish.py), which the CPU tests check:
//
// A block of 256 threads is a CT x NY grid: CT threads along channels (32 for channels-last, where
// channels are contiguous; 1 for NCHW) and NY along positions, so loads coalesce. A thread keeps one
// channel (c = blockIdx.y * CT + tx) and that channel's K x K weights in registers. A "tile" is NY * kVPT
// positions of one sample: TILES = N * ceil(H * W / (NY * kVPT)); a "split" kernel walks TILES / SPLIT
// tiles per block and reduces per channel over the block's NY rows in shared memory (fixed order, no
// atomics: deterministic). The k x k conv reads x directly (L1/L2 serve the K*K reuse).
//   forward, training  stats (SPLIT x C blocks): Welford per thread, Chan merges -> (mean, M2, count) per
//                      (split, channel); finalize: one thread per channel merges the splits into mean,
//                      var; fwd (TILES x C blocks): conv again, y = swish(sc z + sh).   x: 2 reads, y: 1 write
//   forward, eval      fwd alone, from the running statistics.                         x: 1 read,  y: 1 write
//   backward           reduce (SPLIT x C blocks): A = sum dzn, B = sum dzn zhat per split (summed by ATen);
//                      dz (TILES x C blocks): dz = sc dzn + q zhat + r in an fp32 (fp64) scratch of x's layout;
//                      dx (SPLIT x C blocks): dx = sum w[i][j] dz[h+R-i][w+R-j], per-split dw and dcb.
// Statistics and sums are fp32 (fp64 for fp64 x).
// The forward and backward of NCHW x with K 3 or 5 in fp32/fp16/bf16 run the shared-memory tiled kernels of
// dwconv_bn_swish_cuda_tiled.cu instead (x read once per tile, not once per tap; no fp32 dz scratch).
#include "dwconv_bn_swish/dwconv_bn_swish.h"

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

namespace diffusion_fast {
namespace {

using cuda_param::Param;
using cuda_param::as_input;
using cuda_param::param_of;

constexpr int kThreads = 256;  // threads per block
constexpr int kVPT = 4;        // positions per thread in a tile
constexpr int64_t kMaxSplit = 256;

struct Geo {
  int64_t N, C, H, W, HW;
  bool cl;                 // channels-last addressing
  int CT, NY;              // threads along channels and along positions (CT * NY == kThreads)
  int64_t span;            // positions per tile: NY * kVPT
  int64_t sblocks, tiles;  // tiles per sample; tiles in all
  int64_t split, t_per;    // split kernels: blocks along the tiles, tiles per block
};

// Offset of (c, h, w) inside one sample.
__device__ __forceinline__ int64_t offset(const Geo& g, int64_t c, int64_t h, int64_t w) {
  return g.cl ? (h * g.W + w) * g.C + c : c * g.HW + h * g.W + w;
}

// This thread's place in its block.
struct Lane {
  int tx, ty;
  int64_t c;
  bool on;  // c < C
};

__device__ __forceinline__ Lane lane_of(const Geo& g) {
  Lane l;
  l.tx = threadIdx.x % g.CT;
  l.ty = threadIdx.x / g.CT;
  l.c = int64_t(blockIdx.y) * g.CT + l.tx;
  l.on = l.c < g.C;
  return l;
}

// ---------------------------------------------------------------------------
// Element math.
// ---------------------------------------------------------------------------
__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + __expf(-z)); }
__device__ __forceinline__ double sigmoid(double z) { return 1.0 / (1.0 + ::exp(-z)); }

template <typename A>
__device__ __forceinline__ A act(A z, bool swish) {
  return swish ? z * sigmoid(z) : z;
}

// dy * d act(z) / dz
template <typename A>
__device__ __forceinline__ A act_grad(A z, A dy, bool swish) {
  if (!swish) return dy;
  const A s = sigmoid(z);
  return dy * s * (A(1) + z * (A(1) - s));
}

// A channel's conv weights (flipped for the transposed conv of dx) and bias, in registers.
template <int K, typename A>
struct ConvW {
  A w[K * K];
  A bias;

  __device__ void load(const Param& weight, const Param& conv_bias, int64_t c, bool flip) {
    A v[K * K];
    if (weight.ptr != nullptr) {
      weight.get_n<K * K>(c * K * K, v);
    } else {
#pragma unroll
      for (int t = 0; t < K * K; ++t) v[t] = A(1);
    }
#pragma unroll
    for (int t = 0; t < K * K; ++t) w[t] = v[flip ? K * K - 1 - t : t];
    bias = conv_bias.get<A>(c, A(0));
  }
};

// sum_{i,j} cw.w[i][j] * src[h + i - R][w + j - R] + bias (zero padding); src points at the sample.
template <int K, typename S, typename A>
__device__ __forceinline__ A conv_at(const S* src, const ConvW<K, A>& cw, const Geo& g, int64_t c, int64_t h,
                                     int64_t w) {
  A acc = cw.bias;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const int64_t hh = h + i - K / 2;
    if (hh < 0 || hh >= g.H) continue;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int64_t ww = w + j - K / 2;
      if (ww < 0 || ww >= g.W) continue;
      acc += cw.w[i * K + j] * static_cast<A>(src[offset(g, c, hh, ww)]);
    }
  }
  return acc;
}

// BatchNorm coefficients of one channel: zn = sc * z + sh, zhat = (z - mean) * rstd.
template <typename A>
struct Coef {
  A mean, rstd, sc, sh;

  __device__ void load(const A* mean_p, const A* var_p, const Param& gamma, const Param& beta, int64_t c, A eps) {
    mean = mean_p[c];
    rstd = A(1) / sqrt(var_p[c] + eps);
    sc = gamma.get<A>(c, A(1)) * rstd;
    sh = beta.get<A>(c, A(0)) - mean * sc;
  }
};

// Positions of tile t: sample n and the first position s0; thread k-th position is s0 + ty + k * NY.
__device__ __forceinline__ void tile_of(const Geo& g, int64_t t, int64_t& n, int64_t& s0) {
  n = t / g.sblocks;
  s0 = (t % g.sblocks) * g.span;
}

// ---------------------------------------------------------------------------
// Block reductions over the NY threads that share a channel (all threads must call them).
// ---------------------------------------------------------------------------
template <typename A>
__device__ A sum_rows(A v, A* sm, const Geo& g, const Lane& l) {
  sm[threadIdx.x] = v;
  __syncthreads();
  for (int stride = g.NY / 2; stride > 0; stride >>= 1) {
    if (l.ty < stride) sm[threadIdx.x] += sm[threadIdx.x + stride * g.CT];
    __syncthreads();
  }
  const A r = sm[l.tx];
  __syncthreads();
  return r;
}

template <typename A>
struct Welford {
  A n, mean, m2;
};

// Chan et al.'s pairwise merge.
template <typename A>
__device__ __forceinline__ Welford<A> merge(const Welford<A>& a, const Welford<A>& b) {
  if (b.n == A(0)) return a;
  if (a.n == A(0)) return b;
  const A n = a.n + b.n, d = b.mean - a.mean, fb = b.n / n;
  return {n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
}

template <typename A>
__device__ Welford<A> merge_rows(Welford<A> v, Welford<A>* sm, const Geo& g, const Lane& l) {
  sm[threadIdx.x] = v;
  __syncthreads();
  for (int stride = g.NY / 2; stride > 0; stride >>= 1) {
    if (l.ty < stride) sm[threadIdx.x] = merge(sm[threadIdx.x], sm[threadIdx.x + stride * g.CT]);
    __syncthreads();
  }
  const Welford<A> r = sm[l.tx];
  __syncthreads();
  return r;
}

// ---------------------------------------------------------------------------
// Kernels. Pointers to (C,)-sized parameters are in the accumulation type A, contiguous, or null.
// ---------------------------------------------------------------------------
// grid (SPLIT, C blocks): part[0|1|2][split][c] = mean, M2, count of z over this split's tiles.
template <int K, typename T, typename A>
__global__ void __launch_bounds__(kThreads) dwbn_stats_kernel(const T* __restrict__ x, const Param weight,
                                                              const Param conv_bias, A* part, Geo g) {
  __shared__ Welford<A> sm[kThreads];
  const Lane l = lane_of(g);
  const int64_t split = blockIdx.x;
  ConvW<K, A> cw;
  if (l.on) cw.load(weight, conv_bias, l.c, false);
  Welford<A> st{A(0), A(0), A(0)};
  const int64_t t_end = std::min(g.tiles, (split + 1) * g.t_per);
  for (int64_t t = split * g.t_per; t < t_end && l.on; ++t) {
    int64_t n, s0;
    tile_of(g, t, n, s0);
    const T* xs = x + n * g.C * g.HW;
#pragma unroll
    for (int k = 0; k < kVPT; ++k) {
      const int64_t s = s0 + l.ty + k * g.NY;
      if (s >= g.HW) break;
      const A z = conv_at<K>(xs, cw, g, l.c, s / g.W, s % g.W);
      st.n += A(1);
      const A d = z - st.mean;
      st.mean += d / st.n;
      st.m2 += d * (z - st.mean);
    }
  }
  st = merge_rows(st, sm, g, l);
  if (l.ty == 0 && l.on) {
    const int64_t i = split * g.C + l.c, plane = g.split * g.C;
    part[i] = st.mean;
    part[plane + i] = st.m2;
    part[2 * plane + i] = st.n;
  }
}

// One thread per channel: merges the SPLIT partials into mean and (biased) var.
template <typename A>
__global__ void dwbn_finalize_kernel(const A* part, int64_t split, int64_t C, A* mean, A* var) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Welford<A> st{A(0), A(0), A(0)};
  for (int64_t j = 0; j < split; ++j)
    st = merge(st, Welford<A>{part[2 * split * C + j * C + c], part[j * C + c], part[split * C + j * C + c]});
  mean[c] = st.mean;
  var[c] = st.m2 / st.n;
}

// grid (TILES, C blocks): y = act(sc * z + sh).
template <int K, typename T, typename A>
__global__ void __launch_bounds__(kThreads) dwbn_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                            const Param weight, const Param conv_bias,
                                                            const Param gamma, const Param beta, const A* mean,
                                                            const A* var, A eps, bool swish, Geo g) {
  const Lane l = lane_of(g);
  if (!l.on) return;
  ConvW<K, A> cw;
  cw.load(weight, conv_bias, l.c, false);
  Coef<A> k;
  k.load(mean, var, gamma, beta, l.c, eps);
  int64_t n, s0;
  tile_of(g, blockIdx.x, n, s0);
  const T* xs = x + n * g.C * g.HW;
  T* ys = y + n * g.C * g.HW;
#pragma unroll
  for (int v = 0; v < kVPT; ++v) {
    const int64_t s = s0 + l.ty + v * g.NY;
    if (s >= g.HW) break;
    const int64_t h = s / g.W, w = s % g.W;
    ys[offset(g, l.c, h, w)] = static_cast<T>(act(k.sc * conv_at<K>(xs, cw, g, l.c, h, w) + k.sh, swish));
  }
}

// grid (SPLIT, C blocks): part[0|1][split][c] = sum dzn, sum dzn * zhat over this split's tiles.
template <int K, typename T, typename A>
__global__ void __launch_bounds__(kThreads) dwbn_bwd_reduce_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                   const Param weight, const Param conv_bias,
                                                                   const Param gamma, const Param beta, const A* mean,
                                                                   const A* var, A eps, bool swish, A* part, Geo g) {
  __shared__ A sm[kThreads];
  const Lane l = lane_of(g);
  const int64_t split = blockIdx.x;
  ConvW<K, A> cw;
  Coef<A> k;
  if (l.on) {
    cw.load(weight, conv_bias, l.c, false);
    k.load(mean, var, gamma, beta, l.c, eps);
  }
  A sa = A(0), sb = A(0);
  const int64_t t_end = std::min(g.tiles, (split + 1) * g.t_per);
  for (int64_t t = split * g.t_per; t < t_end && l.on; ++t) {
    int64_t n, s0;
    tile_of(g, t, n, s0);
    const int64_t base = n * g.C * g.HW;
#pragma unroll
    for (int v = 0; v < kVPT; ++v) {
      const int64_t s = s0 + l.ty + v * g.NY;
      if (s >= g.HW) break;
      const int64_t h = s / g.W, w = s % g.W;
      const A z = conv_at<K>(x + base, cw, g, l.c, h, w);
      const A dzn = act_grad(k.sc * z + k.sh, static_cast<A>(dy[base + offset(g, l.c, h, w)]), swish);
      sa += dzn;
      sb += dzn * ((z - k.mean) * k.rstd);
    }
  }
  sa = sum_rows(sa, sm, g, l);
  sb = sum_rows(sb, sm, g, l);
  if (l.ty == 0 && l.on) {
    part[split * g.C + l.c] = sa;
    part[(g.split + split) * g.C + l.c] = sb;
  }
}

// grid (TILES, C blocks): dz = sc * dzn + q * zhat + r; training: q = -sc B / M, r = -sc A / M (sums (2, C)).
template <int K, typename T, typename A>
__global__ void __launch_bounds__(kThreads) dwbn_bwd_dz_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                               A* __restrict__ dz, const Param weight,
                                                               const Param conv_bias, const Param gamma,
                                                               const Param beta, const A* mean, const A* var,
                                                               const A* sums, A eps, bool training, bool swish,
                                                               Geo g) {
  const Lane l = lane_of(g);
  if (!l.on) return;
  ConvW<K, A> cw;
  cw.load(weight, conv_bias, l.c, false);
  Coef<A> k;
  k.load(mean, var, gamma, beta, l.c, eps);
  const A inv_m = A(1) / A(g.N * g.HW);
  const A q = training ? -k.sc * sums[g.C + l.c] * inv_m : A(0);
  const A r = training ? -k.sc * sums[l.c] * inv_m : A(0);
  int64_t n, s0;
  tile_of(g, blockIdx.x, n, s0);
  const int64_t base = n * g.C * g.HW;
#pragma unroll
  for (int v = 0; v < kVPT; ++v) {
    const int64_t s = s0 + l.ty + v * g.NY;
    if (s >= g.HW) break;
    const int64_t h = s / g.W, w = s % g.W, o = base + offset(g, l.c, h, w);
    const A z = conv_at<K>(x + base, cw, g, l.c, h, w);
    const A dzn = act_grad(k.sc * z + k.sh, static_cast<A>(dy[o]), swish);
    dz[o] = k.sc * dzn + q * ((z - k.mean) * k.rstd) + r;
  }
}

// grid (SPLIT, C blocks): grad_x = conv(dz, flipped weight); part[split][i][c] = sum dz * x[h+i/K-R][w+i%K-R]
// for i < K*K, and sum dz for i = K*K (when weight is given).
template <int K, typename T, typename A>
__global__ void __launch_bounds__(kThreads) dwbn_bwd_dx_kernel(const A* __restrict__ dz, const T* __restrict__ x,
                                                               T* __restrict__ dx, const Param weight, A* part, Geo g) {
  __shared__ A sm[kThreads];
  const Lane l = lane_of(g);
  const int64_t split = blockIdx.x;
  ConvW<K, A> flipped;
  if (l.on) flipped.load(weight, Param{nullptr, 0}, l.c, true);
  A dw[K * K + 1];
#pragma unroll
  for (int i = 0; i <= K * K; ++i) dw[i] = A(0);
  const int64_t t_end = std::min(g.tiles, (split + 1) * g.t_per);
  for (int64_t t = split * g.t_per; t < t_end && l.on; ++t) {
    int64_t n, s0;
    tile_of(g, t, n, s0);
    const int64_t base = n * g.C * g.HW;
#pragma unroll
    for (int v = 0; v < kVPT; ++v) {
      const int64_t s = s0 + l.ty + v * g.NY;
      if (s >= g.HW) break;
      const int64_t h = s / g.W, w = s % g.W, o = base + offset(g, l.c, h, w);
      dx[o] = static_cast<T>(conv_at<K>(dz + base, flipped, g, l.c, h, w));
      if (weight.ptr == nullptr) continue;
      const A d = dz[o];
      dw[K * K] += d;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const int64_t hh = h + i - K / 2;
        if (hh < 0 || hh >= g.H) continue;
#pragma unroll
        for (int j = 0; j < K; ++j) {
          const int64_t ww = w + j - K / 2;
          if (ww >= 0 && ww < g.W) dw[i * K + j] += d * static_cast<A>(x[base + offset(g, l.c, hh, ww)]);
        }
      }
    }
  }
  if (weight.ptr == nullptr) return;  // uniform over the block: no thread waits in sum_rows
#pragma unroll
  for (int i = 0; i <= K * K; ++i) {
    const A s = sum_rows(dw[i], sm, g, l);
    if (l.ty == 0 && l.on) part[(split * (K * K + 1) + i) * g.C + l.c] = s;
  }
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------
bool present(const OptTensor& t) { return t.has_value() && t->defined(); }


Geo make_geo(const DWConvBNShape& s) {
  Geo g{};
  g.N = s.N, g.C = s.C, g.H = s.H, g.W = s.W, g.HW = s.H * s.W;
  g.cl = s.channels_last;
  g.CT = g.cl ? 32 : 1;
  g.NY = kThreads / g.CT;
  g.span = int64_t(g.NY) * kVPT;
  g.sblocks = (g.HW + g.span - 1) / g.span;
  g.tiles = g.N * g.sblocks;
  const int64_t cblocks = (g.C + g.CT - 1) / g.CT;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  g.split = std::max<int64_t>(1, std::min({(4 * sms + cblocks - 1) / cblocks, g.tiles, kMaxSplit}));
  g.t_per = (g.tiles + g.split - 1) / g.split;
  g.split = (g.tiles + g.t_per - 1) / g.t_per;  // no empty split
  TORCH_CHECK(cblocks <= 65535, "dwconv_bn_swish (CUDA): too many channel blocks (", cblocks, ")");
  TORCH_CHECK(g.tiles <= int64_t(std::numeric_limits<int32_t>::max()), "dwconv_bn_swish (CUDA): too many tiles");
  return g;
}

dim3 grid_of(const Geo& g, int64_t x_blocks) { return dim3(unsigned(x_blocks), unsigned((g.C + g.CT - 1) / g.CT)); }

// Calls f(integral_constant<int, K>) for K in {1, 3, 5}.
template <typename F>
void with_k(int64_t k, const F& f) {
  switch (k) {
    case 5: return f(std::integral_constant<int, 5>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}

// DIFFUSION_FAST_DWCONV_TILED=0 turns the tiled forward and backward off (A/B timing against the kernels below); read once.
bool tiled_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("DIFFUSION_FAST_DWCONV_TILED");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
}

Fwd fwd_impl(const at::Tensor& x, const OptTensor& conv_weight, const OptTensor& conv_bias,
             const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
             const OptTensor& running_var, bool training, double eps, bool swish) {
  const auto s = dwconv_bn_swish_shape(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                                       training);
  TORCH_CHECK(x.is_cuda(), "dwconv_bn_swish_fwd_cuda: x must be a CUDA tensor, got ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = training ? at::empty({s.C}, x.options().dtype(acc)) : running_mean->to(acc, false, true);
  at::Tensor var = training ? at::empty({s.C}, x.options().dtype(acc)) : running_var->to(acc, false, true);
  if (x.numel() == 0) return {y, training ? mean.fill_(NAN) : mean, training ? var.fill_(NAN) : var};
  // The parameters as they are (the kernels convert on load), float32 copies only of exotic dtypes.
  const at::Tensor w = as_input(conv_weight), cb = as_input(conv_bias);
  const at::Tensor gamma = as_input(bn_weight), beta = as_input(bn_bias);
  if (w.defined() && tiled_enabled() && dwconv_bn_swish_tiled_supports(x, s.K)) {
    dwconv_bn_swish_fwd_cuda_tiled(x, w, cb, gamma, beta, y, mean, var, training, eps, swish);
    return {y, mean, var};
  }
  const Geo g = make_geo(s);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_swish_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    with_k(s.K, [&](auto k_c) {
      constexpr int K = decltype(k_c)::value;
      if (training) {
        at::Tensor part = at::empty({3, g.split, s.C}, x.options().dtype(acc));
        dwbn_stats_kernel<K, scalar_t, A><<<grid_of(g, g.split), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), param_of(w), param_of(cb), part.mutable_data_ptr<A>(), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        dwbn_finalize_kernel<A><<<unsigned((s.C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
            part.const_data_ptr<A>(), g.split, s.C, mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      dwbn_fwd_kernel<K, scalar_t, A><<<grid_of(g, g.tiles), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), param_of(w), param_of(cb),
          param_of(gamma), param_of(beta), mean.const_data_ptr<A>(), var.const_data_ptr<A>(),
          static_cast<A>(eps), swish, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, mean, var};
}

// grad_x, then grads of conv_weight, conv_bias, bn_weight, bn_bias in their dtypes ((0,) when absent).
DWBwd bwd_impl(const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& conv_weight,
               const OptTensor& conv_bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
               const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool swish) {
  const auto s = dwconv_bn_swish_shape(x, conv_weight, conv_bias, bn_weight, bn_bias, OptTensor(), OptTensor(),
                                       /*training=*/true);
  dwconv_bn_swish_check_bwd(grad_y, x, s, mean, var);
  TORCH_CHECK(x.is_cuda(), "dwconv_bn_swish_bwd_cuda: x must be a CUDA tensor, got ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = x.options().dtype(acc);
  const int64_t KK = s.K * s.K;
  const bool conv = present(conv_weight);
  const auto grad_as = [&](const OptTensor& t, const at::Tensor& v) {
    return present(t) ? v.reshape(t->sizes()).to(t->scalar_type(), false, /*copy=*/true, at::MemoryFormat::Contiguous)
                       : at::empty({0}, x.options());
  };
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) {
    const at::Tensor zc = at::zeros({s.C}, acc_opts);
    return {grad_x, grad_as(conv_weight, at::zeros({s.C * KK}, acc_opts)), grad_as(conv_bias, zc),
            grad_as(bn_weight, zc), grad_as(bn_bias, zc)};
  }
  const at::Tensor w = as_input(conv_weight), cb = as_input(conv_bias);  // as in fwd_impl
  const at::Tensor gamma = as_input(bn_weight), beta = as_input(bn_bias);
  const at::Tensor mean_c = mean.contiguous(), var_c = var.contiguous();
  if (conv && tiled_enabled() && dwconv_bn_swish_tiled_supports(x, s.K) && grad_y.is_contiguous()) {
    // The kernels write the grads in the parameters' dtypes (float32 buffers for exotic ones, copied below).
    const auto grad_of = [&](const OptTensor& t) {
      if (!present(t)) return at::empty({0}, x.options());
      return at::empty(t->sizes(), t->options().dtype(cuda_param::kernel_dtype(t->scalar_type()) ? t->scalar_type()
                                                                                                    : at::kFloat));
    };
    const ParamGrads g{grad_of(conv_weight), grad_of(conv_bias), grad_of(bn_weight), grad_of(bn_bias)};
    const auto defined = [](const at::Tensor& t) { return t.numel() > 0 ? t : at::Tensor(); };
    dwconv_bn_swish_bwd_cuda_tiled(grad_y, x, w, cb, gamma, beta, mean_c, var_c, training, eps, swish, grad_x,
                                   {defined(g.w), defined(g.cb), defined(g.gamma), defined(g.beta)});
    const auto as_param = [&](const OptTensor& t, const at::Tensor& v) {
      return present(t) && v.scalar_type() != t->scalar_type() ? v.to(t->scalar_type()) : v;
    };
    return {grad_x, as_param(conv_weight, g.w), as_param(conv_bias, g.cb), as_param(bn_weight, g.gamma),
            as_param(bn_bias, g.beta)};
  }
  const Geo g = make_geo(s);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor part = at::empty({2, g.split, s.C}, acc_opts);
  at::Tensor dz = at::empty_like(x, acc_opts);  // x's layout
  at::Tensor part_w = at::zeros({g.split, KK + 1, s.C}, acc_opts);
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_swish_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    with_k(s.K, [&](auto k_c) {
      constexpr int K = decltype(k_c)::value;
      const Param wp = param_of(w), cbp = param_of(cb), gp = param_of(gamma), bp = param_of(beta);
      const A *mp = mean_c.const_data_ptr<A>(), *vp = var_c.const_data_ptr<A>();
      dwbn_bwd_reduce_kernel<K, scalar_t, A><<<grid_of(g, g.split), kThreads, 0, stream>>>(
          grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), wp, cbp, gp, bp, mp, vp,
          static_cast<A>(eps), swish, part.mutable_data_ptr<A>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sums = part.sum(1);  // (2, C): A = sum dzn, B = sum dzn * zhat
      dwbn_bwd_dz_kernel<K, scalar_t, A><<<grid_of(g, g.tiles), kThreads, 0, stream>>>(
          grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dz.mutable_data_ptr<A>(), wp, cbp, gp,
          bp, mp, vp, sums.const_data_ptr<A>(), static_cast<A>(eps), training, swish, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dwbn_bwd_dx_kernel<K, scalar_t, A><<<grid_of(g, g.split), kThreads, 0, stream>>>(
          dz.const_data_ptr<A>(), x.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), wp,
          part_w.mutable_data_ptr<A>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const at::Tensor gw = part_w.sum(0);  // (KK + 1, C)
  return {grad_x, grad_as(conv_weight, gw.narrow(0, 0, KK).t()), grad_as(conv_bias, gw[KK]),
          grad_as(bn_weight, sums[1]), grad_as(bn_bias, sums[0])};
}

}  // namespace

Fwd dwconv_bn_swish_fwd_cuda(const at::Tensor& x, const at::Tensor& conv_weight, const OptTensor& conv_bias,
                             const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                             const OptTensor& running_var, bool training, double eps, bool swish,
                             bool /*needs_grad*/) {
  return fwd_impl(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, eps, swish);
}

DWBwd dwconv_bn_swish_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& conv_weight,
                               const OptTensor& conv_bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
                               const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool swish) {
  return bwd_impl(grad_y, x, conv_weight, conv_bias, bn_weight, bn_bias, mean, var, training, eps, swish);
}

Fwd bn_swish_fwd_cuda(const at::Tensor& x, const OptTensor& bn_weight, const OptTensor& bn_bias,
                      const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps,
                      bool swish, bool /*needs_grad*/) {
  return fwd_impl(x, OptTensor(), OptTensor(), bn_weight, bn_bias, running_mean, running_var, training, eps, swish);
}

BNBwd bn_swish_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& bn_weight,
                        const OptTensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, bool training,
                        double eps, bool swish) {
  auto grads = bwd_impl(grad_y, x, OptTensor(), OptTensor(), bn_weight, bn_bias, mean, var, training, eps, swish);
  return {std::get<0>(grads), std::get<3>(grads), std::get<4>(grads)};
}

}  // namespace diffusion_fast
