"""Probe: the shared-memory tiled dwconv + BatchNorm + Swish training forward (dwconv_tiled.cu), checked and timed.

    python benchmarks/probes/dwconv_tiled_probe.py [--out DIR] [--no-compile] [--compile-all] [--no-bench]

On a machine without CUDA it says so and exits 0. Otherwise it
  1. builds dwconv_tiled.cu with torch.utils.cpp_extension.load (an op library: torch.ops.dwconv_tiled_probe);
  2. checks y, mean, var against a float64 reference (F.conv2d(groups=C, padding=K//2) -> F.batch_norm(training)
     -> F.silu on float64 copies of the same inputs) for odd and NVAE shapes, float32/float16/bfloat16, with y
     preset to NaN (every element must be written), plus a second call that must match bitwise (determinism);
     error = max |ours - ref| / max(1, |ref|) elementwise;
  3. times the training forward (median of per-call CUDA-event times, L2 flushed before each call, 4 input
     sets in rotation) at NVAE shapes, K=5, bf16 and fp32: eager (cuDNN conv + batch_norm + silu),
     torch.compile of eager (default mode; a few shapes, as each costs ~10 s), the library's current CUDA
     kernel (diffusion_fast.dwconv_bn_swish under use_backend("cuda"), when its extension is built) and the
     tiled probe; GB/s counts 2 reads of x and 1 write of y.
Writes dwconv_tiled_probe.md and dwconv_tiled_probe.json to --out (default /tmp/dwconv_probe).
Exit status: 0 when every check passed, 1 when one failed, 2 when the build failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CU = HERE / "dwconv_tiled.cu"
EPS = 1e-5
Y_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
STAT_TOL = 1e-4  # mean/var are fp32 statistics of the exact inputs, whatever x's dtype
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DEVICE = "cuda"  # a CPU self-test of this script's logic may set "cpu" and pass a stand-in op

# (N, C, H, W, K, variant): variant "" = plain; "noparams": no conv bias / gamma / beta and swish off;
# "x_offset": x starts one element off (2-element loads fall back to scalar); "y_offset": y likewise (no
# vector stores); "shift100": x ~ 100 + N(0, 1) (robust variance; fp32 only).
CHECKS = [
    (2, 6, 7, 5, 3, ""),          # W <= 8 tiles, W odd: scalar loads and stores
    (1, 12, 8, 8, 5, ""),         # one 8x8 tile per plane
    (1, 12, 8, 8, 3, ""),
    (2, 4, 1, 1, 5, ""),          # 1x1 planes: all halo
    (2, 3, 10, 6, 5, ""),         # W % 4 == 2: pair loads, scalar stores
    (2, 3, 17, 16, 3, ""),        # 16x16 tiles, two along h
    (1, 17, 16, 16, 5, ""),       # last block partly idle
    (3, 5, 33, 65, 5, ""),        # 32x32 tiles, odd both ways
    (3, 5, 33, 65, 3, ""),
    (2, 3, 20, 34, 5, ""),
    (2, 3, 10, 12, 5, "noparams"),
    (2, 3, 16, 36, 5, "x_offset"),
    (1, 12, 8, 8, 5, "y_offset"),
    (4, 8, 32, 32, 3, "shift100"),
    (32, 192, 64, 64, 5, ""),     # NVAE cell middle
    (64, 384, 16, 16, 5, ""),
    (32, 768, 8, 8, 5, ""),
]

# NVAE (B, 6C, H, W): wider channels at coarser scales; K = 5.
BENCH_SHAPES = [(32, 192, 64, 64), (64, 192, 64, 64), (32, 384, 32, 32), (64, 384, 16, 16), (32, 768, 16, 16),
                (64, 768, 8, 8)]
COMPILE_SHAPES = [(32, 192, 64, 64), (64, 384, 16, 16), (64, 768, 8, 8)]  # bf16 only, unless --compile-all


def log(*args):
    print(*args, flush=True)


def build(ptxas: bool):
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    flags = ["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-lineinfo"]
    if ptxas:
        flags.append("-Xptxas=-v")
    t0 = time.perf_counter()
    load(name="dwconv_tiled_probe", sources=[str(CU)], extra_cuda_cflags=flags, is_python_module=False,
         verbose=ptxas)
    return time.perf_counter() - t0, torch.ops.dwconv_tiled_probe.dwconv_bn_swish_tiled


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make_inputs(N, C, H, W, K, dtype, gen, variant=""):
    """x with a non-zero mean and per-channel offsets; conv weight, conv bias, gamma, beta in x's dtype."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32)

    if variant == "shift100":
        x = 100.0 + randn(N, C, H, W)
    else:
        x = 1.5 * randn(N, C, H, W) + 2.0 + randn(1, C, 1, 1)
    w = 0.3 * randn(C, 1, K, K) + 0.05
    cb, gamma, beta = randn(C), 1.0 + 0.3 * randn(C), 0.3 * randn(C)
    x = x.to(dtype)
    if variant == "x_offset":  # same values, storage one element off: misaligned for 2-element loads
        buf = torch.empty(x.numel() + 1, dtype=dtype, device=DEVICE)
        buf[1:].copy_(x.reshape(-1))
        x = buf[1:].view(N, C, H, W)
    params = [t.to(dtype) for t in (w, cb, gamma, beta)]
    if variant == "noparams":
        params[1:] = [None, None, None]
    return x, params


def reference(x, w, cb, gamma, beta, swish):
    def d(t):
        return None if t is None else t.double()

    z = F.conv2d(x.double(), w.double(), d(cb), padding=w.shape[-1] // 2, groups=x.shape[1])
    zn = F.batch_norm(z, None, None, d(gamma), d(beta), training=True, momentum=0.1, eps=EPS)
    return (F.silu(zn) if swish else zn), z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=False)


def rel_err(a, ref):
    if a.shape != ref.shape:
        return float("inf")
    return ((a.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()


def run_checks(op):
    rows, ok_all = [], True
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(0)
    for (N, C, H, W, K, variant) in CHECKS:
        for dtype in DTYPES:
            if variant == "shift100" and dtype != torch.float32:
                continue
            name = f"{N}x{C}x{H}x{W} K={K}" + (f" {variant}" if variant else "")
            row = dict(case=name, dtype=SHORT[dtype])
            try:
                x, (w, cb, gamma, beta) = make_inputs(N, C, H, W, K, dtype, gen, variant)
                swish = variant != "noparams"
                if variant == "y_offset":
                    buf = torch.full((x.numel() + 1,), float("nan"), dtype=dtype, device=DEVICE)
                    out = buf[1:].view(x.shape)
                else:
                    out = torch.full_like(x, float("nan"), memory_format=torch.contiguous_format)
                y, mean, var = op(x, w, cb, gamma, beta, EPS, swish, out)
                y2, mean2, var2 = op(x, w, cb, gamma, beta, EPS, swish)  # allocates y itself
                sync()
                ry, rmean, rvar = reference(x, w, cb, gamma, beta, swish)
                row.update(
                    y_err=rel_err(y, ry), mean_err=rel_err(mean, rmean), var_err=rel_err(var, rvar),
                    finite=bool(torch.isfinite(y).all().item()), wrote_out=y.data_ptr() == out.data_ptr(),
                    deterministic=bool(torch.equal(y, y2) and torch.equal(mean, mean2) and torch.equal(var, var2)),
                    mean_dtype=str(mean.dtype).replace("torch.", ""))
                row["ok"] = (row["finite"] and row["wrote_out"] and row["deterministic"]
                             and row["y_err"] <= Y_TOL[dtype] and row["mean_err"] <= STAT_TOL
                             and row["var_err"] <= STAT_TOL and mean.dtype == torch.float32)
            except Exception as exc:  # report and go on
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            ok_all &= row["ok"]
            if "error" in row:
                log(f"  FAIL {name:32s} {row['dtype']}: {row['error']}")
            else:
                log(f"  {'ok  ' if row['ok'] else 'FAIL'} {name:32s} {row['dtype']}  y {row['y_err']:.2e} "
                    f"(tol {Y_TOL[dtype]:.0e})  mean {row['mean_err']:.2e}  var {row['var_err']:.2e}  "
                    f"finite={row['finite']} det={row['deterministic']}")
            rows.append(row)
    return ok_all, rows


def run_refusals(op):
    """Refused inputs must raise with a message. Run after the timing: on the H100 (2026-11-27) the process
    died (SIGSEGV) in the K=7 case, after the channels-last refusal had passed, and took the timing with it."""
    ok_all, rows = True, []
    x_cl = torch.zeros(2, 8, 4, 4, device=DEVICE).to(memory_format=torch.channels_last)
    for what, fn in (("channels-last x", lambda: op(x_cl, torch.zeros(8, 1, 5, 5, device=DEVICE), None, None, None,
                                                    EPS, True)),
                     ("K=7", lambda: op(x_cl.contiguous(), torch.zeros(8, 1, 7, 7, device=DEVICE), None, None, None,
                                        EPS, True))):
        try:
            fn()
            sync()
            log(f"  FAIL {what}: no error raised")
            ok_all = False
            rows.append(dict(case=what, ok=False, error="no error raised"))
        except RuntimeError as exc:
            log(f"  ok   {what} refused: {str(exc).splitlines()[0][:150]}")
            rows.append(dict(case=what, ok=True))
    return ok_all, rows


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
def eager(x, w, cb, gamma, beta):
    z = F.conv2d(x, w, cb, padding=w.shape[-1] // 2, groups=x.shape[1])
    return F.silu(F.batch_norm(z, None, None, gamma, beta, True, 0.1, EPS))


def library_fn():
    """The library's current CUDA path, or (None, why not)."""
    try:
        import diffusion_fast
    except Exception:
        sys.path.append(str(ROOT))
        try:
            import diffusion_fast
        except Exception as exc:
            return None, f"diffusion_fast not importable ({type(exc).__name__}: {exc})"
    from diffusion_fast import backends

    why = backends.extension_unsupported(torch.empty(0, device=DEVICE))
    if why is not None:
        return None, why

    def fn(x, w, cb, gamma, beta):
        with diffusion_fast.use_backend("cuda"):
            return diffusion_fast.dwconv_bn_swish(x, w, cb, gamma, beta, None, None, training=True, eps=EPS)

    return fn, None


class Timer:
    def __init__(self, reps: int, warmup: int):
        self.reps, self.warmup = reps, warmup
        self.flush = torch.empty((64 if DEVICE == "cuda" else 1) * 2**20, dtype=torch.int32, device=DEVICE)  # > L2

    def __call__(self, fn, sets) -> float:
        """Median ms of fn(*sets[i % len(sets)]) per call, the L2 flushed before each."""
        for i in range(self.warmup):
            fn(*sets[i % len(sets)])
        sync()
        times = []
        for i in range(self.reps):
            self.flush.zero_()
            args = sets[i % len(sets)]
            if DEVICE == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(*args)
                b.record()
                times.append((a, b))
            else:
                t0 = time.perf_counter()
                fn(*args)
                times.append(1e3 * (time.perf_counter() - t0))
        sync()
        return statistics.median(t if isinstance(t, float) else t[0].elapsed_time(t[1]) for t in times)


def run_bench(op, args):
    timer = Timer(args.reps, args.warmup)
    lib, lib_why = library_fn()
    if lib is None:
        log(f"  library CUDA path skipped: {lib_why}")
    rows = []
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(1)
    for dtype in (torch.bfloat16, torch.float32):
        for shape in BENCH_SHAPES:
            N, C, H, W = shape
            sets = [make_inputs(N, C, H, W, 5, dtype, gen) for _ in range(4)]
            sets = [(x, *p) for x, p in sets]
            nbytes = 3 * sets[0][0].numel() * sets[0][0].element_size()
            row = dict(shape="x".join(map(str, shape)), dtype=SHORT[dtype], K=5)
            providers = {"eager": eager, "tiled": lambda x, w, cb, g, b: op(x, w, cb, g, b, EPS, True)}
            if lib is not None:
                providers["current"] = lib
            want_compile = not args.no_compile and (args.compile_all or (dtype == torch.bfloat16
                                                                         and shape in COMPILE_SHAPES))
            if want_compile:
                providers["compile"] = torch.compile(eager, dynamic=False)
            for name, fn in providers.items():
                t0 = time.perf_counter()
                try:
                    with torch.no_grad():
                        row[name + "_ms"] = timer(fn, sets)
                except Exception as exc:
                    row[name + "_ms"] = None
                    row[name + "_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    log(f"  {row['shape']} {row['dtype']} {name}: {row[name + '_error']}")
                row[name + "_wall_s"] = round(time.perf_counter() - t0, 2)
            with torch.no_grad():  # the tiled output against eager on the timed inputs (sanity)
                x, w, cb, g, b = sets[0]
                ye, yt = eager(x.float(), w.float(), cb.float(), g.float(), b.float()), op(x, w, cb, g, b, EPS, True)[0]
                row["max_abs_vs_eager_fp32"] = (yt.float() - ye).abs().max().item()
            t = row.get("tiled_ms")
            for other in ("eager", "compile", "current"):
                o = row.get(other + "_ms")
                row["speedup_vs_" + other] = (o / t) if (o and t) else None
            row["tiled_GBps"] = nbytes / t / 1e6 if t else None
            rows.append(row)
            log("  " + " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if not k.endswith("_wall_s")))
            del sets
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    return rows, lib_why


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(rows) -> str:
    cols = [("shape", "shape"), ("dtype", "dtype"), ("eager_ms", "eager ms"), ("compile_ms", "compile ms"),
            ("current_ms", "current ms"), ("tiled_ms", "tiled ms"), ("speedup_vs_eager", "tiled vs eager"),
            ("speedup_vs_compile", "vs compile"), ("speedup_vs_current", "vs current"),
            ("tiled_GBps", "tiled GB/s (2R+1W)")]
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            if v is None:
                cells.append("-")
            elif k.startswith("speedup"):
                cells.append(f"{v:.2f}x")
            elif k.endswith("_ms"):
                cells.append(f"{v:.3f}")
            elif k == "tiled_GBps":
                cells.append(f"{v:.0f}")
            else:
                cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/dwconv_probe", help="folder for dwconv_tiled_probe.{md,json}")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (~10 s per shape)")
    ap.add_argument("--compile-all", action="store_true", help="torch.compile every timed shape and dtype")
    ap.add_argument("--no-bench", action="store_true", help="checks only")
    ap.add_argument("--ptxas", action="store_true", help="verbose build with ptxas resource usage")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()

    if not torch.cuda.is_available():
        log("dwconv_tiled_probe: no CUDA device here (torch.cuda.is_available() is False); nothing to check or time.")
        return 0

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                  torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version())
    log(f"device {report['device']} sm_{''.join(map(str, report['capability']))}, torch {report['torch']}, "
        f"CUDA {report['cuda']}")

    def save():
        report["total_s"] = round(time.perf_counter() - t_start, 1)
        (out / "dwconv_tiled_probe.json").write_text(json.dumps(report, indent=1))
        md = [f"# dwconv_tiled probe on {report['device']}", "",
              f"torch {report['torch']}, CUDA {report['cuda']}; build {report.get('build_s')} s; "
              f"checks {'passed' if report.get('checks_ok') else 'FAILED'}", ""]
        if report.get("bench"):
            md += ["Training forward, K=5, median ms (L2 flushed per call, 4 input sets). "
                   "GB/s: 2 reads of x + 1 write of y.", "", table(report["bench"]), ""]
        (out / "dwconv_tiled_probe.md").write_text("\n".join(md))

    log("build ...")
    try:
        report["build_s"], op = build(args.ptxas)
        report["build_s"] = round(report["build_s"], 1)
        log(f"built in {report['build_s']} s")
    except Exception as exc:
        report["build_error"] = traceback.format_exc()[-4000:]
        log(f"BUILD FAILED: {type(exc).__name__}: {exc}")
        save()
        return 2

    log("checks (error = max |ours - ref| / max(1, |ref|), ref in float64) ...")
    report["checks_ok"], report["checks"] = run_checks(op)
    log(f"checks {'passed' if report['checks_ok'] else 'FAILED'}")
    save()

    if not args.no_bench:
        log("timing ...")
        report["bench"], report["current_skipped"] = run_bench(op, args)
        log("")
        log(table(report["bench"]))
    save()
    log("refusals ...")
    refusals_ok, report["refusals"] = run_refusals(op)
    report["checks_ok"] = report["checks_ok"] and refusals_ok
    save()
    log(f"\nwrote {out / 'dwconv_tiled_probe.md'} and .json; total {report['total_s']} s")
    return 0 if report["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
