"""Benchmark group_norm_silu: eager PyTorch, torch.compile and our backends, fwd and fwd+bwd.

    python benchmarks/bench_group_norm_silu.py --device cpu --out /tmp/bench_out
    python benchmarks/bench_group_norm_silu.py --quick              # smoke run, tiny shapes

Variants, each against its own eager formula (G = 32 groups, as in DDPM):
    plain        silu(group_norm(x))
    plain_cl     the same on channels_last x (as the UNet runs when its convolutions do); on a GPU
                 also provider cuda+groupwise, our CUDA forward with one group per block
                 (DIFFUSION_FAST_GNS_CL_SLABS=0), beside the default over slabs of whole groups
    temb         silu(group_norm(x + temb))                  DDPM res block, second norm
    scale_shift  silu(group_norm(x) * (1 + scale) + shift)   ADM use_scale_shift_norm

Bytes a fused kernel must move (E = N*C*H*W elements of s bytes; P = bytes of weight, bias
and the (N, C) extras; stats = mean and rstd, N*G fp32 each):
    fwd      read x, write y: 2*E*s + P.
    fwd+bwd  forward: read x, write y and stats; backward: read dy, x (z is recomputed from x
             and stats) and stats, write dx; params read twice, their grads written once:
             5*E*s + 3*P + 2 * 2*N*G*4. A backward that takes two passes over a group (sums,
             then dx) reads x and dy twice (7*E*s), and eager also stores and re-reads the
             group_norm output for silu's backward, so GB/s here is effective bandwidth.
FLOPs: ~10 per element forward (stats 3, normalize + affine 3, silu ~4 with exp) and ~20
backward, i.e. ~1 FLOP/byte in fp32: far below any GPU's or CPU's FLOP:byte ratio, so the
floor is bytes / bandwidth and "% copy BW" is the figure of merit; for tensors of a few MiB,
where launch and tail costs keep even copy_ far from that bandwidth, "% same-bytes copy" (a copy_
moving the case's bytes, timed the same way) says how far from that size's floor we are.
"""

from __future__ import annotations

import contextlib
import math

import harness  # first: puts the repo root on sys.path when diffusion_fast is not installed
import torch
import torch.nn.functional as F

import diffusion_fast
from diffusion_fast.ops.group_norm_silu import _unsupported

GROUPS, EPS = 32, 1e-5

# (N, C, H, W): DDPM UNet activations (CIFAR-10 32x32 and LSUN/CelebA-HQ 64x64 levels);
# N = 1 is one sampling step, 32 and 128 are training batches.
CPU_SHAPES = [(1, 512, 8, 8), (8, 128, 32, 32), (16, 256, 16, 16), (32, 128, 32, 32)]
# Small maps, where per-group and per-call costs dominate: DDPM CIFAR-10's 4x4 level, the digits demo's 2x2.
CPU_SMALL_SHAPES = [(64, 64, 4, 4), (8, 128, 8, 8), (1, 256, 4, 4), (32, 512, 2, 2)]
GPU_SHAPES = [
    (1, 128, 64, 64), (1, 256, 32, 32), (1, 512, 8, 8),
    (32, 128, 64, 64), (32, 256, 32, 32), (32, 512, 16, 16),
    (128, 128, 32, 32), (128, 256, 16, 16), (128, 512, 8, 8),
]
GPU_SUBSET = [(1, 512, 8, 8), (32, 256, 32, 32), (128, 128, 32, 32)]  # run in every dtype
QUICK_SHAPES = [(2, 64, 8, 8)]
VARIANT_SHAPE = {"cpu": (8, 128, 32, 32), "cuda": (32, 256, 32, 32)}


def gn_silu(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b, EPS))


def gn_silu_temb(x, w, b, temb):
    return F.silu(F.group_norm(x + temb[:, :, None, None], GROUPS, w, b, EPS))


def gn_silu_scale_shift(x, w, b, scale, shift):
    return F.silu(F.group_norm(x, GROUPS, w, b, EPS) * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def ours_plain(x, w, b):
    return diffusion_fast.group_norm_silu(x, GROUPS, w, b, EPS)


def ours_temb(x, w, b, temb):
    return diffusion_fast.group_norm_silu(x, GROUPS, w, b, EPS, pre_bias=temb)


def ours_scale_shift(x, w, b, scale, shift):
    return diffusion_fast.group_norm_silu(x, GROUPS, w, b, EPS, scale=scale, shift=shift)


# variant -> (eager formula, ours, number of (N, C) extra inputs)
VARIANTS = {
    "plain": (gn_silu, ours_plain, 0),
    "plain_cl": (gn_silu, ours_plain, 0),
    "temb": (gn_silu_temb, ours_temb, 1),
    "scale_shift": (gn_silu_scale_shift, ours_scale_shift, 2),
}


def plan(device: str, quick: bool, dtypes) -> list:
    """(variant, shape, dtype) to run, the most telling first (a --budget-s may cut the tail)."""
    fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16

    def rows(variant, shapes, dts):
        return [(variant, s, d) for d in dts for s in shapes]

    def variants(shape, dts):
        return [(v, shape, d) for v in ("temb", "scale_shift") for d in dts]

    if quick:
        dts = dtypes or [fp32]
        return rows("plain", QUICK_SHAPES, dts) + variants(QUICK_SHAPES[0], dts[:1])
    if device == "cpu":
        dts = dtypes or [fp32]
        return (rows("plain", CPU_SHAPES + CPU_SMALL_SHAPES, dts) + variants(VARIANT_SHAPE["cpu"], dts)
                + rows("plain_cl", CPU_SHAPES, dts))
    # GPU: the subset in the lead dtype, NCHW then channels_last; the other dtypes; the variants; the other shapes
    lead, others = (dtypes[:1], dtypes[1:]) if dtypes else ([bf16], [fp16, fp32])
    return (rows("plain", GPU_SUBSET, lead) + rows("plain_cl", GPU_SUBSET, lead) + rows("plain", GPU_SUBSET, others)
            + variants(VARIANT_SHAPE["cuda"], dtypes or [bf16, fp32])
            + rows("plain", [s for s in GPU_SHAPES if s not in GPU_SUBSET], dtypes or [bf16]))


def make_args(shape, dtype, device, n_extra, channels_last=False):
    """requires_grad -> (x, weight, bias, *extras) with DDPM-like statistics."""

    def make(requires_grad: bool) -> tuple:
        n, c = shape[:2]
        x = torch.randn(shape, device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w = 1 + 0.1 * torch.randn(c, device=device, dtype=dtype)
        b = 0.1 * torch.randn(c, device=device, dtype=dtype)
        extras = [0.1 * torch.randn(n, c, device=device, dtype=dtype) for _ in range(n_extra)]
        return tuple(t.requires_grad_(requires_grad) for t in (x, w, b, *extras))

    return make


def nbytes(shape, dtype, mode: str, n_extra: int) -> int:
    """Bytes a fused kernel must move (see the module docstring for the count)."""
    n, c = shape[:2]
    s = torch.finfo(dtype).bits // 8
    elems = math.prod(shape)
    params = (2 * c + n_extra * n * c) * s
    if mode == "fwd":
        return 2 * elems * s + params
    stats = 2 * n * GROUPS * 4
    return 5 * elems * s + 3 * params + 2 * stats


def main(argv=None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    bench = harness.Harness("bench_group_norm_silu", "group_norm_silu", args)
    for variant, shape, dtype in plan(args.device, args.quick, args.dtypes):
        eager, ours, n_extra = VARIANTS[variant]
        for mode in harness.MODES:
            print(f"{variant} {list(shape)} {dtype} {mode}", flush=True)
            case = harness.Case(
                variant, shape, dtype, mode, make_args(shape, dtype, bench.device, n_extra, variant.endswith("_cl")),
                nbytes(shape, dtype, mode, n_extra), extra={"num_groups": GROUPS, "eps": EPS},
            )
            gpu_cl = variant.endswith("_cl") and args.device == "cuda"
            others = {"cuda+groupwise": (ours, cl_groupwise)} if gpu_cl else None
            bench.run(case, eager, ours, _unsupported, others=others)
    bench.finish()


@contextlib.contextmanager
def cl_groupwise():
    """Our CUDA backend with its channels-last one-group-per-block forward (DIFFUSION_FAST_GNS_CL_SLABS=0, read
    per call), not the default over slabs of groups."""
    with harness.env_var("DIFFUSION_FAST_GNS_CL_SLABS", "0"), diffusion_fast.use_backend("cuda"):
        yield

if __name__ == "__main__":
    main()
