"""``diffusion-fast bench``: run the benchmark scripts, then summarise their JSON rows as a
markdown table and a PNG bar chart of our best backend's speed-up over eager and over torch.compile."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["bench_dir", "available", "summarise", "chart", "cmd_bench"]

OURS = ("cpu", "cuda", "triton")  # providers that are our backends (see benchmarks/harness.py)


def bench_dir() -> Path:
    """benchmarks/: installed as diffusion_fast.benchmarks, or beside the package in a checkout."""
    spec = importlib.util.find_spec("diffusion_fast.benchmarks")
    for folder in list(spec.submodule_search_locations if spec else []) + [Path(__file__).parents[1] / "benchmarks"]:
        if (Path(folder) / "harness.py").is_file():
            return Path(folder)
    raise ValueError("the benchmark scripts are not installed (no benchmarks/harness.py found)")


def available() -> dict:
    """name -> script, for every benchmarks/bench_<name>.py."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(bench_dir().glob("bench_*.py"))}


def best_rows(rows: list) -> list:
    """Per case (bench, variant, shape, dtype, mode): the fastest of our providers' rows."""
    best: dict = {}
    for r in rows:
        if r["provider"] not in OURS:
            continue
        key = (r["bench"], r["variant"], tuple(r["shape"]), r["dtype"], r["mode"])
        if key not in best or r["median_ms"] < best[key]["median_ms"]:
            best[key] = r
    return list(best.values())


def summarise(folder: Path) -> tuple:
    """(markdown, best rows) over every bench_*.json in folder."""
    rows, device = [], None
    for path in sorted(folder.glob("bench_*.json")):
        data = json.loads(path.read_text())
        rows += data["rows"]
        device = device or data["env"].get("device_name")
    best = best_rows(rows)
    lines = [f"# Speed-ups of diffusion_fast on {device}", "",
             "Best of our backends per case; x eager / x compile > 1 is faster.", "",
             "| bench | variant | shape | dtype | mode | ours | median ms | x eager | x compile |",
             "|---|---|---|---|---|---|--:|--:|--:|"]
    for r in best:
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {r['bench'].removeprefix('bench_')} | {r['variant']} | {'x'.join(map(str, r['shape']))} "
                     f"| {r['dtype']} | {r['mode']} | {r['provider']} | {r['median_ms']:.4f} "
                     f"| {fmt(r['ratio_to_eager'])} | {fmt(r['ratio_to_compile'])} |")
    return "\n".join(lines) + "\n", best


def chart(best: list, path: Path, title: str) -> None:
    """Horizontal bars: speed-up over eager and over torch.compile per case (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['bench'].removeprefix('bench_')} {r['variant']} {'x'.join(map(str, r['shape']))} "
              f"{r['dtype']} {r['mode']}" for r in best]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(best) + 1.5))
    ys = range(len(best))
    for offset, key, name in ((-0.2, "ratio_to_eager", "vs eager"), (0.2, "ratio_to_compile", "vs torch.compile")):
        ax.barh([y + offset for y in ys], [r[key] or 0 for r in best], height=0.4, label=name)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up (x, log scale; > 1 is faster)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_bench(args) -> int:
    scripts = available()
    names = args.names or list(scripts)
    if unknown := [n for n in names if n not in scripts]:
        raise ValueError(f"unknown benchmark(s) {unknown}: expected some of {sorted(scripts)}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out) if args.out else Path("bench-results") / device
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    failed = []
    for name in names:
        cmd = [sys.executable, str(scripts[name]), "--device", device, "--out", str(out)] + ["--quick"] * args.quick
        cmd += ["--providers", args.providers] if args.providers else []
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            failed.append(name)
    markdown, best = summarise(out)
    (out / "summary.md").write_text(markdown)
    if best:
        chart(best, out / "speedups.png", f"diffusion_fast speed-ups ({device})")
    print(markdown)
    print(f"wrote {out / 'summary.md'} and {out / 'speedups.png'}")
    if failed:
        raise ValueError(f"benchmark(s) failed: {failed}")
    return 0
