"""``diffusion-fast sample``: draw samples from a shipped model or a checkpoint with its family's
sampler, sharded over torchrun ranks, and write them as a PNG (an image grid, or for point models
a scatter plot beside the data) and optionally an ``.npz``; ``--compare`` reruns on eager PyTorch."""

from __future__ import annotations

import time
import warnings

import torch

import diffusion_fast
from diffusion_fast import distributed, zoo
from diffusion_fast.cli import DTYPES, UsageError, _progress

__all__ = ["cmd_sample", "sample_images", "sample_points"]

PLOTTED_DATA = 2000  # data points drawn beside the samples in a scatter plot


def _check_sampler(kind: str, sampler: str) -> None:
    if sampler not in zoo.SAMPLERS[kind]:
        raise UsageError(f"--sampler {sampler} does not apply to a {kind} model: use one of {zoo.SAMPLERS[kind]}")


def sample_images(model, ckpt: dict, n: int, *, sampler: str, steps: int, eta: float, seed: int,
                  device: torch.device, dtype: torch.dtype, progress: bool, cuda_graph: bool = False) -> torch.Tensor:
    """n samples (n, C, H, W) in [-1, 1] from a checkpoint's network: DDPM (ancestral or DDIM) or a
    score model (annealed Langevin dynamics from uniform noise, NCSN Algorithm 1). ``cuda_graph``: the
    sampler replays the network from a CUDA graph (``sample_ddpm``)."""
    from diffusion_fast.diffusion.schedules import linear_betas
    from diffusion_fast.samplers import annealed_langevin_dynamics, sample_ddim, sample_ddpm

    kind = ckpt.get("kind", "ddpm")
    _check_sampler(kind, sampler)
    if kind in zoo.POINT_KINDS:
        raise UsageError(f"a {kind} model samples points, not images")
    if kind == "ncsnv2":
        generator = torch.Generator().manual_seed(seed)
        x = torch.rand(n, *ckpt["data"]["shape"], generator=generator).mul(2).sub(1).to(device=device, dtype=dtype)
        with torch.inference_mode():
            x = annealed_langevin_dynamics(model, x, model.sigmas, seed=seed, cuda_graph=cuda_graph,
                                           **ckpt["schedule"])
        return x.float().clamp(-1, 1)
    betas = linear_betas(**ckpt["schedule"])
    shape = (n, *ckpt["data"]["shape"])
    total = betas.numel() if sampler == "ddpm" else steps
    bar = _progress(total, progress, f"{sampler} steps")
    tick = (lambda _: bar.update(1)) if bar is not None else None
    try:  # the bar closes also when sampling raises (a failed CUDA-graph capture that the CLI retries op by op)
        with torch.inference_mode():
            if sampler == "ddpm":
                x = sample_ddpm(model, shape, betas=betas, seed=seed, device=device, dtype=dtype, progress=tick,
                                cuda_graph=cuda_graph)
            else:
                if steps > betas.numel():
                    raise UsageError(f"--steps must be at most {betas.numel()}, got {steps}")
                x = sample_ddim(model, shape, num_steps=steps, eta=eta,
                                alphas_cumprod=torch.cumprod(1 - betas, 0), seed=seed, device=device, dtype=dtype,
                                progress=tick, cuda_graph=cuda_graph)
    finally:
        if bar is not None:
            bar.close()
    return x.float()


def sample_points(model, ckpt: dict, n: int, *, sampler: str = "ancestral", seed: int, device: torch.device,
                  dtype: torch.dtype, **image_options) -> torch.Tensor:
    """n points (n, D), float32, in the data's coordinates, from a dpm2015 checkpoint's process:
    its learned reverse process (``DiffusionProcess2015.sample``: x^T ~ N(0, I), Gaussian steps
    with Philox noise from (seed, t)), then undoing the training data's standardisation.
    ``image_options`` (steps, eta, progress of ``sample_images``) do not apply and are ignored."""
    kind = ckpt.get("kind")
    _check_sampler(kind, sampler)
    if kind not in zoo.POINT_KINDS:
        raise UsageError(f"a {kind} model samples images, not points")
    x = model.sample(n, seed=seed, device=device, dtype=dtype).float()
    data = ckpt["data"]
    return x * torch.tensor(data["std"], device=x.device) + torch.tensor(data["mean"], device=x.device)


def reference_points(ckpt: dict) -> torch.Tensor | None:
    """Up to ``PLOTTED_DATA`` points of the checkpoint's named data set, for the scatter plot
    (None when the set is not built in or its loader is not installed)."""
    from diffusion_fast.data import DATASETS, load_dataset

    if ckpt["data"].get("name") not in DATASETS:
        return None
    try:
        return load_dataset(ckpt["data"]["name"])[:PLOTTED_DATA]
    except ImportError:
        return None


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out, time.perf_counter() - start


def _sample_with_fallback(sample, ours: dict, run: dict, forced: bool) -> tuple:
    """(sample(ours), ours), or where ours asks for a CUDA graph only by default (not ``forced``) and its
    capture fails (a network that syncs with the host or branches on values), a warning and (sample(run), run)."""
    try:
        return sample(ours), ours
    except RuntimeError as exc:
        if not ours.get("cuda_graph") or forced:
            raise
        warnings.warn(f"sample: CUDA-graph capture failed ({type(exc).__name__}: {str(exc)[:200]}); sampling op by "
                      "op instead (--no-cuda-graph skips the attempt)", RuntimeWarning, stacklevel=3)
        return sample(run), run


def cmd_sample(args) -> int:
    ctx = distributed.setup(args.device)
    dtype = DTYPES[args.dtype]
    if dtype == torch.float16 and ctx.device.type == "cpu":
        raise UsageError("--dtype fp16 needs a CUDA device; use fp32 or bf16 on a CPU")
    model, ckpt = zoo.load_model(args.model)
    points = ckpt["kind"] in zoo.POINT_KINDS
    draw, unit = (sample_points, "points") if points else (sample_images, "images")
    args.sampler = args.sampler or zoo.SAMPLERS[ckpt["kind"]][-1]
    model = model.to(device=ctx.device, dtype=dtype)
    n_local = distributed.shard_sizes(args.num_images, ctx.world_size)[ctx.rank]
    seed = distributed.rank_seed(args.seed, ctx.rank)
    run = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, seed=seed, device=ctx.device, dtype=dtype)
    # CUDA graphs (default on CUDA devices) for the image samplers: at batch 1 on an H100 they made DDIM
    # sampling 15.6x eager instead of 1.8x (benchmarks/results/h100-2026-11-27c); the eager comparison runs plain
    graph = ctx.device.type == "cuda" if args.cuda_graph is None else args.cuda_graph
    if graph and ctx.device.type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device, got {ctx.device}")
    ours = dict(run, cuda_graph=graph) if draw is sample_images else run
    show = ctx.is_main and not args.no_progress

    def sample(kwargs):
        with diffusion_fast.use_backend(args.backend):
            return _timed(lambda: draw(model, ckpt, n_local, progress=show, **kwargs) if n_local else
                          torch.empty(0, *ckpt["data"]["shape"], device=ctx.device))

    (x, seconds), ours = _sample_with_fallback(sample, ours, run, forced=bool(args.cuda_graph))
    samples = distributed.gather(ctx, x)
    if not ctx.is_main:
        return 0
    import numpy as np

    from diffusion_fast.images import save_grid, save_scatter, to_uint8

    if points:
        save_scatter(samples, args.out, data=reference_points(ckpt), title=f"{args.sampler} samples")
        stored = samples.numpy().astype(np.float32)  # (N, D) in the data's coordinates
    else:
        save_grid(samples, args.out, scale=max(1, 64 // samples.shape[-1]))
        stored = to_uint8(samples).permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8
    if args.npz:
        np.savez_compressed(args.npz, samples=stored)
    rate = n_local / seconds
    where = f"{ctx.device}" + (f" x {ctx.world_size} ranks" if ctx.world_size > 1 else "")
    graphed = ", CUDA graph" if ours.get("cuda_graph") else ""
    print(f"wrote {samples.shape[0]} samples to {args.out} ({args.sampler}, backend {args.backend}{graphed}, {where}): "
          f"{seconds:.2f} s, {rate:.1f} {unit}/s per rank")
    if args.compare or (args.compare is None and args.model in zoo.PRETRAINED):
        with diffusion_fast.use_backend("torch"):
            ref, ref_seconds = _timed(lambda: draw(model, ckpt, n_local, progress=show, **run))
        diff = (ref.cpu() - x.cpu()).abs().max().item()
        print(f"eager PyTorch: {ref_seconds:.2f} s, {n_local / ref_seconds:.1f} {unit}/s -> "
              f"speed-up {ref_seconds / seconds:.2f}x (max |difference| {diff:.1e})")
    return 0
