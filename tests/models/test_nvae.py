"""NVAE (diffusion_fast.models.nvae): distributions, regularisers, shapes, fused ops, a short digits training."""

import math

import pytest
import torch
import torch.distributions as td
from helpers import require_backend
from torch import Tensor

import diffusion_fast.nn.dwconv_bn_swish as fused_nn
from diffusion_fast import backends
from diffusion_fast.models.nvae import (
    NVAE,
    BernoulliDecoder,
    DiscMixLogistic,
    Normal,
    elbo_bpd,
    kl_balancer,
    kl_balancer_coeff,
    kl_coeff,
    residual_normal,
    residual_normal_kl,
    training_loss,
)
from diffusion_fast.models.nvae.cells import GenerativeResidualCell
from diffusion_fast.models.nvae.flows import ARConv2d, CellAR, PairedCellAR, autoregressive_mask
from diffusion_fast.models.nvae.layers import WNConv2d
from diffusion_fast.models.nvae.regularizers import SpectralRegularizer
from diffusion_fast.models.param_cache import cached
from diffusion_fast.nn import BNSwish, DWConvBNSwish


def rgb_model(**kw):
    """Three channels, 16 x 16, two latent scales (8 x 8 and 4 x 4) with adaptive groups."""
    cfg = {"in_channels": 3, "image_size": 16, "num_channels_enc": 8, "num_channels_dec": 8,
           "num_latent_scales": 2, "num_groups_per_scale": 2, "ada_groups": True, "num_latent_per_group": 3,
           "num_preprocess_cells": 1, "num_postprocess_cells": 1, "num_cell_per_cond_enc": 1,
           "num_cell_per_cond_dec": 1, "num_mix": 2}
    return NVAE(**{**cfg, **kw})


# ---- distributions -------------------------------------------------------------------------------
def test_residual_normal_kl_matches_closed_form():
    shape = (3, 4, 5, 5)
    mu_p, ls_p, dmu, dls = (torch.randn(shape, dtype=torch.float64) * 2 for _ in range(4))
    q, p = residual_normal(mu_p, ls_p, dmu, dls), Normal(mu_p, ls_p)
    expected = td.kl_divergence(td.Normal(q.mu, q.sigma), td.Normal(p.mu, p.sigma))
    torch.testing.assert_close(q.kl(p), expected, rtol=1e-12, atol=1e-12)
    # Eq. 3 in the residual variables themselves (no parameter guards involved)
    sigma_p = torch.rand(shape, dtype=torch.float64) + 0.1
    dmu, dsig = torch.randn(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64) + 0.2
    mu = torch.randn(shape, dtype=torch.float64)
    expected = td.kl_divergence(td.Normal(mu + dmu, sigma_p * dsig), td.Normal(mu, sigma_p))
    torch.testing.assert_close(residual_normal_kl(dmu, dsig, sigma_p), expected, rtol=1e-12, atol=1e-12)


def test_normal_log_prob_and_temperature():
    mu, ls = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    n, hot = Normal(mu, ls), Normal(mu, ls, temp=0.5)
    z = torch.randn_like(mu)
    torch.testing.assert_close(n.log_prob(z), td.Normal(n.mu, n.sigma).log_prob(z))
    torch.testing.assert_close(hot.sigma, 0.5 * n.sigma)
    assert n.mu.abs().max() < 5 and n.sigma.min() > 1e-2  # soft clamp guards


@pytest.mark.parametrize("channels, num_bits", [(1, 8), (3, 4)])
def test_logistic_mixture_normalises(channels, num_bits):
    """exp(log p) summed over every value on the 2^bits grid (all channel combinations) is 1."""
    k, levels = 3, 2 ** num_bits
    params = torch.randn(1, DiscMixLogistic.num_params(k, channels), 1, 2, dtype=torch.float64) * 2
    grid = torch.cartesian_prod(*[torch.arange(levels, dtype=torch.float64)] * channels).view(-1, channels)
    x = (grid / (levels - 1))[:, :, None, None].expand(-1, -1, 1, 2)
    dist = DiscMixLogistic(params.expand(len(grid), -1, -1, -1), k, channels, num_bits)
    total = torch.logsumexp(dist.log_prob(x), dim=0)                          # (1, 2)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-6, rtol=0)
    s = DiscMixLogistic(params, k, channels, num_bits).sample()
    assert s.shape == (1, channels, 1, 2) and s.min() >= 0 and s.max() <= 1


def test_logistic_mixture_rejects_wrong_param_count():
    with pytest.raises(ValueError, match="params"):
        DiscMixLogistic(torch.randn(1, 7, 2, 2), 3, 1)


def test_bernoulli_decoder_and_model():
    logits = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    x = torch.bernoulli(torch.full_like(logits, 0.5))
    torch.testing.assert_close(BernoulliDecoder(logits).log_prob(x),
                               td.Bernoulli(logits=logits).log_prob(x).sum(dim=1))
    model = NVAE.digits(decoder="bernoulli")
    x = (torch.rand(4, 1, 8, 8) > 0.5).float()
    params, kls = model(x)
    assert params.shape == (4, 1, 8, 8) and len(kls) == 4
    out = elbo_bpd(model, x)
    assert torch.isfinite(out.loss) and out.kl > 0
    expected = (out.recon + out.kl) / (64 * math.log(2))
    torch.testing.assert_close(out.bpd, expected, rtol=1e-5, atol=0)
    s = model.eval().sample(5)
    assert s.shape == (5, 1, 8, 8) and set(s.unique().tolist()) <= {0.0, 1.0}


# ---- model ----------------------------------------------------------------------------------------
def test_shapes_encode_decode_sample():
    model = rgb_model()
    assert model.groups_top_first == [1, 2]                                    # ada_groups: 2 at 8x8, 1 at 4x4
    x = torch.rand(2, 3, 16, 16)
    zs = model.encode(x)
    assert [tuple(z.shape) for z in zs] == [(2, 3, 4, 4), (2, 3, 8, 8), (2, 3, 8, 8)]
    params = model.decode(zs)
    assert params.shape == (2, DiscMixLogistic.num_params(2, 3), 16, 16)
    logits, kls = model(x)
    assert logits.shape == params.shape and [k.shape for k in kls] == [(2,)] * 3 and all((k > 0).all() for k in kls)
    s = model.eval().sample(3, t=0.8)
    assert s.shape == (3, 3, 16, 16) and s.min() >= 0 and s.max() <= 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="decoder"):
        NVAE.digits(decoder="gaussian")
    with pytest.raises(ValueError, match="backend"):
        NVAE.digits(backend="cudnn")
    with pytest.raises(ValueError, match="image_size"):
        NVAE.digits(image_size=12, num_latent_scales=3)
    with pytest.raises(ValueError, match="num_postprocess_blocks"):
        NVAE.digits(num_postprocess_blocks=2)
    with pytest.raises(ValueError, match="num_nf"):
        NVAE.digits(num_nf=-1)
    with pytest.raises(TypeError, match="num_nf"):
        NVAE.digits(num_nf=1.0)


def test_temperature_reduces_sample_variance():
    model = NVAE.digits().eval()
    z_cold = model._top_down(256, t=0.3)[1][0]
    z_warm = model._top_down(256, t=1.0)[1][0]
    torch.testing.assert_close(z_warm.var(), torch.tensor(1.01 ** 2), rtol=0.1, atol=0)
    torch.testing.assert_close(z_cold.var(), torch.tensor((0.3 * 1.01) ** 2), rtol=0.1, atol=0)
    assert model.sample(128, t=0.3).var(dim=0).mean() < model.sample(128, t=1.0).var(dim=0).mean()


def test_readjust_bn_changes_running_stats():
    model = NVAE.digits().eval()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    decoder_bns = [m for m in model.dec_groups.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(b.running_mean.clone(), b.running_var.clone(), int(b.num_batches_tracked)) for b in bns]
    model.readjust_bn(num_batches=3, batch_size=8, t=0.7)
    assert not model.training
    changed = [not torch.equal(b.running_mean, m) for b, (m, _, _) in zip(bns, before)]
    assert all(not torch.equal(b.running_mean, torch.zeros_like(b.running_mean)) for b in decoder_bns)
    assert any(changed)
    for b, (_, _, n) in zip(decoder_bns, [x for b, x in zip(bns, before) if b in decoder_bns]):
        assert int(b.num_batches_tracked) == n + 3
    encoder_bns = [m for m in model.enc_groups.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(b.running_mean, torch.zeros_like(b.running_mean)) for b in encoder_bns)


def test_spectral_norm_estimate():
    model = rgb_model()
    weights = model.conv_weights()
    n_dw = sum(isinstance(m, DWConvBNSwish) for m in model.modules())
    n_wn = sum(isinstance(m, WNConv2d) for m in model.modules())
    assert len(weights) == n_dw + n_wn and n_dw > 0
    reg = SpectralRegularizer(n_iter=30)
    sigmas = reg.sigmas(weights)
    for w, s in zip(weights, sigmas):
        exact = torch.linalg.matrix_norm(w.detach().reshape(w.shape[0], -1).double(), ord=2)
        torch.testing.assert_close(s.detach().double(), exact, rtol=1e-2, atol=1e-6)
    loss = model.spectral_loss()
    loss.backward()
    assert model.stem.log_weight_norm.grad is not None and model.stem.log_weight_norm.grad.abs().sum() > 0
    bn = model.batchnorm_loss()
    expected = sum(m.weight.abs().max() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    torch.testing.assert_close(bn, expected)


def test_weight_norm_conv():
    conv = WNConv2d(3, 5, 3, padding=1)
    norms = torch.linalg.vector_norm(conv.normalized_weight(), dim=(1, 2, 3))
    torch.testing.assert_close(norms, torch.exp(conv.log_weight_norm).view(-1), rtol=1e-4, atol=0)
    conv = WNConv2d(3, 5, 3, padding=1, data_init=True)
    x = torch.randn(8, 3, 6, 6) * 3 + 1
    y = conv(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.full((5,), 0.2), rtol=1e-3, atol=0)
    assert bool(conv.init_done)


def test_cells_run_fused_ops(monkeypatch):
    calls = {"dwconv_bn_swish": 0, "bn_swish": 0}

    def spy(name):
        fn = getattr(fused_nn, name)

        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    for name in calls:
        monkeypatch.setattr(fused_nn, name, spy(name))
    model = rgb_model()
    model(torch.rand(2, 3, 16, 16))
    n_dw = sum(isinstance(m, DWConvBNSwish) for m in model.modules())
    n_bn = sum(isinstance(m, BNSwish) for m in model.modules())
    assert calls == {"dwconv_bn_swish": n_dw, "bn_swish": n_bn} and n_dw > 0 and n_bn > 0


@pytest.mark.parametrize("backend", [pytest.param("cuda", id="ext-cpu"), pytest.param("triton", id="triton-interp")])
def test_backends_agree_with_torch(backend):
    """Same weights and noise: our extension (C++ on CPU) / Triton match the torch reference, train mode."""
    if backend == "triton" and not backends.triton_interpret():
        pytest.skip("TRITON_INTERPRET not set")
    from diffusion_fast.ops.dwconv_bn_swish import _unsupported
    x = torch.rand(2, 1, 8, 8)
    require_backend(backend, "dwconv_bn_swish", x, _unsupported)
    ref = NVAE.digits(backend="torch")
    ours = NVAE.digits(backend=backend)
    ours.load_state_dict(ref.state_dict())
    outs = []
    for model in (ref, ours):
        torch.manual_seed(1)
        logits, kls = model(x)
        outs.append((logits, torch.stack(kls)))
        outs[-1][0].sum().backward()
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=name)
    for a, b in zip(ref.buffers(), ours.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_cifar10_config_parameter_count():
    with torch.device("meta"):
        model = NVAE.cifar10()
    assert model.groups_top_first == [30] and model.prior_ftr0.shape == (256, 16, 16)
    assert model.enc_sampler[0].out_channels == 40 and model.image_conditional[1].out_channels == 100
    assert sum(isinstance(m, DWConvBNSwish) for m in model.modules()) == 2 * 29 + 2
    # --num_nf 1: one PairedCellAR (two CellAR) per group; CellAR for L = 20, hidden 6L = 120: conv3x3 L -> 6L
    # (weights + weight-norm gains), depthwise 5x5, conv1x1 6L -> L (weights, bias, gains)
    assert [len(f) for f in model.flows] == [1] * 30
    cell_ar = (120 * 20 * 9 + 120) + (120 * 25 + 120) + (20 * 120 + 20 + 20)
    assert sum(p.numel() for p in model.flows.parameters()) == 30 * 2 * cell_ar == 1_636_800
    # 129,215,808 for the rest (the model without flows), counted on the module
    assert sum(p.numel() for p in model.parameters()) == 129_215_808 + 1_636_800


# ---- normalising flows ----------------------------------------------------------------------------
def test_autoregressive_mask_official_rules():
    """Centre taps from the official channel_mask rules; rows above / left of the centre all kept."""
    m = autoregressive_mask(3, 2, 4, zero_diag=True)                           # out blocks of 2 per input channel
    torch.testing.assert_close(m[:, :, 1, 1], torch.tensor([[0.0, 0], [0, 0], [1, 0], [1, 0]]))
    assert (m[:, :, 0] == 1).all() and (m[:, :, 1, 0] == 1).all()
    assert (m[:, :, 1, 2] == 0).all() and (m[:, :, 2] == 0).all()
    m = autoregressive_mask(1, 4, 2)                                           # in blocks of 2 per output channel
    torch.testing.assert_close(m[:, :, 0, 0], torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]]))
    dw = autoregressive_mask(5, 6, 6, groups=6, mirror=True)
    assert dw.shape == (6, 1, 5, 5) and (dw[:, :, 2, 2] == 1).all()
    assert (dw[:, :, 3:] == 1).all() and (dw[:, :, :2] == 0).all()
    assert (autoregressive_mask(5, 6, 6, groups=6, zero_diag=True)[:, :, 2, 2] == 0).all()
    with pytest.raises(ValueError, match="kernel_size"):
        autoregressive_mask(4, 2, 4)
    with pytest.raises(ValueError, match="groups"):
        autoregressive_mask(3, 4, 4, groups=2)
    conv = ARConv2d(3, 6, 3, zero_diag=True)
    torch.testing.assert_close(conv.normalized_weight(), conv.normalized_weight() * conv.mask, rtol=0, atol=0)


def _flow_order(c: int, h: int, w: int, mirror: bool) -> Tensor:
    """Permutation of the flattened (C, H, W) variables into the flow's order: pixel (raster, reversed if
    mirrored) first, then channel."""
    ch, pix = torch.meshgrid(torch.arange(c), torch.arange(h * w), indexing="ij")
    if mirror:
        pix = h * w - 1 - pix
    return torch.argsort((pix * c + ch).flatten())


def _randomise(module: torch.nn.Module, scale: float = 1.0) -> None:
    """Fresh non-zero weights (gains scaled up so the shift is far from 0)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + math.log(scale) if "log_weight_norm" in name else torch.randn_like(p))


@pytest.mark.parametrize("mirror", [False, True], ids=["raster", "mirrored"])
def test_cell_ar_jacobian_is_unit_triangular(mirror):
    torch.manual_seed(0)
    c, h, w = 3, 3, 4
    cell = CellAR(c, mirror=mirror).double()
    _randomise(cell)
    z = torch.randn(1, c, h, w, dtype=torch.float64)
    out, log_det = cell(z)
    assert torch.equal(log_det, torch.zeros_like(z)) and not torch.allclose(out, z)
    jac = torch.autograd.functional.jacobian(lambda v: cell(v)[0], z).reshape(c * h * w, c * h * w)
    order = _flow_order(c, h, w, mirror)
    jac = jac[order][:, order]                                                 # rows: outputs, cols: inputs
    assert torch.equal(torch.triu(jac, 1), torch.zeros_like(jac))              # no dependence on later variables
    assert torch.equal(jac.diagonal(), torch.ones(c * h * w, dtype=torch.float64))
    lower = torch.tril(jac, -1)
    assert (lower != 0).float().mean() > 0.2                                   # it is autoregressive, not identity
    same_pixel = jac.reshape(h * w, c, h * w, c).diagonal(dim1=0, dim2=2)      # (c, c, pixels)
    assert (same_pixel[1:, :1] != 0).all()                                     # channel c sees channel 0 at its pixel
    # the other order is not triangular: the mirror matters
    other = _flow_order(c, h, w, not mirror)
    full = torch.autograd.functional.jacobian(lambda v: cell(v)[0], z).reshape(c * h * w, -1)[other][:, other]
    assert (torch.triu(full, 1) != 0).any()
    torch.testing.assert_close(torch.linalg.slogdet(jac).logabsdet, torch.tensor(0.0, dtype=torch.float64))


def test_paired_cell_ar_volume_preserving_and_invertible():
    torch.manual_seed(1)
    c, h, w = 2, 3, 3
    flow = PairedCellAR(c).double()
    _randomise(flow, scale=2.0)
    z = torch.randn(2, c, h, w, dtype=torch.float64)
    out, log_det = flow(z)
    assert torch.equal(log_det, torch.zeros_like(z)) and (out - z).abs().mean() > 0.1
    jac = torch.autograd.functional.jacobian(lambda v: flow(v)[0], z[:1]).reshape(c * h * w, c * h * w)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign == 1
    torch.testing.assert_close(logabsdet, torch.tensor(0.0, dtype=torch.float64), atol=1e-10, rtol=0)
    assert (torch.triu(jac, 1) != 0).any() and (torch.tril(jac, -1) != 0).any()   # two orders: dense Jacobian
    torch.testing.assert_close(flow.inverse(out), z, rtol=0, atol=1e-12)
    cell = flow.cell1
    torch.testing.assert_close(cell.inverse(cell(z)[0]), z, rtol=0, atol=1e-12)


def test_paired_cell_ar_compiles():
    flow = PairedCellAR(3)
    _randomise(flow)
    z = torch.randn(2, 3, 4, 5)
    compiled = torch.compile(flow, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(z), flow(z)):
        torch.testing.assert_close(a, b)


def test_cifar10_flows_at_paper_latent_size():
    """The CIFAR-10 config narrowed (2 groups, 16 channels) keeps its 20-channel 16 x 16 latents and flows:
    forward and backward reach every flow cell."""
    model = NVAE.cifar10(num_groups_per_scale=2, num_channels_enc=16, num_channels_dec=16)
    assert model.num_nf == 1 and len(model.flows) == 2
    logits, kls = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 100, 32, 32) and [k.shape for k in kls] == [(2,)] * 2
    (logits.mean() + sum(k.mean() for k in kls)).backward()
    for f in model.flows:
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in f.parameters())
        assert f[0].cell1.mu.weight.grad.abs().sum() > 0 and f[0].cell2.mu.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def digits() -> Tensor:
    """scikit-learn's 1797 digits on the 8-bit grid in [0, 1]: (1797, 1, 8, 8) float32."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16
    return torch.round(x * 255) / 255


@pytest.fixture
def digits_nf() -> NVAE:
    """A fresh digits NVAE with one flow per group (num_nf = 1), initialised from seed 0."""
    torch.manual_seed(0)
    return NVAE.digits(num_nf=1)


def _train_on_digits(model: NVAE, x: Tensor, steps: int) -> tuple:
    """Adamax (lr 1e-2) on batches of 32 of x but its last 256 images; (held-out bits/dim before, after, losses)."""
    opt = torch.optim.Adamax(model.parameters(), lr=1e-2)
    held_out = x[-256:]

    def bpd():
        model.eval()
        with torch.no_grad():
            out = elbo_bpd(model, held_out).bpd.item()
        model.train()
        return out

    before, losses = bpd(), []
    for step in range(steps):
        batch = x[torch.randint(0, len(x) - 256, (32,))]
        loss, _ = training_loss(model, batch, step, steps, weight_decay_norm=1e-3, weight_decay_norm_init=1e-2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return before, bpd(), losses


def test_flows_feed_the_decoder_and_kl_estimate_is_unbiased(digits_nf):
    """Group 0's decoder latent is the flow of the plain posterior sample; with identity flows the one-sample KL
    estimate log q(z) - log p(z) averages to the analytic KL (the num_nf = 0 model) within 5 standard errors."""
    plain, nf = NVAE.digits(), digits_nf
    nf.load_state_dict(plain.state_dict(), strict=False)
    assert set(nf.state_dict()) - set(plain.state_dict()) == {k for k in nf.state_dict() if k.startswith("flows.")}
    plain.eval(), nf.eval()
    x = torch.rand(2, 1, 8, 8)
    torch.manual_seed(3)
    z_plain = plain.encode(x)
    torch.manual_seed(3)
    z_nf = nf.encode(x)
    torch.testing.assert_close(z_nf[0], nf.flows[0][0](z_plain[0])[0])
    assert not torch.allclose(z_nf[0], z_plain[0])
    # group 0's KL: log q(pre-flow sample) - log N(flowed sample; 0, 1) (log-det 0), same seed
    with torch.no_grad():
        q0 = Normal(*nf.enc_sampler[0](nf.enc0(nf._bottom_up(x)[0])).chunk(2, dim=1))
        torch.manual_seed(3)
        kl0 = nf(x)[1][0]
    p0 = Normal(torch.zeros_like(z_nf[0]), torch.zeros_like(z_nf[0]))
    torch.testing.assert_close(kl0, (q0.log_prob(z_plain[0]) - p0.log_prob(z_nf[0])).sum(dim=(1, 2, 3)))
    for f in nf.flows:
        for cell in (f[0].cell1, f[0].cell2):
            torch.nn.init.zeros_(cell.mu.weight)
            torch.nn.init.zeros_(cell.mu.bias)
    x = torch.rand(1, 1, 8, 8).expand(1024, -1, -1, -1)
    with torch.no_grad():
        torch.manual_seed(4)
        analytic = torch.stack(plain(x)[1], 1).sum(1)
        torch.manual_seed(4)
        estimate = torch.stack(nf(x)[1], 1).sum(1)
    diff = estimate - analytic
    assert diff.abs().max() > 0                                                # a genuine estimate
    assert diff.mean().abs() < 5 * diff.std() / math.sqrt(len(diff)), (diff.mean(), diff.std())


def test_digits_training_with_flows(digits, digits_nf):
    x, model = digits, digits_nf
    before, after, losses = _train_on_digits(model, x, 40)
    print(f"digits NVAE (num_nf=1) bits/dim: {before:.3f} -> {after:.3f}")
    assert all(math.isfinite(v) for v in losses) and after < before - 0.3, (before, after)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.flows[0][0].cell2.mu.parameters())
    model.readjust_bn(num_batches=2, batch_size=16)
    s = model.sample(8, t=0.8)
    assert s.shape == (8, 1, 8, 8) and s.min() >= 0 and s.max() <= 1 and s.std() > 0
    logits, kls = model(x[:4])
    assert logits.shape == (4, DiscMixLogistic.num_params(3, 1), 8, 8) and all(torch.isfinite(k).all() for k in kls)


# ---- objective ------------------------------------------------------------------------------------
def test_kl_warmup_and_balancing():
    assert kl_coeff(0, 100) == 1e-4 and kl_coeff(50, 100) == 0.5 and kl_coeff(500, 100) == 1.0
    assert kl_coeff(30, 100, constant_steps=20) == pytest.approx(0.1)
    alpha = kl_balancer_coeff([1, 2])                                          # top 1 group, then 2 at 4x area
    torch.testing.assert_close(alpha, torch.tensor([1.0, 2.0, 2.0]))
    kl_all = [torch.rand(4) * (i + 1) for i in range(3)]
    plain, w = kl_balancer(kl_all, 1.0, alpha)
    torch.testing.assert_close(plain, torch.stack(kl_all, 1).sum(1))
    weighted, w = kl_balancer(kl_all, 0.5, alpha)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    means = torch.stack(kl_all, 1).mean(0) + 0.01
    expected_w = means / alpha
    torch.testing.assert_close(w, expected_w / expected_w.mean())
    torch.testing.assert_close(weighted, 0.5 * (torch.stack(kl_all, 1) * w).sum(1))


def test_digits_training_improves_bpd(digits):
    torch.manual_seed(0)
    model = NVAE.digits()
    before, after, _ = _train_on_digits(model, digits, 200)
    print(f"digits NVAE bits/dim: {before:.3f} -> {after:.3f}")
    assert after < before - 0.7, (before, after)
    model.readjust_bn(num_batches=2, batch_size=32)
    s = model.sample(16, t=0.8)
    assert s.shape == (16, 1, 8, 8) and s.min() >= 0 and s.max() <= 1 and s.std() > 0


def test_weight_norm_is_cached_while_sampling_and_follows_updates():
    """Outside autograd the normalised weight is computed once and reused; an in-place update of either
    parameter (an optimiser step, load_state_dict) is seen by the next call; under autograd it is fresh."""
    torch.manual_seed(0)
    conv = WNConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)

    def expected():
        v, g = conv.weight.detach(), conv.log_weight_norm.detach()
        w = torch.exp(g) * v / (torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True) + 1e-5)
        return torch.nn.functional.conv2d(x, w, conv.bias.detach(), padding=1)

    with torch.no_grad():
        assert conv.normalized_weight() is conv.normalized_weight()
        assert torch.allclose(conv(x), expected(), atol=1e-6)
        conv.log_weight_norm.add_(0.5)
        assert torch.allclose(conv(x), expected(), atol=1e-6)
        conv.weight.mul_(-2.0)
        assert torch.allclose(conv(x), expected(), atol=1e-6)
    assert conv.normalized_weight() is not conv.normalized_weight() and conv.normalized_weight().requires_grad


def _moved_cell(upsample: bool, expand: int) -> GenerativeResidualCell:
    """A generative cell with perturbed parameters and running statistics moved off (0, 1), in eval mode."""
    torch.manual_seed(0)
    cell = GenerativeResidualCell(6, 4 if upsample else 6, expand=expand, upsample=upsample)
    x = torch.randn(4, 6, 5, 7) * 1.5 + 0.5
    for _ in range(3):
        cell(x)  # train mode: running statistics move
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return cell.eval()


@pytest.mark.parametrize("upsample,expand", [(False, 6), (True, 3)])
def test_generative_cell_eval_folds_batch_norms(upsample, expand):
    """Eval without grad on our backends: the BNs folded into the 1x1 convs give the unfolded cell's output
    (float64, NCHW: F.conv2d; float32 channels_last: oneDNN GEMMs with swish in the epilogue), and the folded
    weights follow a change of the running statistics."""
    cell = _moved_cell(upsample, expand).double()
    x = torch.randn(3, 6, 6, 5, dtype=torch.float64) + 0.3

    def reference():
        with backends.use_backend("torch"), torch.no_grad():
            return cell(x)

    ref = reference()
    with torch.no_grad():
        out = cell(x)
    assert cached(cell, "_eval_fold") is not None
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    cell.train()
    cell(x)  # new running statistics
    cell.eval()
    ref = reference()
    with torch.no_grad():
        torch.testing.assert_close(cell(x), ref, rtol=1e-10, atol=1e-12)
    cell, xl = cell.float().to(memory_format=torch.channels_last), x.float().to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = cell(xl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_generative_cell_folds_only_when_it_may(monkeypatch):
    """No fold in training, with a gradient, on the torch backend or in an edited branch (which still runs);
    the folded branch is spied on (under autograd the fold's cache stays empty either way)."""
    folded = []
    real = GenerativeResidualCell._folded_branch
    monkeypatch.setattr(GenerativeResidualCell, "_folded_branch", lambda self, x: folded.append(1) or real(self, x))
    x = torch.randn(2, 6, 5, 5)
    for setup in ("eval", "train", "grad", "torch", "edited"):
        cell = _moved_cell(False, 6)
        if setup == "train":
            cell.train()
        if setup == "edited":
            cell.branch[2] = torch.nn.Sequential(cell.branch[2].bn, torch.nn.SiLU())
        folded.clear()
        with backends.use_backend("torch" if setup == "torch" else "auto"), torch.set_grad_enabled(setup == "grad"):
            y = cell(x)
        assert bool(folded) == (setup == "eval"), setup
        assert y.shape == x.shape and torch.isfinite(y).all()


def test_sampling_matches_torch_backend():
    """NVAE.sample in eval: our backend (cells folded) gives the torch backend's samples for the same seed."""
    ref = rgb_model(backend="torch")
    ref(torch.rand(4, 3, 16, 16))  # train-mode pass: running statistics move
    ref.eval()
    ours = rgb_model(backend="cuda")
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    samples = []
    for model in (ref, ours):
        torch.manual_seed(3)
        samples.append(model.sample(2, t=0.8))
    assert any(cached(m, "_eval_fold") is not None for m in ours.modules())
    assert all(cached(m, "_eval_fold") is None for m in ref.modules())
    torch.testing.assert_close(samples[1], samples[0], rtol=1e-4, atol=1e-4)
