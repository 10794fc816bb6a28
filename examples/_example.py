"""What every example script shares: its command line (--out, --seed, --threads) and writing its figure."""

import argparse
from pathlib import Path

import torch


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser showing the script's docstring, with --out; the script adds its options, then calls ``parse``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("examples/results"), help="folder for the PNG")
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Adds --seed and --threads, parses the command line and applies both to torch."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (small networks: 1 is fastest)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


def subplots(*args, figsize: tuple, **kwargs):
    """A figure and its axes (``Figure.subplots`` arguments) made outside pyplot: no display, nothing to close."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def save(fig, out: Path, name: str) -> None:
    """Lays out ``fig``, writes it to out/name at 80 dpi and prints the path."""
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / name, dpi=80)
    print(f"wrote {out / name}")
