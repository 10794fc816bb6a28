"""Benchmark ddpm_step / ddim_step: eager PyTorch, torch.compile, diffusers and our backends.

    python benchmarks/bench_sampler_step.py --device cpu --out /tmp/bench_out
    python benchmarks/bench_sampler_step.py --quick              # smoke run, tiny shapes

Variants, each against its own eager formula (DDPM linear schedule, T = 1000, t = 500; the
eager formulas take the step's coefficients as Python floats, the cheapest eager form):
    ddpm            x0 = clamp(a x - b eps); x' = c1 x0 + c2 x + sigma * randn_like(x)
                    (ours: Philox noise made in the kernel)
    ddpm_noise      the same with a given noise tensor on both sides (fusion alone, no RNG)
    ddim_eta0       deterministic DDIM: x' = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps
    ddpm_diffusers  eager = diffusers' DDPMScheduler.step (fixed_small, clip) with a generator;
                    only when diffusers is importable

"max abs diff" compares different noise streams (torch.randn vs Philox) in ``ddpm`` and
``ddpm_diffusers``; the other variants compare like for like.

Bytes a fused kernel must move (E elements of s bytes): read x and eps, write x': 3*E*s;
ddpm_noise also reads the noise: 4*E*s. FLOPs: ~10 per element for the step; the in-kernel
noise adds one Philox4x32-10 per 4 elements (~40 integer ops per element) and one Box-Muller
pair per 2 (log, sqrt, sin, cos): ~60-80 ops per element, so on a GPU (a few hundred ops per
byte) the floor stays bytes / bandwidth, while on a CPU the RNG is the larger share.
"""

from __future__ import annotations

import harness  # first: puts the repo root on sys.path when diffusion_fast is not installed
import torch

import diffusion_fast
from diffusion_fast.ops.sampler_steps import _unsupported

T, STEP, SEED = 1000, 500, 1234
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
DDIM_TIMESTEPS = list(range(980, -1, -20))  # 50 steps
DDIM_INDEX = 25

# (B, C, H, W): CIFAR-10 and 256x256 samples; B = 1 is one image, 64 and 256 sampling batches.
GPU_SHAPES = [(b, 3, h, h) for h in (32, 256) for b in (1, 64, 256)]
CPU_SHAPES = [(1, 3, 32, 32), (64, 3, 32, 32), (256, 3, 32, 32), (1, 3, 256, 256)]
QUICK_SHAPES = [(2, 3, 8, 8)]


def _variants(device: torch.device) -> dict:
    """variant -> (eager, ours, number of tensor inputs (x, eps[, noise]))."""
    ddpm = diffusion_fast.ddpm_coefficients(BETAS.to(device), "fixedsmall")
    a, b, c1, c2, _, sigma = ddpm[STEP].tolist()
    ddim = diffusion_fast.ddim_coefficients(BETAS.to(device).mul(-1).add(1).cumprod(0), DDIM_TIMESTEPS, 0.0)
    da, db, dc1, _, dc3, _ = ddim[DDIM_INDEX].tolist()

    def eager_ddpm(x, eps):
        x0 = (a * x - b * eps).clamp(-1.0, 1.0)
        return c1 * x0 + c2 * x + sigma * torch.randn_like(x)

    def eager_ddpm_noise(x, eps, noise):
        x0 = (a * x - b * eps).clamp(-1.0, 1.0)
        return c1 * x0 + c2 * x + sigma * noise

    def eager_ddim(x, eps):
        x0 = (da * x - db * eps).clamp(-1.0, 1.0)
        return dc1 * x0 + dc3 * eps

    variants = {
        "ddpm": (eager_ddpm, lambda x, eps: diffusion_fast.ddpm_step(x, eps, ddpm, STEP, seed=SEED), 2),
        "ddpm_noise": (eager_ddpm_noise,
                       lambda x, eps, noise: diffusion_fast.ddpm_step(x, eps, ddpm, STEP, noise=noise), 3),
        "ddim_eta0": (eager_ddim, lambda x, eps: diffusion_fast.ddim_step(x, eps, ddim, DDIM_INDEX), 2),
    }
    try:
        import diffusers
    except ImportError:
        return variants
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, variance_type="fixed_small", clip_sample=True)
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    generator = torch.Generator(device).manual_seed(SEED)

    def diffusers_ddpm(x, eps):
        return sched.step(eps, STEP, x, generator=generator).prev_sample

    variants["ddpm_diffusers"] = (diffusers_ddpm, variants["ddpm"][1], 2)
    return variants


def plan(device: str, quick: bool, dtypes, variants) -> list:
    """(variant, shape, dtype) to run (harness.variant_plan): ddpm on every shape, the others on fewer."""
    shapes = CPU_SHAPES if device == "cpu" else GPU_SHAPES
    side_shapes = [(64, 3, 32, 32)] if device == "cpu" else [(1, 3, 32, 32), (256, 3, 256, 256)]
    return harness.variant_plan(device, quick, dtypes, variants, "ddpm", shapes, side_shapes, QUICK_SHAPES)


def main(argv=None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    bench = harness.Harness("bench_sampler_step", "ddpm_step/ddim_step", args)
    variants = _variants(bench.device)
    harness.run_elementwise(bench, variants, plan(args.device, args.quick, args.dtypes, variants), _unsupported,
                            extra={"t": STEP, "T": T})
    bench.finish()


if __name__ == "__main__":
    main()
