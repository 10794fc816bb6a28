"""Benchmark attention: eager, torch.compile, each SDPA backend and our Triton kernel, fwd and fwd+bwd.

    python benchmarks/bench_attention.py --out benchmarks/results/<card>-<date>   # GPU; also writes the auto table
    python benchmarks/bench_attention.py --device cpu --quick --out /tmp/bench_quick

Providers: the harness's ``eager`` (softmax(scale q kᵀ [+ causal mask]) v in the input dtype,
the score matrix materialised), ``compile`` (of that), ``triton`` (ours, GPU only) and ``cuda``/
``cpu`` (ours, C++: fp32 scores, one fused softmax row kernel between cuBLAS/oneDNN matmuls), plus
    sdpa                                  diffusion_fast.attention under use_backend("torch"), i.e.
                                          F.scaled_dot_product_attention choosing its own kernel:
                                          the alternative to ours that ``auto`` picks between
    sdpa_flash, sdpa_efficient, sdpa_math F.scaled_dot_product_attention inside
                                          torch.nn.attention.sdpa_kernel(that backend); combinations
                                          a backend refuses (flash: head dim > 256) are skipped

Shapes (B, H, Sq, Sk, D):
    ddpm  DDPM UNet self-attention, 1 head: (B, 1, 256, 256, 256) (CIFAR-10, 16x16 at 256
          channels) and (B, 1, 1024 | 4096, ., 512) (256x256 configs, 32x32 / 64x64 at 512
          channels), B in {1, 32, 128}; not causal
    clip  CLIP text transformer (width 512): (B, 8, 77, 77, 64), B in {1, 64}; causal

Counts (s = bytes per element): FLOPs fwd = 4 B H Sq Sk D (two matmuls), halved when causal;
fwd+bwd = 3.5x fwd (the backward's five matmuls, one of them recomputing q kᵀ, are 2.5x).
Bytes a fused kernel must move: fwd reads q, k, v, writes out and lse: B H D s (2 Sq + 2 Sk) +
4 B H Sq; fwd+bwd adds reads of q, k, v, out, dO, lse and writes of dq, dk, dv:
B H D s (5 Sq + 4 Sk) + 8 B H Sq. At D = 256-512 attention is compute bound (hundreds of FLOPs
per byte), so TFLOP/s is the figure of merit.

After the run the bench writes ``bench_attention_table.json`` beside its results: per key
``diffusion_fast.ops.attention.table_key`` (head-dim bucket, sequence bucket, causal, dtype,
mode), the backend (cuda, triton, or torch for sdpa) with the highest geometric mean over the
key's cases of sdpa_ms / its ms (torch unless one is > 1).
``diffusion_fast.attention``'s auto backend reads that file on GPUs of the same model name.
"""

from __future__ import annotations

import json
import math

import harness  # first: puts the repo root on sys.path when diffusion_fast is not installed
import torch
import torch.nn.functional as F

import diffusion_fast
from diffusion_fast.ops.attention import DTYPE_NAMES, OPS, TABLE_FILE, _unsupported, attention_ref, table_key

# (variant, B, H, Sq, Sk, D, causal), the most telling first (a --budget-s may cut the tail)
GPU_SHAPES = [
    ("ddpm", 32, 1, 1024, 1024, 512, False), ("ddpm", 32, 1, 256, 256, 256, False),
    ("clip", 64, 8, 77, 77, 64, True), ("ddpm", 1, 1, 256, 256, 256, False),
    ("ddpm", 1, 1, 1024, 1024, 512, False), ("ddpm", 128, 1, 256, 256, 256, False),
    ("ddpm", 128, 1, 1024, 1024, 512, False), ("clip", 1, 8, 77, 77, 64, True),
    ("ddpm", 1, 1, 4096, 4096, 512, False), ("ddpm", 32, 1, 4096, 4096, 512, False),
    ("ddpm", 128, 1, 4096, 4096, 512, False),
]
CPU_SHAPES = [("ddpm", 1, 1, 256, 256, 256, False), ("ddpm", 8, 1, 256, 256, 256, False),
              ("ddpm", 1, 1, 1024, 1024, 512, False), ("clip", 1, 8, 77, 77, 64, True),
              ("clip", 16, 8, 77, 77, 64, True)]
QUICK_SHAPES = [("ddpm", 2, 1, 64, 64, 256, False), ("clip", 2, 8, 77, 77, 64, True)]
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}


def plan(device: str, quick: bool, dtypes) -> list:
    """(shape tuple, dtype) to run: GPU every shape in bf16, then fp16, then fp32 (or --dtypes)."""
    if quick:
        return [(s, d) for d in dtypes or [torch.float32] for s in QUICK_SHAPES]
    if device == "cpu":
        return [(s, d) for d in dtypes or [torch.float32] for s in CPU_SHAPES]
    return [(s, d) for d in dtypes or [torch.bfloat16, torch.float16, torch.float32] for s in GPU_SHAPES]


def counts(b, h, sq, sk, d, causal, dtype, mode) -> tuple:
    """(flops, bytes) one call must do and move (see the module docstring)."""
    s = torch.finfo(dtype).bits // 8
    flops = 4 * b * h * sq * sk * d // (2 if causal else 1)
    nbytes = b * h * d * s * (2 * sq + 2 * sk) + 4 * b * h * sq
    if mode == "fwd":
        return flops, nbytes
    return int(3.5 * flops), nbytes + b * h * d * s * (5 * sq + 4 * sk) + 8 * b * h * sq


def providers(causal: bool):
    """eager, ours, and the other providers {label: (function, context factory)}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def eager(q, k, v):
        return attention_ref(q, k, v, causal, upcast=False)

    def ours(q, k, v):
        return diffusion_fast.attention(q, k, v, causal=causal)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def forced(name: str):
        return lambda: sdpa_kernel(getattr(SDPBackend, name))

    others = {"sdpa": (ours, lambda: diffusion_fast.use_backend("torch"))}
    others.update({label: (sdpa, forced(name)) for label, name in SDPA_BACKENDS.items()})
    return eager, ours, others


def make_args(shape, dtype, device):
    b, h, sq, sk, d = shape

    def make(requires_grad: bool) -> tuple:
        return tuple(torch.randn(b, h, s, d, device=device, dtype=dtype).requires_grad_(requires_grad)
                     for s in (sq, sk, sk))

    return make


OURS = tuple(OPS)  # our backends of the op (cuda, triton): the bench names their providers alike


def winner_table(rows: list) -> list:
    """Table entries from the bench's rows (harness.Row or dicts): per table_key, the backend
    (cuda, triton or torch) with the best geometric-mean speed-up over sdpa."""
    rows = [r if isinstance(r, dict) else r.__dict__ for r in rows]
    medians = {}  # (shape, causal, dtype, mode) -> {provider: median ms}
    for r in rows:
        case = (tuple(r["shape"]), r["extra"]["causal"], r["dtype"], r["mode"])
        medians.setdefault(case, {})[r["provider"]] = r["median_ms"]
    dtypes = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    ratios = {}  # table key -> {backend: [sdpa_ms / its ms per case]}
    for ((b, h, sq, sk, d), causal, dtype, mode), ms in medians.items():
        key = table_key(d, sq, sk, causal, dtypes[dtype], mode)
        for backend in OURS:
            if backend in ms and "sdpa" in ms:
                ratios.setdefault(key, {}).setdefault(backend, []).append(ms["sdpa"] / ms[backend])
    entries = []
    for (hd, seq, causal, dtype, mode), per_backend in sorted(ratios.items()):
        speedups = {b: math.exp(sum(map(math.log, rs)) / len(rs)) for b, rs in per_backend.items()}
        best = max(speedups, key=speedups.get)
        entries.append(dict(head_dim=hd, seq=seq, causal=causal, dtype=dtype, mode=mode,
                            backend=best if speedups[best] > 1 else "torch", speedup=round(speedups[best], 4),
                            speedups={b: round(x, 4) for b, x in speedups.items()},
                            cases=len(per_backend[best])))
    return entries


def write_table(bench: harness.Harness) -> None:
    entries = winner_table(bench.rows)
    data = dict(device_name=bench.meta["device_name"], device=bench.device.type, date=bench.meta["date"],
                torch=bench.meta["torch"], triton=bench.meta["triton"], commit=bench.meta["commit"],
                rule="per key, the backend of ours (cuda, triton) with the highest geometric mean over its cases "
                     "of sdpa_ms / its ms, if > 1; else torch",
                entries=entries)
    (bench.out / TABLE_FILE).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {bench.out / TABLE_FILE}: {len(entries)} keys "
          f"({', '.join(str(sum(e['backend'] == b for e in entries)) + ' to ' + b for b in OURS)})", flush=True)


def main(argv=None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    bench = harness.Harness("bench_attention", "attention", args)
    for (variant, b, h, sq, sk, d, causal), dtype in plan(args.device, args.quick, args.dtypes):
        eager, ours, others = providers(causal)
        shape = (b, h, sq, sk, d)
        for mode in harness.MODES:
            print(f"{variant} {list(shape)} {dtype} {mode}", flush=True)
            flops, nbytes = counts(*shape, causal, dtype, mode)
            case = harness.Case(variant, shape, dtype, mode, make_args(shape, dtype, bench.device), nbytes,
                                extra={"causal": causal}, flops=flops)
            bench.run(case, eager, ours, _unsupported, others=others)
    bench.finish()
    write_table(bench)


if __name__ == "__main__":
    main()
