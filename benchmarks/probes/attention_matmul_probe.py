"""Probe: attention as two batched matmuls (the score matrix materialised) against SDPA and our Triton kernel,
at the UNet's single-head shapes, where PyTorch's flash kernel stops (head dim > 256).

    python3 benchmarks/probes/attention_matmul_probe.py --out DIR

On the H100 (2026-11-26) plain bf16 ``softmax(q kᵀ) v`` beat SDPA 2.4x forward and 8.2x fwd+bwd at
32x1x1024x1024, head dim 512, but with 7x SDPA's error (scores rounded to bf16 before the softmax).
Variants, each checked against float64 (max abs error) and timed (triton.testing.do_bench, median):
    sdpa            F.scaled_dot_product_attention (what auto runs for head dim <= 256)
    triton          diffusion_fast.attention under use_backend("triton")
    mm_bf16         scores in the input dtype: softmax(scale q kᵀ) v
    mm_fp32_scores  scores in fp32 (torch.bmm(..., out_dtype=torch.float32) where this torch has it, else
                    fp32 operands), softmax in fp32, P cast to the input dtype for P v (FlashAttention's
                    precision: fp32 scores, low-precision P)
Needs a CUDA device; elsewhere it exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(32, 1, 256, 256), (32, 1, 1024, 512), (8, 1, 4096, 512), (128, 1, 256, 256), (32, 1, 256, 512)]


def mm_bf16(q, k, v):
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return s.softmax(-1) @ v


def _scores_fp32(q, k):
    b, h, sq, d = q.shape
    qf, kt = q.reshape(b * h, sq, d), k.reshape(b * h, -1, d).transpose(1, 2)
    try:
        s = torch.bmm(qf, kt, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # no out_dtype on this torch or device
        s = qf.float() @ kt.float()
    return s.reshape(b, h, sq, -1)


def mm_fp32_scores(q, k, v):
    p = (_scores_fp32(q, k) * (1.0 / math.sqrt(q.shape[-1]))).softmax(-1).to(q.dtype)
    return p @ v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/attention_matmul_probe")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("attention_matmul_probe: no CUDA device here; nothing to time.")
        return
    from triton.testing import do_bench

    import diffusion_fast

    def triton(q, k, v):
        with diffusion_fast.use_backend("triton"):
            return diffusion_fast.attention(q, k, v)

    variants = {"sdpa": F.scaled_dot_product_attention, "triton": triton, "mm_bf16": mm_bf16,
                "mm_fp32_scores": mm_fp32_scores}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = []
    for b, h, s, d in SHAPES:
        sets = [tuple(torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3)) for _ in range(3)]
        grad = torch.randn(b, h, s, d, device="cuda", dtype=dtype)
        q0, k0, v0 = sets[0]
        ref = diffusion_fast.attention_ref(q0.double(), k0.double(), v0.double(), upcast=False)
        flops = 4 * b * h * s * s * d
        for name, f in variants.items():
            try:
                err = (f(q0, k0, v0).double() - ref).abs().max().item()
                for mode in ("fwd", "fwd+bwd"):
                    i = [0]

                    def step():
                        q, k, v = sets[i[0] % 3]
                        i[0] += 1
                        if mode == "fwd":
                            return f(q, k, v)
                        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                        return torch.autograd.grad(f(*leaves), leaves, grad)

                    ms = do_bench(step, return_mode="median")
                    work = flops * (1 if mode == "fwd" else 3.5)  # bwd: 2.5x the forward's matmuls
                    rows.append(dict(shape=[b, h, s, s, d], dtype=args.dtype, mode=mode, variant=name, ms=ms,
                                     tflops=work / (ms * 1e-3) / 1e12, max_abs_err=err))
                    print(rows[-1], flush=True)
            except Exception as exc:  # e.g. out of memory for a materialised score matrix
                rows.append(dict(shape=[b, h, s, s, d], dtype=args.dtype, variant=name,
                                 error=f"{type(exc).__name__}: {exc}"))
                torch.cuda.empty_cache()
    sdpa = {(tuple(r["shape"]), r["mode"]): r["ms"] for r in rows if r["variant"] == "sdpa" and "ms" in r}
    lines = ["| shape (B,H,Sq,Sk,D) | mode | variant | ms | x SDPA | TFLOP/s | max abs err |",
             "|---|---|---|--:|--:|--:|--:|"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {'x'.join(map(str, r['shape']))} | - | {r['variant']} | failed: {r['error'][:80]} | | | |")
            continue
        base = sdpa.get((tuple(r["shape"]), r["mode"]))
        ratio = "-" if base is None else f"{base / r['ms']:.2f}"
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['mode']} | {r['variant']} | {r['ms']:.4f} | {ratio} "
                     f"| {r['tflops']:.0f} | {r['max_abs_err']:.1e} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_matmul_probe.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows),
                                                                indent=1) + "\n")
    (out / "attention_matmul_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
