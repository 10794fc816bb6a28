"""The diffusion-fast command: train -> checkpoint -> sample, errors as one line, bench report."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusion_fast
from diffusion_fast import cli, zoo
from diffusion_fast.data import swiss_roll

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


def test_train_on_a_folder_of_images(tmp_path, one_thread):
    """--data FOLDER: images of any size and mode, resized to the config's resolution and channels."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 256, size=(12 + i, 10, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "folder.pt"
    assert cli.main(["train", "--data", str(folder), "--steps", "2", "--batch", "4", "--out", str(out),
                     "--no-progress"]) == 0
    ckpt = zoo.load_checkpoint(out)
    assert ckpt["trainer"]["step"] == 2 and ckpt["data"]["shape"] == [1, 8, 8]


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
    (["sample", "--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA device"),
    (["train", "--model", "no-such-config"], "unknown model config"),
    (["train", "--data", "/no/such/folder"], "unknown data set"),
    (["train", "--ema", "1.5"], "--ema"),
    (["bench", "no_such_bench"], "unknown benchmark"),
    (["train", "--model", "ddpm-digits", "--data", "swiss_roll"], "holds 2-D points, not images"),
    (["train", "--model", "ncsnv2-digits", "--data", "swiss_roll"], "holds 2-D points, not images"),
    (["train", "--model", "dpm2015-swissroll", "--data", "digits"], "models 2-D points"),
    (["sample", "--model", "dpm2015-swissroll"], "untrained config"),
])
def test_user_mistakes_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_option_values_are_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sample", "-n", "0"])
    assert exc.value.code == 2 and "positive" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sample", "train"])
def test_backend_option_takes_auto_and_every_backend(command):
    for backend in ("auto",) + tuple(diffusion_fast.BACKENDS):
        assert cli.parser().parse_args([command, "--backend", backend]).backend == backend
    with pytest.raises(SystemExit):
        cli.parser().parse_args([command, "--backend", "fast"])


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


def test_a_default_cuda_graph_that_fails_to_capture_falls_back_with_a_warning():
    """Only a default graph falls back (warned); a failure without a graph, or with --cuda-graph asked for, raises."""
    from diffusion_fast.sample_cli import _sample_with_fallback

    def sample(kwargs):
        if kwargs.get("cuda_graph"):
            raise RuntimeError("operation not permitted when stream is capturing")
        return "samples"

    run = dict(seed=0)
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture failed.*op by op"):
        assert _sample_with_fallback(sample, dict(run, cuda_graph=True), run, forced=False) == ("samples", run)
    with pytest.raises(RuntimeError, match="capturing"):
        _sample_with_fallback(sample, dict(run, cuda_graph=True), run, forced=True)
    assert _sample_with_fallback(sample, run, run, forced=False) == ("samples", run)


def test_a_failed_sampling_run_closes_its_progress_bar(monkeypatch):
    """The CLI retries a failed default CUDA-graph run op by op: the failed run's bar must not stay on screen."""
    from diffusion_fast import sample_cli, samplers

    bars = []

    class Bar:
        def __init__(self, *args):
            self.closed = False
            bars.append(self)

        def update(self, n):
            pass

        def close(self):
            self.closed = True

    def capture_fails(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(sample_cli, "_progress", lambda *args: Bar(*args))
    monkeypatch.setattr(samplers, "sample_ddim", capture_fails)
    ckpt = dict(kind="ddpm", schedule=zoo.PAPER_SCHEDULE, data=dict(shape=[1, 8, 8]))
    with pytest.raises(RuntimeError, match="capturing"):
        sample_cli.sample_images(None, ckpt, 2, sampler="ddim", steps=5, eta=0.0, seed=0, device=torch.device("cpu"),
                                 dtype=torch.float32, progress=True, cuda_graph=True)
    assert len(bars) == 1 and bars[0].closed


@pytest.mark.cuda
def test_cuda_graph_is_the_cuda_default_and_samples_alike(checkpoint, tmp_path, capsys):
    """On a CUDA device the UNet samplers replay a CUDA graph unless --no-cuda-graph; the samples agree."""
    samples = {}
    for flag in ("--cuda-graph", "--no-cuda-graph", None):
        npz = tmp_path / f"{flag}.npz"
        argv = ["sample", "--model", str(checkpoint), "-n", "4", "--sampler", "ddim", "--steps", "4", "--device",
                "cuda", "--out", str(tmp_path / "g.png"), "--npz", str(npz), "--no-compare", "--no-progress"]
        assert cli.main(argv + ([flag] if flag else [])) == 0
        printed = capsys.readouterr().out
        assert ("CUDA graph" in printed) == (flag != "--no-cuda-graph"), printed
        samples[flag] = np.load(npz)["samples"].astype(np.int16)
    for flag in ("--no-cuda-graph", None):  # uint8 images, equal to rounding
        assert np.abs(samples["--cuda-graph"] - samples[flag]).max() <= 1, flag


def test_shipped_model_is_the_default_and_reports_its_speed_up(tmp_path, one_thread, capsys):
    assert cli.main(["sample", "-n", "2", "--steps", "3", "--out", str(tmp_path / "d.png"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ddim" in printed and "speed-up" in printed


# ---------------------------------------------------------------------------- the 2015 model (swiss roll)
def _bits(printed: str, name: str) -> float:
    return float(re.search(rf"{re.escape(name)} = (-?[0-9.]+) bits", printed).group(1))


@pytest.fixture(scope="module")
def roll_checkpoint(tmp_path_factory):
    """dpm2015-swissroll trained for 800 steps (in process; ~5 s) and what it printed."""
    path = tmp_path_factory.mktemp("roll") / "roll.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            assert cli.main(["train", "--model", "dpm2015-swissroll", "--steps", "800", "--batch", "200",
                             "--save-every", "400", "--out", str(path), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return path, out.getvalue()


def test_dpm2015_trains_on_the_bound_and_reports_it_in_bits(roll_checkpoint):
    path, printed = roll_checkpoint
    ckpt = zoo.load_checkpoint(path)
    assert ckpt["kind"] == "dpm2015" and ckpt["steps"] == 800 and ckpt["trainer"]["step"] == 800
    assert ckpt["config"]["num_steps"] == 40 and ckpt["schedule"] == {}
    assert ckpt["data"]["name"] == "swiss_roll" and ckpt["data"]["shape"] == [2]
    roll = swiss_roll()
    assert np.allclose(ckpt["data"]["mean"], roll.mean(0)) and np.allclose(ckpt["data"]["std"], roll.std(0))
    k, gain = _bits(printed, "K"), _bits(printed, "K - L_null")
    assert "paper: 2.35 / 6.45" in printed
    assert gain > 0.4, printed  # the untrained (zero-readout) model has K = L_null: a gain of 0
    assert -5 < k < 3
    model, _ = zoo.load_model(str(path))
    assert not torch.equal(model.beta_perturb, torch.zeros_like(model.beta_perturb))  # β_2..T were learned
    assert path.with_suffix(".png").stat().st_size > 5000  # the data vs samples scatter plot


def test_dpm2015_resumes_from_its_checkpoint(roll_checkpoint, tmp_path, one_thread):
    path = tmp_path / "resumed.pt"
    path.write_bytes(roll_checkpoint[0].read_bytes())
    assert cli.main(["train", "--model", "dpm2015-swissroll", "--steps", "810", "--batch", "200", "--resume",
                     "--out", str(path), "--no-progress"]) == 0
    before, after = zoo.load_checkpoint(roll_checkpoint[0]), zoo.load_checkpoint(path)
    assert after["trainer"]["step"] == 810 and after["trainer"]["ema"]["num_updates"] == 810
    adam = after["trainer"]["optimizer"]["state"]
    assert all(state["step"].item() == 810 for state in adam.values())  # Adam's moments carried over
    assert any(not torch.equal(before["ema"][k], after["ema"][k]) for k in before["ema"])
    assert after["data"] == before["data"]


def test_dpm2015_samples_its_reverse_process(roll_checkpoint, tmp_path, one_thread, capsys):
    path = str(roll_checkpoint[0])
    out, npz = tmp_path / "roll.png", tmp_path / "roll.npz"
    assert cli.main(["sample", "--model", path, "-n", "300", "--seed", "5", "--out", str(out), "--npz", str(npz),
                     "--no-progress"]) == 0
    assert "ancestral" in capsys.readouterr().out
    samples = np.load(npz)["samples"]
    assert samples.shape == (300, 2) and samples.dtype == np.float32 and np.isfinite(samples).all()
    model, ckpt = zoo.load_model(path)
    expected = model.sample(300, seed=5) * torch.tensor(ckpt["data"]["std"]) + torch.tensor(ckpt["data"]["mean"])
    assert np.allclose(samples, expected.numpy(), atol=1e-5)
    # Samples lie near the roll: closer to it than N(0, I) points mapped to the data's scale are.
    roll = swiss_roll()[:3000]
    noise = torch.randn(300, 2) * torch.tensor(ckpt["data"]["std"]) + torch.tensor(ckpt["data"]["mean"])
    nearest = torch.cdist(torch.from_numpy(samples), roll).min(1).values.median()
    assert nearest < 0.7 * torch.cdist(noise, roll).min(1).values.median()
    assert out.stat().st_size > 5000


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "ddim"], "--sampler ddim does not apply to a dpm2015 model"),
    (["--sampler", "langevin"], "--sampler langevin does not apply to a dpm2015 model"),
])
def test_dpm2015_refuses_image_samplers(roll_checkpoint, argv, message, tmp_path, capsys):
    assert cli.main(["sample", "--model", str(roll_checkpoint[0]), *argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_image_models_refuse_the_2015_sampler(checkpoint, tmp_path, capsys):
    assert cli.main(["sample", "--model", str(checkpoint), "--sampler", "ancestral",
                     "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--sampler ancestral does not apply to a ddpm model" in err and len(err.splitlines()) == 1
