"""NVAE (Vahdat & Kautz 2020) built on the fused ``dwconv_bn_swish`` / ``bn_swish`` ops."""

from diffusion_fast.models.nvae.distributions import (
    BernoulliDecoder,
    DiscMixLogistic,
    Normal,
    residual_normal,
    residual_normal_kl,
)
from diffusion_fast.models.nvae.flows import CellAR, PairedCellAR
from diffusion_fast.models.nvae.losses import (
    NELBO,
    elbo_bpd,
    kl_balancer,
    kl_balancer_coeff,
    kl_coeff,
    training_loss,
)
from diffusion_fast.models.nvae.model import NVAE

__all__ = [
    "NELBO",
    "NVAE",
    "BernoulliDecoder",
    "CellAR",
    "DiscMixLogistic",
    "Normal",
    "PairedCellAR",
    "elbo_bpd",
    "kl_balancer",
    "kl_balancer_coeff",
    "kl_coeff",
    "residual_normal",
    "residual_normal_kl",
    "training_loss",
]
