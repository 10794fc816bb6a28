"""Sweep the Triton attention forward's block sizes on a GPU, against the SDPA backends, at the shapes where
issue 4's targets are missed (h100-2026-11-27c, kernel time: DDPM 32x1x256x256 hd 256 bf16: ours 0.0213 ms,
best SDPA 0.0130; CLIP 64x8x77x77 hd 64 causal: 0.0177 against 0.0137).

    python3 benchmarks/probes/attention_fwd_sweep.py --out DIR [--budget-s 150] [--quick]

Each config (BLOCK_M, BLOCK_N, num_warps, num_stages, BLOCK_D: the head-dim chunk of q kᵀ; BLOCK_D == D_PAD
keeps q in registers across key tiles; tma: q, k, v loaded through TMA descriptors) runs
``kernels.attention.attention_fwd(..., blocks=)``, is checked against SDPA's math backend (a config that
fails to compile, e.g. for shared memory, is listed as such) and timed by its kernels' device time
(torch.profiler, ``harness.kernel_ms``: on the lent machines the host's launch cost exceeds these kernels,
and do_bench's wall-clock median, also recorded, measured it in h100-2026-11-28's sweep) and by
triton.testing.do_bench (median). Writes DIR/attention_fwd_sweep.md (fastest first, with each SDPA backend
and the library's current config) and .json. Needs a CUDA device; elsewhere it exits 0. ``run_config`` also
runs under TRITON_INTERPRET=1 on CPU tensors (the tests use it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# name -> (B, H, S, D, causal)
CASES = {"ddpm_cifar10": (32, 1, 256, 256, False), "ddpm_cifar10_b128": (128, 1, 256, 256, False),
         "clip_b64": (64, 8, 77, 64, True)}
# Tried in this order (the first keys vary slowest), the likelier winners first: q kept in registers, and the
# small tiles that did best in h100-2026-11-28's (wall-clock) sweep; 128 x 128 tiles at chunk 256 overflow
# shared memory.
GRID = dict(chunk=(256, 128), BLOCK_M=(64, 32, 128), BLOCK_N=(32, 64, 128), num_warps=(4, 8), num_stages=(3, 2),
            tma=(True, False))  # tma: q, k, v through TMA descriptors (ka._attention_fwd_tma_kernel), q resident only


def run_config(q, k, v, causal: bool, cfg: dict):
    """out (B, H, S, D) of the library's Triton forward with block sizes cfg (BLOCK_M, BLOCK_N, num_warps,
    num_stages, chunk: columns of D per q kᵀ chunk, capped at D_PAD; tma: the TMA-descriptor kernel)."""
    from diffusion_fast.kernels import attention as ka

    blocks = {key: val for key, val in cfg.items() if key not in ("chunk", "tma")}
    blocks.update(BLOCK_D=cfg["chunk"], TMA=cfg.get("tma", False))
    return ka.attention_fwd(q, k, v, causal, 1.0 / math.sqrt(q.shape[-1]), blocks=blocks)[0]


def configs(d: int, quick: bool) -> list:
    keys = list(GRID)
    grid = [dict(zip(keys, vals)) for vals in itertools.product(*GRID.values())]
    grid = [c for c in grid if c["chunk"] <= max(128, d)]  # chunk 256 only where D_PAD reaches it
    grid = [c for c in grid if not c["tma"] or c["chunk"] >= d]  # the TMA kernel keeps q whole
    return grid[:4] if quick else grid


def sweep(name: str, quick: bool, deadline: float) -> list:
    from harness import kernel_ms
    from triton.testing import do_bench

    from diffusion_fast.kernels import attention as ka

    B, H, S, D, causal = CASES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    rows = []

    def row(label, fn, cfg=None):
        try:
            err = (fn().float() - ref).abs().max().item()
            wall = do_bench(fn, warmup=10, rep=50, return_mode="median")
            ms = kernel_ms(fn, torch.device("cuda")) or wall
            rows.append(dict(case=name, provider=label, cfg=cfg, ms=ms, wall_ms=wall, tflops=flops / ms / 1e9,
                             max_err=err))
        except Exception as exc:  # compile failure (shared memory, registers) or no kernel for the shape
            rows.append(dict(case=name, provider=label, cfg=cfg, error=f"{type(exc).__name__}: {str(exc)[:120]}"))

    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        sdpa = getattr(torch.nn.attention.SDPBackend, backend)

        def fn(sdpa=sdpa):
            with torch.nn.attention.sdpa_kernel(sdpa):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        row(f"sdpa_{backend.split('_')[0].lower()}", fn)
    current = ka._blocks(ka._FWD, D, q.dtype)
    cur = dict(BLOCK_M=current["BLOCK_M"], BLOCK_N=current["BLOCK_N"], num_warps=current["num_warps"],
               num_stages=current["num_stages"], chunk=current["BLOCK_D"])
    row("triton current", lambda: run_config(q, k, v, causal, cur), cur)
    for cfg in configs(D, quick):
        if time.monotonic() > deadline:
            break
        row("triton", lambda cfg=cfg: run_config(q, k, v, causal, cfg), cfg)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/attention_fwd_sweep")
    ap.add_argument("--budget-s", type=float, default=150.0, help="seconds for all cases together")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("attention_fwd_sweep: no CUDA device here; nothing to sweep.")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, rows = time.monotonic(), []
    names = list(CASES)[:1] if args.quick else list(CASES)
    for i, name in enumerate(names):  # an equal share of what is left to each case
        deadline = time.monotonic() + (args.budget_s - (time.monotonic() - start)) / (len(names) - i)
        rows += sweep(name, args.quick, deadline)
        (out / "attention_fwd_sweep.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# Triton attention forward sweep on {torch.cuda.get_device_name()} (torch {torch.__version__})", ""]
    for name in names:
        lines += [f"## {name}: {CASES[name]} (B, H, S, D, causal), bf16", "",
                  "| provider | BLOCK_M | BLOCK_N | warps | stages | chunk | tma | kernel ms | wall ms | TFLOP/s "
                  "| max err |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        done = sorted((r for r in rows if r["case"] == name and "ms" in r), key=lambda r: r["ms"])
        for r in done:
            c = r["cfg"] or {}
            cells = [c.get(k, "") for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "chunk", "tma")]
            lines.append(f"| {r['provider']} | " + " | ".join(map(str, cells)) +
                         f" | {r['ms']:.4f} | {r['wall_ms']:.4f} | {r['tflops']:.0f} | {r['max_err']:.1e} |")
        failed = [r for r in rows if r["case"] == name and "error" in r]
        lines += [""] + [f"- failed: {r['provider']} {r['cfg']}: {r['error']}" for r in failed] + [""]
    (out / "attention_fwd_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
