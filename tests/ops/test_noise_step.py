"""The scaffolding the noise-step ops share (diffusion_fast/ops/_noise_step.py): numpy scalars
are taken like Python numbers by every op and backend; the backend pick is cached per request."""

import numpy as np
import pytest
import torch
from helpers import run_backend

import diffusion_fast
from diffusion_fast import backends
from diffusion_fast.ops import _noise_step
from diffusion_fast.ops.sampler_steps import ddim_coefficients, ddpm_coefficients

BETAS = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
DDPM = ddpm_coefficients(BETAS)
DDIM = ddim_coefficients(torch.cumprod(1.0 - BETAS, 0), [90, 50, 10])


def calls(x, e, seed, index, number):
    """Every noise-step op on x with its integer arguments (seed, step/t/i) and its number argument."""
    return [
        lambda: diffusion_fast.langevin_step(x, e, number, seed=seed, step=index),
        lambda: diffusion_fast.dpm2015_step(x, e, e, number, seed=seed, step=index),
        lambda: diffusion_fast.ddpm_step(x, e, DDPM, index, seed=seed),
        lambda: diffusion_fast.ddim_step(x, e, DDIM, index, seed=seed),
    ]


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"], ids=["torch", "ext", "triton"])  # "cuda" would skip
def test_numpy_scalars_are_numbers(backend):
    x, e = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with diffusion_fast.use_backend(backend):
        expected = [f() for f in calls(x, e, 2**63 + 7, 1, 0.25)]
        got = [f() for f in calls(x, e, np.uint64(2**63 + 7), np.int64(1), np.float32(0.25))]
    for want, out in zip(expected, got):
        assert torch.equal(out, want)


def test_check_int_returns_a_python_int():
    v = _noise_step.check_int("op", "seed", np.uint64(2**64 - 1), 2**64)
    assert type(v) is int and v == 2**64 - 1
    with pytest.raises(TypeError, match=r"op: seed must be an int, got bool"):
        _noise_step.check_int("op", "seed", True, 2**64)
    with pytest.raises(ValueError, match=r"op: step must be in \[0, 4294967296\), got -1"):
        _noise_step.check_int("op", "step", np.int8(-1), 2**32)


def test_backend_pick_is_cached_per_request(monkeypatch):
    """select runs once per (requested backend, device, dtype); the answer follows use_backend."""
    monkeypatch.setattr(backends, "_fallbacks", {})
    seen = []
    select = backends.select
    monkeypatch.setattr(backends, "select", lambda op, x, unsupported: seen.append(op) or select(op, x, unsupported))
    pick = _noise_step.backend_selector("probe")
    x = torch.randn(3)
    assert [pick(x), pick(x)] == ["cuda", "cuda"] and seen == ["probe"]
    assert run_backend("torch", pick, x) == "torch" and seen == ["probe"] * 2
    with pytest.warns(RuntimeWarning, match="probe falls back from triton to cuda"):
        assert run_backend("triton", pick, x.double()) == "cuda"  # Triton takes no float64: the fallback is kept
    assert run_backend("triton", pick, x.double()) == "cuda" and seen == ["probe"] * 3


@pytest.mark.parametrize("suffix", ["", "_triton"], ids=["ext", "triton"])
def test_raw_ops_refuse_tensors_unlike_x(suffix):
    """The torch.library ops themselves (what torch.compile calls, below the checked public
    functions) refuse a tensor read element for element with x that is smaller than x: the kernel
    would read past its end."""
    ops = torch.ops.diffusion_fast
    x, short = torch.randn(2, 3, 5), torch.randn(2, 3, 4)
    coef = torch.zeros(6)
    raw = {
        "langevin_step (score)": lambda: getattr(ops, "langevin_step" + suffix)(x, short, None, 0.1, None, 0, 0, True),
        "langevin_step (noise)": lambda: getattr(ops, "langevin_step" + suffix)(x, x, None, 0.1, short, 0, 0, True),
        "dpm2015_step (z_sigma)": lambda: getattr(ops, "dpm2015_step" + suffix)(x, x, short, None, 0.1, 0, 0, True),
        "ddpm_step (eps)": lambda: getattr(ops, "ddpm_step" + suffix)(x, short, coef, None, 0, 0, None, False),
    }
    for what, call in raw.items():
        with pytest.raises((ValueError, RuntimeError), match="shape"):
            call()
