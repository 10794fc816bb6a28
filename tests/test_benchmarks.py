"""Smoke test of the benchmark harness: the group_norm_silu bench, --quick, on the CPU.

torch.compile is left out: its first CPU compile alone can take ~20 s on a small machine.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402


def test_group_norm_silu_bench_quick_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_group_norm_silu.py"), "--device", "cpu",
           "--quick", "--providers", "eager,cpu", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    data = json.loads((tmp_path / "bench_group_norm_silu.json").read_text())
    assert (tmp_path / "bench_group_norm_silu.md").read_text().startswith("# bench_group_norm_silu")
    assert data["env"]["copy_gbps"] > 0 and "backends" in data["env"]["env_info"]
    fields = {f.name for f in dataclasses.fields(harness.Row)}
    rows = data["rows"]
    assert rows
    for row in rows:
        assert set(row) == fields
        assert row["device"] == "cpu" and row["provider"] in ("eager", "cpu")
        assert 0 < row["p25_ms"] <= row["median_ms"] <= row["p75_ms"]
        assert row["bytes"] > 0 and row["gbps"] > 0 and row["ratio_to_eager"] > 0
        assert row["ratio_to_compile"] is None  # compile not run
    eager = [(r["variant"], r["mode"]) for r in rows if r["provider"] == "eager"]
    assert {m for _, m in eager} == set(harness.MODES) and {v for v, _ in eager} >= {"plain", "temb", "scale_shift"}
    # Our C++ backend either ran or is listed as skipped with a reason, never silently missing.
    ran_ours = any(r["provider"] == "cpu" for r in rows)
    assert ran_ours or any(s["provider"] == "cpu" and s["reason"] for s in data["skipped"])
    for row in rows:
        if row["provider"] == "cpu":
            assert row["max_abs_diff"] < 1e-3


def test_nvae_cell_bench_quick_cpu(tmp_path):
    """The NVAE cell bench (dwconv 5x5 + BN + Swish), --quick on the CPU: every variant and mode, our C++ run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_nvae_cell.py"), "--device", "cpu", "--quick",
           "--providers", "eager,cpu", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_nvae_cell.json").read_text())["rows"]
    seen = {(r["variant"], r["mode"], r["provider"]) for r in rows}
    assert seen == {(v, m, p) for v in ("train", "eval", "train_cl") for m in harness.MODES for p in ("eager", "cpu")}
    for row in rows:
        assert 0 < row["p25_ms"] <= row["median_ms"] <= row["p75_ms"] and row["bytes"] > 0
        if row["provider"] == "cpu":
            assert row["max_abs_diff"] < 1e-3
