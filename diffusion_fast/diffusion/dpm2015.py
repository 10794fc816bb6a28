"""Gaussian diffusion probabilistic model of Sohl-Dickstein et al. 2015, "Deep Unsupervised Learning
using Nonequilibrium Thermodynamics" (Secs. 2.1-2.4, Eq. 14; official
Sohl-Dickstein/Diffusion-Probabilistic-Models ``model.py``). Timesteps t = 1..T as in the paper.

Forward:  q(x^t | x^(t-1)) = N(x^t; sqrt(1 - β_t) x^(t-1), β_t I), π = N(0, I), so
          q(x^t | x^0) = N(sqrt(ᾱ_t) x^0, (1 - ᾱ_t) I) with ᾱ_t = Π_{s<=t} (1 - β_s).
Schedule: β_1 fixed (small, "to prevent overfitting"); β_2..T learned by ascent on K (Sec. 2.4.1)
          as in the official code: β_t = m + (1 - m - 1e-5) sigmoid(logit(b_t) + Σ_k c_k φ_k(t)),
          b = 1 / linspace(T, 2, T) (each step removes a constant fraction of the data's variance),
          φ_k Gaussian bumps in t, c_k learned (start 0), m = 1e-6.
Reverse:  p(x^(t-1) | x^t) = N(μ, diag Σ) for t >= 2 from a network's (z_μ, z_Σ), parametrised
          like the official ``get_mu_sigma``: μ = sqrt(1 - β_t) x^t + sqrt(β_t) z_μ,
          Σ = sigmoid(z_Σ + logit β_t). At t = 1 the kernel is the forward step's reversal
          under π (Sec. 2.4, edge effect): p(x^0 | x^1) = N(sqrt(1 - β_1) x^1, β_1 I).
Bound:    K = -Σ_{t=2}^T E_q KL(q(x^(t-1) | x^t, x^0) || p(x^(t-1) | x^t))
              + H_q(X^T | X^0) - H_q(X^1 | X^0) - H_p(X^T)                         (Eq. 14)
          with the KLs and entropies in closed form. L_null = E log π(x^0) (Table 1); for data
          of unit second moment the dropped edge terms vanish and K is exact in expectation.

All log-likelihoods are in nats per data point unless a name says bits.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor, nn

from diffusion_fast.diffusion.likelihood import normal_kl
from diffusion_fast.ops.dpm2015_step import dpm2015_step
from diffusion_fast.ops.philox import philox_normal_ref
from diffusion_fast.training import batches

__all__ = ["baseline_betas", "temporal_basis", "DiffusionProcess2015", "null_log_likelihood", "to_bits",
           "train_dpm2015"]

MIN_BETA = 1e-6
LOG_2PI = math.log(2.0 * math.pi)


def baseline_betas(num_steps: int) -> Tensor:
    """b_t = 1 / linspace(T, 2, T)[t-1]: (T,) float64, from 1/T up to 1/2 (official ``beta_baseline``)."""
    return 1.0 / torch.linspace(float(num_steps), 2.0, num_steps, dtype=torch.float64)


def temporal_basis(num_steps: int, n_basis: int) -> Tensor:
    """(n_basis, T) Gaussian bumps φ_k(t), centres evenly over t, width half their spacing, each
    column normalised to sum 1 (official ``generate_temporal_basis``). float64."""
    xx = torch.linspace(-1.0, 1.0, num_steps, dtype=torch.float64)
    centres = torch.linspace(-1.0, 1.0, n_basis, dtype=torch.float64)
    width = (centres[1] - centres[0]) / 2.0 if n_basis > 1 else torch.tensor(1.0, dtype=torch.float64)
    basis = torch.exp(-(xx[None, :] - centres[:, None]) ** 2 / (2.0 * width**2))
    return basis / basis.sum(0, keepdim=True)


def to_bits(nats: Tensor) -> Tensor:
    return nats / math.log(2.0)


def null_log_likelihood(x0: Tensor) -> Tensor:
    """log π(x^0) = log N(x^0; 0, I) per data point: (N,) nats. x0: (N, D)."""
    return -0.5 * (x0.shape[1] * LOG_2PI + x0.square().sum(1))


class DiffusionProcess2015(nn.Module):
    """Forward process with a learned β schedule, reverse kernels from ``net`` and the bound K.

    ``net(x: (N, D), t: (N,) int64 in 1..T) -> (z_mu, z_sigma)``, e.g.
    ``diffusion_fast.models.dpm2015.RBFReverseNet``. ``step1_beta`` is the fixed β_1;
    ``learn_betas=False`` freezes β_2..T at the baseline. Computations follow x's dtype.
    """

    def __init__(self, net: nn.Module, num_steps: int = 40, *, dim: int = 2, step1_beta: float = 1e-3,
                 n_temporal_basis: int = 10, learn_betas: bool = True) -> None:
        super().__init__()
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"DiffusionProcess2015: num_steps must be an int >= 2, got {num_steps!r}")
        if not 0.0 < step1_beta < 1.0:
            raise ValueError(f"DiffusionProcess2015: step1_beta must be in (0, 1), got {step1_beta}")
        self.net, self.num_steps, self.dim, self.step1_beta = net, num_steps, dim, float(step1_beta)
        self.register_buffer("baseline_logits", torch.logit(baseline_betas(num_steps)).float())
        self.register_buffer("basis", temporal_basis(num_steps, n_temporal_basis).float())
        self.beta_perturb = nn.Parameter(torch.zeros(n_temporal_basis), requires_grad=learn_betas)

    # ------------------------------------------------------------------ schedule
    def betas(self) -> Tensor:
        """β_1..β_T: (T,), β_1 = step1_beta fixed, the rest in [1e-6, 1 - 1e-5] (module doc)."""
        logits = self.baseline_logits + self.beta_perturb @ self.basis
        learned = MIN_BETA + torch.sigmoid(logits) * (1.0 - MIN_BETA - 1e-5)
        return torch.cat([learned.new_full((1,), self.step1_beta), learned[1:]])

    def _schedule(self, dtype: torch.dtype):
        betas = self.betas().to(dtype)
        return betas, torch.exp(torch.cumsum(torch.log1p(-betas), 0))  # β, ᾱ

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x^t = sqrt(ᾱ_t) x^0 + sqrt(1 - ᾱ_t) noise ("frozen noise": differentiable in β)."""
        abar = self._schedule(x0.dtype)[1][t - 1][:, None]
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor):
        """Mean (N, D) and variance (N, 1) of q(x^(t-1) | x^t, x^0), t >= 2."""
        betas, abar = self._schedule(x0.dtype)
        beta, abar_t, abar_prev = betas[t - 1][:, None], abar[t - 1][:, None], abar[t - 2][:, None]
        mean = (abar_prev.sqrt() * beta * x0 + (1.0 - beta).sqrt() * (1.0 - abar_prev) * xt) / (1.0 - abar_t)
        return mean, beta * (1.0 - abar_prev) / (1.0 - abar_t)

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(self, xt: Tensor, t: Tensor):
        """Mean and diagonal variance, both (N, D), of p(x^(t-1) | x^t) for t >= 2."""
        beta = self._schedule(xt.dtype)[0][t - 1][:, None]
        z_mu, z_sigma = self.net(xt, t)
        return (1.0 - beta).sqrt() * xt + beta.sqrt() * z_mu, torch.sigmoid(z_sigma + torch.logit(beta))

    # ------------------------------------------------------------------ bound
    def entropy_q(self, t: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """H_q(X^t | X^0) = D/2 (1 + log 2π + log(1 - ᾱ_t)), nats (1 - ᾱ_1 = β_1)."""
        abar = self._schedule(dtype)[1][t - 1]
        return 0.5 * self.dim * (1.0 + LOG_2PI + torch.log1p(-abar))

    def entropy_prior(self) -> float:
        """H_p(X^T) = D/2 (1 + log 2π): the entropy of π = N(0, I), nats."""
        return 0.5 * self.dim * (1.0 + LOG_2PI)

    def kl_term(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """KL(q(x^(t-1) | x^t, x^0) || p(x^(t-1) | x^t)) at x^t = q_sample(x0, t, noise): (N,) nats."""
        xt = self.q_sample(x0, t, noise)
        mean_q, var_q = self.q_posterior(x0, xt, t)
        mean_p, var_p = self.p_mean_variance(xt, t)
        return normal_kl(mean_q, torch.log(var_q), mean_p, torch.log(var_p)).sum(1)

    def _edges(self, dtype: torch.dtype) -> Tensor:
        return self.entropy_q(self.num_steps, dtype) - self.entropy_q(1, dtype) - self.entropy_prior()

    def bound_estimate(self, x0: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Unbiased one-sample estimate of K per data point, (N,) nats: one t ~ U{2..T} and one
        x^t per point, the KL scaled by T - 1. Differentiable in the network and the schedule."""
        t = torch.randint(2, self.num_steps + 1, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return -(self.num_steps - 1) * self.kl_term(x0, t, noise) + self._edges(x0.dtype)

    def forward(self, x0: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """``bound_estimate``: the module's call, so DistributedDataParallel can wrap training on K."""
        return self.bound_estimate(x0, generator)

    @torch.no_grad()
    def bound(self, x0: Tensor, *, samples: int = 1, generator: Optional[torch.Generator] = None) -> Tensor:
        """K per data point, (N,) nats: every t = 2..T, each KL averaged over ``samples`` draws of x^t."""
        total = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        for step in range(2, self.num_steps + 1):
            t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
            for _ in range(samples):
                noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
                total -= self.kl_term(x0, t, noise) / samples
        return total + self._edges(x0.dtype)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, *, seed: int = 0, device=None, dtype: Optional[torch.dtype] = None,
               trajectory: bool = False):
        """Ancestral sampling x^T ~ π, x^(t-1) = μ + sqrt(Σ) ⊙ z (t = T..2), then the fixed t = 1 step.

        Each step is one fused ``dpm2015_step`` (the t = 1 step with z_mu = z_sigma = 0), whose z for
        the step from t is the Philox stream (seed, t - 1) (``philox_normal_ref``), made in the kernel;
        x^T is (seed, T), so one seed gives one sample set on every device and backend. ``dtype``
        defaults to the network's. Returns x^0: (n, D), or with ``trajectory`` the list [x^T, ..., x^0].
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sample: n must be a positive int, got {n!r}")
        device = torch.device(device) if device is not None else self.basis.device
        dtype = dtype if dtype is not None else next(self.net.parameters()).dtype

        def normal(step: int) -> Tensor:
            return philox_normal_ref(seed, step, n * self.dim, dtype, device).reshape(n, self.dim)

        x = normal(self.num_steps)
        path: List[Tensor] = [x]
        betas = self.betas().to(device=device, dtype=torch.promote_types(dtype, torch.float32))
        for step in range(self.num_steps, 1, -1):
            z_mu, z_sigma = self.net(x, torch.full((n,), step, dtype=torch.long, device=device))
            x = dpm2015_step(x, z_mu, z_sigma, betas[step - 1], seed=seed, step=step - 1)
            path.append(x)
        zeros = torch.zeros_like(x)  # z_mu = 0, Sigma = sigmoid(logit beta_1) = beta_1
        x = dpm2015_step(x, zeros, zeros, self.step1_beta, seed=seed, step=0)
        path.append(x)
        return path if trajectory else x


def train_dpm2015(process: DiffusionProcess2015, data: Tensor, *, steps: int, batch_size: int = 200,
                  lr: float = 1e-2, cosine_decay: bool = True, seed: int = 0) -> List[float]:
    """Maximise K (``bound_estimate``) with Adam over minibatches of ``data``: (N, D), the learning
    rate decayed to 0 on a cosine over ``steps`` unless ``cosine_decay=False``. Returns the K
    estimate of each minibatch (nats per point). (The paper used RMSprop; Adam with decay gets
    further in the few thousand steps a CPU demo affords.)"""
    generator = torch.Generator(device=data.device).manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in process.parameters() if p.requires_grad], lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine_decay else None
    history = []
    for _, x0 in zip(range(steps), batches(data, min(batch_size, data.shape[0]), generator=generator), strict=False):
        loss = -process.bound_estimate(x0, generator).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if decay is not None:
            decay.step()
        history.append(-loss.item())
    return history
