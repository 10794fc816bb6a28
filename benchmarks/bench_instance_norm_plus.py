"""Benchmark InstanceNorm++ + activation (NCSNv2's norm-act pair): eager, torch.compile, ours.

    python benchmarks/bench_instance_norm_plus.py --device cpu --out /tmp/bench_out
    python benchmarks/bench_instance_norm_plus.py --quick              # smoke run, tiny shapes

Variants, each against the official module's formula (``InstanceNorm2dPlus.forward``):
    elu    elu(InstanceNorm++(x))     NCSNv2: ours is one group_norm_silu(shift=γαμ̂) call + F.elu
    swish  silu(InstanceNorm++(x))    ours fuses the SiLU into that call

Bytes a fused kernel must move (E = N*C*H*W elements of s bytes; P = 3*C params):
    fwd      read x, write y: 2*E*s + P. Ours reads x once more for the channel means μ
             (3*E*s) and, for elu, reads and writes y again.
    fwd+bwd  forward as above plus the group stats; backward reads dy and x, writes dx,
             and the μ̂ path's gradient: 5*E*s + 3*P + 4*N*C*4.
FLOPs ~10-15 per element: bandwidth-bound, as group_norm_silu.
"""

from __future__ import annotations

import math

import harness  # first: puts the repo root on sys.path when diffusion_fast is not installed
import torch
import torch.nn.functional as F

from diffusion_fast.nn.instance_norm_plus import instance_norm_plus
from diffusion_fast.ops.group_norm_silu import _unsupported

EPS = 1e-5

# (N, C, H, W): NCSNv2 CIFAR-10 activations (ngf 128: 128 at 32x32, 256 at 16x16), batch 1 and 128.
CPU_SHAPES = [(1, 128, 32, 32), (16, 128, 32, 32), (16, 256, 16, 16)]
GPU_SHAPES = [(1, 128, 32, 32), (128, 128, 32, 32), (128, 256, 16, 16)]
QUICK_SHAPES = [(2, 16, 8, 8)]


def official(x, alpha, gamma, beta):
    means = x.mean(dim=(2, 3))
    mu_hat = (means - means.mean(-1, keepdim=True)) / torch.sqrt(means.var(-1, keepdim=True) + EPS)
    h = F.instance_norm(x, eps=EPS) + mu_hat[..., None, None] * alpha[..., None, None]
    return gamma.view(1, -1, 1, 1) * h + beta.view(1, -1, 1, 1)


VARIANTS = {  # variant -> (eager, ours)
    "elu": (lambda *a: F.elu(official(*a)), lambda *a: F.elu(instance_norm_plus(*a, EPS))),
    "swish": (lambda *a: F.silu(official(*a)), lambda *a: instance_norm_plus(*a, EPS, silu=True)),
}


def make_args(shape, dtype, device):
    def make(requires_grad: bool) -> tuple:
        c = shape[1]
        x = torch.randn(shape, device=device, dtype=dtype) + torch.randn(shape[:2] + (1, 1), device=device, dtype=dtype)
        alpha, gamma = (1 + 0.02 * torch.randn(c, device=device, dtype=dtype) for _ in range(2))
        beta = 0.1 * torch.randn(c, device=device, dtype=dtype)
        return tuple(t.requires_grad_(requires_grad) for t in (x, alpha, gamma, beta))

    return make


def nbytes(shape, dtype, mode: str) -> int:
    n, c = shape[:2]
    s = torch.finfo(dtype).bits // 8
    elems, params = math.prod(shape), 3 * shape[1] * s
    if mode == "fwd":
        return 2 * elems * s + params
    return 5 * elems * s + 3 * params + 4 * n * c * 4


def main(argv=None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    bench = harness.Harness("bench_instance_norm_plus", "instance_norm_plus", args)
    shapes = QUICK_SHAPES if args.quick else CPU_SHAPES if args.device == "cpu" else GPU_SHAPES
    for variant in VARIANTS:
        for shape in shapes:
            for dtype in args.dtypes or [torch.float32]:
                eager, ours = VARIANTS[variant]
                for mode in harness.MODES:
                    print(f"{variant} {list(shape)} {dtype} {mode}", flush=True)
                    case = harness.Case(variant, shape, dtype, mode, make_args(shape, dtype, bench.device),
                                        nbytes(shape, dtype, mode), extra={"eps": EPS})
                    bench.run(case, eager, ours, _unsupported)
    bench.finish()


if __name__ == "__main__":
    main()
