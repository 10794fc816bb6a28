// attention's C++ kernels (the "cuda" backend, CPU and CUDA): the score matrix materialised per chunk of
// batch*heads, for the single-head, large-head-dim attention of the DDPM UNet (D 256-512), where cuBLAS
// matmuls run near peak and the scores are few next to the matmul work (math: diffusion_fast/ops/attention.py).
//
//   forward   S = q kᵀ (fp32 out of fp16/bf16 operands)      one batched matmul
//             P = softmax(scale S [causal mask]), lse          one row kernel: read S, write P (input dtype)
//             out = P v                                        one batched matmul
//   backward  S = q kᵀ, dP = dO vᵀ (both fp32)                 two batched matmuls
//             P = exp(scale S - lse), delta = sum_j P dP,      one row kernel: read S and dP,
//             dS = scale P (dP - delta)                                        write P and dS (input dtype)
//             dv = Pᵀ dO, dq = dS k, dk = dSᵀ q                three batched matmuls
// delta = rowsum(P * dP) equals FlashAttention's rowsum(dO * out) in exact arithmetic (dP = dO vᵀ, out = P v).
// Chunks of batch*heads keep the workspace (S, P; backward S, dP, P, dS) under a per-device budget.
// CPU: fp16/bf16 inputs are computed in fp32 (no fp32-output matmul of 16-bit operands there), P too.
//
// q: (B, H, Sq, D); k, v: (B, H, Sk, D); one floating dtype (float64 too) and device; any strides.
// out, grads: contiguous, in q's dtype. lse: (B, H, Sq), natural-log logsumexp of the rows of scale q kᵀ,
// float32 (float64 for float64 q).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace diffusion_fast {

// Row kernels of one device. s, dp: (rows, Sk) contiguous, float32 (float64 for float64 input); p, ds:
// (rows, Sk) contiguous, float32 or the input dtype, possibly the same tensor as s (p) and dp (ds); lse:
// (rows,) contiguous, s's dtype. Row r is query i = r % Sq (the causal mask keeps keys j <= i).
struct AttentionRowKernels {
  // p = softmax(scale * s [mask]) per row; lse = logsumexp of the row (natural log).
  void (*softmax)(const at::Tensor& s, const at::Tensor& p, const at::Tensor& lse, int64_t sq, double scale,
                  bool causal);
  // p = exp(scale * s - lse) [mask], ds = scale * p * (dp - sum_j p dp) per row.
  void (*grad)(const at::Tensor& s, const at::Tensor& dp, const at::Tensor& lse, const at::Tensor& p,
               const at::Tensor& ds, int64_t sq, double scale, bool causal);
  int64_t workspace_bytes;  // budget for one chunk's score-sized buffers
};

// Validates q, k, v (TORCH_CHECK with clear messages); never trusts Python.
void attention_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// The device-independent drivers (attention.cpp): matmuls through ATen, rows through rk.
std::tuple<at::Tensor, at::Tensor> attention_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool causal, double scale, const AttentionRowKernels& rk);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_impl(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, double scale,
                                                                  const AttentionRowKernels& rk);

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool causal, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 bool causal, double scale);
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool causal, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, double scale);

}  // namespace diffusion_fast
