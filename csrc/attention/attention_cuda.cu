// CUDA row kernels of attention (attention.h); the matmuls around them are cuBLAS's, through ATen.
//
// One warp per row, 4 rows per block of 128 threads. A lane walks its row with a stride of 32 vectors of
// 16 bytes of scores (4 fp32 / 2 fp64; one element when Sk is not a multiple of that or a pointer is
// misaligned), coalesced. Scores are turned into log2 units (t = scale * log2(e) * s), so e^x is exp2.
//   softmax: sweep 1 keeps each lane's running max m and sum l of 2^(t - m) (online softmax, Milakov and
//            Gimelshein 2018), merged across the warp with shuffles; sweep 2 re-reads the row (from L1/L2)
//            and writes P = 2^(t - lse2) in P's dtype. HBM traffic per score: 4 bytes read, sizeof(P) written.
//   grad:    sweep 1: delta = sum_j P dP (warp sum); sweep 2 writes P and dS = scale P (dP - delta).
//            Per score: 8 bytes read, 2 * sizeof(P) written.
// A lane reads every element it writes, and only those, so P may be S and dS may be dP (in place).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "attention/attention.h"

namespace diffusion_fast {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block, one row each
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

__device__ __forceinline__ float ex2(float x) { return exp2f(x); }
__device__ __forceinline__ double ex2(double x) { return exp2(x); }
__device__ __forceinline__ float lg2(float x) { return log2f(x); }
__device__ __forceinline__ double lg2(double x) { return log2(x); }

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// x[0..V) = p[0..V) as A (one vector access).
template <int V, typename T, typename A>
__device__ __forceinline__ void load(const T* p, A (&x)[V]) {
  const Pack<T, V> t = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) x[i] = static_cast<A>(t.v[i]);
}

template <int V, typename T, typename A>
__device__ __forceinline__ void store(T* p, const A (&x)[V]) {
  Pack<T, V> t;
#pragma unroll
  for (int i = 0; i < V; ++i) t.v[i] = static_cast<T>(x[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = t;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Row r of this warp (-1 past the end: the whole warp returns) and its number of unmasked keys.
struct Row {
  int64_t r, n;
};
__device__ __forceinline__ Row row_of(int64_t rows, int64_t sk, int64_t sq, bool causal) {
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return {-1, 0};
  return {r, causal ? min(sk, r % sq + 1) : sk};
}

// s: (rows, sk) A; p: (rows, sk) P (may be s); lse: (rows,) A. c = scale * log2(e).
template <typename A, typename P, int V>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    softmax_rows_kernel(const A* s, P* p, A* __restrict__ lse, int64_t rows, int64_t sk, int64_t sq, A c, bool causal) {
  const Row row = row_of(rows, sk, sq, causal);
  if (row.r < 0) return;
  const int lane = threadIdx.x % 32;
  const A* srow = s + row.r * sk;
  A m = -INFINITY, l = A(0);  // this lane's running max (log2 units) and sum of 2^(t - m)
  for (int64_t j0 = int64_t(lane) * V; j0 < row.n; j0 += 32 * V) {
    A t[V];
    load<V>(srow + j0, t);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (j0 + i >= row.n) break;
      const A x = t[i] * c;
      if (x > m) {
        l = l * ex2(m - x) + A(1);
        m = x;
      } else {
        l += ex2(x - m);
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {  // merge the lanes' (m, l); a lane that saw no key has m = -inf, l = 0
    const A m2 = __shfl_xor_sync(0xffffffffu, m, o), l2 = __shfl_xor_sync(0xffffffffu, l, o);
    const A mm = m > m2 ? m : m2;
    l = (l > A(0) ? l * ex2(m - mm) : A(0)) + (l2 > A(0) ? l2 * ex2(m2 - mm) : A(0));
    m = mm;
  }
  const A lse2 = m + lg2(l);  // key 0 is never masked: l >= 1
  if (lane == 0) lse[row.r] = lse2 * A(kLn2);
  P* prow = p + row.r * sk;
  for (int64_t j0 = int64_t(lane) * V; j0 < sk; j0 += 32 * V) {
    A t[V] = {};
    if (j0 < row.n) load<V>(srow + j0, t);
#pragma unroll
    for (int i = 0; i < V; ++i) t[i] = j0 + i < row.n ? ex2(t[i] * c - lse2) : A(0);
    store<V>(prow + j0, t);
  }
}

// s, dp: (rows, sk) A; lse: (rows,) A; p, ds: (rows, sk) P (may be s, dp). c = scale * log2(e).
template <typename A, typename P, int V>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    grad_rows_kernel(const A* s, const A* dp, const A* __restrict__ lse, P* p, P* ds, int64_t rows, int64_t sk,
                     int64_t sq, A c, A scale, bool causal) {
  const Row row = row_of(rows, sk, sq, causal);
  if (row.r < 0) return;
  const int lane = threadIdx.x % 32;
  const int64_t off = row.r * sk;
  const A lse2 = lse[row.r] * A(kLog2e);
  A delta = A(0);
  for (int64_t j0 = int64_t(lane) * V; j0 < row.n; j0 += 32 * V) {
    A t[V], g[V];
    load<V>(s + off + j0, t);
    load<V>(dp + off + j0, g);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (j0 + i < row.n) delta += ex2(t[i] * c - lse2) * g[i];
    }
  }
  delta = warp_sum(delta);
  for (int64_t j0 = int64_t(lane) * V; j0 < sk; j0 += 32 * V) {
    A t[V] = {}, g[V] = {};
    if (j0 < row.n) {
      load<V>(s + off + j0, t);
      load<V>(dp + off + j0, g);
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      t[i] = j0 + i < row.n ? ex2(t[i] * c - lse2) : A(0);  // P
      g[i] = scale * t[i] * (g[i] - delta);                  // dS (0 where P is)
    }
    store<V>(p + off + j0, t);
    store<V>(ds + off + j0, g);
  }
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------
bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

void check_rows(const at::Tensor& t, const at::Tensor& s, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == s.device() && t.is_contiguous() && t.sizes() == s.sizes() &&
                  t.scalar_type() == dtype,
              "attention (CUDA rows): ", name, " must be a contiguous ", s.sizes(), " ", dtype, " tensor on ",
              s.device());
}

void check_lse(const at::Tensor& lse, const at::Tensor& s) {
  TORCH_CHECK(lse.is_cuda() && lse.device() == s.device() && lse.is_contiguous() && lse.numel() == s.size(0) &&
                  lse.scalar_type() == s.scalar_type(),
              "attention (CUDA rows): lse must be a contiguous (", s.size(0), ",) ", s.scalar_type(), " tensor on ",
              s.device());
}

// Calls f(integral_constant<int, V>) with V = 16 / sizeof(A) when every row pointer allows 16-byte loads
// of A and V-element stores of P, else V = 1.
template <typename A, typename P, typename F>
void with_vector(int64_t sk, std::initializer_list<const void*> a_ptrs, std::initializer_list<const void*> p_ptrs,
                 const F& f) {
  constexpr int V = 16 / sizeof(A);
  bool vec = sk % V == 0;
  for (const void* ptr : a_ptrs) vec = vec && aligned(ptr, 16);
  for (const void* ptr : p_ptrs) vec = vec && aligned(ptr, sizeof(P) * V);
  if (vec) {
    f(std::integral_constant<int, V>());
  } else {
    f(std::integral_constant<int, 1>());
  }
}

int64_t blocks(int64_t rows) { return (rows + kRowsPerBlock - 1) / kRowsPerBlock; }

void softmax_rows_cuda(const at::Tensor& s, const at::Tensor& p, const at::Tensor& lse, int64_t sq, double scale,
                       bool causal) {
  const int64_t rows = s.size(0), sk = s.size(1);
  if (rows == 0 || sk == 0) return;
  const c10::cuda::CUDAGuard guard(s.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "attention_softmax_rows_cuda", [&] {
    using P = scalar_t;
    using A = at::opmath_type<P>;
    check_rows(s, s, c10::CppTypeToScalarType<A>::value, "s");
    check_rows(p, s, p.scalar_type(), "p");
    check_lse(lse, s);
    const A* sp = s.data_ptr<A>();
    P* pp = p.data_ptr<P>();
    with_vector<A, P>(sk, {sp}, {pp}, [&](auto v) {
      softmax_rows_kernel<A, P, decltype(v)::value><<<blocks(rows), kRowsPerBlock * 32, 0, stream>>>(
          sp, pp, lse.data_ptr<A>(), rows, sk, sq, static_cast<A>(scale * kLog2e), causal);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void grad_rows_cuda(const at::Tensor& s, const at::Tensor& dp, const at::Tensor& lse, const at::Tensor& p,
                    const at::Tensor& ds, int64_t sq, double scale, bool causal) {
  const int64_t rows = s.size(0), sk = s.size(1);
  if (rows == 0 || sk == 0) return;
  const c10::cuda::CUDAGuard guard(s.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "attention_grad_rows_cuda", [&] {
    using P = scalar_t;
    using A = at::opmath_type<P>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    check_rows(s, s, acc, "s");
    check_rows(dp, s, acc, "dp");
    check_rows(p, s, p.scalar_type(), "p");
    check_rows(ds, s, p.scalar_type(), "ds");
    check_lse(lse, s);
    const A *sp = s.data_ptr<A>(), *dpp = dp.data_ptr<A>();
    P *pp = p.data_ptr<P>(), *dsp = ds.data_ptr<P>();
    with_vector<A, P>(sk, {sp, dpp}, {pp, dsp}, [&](auto v) {
      grad_rows_kernel<A, P, decltype(v)::value><<<blocks(rows), kRowsPerBlock * 32, 0, stream>>>(
          sp, dpp, lse.data_ptr<A>(), pp, dsp, rows, sk, sq, static_cast<A>(scale * kLog2e), static_cast<A>(scale),
          causal);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// At most 512 MiB of score-sized buffers per chunk: the UNet's shapes up to batch 32 at 1024 tokens run in
// one chunk (fp32 S + bf16 P: 6 bytes per score); at 4096 tokens a chunk is still 5 heads (fwd), 2 (bwd).
constexpr AttentionRowKernels kCudaRows{softmax_rows_cuda, grad_rows_cuda, int64_t(512) << 20};

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool causal, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_fwd_impl(q, k, v, causal, scale, kCudaRows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_bwd_impl(grad_out, q, k, v, out, lse, causal, scale, kCudaRows);
}

}  // namespace diffusion_fast
