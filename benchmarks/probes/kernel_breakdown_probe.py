"""Per-kernel device times (torch.profiler) of the calls whose GPU figures miss their targets.

    python3 benchmarks/probes/kernel_breakdown_probe.py --out DIR

The benches give each call's wall time and its kernels' summed time (``kernel ms``); this names the
kernels inside, for eager and for ours, so that a session can see which kernel to fix:
    gns_fwd_bwd   group_norm_silu forward+backward, 128x128x32x32 bf16, NCHW and channels_last
                  (fwd+bwd was 1.32-1.75x eager on the H100; target 2x)
    ddpm_step     ddpm_step, 256x3x256x256 bf16 (16-bit steps ran at 43-55% of copy bandwidth)
    unet_fwd      DDPMUNet CIFAR-10 forward, batch 128 bf16, NCHW and channels_last inputs, and torch.compile
                  on channels_last (kernel time on the H100: ours 7.2 ms, torch.compile 6.5 ms, eager 16.1 ms)
    dwconv_train  dwconv_bn_swish training forward, 32x192x32x32 bf16 (h100-2026-11-27c: 0.06 ms of kernels
                  but 0.41 ms per call on the CUDA backend, 0.66 ms on Triton; eager 0.16 ms): the host
                  time per call and the CPU-side operators that take it
    gns_fwd       group_norm_silu forward 32x256x32x32 bf16 NCHW, CUDA and Triton (h100-2026-11-28: Triton's
                  kernels 0.017 ms, the best, but 0.146 ms per call): host time per call and, for Triton, the
                  Python functions that take it (cProfile), after the launchers' cdiv fix
Writes DIR/kernel_breakdown.md: per case and provider, the host time per call (calls issued back to
back without a sync), the total and the top kernels by device time, and for the cases that ask for it
the top CPU-side operators by self CPU time. The UNet cases also sum their kernels by kind (``kind_of``:
convolution, GEMM, normalisation, attention, elementwise, concatenation, copy), to show which kind of
work our 7.2 ms lose to compile's 6.5.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import diffusion_fast  # noqa: E402
from diffusion_fast.models.ddpm_unet import DDPMUNet  # noqa: E402

CALLS, TOP = 5, 12


def host_ms(fn, calls: int = 50) -> float:
    """Host milliseconds per call of fn issued back to back (the GPU may lag behind; synced after)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return t / calls * 1e3


def kernels(fn, cpu: bool = False) -> tuple:
    """(ms per call of all kernels, [(ms per call, calls per call, name)] sorted, largest first,
    and when ``cpu`` the same for CPU-side operators by self CPU time, else [])."""
    fn()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])
    with profile(activities=activities) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    per_name: dict = {}
    per_op: dict = {}
    for e in prof.events():
        if getattr(e, "is_user_annotation", False):
            continue
        if e.device_type == DeviceType.CUDA:
            us, n = per_name.get(e.name, (0.0, 0))
            per_name[e.name] = (us + e.device_time_total, n + 1)
        elif cpu and e.device_type == DeviceType.CPU:
            us, n = per_op.get(e.name, (0.0, 0))
            per_op[e.name] = (us + e.self_cpu_time_total, n + 1)

    def table(d):
        return sorted(((us / 1e3 / CALLS, n / CALLS, name) for name, (us, n) in d.items()), reverse=True)

    rows = table(per_name)
    return sum(r[0] for r in rows), rows, table(per_op)


def gns_cases(dev):
    def make(cl):
        x = torch.randn(128, 128, 32, 32, device=dev, dtype=torch.bfloat16)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        w = torch.randn(128, device=dev, dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(128, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        return x, w, b, g

    for cl in (False, True):
        x, w, b, g = make(cl)
        name = "gns_fwd_bwd " + ("channels_last" if cl else "NCHW")
        yield name, "eager", lambda x=x, w=w, b=b, g=g: torch.autograd.grad(
            F.silu(F.group_norm(x, 32, w, b)), (x, w, b), g)

        def ours(x=x, w=w, b=b, g=g):
            with diffusion_fast.use_backend("cuda"):
                return torch.autograd.grad(diffusion_fast.group_norm_silu(x, 32, w, b), (x, w, b), g)

        yield name, "cuda", ours


def gns_fwd_cases(dev):
    x = torch.randn(32, 256, 32, 32, device=dev, dtype=torch.bfloat16)
    w, b = torch.randn(256, device=dev, dtype=torch.bfloat16), torch.randn(256, device=dev, dtype=torch.bfloat16)
    yield "gns_fwd 32x256x32x32 NCHW", "eager", lambda: F.silu(F.group_norm(x, 32, w, b))
    for backend in ("cuda", "triton"):
        def ours(backend=backend):
            with diffusion_fast.use_backend(backend):
                return diffusion_fast.group_norm_silu(x, 32, w, b)

        yield "gns_fwd 32x256x32x32 NCHW", backend, ours


def python_profile(fn, calls: int = 200) -> list:
    """The top Python functions of ``calls`` calls of fn by own time: [(us per call, name)]."""
    import cProfile
    import pstats

    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    rows = sorted(((v[2] / calls * 1e6, f"{k[2]} ({Path(k[0]).name}:{k[1]})") for k, v in stats.items()),
                  reverse=True)
    return rows[:TOP]


def step_cases(dev):
    x = torch.randn(256, 3, 256, 256, device=dev, dtype=torch.bfloat16)
    eps = torch.randn_like(x)
    coef = diffusion_fast.ddpm_coefficients(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)).to(dev)
    a, b, c1, c2, sigma = 1.01, 0.1, 0.5, 0.49, 0.02  # eager's formula with typical values

    def eager():
        x0 = (a * x.float() - b * eps.float()).clamp(-1, 1)
        return (c1 * x0 + c2 * x.float() + sigma * torch.randn_like(x0)).to(x.dtype)

    yield "ddpm_step bf16", "eager", eager
    for backend in ("cuda", "triton"):
        def ours(backend=backend):
            with diffusion_fast.use_backend(backend):
                return diffusion_fast.ddpm_step(x, eps, coef, 500, seed=1)

        yield "ddpm_step bf16", backend, ours


def dwconv_cases(dev, hw: int = 32):
    c, k = 192, 5
    x = torch.randn(32, c, hw, hw, device=dev, dtype=torch.bfloat16)
    w = 0.2 * torch.randn(c, 1, k, k, device=dev, dtype=torch.bfloat16)
    b, gamma, beta = (0.1 * torch.randn(c, device=dev, dtype=torch.bfloat16) for _ in range(3))
    rm, rv = torch.zeros(c, device=dev, dtype=torch.bfloat16), torch.ones(c, device=dev, dtype=torch.bfloat16)
    name = f"dwconv_train 32x192x{hw}x{hw} bf16 fwd"
    yield name, "eager", lambda: F.silu(F.batch_norm(F.conv2d(x, w, b, padding=k // 2, groups=c), rm, rv, gamma,
                                                     beta, True, 0.1, 1e-5))
    for backend in ("cuda", "triton"):
        def ours(backend=backend):
            with diffusion_fast.use_backend(backend):
                return diffusion_fast.dwconv_bn_swish(x, w, b, gamma, beta, rm, rv, training=True)

        yield name, backend, ours


# Kernel kinds by name, first match wins: cuDNN/CUTLASS convolution kernels, cuBLAS/CUTLASS GEMMs, our and
# inductor's norms (inductor names its reductions triton_red_/triton_per_), attention, ATen/inductor pointwise.
KINDS = (
    ("attention", r"attention|attn|flash|fmha|sdpa"),
    ("concatenation", r"catarray"),
    ("copy", r"copy|transpose|permute|nchwtonhwc|nhwctonchw"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit|nhwc"),
    ("gemm", r"gemm|cublas|cutlass"),
    ("norm", r"gns_|group_norm|groupnorm|layer_norm|batch_norm|triton_red_|triton_per_"),
    ("elementwise", r"elementwise|triton_poi_|unrolled|vectorized|silu|add"),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "other")


def by_kind(rows) -> list:
    """[(ms per call, kernels per call, kind)] of rows (ms, calls, name), largest first."""
    kinds: dict = {}
    for ms, n, name in rows:
        total, calls = kinds.get(kind_of(name), (0.0, 0.0))
        kinds[kind_of(name)] = (total + ms, calls + n)
    return sorted(((ms, n, kind) for kind, (ms, n) in kinds.items()), reverse=True)


def unet_cases(dev):
    for cl in (False, True):
        fmt = torch.channels_last if cl else torch.contiguous_format
        model = DDPMUNet.cifar10().to(dev, torch.bfloat16).eval().to(memory_format=fmt)
        x = torch.randn(128, 3, 32, 32, device=dev, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        t = torch.randint(0, 1000, (128,), device=dev)
        name = "unet_fwd " + ("channels_last" if cl else "NCHW")
        for backend in ("torch", "cuda"):
            def run(model=model, x=x, t=t, backend=backend):
                with torch.no_grad(), diffusion_fast.use_backend(backend):
                    return model(x, t)

            yield name, "eager" if backend == "torch" else backend, run
        if cl:  # what inductor does better than ours (~40 s to compile)
            compiled = torch.compile(model)

            def run_compiled(compiled=compiled, x=x, t=t):
                with torch.no_grad(), diffusion_fast.use_backend("torch"):
                    return compiled(x, t)

            yield name, "compile", run_compiled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/kernel_breakdown_probe")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernel_breakdown_probe: no CUDA device here; nothing to profile.")
        return
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    lines = [f"# Kernel breakdown on {torch.cuda.get_device_name()} (torch {torch.__version__})", "",
             f"Device time per call (ms), {CALLS} calls profiled after one warm-up; top {TOP} kernels.", ""]
    for cases in (dwconv_cases, gns_fwd_cases, unet_cases, gns_cases, step_cases):  # quick host-time cases first
        try:
            for case, provider, fn in cases(dev):
                host = host_ms(fn)
                total, rows, ops = kernels(fn, cpu=cases is dwconv_cases)
                print(f"{case} {provider}: host {host:.4f} ms, kernels {total:.4f} ms", flush=True)
                lines += [f"## {case}: {provider}, host {host:.4f} ms per call; kernels {total:.4f} ms in "
                          f"{sum(r[1] for r in rows):.0f} kernels", "",
                          "| ms | per call | kernel |", "| --: | --: | --- |"]
                lines += [f"| {ms:.4f} | {n:g} | {name[:140]} |" for ms, n, name in rows[:TOP]] + [""]
                if cases is unet_cases:
                    lines += ["| ms | kernels | kind |", "| --: | --: | --- |"]
                    lines += [f"| {ms:.4f} | {n:g} | {kind} |" for ms, n, kind in by_kind(rows)] + [""]
                if ops:
                    lines += ["| self CPU ms | per call | operator |", "| --: | --: | --- |"]
                    lines += [f"| {ms:.4f} | {n:g} | {name[:140]} |" for ms, n, name in ops[:TOP]] + [""]
                if cases is gns_fwd_cases and provider == "triton":
                    lines += ["| own Python us per call | function |", "| --: | --- |"]
                    lines += [f"| {us:.1f} | {name[:140]} |" for us, name in python_profile(fn)] + [""]
                (out / "kernel_breakdown.md").write_text("\n".join(lines) + "\n")
        except Exception as exc:  # a failing case must not lose the others' tables
            lines += [f"{cases.__name__} failed: {type(exc).__name__}: {exc}", ""]
    (out / "kernel_breakdown.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
