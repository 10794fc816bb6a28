"""Sohl-Dickstein et al. 2015: schedule, closed-form bound terms vs Bayes and Monte Carlo, the
null-model identity K = L_null, a short training run, seeded sampling, bad inputs."""

import math

import pytest
import torch
from helpers import assert_close

from diffusion_fast.diffusion.dpm2015 import (
    DiffusionProcess2015,
    baseline_betas,
    null_log_likelihood,
    temporal_basis,
    to_bits,
    train_dpm2015,
)
from diffusion_fast.models.dpm2015 import RBFReverseNet
from diffusion_fast.ops.philox import philox_normal_ref

T = 12


def process(num_steps=T, randomize=0.0, **kw):
    proc = DiffusionProcess2015(RBFReverseNet(2, num_steps, 16), num_steps, **kw).double()
    with torch.no_grad():
        for p in proc.parameters():
            p.add_(torch.randn_like(p) * randomize)
    return proc


def swiss_roll(n, seed):
    sklearn = pytest.importorskip("sklearn.datasets")
    x, _ = sklearn.make_swiss_roll(n, noise=0.0, random_state=seed)
    x = torch.tensor(x[:, [0, 2]], dtype=torch.float64)
    return (x - x.mean(0)) / x.std(0)


# ---------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------
def test_beta_schedule_is_the_official_formula_with_beta1_fixed():
    proc = process(num_steps=40, step1_beta=1e-3)
    betas = proc.betas().detach()
    b = 1.0 / torch.tensor([40 - (40 - 2) * i / 39 for i in range(40)], dtype=torch.float64)
    expected = 1e-6 + b * (1 - 1e-6 - 1e-5)  # sigmoid(logit(b)) = b while the perturbation is 0
    assert betas[0] == pytest.approx(1e-3, rel=1e-6)
    assert_close(betas[1:], expected[1:], torch.float32, "β_2..T")
    assert b[1] > b[0] and b[-1] == 0.5
    assert_close(baseline_betas(40), b, torch.float64, "baseline")


def test_schedule_is_learned_except_beta1():
    proc = process(num_steps=40)
    grad, = torch.autograd.grad(proc.betas()[1:].sum(), proc.beta_perturb)
    assert grad.abs().min() > 0  # every bump moves some β_t, t >= 2
    grad1, = torch.autograd.grad(proc.betas()[0], proc.beta_perturb, allow_unused=True, materialize_grads=True)
    assert not grad1.any()
    frozen = process(learn_betas=False)
    assert not frozen.beta_perturb.requires_grad


def test_temporal_basis_bumps():
    basis = temporal_basis(40, 10)
    assert basis.shape == (10, 40)
    assert_close(basis.sum(0), torch.ones(40, dtype=torch.float64), torch.float64, "columns sum to 1")
    assert basis[0].argmax() == 0 and basis[-1].argmax() == 39


# ---------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------
def test_q_posterior_is_bayes_rule():
    proc = process(randomize=0.5)
    betas = proc.betas().detach()
    x0, xt = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    for step in (2, 7, T):
        t = torch.full((5,), step)
        abar_prev = math.prod(1 - betas[s].item() for s in range(step - 1))
        beta = betas[step - 1].item()
        # x^(t-1) | x^0 ~ N(sqrt(abar_prev) x0, 1 - abar_prev); x^t | x^(t-1) ~ N(sqrt(1 - beta) x^(t-1), beta)
        precision = 1 / (1 - abar_prev) + (1 - beta) / beta
        mean = (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(1 - beta) * xt / beta) / precision
        got_mean, got_var = proc.q_posterior(x0, xt, t)
        assert_close(got_mean, mean, torch.float64, f"posterior mean t={step}")
        assert_close(got_var, torch.full((5, 1), 1 / precision, dtype=torch.float64), torch.float64, "posterior var")


def test_kl_term_matches_monte_carlo():
    proc = process(randomize=0.3)
    x0, noise = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([2, 6, T])
    kl = proc.kl_term(x0, t, noise)
    xt = proc.q_sample(x0, t, noise)
    mq, vq = proc.q_posterior(x0, xt, t)
    mp, vp = proc.p_mean_variance(xt, t)
    z = torch.randn(200_000, 3, 2, dtype=torch.float64)
    s = mq + vq.sqrt() * z

    def log_normal(v, m, var):
        return (-0.5 * (math.log(2 * math.pi) + torch.log(var) + (v - m) ** 2 / var)).sum(-1)

    mc = (log_normal(s, mq, vq) - log_normal(s, mp, vp)).mean(0)
    assert (kl > 0).all()
    assert torch.allclose(kl, mc, rtol=0.02, atol=2e-3), (kl, mc)


def test_entropies_in_closed_form():
    proc = process(randomize=0.2)
    betas = proc.betas().detach()
    for step in (1, 5, T):
        var = 1 - math.prod(1 - betas[s].item() for s in range(step))
        expected = math.log(2 * math.pi * math.e * var)  # D/2 log(2πe var) with D = 2
        assert proc.entropy_q(step, torch.float64).item() == pytest.approx(expected, rel=1e-9)
    assert proc.entropy_q(1, torch.float64).item() == pytest.approx(math.log(2 * math.pi * math.e * 1e-3), rel=1e-9)
    assert proc.entropy_prior() == pytest.approx(math.log(2 * math.pi * math.e))


def test_null_reverse_kernels_give_k_equal_to_l_null():
    """Zero readouts make p the forward chain's reversal under π: the model density is π and the bound is tight."""
    proc = process()
    x0 = torch.randn(4000, 2, dtype=torch.float64) * torch.tensor([0.5, 1.3], dtype=torch.float64)
    x0 = x0 / x0.square().mean(0).sqrt()  # unit second moment: the paper's K is then exact in expectation
    gap = proc.bound(x0, samples=2, generator=torch.Generator().manual_seed(0)) - null_log_likelihood(x0)
    assert abs(gap.mean()) < 4 * gap.std() / math.sqrt(gap.numel())  # zero up to Monte Carlo error
    assert gap.std() / math.sqrt(gap.numel()) < 0.02
    assert null_log_likelihood(x0).mean().item() == pytest.approx(-(1 + math.log(2 * math.pi)), rel=1e-9)


def test_l_null_units_match_the_papers_table_1():
    """Table 1 gives K = 2.35 and K - L_null = 6.45 bits on the swiss roll, so L_null = -4.10 bits: the
    log-likelihood under π = N(0, I) of 2-D data of unit variance, in bits per point (not per dimension)."""
    x0 = swiss_roll(5000, 3)
    l_null = to_bits(null_log_likelihood(x0)).mean().item()
    by_hand = -(1 + math.log(2 * math.pi)) / math.log(2)  # -D/2 (1 + log 2π) nats, D = 2, E|x|² = 2
    assert l_null == pytest.approx(by_hand, abs=2e-3)
    assert l_null == pytest.approx(2.35 - 6.45, abs=0.01)


def test_bound_estimate_is_unbiased():
    proc = process(randomize=0.3)
    x0 = swiss_roll(64, 0)
    exact = proc.bound(x0, samples=64, generator=torch.Generator().manual_seed(1)).mean()
    estimates = torch.stack([proc.bound_estimate(x0, torch.Generator().manual_seed(s)).mean() for s in range(400)])
    assert abs(estimates.mean() - exact) < 4 * estimates.std() / 20


# ---------------------------------------------------------------------------
# Training and sampling
# ---------------------------------------------------------------------------
def test_short_training_improves_k_and_samples_the_roll(one_thread):
    torch.manual_seed(0)
    proc = DiffusionProcess2015(RBFReverseNet(2, 20, 16), 20, step1_beta=1e-3)
    train, test = swiss_roll(2000, 0).float(), swiss_roll(1000, 1).float()
    before = to_bits(proc.bound(test, generator=torch.Generator().manual_seed(3))).mean().item()
    history = train_dpm2015(proc, train, steps=500, batch_size=200, lr=2e-2, cosine_decay=False)
    after = to_bits(proc.bound(test, generator=torch.Generator().manual_seed(3))).mean().item()
    assert len(history) == 500
    assert after > before + 0.4, (before, after)
    nearest = torch.cdist(proc.sample(500, seed=0), train).min(1).values
    noise_only = torch.cdist(torch.randn(500, 2), train).min(1).values
    assert nearest.median() < 0.65 * noise_only.median(), (nearest.median(), noise_only.median())


def test_sampling_is_seeded_and_shaped():
    proc = process(randomize=0.3).float()
    a = proc.sample(7, seed=3)
    path = proc.sample(7, seed=3, trajectory=True)
    assert a.shape == (7, 2) and a.dtype == torch.float32
    assert len(path) == T + 1 and torch.equal(path[-1], a)
    assert torch.equal(path[0], philox_normal_ref(3, T, 14, torch.float32).reshape(7, 2))
    assert not torch.equal(proc.sample(7, seed=4), a)
    beta1 = proc.step1_beta
    last = math.sqrt(1 - beta1) * path[-2] + math.sqrt(beta1) * philox_normal_ref(3, 0, 14, torch.float32).reshape(7, 2)
    assert_close(a, last, torch.float32, "the fixed t = 1 step")


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: DiffusionProcess2015(RBFReverseNet(2, 4), 1), "num_steps"),
    (lambda: DiffusionProcess2015(RBFReverseNet(2, 4), 4, step1_beta=1.0), "step1_beta"),
    (lambda: RBFReverseNet(0, 4), "dim"),
    (lambda: RBFReverseNet(2, 4)(torch.zeros(3, 3), torch.ones(3, dtype=torch.long)), r"x must have shape \(N, 2\)"),
    (lambda: RBFReverseNet(2, 4)(torch.zeros(3, 2), torch.ones(3)), "t must be an int64"),
    (lambda: process().sample(0), "n must be a positive int"),
])
def test_bad_inputs(make, match):
    with pytest.raises(ValueError, match=match):
        make()
