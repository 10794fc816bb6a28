"""Shared benchmark harness: timing, rotating inputs, providers, JSON rows, a markdown table.

A bench script lists its cases (``Case``) and, per case, calls ``Harness.run(case, eager,
ours, unsupported)``; every provider is timed on the same rotating inputs:

    eager    the plain PyTorch formula (``eager``)
    compile  ``torch.compile`` of that same function (``--compile-mode``; default mode)
    cuda     our extension, ``ours`` under ``use_backend("cuda")``; named ``cpu`` on CPU tensors
    triton   our Triton kernels, ``ours`` under ``use_backend("triton")``; GPU only
    ...      any other providers a bench passes (``run(..., others=)``), e.g. each SDPA backend

A backend of ours that cannot run a case (not built, no kernel, first call fails, or it
falls back to another backend) is skipped with its reason in the output, never timed.

Timing: on GPU ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call); on
CPU ``torch.utils.benchmark.Timer.blocked_autorange``. Both give the median and the 25th and
75th percentiles in ms. Inputs rotate through a pool of copies totalling at least twice the
last-level cache, so no call finds the inputs the previous one left in cache; a case's last
``Case.weights`` args (a model's parameters, passed as args for their grads) are shared by every
copy, as a model's weights are between calls.

GB/s divides the bytes the bench says the op must move by the median time; ``frac_copy_bw``
divides that by the bandwidth of a large ``copy_`` (bytes = 2 * size) measured once per run, and
``frac_same_bytes_copy`` is the median of a ``copy_`` moving the case's own bytes (rotated over as
many buffers as its inputs) over this median: the floor for that many bytes at that size, launch
and tail effects included, where the large copy's bandwidth is out of reach for small tensors.
TFLOP/s divides the FLOPs the bench counts (``Case.flops``; 0 = not counted) by the median time.

On CPU the harness first keeps glibc from handing freed memory back to the OS (``keep_freed_memory``),
as PyTorch's caching allocator does on a GPU: otherwise every call page-faults its outputs in afresh
whenever glibc trimmed them after the last call, which depends on the sizes the process freed earlier
(the order of cases), and an op that allocates more intermediates (eager) pays more of it. Measured:
eager dwconv+BatchNorm+SiLU at 32x384x8x8 took 3.4 ms in a fresh process and 0.37 ms with the memory kept.

On GPU, ``kernel_ms`` is the device time of the kernels one call runs, summed (torch.profiler over
a few calls): the work without the host's launch overhead or the GPU's idle gaps, i.e. what a
call costs once CUDA graphs (or a host that runs ahead) hide the launches. Where the median is
well above it, the call is bound by the host, not by its kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.utils.benchmark as tbench

ROOT = Path(__file__).resolve().parents[1]
try:
    import diffusion_fast  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run as `python benchmarks/bench_x.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))

import diffusion_fast  # noqa: E402
from diffusion_fast import backends  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
MODES = ("fwd", "fwd+bwd")
PROVIDERS = ("eager", "compile", "cuda", "cpu", "triton")
QUANTILES = (0.5, 0.25, 0.75)
MAX_POOL_SETS = 256


@dataclass
class Case:
    """One point: the op on one shape, dtype and mode, with the bytes it must move."""

    variant: str  # which form of the op, e.g. "plain", "temb"
    shape: tuple
    dtype: torch.dtype
    mode: str  # "fwd" or "fwd+bwd" (backward: grads of every input that requires grad)
    make_args: Callable[[bool], tuple]  # requires_grad -> positional args of eager/ours
    nbytes: int  # bytes a fused implementation must read + write (counted by the bench)
    extra: dict = field(default_factory=dict)  # anything else worth recording, e.g. num_groups
    flops: int = 0  # floating-point operations the op must do (counted by the bench; 0: not counted)
    weights: int = 0  # the last `weights` args are a model's weights: the same tensors in every pool set


@dataclass
class Row:
    """One JSON row: one provider timed on one case."""

    bench: str
    op: str
    variant: str
    provider: str
    device: str
    shape: list
    dtype: str
    mode: str
    median_ms: float
    p25_ms: float
    p75_ms: float
    ratio_to_eager: Optional[float]  # eager median / this median: > 1 means faster than eager
    ratio_to_compile: Optional[float]  # compile median / this median: > 1 means faster than compile
    bytes: int
    gbps: Optional[float]  # None when the bench counts no bytes for the case
    tflops: Optional[float]  # flops / median time, None when the bench does not count flops
    frac_copy_bw: Optional[float]  # gbps / measured copy_ bandwidth
    frac_same_bytes_copy: Optional[float]  # median of a copy_ of the case's bytes / this median
    max_abs_diff: Optional[float]  # max |output - eager in fp32| (fwd: y; fwd+bwd: every grad)
    kernel_ms: Optional[float]  # GPU: summed device time of one call's kernels (kernel_ms()); CPU: None
    kernel_ratio_to_eager: Optional[float]  # eager kernel_ms / this kernel_ms
    pool_sets: int  # input copies rotated through
    extra: dict
    device_name: str
    torch: str
    triton: Optional[str]
    diffusion_fast: str
    commit: Optional[str]
    date: str


def parse_args(description: str, argv=None) -> argparse.Namespace:
    """The CLI every bench shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<card>-<date>/)")
    p.add_argument("--quick", action="store_true", help="a few small shapes, short timing (smoke runs)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", help=f"comma list of {','.join(DTYPES)} (default: the bench's set)")
    p.add_argument("--providers", default=None,
                   help=f"comma list to run, from {','.join(PROVIDERS)} and the bench's own (default: all available)")
    p.add_argument("--compile-mode", default=None, help='torch.compile mode, e.g. "max-autotune-no-cudagraphs"')
    p.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True for every provider (cuDNN times its algorithms per "
                        "shape, as fixed-shape inference does and as max-autotune compiles do)")
    args = p.parse_args(argv)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if args.dtypes is not None:
        names = [d.strip() for d in args.dtypes.split(",")]
        if unknown := [d for d in names if d not in DTYPES]:
            p.error(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
        args.dtypes = [DTYPES[d] for d in names]
    if args.providers is not None:
        args.providers = {s.strip() for s in args.providers.split(",")}
    return args


# ---------------------------------------------------------------------------
# Machine facts
# ---------------------------------------------------------------------------
def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return diffusion_fast.env_info()["device"]


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = {}  # cache level -> bytes, from Linux sysfs ("491520K")
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        with contextlib.suppress(OSError, ValueError):
            text = (index / "size").read_text().strip()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
            sizes[int((index / "level").read_text())] = int(text.rstrip("KM")) * scale
    # Virtual machines can report a whole host's L3 (hundreds of MB); cap it so that the input
    # pool stays small next to memory. 64 MiB is above the L3 slice a 2-core job can use.
    return min(sizes[max(sizes)], 64 << 20) if sizes else 32 << 20


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
def _do_bench(device: torch.device) -> Optional[Callable]:
    """triton.testing.do_bench for GPU tensors, or None (CPU, or no Triton)."""
    if device.type != "cuda":
        return None
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def time_ms(fn: Callable[[], object], device: torch.device, quick: bool) -> tuple:
    """(median, p25, p75) of one call of fn, in ms."""
    do_bench = _do_bench(device)
    if do_bench is not None:
        warmup, rep = (5, 20) if quick else (25, 100)
        return tuple(do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES)))
    # CPU (or no Triton). Warm up first (fresh output buffers fault in pages on their first
    # calls); Timer syncs CUDA itself; m.times holds the per-call mean of each block.
    warm_until = time.perf_counter() + (0.02 if quick else 0.1)
    for i in itertools.count():
        fn()
        if i >= 2 and time.perf_counter() > warm_until:
            break
    timer = tbench.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=0.05 if quick else 0.5)
    times = torch.tensor(m.times, dtype=torch.float64) * 1e3
    return tuple(torch.quantile(times, torch.tensor(QUANTILES, dtype=torch.float64)).tolist())


def kernel_ms(fn: Callable[[], object], device: torch.device, calls: int = 10) -> Optional[float]:
    """GPU: the device time of the kernels one call of fn runs, summed over its kernels (and
    memsets/copies), averaged over ``calls`` calls profiled with torch.profiler; None on CPU or
    where the profiler cannot see the GPU (no CUPTI)."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    # the device's own events (kernels, memsets, copies), as the profiler's table totals them: the CPU
    # events that launched them carry the same time again
    total_us = sum(e.device_time_total for e in prof.events()
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    return total_us / 1e3 / calls if total_us > 0 else None


def copy_bandwidth_gbps(device: torch.device, llc: int, quick: bool) -> tuple:
    """(GB/s, size in bytes) of dst.copy_(src) for a tensor well beyond the last-level cache."""
    size = min(max(8 * llc, 256 << 20), (256 << 20) if quick else (1 << 30))
    src = torch.ones(size // 4, dtype=torch.float32, device=device)  # fill: pages touched now
    dst = torch.empty_like(src)
    dst.copy_(src)
    median, _, _ = time_ms(lambda: dst.copy_(src), device, quick)
    return 2 * size / (median * 1e-3) / 1e9, size


# ---------------------------------------------------------------------------
# Inputs and steps
# ---------------------------------------------------------------------------
def _clone(t):
    return t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t


def _upcast(t):
    """fp16/bf16 tensors as fp32 leaves (same requires_grad); anything else unchanged."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.element_size() < 4:
        return t.detach().float().requires_grad_(t.requires_grad)
    return t


def copy_sets(nbytes: int, sets: int, llc: int) -> int:
    """How many copies of ``nbytes`` to rotate over: enough to total 2x the last-level cache, at
    most ``sets``. Used for the input pool (at most MAX_POOL_SETS) and for the same-bytes copy (at
    most the pool's count: a model bench counts its weights in nbytes, hundreds of MB for a 20-step
    sampling run, while its pool holds dozens of small inputs)."""
    return max(1, min(sets, math.ceil(2 * llc / max(nbytes, 1))))


def make_pool(first: tuple, llc: int, keep: frozenset = frozenset()) -> list:
    """Copies of one input set, enough to total at least 2x the last-level cache; the args at the
    indices ``keep`` (a model's weights, which do not change between calls) are shared, not copied."""
    n = copy_sets(sum(t.nbytes for i, t in enumerate(first) if isinstance(t, torch.Tensor) and i not in keep),
                  MAX_POOL_SETS, llc)
    return [first] + [tuple(t if i in keep else _clone(t) for i, t in enumerate(first)) for _ in range(n - 1)]


def as_step(f: Callable, mode: str) -> Callable:
    """fwd: f(*args). fwd+bwd: f(*args), then grads of every input that requires grad."""
    if mode == "fwd":
        return lambda args, grad_out: f(*args)

    def step(args, grad_out):
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        return torch.autograd.grad(f(*args), leaves, grad_out)

    return step


@contextlib.contextmanager
def env_var(name: str, value: str):
    """Sets the environment variable ``name`` to ``value`` inside the block (for settings our
    kernels read at each call, e.g. DIFFUSION_FAST_GNS_CL_SLABS), restoring it after."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def keep_freed_memory() -> Optional[str]:
    """glibc: serve allocations below 32 MiB from the heap and never trim it (mallopt), so freed CPU
    tensors are reused rather than unmapped and faulted in again; None where that is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt(m_mmap_threshold, 32 << 20) != 1 or mallopt(m_trim_threshold, 2**31 - 1) != 1:
        return None
    return "glibc heap kept (mallopt: mmap threshold 32 MiB, no trimming)"


def rotating(step: Callable, pool: list) -> Callable[[], object]:
    sets = itertools.cycle(pool)
    return lambda: step(*next(sets))


def max_abs_diff(out, ref) -> float:
    outs, refs = (out, ref) if isinstance(out, (tuple, list)) else ((out,), (ref,))
    return max(float((o.float() - r.float()).abs().max()) for o, r in zip(outs, refs))


# ---------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------
class Harness:
    """Times the providers of each case and writes ``<bench>.json`` and ``<bench>.md`` to --out."""

    def __init__(self, bench: str, op: str, args: argparse.Namespace):
        self.bench, self.op, self.args = bench, op, args
        self.device = torch.device(args.device)
        self.start = time.monotonic()
        self.rows: list = []
        self.skipped: list = []  # dicts: provider, case, reason
        self.notes: list = []  # markdown lines a bench appends under the table
        allocator = keep_freed_memory() if self.device.type == "cpu" else "torch caching allocator"
        env = diffusion_fast.env_info()
        self.llc = last_level_cache_bytes(self.device)
        self.copy_gbps, copy_bytes = copy_bandwidth_gbps(self.device, self.llc, args.quick)
        self.meta = dict(
            device_name=device_name(self.device), torch=torch.__version__, triton=env["triton"],
            diffusion_fast=env["diffusion_fast"], commit=git_commit(),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        self.env = dict(
            env_info=env, **self.meta, device=self.device.type, argv=sys.argv, threads=torch.get_num_threads(),
            last_level_cache_bytes=self.llc, copy_gbps=self.copy_gbps, copy_tensor_bytes=copy_bytes,
            compile_mode=args.compile_mode, cudnn_benchmark=torch.backends.cudnn.benchmark,
            quantiles=list(QUANTILES), loadavg=_loadavg(),
            allocator=allocator or "system default (freed memory may be unmapped between calls)",
            timer="torch.utils.benchmark.Timer" if _do_bench(self.device) is None else "triton.testing.do_bench",
        )
        day = self.meta["date"][:10]
        self.out = args.out or ROOT / "benchmarks" / "results" / f"{slug(self.meta['device_name'])}-{day}"
        self.out.mkdir(parents=True, exist_ok=True)

    def our_backends(self) -> list:
        """(label, backend) of ours worth trying on this device."""
        if self.device.type == "cpu":
            return [("cpu", "cuda")]
        return [("cuda", "cuda"), ("triton", "triton")]

    def skip(self, provider: str, case: Optional[Case], reason: str) -> None:
        where = "all" if case is None else f"{case.variant} {list(case.shape)} {_dtype_name(case.dtype)} {case.mode}"
        self.skipped.append(dict(provider=provider, case=where, reason=reason.strip().splitlines()[0][:300]))
        print(f"  skip {provider} ({where}): {self.skipped[-1]['reason']}", flush=True)

    def wants(self, label: str, backend: Optional[str] = None) -> bool:
        """Whether --providers (all when not given) selects this provider; "cuda" also selects our C++ on CPU."""
        wanted = self.args.providers
        return wanted is None or bool({label, backend} & wanted)

    def run(self, case: Case, eager: Callable, ours: Callable, unsupported: Callable,
            others: Optional[dict] = None) -> None:
        """Time every provider on ``case``; ``unsupported(backend, x)`` gives why ours cannot run.

        ``others``: label -> callable, more providers timed like eager (no backend context),
        e.g. a diffusers model, or label -> (callable, context factory) to time it inside
        ``context()`` (e.g. one SDPA kernel forced); a callable that raises is skipped with its reason.
        """
        if self.args.budget_s is not None and time.monotonic() - self.start > self.args.budget_s:
            return self.skip("all", case, f"time budget of {self.args.budget_s:.0f}s spent")
        try:
            pool, ref = self._inputs(case, eager)
        except Exception as exc:  # e.g. eager has no kernel for this dtype on this device
            return self.skip("all", case, f"eager reference failed: {type(exc).__name__}: {exc}")
        # compile runs last: its compile can take a minute on a big model, and a run interrupted
        # there (SIGINT from a time limit) still writes the rows of the others (the finally below).
        providers = [("eager", eager, None, None)]
        providers += [(label, ours, backend, None) for label, backend in self.our_backends()]
        for label, other in (others or {}).items():
            f, context = other if isinstance(other, tuple) else (other, None)
            providers.append((label, f, None, context))
        providers.append(("compile", None, None, None))
        timed = {}
        copy_ms = None
        try:
            self._time_providers(case, providers, unsupported, pool, ref, timed)
            copy_ms = self._same_bytes_copy_ms(case, len(pool)) if case.nbytes else None
        finally:
            self._add_rows(case, timed, len(pool), copy_ms)
            self.save()

    def _same_bytes_copy_ms(self, case: Case, sets: int) -> float:
        """Median ms of dst.copy_(src) with src and dst of case.nbytes / 2 each, rotated over
        ``copy_sets`` pairs (as many as the op's input sets, fewer when the bytes are large)."""
        n = max(1, case.nbytes // 8)  # fp32 elements per buffer
        pairs = [(torch.ones(n, device=self.device), torch.empty(n, device=self.device))
                 for _ in range(copy_sets(case.nbytes, sets, self.llc))]
        return time_ms(rotating(lambda src, dst: dst.copy_(src), pairs), self.device, self.args.quick)[0]

    def _time_providers(self, case: Case, providers: list, unsupported: Callable, pool: list, ref, timed: dict) -> None:
        """Time each (label, f, backend, context) on the pool into ``timed`` {label: (quantiles, diff)}."""
        args0 = pool[0][0]
        eager = providers[0][1]
        for label, f, backend, context in providers:
            if not self.wants(label, backend):
                continue
            try:
                if label == "compile":
                    torch._dynamo.reset()  # fresh static-shape compile per case; no recompile limit
                    f = torch.compile(eager, mode=self.args.compile_mode, dynamic=False)
                if backend is not None and (reason := unsupported(backend, args0[0])):
                    self.skip(label, case, reason)
                    continue
                if backend is not None:
                    ctx = diffusion_fast.use_backend(backend)
                else:
                    ctx = context() if context is not None else contextlib.nullcontext()
                step = as_step(f, case.mode)
                with ctx:
                    seen = len(backends.fallbacks())
                    out = step(*pool[0])  # first call: compiles, autotunes
                    if backend is not None and len(backends.fallbacks()) > seen:
                        raise RuntimeError(f"fell back: {backends.fallbacks()[-1]['reason']}")
                    diff = max_abs_diff(out, ref)
                    del out
                    quantiles = time_ms(rotating(step, pool), self.device, self.args.quick)
                    timed[label] = (quantiles, diff, self._kernel_ms(label, case, rotating(step, pool), quantiles[0]))
            except Exception as exc:  # a provider failing must not stop the run
                self.skip(label, case, f"{type(exc).__name__}: {exc}")

    def _kernel_ms(self, label: str, case: Case, fn: Callable[[], object], median_ms: float) -> Optional[float]:
        """kernel_ms(fn) over up to 10 calls, fewer for slow ones (~0.2 s of calls: a sampling loop takes
        seconds), or None with a note where profiling fails (the timing above stands)."""
        try:
            return kernel_ms(fn, self.device, calls=max(1, min(10, int(200 / max(median_ms, 1e-3)))))
        except Exception as exc:  # e.g. a profiler without CUPTI
            self.skip(f"{label} kernel_ms", case, f"{type(exc).__name__}: {exc}")
            return None

    def _inputs(self, case: Case, eager: Callable) -> tuple:
        """The rotating pool of (args, grad_out), and eager's fp32 result on its first set."""
        torch.manual_seed(0)
        args0 = case.make_args(case.mode == "fwd+bwd")
        grad_out = None
        if case.mode == "fwd+bwd":
            with torch.no_grad():
                grad_out = torch.randn_like(eager(*args0))  # fixed by the seed: the same for every provider
        keep = frozenset(range(len(args0) - case.weights, len(args0)))
        pool = [(s[:-1], s[-1]) for s in make_pool(args0 + (grad_out,), self.llc, keep)]
        wide = tuple(_upcast(t) for t in args0)  # the reference: eager in fp32 on the same values
        return pool, as_step(eager, case.mode)(wide, _upcast(grad_out))

    def _add_rows(self, case: Case, timed: dict, pool_sets: int, copy_ms: Optional[float]) -> None:
        eager_ms = timed["eager"][0][0] if "eager" in timed else None
        compile_ms = timed["compile"][0][0] if "compile" in timed else None
        eager_kernel_ms = timed["eager"][2] if "eager" in timed else None
        order = sorted(timed, key=lambda label: (label != "eager", label != "compile"))  # eager, compile, run order
        for label in order:
            (median, p25, p75), diff, kms = timed[label]
            gbps = case.nbytes / (median * 1e-3) / 1e9 if case.nbytes else None  # no byte count: no GB/s
            self.rows.append(Row(
                bench=self.bench, op=self.op, variant=case.variant, provider=label, device=self.device.type,
                shape=list(case.shape), dtype=_dtype_name(case.dtype), mode=case.mode,
                median_ms=median, p25_ms=p25, p75_ms=p75,
                ratio_to_eager=None if eager_ms is None else eager_ms / median,
                ratio_to_compile=None if compile_ms is None else compile_ms / median,
                bytes=case.nbytes, gbps=gbps, tflops=case.flops / (median * 1e-3) / 1e12 if case.flops else None,
                frac_copy_bw=gbps / self.copy_gbps if gbps is not None and self.copy_gbps else None,
                frac_same_bytes_copy=None if copy_ms is None else copy_ms / median,
                max_abs_diff=diff, kernel_ms=kms,
                kernel_ratio_to_eager=eager_kernel_ms / kms if eager_kernel_ms and kms else None,
                pool_sets=pool_sets, extra=case.extra, **self.meta,
            ))

    # -----------------------------------------------------------------------
    # Output
    # -----------------------------------------------------------------------
    def save(self) -> None:
        """Write <bench>.json and <bench>.md (after every case, so a killed run keeps its rows)."""
        data = dict(env=self.env, rows=[asdict(r) for r in self.rows], skipped=self.skipped)
        (self.out / f"{self.bench}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (self.out / f"{self.bench}.md").write_text(self.table() + "\n")

    def table(self) -> str:
        m = self.meta
        lines = [
            f"# {self.bench}: {self.op} on {m['device_name']} ({self.device.type}, {self.env['threads']} threads)",
            "",
            f"torch {m['torch']}, triton {m['triton']}, diffusion_fast {m['diffusion_fast']}, "
            f"commit {(m['commit'] or 'unknown')[:12]}, {m['date']}. Timer: {self.env['timer']}, median "
            f"and p25-p75 ms. Copy bandwidth (copy_ of {self.env['copy_tensor_bytes'] >> 20} MiB): "
            f"{self.copy_gbps:.1f} GB/s; % same-bytes copy: the time of a copy_ moving the case's bytes over "
            f"this row's. x eager / x compile: speed-up (> 1 is faster). Kernel ms (GPU): the summed device "
            f"time of one call's kernels (profiler), and x eager on it. "
            f"Memory: {self.env['allocator']}. Load average at start: {self.env['loadavg']}."
            + (" cuDNN benchmark mode on." if self.env.get("cudnn_benchmark") else ""),
            "",
            "| variant | shape | dtype | mode | provider | median ms | p25-p75 ms | x eager | x compile "
            "| GB/s | % copy BW | % same-bytes copy | TFLOP/s | max abs diff | kernel ms | x eager (kernels) |",
            "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        variants = list(dict.fromkeys(r.variant for r in self.rows))  # in run order
        rows = sorted(self.rows, key=lambda r: (variants.index(r.variant), r.dtype, r.shape, MODES.index(r.mode)))
        for r in rows:  # sorted() is stable: providers stay in run order
            lines.append(
                f"| {r.variant} | {'x'.join(map(str, r.shape))} | {r.dtype} | {r.mode} | {r.provider} "
                f"| {r.median_ms:.4f} | {r.p25_ms:.4f}-{r.p75_ms:.4f} | {_fmt(r.ratio_to_eager, '.2f')} "
                f"| {_fmt(r.ratio_to_compile, '.2f')} | {_fmt(r.gbps, '.1f')} "
                f"| {_fmt(r.frac_copy_bw and 100 * r.frac_copy_bw, '.0f')} "
                f"| {_fmt(r.frac_same_bytes_copy and 100 * r.frac_same_bytes_copy, '.0f')} "
                f"| {_fmt(r.tflops, '.3g')} | {_fmt(r.max_abs_diff, '.1e')} | {_fmt(r.kernel_ms, '.4f')} "
                f"| {_fmt(r.kernel_ratio_to_eager, '.2f')} |"
            )
        lines += self.notes
        if self.skipped:
            lines += ["", "Skipped:"]
            groups: dict = {}
            for s in self.skipped:
                groups.setdefault((s["provider"], s["reason"]), []).append(s["case"])
            for (provider, reason), cases in groups.items():
                lines.append(f"- {provider} ({len(cases)} case{'s' * (len(cases) > 1)}, e.g. {cases[0]}): {reason}")
        return "\n".join(lines)

    def finish(self) -> None:
        self.save()
        print(self.table())
        print(f"\nwrote {self.out / (self.bench + '.json')} and .md", flush=True)


def _loadavg() -> Optional[list]:
    """1, 5 and 15 minute load averages: other jobs on the machine make timings noisy."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ---------------------------------------------------------------------------
# Elementwise ops on same-shape inputs (bench_langevin, bench_sampler_step, bench_dpm2015_step)
# ---------------------------------------------------------------------------
def variant_plan(device: str, quick: bool, dtypes, variants, main: str, shapes, side_shapes, quick_shapes) -> list:
    """(variant, shape, dtype) to run, the most telling first (a --budget-s may cut the tail).

    quick: every variant on ``quick_shapes``. Else the ``main`` variant on ``shapes`` in fp32 (and
    bf16 on a GPU), then the other variants on ``side_shapes``. fp32 elsewhere; --dtypes replaces each set.
    """
    fp32, bf16 = torch.float32, torch.bfloat16
    if quick:
        return [(v, s, d) for v in variants for s in quick_shapes for d in dtypes or [fp32]]
    main_dtypes = dtypes or ([fp32] if device == "cpu" else [fp32, bf16])
    first = [(main, s, d) for d in main_dtypes for s in shapes]
    return first + [(v, s, d) for v in variants if v != main for s in side_shapes for d in dtypes or [fp32]]


def randn_args(shape, dtype, device, n_inputs: int) -> Callable[[bool], tuple]:
    """make_args of ``Case``: n_inputs fresh randn tensors of one shape (never zeros; no grads)."""

    def make(requires_grad: bool) -> tuple:
        return tuple(torch.randn(shape, device=device, dtype=dtype) for _ in range(n_inputs))

    return make


def run_elementwise(bench: Harness, variants: dict, plan: list, unsupported: Callable, extra: dict) -> None:
    """Time ``variants`` (name -> (eager, ours, n_inputs)) on each (variant, shape, dtype) of ``plan``.

    Forward only; bytes = (n_inputs + 1) * numel * itemsize: read every input once, write one output.
    """
    for variant, shape, dtype in plan:
        eager, ours, n_inputs = variants[variant]
        print(f"{variant} {list(shape)} {dtype}", flush=True)
        nbytes = (n_inputs + 1) * math.prod(shape) * (torch.finfo(dtype).bits // 8)
        case = Case(variant, shape, dtype, "fwd", randn_args(shape, dtype, bench.device, n_inputs), nbytes,
                    extra=dict(extra))
        bench.run(case, eager, ours, unsupported)
