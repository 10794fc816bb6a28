"""The diffusion-fast command: train -> checkpoint -> sample, errors as one line, bench report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_fast import cli, zoo

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parents[1]


def run_cli(*argv, env=None):
    """diffusion-fast in a fresh process: (exit status, stdout, stderr)."""
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "diffusion_fast", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A digits DDPM trained for a few steps by the train command (in process)."""
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", "--steps", "3", "--batch", "8", "--save-every", "2", "--out", str(path),
                         "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return path


def test_train_writes_a_checkpoint_and_a_grid(checkpoint):
    ckpt = zoo.load_checkpoint(checkpoint)
    assert ckpt["kind"] == "ddpm" and ckpt["steps"] == 3 and ckpt["data"]["shape"] == [1, 8, 8]
    assert ckpt["command"].startswith("diffusion-fast train")
    assert ckpt["trainer"]["step"] == 3
    assert checkpoint.with_suffix(".png").stat().st_size > 100


def test_resume_continues_from_the_saved_step(checkpoint, tmp_path, one_thread):
    path = tmp_path / "resumed.pt"
    path.write_bytes(checkpoint.read_bytes())
    assert cli.main(["train", "--steps", "5", "--batch", "8", "--out", str(path), "--resume", "--no-progress"]) == 0
    ckpt = zoo.load_checkpoint(path)
    assert ckpt["trainer"]["step"] == 5 and ckpt["steps"] == 5
    before = zoo.load_checkpoint(checkpoint)["ema"]
    assert any(not torch.equal(before[k], ckpt["ema"][k]) for k in before)


def test_sample_from_a_checkpoint(checkpoint, tmp_path, one_thread, capsys):
    out, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    assert cli.main(["sample", "--model", str(checkpoint), "-n", "5", "--sampler", "ddim", "--steps", "4",
                     "--out", str(out), "--npz", str(npz), "--compare", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "speed-up" in printed
    samples = np.load(npz)["samples"]
    assert samples.shape == (5, 8, 8, 1) and samples.dtype == np.uint8 and samples.std() > 0
    assert out.stat().st_size > 100


@pytest.mark.parametrize("argv, message", [
    (["sample", "--model", "no-such-model"], "unknown model"),
    (["sample", "--model", "ddpm-digits"], "untrained config"),
    (["sample", "--model", "README.md"], "cannot be read"),
    (["sample", "--dtype", "fp16", "--device", "cpu"], "fp16"),
    (["train", "--model", "no-such-config"], "unknown model config"),
    (["train", "--data", "/no/such/folder"], "unknown data set"),
    (["train", "--ema", "1.5"], "--ema"),
    (["bench", "no_such_bench"], "unknown benchmark"),
])
def test_user_mistakes_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_option_values_are_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sample", "-n", "0"])
    assert exc.value.code == 2 and "positive" in capsys.readouterr().err


def test_info_prints_env_info(capsys):
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "backends" in info and "torch" in info


def test_torchrun_shards_are_the_union_of_single_runs(checkpoint, tmp_path, one_thread):
    """2 ranks (gloo): rank r samples its shard with seed + r; rank 0 writes all of them."""
    npz = tmp_path / "two.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "diffusion_fast", "sample", "--model", str(checkpoint), "-n", "5", "--sampler", "ddim",
           "--steps", "3", "--eta", "1", "--seed", "7", "--device", "cpu", "--out", str(tmp_path / "two.png"),
           "--npz", str(npz), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    both = np.load(npz)["samples"]
    parts = []
    for seed, n in ((7, 3), (8, 2)):
        single = tmp_path / f"one-{seed}.npz"
        assert cli.main(["sample", "--model", str(checkpoint), "-n", str(n), "--sampler", "ddim", "--steps", "3",
                         "--eta", "1", "--seed", str(seed), "--device", "cpu", "--out", str(tmp_path / "o.png"),
                         "--npz", str(single), "--no-progress"]) == 0
        parts.append(np.load(single)["samples"])
    expected = np.concatenate(parts)
    assert both.shape == expected.shape == (5, 8, 8, 1)
    assert np.abs(both.astype(int) - expected.astype(int)).max() <= 1  # uint8 rounding of equal floats


def test_bench_runs_a_named_benchmark_and_charts_it(tmp_path, capsys):
    assert cli.main(["bench", "sampler_step", "--quick", "--device", "cpu", "--providers", "eager,cpu",
                     "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench_sampler_step.json").is_file()
    summary = (tmp_path / "summary.md").read_text()
    assert "| sampler_step |" in summary and "x eager" in summary
    assert (tmp_path / "speedups.png").stat().st_size > 1000


def test_score_model_trains_and_samples_by_annealed_langevin(tmp_path, one_thread):
    """ncsnv2-digits: denoising score matching in train, annealed Langevin dynamics in sample."""
    path = tmp_path / "ncsn.pt"
    assert cli.main(["train", "--model", "ncsnv2-digits", "--steps", "2", "--batch", "4", "--lr", "1e-4",
                     "--out", str(path), "--no-progress"]) == 0
    ckpt = zoo.load_checkpoint(path)
    assert ckpt["kind"] == "ncsnv2" and ckpt["schedule"] == {"n_steps_each": 20, "step_lr": 5e-5}
    npz = tmp_path / "s.npz"
    assert cli.main(["sample", "--model", str(path), "-n", "3", "--npz", str(npz), "--out", str(tmp_path / "g.png"),
                     "--no-progress"]) == 0
    samples = np.load(npz)["samples"]
    assert samples.shape == (3, 8, 8, 1) and samples.std() > 0
    assert cli.main(["sample", "--model", str(path), "--sampler", "ddim", "--out", str(tmp_path / "x.png")]) == 2


def test_shipped_model_is_the_default_and_reports_its_speed_up(tmp_path, one_thread, capsys):
    assert cli.main(["sample", "-n", "2", "--steps", "3", "--out", str(tmp_path / "d.png"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ddim" in printed and "speed-up" in printed
