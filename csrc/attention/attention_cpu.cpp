// CPU row kernels of attention (attention.h): rows in parallel (at::parallel_for), each row in three or four
// sweeps of its Sk elements (a row of 4096 fp32 scores is 16 KB: the sweeps after the first hit the cache).
// Scores are turned into log2 units (t = scale * log2(e) * s) so that e^x is 2^t: cpu_vec::exp2_approx in
// float32 (relative error < 2.4e-7; arguments below -125 give 2^-125 ~ 0), std::exp2 in float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "attention/attention.h"
#include "cpu_vec.h"

namespace diffusion_fast {
namespace {

using cpu_vec::loadu;
using cpu_vec::Vec;

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

inline float exp2_of(float t) { return cpu_vec::exp2_approx(std::max(t, -125.0f)); }
inline double exp2_of(double t) { return std::exp2(t); }

// One row kernel call. T == A (the CPU computes fp16/bf16 inputs in fp32); two parameters so that
// DF_MULTIVERSION gives float64 the baseline build only.
template <typename T, typename A>
struct RowArgs {
  const A* s;
  const A* dp;  // grad only
  A* p;
  A* ds;        // grad only
  A* lse;
  int64_t sk, sq;
  A scale;
  bool causal;

  int64_t valid(int64_t r) const { return causal ? std::min(sk, r % sq + 1) : sk; }  // keys j < valid
};

constexpr int lanes(size_t bytes) { return static_cast<int>(64 / bytes); }  // one 64-byte vector

template <typename A>
A row_max(const A* x, int64_t n, A c) {
  constexpr int L = lanes(sizeof(A));
  Vec<A, L> m;
  for (int i = 0; i < L; ++i) m[i] = -std::numeric_limits<A>::infinity();
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const Vec<A, L> t = loadu<L>(x + j) * c;
    m = t > m ? t : m;
  }
  A r = -std::numeric_limits<A>::infinity();
  for (int i = 0; i < L; ++i) r = std::max(r, m[i]);
  for (; j < n; ++j) r = std::max(r, x[j] * c);
  return r;
}

// sum_j a[j] * (b ? b[j] : 1)
template <typename A>
A row_dot(const A* a, const A* b, int64_t n) {
  constexpr int L = lanes(sizeof(A));
  Vec<A, L> acc = {};
  int64_t j = 0;
  for (; j + L <= n; j += L) acc += b ? loadu<L>(a + j) * loadu<L>(b + j) : loadu<L>(a + j);
  A r = 0;
  for (int i = 0; i < L; ++i) r += acc[i];
  for (; j < n; ++j) r += b ? a[j] * b[j] : a[j];
  return r;
}

// p = softmax(scale * s) over keys j < valid (0 beyond), lse = its logsumexp; p may be s.
template <typename T, typename A>
void softmax_stage(const RowArgs<T, A>& a, int64_t r0, int64_t r1) {
  const A c = a.scale * A(kLog2e);
  for (int64_t r = r0; r < r1; ++r) {
    const A* s = a.s + r * a.sk;
    A* p = a.p + r * a.sk;
    const int64_t n = a.valid(r);
    const A m = row_max(s, n, c);
    for (int64_t j = 0; j < n; ++j) p[j] = exp2_of(s[j] * c - m);
    const A sum = row_dot<A>(p, nullptr, n);
    const A inv = A(1) / sum;
    for (int64_t j = 0; j < n; ++j) p[j] *= inv;
    for (int64_t j = n; j < a.sk; ++j) p[j] = A(0);
    a.lse[r] = (m + std::log2(sum)) * A(kLn2);
  }
}

// p = exp(scale * s - lse), ds = scale * p * (dp - sum_j p dp) over keys j < valid (0 beyond); p may be s,
// ds may be dp.
template <typename T, typename A>
void grad_stage(const RowArgs<T, A>& a, int64_t r0, int64_t r1) {
  const A c = a.scale * A(kLog2e);
  for (int64_t r = r0; r < r1; ++r) {
    const A* s = a.s + r * a.sk;
    const A* dp = a.dp + r * a.sk;
    A* p = a.p + r * a.sk;
    A* ds = a.ds + r * a.sk;
    const int64_t n = a.valid(r);
    const A lse2 = a.lse[r] * A(kLog2e);
    for (int64_t j = 0; j < n; ++j) p[j] = exp2_of(s[j] * c - lse2);
    const A delta = row_dot(p, dp, n);
    for (int64_t j = 0; j < n; ++j) ds[j] = a.scale * p[j] * (dp[j] - delta);
    for (int64_t j = n; j < a.sk; ++j) p[j] = ds[j] = A(0);
  }
}

DF_MULTIVERSION(softmax_stage)
DF_MULTIVERSION(grad_stage)

void check_rows(const at::Tensor& t, const at::Tensor& s, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.sizes() == s.sizes() && t.scalar_type() == s.scalar_type(),
              "attention (CPU rows): ", name, " must be contiguous ", s.sizes(), " ", s.scalar_type());
}

template <typename A>
RowArgs<A, A> row_args(const at::Tensor& s, const at::Tensor& p, const at::Tensor& lse, int64_t sq, double scale,
                       bool causal) {
  check_rows(s, s, "s");
  check_rows(p, s, "p");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == s.size(0) && lse.scalar_type() == s.scalar_type(),
              "attention (CPU rows): lse must be contiguous (", s.size(0), ",) ", s.scalar_type());
  return {s.data_ptr<A>(), nullptr, p.data_ptr<A>(), nullptr, lse.data_ptr<A>(), s.size(1), sq,
          static_cast<A>(scale), causal};
}

int64_t grain(int64_t sk) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(sk, 1)); }

void softmax_rows_cpu(const at::Tensor& s, const at::Tensor& p, const at::Tensor& lse, int64_t sq, double scale,
                      bool causal) {
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "attention_softmax_rows_cpu", [&] {
    const auto args = row_args<scalar_t>(s, p, lse, sq, scale, causal);
    at::parallel_for(0, s.size(0), grain(s.size(1)), [&](int64_t r0, int64_t r1) { softmax_stage_isa(args, r0, r1); });
  });
}

void grad_rows_cpu(const at::Tensor& s, const at::Tensor& dp, const at::Tensor& lse, const at::Tensor& p,
                   const at::Tensor& ds, int64_t sq, double scale, bool causal) {
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "attention_grad_rows_cpu", [&] {
    auto args = row_args<scalar_t>(s, p, lse, sq, scale, causal);
    check_rows(dp, s, "dp");
    check_rows(ds, s, "ds");
    args.dp = dp.data_ptr<scalar_t>();
    args.ds = ds.data_ptr<scalar_t>();
    at::parallel_for(0, s.size(0), grain(s.size(1)), [&](int64_t r0, int64_t r1) { grad_stage_isa(args, r0, r1); });
  });
}

// At most 64 MiB of score-sized buffers per chunk (the matmuls stay large).
constexpr AttentionRowKernels kCpuRows{softmax_rows_cpu, grad_rows_cpu, int64_t(64) << 20};

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool causal, double scale) {
  return attention_fwd_impl(q, k, v, causal, scale, kCpuRows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 bool causal, double scale) {
  return attention_bwd_impl(grad_out, q, k, v, out, lse, causal, scale, kCpuRows);
}

}  // namespace diffusion_fast
