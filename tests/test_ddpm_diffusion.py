"""DDPM diffusion: schedule, forward process, L_simple and the bound in bits/dim against closed forms."""

import math

import pytest
import torch
from helpers import assert_close
from torch.distributions import Normal, kl_divergence

from diffusion_fast.diffusion import (
    DiffusionSchedule,
    calc_bpd_loop,
    discretized_gaussian_log_likelihood,
    linear_betas,
    linear_schedule,
    loss_simple,
    normal_kl,
    p_mean_variance,
    predict_xstart_from_eps,
    prior_bpd,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    vb_terms_bpd,
)
from diffusion_fast.diffusion.likelihood import approx_standard_normal_cdf, standard_normal_cdf
from diffusion_fast.models import DDPMUNet
from diffusion_fast.training import Trainer, batches

F64 = torch.float64
LOG2 = math.log(2.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is fastest


def images(n, size=4, seed=0):
    """8-bit images rescaled to [-1, 1] (both extreme bins included), float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g)
    x[0, 0, 0, 0], x[-1, -1, -1, -1] = 0, 255
    return x.to(F64) / 127.5 - 1.0


def cumprod_loop(betas, i):
    """ᾱ at 0-based index i, by a plain Python product (independent of torch.cumprod)."""
    out = 1.0
    for b in betas[: i + 1]:
        out *= 1.0 - b
    return out


# ---------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------
def test_linear_schedule_matches_closed_forms():
    s = linear_schedule()
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    assert s.num_timesteps == 1000 and all(v.dtype == F64 for v in vars(s).values())
    assert_close(s.betas, torch.tensor(betas, dtype=F64), F64, "betas")
    for i in (0, 1, 2, 500, 999):
        ac, ac_prev, b = cumprod_loop(betas, i), cumprod_loop(betas, i - 1) if i else 1.0, betas[i]
        expect = dict(
            alphas_cumprod=ac, alphas_cumprod_prev=ac_prev, sqrt_alphas_cumprod=math.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=math.sqrt(1 - ac), log_one_minus_alphas_cumprod=math.log(1 - ac),
            sqrt_recip_alphas_cumprod=1 / math.sqrt(ac), sqrt_recipm1_alphas_cumprod=math.sqrt(1 / ac - 1),
            posterior_variance=b * (1 - ac_prev) / (1 - ac),
            posterior_mean_coef1=b * math.sqrt(ac_prev) / (1 - ac),
            posterior_mean_coef2=(1 - ac_prev) * math.sqrt(1 - b) / (1 - ac),
        )
        for name, value in expect.items():
            assert getattr(s, name)[i].item() == pytest.approx(value, rel=1e-12, abs=1e-300), (name, i)
    assert s.posterior_variance[0] == 0
    clipped = s.posterior_log_variance_clipped
    assert clipped[0] == clipped[1] == math.log(s.posterior_variance[1])
    assert s.fixed_large_log_variance[0] == math.log(s.posterior_variance[1])
    assert s.fixed_large_log_variance[5].item() == pytest.approx(math.log(betas[5]), rel=1e-14)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)  # ᾱ_T of the paper's schedule


IN_RANGE = r"every beta must be in \(0, 1\)"


@pytest.mark.parametrize("betas, match", [
    ([0.1, 0.0, 0.2], IN_RANGE), ([0.1, 1.0], IN_RANGE), ([-0.1, 0.2], IN_RANGE), ([0.1, float("nan")], IN_RANGE),
    ([0.1], "betas must be 1-D with at least 2 entries"), ([[0.1, 0.2]], "betas must be 1-D"),
])
def test_bad_betas(betas, match):
    with pytest.raises(ValueError, match=match):
        DiffusionSchedule.from_betas(betas)


def test_bad_betas_types():
    with pytest.raises(TypeError, match="betas"):
        DiffusionSchedule.from_betas(torch.tensor([0.1, 0.2], dtype=torch.complex64))
    with pytest.raises(TypeError, match="betas"):
        DiffusionSchedule.from_betas(["a", "b"])
    with pytest.raises(ValueError, match="beta_start"):
        linear_betas(10, 0.0, 0.02)
    with pytest.raises(ValueError, match="num_timesteps"):
        linear_betas(0)


# ---------------------------------------------------------------------------
# Forward process
# ---------------------------------------------------------------------------
def test_q_sample_and_its_inverse():
    s, x0 = linear_schedule(), images(4)
    t, noise = torch.tensor([0, 1, 500, 999]), torch.randn_like(x0)
    xt = q_sample(s, x0, t, noise)
    ac = torch.tensor([cumprod_loop(s.betas.tolist(), i) for i in t.tolist()], dtype=F64)[:, None, None, None]
    assert_close(xt, ac.sqrt() * x0 + (1 - ac).sqrt() * noise, F64, "q_sample (Eq. 4)")
    assert_close(predict_xstart_from_eps(s, xt, t, noise), x0, F64, "x_0 from eps")
    mean, var, log_var = q_mean_variance(s, x0, t)
    assert_close(mean, ac.sqrt() * x0, F64, "q mean")
    assert_close(var, 1 - ac, F64, "q var")
    assert_close(log_var, (1 - ac).log(), F64, "q log var")
    assert q_sample(s, x0.float(), t).dtype == torch.float32


def test_q_sample_generator_is_reproducible():
    s, x0, t = linear_schedule(), images(2).float(), torch.tensor([10, 20])
    a = q_sample(s, x0, t, generator=torch.Generator().manual_seed(5))
    b = q_sample(s, x0, t, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_posterior_is_bayes_rule():
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): product of two Gaussians in x_{t-1}."""
    s, x0 = linear_schedule(), images(3)
    t = torch.tensor([1, 250, 999])
    xt = q_sample(s, x0, t, torch.randn_like(x0))
    mean, var, log_var = q_posterior_mean_variance(s, x0, xt, t)
    betas = s.betas.tolist()
    for row, i in enumerate(t.tolist()):
        b, ac_prev = betas[i], cumprod_loop(betas, i - 1)
        precision = 1 / (1 - ac_prev) + (1 - b) / b
        post_mean = (math.sqrt(ac_prev) * x0[row] / (1 - ac_prev) + math.sqrt(1 - b) * xt[row] / b) / precision
        assert_close(mean[row], post_mean, F64, f"posterior mean at t={i}")
        assert var[row].item() == pytest.approx(1 / precision, rel=1e-10)
        assert log_var[row].item() == pytest.approx(math.log(1 / precision), rel=1e-10)


# ---------------------------------------------------------------------------
# Likelihood pieces against independent closed forms
# ---------------------------------------------------------------------------
def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.randn(50, dtype=F64), torch.randn(50, dtype=F64)
    lv1, lv2 = torch.randn(50, dtype=F64), torch.randn(50, dtype=F64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert_close(normal_kl(m1, lv1, m2, lv2), expected, F64, "normal_kl")


def bin_probability(x, mean, std, points=4001):
    """∫ N(u; mean, std²) du over x's 8-bit bin, by Simpson's rule (edge bins reach ±12 std)."""
    lo = x - 1 / 255 if x > -0.999 else mean - 12 * std
    hi = x + 1 / 255 if x < 0.999 else mean + 12 * std
    u = torch.linspace(lo, hi, points, dtype=F64)
    f = torch.exp(-0.5 * ((u - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    w = torch.ones(points, dtype=F64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return ((hi - lo) / (points - 1) / 3 * (w * f).sum()).item()


def test_discretized_likelihood_is_the_integral_over_the_bin():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([-1.0, 1.0], dtype=F64), images(1, 3).flatten()[:30]])
    mean = x + torch.randn(x.shape, generator=g, dtype=F64) * 0.02
    std = torch.empty(x.shape, dtype=F64).uniform_(0.005, 0.1, generator=g)
    expected = torch.tensor([bin_probability(*v) for v in zip(x.tolist(), mean.tolist(), std.tolist())], dtype=F64)
    exact = discretized_gaussian_log_likelihood(x, mean, std.log(), exact_cdf=True)
    assert torch.allclose(exact.exp(), expected, rtol=1e-9, atol=1e-12)
    approx = discretized_gaussian_log_likelihood(x, mean, std.log())  # the official tanh approximation
    assert (approx.exp() - expected).abs().max() < 4e-4  # two CDF evaluations, each within 2e-4


def test_discretized_likelihood_sums_to_one_over_all_bins():
    x = torch.arange(256, dtype=F64) / 127.5 - 1
    for mean, std in ((0.3, 0.2), (-0.99, 0.01), (1.5, 0.5)):
        logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(std)),
                                                   exact_cdf=True)
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=256 * 1e-12)  # empty bins are floored at 1e-12


def test_cdf_approximation_error_bound():
    z = torch.linspace(-10, 10, 20001, dtype=F64)
    assert (approx_standard_normal_cdf(z) - standard_normal_cdf(z)).abs().max() < 2e-4
    assert_close(standard_normal_cdf(z), Normal(0.0, 1.0).cdf(z), F64, "exact cdf")


def test_prior_bpd_matches_torch_distributions():
    s, x0 = linear_schedule(), images(3)
    ac = cumprod_loop(s.betas.tolist(), 999)
    kl = kl_divergence(Normal(math.sqrt(ac) * x0, math.sqrt(1 - ac)), Normal(0.0, 1.0))
    assert_close(prior_bpd(s, x0), kl.mean(dim=(1, 2, 3)) / LOG2, F64, "prior bpd")
    assert (prior_bpd(s, x0) < 1e-4).all()  # ~1e-5 bits/dim, as in the paper


def near_oracle(schedule, x0):
    """ε_θ that knows x_0 up to a small error: keeps every term's probabilities far from the floor."""
    def model(x_t, t):
        ac = schedule.alphas_cumprod[t].to(x_t.dtype)[:, None, None, None]
        return (x_t - ac.sqrt() * x0) / (1 - ac).sqrt() + 0.05 * x_t
    return model


def test_vb_terms_match_closed_forms():
    """L_{t-1} = KL(Bayes posterior || N(μ_θ of Eq. 11, β_t)); L_0 = -log ∫bin N(μ_θ, β̃_2)."""
    s, x0 = linear_schedule(), images(4)
    t = torch.tensor([0, 1, 500, 999])
    xt = q_sample(s, x0, t, torch.randn_like(x0))
    model = near_oracle(s, x0)
    bpd, _ = vb_terms_bpd(model, s, x0, xt, t, clip_denoised=False, var_type="fixedlarge")
    betas, eps_all = s.betas.tolist(), model(xt, t)
    for row, i in enumerate(t.tolist()):
        b, ac, ac_prev = betas[i], cumprod_loop(betas, i), cumprod_loop(betas, i - 1) if i else 1.0
        eps = eps_all[row]
        mu = (xt[row] - b / math.sqrt(1 - ac) * eps) / math.sqrt(1 - b)  # Eq. 11
        if i == 0:
            var = betas[1] * (1 - ac) / (1 - cumprod_loop(betas, 1))  # β̃_2 stands in at t = 1
            pairs = zip(x0[row].flatten().tolist(), mu.flatten().tolist())
            probs = [bin_probability(a, m, math.sqrt(var)) for a, m in pairs]
            expected = -torch.tensor(probs, dtype=F64).log().mean().item() / LOG2
            plumbing = -discretized_gaussian_log_likelihood(x0[row], mu, torch.full_like(mu, 0.5 * math.log(var)))
            assert bpd[row].item() == pytest.approx(plumbing.mean().item() / LOG2, rel=1e-9)
            assert bpd[row].item() == pytest.approx(expected, abs=3e-3)  # tanh-approximated CDF
        else:
            precision = 1 / (1 - ac_prev) + (1 - b) / b
            post_mean = (math.sqrt(ac_prev) * x0[row] / (1 - ac_prev) + math.sqrt(1 - b) * xt[row] / b) / precision
            kl = kl_divergence(Normal(post_mean, math.sqrt(1 / precision)), Normal(mu, math.sqrt(b)))
            assert bpd[row].item() == pytest.approx(kl.mean().item() / LOG2, rel=1e-9)


def test_fixedsmall_variance_and_clipping():
    s, x0 = linear_schedule(), images(2)
    t = torch.tensor([3, 700])
    xt = q_sample(s, x0, t, torch.randn_like(x0))
    model = lambda x, t: 3.0 * x  # noqa: E731  (x̂_0 far outside [-1, 1] unless clipped)
    _, var, log_var, pred = p_mean_variance(model, s, xt, t, clip_denoised=True, var_type="fixedsmall")
    assert pred.abs().max() <= 1 and torch.equal(var.flatten(), s.posterior_variance[t])
    assert torch.equal(log_var.flatten(), s.posterior_log_variance_clipped[t])
    _, var, _, pred = p_mean_variance(model, s, xt, t, clip_denoised=False)
    assert pred.abs().max() > 1 and torch.equal(var.flatten(), s.betas[t])


# ---------------------------------------------------------------------------
# L_simple and the full bound on a tiny model
# ---------------------------------------------------------------------------
def test_loss_simple_is_eps_mse():
    s, x0 = linear_schedule(), images(3)
    t, noise = torch.tensor([0, 10, 999]), torch.randn_like(x0)
    model = lambda x, t: 0.5 * x  # noqa: E731
    ac = s.alphas_cumprod[t][:, None, None, None]
    expected = ((noise - 0.5 * (ac.sqrt() * x0 + (1 - ac).sqrt() * noise)) ** 2).mean(dim=(1, 2, 3))
    assert_close(loss_simple(model, s, x0, t=t, noise=noise), expected, F64, "L_simple (Eq. 14)")
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(loss_simple(model, s, x0, generator=g1), loss_simple(model, s, x0, generator=g2))


def structured_images(n=16, size=8):
    """Smooth oriented colour ramps on the 8-bit grid: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    angle = torch.rand(n, generator=g) * 2 * math.pi
    colour = torch.rand(n, 3, generator=g) * 2 - 1
    ramp = torch.tanh(2 * (xx * angle.cos()[:, None, None] + yy * angle.sin()[:, None, None]))
    return torch.round((ramp[:, None] * colour[:, :, None, None] + 1) * 127.5) / 127.5 - 1


def test_bpd_of_a_tiny_model_is_consistent_and_drops_with_training():
    schedule = linear_schedule(20, 1e-3, 0.3)  # short chain: 20 network calls per bound
    data = structured_images()
    model = DDPMUNet.tiny(resolution=8, attn_resolutions=(4,), backend="torch").eval()

    def bound():
        return calc_bpd_loop(model.eval(), schedule, data[:8], generator=torch.Generator().manual_seed(1))

    before = bound()
    assert before.terms_bpd.shape == (8, 20) and before.mse.shape == (8, 20)
    assert torch.isfinite(before.total_bpd).all() and (before.total_bpd > 0).all()
    assert_close(before.total_bpd, before.terms_bpd.sum(1) + before.prior_bpd, torch.float32, "total = sum of terms")
    assert_close(before.prior_bpd, prior_bpd(schedule, data[:8]), torch.float32, "prior term")

    trainer = Trainer(model, schedule, lr=1e-3, warmup=0, generator=torch.Generator().manual_seed(2))
    stream = batches(data, 8, generator=torch.Generator().manual_seed(3))
    for _ in range(30):
        trainer.step(next(stream))
    after = bound()
    assert after.total_bpd.mean() < 0.9 * before.total_bpd.mean(), (before.total_bpd.mean(), after.total_bpd.mean())


# ---------------------------------------------------------------------------
# Bad inputs name the argument
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("t, error, match", [
    (torch.tensor([0, 1000]), ValueError, r"t must be in \[0, 999\], got values in \[0, 1000\]"),
    (torch.tensor([-1, 3]), ValueError, r"t must be in \[0, 999\]"),
    (torch.tensor([0.5, 3.0]), TypeError, "t must be an integer tensor"),
    (torch.tensor([1, 2, 3]), ValueError, r"t must have shape \(2,\)"),
    ([1, 2], TypeError, "t must be a Tensor"),
])
def test_bad_timesteps(t, error, match):
    s, x0 = linear_schedule(), images(2)
    for fn in (lambda: q_sample(s, x0, t), lambda: loss_simple(lambda x, t: x, s, x0, t=t),
               lambda: vb_terms_bpd(lambda x, t: x, s, x0, x0, t)):
        with pytest.raises(error, match=match):
            fn()


def test_bad_data_and_arguments():
    s, x0, t = linear_schedule(), images(2), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="x_start must be a floating tensor"):
        q_sample(s, x0.long(), t)
    with pytest.raises(ValueError, match="noise must have x_start's shape"):
        q_sample(s, x0, t, torch.randn(2, 3, 4, 5))
    with pytest.raises(TypeError, match="schedule must be a DiffusionSchedule"):
        q_sample(s.betas, x0, t)
    with pytest.raises(ValueError, match="var_type must be one of"):
        vb_terms_bpd(lambda x, t: x, s, x0, x0, t, var_type="learned")
    with pytest.raises(ValueError, match="model\\(x_t, t\\) must return"):
        loss_simple(lambda x, t: x[:, :1], s, x0)
    with pytest.raises(ValueError, match="x_t must have x_start's shape"):
        q_posterior_mean_variance(s, x0, x0[:, :1], t)
