"""Benchmark NVAE's cell middle, depthwise 5x5 conv + BatchNorm + Swish: eager, torch.compile, our backends.

    python benchmarks/bench_nvae_cell.py --device cpu --out /tmp/bench_out
    python benchmarks/bench_nvae_cell.py --quick              # smoke run, tiny shapes

NVAE (Vahdat & Kautz 2020) expands a cell's C channels 6x with a 1x1 conv, then runs
dwconv 5x5 -> BN -> Swish on the 6C channels. Eager formula (each variant against its own):
    train     swish(batch_norm(conv2d(x, w, b, padding=2, groups=6C), training=True))   batch stats,
              running stats updated in place (NVAE trains this way)
    eval      the same with training=False (running statistics)
    train_cl  train on channels_last x
    eval_cl   eval on channels_last x
Shapes (B, 6C, H, W): B in {32, 64}; 6C in {192, 384, 768} (C = 32, 64, 128); H = W in 8..64,
wider channels at coarser scales as in NVAE's hierarchy.

Bytes counted (E = B*6C*H*W elements of s bytes; parameters ignored): what our kernels' passes move,
fwd train 3*E*s (x read twice: the statistics pass, then the output pass; y written once; the CUDA
kernels at 16 bits move 4*E*s: x read once, the conv kept in y, y read and written again; the
"cuda+conv_twice" rows time them without that, as the float32 ones run), fwd eval
2*E*s, fwd+bwd train 3*E*s + 5*E*s (backward: x and dy read twice, dx written; Triton and CUDA also
write and read an fp32 dz scratch: +8*E bytes, not counted). The C++ CPU kernels keep a channel's
conv output in cache, so their second reads mostly come from cache: GB/s is effective bandwidth.
FLOPs: the 5x5 conv is 50 per element; fwd train computes it twice (~110 FLOP/element with BN and
swish), backward four times (stats of dz, dz itself, dx, dw: ~220). In fp32 that is ~14 FLOP/byte
for fwd+bwd: compute-bound on a CPU (a few FLOP/byte at its bandwidth), near balance on an H100.
On a GPU the bench also records the peak memory of one fwd+bwd step per provider
(bench_nvae_cell_memory.json/.md): eager keeps conv and BN outputs for backward, ours keeps x only.

The whole generative cell (variants cell_train, cell_eval, cell_train_cl, cell_eval_cl; shape = the cell's
input (B, C, H, W), C = 6C / 6 of a middle shape): ``GenerativeResidualCell(C, C)``, i.e. BN -> 1x1 conv
(C -> 6C) -> BN-Swish -> dwconv 5x5-BN-Swish -> 1x1 conv (6C -> C) -> BN -> SE, plus the skip. Eager and
compile run a copy whose fused modules are the plain layers they replace (BatchNorm2d + SiLU, depthwise
Conv2d + BatchNorm2d + SiLU); ours run the library's cell. fwd+bwd takes the grads of x and of every
parameter. TFLOP/s counts the convolutions and SE's linears (2 per multiply-add; fwd+bwd 3x the forward);
no byte count (the cell's traffic depends on which intermediates a provider keeps).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math

import harness  # first: puts the repo root on sys.path when diffusion_fast is not installed
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import diffusion_fast
from diffusion_fast.models.nvae.cells import GenerativeResidualCell
from diffusion_fast.nn import BNSwish, DWConvBNSwish
from diffusion_fast.ops.dwconv_bn_swish import _unsupported

K, EPS, MOMENTUM = 5, 1e-5, 0.1

GPU_SHAPES = [(b, c, h, h) for b in (32, 64)
              for c, h in ((192, 64), (192, 32), (384, 32), (384, 16), (768, 16), (768, 8))]
CPU_SHAPES = [(32, 192, 16, 16), (32, 384, 8, 8), (32, 192, 32, 32)]
QUICK_SHAPES = [(2, 24, 8, 8)]


def eager_train(x, w, b, gamma, beta, running_mean, running_var):
    z = F.conv2d(x, w, b, padding=K // 2, groups=x.shape[1])
    return F.silu(F.batch_norm(z, running_mean, running_var, gamma, beta, True, MOMENTUM, EPS))


def eager_eval(x, w, b, gamma, beta, running_mean, running_var):
    z = F.conv2d(x, w, b, padding=K // 2, groups=x.shape[1])
    return F.silu(F.batch_norm(z, running_mean, running_var, gamma, beta, False, MOMENTUM, EPS))


def ours_train(x, w, b, gamma, beta, running_mean, running_var):
    return diffusion_fast.dwconv_bn_swish(x, w, b, gamma, beta, running_mean, running_var, training=True,
                                          momentum=MOMENTUM, eps=EPS)


def ours_eval(x, w, b, gamma, beta, running_mean, running_var):
    return diffusion_fast.dwconv_bn_swish(x, w, b, gamma, beta, running_mean, running_var, training=False,
                                          momentum=MOMENTUM, eps=EPS)


# variant -> (eager, ours, channels_last)
VARIANTS = {"train": (eager_train, ours_train, False), "eval": (eager_eval, ours_eval, False),
            "train_cl": (eager_train, ours_train, True), "eval_cl": (eager_eval, ours_eval, True)}


def plan(device: str, quick: bool, dtypes) -> list:
    """(variant, shape, dtype) to run, the most telling first (a --budget-s may cut the tail)."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if quick:
        return [(v, s, d) for d in dtypes or [fp32] for s in QUICK_SHAPES for v in VARIANTS]
    shapes = CPU_SHAPES if device == "cpu" else GPU_SHAPES
    points = [("train", s, d) for d in dtypes or ([fp32] if device == "cpu" else [bf16, fp32]) for s in shapes]
    # every variant at every CPU shape (eval and channels-last are where the C++ path was slowest);
    # on a GPU the other variants at the first shape only
    extra_shapes = shapes if device == "cpu" else shapes[:1]
    extra = [(v, s, d) for v in ("eval", "train_cl", "eval_cl") for s in extra_shapes for d in dtypes or [fp32]]
    return points + extra


def make_args(shape, dtype, device, channels_last):
    """requires_grad -> (x, w, b, gamma, beta, running_mean, running_var), NVAE-like statistics."""

    def make(requires_grad: bool) -> tuple:
        c = shape[1]
        x = torch.randn(shape, device=device, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        w = 0.2 * torch.randn(c, 1, K, K, device=device, dtype=dtype)
        b = 0.1 * torch.randn(c, device=device, dtype=dtype)
        gamma = 1 + 0.1 * torch.randn(c, device=device, dtype=dtype)
        beta = 0.1 * torch.randn(c, device=device, dtype=dtype)
        params = tuple(t.requires_grad_(requires_grad) for t in (x, w, b, gamma, beta))
        stats = (torch.zeros(c, device=device, dtype=dtype), torch.ones(c, device=device, dtype=dtype))
        return params + stats

    return make


def nbytes(shape, dtype, mode: str, variant: str) -> int:
    """Bytes our kernels' passes move (see the module docstring)."""
    e = math.prod(shape) * (torch.finfo(dtype).bits // 8)
    fwd = 2 * e if variant.startswith("eval") else 3 * e
    return fwd if mode == "fwd" else fwd + 5 * e


def peak_memory_mib(step, args, device) -> float:
    """Peak CUDA memory of one step above what its inputs already hold, in MiB."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = step(*args)
    torch.cuda.synchronize(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def record_memory(bench, variant, shape, dtype, eager, ours) -> list:
    """fwd+bwd peak memory of eager, compile and our backends on one case (GPU only)."""
    make = make_args(shape, dtype, bench.device, VARIANTS[variant][2])
    torch.manual_seed(0)
    args = make(True)
    grad_out = torch.randn(shape, device=bench.device, dtype=dtype)
    rows = []
    providers = [("eager", eager, None), ("compile", torch.compile(eager, dynamic=False), None)]
    providers += [(label, ours, backend) for label, backend in bench.our_backends()]
    for label, f, backend in providers:
        if not bench.wants(label, backend) or (backend is not None and _unsupported(backend, args[0])):
            continue
        step = harness.as_step(f, "fwd+bwd")
        with diffusion_fast.use_backend(backend) if backend else contextlib.nullcontext():
            step(args, grad_out)  # warm-up: compile, autotune, allocator
            mib = peak_memory_mib(step, (args, grad_out), bench.device)
        rows.append(dict(variant=variant, shape=list(shape), dtype=harness._dtype_name(dtype), provider=label,
                         peak_mib=mib))
    return rows


def write_memory(bench, rows) -> None:
    data = json.dumps(dict(meta=bench.meta, rows=rows), indent=1)
    (bench.out / "bench_nvae_cell_memory.json").write_text(data + "\n")
    lines = ["# bench_nvae_cell: peak CUDA memory of one fwd+bwd step (MiB above the inputs)", "",
             "| variant | shape | dtype | provider | peak MiB |", "|---|---|---|---|--:|"]
    lines += [f"| {r['variant']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['provider']} "
              f"| {r['peak_mib']:.1f} |" for r in rows]
    (bench.out / "bench_nvae_cell_memory.md").write_text("\n".join(lines) + "\n")


def plain_twin(cell: nn.Module) -> nn.Module:
    """A copy of cell whose BNSwish / DWConvBNSwish are the plain layers they fuse (same parameter order)."""
    twin = copy.deepcopy(cell)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            act = [nn.SiLU()] if getattr(child, "swish", False) else []
            if isinstance(child, DWConvBNSwish):
                setattr(parent, name, nn.Sequential(child.conv, child.bn, *act))
            elif isinstance(child, BNSwish):
                setattr(parent, name, nn.Sequential(child.bn, *act))
    return twin


def cell_flops(cell: nn.Module, x: torch.Tensor) -> int:
    """2 x multiply-adds of the cell's convolutions and linears in one forward."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        total += 2 * output.numel() * module.weight[0].numel()  # (in_channels / groups) x k x k, or in_features

    hooks = [m.register_forward_hook(count) for m in cell.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        cell(x)
    for h in hooks:
        h.remove()
    return total


def cell_case(bench, variant: str, shape, dtype, mode: str):
    """(case, eager, ours) of the whole generative cell: f(x, *parameters) on a twin / on the library's cell."""
    training, channels_last = variant in ("cell_train", "cell_train_cl"), variant.endswith("_cl")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    cell = GenerativeResidualCell(shape[1], shape[1]).to(device=bench.device, dtype=dtype, memory_format=layout)
    cell.train(training)
    twin = plain_twin(cell)
    params = list(cell.parameters())

    def make(requires_grad: bool) -> tuple:
        x = torch.randn(shape, device=bench.device, dtype=dtype).to(memory_format=layout)
        return (x.requires_grad_(requires_grad),) + tuple(p.detach().clone().requires_grad_(requires_grad)
                                                          for p in params)

    def on(model):
        names = [n for n, _ in model.named_parameters()]
        return lambda x, *p: functional_call(model, dict(zip(names, p)), (x,))

    flops = cell_flops(cell, make(False)[0]) * (3 if mode == "fwd+bwd" else 1)
    # the parameters are shared by every input set (weights=): a model's do not rotate, and the eval cell keeps
    # its BN-folded weights while they are unchanged
    case = harness.Case(variant, shape, dtype, mode, make, 0, extra={"expand": 6}, flops=flops, weights=len(params))
    return case, on(twin), on(cell)


def cell_plan(device: str, quick: bool, dtypes) -> list:
    """(variant, cell input shape, dtype) of the whole-cell cases, the middle's shapes divided by 6 in C."""
    shapes = QUICK_SHAPES if quick else CPU_SHAPES if device == "cpu" else GPU_SHAPES[:1]
    variants = ("cell_train", "cell_eval", "cell_train_cl", "cell_eval_cl")
    default = [torch.float32] if device == "cpu" or quick else [torch.bfloat16]
    return [(v, (b, c // 6, h, w), d) for d in dtypes or default for (b, c, h, w) in shapes for v in variants]


def main(argv=None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    bench = harness.Harness("bench_nvae_cell", "dwconv_bn_swish", args)
    memory = []
    for variant, shape, dtype in plan(args.device, args.quick, args.dtypes):
        eager, ours, channels_last = VARIANTS[variant]
        for mode in harness.MODES:
            print(f"{variant} {list(shape)} {dtype} {mode}", flush=True)
            case = harness.Case(
                variant, shape, dtype, mode, make_args(shape, dtype, bench.device, channels_last),
                nbytes(shape, dtype, mode, variant), extra={"kernel_size": K, "eps": EPS, "momentum": MOMENTUM},
            )
            conv_twice = bench.device.type == "cuda" and variant == "train" and dtype != torch.float32
            bench.run(case, eager, ours, _unsupported, others={"cuda+conv_twice": (ours, cuda_conv_twice)}
                      if conv_twice else None)
        if bench.device.type == "cuda" and not variant.startswith("eval"):
            memory += record_memory(bench, variant, shape, dtype, eager, ours)
            write_memory(bench, memory)
    for variant, shape, dtype in cell_plan(args.device, args.quick, args.dtypes):
        for mode in harness.MODES:
            print(f"{variant} {list(shape)} {dtype} {mode}", flush=True)
            case, eager, ours = cell_case(bench, variant, shape, dtype, mode)
            bench.run(case, eager, ours, _unsupported)
    bench.finish()


@contextlib.contextmanager
def cuda_conv_twice():
    """Our CUDA backend with its 16-bit training forward recomputing the conv in the second pass
    (DIFFUSION_FAST_DWCONV_STORE_Z=0, read per call), not reading it back from y, the default."""
    with harness.env_var("DIFFUSION_FAST_DWCONV_STORE_Z", "0"), diffusion_fast.use_backend("cuda"):
        yield


if __name__ == "__main__":
    main()
