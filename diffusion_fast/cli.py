"""The ``diffusion-fast`` command (also ``python -m diffusion_fast``): sample, train, bench, info.

    diffusion-fast sample                        # the shipped digits DDPM -> samples.png, with speed-up
    diffusion-fast sample --model ckpt.pt -n 16 --sampler ddim --steps 50 --eta 0 --compare
    diffusion-fast train --model ddpm-digits --steps 4000 --out digits.pt
    diffusion-fast bench --quick                 # benchmark suite -> JSON, markdown, PNG chart
    diffusion-fast info                          # versions, device, backends and why not
    torchrun --nproc_per_node=2 -m diffusion_fast sample -n 64   # images sharded over ranks

User mistakes (unknown model, bad checkpoint, out-of-range option) end with one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

import diffusion_fast
from diffusion_fast import distributed, zoo

__all__ = ["main"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(Exception):
    """A mistake of the user's: printed as one line."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffusion-fast", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample images from a built-in model or a checkpoint")
    s.add_argument("--model", default="digits", help=f"shipped model {sorted(zoo.PRETRAINED)} or checkpoint path")
    s.add_argument("-n", "--num-images", type=_positive_int, default=64)
    s.add_argument("--sampler", choices=("ddpm", "ddim", "langevin"), default=None,
                   help="ddpm (all T steps) or ddim for DDPMs (default ddim); langevin (annealed) for score models")
    s.add_argument("--steps", type=_positive_int, default=100, help="DDIM steps")
    s.add_argument("--eta", type=_non_negative_float, default=0.0, help="DDIM eta")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--backend", choices=diffusion_fast.BACKENDS, default="auto")
    s.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    s.add_argument("--out", default="samples.png", help="PNG grid")
    s.add_argument("--npz", default=None, help="also save the samples (uint8, N x H x W x C) to this .npz")
    s.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="rerun on eager PyTorch and print the speed-up (default: on for the shipped model)")
    s.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train a built-in config on a data set")
    t.add_argument("--model", default="ddpm-digits", help=f"config {sorted(zoo.MODELS)}")
    t.add_argument("--data", default=None, help="digits, or an image folder (default: the config's)")
    t.add_argument("--steps", type=_positive_int, default=4000)
    t.add_argument("--batch", type=_positive_int, default=128, help="per process")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--ema", type=float, default=0.999, help="EMA decay")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None)
    t.add_argument("--backend", choices=diffusion_fast.BACKENDS, default="auto")
    t.add_argument("--out", default="checkpoint.pt")
    t.add_argument("--resume", action="store_true", help="continue from --out if it holds trainer state")
    t.add_argument("--save-every", type=_positive_int, default=1000)
    t.add_argument("--grid", default=None, help="final sample grid PNG (default: <out>.png)")
    t.add_argument("--half", action="store_true", help="store the EMA weights in fp16 (shipping)")
    t.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("bench", help="run the benchmark suite and chart the speed-ups")
    b.add_argument("names", nargs="*", help="benchmarks to run, e.g. group_norm_silu ddpm (default: all)")
    b.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>-<date>)")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--device", choices=("cpu", "cuda"), default=None)
    b.add_argument("--providers", default=None, help="comma list, e.g. eager,compile,cuda (default: all)")

    sub.add_parser("info", help="versions, device, backends loaded and why others did not")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in checkpoints
    try:
        if args.command == "sample":
            return cmd_sample(args)
        if args.command == "train":
            from diffusion_fast.train_cli import cmd_train
            return cmd_train(args)
        if args.command == "bench":
            from diffusion_fast.report import cmd_bench
            return cmd_bench(args)
        print(json.dumps(diffusion_fast.env_info(), indent=2, default=str))
        return 0
    except (UsageError, ValueError, TypeError, ImportError, OSError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception's text
        print(f"diffusion-fast {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()


# ---------------------------------------------------------------------------- sample
def sample_images(model, ckpt: dict, n: int, *, sampler: str, steps: int, eta: float, seed: int,
                  device: torch.device, dtype: torch.dtype, progress: bool) -> torch.Tensor:
    """n samples (n, C, H, W) in [-1, 1] from a checkpoint's network: DDPM (ancestral or DDIM) or a
    score model (annealed Langevin dynamics from uniform noise, NCSN Algorithm 1)."""
    from diffusion_fast.diffusion.schedules import linear_betas
    from diffusion_fast.samplers import annealed_langevin_dynamics, sample_ddim, sample_ddpm

    kind = ckpt.get("kind", "ddpm")
    if sampler not in zoo.SAMPLERS[kind]:
        raise UsageError(f"--sampler {sampler} does not apply to a {kind} model: use one of {zoo.SAMPLERS[kind]}")
    if kind == "ncsnv2":
        generator = torch.Generator().manual_seed(seed)
        x = torch.rand(n, *ckpt["data"]["shape"], generator=generator).mul(2).sub(1).to(device=device, dtype=dtype)
        with torch.inference_mode():
            x = annealed_langevin_dynamics(model, x, model.sigmas, seed=seed, **ckpt["schedule"])
        return x.float().clamp(-1, 1)
    betas = linear_betas(**ckpt["schedule"])
    shape = (n, *ckpt["data"]["shape"])
    total = betas.numel() if sampler == "ddpm" else steps
    bar = _progress(total, progress, f"{sampler} steps")
    tick = (lambda _: bar.update(1)) if bar is not None else None
    with torch.inference_mode():
        if sampler == "ddpm":
            x = sample_ddpm(model, shape, betas=betas, seed=seed, device=device, dtype=dtype, progress=tick)
        else:
            if steps > betas.numel():
                raise UsageError(f"--steps must be at most {betas.numel()}, got {steps}")
            x = sample_ddim(model, shape, num_steps=steps, eta=eta, alphas_cumprod=torch.cumprod(1 - betas, 0),
                            seed=seed, device=device, dtype=dtype, progress=tick)
    if bar is not None:
        bar.close()
    return x.float()


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out, time.perf_counter() - start


def cmd_sample(args) -> int:
    ctx = distributed.setup(args.device)
    dtype = DTYPES[args.dtype]
    if dtype == torch.float16 and ctx.device.type == "cpu":
        raise UsageError("--dtype fp16 needs a CUDA device; use fp32 or bf16 on a CPU")
    model, ckpt = zoo.load_model(args.model)
    args.sampler = args.sampler or zoo.SAMPLERS[ckpt["kind"]][-1]
    model = model.to(device=ctx.device, dtype=dtype)
    n_local = distributed.shard_sizes(args.num_images, ctx.world_size)[ctx.rank]
    seed = distributed.rank_seed(args.seed, ctx.rank)
    run = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, seed=seed, device=ctx.device, dtype=dtype)
    show = ctx.is_main and not args.no_progress
    with diffusion_fast.use_backend(args.backend):
        x, seconds = _timed(lambda: sample_images(model, ckpt, n_local, progress=show, **run) if n_local else
                            torch.empty(0, *ckpt["data"]["shape"], device=ctx.device))
    images = distributed.gather(ctx, x)
    if not ctx.is_main:
        return 0
    from diffusion_fast.images import save_grid, to_uint8

    scale = max(1, 64 // images.shape[-1])
    save_grid(images, args.out, scale=scale)
    if args.npz:
        import numpy as np

        np.savez_compressed(args.npz, samples=to_uint8(images).permute(0, 2, 3, 1).numpy())
    rate = n_local / seconds
    where = f"{ctx.device}" + (f" x {ctx.world_size} ranks" if ctx.world_size > 1 else "")
    print(f"wrote {images.shape[0]} samples to {args.out} ({args.sampler}, backend {args.backend}, {where}): "
          f"{seconds:.2f} s, {rate:.1f} images/s per rank")
    if args.compare or (args.compare is None and args.model in zoo.PRETRAINED):
        with diffusion_fast.use_backend("torch"):
            ref, ref_seconds = _timed(lambda: sample_images(model, ckpt, n_local, progress=show, **run))
        diff = (ref.cpu() - x.cpu()).abs().max().item()
        print(f"eager PyTorch: {ref_seconds:.2f} s, {n_local / ref_seconds:.1f} images/s -> "
              f"speed-up {ref_seconds / seconds:.2f}x (max |difference| {diff:.1e})")
    return 0


def command_line(argv) -> str:
    return "diffusion-fast " + " ".join(shlex.quote(a) for a in argv)

