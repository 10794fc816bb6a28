"""dpm2015_step: every backend against the float64 formula of the 2015 reverse kernel with the Philox
stream, layouts, beta read from a device tensor, the noise stream itself, and
DiffusionProcess2015.sample against its former eager path on every backend."""

import math

import pytest
import torch
from helpers import (
    BACKEND_DEVICES,
    OURS,
    assert_close,
    assert_noise_stream,
    dtypes_for,
    require_backend,
    run_backend,
    to_layout,
)

import diffusion_fast
from diffusion_fast import backends
from diffusion_fast.diffusion.dpm2015 import DiffusionProcess2015
from diffusion_fast.models.dpm2015 import RBFReverseNet
from diffusion_fast.ops.dpm2015_step import OPS, _unsupported, dpm2015_step
from diffusion_fast.ops.philox import philox_normal_ref

SHAPES = {
    "points (N, 2)": (257, 2),
    "batch 1": (1, 2),
    "several tiles + tail": (3, 1001),  # 3003 elements: a partial last noise tile
    "image batch, odd sizes": (2, 3, 5, 7),
}


def inputs(shape, dtype, device):
    x = (torch.randn(shape, dtype=torch.float64) * 1.5).to(device=device, dtype=dtype)
    z_mu = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    z_sigma = (torch.randn(shape, dtype=torch.float64) * 2.0).to(device=device, dtype=dtype)
    return x, z_mu, z_sigma


def formula(x, z_mu, z_sigma, beta, z):
    """mu + sqrt(Sigma) z of Sohl-Dickstein et al. 2015 in float64 on the CPU (z None: mu)."""
    x, z_mu, z_sigma = (t.double().cpu() for t in (x, z_mu, z_sigma))
    mean = math.sqrt(1 - beta) * x + math.sqrt(beta) * z_mu
    if z is None:
        return mean
    var = torch.sigmoid(z_sigma + math.log(beta / (1 - beta)))
    return mean + var.sqrt() * z.double().cpu().reshape(x.shape)


# ---------------------------------------------------------------------------
# Against the float64 formula
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("beta_kind", ["float", "tensor"])
def test_matches_formula(backend, device, beta_kind):
    for dtype in dtypes_for(backend, device):
        for i, (name, shape) in enumerate(SHAPES.items()):
            beta, seed, step = (1e-3, 0.07, 0.3, 0.5)[i], 11 + i, (0, 7, 2**31 + 5, 2**32 - 1)[i]
            table = torch.tensor([0.9, beta, 0.1], dtype=torch.float64, device=device)  # a row view is read
            x, z_mu, z_sigma = inputs(shape, dtype, device)
            require_backend(backend, "dpm2015_step", x, _unsupported)
            out = run_backend(backend, dpm2015_step, x, z_mu, z_sigma, beta if beta_kind == "float" else table[1],
                              seed=seed, step=step)
            assert out.dtype == dtype and out.shape == x.shape and out.device == x.device and out.is_contiguous()
            expected = formula(x, z_mu, z_sigma, beta, philox_normal_ref(seed, step, x.numel()))
            assert_close(out, expected, dtype, f"{name}, {dtype}, beta {beta_kind}")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_noise_is_the_philox_stream(backend, device):
    """x = z_mu = 0 and z_sigma = 60 (Sigma = 1 to rounding): the output is z itself, for seeds and
    steps up to 64/32 bits, equal to philox_normal_ref."""
    def draw(zeros, seed, step):
        require_backend(backend, "dpm2015_step", zeros, _unsupported)
        return run_backend(backend, dpm2015_step, zeros, zeros, torch.full_like(zeros, 60.0), 0.5, seed=seed,
                           step=step)

    assert_noise_stream(backend, device, draw)
    x, z_mu, z_sigma = inputs((3, 1000), torch.float32, device)
    with diffusion_fast.use_backend(backend):
        a = dpm2015_step(x, z_mu, z_sigma, 0.2, seed=1, step=4)
        b = dpm2015_step(x, z_mu, z_sigma, 0.2, seed=2, step=4)
        c = dpm2015_step(x, z_mu, z_sigma, 0.2, seed=1, step=5)
    assert (a - b).abs().max() > 0.1 and (a - c).abs().max() > 0.1  # seed and step both matter


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_without_noise(backend, device):
    for dtype in dtypes_for(backend, device):
        x, z_mu, z_sigma = inputs((2, 3, 7, 5), dtype, device)
        require_backend(backend, "dpm2015_step", x, _unsupported)
        with diffusion_fast.use_backend(backend):
            mean = dpm2015_step(x, z_mu, z_sigma, 0.2, seed=1, add_noise=False)
            other = dpm2015_step(x, z_mu, torch.randn_like(z_sigma), 0.2, seed=2, step=9, add_noise=False)
        assert torch.equal(mean, other)  # neither the noise nor z_sigma enters the mean
        assert_close(mean, formula(x, z_mu, z_sigma, 0.2, None), dtype, f"add_noise=False ({dtype})")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy: e^-v = inf, wanted
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_extreme_variance_logits(backend, device):
    """z_sigma far beyond logit(beta) either way: Sigma -> 0 (e^-v overflows) and Sigma -> 1, never NaN."""
    x, z_mu, _ = inputs((5, 2), torch.float32, device)
    z_sigma = torch.tensor([-500.0, -95.0, -20.0, 20.0, 95.0, 500.0, 3.0, -3.0, 0.5, -0.5], device=device)
    z_sigma = z_sigma.reshape(5, 2)
    out = run_backend(backend, dpm2015_step, x, z_mu, z_sigma, 0.1, seed=4, step=1)
    assert_close(out, formula(x, z_mu, z_sigma, 0.1, philox_normal_ref(4, 1, 10)), torch.float32, "extreme z_sigma")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts_and_mixed_dtypes(backend, device, layout):
    """Non-contiguous inputs and a float16 z_sigma with float32 x; the noise index is the logical
    row-major index, so the result does not depend on the layout."""
    x, z_mu, z_sigma = inputs((2, 3, 6, 5), torch.float32, device)
    lx, lm, ls = to_layout(x, layout), to_layout(z_mu, layout), to_layout(z_sigma.half(), layout)
    assert not lx.is_contiguous() and not lm.is_contiguous() and not ls.is_contiguous()
    require_backend(backend, "dpm2015_step", x, _unsupported)
    out = run_backend(backend, dpm2015_step, lx, lm, ls, 0.05, seed=3, step=2)
    assert out.dtype == torch.float32 and out.is_contiguous()
    expected = formula(x, z_mu, z_sigma.half(), 0.05, philox_normal_ref(3, 2, x.numel()))
    assert_close(out, expected, torch.float32, layout)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_beta_tensors(backend, device):
    """0-d, (1,) and float64 beta tensors, and a row of a table, all equal the float beta."""
    x, z_mu, z_sigma = inputs((2, 1100), torch.float32, device)
    table = torch.tensor([[0.4], [0.25]], device=device)
    with diffusion_fast.use_backend(backend):
        expected = dpm2015_step(x, z_mu, z_sigma, 0.25, seed=8)
        for beta in (torch.tensor(0.25, device=device), torch.tensor([0.25], device=device),
                     torch.tensor(0.25, dtype=torch.float64, device=device), table[1], table[1, 0]):
            torch.testing.assert_close(dpm2015_step(x, z_mu, z_sigma, beta, seed=8), expected, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_empty(backend, device):
    x = torch.empty(0, 2, device=device)
    assert run_backend(backend, dpm2015_step, x, x, x, 0.1).shape == x.shape


def test_float64_on_triton_falls_back():
    x, z_mu, z_sigma = inputs((4, 2), torch.float64, "cpu")
    out = run_backend("triton", dpm2015_step, x, z_mu, z_sigma, 0.1, seed=2, step=3)
    assert out.dtype == torch.float64
    assert_close(out, formula(x, z_mu, z_sigma, 0.1, philox_normal_ref(2, 3, 8)), torch.float64, "fallback")
    assert any(f["op"] == "dpm2015_step" and f["wanted"] == "triton" for f in backends.fallbacks())


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_misaligned_inputs_cuda(backend):
    x, z_mu, z_sigma = (torch.randn(4001, device="cuda")[1:] for _ in range(3))  # offset 1: no 16-byte alignment
    out = run_backend(backend, dpm2015_step, x, z_mu, z_sigma, 0.01, seed=9, step=3)
    assert_close(out, formula(x, z_mu, z_sigma, 0.01, philox_normal_ref(9, 3, 4000)), torch.float32, "misaligned")


# ---------------------------------------------------------------------------
# DiffusionProcess2015.sample: the fused op gives the samples of the former eager path.
# ---------------------------------------------------------------------------
def eager_sample(proc, n, seed, dtype):
    """The former DiffusionProcess2015.sample: p_mean_variance, then mean + sqrt(var) * Philox noise."""
    def normal(step):
        return philox_normal_ref(seed, step, n * proc.dim, dtype).reshape(n, proc.dim)

    x = normal(proc.num_steps)
    path = [x]
    for step in range(proc.num_steps, 1, -1):
        mean, var = proc.p_mean_variance(x, torch.full((n,), step, dtype=torch.long))
        x = mean + var.sqrt() * normal(step - 1)
        path.append(x)
    beta1 = proc.step1_beta
    path.append(math.sqrt(1.0 - beta1) * x + math.sqrt(beta1) * normal(0))
    return path


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_matches_the_eager_path(backend, dtype, one_thread):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton kernels take no float64 (falls back; covered above)")
    torch.manual_seed(0)
    num_steps, n = 12, 300  # 600 elements: a partial noise tile
    proc = DiffusionProcess2015(RBFReverseNet(2, num_steps, 16), num_steps).to(dtype)
    with torch.no_grad():
        for p in proc.parameters():  # away from the zero init, so z_mu and z_sigma are not constant
            p.add_(torch.randn_like(p) * 0.3)
    with torch.no_grad():
        expected = eager_sample(proc, n, 5, dtype)
    with diffusion_fast.use_backend(backend):
        path = proc.sample(n, seed=5, trajectory=True)
        assert torch.equal(proc.sample(n, seed=5), path[-1])  # one seed, one sample set
    assert len(path) == len(expected) == num_steps + 1
    for t, (got, want) in enumerate(zip(path, expected)):
        assert got.dtype == dtype and got.shape == (n, 2)
        assert_close(got, want, dtype, f"x^{num_steps - t} ({backend})")


# ---------------------------------------------------------------------------
# torch.library integration; no backward.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", OURS)
def test_opcheck(backend, device):
    x, z_mu, z_sigma = inputs((2, 3, 5, 7), torch.float32, device)
    require_backend(backend, "dpm2015_step", x, _unsupported)
    fn = getattr(torch.ops.diffusion_fast, OPS[backend]).default
    beta = torch.tensor([0.05], device=device)
    torch.library.opcheck(fn, (x, z_mu, z_sigma, beta, 0.0, 3, 7, True))
    torch.library.opcheck(fn, (x, z_mu, z_sigma, None, 0.2, 2**40, 0, True))
    torch.library.opcheck(fn, (x, z_mu, z_sigma, None, 0.2, -1, 2**32 - 1, False))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_torch_compile_fullgraph(backend, device):
    x, z_mu, z_sigma = inputs((5, 2), torch.float32, device)
    table = torch.tensor([0.1, 0.02], device=device)

    def two_steps(x, z_mu, z_sigma):
        y = dpm2015_step(x, z_mu, z_sigma, table[1], seed=3, step=10)
        return dpm2015_step(y, z_mu, z_sigma, 0.01, add_noise=False)

    with diffusion_fast.use_backend(backend):
        expected = two_steps(x, z_mu, z_sigma)
        actual = torch.compile(two_steps, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")(
            x, z_mu, z_sigma)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend,device", OURS)
def test_backward_raises(backend, device):
    x, z_mu, z_sigma = inputs((3, 2), torch.float32, device)
    z_mu.requires_grad_()
    out = run_backend(backend, dpm2015_step, x, z_mu, z_sigma, 0.1)
    with pytest.raises(NotImplementedError, match="dpm2015_step is a sampling op and has no backward"):
        out.sum().backward()


# ---------------------------------------------------------------------------
# Bad input: a clear error that names the argument, on every backend.
# ---------------------------------------------------------------------------
BAD = [
    ("x not a tensor", lambda x: {"x": x.tolist()}, TypeError, "x"),
    ("integer x", lambda x: {"x": x.long()}, TypeError, "x"),
    ("z_mu shape mismatch", lambda x: {"z_mu": x[:, :1]}, ValueError, "z_mu"),
    ("z_sigma shape mismatch", lambda x: {"z_sigma": x[:2]}, ValueError, "z_sigma"),
    ("integer z_mu", lambda x: {"z_mu": x.int()}, TypeError, "z_mu"),
    ("bool z_sigma", lambda x: {"z_sigma": x > 0}, TypeError, "z_sigma"),
    ("z_mu not a tensor", lambda x: {"z_mu": 0.0}, TypeError, "z_mu"),
    ("z_mu on another device", lambda x: {"z_mu": x.to("meta")}, ValueError, "z_mu"),
    ("z_sigma on another device", lambda x: {"z_sigma": x.to("meta")}, ValueError, "z_sigma"),
    ("beta zero", lambda x: {"beta": 0.0}, ValueError, "beta"),
    ("beta one", lambda x: {"beta": 1.0}, ValueError, "beta"),
    ("beta negative", lambda x: {"beta": -0.1}, ValueError, "beta"),
    ("beta nan", lambda x: {"beta": float("nan")}, ValueError, "beta"),
    ("beta bool", lambda x: {"beta": True}, TypeError, "beta"),
    ("beta str", lambda x: {"beta": "0.1"}, TypeError, "beta"),
    ("beta two elements", lambda x: {"beta": torch.tensor([0.1, 0.2])}, ValueError, "beta"),
    ("beta integer tensor", lambda x: {"beta": torch.tensor(1)}, TypeError, "beta"),
    ("beta on another device", lambda x: {"beta": torch.tensor(0.1, device="meta")}, ValueError, "beta"),
    ("seed negative", lambda x: {"seed": -1}, ValueError, "seed"),
    ("seed past 64 bits", lambda x: {"seed": 2**64}, ValueError, "seed"),
    ("seed float", lambda x: {"seed": 1.0}, TypeError, "seed"),
    ("step negative", lambda x: {"step": -1}, ValueError, "step"),
    ("step past 32 bits", lambda x: {"step": 2**32}, ValueError, "step"),
    ("step tensor", lambda x: {"step": torch.tensor(3)}, TypeError, "step"),
    ("add_noise not bool", lambda x: {"add_noise": 1}, TypeError, "add_noise"),
]


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
@pytest.mark.parametrize("name,change,exc,arg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, change, exc, arg):
    x = torch.randn(4, 2)
    call = {"x": x, "z_mu": torch.randn_like(x), "z_sigma": torch.randn_like(x), "beta": 0.1}
    call.update(change(x))
    with diffusion_fast.use_backend(backend), pytest.raises(exc, match=rf"dpm2015_step: {arg}\b"):
        dpm2015_step(**call)


def test_extension_checks_its_arguments():
    """The C++ op does not trust Python: direct calls with bad arguments fail clearly."""
    x = torch.randn(2, 3)
    require_backend("cuda", "dpm2015_step", x, _unsupported)
    op = torch.ops.diffusion_fast.dpm2015_step
    with pytest.raises(RuntimeError, match="z_mu must have x's shape"):
        op(x, x[:1], x, None, 0.1, 0, 0, True)
    with pytest.raises(RuntimeError, match="z_sigma must have x's dtype"):
        op(x, x, x.double(), None, 0.1, 0, 0, True)
    with pytest.raises(RuntimeError, match="beta must be"):
        op(x, x, x, torch.tensor([0.1], dtype=torch.float64), 0.0, 0, 0, True)
    with pytest.raises(RuntimeError, match="beta must be a \\(1,\\) tensor"):
        op(x, x, x, torch.tensor([0.1, 0.2]), 0.0, 0, 0, True)
    with pytest.raises(RuntimeError, match="beta_value must be in"):
        op(x, x, x, None, 1.5, 0, 0, True)
    with pytest.raises(RuntimeError, match="step must be"):
        op(x, x, x, None, 0.1, 0, 2**32, True)
