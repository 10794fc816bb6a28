"""Noise-conditional score matching: noise levels and the denoising score matching loss of NCSN
(Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data Distribution") and
NCSNv2 (Song & Ermon 2020, "Improved Techniques for Training Score-Based Generative Models").

Score-model convention, shared with ``diffusion_fast.samplers.annealed_langevin_dynamics``:
``model(x, labels)`` returns s(x, sigma_i) of x's shape for labels: (B,) int64 noise-level
indices i into a decreasing table sigma_1 > ... > sigma_L; the model divides by sigma itself.

- ``geometric_sigmas``: the geometric sequence sigma_1 = sigma_max, ..., sigma_L = sigma_min.
- ``sigma_max_from_data`` (NCSNv2 Technique 1): sigma_1 = the largest pairwise distance in the data.
- ``num_levels_for`` (Technique 2): L such that the common ratio gamma = sigma_{i-1} / sigma_i meets
  Phi(sqrt(2D) (gamma - 1) + 3 gamma) - Phi(sqrt(2D) (gamma - 1) - 3 gamma) >= overlap (~0.5).
- ``step_size_for`` (Technique 4): the epsilon of Algorithm 1 (alpha_i = epsilon sigma_i^2 / sigma_L^2)
  that brings s_T^2 / sigma_i^2 (``langevin_variance_ratio``) closest to 1.
- ``dsm_loss``: the annealed denoising score matching loss (NCSN Eq. 6, lambda(sigma) = sigma^2).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "dsm_loss",
    "geometric_sigmas",
    "langevin_variance_ratio",
    "level_overlap",
    "num_levels_for",
    "sigma_max_from_data",
    "step_size_for",
]


def _positive(fn: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {v!r}")
    return float(v)


def _check_range(fn: str, sigma_max, sigma_min) -> tuple:
    sigma_max, sigma_min = _positive(fn, "sigma_max", sigma_max), _positive(fn, "sigma_min", sigma_min)
    if sigma_max <= sigma_min:
        raise ValueError(f"{fn}: sigma_max must be > sigma_min (levels decrease), got {sigma_max} <= {sigma_min}")
    return sigma_max, sigma_min


def _int_at_least(fn: str, name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{fn}: {name} must be an int >= {low}, got {v!r}")
    return int(v)


def geometric_sigmas(sigma_max: float, sigma_min: float, num_levels: int, *, device=None) -> Tensor:
    """(num_levels,) float32 noise levels sigma_max = sigma_1 > ... > sigma_L = sigma_min, equally
    spaced in log (computed in float64, as NCSNv2's ``get_sigmas``)."""
    sigma_max, sigma_min = _check_range("geometric_sigmas", sigma_max, sigma_min)
    num_levels = _int_at_least("geometric_sigmas", "num_levels", num_levels, 2)
    logs = torch.linspace(math.log(sigma_max), math.log(sigma_min), num_levels, dtype=torch.float64)
    return torch.exp(logs).to(device=device, dtype=torch.float32)


@torch.no_grad()
def sigma_max_from_data(x: Tensor, *, chunk_size: int = 2048) -> float:
    """NCSNv2 Technique 1: the largest Euclidean distance between two rows of x (N, ...).

    Distances come from ||a||^2 + ||b||^2 - 2 a.b over (chunk_size, chunk_size) blocks of the upper
    triangle (memory O(chunk_size^2), not O(N^2)), in float32 (float64 for float64 x), on x's
    device; the winning pair's distance is then recomputed directly in float64. One host sync.
    """
    fn = "sigma_max_from_data"
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] < 2:
        raise ValueError(f"{fn}: x must be a floating tensor (N, ...) with N >= 2")
    chunk_size = _int_at_least(fn, "chunk_size", chunk_size, 1)
    flat = x.detach().reshape(x.shape[0], -1)
    data = flat.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    sq = (data * data).sum(1)
    n = data.shape[0]
    best, where = [], []  # per block: max squared distance (0-d tensor) and (i, j, flat argmax)
    for i in range(0, n, chunk_size):
        a = data[i:i + chunk_size]
        for j in range(i, n, chunk_size):
            b = data[j:j + chunk_size]
            d2 = sq[i:i + chunk_size, None] + sq[None, j:j + chunk_size] - 2.0 * (a @ b.T)
            value, index = d2.reshape(-1).max(0)
            best.append(value)
            where.append((i, j, b.shape[0], index))
    k = int(torch.stack(best).argmax())  # the host sync
    i, j, width, index = where[k]
    p, q = i + int(index) // width, j + int(index) % width
    return float((flat[p].double() - flat[q].double()).norm())


def _phi(t: float) -> float:
    return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))


def level_overlap(gamma: float, dim: int) -> float:
    """Technique 2's Phi(sqrt(2D) (gamma - 1) + 3 gamma) - Phi(sqrt(2D) (gamma - 1) - 3 gamma):
    roughly how much the norm shells of N(0, sigma_i^2 I) and N(0, sigma_{i-1}^2 I) in D
    dimensions overlap, for gamma = sigma_{i-1} / sigma_i."""
    gamma = _positive("level_overlap", "gamma", gamma)
    dim = _int_at_least("level_overlap", "dim", dim, 1)
    shift = math.sqrt(2.0 * dim) * (gamma - 1.0)
    return _phi(shift + 3.0 * gamma) - _phi(shift - 3.0 * gamma)


def num_levels_for(sigma_max: float, sigma_min: float, dim: int, overlap: float = 0.5) -> int:
    """NCSNv2 Technique 2: the fewest geometric levels from sigma_max to sigma_min (D = ``dim``
    dimensions) whose ratio gamma keeps ``level_overlap(gamma, dim) >= overlap``.

    ``level_overlap`` is 0.9973 at gamma = 1, rises, then falls to 0 when sqrt(2D) > 3 (dim >= 5),
    so the largest admissible gamma is the one root on its falling side (bisection), and
    L = ceil(log(sigma_max / sigma_min) / log gamma) + 1. The paper's settings (e.g. CIFAR-10:
    50 -> 0.01, D = 3072, L = 232) have level_overlap ~ 0.57 by this formula.
    """
    fn = "num_levels_for"
    sigma_max, sigma_min = _check_range(fn, sigma_max, sigma_min)
    dim = _int_at_least(fn, "dim", dim, 5)
    ceiling = level_overlap(1.0, dim)
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real) or not 0.0 < overlap < ceiling:
        raise ValueError(f"{fn}: overlap must be in (0, {ceiling:.4f}), got {overlap!r}")
    lo, hi = 1.0, 2.0
    while level_overlap(hi, dim) >= overlap:  # level_overlap -> 0 as gamma grows (dim >= 5)
        lo, hi = hi, 2.0 * hi
    for _ in range(200):  # invariant: overlap(lo) >= target > overlap(hi)
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if level_overlap(mid, dim) >= overlap else (lo, mid)
    intervals = math.log(sigma_max / sigma_min) / math.log(lo)
    return max(2, math.ceil(intervals - 1e-9) + 1)


def langevin_variance_ratio(step_size: float, sigma_min: float, gamma: float, n_steps_each: int) -> float:
    """NCSNv2 Proposition 3 / Technique 4: s_T^2 / sigma_i^2 after T = ``n_steps_each`` Langevin steps
    at level i (step alpha_i = epsilon sigma_i^2 / sigma_L^2) started from N(0, sigma_{i-1}^2 I)::

        (1 - r)^(2T) (gamma^2 - 2 eps / (sigma_L^2 - sigma_L^2 (1 - r)^2)) + 2 eps / (sigma_L^2 - sigma_L^2 (1 - r)^2)

    with r = eps / sigma_L^2 in (0, 1). It exceeds 1 for every eps when gamma > 1.
    """
    fn = "langevin_variance_ratio"
    eps, sigma_min = _positive(fn, "step_size", step_size), _positive(fn, "sigma_min", sigma_min)
    gamma = _positive(fn, "gamma", gamma)
    steps = _int_at_least(fn, "n_steps_each", n_steps_each, 1)
    r = eps / sigma_min**2
    if r >= 1.0:
        raise ValueError(f"{fn}: step_size must be < sigma_min^2 = {sigma_min**2:.3g}, got {eps}")
    stationary = 2.0 * eps / (sigma_min**2 - sigma_min**2 * (1.0 - r) ** 2)
    return (1.0 - r) ** (2 * steps) * (gamma**2 - stationary) + stationary


def step_size_for(sigma_min: float, gamma: float, n_steps_each: int) -> float:
    """NCSNv2 Technique 4: the epsilon in (0, sigma_min^2) that brings ``langevin_variance_ratio``
    maximally close to 1, i.e. its minimiser (golden-section search on r = eps / sigma_min^2).

    ``gamma`` > 1: the levels' common ratio sigma_{i-1} / sigma_i. Reproduces the official configs,
    e.g. CIFAR-10 (sigma 50 -> 0.01, L = 232, T = 5): 6.2e-6.
    """
    fn = "step_size_for"
    sigma_min = _positive(fn, "sigma_min", sigma_min)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not (math.isfinite(gamma) and gamma > 1):
        raise ValueError(f"{fn}: gamma must be a finite number > 1 (sigma_(i-1) / sigma_i), got {gamma!r}")
    steps = _int_at_least(fn, "n_steps_each", n_steps_each, 1)

    def ratio(r: float) -> float:
        return langevin_variance_ratio(r * sigma_min**2, sigma_min, gamma, steps)

    golden = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = 0.0, 1.0
    c, d = b - golden * (b - a), a + golden * (b - a)
    fc, fd = ratio(c), ratio(d)
    for _ in range(200):
        if b - a < 1e-15:
            break
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - golden * (b - a)
            fc = ratio(c)
        else:
            a, c, fc = c, d, fd
            d = a + golden * (b - a)
            fd = ratio(d)
    return 0.5 * (a + b) * sigma_min**2


def dsm_loss(model: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas: Tensor, labels: Tensor | None = None,
             anneal_power: float = 2.0, *, noise: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Annealed denoising score matching (NCSN Eq. 5-6; NCSNv2's ``anneal_dsm_score_estimation``).

    x: (B, ...) data; sigmas: (L,) noise levels; labels: (B,) int64 level indices, uniform over
    [0, L) when None (drawn first, then the noise, as the official code draws them). With
    z = ``noise`` or ~ N(0, I), x~ = x + sigma z and the target -(x~ - x) / sigma^2 = -z / sigma::

        loss = mean_b 1/2 sum_j (model(x~, labels)_bj - target_bj)^2 * sigma_b^anneal_power

    (anneal_power = 2 is lambda(sigma) = sigma^2). Labels and noise not given are drawn from
    ``generator`` (the global RNG when None). Returns a 0-d tensor.
    """
    fn = "dsm_loss"
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"{fn}: x must be a floating tensor (B, ...)")
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.numel() == 0 or not sigmas.is_floating_point():
        raise ValueError(f"{fn}: sigmas must be a non-empty 1-D floating tensor")
    if isinstance(anneal_power, bool) or not isinstance(anneal_power, numbers.Real):
        raise TypeError(f"{fn}: anneal_power must be a number, got {type(anneal_power).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    batch = x.shape[0]
    sigmas = sigmas.to(x.device)
    device = generator.device if generator is not None else x.device  # a CPU generator may feed CUDA data
    if labels is None:
        labels = torch.randint(0, sigmas.numel(), (batch,), device=device, generator=generator).to(x.device)
    elif not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (batch,):
        raise ValueError(f"{fn}: labels must be an int64 tensor of shape ({batch},)")
    if noise is None:
        noise = torch.randn(x.shape, device=device, dtype=x.dtype, generator=generator).to(x.device)
    elif not isinstance(noise, Tensor) or noise.shape != x.shape:
        raise ValueError(f"{fn}: noise must be a tensor of x's shape {tuple(x.shape)}")
    used = sigmas[labels].reshape(batch, *([1] * (x.dim() - 1)))
    scores = model(x + used * noise, labels)
    if scores.shape != x.shape:
        raise ValueError(f"{fn}: the model returned shape {tuple(scores.shape)}, expected x's {tuple(x.shape)}")
    target = -noise / used
    per_sample = 0.5 * (scores - target).pow(2).reshape(batch, -1).sum(1) * sigmas[labels] ** anneal_power
    return per_sample.mean()
