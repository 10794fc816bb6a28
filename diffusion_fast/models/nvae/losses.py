"""NVAE's objective: negative ELBO in bits/dim, KL warm-up and balancing, the regularised training loss.

Vahdat & Kautz 2020, Sec. 3.2 and App. A; the schedule and balancing follow the official ``utils.py``
(``kl_coeff``, ``kl_balancer_coeff``, ``kl_balancer``) and ``train.py``.

    -ELBO(x) = -log p(x | z) + sum_l KL(q(z_l | z_<l, x) || p(z_l | z_<l))     (nats per image)
    bits/dim = -ELBO / (D ln 2),  D = C * H * W
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["NELBO", "elbo_bpd", "kl_balancer", "kl_balancer_coeff", "kl_coeff", "training_loss"]


class NELBO(NamedTuple):
    loss: Tensor    # scalar: mean over the batch of recon + kl_coeff-weighted (balanced) KL
    recon: Tensor   # scalar: mean -log p(x | z), nats per image
    kl: Tensor      # scalar: mean total KL (unweighted), nats per image
    bpd: Tensor     # scalar: mean (recon + kl) / (D ln 2), the negative ELBO in bits/dim


def kl_coeff(step: int, total_steps: int, constant_steps: int = 0, min_coeff: float = 1e-4) -> float:
    """KL warm-up: beta = clamp((step - constant_steps) / total_steps, min_coeff, 1), total_steps being the
    warm-up length (the official ``kl_anneal_portion`` (0.3) of training)."""
    return max(min((step - constant_steps) / max(total_steps, 1), 1.0), min_coeff)


def kl_balancer_coeff(groups_per_scale: list) -> Tensor:
    """alpha_l for KL balancing, top scale first: (2^s)^2 / groups at scale s (s = 0 top, spatial area
    ratio), normalised so the smallest is 1. groups_per_scale is top (smallest) scale first."""
    coeff = torch.cat([torch.full((g,), (2 ** s) ** 2 / g) for s, g in enumerate(groups_per_scale)])
    return coeff / coeff.min()


def kl_balancer(kl_all: list, coeff: float = 1.0, alpha: Tensor | None = None) -> tuple:
    """Total KL per example (N,), weighted by the warm-up ``coeff``. With ``alpha`` and coeff < 1, each group's
    KL gets weight proportional to its batch-mean KL / alpha_l (normalised to mean 1, no gradient), which keeps
    groups from collapsing during warm-up (App. A, "KL balancing"). Returns (weighted kl (N,), weights (L,))."""
    kl = torch.stack(kl_all, dim=1)                                              # (N, L)
    if alpha is not None and coeff < 1.0:
        w = kl.abs().mean(dim=0) + 0.01
        w = w / alpha.to(kl) * w.sum()
        w = (w / w.mean()).detach()
        return coeff * (kl * w).sum(dim=1), w
    return coeff * kl.sum(dim=1), torch.ones(kl.shape[1], dtype=kl.dtype, device=kl.device)


def elbo_bpd(model, x: Tensor, coeff: float = 1.0, balance: bool = False) -> NELBO:
    """Negative ELBO of ``model`` (an ``NVAE``) on x (N, C, H, W) in [0, 1]. ``coeff`` / ``balance`` shape the
    KL term of ``loss`` only; ``recon``, ``kl`` and ``bpd`` are the plain ELBO's."""
    logits, kl_all = model(x)
    recon = -model.decoder_output(logits).log_prob(x).sum(dim=(1, 2))           # (N,)
    kl = torch.stack(kl_all, dim=1).sum(dim=1)
    alpha = model.kl_alpha.to(x.device) if balance else None
    weighted, _ = kl_balancer(kl_all, coeff, alpha)
    dims = x[0].numel()
    return NELBO((recon + weighted).mean(), recon.mean(), kl.mean(), ((recon + kl) / (dims * math.log(2))).mean())


def training_loss(model, x: Tensor, step: int, total_steps: int, warmup_fraction: float = 0.3,
                  weight_decay_norm: float = 1e-2, weight_decay_norm_init: float = 10.0,
                  anneal_norm: bool = True) -> tuple:
    """One NVAE training objective: NELBO with KL warm-up over ``warmup_fraction * total_steps`` and KL
    balancing, plus lambda * (spectral + BN) regularisation. With ``anneal_norm`` lambda moves geometrically
    from ``weight_decay_norm_init`` to ``weight_decay_norm`` as beta goes 0 -> 1 (official
    ``weight_decay_norm_anneal``). Returns (loss scalar, NELBO)."""
    beta = kl_coeff(step, int(warmup_fraction * total_steps))
    out = elbo_bpd(model, x, beta, balance=True)
    lam = weight_decay_norm
    if anneal_norm:
        lam = math.exp((1 - beta) * math.log(weight_decay_norm_init) + beta * math.log(weight_decay_norm))
    reg = model.spectral_loss() + model.batchnorm_loss()
    return out.loss + lam * reg, out
