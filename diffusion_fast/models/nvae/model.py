"""NVAE: a deep hierarchical VAE (Vahdat & Kautz 2020, "NVAE: A Deep Hierarchical Variational Autoencoder").

Layout (Fig. 2; official ``model.py``), latent groups ordered top (smallest scale) first:

    x (N, C, H, W) in [0, 1] -> stem conv3x3(2x - 1) -> pre-process cells (each block halves H, W, doubles C)
    bottom-up tower: per scale (high resolution first) groups of encoder cells, a stride-2 cell between scales
    top-down (shared by the posterior and the generator): h_0 = learned feature; for group l:
        h <- generative cells(h);  p(z_l | z_<l) = N(mu_p, sigma_p) from ELU-conv1x1(h)   (l = 0: N(0, I))
        q(z_l | z_<l, x) = N(mu_p + dmu, sigma_p dsigma), (dmu, log dsigma) = conv3x3(enc_l + conv1x1(h))
        h <- conv1x1([h, z_l])               (and a generative up-sampling cell between scales)
    post-process cells (each block doubles H, W, halves C) -> ELU -> conv3x3 -> decoder parameters
        (discretised logistic mixture, or Bernoulli logits for binary data)

Normalising flows (``num_nf`` > 0; the paper's runs but MNIST use them, CIFAR-10 one per group): each posterior
sample passes through ``num_nf`` ``PairedCellAR`` (``flows.py``), z_l <- f(z_l), before it feeds the decoder; every
group's KL is then the one-sample estimate of the official code,
    KL_l = log q(z_l^0) - sum_k log|det df_k/dz| - log p(z_l | z_<l),   z_l^0 ~ q the pre-flow sample,
instead of Eq. 3's analytic residual-normal KL. Sampling from the prior uses no flows (as the official ``sample``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion_fast.backends import check_optional_name, maybe_use_backend
from diffusion_fast.models.nvae.cells import (
    DecoderCombiner,
    EncoderCombiner,
    EncoderResidualCell,
    GenerativeResidualCell,
)
from diffusion_fast.models.nvae.distributions import (
    BernoulliDecoder,
    DiscMixLogistic,
    Normal,
    residual_normal,
)
from diffusion_fast.models.nvae.flows import PairedCellAR
from diffusion_fast.models.nvae.layers import WNConv2d
from diffusion_fast.models.nvae.regularizers import SpectralRegularizer, batchnorm_loss
from diffusion_fast.nn import DWConvBNSwish

__all__ = ["NVAE"]

DECODERS = ("logistic", "bernoulli")


def _groups_per_scale(num_scales: int, groups: int, adaptive: bool, minimum: int) -> list:
    """Groups per encoder scale, high resolution first; ``adaptive`` halves them at each coarser scale."""
    out = []
    for _ in range(num_scales):
        out.append(groups)
        if adaptive:
            groups = max(minimum, groups // 2)
    return out


class NVAE(nn.Module):
    """Hierarchical VAE with residual-normal posteriors. forward(x (N, C, H, W) in [0, 1]) ->
    (decoder parameters (N, P, H, W), [KL per group (N,)] top group first).

    ``num_nf`` paired autoregressive flow cells per group act on the posterior samples (0: none, the KL is analytic).
    ``backend`` (None, "auto", "cuda", "triton", "torch") picks the fused ops' backend for every call.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_channels_enc: int = 32,
                 num_channels_dec: int = 32, num_latent_scales: int = 2, num_groups_per_scale: int = 4,
                 num_latent_per_group: int = 20, num_preprocess_blocks: int = 1, num_preprocess_cells: int = 2,
                 num_postprocess_blocks: int = 1, num_postprocess_cells: int = 2, num_cell_per_cond_enc: int = 2,
                 num_cell_per_cond_dec: int = 2, ada_groups: bool = False, min_groups_per_scale: int = 1,
                 decoder: str = "logistic", num_mix: int = 10, num_bits: int = 8, use_se: bool = True,
                 res_dist: bool = True, num_nf: int = 0, backend: str | None = None) -> None:
        super().__init__()
        if isinstance(num_nf, bool) or not isinstance(num_nf, int):
            raise TypeError(f"NVAE: num_nf must be an int, got {type(num_nf).__name__}")
        if num_nf < 0:
            raise ValueError(f"NVAE: num_nf must be >= 0, got {num_nf}")
        if decoder not in DECODERS:
            raise ValueError(f"NVAE: decoder must be one of {DECODERS}, got {decoder!r}")
        check_optional_name(backend, "NVAE: backend")
        if num_postprocess_blocks != num_preprocess_blocks:
            raise ValueError(f"NVAE: num_postprocess_blocks must equal num_preprocess_blocks "
                             f"({num_preprocess_blocks}) to restore the input size, got {num_postprocess_blocks}")
        down = 2 ** (num_preprocess_blocks + num_latent_scales - 1)
        if image_size % down:
            raise ValueError(f"NVAE: image_size must be divisible by {down}, got {image_size}")
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__", "down")}
        self.in_channels, self.image_size, self.decoder, self.num_mix = in_channels, image_size, decoder, num_mix
        self.num_bits, self.res_dist, self.backend, self.latent = num_bits, res_dist, backend, num_latent_per_group
        self.num_nf = num_nf
        enc_groups = _groups_per_scale(num_latent_scales, num_groups_per_scale, ada_groups, min_groups_per_scale)
        self.groups_top_first = enc_groups[::-1]
        ce, cd, L = num_channels_enc, num_channels_dec, num_latent_per_group

        self.stem = WNConv2d(in_channels, ce, 3, padding=1)
        mult, pre = 1, []
        for _ in range(num_preprocess_blocks):
            for c in range(num_preprocess_cells):
                last = c == num_preprocess_cells - 1
                pre.append(EncoderResidualCell(ce * mult, ce * mult * (2 if last else 1), 2 if last else 1, use_se))
            mult *= 2
        self.pre_process = nn.Sequential(*pre)

        # bottom-up tower: enc_groups[s] groups of cells at encoder scale s, a stride-2 cell between scales
        self.enc_groups, self.enc_down = nn.ModuleList(), nn.ModuleList()
        for s, groups in enumerate(enc_groups):
            for _ in range(groups):
                self.enc_groups.append(nn.Sequential(*[EncoderResidualCell(ce * mult, ce * mult, 1, use_se)
                                                       for _ in range(num_cell_per_cond_enc)]))
            if s < num_latent_scales - 1:
                self.enc_down.append(EncoderResidualCell(ce * mult, 2 * ce * mult, 2, use_se))
                mult *= 2
        self.enc0 = nn.Sequential(nn.ELU(), WNConv2d(ce * mult, ce * mult, 1), nn.ELU())

        # top-down path, top group first
        top = image_size // down
        self.prior_ftr0 = nn.Parameter(torch.rand(cd * mult, top, top))
        self.enc_sampler, self.dec_sampler, self.enc_combiners = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.dec_groups, self.dec_combiners, self.dec_up = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.flows = nn.ModuleList()  # per group: num_nf paired flow cells on the posterior sample
        for s, groups in enumerate(self.groups_top_first):
            for g in range(groups):
                first = s == 0 and g == 0
                self.enc_sampler.append(WNConv2d(ce * mult, 2 * L, 3, padding=1))
                self.flows.append(nn.ModuleList(PairedCellAR(L) for _ in range(num_nf)))
                if not first:
                    self.dec_sampler.append(nn.Sequential(nn.ELU(), WNConv2d(cd * mult, 2 * L, 1)))
                    self.enc_combiners.append(EncoderCombiner(ce * mult, cd * mult))
                cells = [] if first else [GenerativeResidualCell(cd * mult, cd * mult, 6, False, use_se)
                                          for _ in range(num_cell_per_cond_dec)]
                self.dec_groups.append(nn.Sequential(*cells))
                self.dec_combiners.append(DecoderCombiner(cd * mult, L))
            if s < num_latent_scales - 1:
                self.dec_up.append(GenerativeResidualCell(cd * mult, cd * mult // 2, 6, True, use_se))
                mult //= 2

        post = []
        for _ in range(num_postprocess_blocks):
            for c in range(num_postprocess_cells):
                post.append(GenerativeResidualCell(cd * mult, cd * mult // (2 if c == 0 else 1), 3, c == 0, use_se))
                if c == 0:
                    mult //= 2
        self.post_process = nn.Sequential(*post)
        out = in_channels if decoder == "bernoulli" else DiscMixLogistic.num_params(num_mix, in_channels)
        self.image_conditional = nn.Sequential(nn.ELU(), WNConv2d(cd * mult, out, 3, padding=1))

        from diffusion_fast.models.nvae.losses import kl_balancer_coeff
        self.register_buffer("kl_alpha", kl_balancer_coeff(self.groups_top_first), persistent=False)
        self.spectral = SpectralRegularizer()

    # ---- paper configurations ------------------------------------------------------------------
    @classmethod
    def cifar10(cls, **overrides) -> NVAE:
        """The official CIFAR-10 run (README command): 128 channels, one latent scale of 30 groups x 20 channels at
        16 x 16, 2 cells per group, one pre/post block of 2 cells, 10 logistics, one paired flow per group
        (``--num_nf 1``). 130,852,608 parameters counted on the module (the flows' 1,636,800 included, their
        masked-out weights too, as the official ``ARConv2d`` keeps full weight tensors)."""
        cfg = {"in_channels": 3, "image_size": 32, "num_channels_enc": 128, "num_channels_dec": 128,
               "num_latent_scales": 1, "num_groups_per_scale": 30, "num_latent_per_group": 20,
               "num_preprocess_blocks": 1,
               "num_preprocess_cells": 2, "num_postprocess_blocks": 1, "num_postprocess_cells": 2,
               "num_cell_per_cond_enc": 2, "num_cell_per_cond_dec": 2, "num_mix": 10, "num_nf": 1}
        return cls(**{**cfg, **overrides})

    @classmethod
    def digits(cls, **overrides) -> NVAE:
        """A CPU-sized model for 8 x 8 one-channel images: two latent scales (4 x 4, 2 x 2), 2 groups each."""
        cfg = {"in_channels": 1, "image_size": 8, "num_channels_enc": 8, "num_channels_dec": 8,
               "num_latent_scales": 2, "num_groups_per_scale": 2, "num_latent_per_group": 4, "num_preprocess_blocks": 1,
               "num_preprocess_cells": 1, "num_postprocess_blocks": 1, "num_postprocess_cells": 1,
               "num_cell_per_cond_enc": 1, "num_cell_per_cond_dec": 1, "num_mix": 3}
        return cls(**{**cfg, **overrides})

    # ---- networks ------------------------------------------------------------------------------
    def _backend(self):
        return maybe_use_backend(self.backend)

    def _bottom_up(self, x: Tensor) -> list:
        """Encoder features feeding each latent group, top group first: [top (N, C, h, w), ...]."""
        s = self.pre_process(self.stem(2 * x - 1))
        feats, g = [], 0
        for s_idx, groups in enumerate(self.groups_top_first[::-1]):
            for _ in range(groups):
                s = self.enc_groups[g](s)
                feats.append(s)
                g += 1
            if s_idx < len(self.enc_down):
                s = self.enc_down[s_idx](s)
        return feats[::-1]

    def _top_down(self, n: int, feats: list | None = None, zs: list | None = None, t: float = 1.0) -> tuple:
        """Run the generator for n images. With ``feats`` z_l ~ q (posterior, then the group's flows), with ``zs``
        z_l given, else z_l ~ p at temperature t. Returns (decoder parameters, [z_l], [KL_l (N,)] (posterior only))."""
        s = self.prior_ftr0.unsqueeze(0).expand(n, -1, -1, -1)
        z_out, kls, g = [], [], 0  # g: index of the latent group, top first
        for scale, groups in enumerate(self.groups_top_first):
            for _ in range(groups):
                s = self.dec_groups[g](s)
                if g == 0:
                    shape = (n, self.latent) + tuple(s.shape[2:])
                    mu_p = log_sigma_p = s.new_zeros(shape)
                else:
                    mu_p, log_sigma_p = self.dec_sampler[g - 1](s).chunk(2, dim=1)
                prior = Normal(mu_p, log_sigma_p, t)
                if feats is not None:
                    ftr = self.enc0(feats[0]) if g == 0 else self.enc_combiners[g - 1](feats[g], s)
                    dmu, dlog_sigma = self.enc_sampler[g](ftr).chunk(2, dim=1)
                    q = residual_normal(mu_p, log_sigma_p, dmu, dlog_sigma) if self.res_dist and g > 0 \
                        else Normal(dmu, dlog_sigma)
                    z = q.rsample()
                    if self.num_nf:
                        log_q = q.log_prob(z)                                # (N, L, h, w), pre-flow sample
                        for flow in self.flows[g]:
                            z, log_det = flow(z)
                            log_q = log_q - log_det
                        kls.append((log_q - prior.log_prob(z)).sum(dim=(1, 2, 3)))
                    else:
                        kls.append(q.kl(prior).sum(dim=(1, 2, 3)))
                else:
                    z = zs[g] if zs is not None else prior.rsample()
                s = self.dec_combiners[g](s, z)
                z_out.append(z)
                g += 1
            if scale < len(self.dec_up):
                s = self.dec_up[scale](s)
        return self.image_conditional(self.post_process(s)), z_out, kls

    def forward(self, x: Tensor) -> tuple:
        """x (N, C, H, W) in [0, 1] -> (decoder parameters (N, P, H, W), [KL_l (N,)] top group first; with flows
        KL_l is the one-sample estimate, which can be negative)."""
        with self._backend():
            logits, _, kls = self._top_down(x.shape[0], self._bottom_up(x))
        return logits, kls

    def encode(self, x: Tensor) -> list:
        """Posterior samples [z_l (N, latent, h_l, w_l)], top group first."""
        with self._backend():
            return self._top_down(x.shape[0], self._bottom_up(x))[1]

    def decode(self, zs: list) -> Tensor:
        """Decoder parameters (N, P, H, W) for given latents (as ``encode`` returns them)."""
        with self._backend():
            return self._top_down(zs[0].shape[0], zs=zs)[0]

    def decoder_output(self, params: Tensor):
        """The image distribution: ``DiscMixLogistic`` or ``BernoulliDecoder``; log_prob(x) -> (N, H, W)."""
        if self.decoder == "bernoulli":
            return BernoulliDecoder(params)
        return DiscMixLogistic(params, self.num_mix, self.in_channels, self.num_bits)

    @torch.no_grad()
    @torch.no_grad()  # the discretised sample is not differentiable; without a graph the cells fold their BNs
    def sample(self, num_samples: int, t: float = 1.0) -> Tensor:
        """Images (num_samples, C, H, W) in [0, 1]: z_l ~ p(z_l | z_<l) with sigma scaled by t, then x ~ p(x | z)
        (its logistic scale also scaled by t). Call ``readjust_bn`` first for low t (Sec. 5.1)."""
        with self._backend():
            params = self._top_down(num_samples, t=t)[0]
        return self.decoder_output(params).sample(t)

    @torch.no_grad()  # forwards only: no graph, and dwconv_bn_swish takes its forward-only path
    def readjust_bn(self, num_batches: int = 20, batch_size: int = 16, t: float = 1.0) -> None:
        """BatchNorm re-adjustment (Sec. 5.1): generate ``num_batches`` batches in train mode so the running
        statistics follow the temperature-t activations, then switch to eval mode."""
        self.train()
        with self._backend():
            for _ in range(num_batches):
                self._top_down(batch_size, t=t)
        self.eval()

    # ---- regularisers --------------------------------------------------------------------------
    def conv_weights(self) -> list:
        """Weights the spectral regulariser sees: every conv's applied weight (the depthwise ones included)."""
        out = []
        for m in self.modules():
            if isinstance(m, WNConv2d):
                out.append(m.normalized_weight())
            elif isinstance(m, DWConvBNSwish):
                out.append(m.conv.weight)
        return out

    def spectral_loss(self) -> Tensor:
        """sum_i s(W_i) by power iteration (Eq. 4's L_SR without lambda)."""
        return self.spectral(self.conv_weights())

    def batchnorm_loss(self) -> Tensor:
        """sum over BN layers of max_c |gamma_c|."""
        return batchnorm_loss(m for m in self.modules() if isinstance(m, nn.BatchNorm2d))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())
