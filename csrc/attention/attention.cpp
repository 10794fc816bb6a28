// Argument checks and the device-independent drivers of attention's C++ kernels (attention.h): batched
// matmuls through ATen (cuBLAS / oneDNN), the row kernels of attention_cpu.cpp or attention_cuda.cu.
#include "attention/attention.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <optional>

namespace diffusion_fast {
namespace {

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The dtype of the matmul operands and of P, dS: the input's, except fp16/bf16 on the CPU (fp32).
at::ScalarType compute_type(const at::Tensor& q) {
  const auto t = q.scalar_type();
  return q.is_cuda() || !(t == at::kHalf || t == at::kBFloat16) ? t : at::kFloat;
}

// a bᵀ, (nb, Sa, Sb) in dtype acc, for a (nb, Sa, D), b (nb, Sb, D) of one dtype. fp16/bf16 operands
// give fp32 products and sums either way; aten::bmm.dtype (CUDA, PyTorch >= 2.8) also writes them as fp32,
// without it the operands are converted first.
at::Tensor scores(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  const at::Tensor bt = b.transpose(1, 2);
  if (a.scalar_type() == acc) return at::bmm(a, bt);
  static const std::optional<c10::OperatorHandle> bmm_dtype =
      c10::Dispatcher::singleton().findSchema({"aten::bmm", "dtype"});
  if (bmm_dtype.has_value() && a.is_cuda()) {
    return bmm_dtype->typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>().call(a, bt, acc);
  }
  return at::bmm(a.to(acc), bt.to(acc));
}

// (B, H, S, D) -> (B*H, S, D) in dtype t (a view where strides allow).
at::Tensor flat(const at::Tensor& x, at::ScalarType t) {
  return x.reshape({x.size(0) * x.size(1), x.size(2), x.size(3)}).to(t);
}

// Batch*heads per chunk: as many as the workspace budget holds (at least one).
int64_t chunk_size(int64_t bh, int64_t bytes_per_bh, int64_t budget) {
  return std::clamp<int64_t>(budget / std::max<int64_t>(bytes_per_bh, 1), 1, std::max<int64_t>(bh, 1));
}

}  // namespace

void attention_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto* t : {&q, &k, &v}) {
    const char* name = t == &q ? "q" : t == &k ? "k" : "v";
    TORCH_CHECK(t->dim() == 4, "attention: ", name, " must have shape (batch, heads, seq, head_dim), got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "attention: ", name, " must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), "attention: ", name, " is on ", t->device(), " but q is on ",
                q.device());
  }
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble,
              "attention: q must be float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK(q.size(3) >= 1, "attention: head_dim must be >= 1, got ", q.sizes());
  for (const auto* t2 : {&k, &v}) {
    TORCH_CHECK(t2->size(0) == q.size(0) && t2->size(1) == q.size(1) && t2->size(3) == q.size(3),
                "attention: ", t2 == &k ? "k" : "v", " must have shape (", q.size(0), ", ", q.size(1), ", seq_k, ",
                q.size(3), ") to match q ", q.sizes(), ", got ", t2->sizes());
  }
  TORCH_CHECK(v.size(2) == k.size(2), "attention: v must have k's sequence length ", k.size(2), ", got ", v.size(2));
  TORCH_CHECK(k.size(2) >= 1, "attention: k must hold at least one key (seq_k >= 1)");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool causal, double scale, const AttentionRowKernels& rk) {
  attention_check(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), Sk = k.size(2), D = q.size(3), BH = B * H;
  const auto dtype = q.scalar_type(), acc = acc_type(dtype), cdt = compute_type(q);
  at::Tensor out = at::empty({B, H, Sq, D}, q.options());
  at::Tensor lse = at::empty({B, H, Sq}, q.options().dtype(acc));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor q3 = flat(q, cdt), k3 = flat(k, cdt), v3 = flat(v, cdt);
  at::Tensor out3 = cdt == dtype ? out.view({BH, Sq, D}) : at::empty({BH, Sq, D}, q.options().dtype(cdt));
  const at::Tensor lse1 = lse.view({BH * Sq});
  const bool p_in_s = cdt == acc;  // P overwrites S (same dtype; the row kernels read each element first)
  const int64_t per_bh = Sq * Sk * (at::elementSize(acc) + (p_in_s ? 0 : at::elementSize(cdt)));
  const int64_t chunk = chunk_size(BH, per_bh, rk.workspace_bytes);
  for (int64_t b0 = 0; b0 < BH; b0 += chunk) {
    const int64_t nb = std::min(chunk, BH - b0);
    const at::Tensor s = scores(q3.narrow(0, b0, nb), k3.narrow(0, b0, nb), acc);
    const at::Tensor p = p_in_s ? s : at::empty_like(s, s.options().dtype(cdt));
    rk.softmax(s.view({nb * Sq, Sk}), p.view({nb * Sq, Sk}), lse1.narrow(0, b0 * Sq, nb * Sq), Sq, scale, causal);
    at::Tensor o = out3.narrow(0, b0, nb);
    at::bmm_out(o, p, v3.narrow(0, b0, nb));
  }
  if (cdt != dtype) out.view({BH, Sq, D}).copy_(out3);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_impl(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, double scale,
                                                                  const AttentionRowKernels& rk) {
  attention_check(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), Sk = k.size(2), D = q.size(3), BH = B * H;
  const auto dtype = q.scalar_type(), acc = acc_type(dtype), cdt = compute_type(q);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == dtype && grad_out.device() == q.device(),
              "attention backward: grad_out must match q (", q.sizes(), ", ", dtype, "), got ", grad_out.sizes(), ", ",
              grad_out.scalar_type());
  TORCH_CHECK(out.sizes() == q.sizes(), "attention backward: out must have q's shape ", q.sizes(), ", got ",
              out.sizes());  // out itself is not needed: delta comes from P and dP
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, Sq}) && lse.scalar_type() == acc && lse.device() == q.device(),
              "attention backward: lse must be (", B, ", ", H, ", ", Sq, ") ", acc, ", got ", lse.sizes(), " ",
              lse.scalar_type());
  at::Tensor dq = at::empty({B, H, Sq, D}, q.options()), dk = at::empty({B, H, Sk, D}, q.options()),
             dv = at::empty({B, H, Sk, D}, q.options());
  if (dq.numel() == 0 || dk.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  const at::Tensor q3 = flat(q, cdt), k3 = flat(k, cdt), v3 = flat(v, cdt), do3 = flat(grad_out, cdt);
  const at::Tensor lse1 = lse.contiguous().view({BH * Sq});
  auto result = [&](const at::Tensor& g, int64_t s) {
    return cdt == dtype ? g.view({BH, s, D}) : at::empty({BH, s, D}, q.options().dtype(cdt));
  };
  at::Tensor dq3 = result(dq, Sq), dk3 = result(dk, Sk), dv3 = result(dv, Sk);
  const bool in_place = cdt == acc;  // P overwrites S and dS overwrites dP
  const int64_t per_bh = Sq * Sk * 2 * (at::elementSize(acc) + (in_place ? 0 : at::elementSize(cdt)));
  const int64_t chunk = chunk_size(BH, per_bh, rk.workspace_bytes);
  for (int64_t b0 = 0; b0 < BH; b0 += chunk) {
    const int64_t nb = std::min(chunk, BH - b0);
    const at::Tensor qc = q3.narrow(0, b0, nb), kc = k3.narrow(0, b0, nb), vc = v3.narrow(0, b0, nb),
                     doc = do3.narrow(0, b0, nb);
    const at::Tensor s = scores(qc, kc, acc), dp = scores(doc, vc, acc);
    const at::Tensor p = in_place ? s : at::empty_like(s, s.options().dtype(cdt));
    const at::Tensor ds = in_place ? dp : at::empty_like(dp, dp.options().dtype(cdt));
    const auto rows = [&](const at::Tensor& t) { return t.view({nb * Sq, Sk}); };
    rk.grad(rows(s), rows(dp), lse1.narrow(0, b0 * Sq, nb * Sq), rows(p), rows(ds), Sq, scale, causal);
    at::Tensor dvc = dv3.narrow(0, b0, nb), dqc = dq3.narrow(0, b0, nb), dkc = dk3.narrow(0, b0, nb);
    at::bmm_out(dvc, p.transpose(1, 2), doc);
    at::bmm_out(dqc, ds, kc);
    at::bmm_out(dkc, ds.transpose(1, 2), qc);
  }
  if (cdt != dtype) {
    dq.view({BH, Sq, D}).copy_(dq3);
    dk.view({BH, Sk, D}).copy_(dk3);
    dv.view({BH, Sk, D}).copy_(dv3);
  }
  return {dq, dk, dv};
}

}  // namespace diffusion_fast
