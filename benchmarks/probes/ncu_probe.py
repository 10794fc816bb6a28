"""Nsight Compute (ncu) reports of the kernels whose GPU figures miss their targets: where each one's time
goes (throughput against the hardware's, occupancy, issue slots, warp stall reasons).

    python3 benchmarks/probes/ncu_probe.py --out DIR

Cases (bf16, the shapes of the open targets; ours only, eager's kernels are known):
    ddpm_step        256x3x256x256, CUDA and Triton (CUDA 0.317 ms, Triton 0.185 ms on the H100: 33% / 57%
                     of copy bandwidth; an instruction-issue bound is suspected for the CUDA kernel)
    gns_fwd          group_norm_silu forward 32x256x32x32 NCHW, CUDA and Triton (kernels 0.024 / 0.017 ms)
    dwconv_train     dwconv_bn_swish training forward 32x192x64x64, CUDA and Triton (CUDA: stats, finalize,
                     apply, 0.187 ms)
    attention_ddpm   attention forward 32x1x256x256 hd 256, CUDA and Triton, and SDPA's flash backend
The parent process runs ``ncu --profile-from-start off`` over ``--child``, which warms every case up and
then runs each once between cudaProfilerStart/Stop inside an NVTX range named after it. Writes
DIR/ncu_probe.txt (ncu's report, one block per kernel). Needs a CUDA device and ncu; elsewhere it exits 0.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "SchedulerStats", "WarpStateStats", "ComputeWorkloadAnalysis",
            "MemoryWorkloadAnalysis")


def cases(dev):
    """(name, fn) pairs; fn runs one call of the case: kernel_breakdown_probe's cases (ours only, eager's
    kernels are known), the dwconv one at 64x64, and the DDPM-shape attention beside SDPA's flash."""
    import diffusion_fast
    from kernel_breakdown_probe import dwconv_cases, gns_fwd_cases, step_cases

    for case, provider, fn in (*step_cases(dev), *gns_fwd_cases(dev), *dwconv_cases(dev, hw=64)):
        if provider != "eager":
            yield f"{case} {provider}", fn
    q, k, v = (torch.randn(32, 1, 256, 256, device=dev, dtype=torch.bfloat16) for _ in range(3))
    for backend in ("cuda", "triton"):
        def ours(backend=backend):
            with diffusion_fast.use_backend(backend):
                return diffusion_fast.attention(q, k, v)

        yield f"attention_ddpm {backend}", ours

    def flash():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    yield "attention_ddpm sdpa_flash", flash


def child() -> None:
    dev = torch.device("cuda")
    todo = list(cases(dev))
    for name, fn in todo:  # compile, autotune and allocate outside the profiled range
        try:
            fn(), fn()
        except Exception as exc:  # one failing case must not lose the others
            print(f"{name}: failed: {type(exc).__name__}: {exc}", flush=True)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in todo:
        torch.cuda.nvtx.range_push(name)
        try:
            fn()
        except Exception:
            pass
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.cudart().cudaProfilerStop()
    print("cases in order:", ", ".join(n for n, _ in todo), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/ncu_probe")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child()
        return
    ncu = shutil.which("ncu") or next(iter(sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))), None)
    if not torch.cuda.is_available() or ncu is None:
        print("ncu_probe: needs a CUDA device and ncu; nothing to profile here.")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [ncu, "--profile-from-start", "off", "--target-processes", "all", "--clock-control", "none", "--nvtx"]
    for s in SECTIONS:
        cmd += ["--section", s]
    cmd += [sys.executable, str(Path(__file__).resolve()), "--child"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    report = f"$ {' '.join(cmd)}\nexit {res.returncode}\n\n{res.stdout}\n{res.stderr}"
    (out / "ncu_probe.txt").write_text(report)
    print(report[-4000:])


if __name__ == "__main__":
    main()
