"""Noise levels (NCSNv2 Techniques 1, 2, 4) and the denoising score matching loss, against
formulas computed independently here and the official NCSNv2 configurations."""

import math

import pytest
import torch

import diffusion_fast
from diffusion_fast.score_matching import (
    dsm_loss,
    geometric_sigmas,
    langevin_variance_ratio,
    level_overlap,
    num_levels_for,
    sigma_max_from_data,
    step_size_for,
)

# Official NCSNv2 configs (ermongroup/ncsnv2 configs/*.yml): sigma_begin, num_classes, n_steps_each,
# step_lr, data dimension D; sigma_end = 0.01 everywhere.
CONFIGS = {
    "cifar10": (50.0, 232, 5, 6.2e-6, 3 * 32 * 32),
    "celeba": (90.0, 500, 5, 3.3e-6, 3 * 64 * 64),
    "ffhq": (348.0, 2311, 3, 0.9e-6, 3 * 256 * 256),
}


def ratio_of(sigma_max, num_levels, sigma_min=0.01):
    return (sigma_max / sigma_min) ** (1.0 / (num_levels - 1))


# ---------------------------------------------------------------------------
# geometric_sigmas
# ---------------------------------------------------------------------------
def test_geometric_sigmas():
    sigmas = geometric_sigmas(50.0, 0.01, 232)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (232,)
    i = torch.arange(232, dtype=torch.float64)
    expected = 50.0 * (0.01 / 50.0) ** (i / 231)  # sigma_i = sigma_1 gamma^-(i - 1)
    torch.testing.assert_close(sigmas.double(), expected, rtol=1e-6, atol=0)
    assert (sigmas[1:] < sigmas[:-1]).all()
    torch.testing.assert_close(sigmas[:-1] / sigmas[1:], torch.full((231,), ratio_of(50.0, 232)), rtol=1e-5, atol=0)
    assert geometric_sigmas(1.0, 0.5, 2, device="meta").device.type == "meta"


@pytest.mark.parametrize("args", [(0.0, 0.01, 10), (50.0, -1.0, 10), (0.01, 50.0, 10), (1.0, 1.0, 10),
                                  (50.0, 0.01, 1), (50.0, 0.01, 2.0), (float("inf"), 0.01, 10), (True, 0.01, 10)])
def test_geometric_sigmas_bad_input(args):
    with pytest.raises(ValueError, match="geometric_sigmas: (sigma_max|sigma_min|num_levels)"):
        geometric_sigmas(*args)


# ---------------------------------------------------------------------------
# Technique 1: the largest pairwise distance
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [7, 64, 10_000])
def test_sigma_max_from_data_matches_brute_force(chunk_size):
    x = torch.randn(203, 3, 4, 5)
    expected = torch.cdist(x.flatten(1).double(), x.flatten(1).double()).max().item()
    assert sigma_max_from_data(x, chunk_size=chunk_size) == pytest.approx(expected, rel=1e-12)


def test_sigma_max_from_data_planted_pair():
    """Points in the unit ball and two at +-10 e_1: the answer is 20 exactly, also from float16."""
    x = torch.nn.functional.normalize(torch.randn(100, 16), dim=1) * torch.rand(100, 1)
    x[17], x[80] = 0.0, 0.0
    x[17, 0], x[80, 0] = 10.0, -10.0
    assert sigma_max_from_data(x, chunk_size=32) == pytest.approx(20.0, rel=1e-12)
    assert sigma_max_from_data(x.half(), chunk_size=32) == pytest.approx(20.0, rel=1e-12)


@pytest.mark.parametrize("x", [torch.randn(1, 3), torch.arange(6).reshape(3, 2), "data"])
def test_sigma_max_from_data_bad_input(x):
    with pytest.raises(ValueError, match="sigma_max_from_data: x"):
        sigma_max_from_data(x)


# ---------------------------------------------------------------------------
# Technique 2: the number of levels
# ---------------------------------------------------------------------------
def test_level_overlap_formula():
    phi = torch.special.ndtr  # an independent normal CDF
    assert level_overlap(1.0, 3072) == pytest.approx(float(phi(torch.tensor(3.0)) - phi(torch.tensor(-3.0))))
    for gamma, dim in [(1.03, 3072), (1.2, 10), (1.001, 196608)]:
        shift = math.sqrt(2 * dim) * (gamma - 1)
        t = torch.tensor([shift + 3 * gamma, shift - 3 * gamma], dtype=torch.float64)
        assert level_overlap(gamma, dim) == pytest.approx(float(phi(t[0]) - phi(t[1])), rel=1e-12)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_num_levels_for_official_configs(name):
    """The official level counts sit at level_overlap ~ 0.567; asking for exactly their overlap gives them back."""
    sigma_max, levels, _, _, dim = CONFIGS[name]
    achieved = level_overlap(ratio_of(sigma_max, levels), dim)
    assert 0.5 < achieved < 0.6
    assert num_levels_for(sigma_max, 0.01, dim, overlap=achieved) == levels


@pytest.mark.parametrize("sigma_max,sigma_min,dim,overlap", [(50.0, 0.01, 3072, 0.5), (1.0, 0.1, 5, 0.3),
                                                             (348.0, 0.01, 196608, 0.9), (2.0, 1.0, 100, 0.05)])
def test_num_levels_for_is_the_fewest(sigma_max, sigma_min, dim, overlap):
    levels = num_levels_for(sigma_max, sigma_min, dim, overlap)
    assert level_overlap(ratio_of(sigma_max, levels, sigma_min), dim) >= overlap
    if levels > 2:
        assert level_overlap(ratio_of(sigma_max, levels - 1, sigma_min), dim) < overlap


@pytest.mark.parametrize("kwargs,arg", [({"dim": 4}, "dim"), ({"overlap": 0.998}, "overlap"),
                                        ({"overlap": 0.0}, "overlap"), ({"sigma_min": 60.0}, "sigma_max")])
def test_num_levels_for_bad_input(kwargs, arg):
    call = {"sigma_max": 50.0, "sigma_min": 0.01, "dim": 3072, "overlap": 0.5}
    call.update(kwargs)
    with pytest.raises(ValueError, match=f"num_levels_for: {arg}"):
        num_levels_for(**call)


# ---------------------------------------------------------------------------
# Technique 4: the step size
# ---------------------------------------------------------------------------
def test_langevin_variance_ratio_is_the_chain_variance():
    """Langevin on N(0, sigma_i^2) from N(0, sigma_{i-1}^2): iterate the variance recursion
    v' = (1 - a / sigma_i^2)^2 v + 2a, a = eps sigma_i^2 / sigma_L^2, and compare."""
    for sigma_i, sigma_min, gamma, eps, steps in [(1.0, 0.01, 1.04, 6.2e-6, 5), (3.0, 0.1, 1.5, 2e-3, 7)]:
        alpha = eps * sigma_i**2 / sigma_min**2
        v = (gamma * sigma_i) ** 2
        for _ in range(steps):
            v = (1 - alpha / sigma_i**2) ** 2 * v + 2 * alpha
        assert langevin_variance_ratio(eps, sigma_min, gamma, steps) == pytest.approx(v / sigma_i**2, rel=1e-12)


def test_langevin_variance_ratio_by_sampling(one_thread):
    """The same with the fused op on 2**16 samples: the empirical s_T^2 / sigma_i^2 matches."""
    sigma_i, sigma_min, gamma, eps, steps = 2.0, 0.1, 1.5, 3e-3, 5
    alpha = eps * sigma_i**2 / sigma_min**2
    x = gamma * sigma_i * torch.randn(256, 256, dtype=torch.float64)
    for step in range(steps):
        x = diffusion_fast.langevin_step(x, -x / sigma_i**2, alpha, seed=4, step=step)
    expected = langevin_variance_ratio(eps, sigma_min, gamma, steps)
    assert abs(x.var().item() / sigma_i**2 - expected) < 5 * math.sqrt(2 / x.numel()) * expected


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_size_for_official_configs(name):
    sigma_max, levels, steps, step_lr, _ = CONFIGS[name]
    gamma = ratio_of(sigma_max, levels)
    eps = step_size_for(0.01, gamma, steps)
    assert eps == pytest.approx(step_lr, rel=0.02)  # the configs print 2 significant digits
    best = langevin_variance_ratio(eps, 0.01, gamma, steps)
    assert best > 1
    for other in (eps * 0.99, eps * 1.01, eps * 0.5, eps * 2):
        assert langevin_variance_ratio(other, 0.01, gamma, steps) > best  # "maximally close to 1"


@pytest.mark.parametrize("kwargs,arg", [({"gamma": 1.0}, "gamma"), ({"gamma": 0.9}, "gamma"),
                                        ({"n_steps_each": 0}, "n_steps_each"), ({"sigma_min": 0.0}, "sigma_min")])
def test_step_size_for_bad_input(kwargs, arg):
    call = {"sigma_min": 0.01, "gamma": 1.04, "n_steps_each": 5}
    call.update(kwargs)
    with pytest.raises(ValueError, match=f"step_size_for: {arg}"):
        step_size_for(**call)
    with pytest.raises(ValueError, match="langevin_variance_ratio: step_size"):
        langevin_variance_ratio(1e-4, 0.01, 1.04, 5)  # eps must stay below sigma_min^2


# ---------------------------------------------------------------------------
# dsm_loss
# ---------------------------------------------------------------------------
class TinyScoreNet(torch.nn.Module):
    """s(x, i) = (W x + b_i) / sigma_i on flattened x: a model that divides by sigma itself."""

    def __init__(self, dim, sigmas):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
        self.level_bias = torch.nn.Parameter(torch.randn(len(sigmas), dim))
        self.register_buffer("sigmas", sigmas)

    def forward(self, x, labels):
        assert labels.dtype == torch.int64 and labels.shape == (x.shape[0],)
        flat = self.lin(x.flatten(1)) + self.level_bias[labels]
        return (flat / self.sigmas[labels, None]).reshape(x.shape)


def official_loss(model, x, sigmas, anneal_power):
    """NCSNv2's anneal_dsm_score_estimation written out: labels, then noise, from the global RNG."""
    labels = torch.randint(0, len(sigmas), (x.shape[0],), device=x.device)
    used = sigmas[labels].view(x.shape[0], *([1] * len(x.shape[1:])))
    noise = torch.randn_like(x) * used
    target = -1 / (used**2) * noise
    scores = model(x + noise, labels)
    loss = 1 / 2.0 * ((scores.view(x.shape[0], -1) - target.view(x.shape[0], -1)) ** 2).sum(dim=-1)
    return (loss * used.squeeze() ** anneal_power).mean(dim=0)


@pytest.mark.parametrize("anneal_power", [2.0, 0.0, 1.5])
def test_dsm_loss_matches_the_official_formula(anneal_power):
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    model = TinyScoreNet(2 * 3 * 3, sigmas)
    x = torch.randn(16, 2, 3, 3)
    torch.manual_seed(5)
    ours = dsm_loss(model, x, sigmas, anneal_power=anneal_power)
    torch.manual_seed(5)
    expected = official_loss(model, x, sigmas, anneal_power)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0)
    ours.backward()
    assert model.lin.weight.grad is not None and model.lin.weight.grad.abs().sum() > 0


def test_dsm_loss_draws_from_the_generator():
    """With ``generator``: labels then noise from it, not from the global RNG (per-rank noise under DDP)."""
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    model = TinyScoreNet(2 * 3 * 3, sigmas)
    x = torch.randn(8, 2, 3, 3)
    g = torch.Generator().manual_seed(11)
    labels, noise = torch.randint(0, 10, (8,), generator=g), torch.randn(8, 2, 3, 3, generator=g)
    expected = dsm_loss(model, x, sigmas, labels, noise=noise)
    torch.manual_seed(0)
    ours = dsm_loss(model, x, sigmas, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.manual_seed(0)
    assert dsm_loss(model, x, sigmas) != ours  # the global RNG gives other draws
    with pytest.raises(TypeError, match="dsm_loss: generator"):
        dsm_loss(model, x, sigmas, generator=11)


def test_dsm_loss_closed_forms():
    sigmas = torch.tensor([2.0, 0.5, 0.1])
    x, noise = torch.randn(6, 4, 5), torch.randn(6, 4, 5)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    sigma = sigmas[labels]
    # A zero model: loss = 1/2 mean_b |z_b|^2 / sigma_b^2 * sigma_b^p.
    zero = dsm_loss(lambda xt, i: torch.zeros_like(xt), x, sigmas, labels, anneal_power=3.0, noise=noise)
    expected = (0.5 * noise.pow(2).sum((1, 2)) * sigma**1.0).mean()
    torch.testing.assert_close(zero, expected)
    # An oracle that knows x returns the target -(x~ - x) / sigma^2: loss 0.
    oracle = dsm_loss(lambda xt, i: -(xt - x) / sigmas[i, None, None] ** 2, x, sigmas, labels, noise=noise)
    assert oracle.abs().item() < 1e-9


def test_dsm_loss_is_minimised_by_the_true_score():
    """Data N(0, s^2 I): the optimum is the perturbed score -x~ / (s^2 + sigma^2); scaling it costs loss."""
    s, sigmas = 0.8, torch.tensor([1.5, 0.7, 0.2])
    x = s * torch.randn(4096, 8, dtype=torch.float64)
    labels, noise = torch.randint(0, 3, (4096,)), torch.randn_like(x)

    def loss(scale):
        def model(xt, i):
            return -scale * xt / (s**2 + sigmas.double()[i, None] ** 2)
        return dsm_loss(model, x, sigmas.double(), labels, noise=noise).item()

    assert loss(1.0) < loss(0.9) and loss(1.0) < loss(1.1)


@pytest.mark.parametrize("change,match", [
    ({"x": torch.arange(4)}, "x"),
    ({"sigmas": torch.tensor([])}, "sigmas"),
    ({"sigmas": [1.0, 0.1]}, "sigmas"),
    ({"labels": torch.tensor([0, 1, 0, 1], dtype=torch.int32)}, "labels"),
    ({"labels": torch.tensor([0, 1])}, "labels"),
    ({"noise": torch.randn(4, 2)}, "noise"),
    ({"model": lambda xt, i: xt[:, :1]}, "the model returned"),
])
def test_dsm_loss_bad_input(change, match):
    call = {"model": lambda xt, i: xt, "x": torch.randn(4, 3), "sigmas": torch.tensor([1.0, 0.1])}
    call.update(change)
    with pytest.raises(ValueError, match=f"dsm_loss: {match}"):
        dsm_loss(**call)
    with pytest.raises(TypeError, match="anneal_power"):
        dsm_loss(lambda xt, i: xt, torch.randn(4, 3), torch.tensor([1.0, 0.1]), anneal_power="2")
