"""Sampling loops: the algorithm step by step, one seed -> one sample on every backend."""

import pytest
import torch

import diffusion_fast
from diffusion_fast.diffusion.schedules import linear_betas
from diffusion_fast.models import DDPMUNet
from diffusion_fast.ops.sampler_steps import ddim_coefficients, ddim_step_ref, ddpm_coefficients, ddpm_step_ref
from diffusion_fast.samplers import initial_noise, sample_ddim, sample_ddpm

BETAS = linear_betas(20, 1e-3, 0.2)  # a short chain keeps the tests fast


def toy_model(x, t):
    """An ε-predictor with t-dependence, cheap enough to unroll by hand."""
    return 0.3 * x + 0.01 * t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_ddpm_loop_is_algorithm_2(variance):
    shape = (2, 3, 5, 4)
    x = sample_ddpm(toy_model, shape, betas=BETAS, variance=variance, seed=7)
    table = ddpm_coefficients(BETAS, variance, dtype=torch.float64)
    y = initial_noise(shape, 7, 20, "cpu", torch.float64)
    for t in reversed(range(20)):
        y = ddpm_step_ref(y, toy_model(y, torch.full((2,), t)), table, t, seed=7)
    torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5)


def test_ddim_loop_follows_the_subsequence():
    shape = (1, 2, 3, 3)
    ts = [19, 12, 5, 0]
    abar = torch.cumprod(1.0 - BETAS, 0)
    x = sample_ddim(toy_model, shape, alphas_cumprod=abar, timesteps=ts, eta=0.5, seed=3)
    table = ddim_coefficients(abar, ts, 0.5, dtype=torch.float64)
    y = initial_noise(shape, 3, len(ts), "cpu", torch.float64)
    for i, t in enumerate(ts):
        y = ddim_step_ref(y, toy_model(y, torch.full((1,), t)), table, i, seed=3)
    torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5)


def test_seed_decides_the_sample():
    a = sample_ddpm(toy_model, (2, 3, 4, 4), betas=BETAS, seed=1)
    b = sample_ddpm(toy_model, (2, 3, 4, 4), betas=BETAS, seed=1)
    c = sample_ddpm(toy_model, (2, 3, 4, 4), betas=BETAS, seed=2)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_backends_give_the_same_samples(sampler):
    """The UNet and the step kernels on our extension reproduce the reference backend's samples."""
    torch.manual_seed(0)
    model = DDPMUNet.tiny(resolution=8, attn_resolutions=(4,)).eval()
    run = {"ddpm": lambda: sample_ddpm(model, (2, 3, 8, 8), betas=BETAS, seed=5),
           "ddim": lambda: sample_ddim(model, (2, 3, 8, 8), num_steps=4,
                                       alphas_cumprod=torch.cumprod(1 - BETAS, 0), eta=1.0, seed=5)}[sampler]
    with diffusion_fast.use_backend("torch"):
        expected = run()
    with diffusion_fast.use_backend("cuda"):
        actual = run()
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_cuda_sampling_matches_cpu_and_never_syncs(sampler):
    torch.manual_seed(0)
    model = DDPMUNet.tiny(resolution=8, attn_resolutions=(4,)).eval()

    def sample(device=None):
        if sampler == "ddpm":
            return sample_ddpm(model, (2, 3, 8, 8), betas=BETAS, seed=11, device=device)
        abar = torch.cumprod(1.0 - BETAS, 0)
        return sample_ddim(model, (2, 3, 8, 8), num_steps=5, eta=1.0, alphas_cumprod=abar, seed=11, device=device)

    cpu = sample()
    model.cuda()
    sample("cuda")  # warm-up: lazy init may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = sample("cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "cuda"], ids=["torch", "ext"])  # "cuda": our C++ on the CPU
def test_channels_last_sampling_stays_channels_last(backend):
    """From a channels_last x_T every step feeds the model channels_last input, with the samples of NCHW."""
    torch.manual_seed(0)
    model = DDPMUNet.tiny(resolution=8, attn_resolutions=(4,)).eval()
    x_t = initial_noise((2, 3, 8, 8), 5, 4, "cpu", torch.float32)
    layouts = []

    def spy(x, t):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return model(x, t)

    with diffusion_fast.use_backend(backend):
        want = sample_ddim(model, (2, 3, 8, 8), num_steps=4, eta=1.0, seed=5, x_init=x_t)
        got = sample_ddim(spy, (2, 3, 8, 8), num_steps=4, eta=1.0, seed=5,
                          x_init=x_t.contiguous(memory_format=torch.channels_last))
    assert layouts == [True] * 4
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3,), (2, 0, 4), [2, 3.0, 4], "2,3"])
def test_bad_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        sample_ddpm(toy_model, shape, betas=BETAS)


def test_bad_num_steps():
    with pytest.raises(ValueError, match="num_steps"):
        sample_ddim(toy_model, (1, 1, 2, 2), num_steps=0)


def test_cuda_graph_needs_a_cuda_device():
    with pytest.raises(ValueError, match="cuda_graph"):
        sample_ddpm(toy_model, (1, 1, 2, 2), betas=BETAS, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph"):
        sample_ddim(toy_model, (1, 1, 2, 2), num_steps=2, cuda_graph="yes")


@pytest.mark.cuda
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_cuda_graph_replay_gives_the_eager_samples(sampler):
    """The graphed loop replays one captured UNet forward per step: same samples, graph reused."""
    from diffusion_fast.cuda_graphs import graphed

    torch.manual_seed(0)
    model = DDPMUNet.tiny(resolution=8, attn_resolutions=(4,)).eval().cuda()
    run = {"ddpm": lambda g, seed: sample_ddpm(model, (2, 3, 8, 8), betas=BETAS, seed=seed, device="cuda",
                                                cuda_graph=g),
           "ddim": lambda g, seed: sample_ddim(model, (2, 3, 8, 8), num_steps=5, eta=1.0, seed=seed,
                                                alphas_cumprod=torch.cumprod(1 - BETAS, 0), device="cuda",
                                                cuda_graph=g)}[sampler]
    for seed in (1, 2):  # the second call replays the graph captured by the first
        torch.testing.assert_close(run(True, seed), run(False, seed), atol=1e-5, rtol=1e-5)
    assert len(graphed(model)._graphs) == 1


def test_x_init_replaces_the_seed_noise():
    shape = (2, 3, 4, 4)
    x_T = initial_noise(shape, 9, 20, "cpu", torch.float32)
    expected = sample_ddpm(toy_model, shape, betas=BETAS, seed=4)
    start = initial_noise(shape, 4, 20, "cpu", torch.float32)
    torch.testing.assert_close(sample_ddpm(toy_model, shape, betas=BETAS, seed=4, x_init=start), expected)
    assert (sample_ddpm(toy_model, shape, betas=BETAS, seed=4, x_init=x_T) - expected).abs().max() > 0.1
    with pytest.raises(ValueError, match="x_init"):
        sample_ddim(toy_model, shape, num_steps=2, x_init=torch.randn(1, 3, 4, 4))
    with pytest.raises(TypeError, match="x_init"):
        sample_ddim(toy_model, shape, num_steps=2, x_init=torch.zeros(shape, dtype=torch.long))
