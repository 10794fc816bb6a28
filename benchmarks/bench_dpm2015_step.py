"""Benchmark of the fused 2015 reverse step (``diffusion_fast.dpm2015_step``) against its eager formula.

    python benchmarks/bench_dpm2015_step.py                      # GPU (or CPU without one)
    python benchmarks/bench_dpm2015_step.py --device cpu --out /tmp/bench_out
    python benchmarks/bench_dpm2015_step.py --quick              # smoke run, tiny shapes

Sohl-Dickstein et al. 2015's reverse step on N points of D = 2 (the swiss roll), beta = 0.07:
    dpm2015        sqrt(1-b) x + sqrt(b) z_mu + sqrt(sigmoid(z_sigma + logit b)) * randn_like(x), b a
                   Python float (the cheapest eager form); ours: Philox noise made in the kernel
    dpm2015_table  the same with b read from a 0-d device tensor (the sampler's form: no host sync)
    mean           sqrt(1-b) x + sqrt(b) z_mu (add_noise=False)

"max abs diff" compares different noise streams (torch.randn vs Philox) in the first two; ``mean``
compares like for like.

Bytes a fused kernel must move (E elements of s bytes): read x, z_mu, z_sigma, write x': 4*E*s;
mean reads no z_sigma: 3*E*s. FLOPs: ~10 per element plus one exp and one sqrt for the variance;
the in-kernel noise adds one Philox4x32-10 per 4 elements (~40 integer ops per element) and one
Box-Muller pair per 2 (log, sqrt, sin, cos), so on a GPU the floor stays bytes / bandwidth, while
on a CPU the RNG is the larger share.
"""

from __future__ import annotations

import math

import harness  # first: puts the repo root on sys.path when diffusion_fast is not installed
import torch

import diffusion_fast
from diffusion_fast.ops.dpm2015_step import _unsupported

SEED, STEP = 1234, 20
BETA = 0.07
DIM = 2

SHAPES = [(10_000, DIM), (1_000_000, DIM)]
QUICK_SHAPES = [(64, DIM)]


def _variants(device: torch.device) -> dict:
    """variant -> (eager, ours, number of tensor inputs (x, z_mu, z_sigma))."""
    keep, root, logit = math.sqrt(1.0 - BETA), math.sqrt(BETA), math.log(BETA / (1.0 - BETA))
    b_table = torch.tensor([0.5, BETA], device=device)[1]  # a 0-d view into a device table

    def eager(x, z_mu, z_sigma):
        return keep * x + root * z_mu + torch.sigmoid(z_sigma + logit).sqrt() * torch.randn_like(x)

    def eager_table(x, z_mu, z_sigma):
        mean = (1.0 - b_table).sqrt() * x + b_table.sqrt() * z_mu
        return mean + torch.sigmoid(z_sigma + torch.logit(b_table)).sqrt() * torch.randn_like(x)

    def eager_mean(x, z_mu, z_sigma):
        return keep * x + root * z_mu

    step = diffusion_fast.dpm2015_step
    return {
        "dpm2015": (eager, lambda x, m, s: step(x, m, s, BETA, seed=SEED, step=STEP), 4),
        "dpm2015_table": (eager_table, lambda x, m, s: step(x, m, s, b_table, seed=SEED, step=STEP), 4),
        "mean": (eager_mean, lambda x, m, s: step(x, m, s, BETA, add_noise=False), 3),
    }


def plan(device: str, quick: bool, dtypes, variants) -> list:
    """(variant, shape, dtype) to run (harness.variant_plan): every variant on SHAPES."""
    return harness.variant_plan(device, quick, dtypes, variants, "dpm2015", SHAPES, SHAPES, QUICK_SHAPES)


def make_args(shape, dtype, device):
    def make(requires_grad: bool) -> tuple:
        return tuple(torch.randn(shape, device=device, dtype=dtype) for _ in range(3))

    return make


def main(argv=None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    bench = harness.Harness("bench_dpm2015_step", "dpm2015_step", args)
    variants = _variants(bench.device)
    for variant, shape, dtype in plan(args.device, args.quick, args.dtypes, variants):
        eager, ours, n_tensors = variants[variant]
        print(f"{variant} {list(shape)} {dtype}", flush=True)
        s = torch.finfo(dtype).bits // 8
        case = harness.Case(variant, shape, dtype, "fwd", make_args(shape, dtype, bench.device),
                            n_tensors * math.prod(shape) * s, extra={"beta": BETA})
        bench.run(case, eager, ours, _unsupported)
    bench.finish()


if __name__ == "__main__":
    main()
