"""The ``diffusion-fast`` command (also ``python -m diffusion_fast``): sample, train, bench, info.

    diffusion-fast sample                        # the shipped digits DDPM -> samples.png, with speed-up
    diffusion-fast sample --model ckpt.pt -n 16 --sampler ddim --steps 50 --eta 0 --compare
    diffusion-fast train --model ddpm-digits --steps 4000 --out digits.pt
    diffusion-fast train --model dpm2015-swissroll --steps 4000 --out roll.pt   # 2015 model, K in bits
    diffusion-fast sample --model roll.pt -n 2000 --out roll.png     # scatter plot of points
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

    s = sub.add_parser("sample", help="sample images (or points) from a built-in model or a checkpoint")
    s.add_argument("--model", default="digits", help=f"shipped model {sorted(zoo.PRETRAINED)} or checkpoint path")
    s.add_argument("-n", "--num-images", type=_positive_int, default=64)
    s.add_argument("--sampler", choices=("ddpm", "ddim", "langevin", "ancestral"), default=None,
                   help="ddpm (all T steps) or ddim for DDPMs (default ddim); langevin (annealed) for score "
                        "models; ancestral (the learned reverse process) for the 2015 model")
    s.add_argument("--steps", type=_positive_int, default=100, help="DDIM steps")
    s.add_argument("--eta", type=_non_negative_float, default=0.0, help="DDIM eta")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--backend", choices=("auto",) + tuple(diffusion_fast.BACKENDS), default="auto")
    s.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    s.add_argument("--out", default="samples.png", help="PNG grid (scatter plot for point models)")
    s.add_argument("--npz", default=None,
                   help="also save the samples (uint8, N x H x W x C; points: float32, N x D) to this .npz")
    s.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="rerun on eager PyTorch and print the speed-up (default: on for the shipped model)")
    s.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="image samplers: replay the network from a CUDA graph (default: on for CUDA devices)")
    s.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train a built-in config on a data set")
    t.add_argument("--model", default="ddpm-digits", help=f"config {sorted(zoo.MODELS)}")
    t.add_argument("--data", default=None, help="digits, swiss_roll (points), or an image folder "
                                                   "(default: the config's)")
    t.add_argument("--steps", type=_positive_int, default=4000)
    defaults = "; ".join(f"{kind}: " + ", ".join(f"--{k} {v}" for k, v in d.items())
                         for kind, d in zoo.TRAIN_DEFAULTS.items())
    t.add_argument("--batch", type=_positive_int, default=None, help="per process (default per kind: see --ema)")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--warmup", type=int, default=None)
    t.add_argument("--ema", type=float, default=None, help=f"EMA decay. Defaults per kind: {defaults}")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None)
    t.add_argument("--backend", choices=("auto",) + tuple(diffusion_fast.BACKENDS), default="auto")
    t.add_argument("--out", default="checkpoint.pt")
    t.add_argument("--resume", action="store_true", help="continue from --out if it holds trainer state")
    t.add_argument("--save-every", type=_positive_int, default=1000)
    t.add_argument("--grid", default=None, help="final sample grid (points: scatter plot) PNG "
                                                   "(default: <out>.png)")
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
            from diffusion_fast.sample_cli import cmd_sample
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


# ---------------------------------------------------------------------------- helpers
def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def command_line(argv) -> str:
    return "diffusion-fast " + " ".join(shlex.quote(a) for a in argv)

