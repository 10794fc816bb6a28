"""Benchmark of the fused Langevin step (``diffusion_fast.langevin_step``) against its eager formula.

    python benchmarks/bench_langevin.py                      # GPU (or CPU without one)
    python benchmarks/bench_langevin.py --device cpu --out /tmp/bench_out
    python benchmarks/bench_langevin.py --quick              # smoke run, tiny shapes

Variants, each against its own eager formula (step size a = 6.2e-6 * (sigma_i / sigma_L)^2, NCSNv2's
CIFAR-10 setting at the level sigma_i = 1):
    langevin        x + a * score + sqrt(2a) * randn_like(x), a a Python float (the cheapest eager
                    form); ours: Philox noise made in the kernel
    langevin_table  the same with a read from a 0-d device tensor (the sampler's form: no host sync)
    langevin_noise  a given noise tensor on both sides (fusion alone, no RNG)
    denoise         x + a * score (add_noise=False: NCSN's final denoising step)
    anneal          the whole annealed Langevin sampler (NCSN Algorithm 1 with NCSNv2's final
                    denoising step) on a small NCSNv2 (ngf 32, L = 10 levels from sigma 50 to 0.01,
                    2 steps per level, where NCSNv2's CIFAR-10 setting takes 5: this bounds
                    torch.compile's unrolled trace; 32x32 RGB, batch 8 on a CPU, 128 on a GPU).
                    eager: the model on the plain-PyTorch backend and the eager update with
                    host-side step sizes; compile: torch.compile of that whole loop; ours:
                    ``annealed_langevin_dynamics`` with the model on our backend (fused steps,
                    device tables, no host sync). Bytes count the steps' x and score reads and x
                    writes only (GB/s means little here); FLOPs are not counted.

"max abs diff" compares different noise streams (torch.randn vs Philox) in ``langevin`` and
``langevin_table``; the other variants compare like for like.

Bytes a fused kernel must move (E elements of s bytes): read x and score, write x': 3*E*s;
langevin_noise also reads the noise: 4*E*s. FLOPs: ~4 per element for the update; the in-kernel
noise adds one Philox4x32-10 per 4 elements (~40 integer ops per element) and one Box-Muller pair
per 2 (log, sqrt, sin, cos): ~60-80 ops per element, so on a GPU the floor stays bytes /
bandwidth, while on a CPU the RNG is the larger share.
"""

from __future__ import annotations

import copy
import math

import harness  # first: puts the repo root on sys.path when diffusion_fast is not installed
import torch

import diffusion_fast
from diffusion_fast.models import NCSNv2
from diffusion_fast.ops.langevin_step import _unsupported
from diffusion_fast.samplers import annealed_langevin_dynamics

SEED, STEP = 1234, 500
STEP_SIZE = 6.2e-6 * (1.0 / 0.01) ** 2  # alpha_i at sigma_i = 1, sigma_L = 0.01
ANNEAL_STEP_LR = 6.2e-6  # NCSNv2's CIFAR-10 epsilon

# (B, C, H, W): one image and a sampling batch, at CIFAR-10 and 256x256 resolution.
SHAPES = [(b, 3, h, h) for h in (32, 256) for b in (1, 128)]
QUICK_SHAPES = [(2, 3, 8, 8)]


def _variants(device: torch.device) -> dict:
    """variant -> (eager, ours, number of tensor inputs (x, score[, noise]))."""
    a = STEP_SIZE
    scale = math.sqrt(2.0 * a)
    a_table = torch.tensor([0.5, a], device=device)[1]  # a 0-d view into a device table

    def eager(x, score):
        return x + a * score + scale * torch.randn_like(x)

    def eager_table(x, score):
        return x + a_table * score + torch.sqrt(2.0 * a_table) * torch.randn_like(x)

    def eager_noise(x, score, noise):
        return x + a * score + scale * noise

    def eager_denoise(x, score):
        return x + a * score

    step = diffusion_fast.langevin_step
    return {
        "langevin": (eager, lambda x, score: step(x, score, a, seed=SEED, step=STEP), 2),
        "langevin_table": (eager_table, lambda x, score: step(x, score, a_table, seed=SEED, step=STEP), 2),
        "langevin_noise": (eager_noise, lambda x, score, noise: step(x, score, a, noise=noise), 3),
        "denoise": (eager_denoise, lambda x, score: step(x, score, a, add_noise=False), 2),
    }


def plan(device: str, quick: bool, dtypes, variants) -> list:
    """(variant, shape, dtype) to run (harness.variant_plan): langevin on SHAPES, the others on fewer."""
    side_shapes = [(128, 3, 32, 32)] if device == "cpu" else [(1, 3, 32, 32), (128, 3, 256, 256)]
    return harness.variant_plan(device, quick, dtypes, variants, "langevin", SHAPES, side_shapes, QUICK_SHAPES)


def anneal_loops(model: NCSNv2, steps: int) -> tuple:
    """(eager, ours) annealed Langevin samplers over ``model``'s noise levels, from a given x_0."""
    eager_model = copy.deepcopy(model)
    eager_model.backend = "torch"
    dtype = model.sigmas.dtype
    sigmas = model.sigmas.double().cpu().tolist()
    alphas = [ANNEAL_STEP_LR * (s / sigmas[-1]) ** 2 for s in sigmas]  # NCSN: alpha_i = eps sigma_i^2 / sigma_L^2

    @torch.no_grad()
    def eager(x):
        x = x.to(dtype)
        labels = [torch.full((x.shape[0],), i, device=x.device) for i in range(len(sigmas))]
        for label, a in zip(labels, alphas):
            for _ in range(steps):
                x = x + a * eager_model(x, label) + math.sqrt(2 * a) * torch.randn_like(x)
        return x + sigmas[-1] ** 2 * eager_model(x, labels[-1])

    def ours(x):
        return annealed_langevin_dynamics(model, x.to(dtype), model.sigmas, n_steps_each=steps,
                                          step_lr=ANNEAL_STEP_LR, seed=SEED)

    return eager, ours


def run_anneal(bench: harness.Harness, quick: bool, dtypes) -> None:
    """The ``anneal`` variant (module doc): one case per dtype."""
    cpu = bench.device.type == "cpu"
    batch, steps, levels = (2, 1, 2) if quick else (8 if cpu else 128, 2, 10)
    for dtype in dtypes or ([torch.float32] if cpu else [torch.float32, torch.bfloat16]):
        shape = (batch, 3, 32, 32)
        print(f"anneal {list(shape)} {dtype}", flush=True)
        torch.manual_seed(0)
        model = NCSNv2(ngf=8 if quick else 32, num_classes=levels, sigma_begin=50.0, sigma_end=0.01)
        model = model.to(device=bench.device, dtype=dtype).eval()
        eager, ours = anneal_loops(model, steps)
        forwards = levels * steps + 1
        nbytes = forwards * 3 * math.prod(shape) * (torch.finfo(dtype).bits // 8)
        case = harness.Case("anneal", shape, dtype, "fwd", harness.randn_args(shape, dtype, bench.device, 1), nbytes,
                            extra=dict(levels=levels, n_steps_each=steps, step_lr=ANNEAL_STEP_LR,
                                       ngf=model.config["ngf"], model_forwards=forwards))
        bench.run(case, eager, ours, _unsupported)


def main(argv=None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    bench = harness.Harness("bench_langevin", "langevin_step", args)
    variants = _variants(bench.device)
    harness.run_elementwise(bench, variants, plan(args.device, args.quick, args.dtypes, variants), _unsupported,
                            extra={"step_size": STEP_SIZE})
    run_anneal(bench, args.quick, args.dtypes)
    bench.finish()


if __name__ == "__main__":
    main()
