"""ddpm_step / ddim_step and their Philox noise: every backend against float64 formulas
written the way the official DDPM code and diffusers' DDIMScheduler.step write them."""

import math
import os
import subprocess
import sys

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
)

import diffusion_fast
from diffusion_fast.ops.philox import philox4x32_10_ref, philox_normal_ref, philox_uniforms_ref
from diffusion_fast.ops.sampler_steps import (
    OPS,
    _step_ref,
    _unsupported,
    ddim_coefficients,
    ddim_step,
    ddpm_coefficients,
    ddpm_step,
    ddpm_step_ref,
)
from diffusion_fast.ops.dpm2015_step import dpm2015_step_ref
from diffusion_fast.ops.langevin_step import langevin_step_ref

T = 1000
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)  # the DDPM paper's linear schedule
ALPHAS_CUMPROD = torch.cumprod(1.0 - BETAS, 0)
DDIM_TIMESTEPS = list(range(999, -1, -111))  # 999, 888, ..., 0: an uneven subsequence
SHAPES = {
    "image batch": (3, 3, 8, 9),
    "batch 1, odd size": (1, 5, 7, 11),  # 385 elements: a partial noise tile
    "several tiles + tail": (2, 1, 1100),  # 2200 elements
    "1-D": (13,),
}


def image_inputs(shape, dtype, device, scale=1.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    eps = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, eps


# ---------------------------------------------------------------------------
# Float64 formulas, written independently of the coefficient tables.
# ---------------------------------------------------------------------------
def ddpm_official(x, eps, t, variance, clip, z):
    """Ho et al.'s p_sample (diffusion_utils_2.py) for one scalar t, in float64."""
    betas, ac = BETAS, ALPHAS_CUMPROD
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    x, eps, z = x.double().cpu(), eps.double().cpu(), z.double().cpu()
    x0 = math.sqrt(1.0 / ac[t]) * x - math.sqrt(1.0 / ac[t] - 1) * eps
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    mean = betas[t] * torch.sqrt(ac_prev[t]) / (1 - ac[t]) * x0 + (1 - ac_prev[t]) * torch.sqrt(1 - betas[t]) / (
        1 - ac[t]) * x
    post_var = betas * (1 - ac_prev) / (1 - ac)
    log_var = {"fixedlarge": torch.log(torch.cat([post_var[1:2], betas[1:]])),
               "fixedsmall": torch.log(torch.cat([post_var[1:2], post_var[1:]]))}[variance]
    return mean + float(t != 0) * torch.exp(0.5 * log_var[t]) * z, x0


def ddim_diffusers(x, eps, t, t_prev, eta, clip, use_clipped, z):
    """diffusers' DDIMScheduler.step (epsilon prediction, set_alpha_to_one), in float64."""
    a_t = float(ALPHAS_CUMPROD[t])
    a_prev = float(ALPHAS_CUMPROD[t_prev]) if t_prev >= 0 else 1.0
    x, eps, z = x.double().cpu(), eps.double().cpu(), z.double().cpu()
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    if use_clipped:
        eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
    out = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if eta > 0:
        out = out + std * z
    return out, x0


# ---------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------
def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32 10 (counter words, key words -> output words)."""
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in kat:
        assert tuple(int(w) for w in philox4x32_10_ref(counter, key)) == expected


def test_normals_statistics():
    """Mean, variance, Kolmogorov-Smirnov distance to N(0, 1), and no correlation between lanes."""
    n = 1 << 18
    z = philox_normal_ref(2024, 17, n)
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    cdf = 0.5 * (1 + torch.erf(z.sort().values / math.sqrt(2)))
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((ranks - cdf).abs(), (cdf - (ranks - 1 / n)).abs()).max().item()
    assert ks < 1.63 / math.sqrt(n), f"KS distance {ks:.3g} (p < 0.01)"
    lanes = z.reshape(-1, 4, 256).transpose(0, 1).reshape(4, -1)  # the four normals of each counter
    corr = torch.corrcoef(lanes)
    assert (corr - torch.eye(4, dtype=torch.float64)).abs().max() < 5 / math.sqrt(lanes.shape[1])
    u = philox_uniforms_ref(2024, 17, 4096)
    assert 0 < u.min() and u.max() < 1 and ((u * 2**24) % 2 == 1).all()  # exact odd multiples of 2**-24


def test_noise_depends_on_seed_step_and_index_only():
    z = philox_normal_ref(7, 3, 5000)
    assert torch.equal(philox_normal_ref(7, 3, 3000), z[:3000])  # a prefix: independent of numel
    assert torch.equal(philox_normal_ref(7, 3, 2000, start=1500), z[1500:3500])
    for other in (philox_normal_ref(8, 3, 5000), philox_normal_ref(7, 4, 5000), philox_normal_ref(7 + 2**32, 3, 5000)):
        assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < 0.1


def backend_noise(backend, zeros, seed, step):
    """The noise stream of one backend: a step whose coefficients are (0, 0, 0, 0, 0, 1)."""
    row = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0], dtype=zeros.dtype, device=zeros.device)
    if backend == "torch":
        return _step_ref(zeros, zeros, row, seed, step, None, None, True)[0]
    require_backend(backend, "ddpm_step", zeros, _unsupported)
    op = getattr(torch.ops.diffusion_fast, OPS["ddpm_step"][backend])
    return op(zeros, zeros, row, None, seed - 2**64 if seed >= 2**63 else seed, step, None, False)[0]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_noise_identical_on_every_backend(backend, device):
    """In-kernel noise equals the reference stream to float rounding, for seeds and steps up to 64/32 bits."""
    assert_noise_stream(backend, device, lambda zeros, seed, step: backend_noise(backend, zeros, seed, step))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="x86 Philox paths are Linux/GCC-only")
def test_cpu_philox_paths_agree():
    """The portable and AVX2 Philox loops of the C++ kernel give the bits of the default (best) one."""
    x = torch.zeros(3000)
    require_backend("cuda", "ddpm_step", x, _unsupported)
    script = (
        "import torch, diffusion_fast as df\n"
        "x = torch.zeros(3000); t = torch.tensor([[0., 0, 0, 0, 0, 1]])\n"
        "with df.use_backend('cuda'):\n"
        "    z = df.ddpm_step(x, x, t, 0, seed=2**63 + 5, clip_x0=False)\n"
        "print(z.view(torch.int32).tolist())\n"
    )
    with diffusion_fast.use_backend("cuda"):
        expected = ddpm_step(x, x, torch.tensor([[0.0, 0, 0, 0, 0, 1]]), 0, seed=2**63 + 5, clip_x0=False)
    for isa in ("portable", "avx2"):
        env = dict(os.environ, DIFFUSION_FAST_CPU_PHILOX=isa)
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(expected.view(torch.int32).tolist()), f"{isa} path differs"


# ---------------------------------------------------------------------------
# Coefficient tables
# ---------------------------------------------------------------------------
def test_ddpm_table():
    large, small = ddpm_coefficients(BETAS, "fixedlarge", dtype=torch.float64), ddpm_coefficients(BETAS, "fixedsmall",
                                                                                                    dtype=torch.float64)
    assert large.shape == (T, 6) and large.dtype == torch.float64
    assert large[0, 5] == 0 and small[0, 5] == 0  # no noise at t = 0
    torch.testing.assert_close(large[1:, 5] ** 2, BETAS[1:])
    assert (small[2:, 5] < large[2:, 5]).all()
    torch.testing.assert_close(large[:, :5], small[:, :5])
    assert ddpm_coefficients(BETAS.float()).dtype == torch.float32


def test_ddim_table():
    ts = DDIM_TIMESTEPS
    deterministic = ddim_coefficients(ALPHAS_CUMPROD, ts, 0.0, dtype=torch.float64)
    assert deterministic.shape == (len(ts), 6) and (deterministic[:, 5] == 0).all()
    torch.testing.assert_close(deterministic[-1, 2], torch.tensor(1.0, dtype=torch.float64))  # abar_prev = 1 at the end
    full = ddim_coefficients(ALPHAS_CUMPROD, list(range(T - 1, -1, -1)), 1.0, dtype=torch.float64)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ALPHAS_CUMPROD[:-1]])
    posterior_var = BETAS * (1 - ac_prev) / (1 - ALPHAS_CUMPROD)
    torch.testing.assert_close(full[:, 5].flip(0) ** 2, posterior_var)  # eta = 1 over every step: DDPM's variance


# ---------------------------------------------------------------------------
# Steps against the float64 formulas
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_matches_official(backend, device, variance, clip):
    for dtype in dtypes_for(backend, device):
        tab = ddpm_coefficients(BETAS.to(device), variance, dtype=torch.promote_types(dtype, torch.float32))
        for i, (name, shape) in enumerate(SHAPES.items()):
            t = (999, 500, 1, 0)[i]
            x, eps = image_inputs(shape, dtype, device, scale=1.5)
            require_backend(backend, "ddpm_step", x, _unsupported)
            out, x0 = run_backend(backend, ddpm_step, x, eps, tab, t, seed=11 + i, clip_x0=clip, return_x0=True)
            assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
            z = philox_normal_ref(11 + i, t, x.numel()).reshape(shape)
            ref, ref_x0 = ddpm_official(x, eps, t, variance, clip, z)
            assert_close(out, ref, dtype, f"x_prev ({name}, t={t})")
            assert_close(x0, ref_x0, dtype, f"x0 ({name}, t={t})")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("clip,use_clipped", [(False, False), (True, False), (True, True)])
def test_ddim_matches_diffusers(backend, device, eta, clip, use_clipped):
    ts = DDIM_TIMESTEPS
    for dtype in dtypes_for(backend, device):
        tab = ddim_coefficients(ALPHAS_CUMPROD.to(device), ts, eta, use_clipped_model_output=use_clipped,
                                dtype=torch.promote_types(dtype, torch.float32))
        for i, (name, shape) in zip((0, 4, len(ts) - 1), list(SHAPES.items())[:3]):  # first, middle, last step
            x, eps = image_inputs(shape, dtype, device, scale=1.5)
            require_backend(backend, "ddim_step", x, _unsupported)
            out, x0 = run_backend(backend, ddim_step, x, eps, tab, i, seed=5, clip_x0=clip, return_x0=True)
            z = philox_normal_ref(5, i, x.numel()).reshape(shape)
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            ref, ref_x0 = ddim_diffusers(x, eps, ts[i], t_prev, eta, clip, use_clipped, z)
            assert_close(out, ref, dtype, f"x_prev ({name}, step {i})")
            assert_close(x0, ref_x0, dtype, f"x0 ({name}, step {i})")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_noise_free_steps_ignore_the_seed(backend, device):
    """DDPM at t = 0 and DDIM with eta = 0 add no noise: the seed does not matter."""
    x, eps = image_inputs((2, 3, 5, 5), torch.float32, device)
    ddpm, ddim = ddpm_coefficients(BETAS.to(device)), ddim_coefficients(ALPHAS_CUMPROD.to(device), DDIM_TIMESTEPS)
    with diffusion_fast.use_backend(backend):
        assert torch.equal(ddpm_step(x, eps, ddpm, 0, seed=1), ddpm_step(x, eps, ddpm, 0, seed=2))
        assert torch.equal(ddim_step(x, eps, ddim, 3, seed=1), ddim_step(x, eps, ddim, 3, seed=2))
        assert not torch.equal(ddpm_step(x, eps, ddpm, 1, seed=1), ddpm_step(x, eps, ddpm, 1, seed=2))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_given_noise_and_layouts(backend, device):
    """A passed noise tensor replaces z; non-contiguous and mixed-dtype inputs work."""
    table = ddpm_coefficients(BETAS.to(device), "fixedsmall")
    base_x, base_eps = image_inputs((2, 3, 6, 10), torch.float32, device)
    x, eps = base_x[..., ::2], base_eps.transpose(2, 3).contiguous().transpose(2, 3)[..., ::2]
    noise = torch.randn(2, 3, 10, 6, device=device).transpose(2, 3)[..., :5]
    assert not x.is_contiguous() and not eps.is_contiguous() and not noise.is_contiguous()
    out = run_backend(backend, ddpm_step, x, eps.half(), table, 300, noise=noise, clip_x0=False)
    ref, _ = ddpm_official(x, eps.half(), 300, "fixedsmall", False, noise)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert_close(out, ref, torch.float32, "x_prev with given noise")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", ["ddpm_step", "ddim_step"])
def test_channels_last_in_channels_last_out(backend, device, op):
    """channels_last x_t gives channels_last x_prev and x0 with the values (and noise) of the contiguous call:
    a model sampled in channels_last keeps that layout from step to step."""
    fn, table = ((ddpm_step, ddpm_coefficients(BETAS.to(device), "fixedlarge")) if op == "ddpm_step" else
                 (ddim_step, ddim_coefficients(ALPHAS_CUMPROD.to(device), DDIM_TIMESTEPS, 0.7)))
    x, eps = image_inputs((2, 3, 5, 7), torch.float32, device)
    cl = torch.channels_last
    out, x0 = run_backend(backend, fn, x.contiguous(memory_format=cl), eps.contiguous(memory_format=cl), table, 4,
                          seed=9, return_x0=True)
    want, want_x0 = run_backend(backend, fn, x, eps, table, 4, seed=9, return_x0=True)
    assert not out.is_contiguous() and out.is_contiguous(memory_format=cl) and x0.is_contiguous(memory_format=cl)
    assert torch.equal(out, want) and torch.equal(x0, want_x0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_empty_batch(backend, device):
    x = torch.empty(0, 3, 4, 4, device=device)
    out, x0 = run_backend(backend, ddim_step, x, x, ddim_coefficients(ALPHAS_CUMPROD.to(device), [500, 0], 1.0), 0,
                          return_x0=True)
    assert out.shape == x0.shape == x.shape


@pytest.mark.parametrize("backend,device", OURS)
def test_short_chain_matches_reference(backend, device):
    """Ten DDPM steps of a toy eps model, seeded: the backend's samples match the reference's."""
    table = ddpm_coefficients(BETAS.to(device))
    x_ref = x = torch.randn(2, 3, 8, 8, device=device)
    for t in range(9, -1, -1):
        x = run_backend(backend, ddpm_step, x, 0.1 * x, table, t, seed=42)
        x_ref = run_backend("torch", ddpm_step, x_ref, 0.1 * x_ref, table, t, seed=42)
    torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)


def to_float64(sched):
    """diffusers keeps its schedule in float32, which loses 1 - abar_t at small t; compare in float64."""
    sched.betas = sched.betas.double()
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, 0)
    for name in ("one", "final_alpha_cumprod"):
        if isinstance(getattr(sched, name, None), torch.Tensor):
            setattr(sched, name, getattr(sched, name).double())
    return sched


@pytest.mark.parametrize("variance,clip", [("fixed_small", True), ("fixed_large", False)])
def test_ddpm_matches_diffusers_scheduler(variance, clip):
    """diffusers' DDPMScheduler.step, fed the same noise (drawn from its generator), on the extension."""
    diffusers = pytest.importorskip("diffusers")
    sched = to_float64(diffusers.DDPMScheduler(num_train_timesteps=T, variance_type=variance, clip_sample=clip))
    table = ddpm_coefficients(sched.betas, variance.replace("_", ""))
    for t in (999, 500, 1, 0):
        x, eps = image_inputs((2, 3, 8, 8), torch.float32, "cpu", scale=1.5)
        expected = sched.step(eps.double(), t, x.double(), generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        out = run_backend("cuda", ddpm_step, x, eps, table, t, clip_x0=clip, noise=noise)
        assert_close(out, expected, torch.float32, f"x_prev (t={t})")


@pytest.mark.parametrize("eta,clip,use_clipped", [(0.0, False, False), (1.0, True, True), (0.5, True, False)])
def test_ddim_matches_diffusers_scheduler(eta, clip, use_clipped):
    """diffusers' DDIMScheduler.step with variance_noise, on the extension."""
    diffusers = pytest.importorskip("diffusers")
    sched = to_float64(diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=clip, set_alpha_to_one=True))
    sched.set_timesteps(10)
    timesteps = sched.timesteps.tolist()
    table = ddim_coefficients(sched.alphas_cumprod, timesteps, eta, use_clipped_model_output=use_clipped)
    for i, t in enumerate(timesteps):
        x, eps = image_inputs((2, 3, 8, 8), torch.float32, "cpu", scale=1.5)
        noise = torch.randn_like(x)
        expected = sched.step(eps.double(), t, x.double(), eta=eta, use_clipped_model_output=use_clipped,
                              variance_noise=noise.double())
        out, x0 = run_backend("cuda", ddim_step, x, eps, table, i, clip_x0=clip, noise=noise, return_x0=True)
        assert_close(out, expected.prev_sample, torch.float32, f"x_prev (t={t})")
        assert_close(x0, expected.pred_original_sample, torch.float32, f"x0 (t={t})")


# ---------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", OURS)
@pytest.mark.parametrize("op", ["ddpm_step", "ddim_step"])
def test_opcheck(backend, device, op):
    x, eps = image_inputs((2, 3, 5, 7), torch.float32, device)
    require_backend(backend, op, x, _unsupported)
    fn = getattr(torch.ops.diffusion_fast, OPS[op][backend]).default
    coef = torch.tensor([1.2, 0.3, 0.5, 0.4, 0.1, 0.7], device=device)
    torch.library.opcheck(fn, (x, eps, coef, None, 3, 7, 1.0, True))
    torch.library.opcheck(fn, (x, eps, coef, torch.randn_like(x), 2**40, 0, None, False))


@pytest.mark.parametrize("backend,device", backend_devices_without("triton"))
def test_torch_compile_fullgraph(backend, device):
    table = ddpm_coefficients(BETAS.to(device))
    x, eps = image_inputs((2, 3, 4, 4), torch.float32, device)

    def step(x, eps):
        return ddpm_step(x, eps, table, 10, seed=3)

    with diffusion_fast.use_backend(backend):
        expected = step(x, eps)
        actual = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")(x, eps)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------
# GPU specifics: misaligned pointers (scalar path) and offsets past 2**31.
# ---------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_misaligned_inputs_cuda(backend):
    table = ddpm_coefficients(BETAS.cuda())
    x, eps = (torch.randn(4001, device="cuda")[1:] for _ in range(2))  # storage offset 1: no 16-byte alignment
    out = run_backend(backend, ddpm_step, x, eps, table, 700, seed=9)
    ref, _ = ddpm_official(x, eps, 700, "fixedlarge", True, philox_normal_ref(9, 700, 4000))
    assert_close(out, ref, torch.float32, "x_prev (misaligned)")


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_large_tensor_cuda(backend):
    numel = 2**31 + 3000
    x = torch.zeros(numel, dtype=torch.float16, device="cuda")
    with diffusion_fast.use_backend(backend):
        z = ddpm_step(x, x, torch.tensor([[0.0, 0, 0, 0, 0, 1]], device="cuda"), 0, seed=4, clip_x0=False)
    expected = philox_normal_ref(4, 0, 3000, start=numel - 3000)
    assert_close(z[numel - 3000:], expected, torch.float16, "noise past 2**31")


# ---------------------------------------------------------------------------
# Bad input: a clear error that names the argument, on every backend.
# ---------------------------------------------------------------------------
DDPM_TABLE = ddpm_coefficients(BETAS)
BAD = [
    ("x not a tensor", lambda x: dict(x_t=x.tolist()), TypeError, "x_t"),
    ("integer x", lambda x: dict(x_t=x.long()), TypeError, "x_t"),
    ("0-D x", lambda x: dict(x_t=x[0, 0, 0, 0]), ValueError, "x_t"),
    ("eps shape mismatch", lambda x: dict(eps=x[:, :2]), ValueError, "eps"),
    ("integer eps", lambda x: dict(eps=x.int()), TypeError, "eps"),
    ("noise shape mismatch", lambda x: dict(noise=x[0]), ValueError, "noise"),
    ("coefficients wrong width", lambda x: dict(coefficients=DDPM_TABLE[:, :5]), ValueError, "coefficients"),
    ("coefficients on another device", lambda x: dict(coefficients=DDPM_TABLE.to("meta")), ValueError, "coefficients"),
    ("t out of range", lambda x: dict(t=T), ValueError, "t"),
    ("t negative", lambda x: dict(t=-1), ValueError, "t"),
    ("t float", lambda x: dict(t=5.0), TypeError, "t"),
    ("seed negative", lambda x: dict(seed=-1), ValueError, "seed"),
    ("seed past 64 bits", lambda x: dict(seed=2**64), ValueError, "seed"),
    ("clip_range zero", lambda x: dict(clip_range=0.0), ValueError, "clip_range"),
    ("clip_x0 not bool", lambda x: dict(clip_x0=1), TypeError, "clip_x0"),
]


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
@pytest.mark.parametrize("name,change,exc,arg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, change, exc, arg):
    x = torch.randn(2, 3, 4, 4)
    call = dict(x_t=x, eps=torch.randn_like(x), coefficients=DDPM_TABLE, t=10)
    call.update(change(x))
    with diffusion_fast.use_backend(backend), pytest.raises(exc, match=arg):
        ddpm_step(**call)


def test_bad_tables_and_ddim_index():
    with pytest.raises(ValueError, match="variance"):
        ddpm_coefficients(BETAS, "learned")
    with pytest.raises(ValueError, match="betas"):
        ddpm_coefficients(BETAS * 100)
    with pytest.raises(ValueError, match="eta"):
        ddim_coefficients(ALPHAS_CUMPROD, DDIM_TIMESTEPS, -0.1)
    with pytest.raises(ValueError, match="eta"):
        ddim_coefficients(ALPHAS_CUMPROD, DDIM_TIMESTEPS, float("nan"))
    with pytest.raises(ValueError, match="timesteps"):
        ddim_coefficients(ALPHAS_CUMPROD, DDIM_TIMESTEPS[::-1])
    with pytest.raises(ValueError, match="timesteps"):
        ddim_coefficients(ALPHAS_CUMPROD, [T, 5])
    table = ddim_coefficients(ALPHAS_CUMPROD, DDIM_TIMESTEPS)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="i must be"):
        ddim_step(x, x, table, len(DDIM_TIMESTEPS))


def test_extension_checks_its_arguments():
    """The C++ op does not trust Python: a direct call with mismatched shapes fails clearly."""
    x = torch.randn(2, 3)
    require_backend("cuda", "ddpm_step", x, _unsupported)
    coef = torch.zeros(6)
    with pytest.raises(RuntimeError, match="eps must have x's shape"):
        torch.ops.diffusion_fast.ddpm_step(x, x[:1], coef, None, 0, 0, None, False)
    with pytest.raises(RuntimeError, match="coef must be"):
        torch.ops.diffusion_fast.ddpm_step(x, x, coef.double(), None, 0, 0, None, False)
    with pytest.raises(RuntimeError, match="step must be"):
        torch.ops.diffusion_fast.ddpm_step(x, x, coef, None, 0, 2**32, None, False)


def test_references_run_on_the_inputs_device():
    """The plain-PyTorch steps and their Philox noise stay on x's device (meta stands in for CUDA
    here: a CPU tensor mixed in fails on meta as it does on a GPU)."""
    x = torch.randn(2, 3, 5, 5, device="meta")
    coefficients = ddpm_coefficients(torch.linspace(1e-4, 0.02, 10, dtype=torch.float64))
    outs = [ddpm_step_ref(x, x, coefficients, 5, seed=1), langevin_step_ref(x, x, 0.1, seed=1),
            dpm2015_step_ref(x, x, x, 0.1, seed=1), philox_normal_ref(3, 4, 2000, device="meta")]
    assert all(o.device.type == "meta" for o in outs)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 5, 5)] * 3 + [(2000,)]
