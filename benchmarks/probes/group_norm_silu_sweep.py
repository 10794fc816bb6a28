"""Sweep the CUDA group_norm_silu block size on a GPU, without rebuilding: one subprocess per value of
DIFFUSION_FAST_GNS_VECS_PER_THREAD (vectors of 16 bytes each thread aims at; the library's default is 8).

    python3 benchmarks/probes/group_norm_silu_sweep.py --out DIR [--values 2,4,8,16] [--quick]

Each subprocess times, with triton.testing.do_bench (median, 4 rotating input sets), eager
``F.silu(F.group_norm(x, 32, w, b))`` and our CUDA kernel (``use_backend("cuda")``), forward and
forward+backward, at DDPM shapes in fp16/bf16/fp32 and both layouts, and checks ours against eager.
Prints one markdown table (ms, x eager, GB/s and % of a measured copy for the forward) and writes
it with a JSON to --out. Needs a CUDA device and the built extension; elsewhere it exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ENV = "DIFFUSION_FAST_GNS_VECS_PER_THREAD"
SHAPES = [(32, 256, 32, 32), (128, 128, 32, 32), (32, 128, 64, 64), (8, 512, 16, 16), (1, 256, 64, 64)]
DTYPES = ["fp16", "bf16", "fp32"]


def measure(quick: bool) -> list:
    """Rows of one value of ENV (this process): eager and ours, fwd and fwd+bwd, per shape/dtype/layout."""
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    import diffusion_fast

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    big = torch.empty(100 * 2**20, device="cuda", dtype=torch.uint8)
    copy_gbps = 2 * big.numel() / (do_bench(lambda: big.clone(), return_mode="median") * 1e-3) / 1e9
    rows = []
    for shape in SHAPES[:2] if quick else SHAPES:
        for dname in DTYPES[:1] if quick else DTYPES:
            for layout in ("nchw", "channels_last"):
                dtype = dtypes[dname]
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                sets = [(torch.randn(shape, device="cuda", dtype=dtype).add_(0.5).to(memory_format=fmt),
                         torch.randn(shape[1], device="cuda", dtype=dtype),
                         torch.randn(shape[1], device="cuda", dtype=dtype)) for _ in range(4)]
                grad = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=fmt)

                def eager(x, w, b):
                    return F.silu(F.group_norm(x, 32, w, b))

                def ours(x, w, b):
                    with diffusion_fast.use_backend("cuda"):
                        return diffusion_fast.group_norm_silu(x, 32, w, b)

                x0, w0, b0 = sets[0]
                err = (ours(x0, w0, b0).float() - eager(x0.float(), w0.float(), b0.float())).abs().max().item()
                nbytes = 2 * x0.numel() * x0.element_size()
                for mode in ("fwd", "fwd+bwd"):
                    times = {}
                    for label, f in (("eager", eager), ("cuda", ours)):
                        i = [0]

                        def step():
                            x, w, b = sets[i[0] % 4]
                            i[0] += 1
                            if mode == "fwd":
                                return f(x, w, b)
                            xg = x.detach().requires_grad_()
                            wg, bg = w.detach().requires_grad_(), b.detach().requires_grad_()
                            return torch.autograd.grad(f(xg, wg, bg), (xg, wg, bg), grad)

                        times[label] = do_bench(step, return_mode="median")
                    gbps = nbytes / (times["cuda"] * 1e-3) / 1e9
                    rows.append(dict(vecs_per_thread=os.environ.get(ENV, "default"), shape=list(shape), dtype=dname,
                                     layout=layout, mode=mode, eager_ms=times["eager"], cuda_ms=times["cuda"],
                                     x_eager=times["eager"] / times["cuda"],
                                     fwd_gbps=gbps if mode == "fwd" else None,
                                     frac_copy=gbps / copy_gbps if mode == "fwd" else None, max_abs_diff=err))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--values", default="2,4,8,16,32", help=f"values of {ENV} to run")
    p.add_argument("--out", default="/tmp/group_norm_silu_sweep")
    p.add_argument("--quick", action="store_true", help="two shapes, fp16 only")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # one value: rows as JSON on stdout's last line
        print(json.dumps(measure(args.quick)))
        return
    import torch

    if not torch.cuda.is_available():
        print("group_norm_silu_sweep: no CUDA device here; nothing to time.")
        return
    rows = []
    for v in args.values.split(","):
        cmd = [sys.executable, __file__, "--child"] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, env={**os.environ, ENV: v.strip()}, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{ENV}={v}: failed\n{done.stderr[-2000:]}")
            continue
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    lines = ["| vecs/thread | shape | dtype | layout | mode | eager ms | cuda ms | x eager | fwd GB/s | % copy "
             "| max diff |", "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in sorted(rows, key=lambda r: (r["shape"], r["dtype"], r["layout"], r["mode"])):
        gb = "-" if r["fwd_gbps"] is None else f"{r['fwd_gbps']:.0f}"
        frac = "-" if r["frac_copy"] is None else f"{100 * r['frac_copy']:.0f}"
        lines.append(f"| {r['vecs_per_thread']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} "
                     f"| {r['mode']} | {r['eager_ms']:.4f} | {r['cuda_ms']:.4f} | {r['x_eager']:.2f} | {gb} | {frac} "
                     f"| {r['max_abs_diff']:.1e} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "group_norm_silu_sweep.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                                    rows=rows), indent=1) + "\n")
    (out / "group_norm_silu_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
