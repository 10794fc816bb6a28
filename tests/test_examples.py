"""The demos in examples/ run end to end (few steps) and write their PNGs; the toy data they use."""
import runpy
import sys
from pathlib import Path

import pytest
import torch

from diffusion_fast.data import gaussian_mixture

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


@pytest.mark.parametrize("script, args, png", [
    ("score_toy_2d.py", ["--steps", "20", "--levels", "4", "--n-steps-each", "3", "--n-samples", "64"],
     "score_toy_2d.png"),
    ("ncsn_digits.py", ["--steps", "3", "--levels", "4", "--n-steps-each", "2", "--n-samples", "8"],
     "ncsn_digits.png"),
    ("swiss_roll_2015.py", ["--steps", "20", "--n-train", "500", "--n-test", "200"], "swiss_roll_2015_h16.png"),
])
def test_example_runs_and_writes_its_png(script, args, png, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--out", str(tmp_path), *args])
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as `python examples/<script>` does: finds examples/_example.py
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / png).stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


def test_gaussian_mixture_weights_and_spread():
    means = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    points = gaussian_mixture(20000, means=means, weights=torch.tensor([0.25, 0.75]), std=0.5, seed=1)
    assert points.shape == (20000, 2) and points.dtype == torch.float32
    right = points[:, 0] > 0
    assert abs(right.float().mean().item() - 0.75) < 0.02
    assert abs(points[right].std(0) - 0.5).max() < 0.03
    assert torch.equal(points, gaussian_mixture(20000, means=means, weights=torch.tensor([0.25, 0.75]), std=0.5,
                                                seed=1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(means=torch.zeros(3)), "means must be"),
    (dict(means=torch.zeros(2, 2), weights=torch.tensor([0.5, 0.6])), "weights must be"),
    (dict(means=torch.zeros(2, 2), std=0.0), "std must be"),
])
def test_gaussian_mixture_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gaussian_mixture(10, **kwargs)
