"""Langevin samplers: NCSN's Algorithm 1 step by step, Gaussian data with an analytic score
model (the chain's mean and variance follow in closed form), one seed -> one sample on every backend."""

import math

import pytest
import torch
from helpers import BACKEND_DEVICES

import diffusion_fast
from diffusion_fast.ops.langevin_step import langevin_step_ref
from diffusion_fast.samplers import annealed_langevin_dynamics, langevin_dynamics
from diffusion_fast.score_matching import geometric_sigmas


class GaussianScore:
    """The exact noise-conditional score of data N(mu, s^2 I): s(x, sigma_i) = -(x - mu) / (s^2 + sigma_i^2)."""

    def __init__(self, mu, s, sigmas):
        self.mu, self.s, self.sigmas = mu, s, sigmas
        self.calls = []

    def __call__(self, x, labels):
        assert labels.dtype == torch.int64 and labels.shape == (x.shape[0],)
        self.calls.append(labels)
        var = self.s**2 + self.sigmas.to(x.device, x.dtype)[labels] ** 2
        return -(x - self.mu) / var.reshape(-1, *([1] * (x.dim() - 1)))


def test_annealed_loop_is_algorithm_1():
    sigmas = torch.tensor([1.0, 0.4, 0.1], dtype=torch.float64)
    model = GaussianScore(0.2, 0.5, sigmas)
    x0 = torch.rand(2, 3, 5, 4, dtype=torch.float64)
    states = annealed_langevin_dynamics(model, x0, sigmas, n_steps_each=4, step_lr=1e-3, seed=9, return_all=True)
    assert len(states) == 3 * 4 + 1
    assert [int(labels[0]) for labels in model.calls] == [0] * 4 + [1] * 4 + [2] * 4 + [2]
    y = x0
    for i, sigma in enumerate(sigmas.tolist()):
        alpha = 1e-3 * sigma**2 / 0.1**2
        for t in range(4):
            y = langevin_step_ref(y, model(y, torch.full((2,), i)), alpha, seed=9, step=4 * i + t)
            torch.testing.assert_close(states[4 * i + t], y)
    y = y + 0.1**2 * model(y, torch.full((2,), 2))  # the final denoising step: no noise
    torch.testing.assert_close(states[-1], y)
    final = annealed_langevin_dynamics(model, x0, sigmas, n_steps_each=4, step_lr=1e-3, seed=9)
    torch.testing.assert_close(final, y)
    raw = annealed_langevin_dynamics(model, x0, sigmas, n_steps_each=4, step_lr=1e-3, seed=9, denoise=False)
    torch.testing.assert_close(raw, states[-2])


def test_annealed_chain_reaches_the_gaussian(one_thread):
    """Data N(mu, s^2 I), exact scores: follow each coordinate's mean m and variance q through the
    chain (m' = (1 - c) m + c mu, q' = (1 - c)^2 q + 2 alpha, c = alpha / (s^2 + sigma^2)) and compare
    with the samples; the end is near N(mu, s^4 / (s^2 + sigma_L^2)), the denoised law."""
    mu, s, steps, step_lr = 0.3, 0.5, 100, 2e-3
    sigmas = geometric_sigmas(3.0, 0.1, 8).double()
    x0 = torch.rand(128, 256, dtype=torch.float64)  # NCSN starts from uniform noise
    x = annealed_langevin_dynamics(GaussianScore(mu, s, sigmas), x0, sigmas, n_steps_each=steps, step_lr=step_lr,
                                   seed=1)
    m, q = 0.5, 1.0 / 12.0  # U(0, 1)
    for sigma in sigmas.tolist():
        alpha = step_lr * sigma**2 / sigmas[-1].item() ** 2
        c = alpha / (s**2 + sigma**2)
        for _ in range(steps):
            m, q = (1 - c) * m + c * mu, (1 - c) ** 2 * q + 2 * alpha
    shrink = 1 - sigmas[-1].item() ** 2 / (s**2 + sigmas[-1].item() ** 2)  # denoising: x <- mu + shrink (x - mu)
    m, q = mu + shrink * (m - mu), shrink**2 * q
    n = x.numel()
    assert abs(x.mean().item() - m) < 5 * math.sqrt(q / n)
    assert abs(x.var().item() - q) < 5 * math.sqrt(2 / n) * q
    target_var = s**4 / (s**2 + sigmas[-1].item() ** 2)
    assert abs(m - mu) < 0.01 and abs(q / target_var - 1) < 0.03  # the chain has converged


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] != "torch"])
def test_backends_give_the_same_samples(backend, device):
    sigmas = geometric_sigmas(1.0, 0.05, 4)
    model = GaussianScore(0.1, 0.3, sigmas)
    x0 = torch.rand(2, 3, 8, 8, device=device)

    def run():
        return annealed_langevin_dynamics(model, x0, sigmas, n_steps_each=3, step_lr=1e-3, seed=5)

    with diffusion_fast.use_backend("torch"):
        expected = run()
    with diffusion_fast.use_backend(backend):
        actual = run()
    assert (expected - x0).abs().max() > 0.1
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_seed_decides_the_sample():
    sigmas = geometric_sigmas(1.0, 0.05, 3)
    model = GaussianScore(0.0, 0.5, sigmas)
    x0 = torch.rand(2, 3, 4, 4)
    a, b, c = (annealed_langevin_dynamics(model, x0, sigmas, step_lr=1e-3, seed=seed) for seed in (1, 1, 2))
    assert torch.equal(a, b) and (a - c).abs().max() > 0.05


def test_plain_langevin_dynamics():
    x0 = torch.randn(3, 2000, dtype=torch.float64)

    def score(x):  # score of N(1, 0.5²)
        return -(x - 1.0) / 0.25

    x = langevin_dynamics(score, x0, 0.01, 7, seed=3)
    y = x0
    for t in range(7):
        y = langevin_step_ref(y, score(y), 0.01, seed=3, step=t)
    torch.testing.assert_close(x, y)
    assert langevin_dynamics(score, x0, 0.01, 0) is x0
    table = torch.tensor([0.5, 0.01], dtype=torch.float64)
    torch.testing.assert_close(langevin_dynamics(score, x0, table[1], 7, seed=3), y)


@pytest.mark.cuda
def test_cuda_sampling_matches_cpu_and_never_syncs():
    sigmas = geometric_sigmas(1.0, 0.05, 4)
    x0 = torch.rand(2, 3, 8, 8)
    cpu = annealed_langevin_dynamics(GaussianScore(0.1, 0.3, sigmas), x0, sigmas, n_steps_each=3, step_lr=1e-3,
                                     seed=11)
    model, x0 = GaussianScore(0.1, 0.3, sigmas.cuda()), x0.cuda()  # the model's own table on the GPU
    annealed_langevin_dynamics(model, x0, sigmas, n_steps_each=3, step_lr=1e-3, seed=11)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:  # sigmas stay on the host: the sampler copies its tables to the GPU once, without a sync
        gpu = annealed_langevin_dynamics(model, x0, sigmas, n_steps_each=3, step_lr=1e-3, seed=11)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_graph_replay_matches_op_by_op():
    """cuda_graph=True replays the score model from one CUDA graph for every level: the same samples."""
    sigmas = geometric_sigmas(1.0, 0.05, 4)
    model, x0 = GaussianScore(0.1, 0.3, sigmas.cuda()), torch.rand(2, 3, 8, 8, device="cuda")
    plain = annealed_langevin_dynamics(model, x0, sigmas, n_steps_each=3, step_lr=1e-3, seed=11)
    graphed = annealed_langevin_dynamics(model, x0, sigmas, n_steps_each=3, step_lr=1e-3, seed=11, cuda_graph=True)
    torch.testing.assert_close(graphed, plain)


def test_cuda_graph_needs_a_cuda_device():
    sigmas = geometric_sigmas(1.0, 0.05, 2)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        annealed_langevin_dynamics(GaussianScore(0.1, 0.3, sigmas), torch.rand(1, 4), sigmas, cuda_graph=True)


@pytest.mark.parametrize("kwargs,match", [
    ({"sigmas": [0.1, 1.0]}, "strictly decreasing"),
    ({"sigmas": [1.0, 1.0]}, "strictly decreasing"),
    ({"sigmas": [1.0, 0.0]}, "sigmas"),
    ({"sigmas": []}, "sigmas"),
    ({"sigmas": [[1.0, 0.1]]}, "sigmas"),
    ({"n_steps_each": 0}, "n_steps_each"),
    ({"step_lr": 0.0}, "step_lr"),
    ({"step_lr": float("nan")}, "step_lr"),
    ({"x_init": torch.zeros(2, 3, dtype=torch.int64)}, "x_init"),
])
def test_bad_input(kwargs, match):
    call = {"model": lambda x, labels: -x, "x_init": torch.rand(2, 3), "sigmas": [1.0, 0.1]}
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        annealed_langevin_dynamics(**call)
    with pytest.raises(ValueError, match="n_steps"):
        langevin_dynamics(lambda x: -x, torch.rand(2, 3), 0.1, -1)
