"""langevin_step: every backend against the float64 formula x + a s + sqrt(2a) z with the Philox
stream, layouts, the step size read from a device tensor, and a long chain on a Gaussian whose
stationary law is known in closed form."""

import math

import pytest
import torch
from helpers import (
    BACKEND_DEVICES,
    OURS,
    assert_close,
    assert_noise_stream,
    backend_devices_without,
    dtypes_for,
    require_backend,
    run_backend,
    to_layout,
)

import diffusion_fast
from diffusion_fast.ops.langevin_step import OPS, _unsupported, langevin_step
from diffusion_fast.ops.philox import philox_normal_ref

SHAPES = {
    "image batch": (3, 3, 8, 9),
    "batch 1, odd size": (1, 5, 7, 11),  # 385 elements: a partial noise tile
    "several tiles + tail": (2, 1, 1100),  # 2200 elements
    "1-D": (13,),
}


def inputs(shape, dtype, device):
    x = (torch.randn(shape, dtype=torch.float64) * 1.5).to(device=device, dtype=dtype)
    score = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, score


def formula(x, score, alpha, z):
    """x + alpha * score + sqrt(2 alpha) * z in float64 on the CPU (z None: no noise term)."""
    x, score = x.double().cpu(), score.double().cpu()
    out = x + alpha * score
    return out if z is None else out + math.sqrt(2 * alpha) * z.double().cpu().reshape(x.shape)


# ---------------------------------------------------------------------------
# Against the float64 formula
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("alpha_kind", ["float", "tensor"])
def test_matches_formula(backend, device, alpha_kind):
    for dtype in dtypes_for(backend, device):
        for i, (name, shape) in enumerate(SHAPES.items()):
            alpha, seed, step = 0.02 * (i + 1), 11 + i, (0, 7, 2**31 + 5, 2**32 - 1)[i]
            table = torch.tensor([0.5, alpha, 0.1], dtype=torch.float64, device=device)  # a row view is read
            step_size = alpha if alpha_kind == "float" else table[1]
            x, score = inputs(shape, dtype, device)
            require_backend(backend, "langevin_step", x, _unsupported)
            out = run_backend(backend, langevin_step, x, score, step_size, seed=seed, step=step)
            assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
            expected = formula(x, score, alpha, philox_normal_ref(seed, step, x.numel()))
            assert_close(out, expected, dtype, f"{name}, {dtype}, step size {alpha_kind}")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_same_seed_same_noise_on_every_backend(backend, device):
    """x = 0, score = 0, alpha = 1/2: the output is the noise itself, for seeds and steps up to 64/32 bits."""
    def draw(zeros, seed, step):
        require_backend(backend, "langevin_step", zeros, _unsupported)
        return run_backend(backend, langevin_step, zeros, zeros, 0.5, seed=seed, step=step)

    assert_noise_stream(backend, device, draw)
    x = torch.randn(3, 1000, device=device)
    with diffusion_fast.use_backend(backend):
        a, b = langevin_step(x, x, 0.1, seed=1, step=4), langevin_step(x, x, 0.1, seed=2, step=4)
        c = langevin_step(x, x, 0.1, seed=1, step=5)
    assert (a - b).abs().max() > 0.1 and (a - c).abs().max() > 0.1  # seed and step both matter


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_without_noise_and_with_given_noise(backend, device):
    for dtype in dtypes_for(backend, device):
        x, score = inputs((2, 3, 7, 5), dtype, device)
        require_backend(backend, "langevin_step", x, _unsupported)
        with diffusion_fast.use_backend(backend):
            plain = langevin_step(x, score, 0.3, seed=1, add_noise=False)
            assert torch.equal(plain, langevin_step(x, score, 0.3, seed=2, step=9, add_noise=False))  # no noise
            noise = torch.randn_like(x)
            given = langevin_step(x, score, 0.3, seed=1, noise=noise)
        assert_close(plain, formula(x, score, 0.3, None), dtype, f"add_noise=False ({dtype})")
        assert_close(given, formula(x, score, 0.3, noise), dtype, f"given noise ({dtype})")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts_and_mixed_dtypes(backend, device, layout):
    """Non-contiguous x/score/noise and a float16 score with float32 x; the noise index is the
    logical row-major index, so the result does not depend on the layout."""
    x, score = inputs((2, 3, 6, 5), torch.float32, device)
    lx, ls = to_layout(x, layout), to_layout(score.half(), layout)
    assert not lx.is_contiguous() and not ls.is_contiguous()
    require_backend(backend, "langevin_step", x, _unsupported)
    with diffusion_fast.use_backend(backend):
        out = langevin_step(lx, ls, 0.05, seed=3, step=2)
        noise = to_layout(torch.randn_like(x), layout)
        given = langevin_step(lx, ls, 0.05, noise=noise)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert_close(out, formula(x, score.half(), 0.05, philox_normal_ref(3, 2, x.numel())), torch.float32, layout)
    assert_close(given, formula(x, score.half(), 0.05, noise), torch.float32, f"{layout}, given noise")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_step_size_tensors(backend, device):
    """0-d, (1,) and float64 step-size tensors, and a row of a table, all equal the float step size."""
    x, score = inputs((2, 1100), torch.float32, device)
    table = torch.tensor([[0.4], [0.25]], device=device)
    with diffusion_fast.use_backend(backend):
        expected = langevin_step(x, score, 0.25, seed=8)
        for step_size in (torch.tensor(0.25, device=device), torch.tensor([0.25], device=device),
                          torch.tensor(0.25, dtype=torch.float64, device=device), table[1], table[1, 0]):
            torch.testing.assert_close(langevin_step(x, score, step_size, seed=8), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_empty(backend, device):
    x = torch.empty(0, 3, 4, 4, device=device)
    assert run_backend(backend, langevin_step, x, x, 0.1).shape == x.shape


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_misaligned_inputs_cuda(backend):
    x, score = (torch.randn(4001, device="cuda")[1:] for _ in range(2))  # storage offset 1: no 16-byte alignment
    out = run_backend(backend, langevin_step, x, score, 0.01, seed=9, step=3)
    assert_close(out, formula(x, score, 0.01, philox_normal_ref(9, 3, 4000)), torch.float32, "misaligned")


# ---------------------------------------------------------------------------
# A chain with a known answer: the score of N(mu, s^2 I) is -(x - mu) / s^2, so each step is
# x' = (1 - a/s^2) x + (a/s^2) mu + sqrt(2a) z, whose mean and variance follow in closed form:
# m_n = mu + (1 - a/s^2)^n (m_0 - mu), v_n -> s^2 / (1 - a / (2 s^2)) (the discretisation bias).
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", [p for p in OURS if p.values[0] == "cuda" or p.values[1] == "cuda"])
def test_long_chain_reaches_the_gaussian(backend, device, one_thread):
    n_chains, dim, s, ratio, n_steps = 128, 256, 0.7, 0.01, 800  # ratio = a / s^2
    mu = torch.linspace(-2.0, 2.0, dim, device=device)
    alpha = ratio * s**2
    x = mu + 3.0  # every chain starts 3 away from the mean
    x = x.expand(n_chains, dim).contiguous()
    with diffusion_fast.use_backend(backend):
        for step in range(n_steps):
            x = langevin_step(x, -(x - mu) / s**2, alpha, seed=21, step=step)
    standardized = ((x - mu) / s).double().cpu()  # N(0, 1) once converged, pooled over every coordinate
    n = standardized.numel()
    mean_bias = 3.0 / s * (1 - ratio) ** n_steps
    var_exact = 1.0 / (1 - ratio / 2) * (1 - (1 - ratio) ** (2 * n_steps))
    mean, var = standardized.mean().item(), standardized.var().item()
    assert abs(mean - mean_bias) < 5 / math.sqrt(n), f"mean {mean:.4f}, expected {mean_bias:.4f}"
    assert abs(var - var_exact) < 5 * math.sqrt(2 / n), f"variance {var:.4f}, expected {var_exact:.4f}"
    assert abs(mean) < 6 / math.sqrt(n) and abs(var - 1) < 6 * math.sqrt(2 / n)  # mu and s^2 within statistics
    per_coordinate = standardized.mean(0)  # each coordinate's own mean, 256 chains each
    assert per_coordinate.abs().max() < 5 / math.sqrt(n_chains)


# ---------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", OURS)
def test_opcheck(backend, device):
    x, score = inputs((2, 3, 5, 7), torch.float32, device)
    require_backend(backend, "langevin_step", x, _unsupported)
    fn = getattr(torch.ops.diffusion_fast, OPS[backend]).default
    alpha = torch.tensor([0.05], device=device)
    torch.library.opcheck(fn, (x, score, alpha, 0.0, None, 3, 7, True))
    torch.library.opcheck(fn, (x, score, None, 0.2, torch.randn_like(x), 2**40, 0, True))
    torch.library.opcheck(fn, (x, score, None, 0.2, None, -1, 2**32 - 1, False))


@pytest.mark.parametrize("backend,device", backend_devices_without("triton"))
def test_torch_compile_fullgraph(backend, device):
    x, score = inputs((2, 3, 4, 4), torch.float32, device)
    table = torch.tensor([0.1, 0.02], device=device)

    def two_steps(x, score):
        y = langevin_step(x, score, table[1], seed=3, step=10)
        return langevin_step(y, score, 0.01, add_noise=False)

    with diffusion_fast.use_backend(backend):
        expected = two_steps(x, score)
        actual = torch.compile(two_steps, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")(
            x, score)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------
# Bad input: a clear error that names the argument, on every backend.
# ---------------------------------------------------------------------------
BAD = [
    ("x not a tensor", lambda x: {"x": x.tolist()}, TypeError, "x"),
    ("integer x", lambda x: {"x": x.long()}, TypeError, "x"),
    ("score shape mismatch", lambda x: {"score": x[:, :2]}, ValueError, "score"),
    ("integer score", lambda x: {"score": x.int()}, TypeError, "score"),
    ("score on another device", lambda x: {"score": x.to("meta")}, ValueError, "score"),
    ("step_size zero", lambda x: {"step_size": 0.0}, ValueError, "step_size"),
    ("step_size negative", lambda x: {"step_size": -0.1}, ValueError, "step_size"),
    ("step_size nan", lambda x: {"step_size": float("nan")}, ValueError, "step_size"),
    ("step_size inf", lambda x: {"step_size": float("inf")}, ValueError, "step_size"),
    ("step_size bool", lambda x: {"step_size": True}, TypeError, "step_size"),
    ("step_size str", lambda x: {"step_size": "0.1"}, TypeError, "step_size"),
    ("step_size two elements", lambda x: {"step_size": torch.tensor([0.1, 0.2])}, ValueError, "step_size"),
    ("step_size integer tensor", lambda x: {"step_size": torch.tensor(1)}, TypeError, "step_size"),
    ("step_size on another device", lambda x: {"step_size": torch.tensor(0.1, device="meta")}, ValueError,
     "step_size"),
    ("seed negative", lambda x: {"seed": -1}, ValueError, "seed"),
    ("seed past 64 bits", lambda x: {"seed": 2**64}, ValueError, "seed"),
    ("seed float", lambda x: {"seed": 1.0}, TypeError, "seed"),
    ("step negative", lambda x: {"step": -1}, ValueError, "step"),
    ("step past 32 bits", lambda x: {"step": 2**32}, ValueError, "step"),
    ("step tensor", lambda x: {"step": torch.tensor(3)}, TypeError, "step"),
    ("noise shape mismatch", lambda x: {"noise": x[0]}, ValueError, "noise"),
    ("noise without add_noise", lambda x: {"noise": x, "add_noise": False}, ValueError, "noise"),
    ("add_noise not bool", lambda x: {"add_noise": 1}, TypeError, "add_noise"),
]


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
@pytest.mark.parametrize("name,change,exc,arg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, change, exc, arg):
    x = torch.randn(2, 3, 4, 4)
    call = {"x": x, "score": torch.randn_like(x), "step_size": 0.1}
    call.update(change(x))
    with diffusion_fast.use_backend(backend), pytest.raises(exc, match=rf"langevin_step: {arg}\b"):
        langevin_step(**call)


def test_extension_checks_its_arguments():
    """The C++ op does not trust Python: direct calls with bad arguments fail clearly."""
    x = torch.randn(2, 3)
    require_backend("cuda", "langevin_step", x, _unsupported)
    op = torch.ops.diffusion_fast.langevin_step
    with pytest.raises(RuntimeError, match="score must have x's shape"):
        op(x, x[:1], None, 0.1, None, 0, 0, True)
    with pytest.raises(RuntimeError, match="alpha must be"):
        op(x, x, torch.tensor([0.1], dtype=torch.float64), 0.0, None, 0, 0, True)
    with pytest.raises(RuntimeError, match="alpha must be a \\(1,\\) tensor"):
        op(x, x, torch.tensor([0.1, 0.2]), 0.0, None, 0, 0, True)
    with pytest.raises(RuntimeError, match="step must be"):
        op(x, x, None, 0.1, None, 0, 2**32, True)
    with pytest.raises(RuntimeError, match="add_noise is false"):
        op(x, x, None, 0.1, x, 0, 0, False)

