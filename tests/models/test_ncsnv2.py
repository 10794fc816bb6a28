"""NCSNv2 and InstanceNorm++: an independent float64 reference of the official network, the
official parameter layout, 1/σ conditioning, backends, checkpoint loading, DSM training, bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKEND_DEVICES, assert_close, dtypes_for, randomize_, require_backend, to_layout

import diffusion_fast
from diffusion_fast import backends
from diffusion_fast.models import NCSNv2, ncsn_sigmas, official_state_dict
from diffusion_fast.nn import InstanceNorm2dPlus
from diffusion_fast.nn.instance_norm_plus import instance_norm_plus, instance_norm_plus_ref
from diffusion_fast.ops.group_norm_silu import _unsupported as group_norm_silu_unsupported


def tiny(**overrides):
    """8x8 inputs, ngf 4: every kind of block (pooled, dilated, MSF with resize), cheap on a CPU."""
    return NCSNv2(**{**dict(channels=2, ngf=4, num_classes=6, sigma_begin=2.0, sigma_end=0.05), **overrides})


# ---------------------------------------------------------------------------
# Independent references, written from the official code with plain float64 ops.
# ---------------------------------------------------------------------------
def official_instance_norm_plus(x, alpha, gamma, beta, eps=1e-5):
    """Official ``InstanceNorm2dPlus.forward``, spelled out (biased variance in IN, unbiased across channels)."""
    means = x.mean(dim=(2, 3))
    mu_hat = (means - means.mean(-1, keepdim=True)) / torch.sqrt(means.var(-1, keepdim=True) + eps)
    centred = x - means[..., None, None]
    h = centred / torch.sqrt(centred.square().mean(dim=(2, 3), keepdim=True) + eps)
    h = h + mu_hat[..., None, None] * alpha[:, None, None]
    return gamma[:, None, None] * h + beta[:, None, None]


def reference_ncsnv2(sd, cfg, x, labels, act=F.elu):
    """The official NCSNv2.forward on the state dict's official names (a rename fails with KeyError)."""
    sd = {k: v.double() for k, v in sd.items()}

    def norm(h, name):
        return act(official_instance_norm_plus(h, sd[name + ".alpha"], sd[name + ".gamma"], sd[name + ".beta"]))

    def conv(h, name, dilation=1):
        w = sd[name + ".weight"]
        return F.conv2d(h, w, sd.get(name + ".bias"), padding=dilation * (w.shape[-1] // 2), dilation=dilation)

    def mean_pool(h):  # the official ConvMeanPool's four-slice average
        return (h[:, :, ::2, ::2] + h[:, :, 1::2, ::2] + h[:, :, ::2, 1::2] + h[:, :, 1::2, 1::2]) / 4.0

    def res_block(h, name, down, dilation):
        out = conv(norm(h, name + ".normalize1"), name + ".conv1", dilation or 1)
        out = norm(out, name + ".normalize2")
        if down and dilation is None:
            return mean_pool(conv(h, name + ".shortcut.conv")) + mean_pool(conv(out, name + ".conv2.conv"))
        out = conv(out, name + ".conv2", dilation or 1)
        return (conv(h, name + ".shortcut", dilation or 1) if down else h) + out

    def rcu(h, name, n_blocks):
        for i in range(1, n_blocks + 1):
            r = h
            for j in (1, 2):
                h = conv(act(h), f"{name}.{i}_{j}_conv")
            h = h + r
        return h

    def refine(xs, name, end=False):
        hs = [rcu(h, f"{name}.adapt_convs.{i}", 2) for i, h in enumerate(xs)]
        if len(hs) > 1:
            size = xs[0].shape[2:]
            h = sum(F.interpolate(conv(h, f"{name}.msf.convs.{i}"), size=size, mode="bilinear", align_corners=True)
                    for i, h in enumerate(hs))
        else:
            h = hs[0]
        h = path = act(h)
        for i in (0, 1):
            path = conv(F.max_pool2d(path, 5, stride=1, padding=2), f"{name}.crp.convs.{i}")
            h = path + h
        return rcu(h, f"{name}.output_convs", 3 if end else 1)

    d3, d4 = cfg["dilations"]
    h = conv(2 * x.double() - 1, "begin_conv")
    layers = []
    for stage, dilation in (("res1", None), ("res2", None), ("res3", d3), ("res4", d4)):
        h = res_block(h, f"{stage}.0", stage != "res1", dilation)
        h = res_block(h, f"{stage}.1", False, dilation)
        layers.append(h)
    l1, l2, l3, l4 = layers
    h = refine([l4], "refine1")
    h = refine([l3, h], "refine2")
    h = refine([l2, h], "refine3")
    h = refine([l1, h], "refine4", end=True)
    h = conv(norm(h, "normalizer"), "end_conv")
    return h / sd["sigmas"][labels].reshape(-1, 1, 1, 1)


def official_shapes(c, ngf, num_classes):
    """Every state-dict entry of the official NCSNv2 (layers.py rules), name -> shape."""
    shapes = {"sigmas": (num_classes,)}

    def conv(name, cin, cout, k=3, bias=True):
        shapes[name + ".weight"] = (cout, cin, k, k)
        if bias:
            shapes[name + ".bias"] = (cout,)

    def norm(name, ch):
        shapes.update({f"{name}.{p}": (ch,) for p in ("alpha", "gamma", "beta")})

    conv("begin_conv", c, ngf)
    conv("end_conv", ngf, c)
    norm("normalizer", ngf)
    for stage, cin, cout, dilated in (("res1", ngf, ngf, False), ("res2", ngf, 2 * ngf, False),
                                      ("res3", 2 * ngf, 2 * ngf, True), ("res4", 2 * ngf, 2 * ngf, True)):
        down = stage != "res1"
        b0 = f"{stage}.0"
        norm(b0 + ".normalize1", cin)
        conv(b0 + ".conv1", cin, cin if down else cout)
        norm(b0 + ".normalize2", cin if down else cout)
        conv(b0 + (".conv2" if dilated or not down else ".conv2.conv"), cin if down else cout, cout)
        if down:
            conv(b0 + (".shortcut" if dilated else ".shortcut.conv"), cin, cout, 3 if dilated else 1)
        b1 = f"{stage}.1"
        norm(b1 + ".normalize1", cout)
        conv(b1 + ".conv1", cout, cout)
        norm(b1 + ".normalize2", cout)
        conv(b1 + ".conv2", cout, cout)
    for name, planes, feats, start, end in (("refine1", [2 * ngf], 2 * ngf, True, False),
                                            ("refine2", [2 * ngf] * 2, 2 * ngf, False, False),
                                            ("refine3", [2 * ngf] * 2, ngf, False, False),
                                            ("refine4", [ngf] * 2, ngf, False, True)):
        for i, p in enumerate(planes):
            for b in (1, 2):
                for s in (1, 2):
                    conv(f"{name}.adapt_convs.{i}.{b}_{s}_conv", p, p, bias=False)
            if not start:
                conv(f"{name}.msf.convs.{i}", p, feats)
        for b in range(1, (3 if end else 1) + 1):
            for s in (1, 2):
                conv(f"{name}.output_convs.{b}_{s}_conv", feats, feats, bias=False)
        for i in (0, 1):
            conv(f"{name}.crp.convs.{i}", feats, feats, bias=False)
    return shapes


# ---------------------------------------------------------------------------
# InstanceNorm++ through the fused op
# ---------------------------------------------------------------------------
SHAPES = [
    pytest.param((2, 5, 3, 7), id="odd-spatial"),
    pytest.param((1, 2, 4, 4), id="batch1-two-channels"),
    pytest.param((3, 8, 1, 5), id="one-row"),
]


def _params(c, dtype=torch.float64):
    return (1 + 0.3 * torch.randn(c, dtype=dtype), 1 + 0.3 * torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_instance_norm_plus_matches_float64_reference(backend, device, shape, layout, silu):
    x64 = torch.randn(shape, dtype=torch.float64) * 2 + torch.randn(shape[:2] + (1, 1), dtype=torch.float64)
    params64 = _params(shape[1])
    expected = official_instance_norm_plus(x64, *params64)
    expected = F.silu(expected) if silu else expected
    for dtype in dtypes_for(backend, device):
        if dtype == torch.bfloat16:
            continue  # fp16 covers the half path; bf16 is exercised by tests/ops
        x = to_layout(x64.to(device, dtype).clone(), layout).requires_grad_()
        params = [p.to(device, dtype).clone().requires_grad_() for p in params64]
        require_backend(backend, "instance_norm_plus", x, group_norm_silu_unsupported)
        with diffusion_fast.use_backend(backend):
            y = instance_norm_plus(x, *params, silu=silu)
        assert y.dtype == dtype and y.shape == x.shape
        baseline = instance_norm_plus_ref(x64.to(dtype), *[p.to(dtype) for p in params64])
        assert_close(y, expected, dtype, f"forward {dtype}", F.silu(baseline.float()) if silu else baseline)
        if dtype == torch.float16:
            continue
        grad = torch.randn_like(x64)
        y.backward(grad.to(device, dtype))
        ref_in = [x64.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params64]
        ref_out = official_instance_norm_plus(*ref_in)
        (F.silu(ref_out) if silu else ref_out).backward(grad)
        for name, got, want in zip(("x", "alpha", "gamma", "beta"), [x] + params, ref_in):
            assert_close(got.grad, want.grad, dtype, f"grad {name} {dtype}")


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_instance_norm_plus_gradcheck(backend):
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_() for p in _params(3)]
    require_backend(backend, "instance_norm_plus", x, group_norm_silu_unsupported)
    with diffusion_fast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: instance_norm_plus(*a), (x, *params))


def test_instance_norm_plus_ref_is_the_official_formula():
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64)
    params = _params(6)
    assert_close(instance_norm_plus_ref(x, *params), official_instance_norm_plus(x, *params), torch.float64, "ref")


def test_instance_norm_plus_module_matches_official_init_and_names():
    norm = InstanceNorm2dPlus(64)
    assert set(dict(norm.named_parameters())) == {"alpha", "gamma", "beta"}
    assert (norm.beta == 0).all() and abs(norm.alpha.mean() - 1) < 0.01 and 0.01 < norm.gamma.std() < 0.03
    assert set(dict(InstanceNorm2dPlus(4, bias=False).named_parameters())) == {"alpha", "gamma"}
    assert "64, bias=True" in repr(norm)


def test_instance_norm_plus_compiles_into_one_graph():
    x, params = torch.randn(2, 4, 5, 5), [p.float() for p in _params(4)]
    expected = instance_norm_plus(x, *params)
    compiled = torch.compile(instance_norm_plus, backend="aot_eager", fullgraph=True)
    assert_close(compiled(x, *params), expected, torch.float32, "compiled instance_norm_plus")


@pytest.mark.parametrize("make, error, match", [
    (lambda: (torch.randn(2, 1, 4, 4), *_params(1)), ValueError, "at least 2 channels"),
    (lambda: (torch.randn(2, 3), *_params(3)), ValueError, r"x must have shape \(N, C, \*spatial\)"),
    (lambda: (torch.randn(2, 3, 4, 4), *_params(4)), ValueError, r"alpha must have shape \(3,\)"),
    (lambda: (torch.ones(2, 3, 4, 4, dtype=torch.int64), *_params(3)), TypeError, "x must be a floating"),
])
def test_instance_norm_plus_bad_inputs(make, error, match):
    with pytest.raises(error, match=match):
        instance_norm_plus(*make())


# ---------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------
def test_cifar10_config_has_the_official_layout():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = NCSNv2.cifar10()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official_shapes(3, 128, 232)
    assert sum(p.numel() for p in model.parameters()) == 29_694_083
    cfg = model.config
    assert (cfg["ngf"], cfg["num_classes"], cfg["sigma_begin"], cfg["sigma_end"]) == (128, 232, 50.0, 0.01)
    assert NCSNv2.SAMPLING["cifar10"] == dict(n_steps_each=5, step_lr=6.2e-6, denoise=True)


def test_sigmas_are_the_official_geometric_sequence():
    sigmas = ncsn_sigmas(50.0, 0.01, 232)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (232,)
    assert sigmas[0] == 50.0 and abs(sigmas[-1].item() - 0.01) < 1e-9
    ratios = sigmas.double()[1:] / sigmas.double()[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, (0.01 / 50.0) ** (1 / 231)), rtol=1e-6)


def test_small_configs_fit_a_cpu_and_keep_the_layout():
    model = NCSNv2.digits8()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_shapes(1, 16, 10)
    assert sum(p.numel() for p in model.parameters()) < 600_000
    assert model(torch.rand(3, 1, 8, 8), torch.tensor([0, 4, 9])).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_forward_matches_float64_reference(backend, device, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton kernels do not take float64")
    model = randomize_(tiny()).to(dtype)
    x = torch.rand(2, 2, 8, 6, dtype=dtype)  # non-square: the MSF resize has two sizes to get right
    reason = group_norm_silu_unsupported(backend, x.to(device))
    if reason is not None:
        pytest.skip(reason)
    labels = torch.tensor([0, 5])
    expected = reference_ncsnv2(model.state_dict(), model.config, x, labels)
    with torch.no_grad():
        actual = model.to(device)(x.to(device), labels.to(device), backend=backend)
    assert actual.dtype == dtype and actual.device.type == device
    assert_close(actual, expected, dtype, f"NCSNv2 on {backend}")


def test_score_is_the_network_output_divided_by_sigma():
    model = randomize_(tiny()).eval()
    x = torch.rand(1, 2, 8, 8).expand(6, -1, -1, -1)
    labels = torch.arange(6)
    with torch.no_grad():
        scores = model(x, labels)
    unscaled = scores * model.sigmas[:, None, None, None]
    assert_close(unscaled, unscaled[:1].expand_as(unscaled), torch.float32, "σ·s(x, i) independent of i")
    assert scores.abs().amax(dim=(1, 2, 3))[-1] > 20 * scores.abs().amax(dim=(1, 2, 3))[0]  # σ 2 -> 0.05
    with torch.no_grad():
        assert torch.equal(model(x, 3), model(x, torch.full((6,), 3)))


def test_swish_is_fused_into_the_norm():
    model = randomize_(tiny(nonlinearity="swish")).eval()
    calls = []
    model.res1[0].normalize1.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    x = torch.rand(2, 2, 8, 8)
    with torch.no_grad():
        y = model(x, 1)
    assert calls == [{"silu": True}]
    expected = reference_ncsnv2(model.state_dict(), model.config, x, torch.tensor([1, 1]), act=F.silu)
    assert_close(y, expected, torch.float32, "swish NCSNv2")


def test_rescaled_takes_data_as_is():
    model = randomize_(tiny()).eval()
    rescaled = tiny(rescaled=True)
    rescaled.load_state_dict(model.state_dict())
    x = torch.rand(2, 2, 8, 8)
    with torch.no_grad():
        assert torch.equal(rescaled(2 * x - 1, 1), model(x, 1))


def test_backend_switch_routes_the_norms():
    model = randomize_(tiny(backend="torch")).eval()
    seen = []
    model.normalizer.register_forward_pre_hook(lambda *_: seen.append(backends.current()))
    x = torch.rand(1, 2, 8, 8)
    with torch.no_grad():
        model(x, 0)
        model(x, 0, backend="cuda")
        model.backend = None
        with diffusion_fast.use_backend("cuda"):
            model(x, 0)
    assert seen == ["torch", "cuda", "cuda"]


def test_same_weights_same_output_on_torch_and_extension():
    model = randomize_(tiny()).eval()
    x, labels = torch.rand(2, 2, 8, 8), torch.tensor([1, 4])
    reason = group_norm_silu_unsupported("cuda", x)
    if reason is not None:
        pytest.skip(reason)
    with torch.no_grad():
        assert_close(model(x, labels, backend="cuda"), model(x, labels, backend="torch"), torch.float32, "ext vs torch")


def test_compiles_into_one_graph():
    model = randomize_(tiny()).eval()
    x, labels = torch.rand(2, 2, 8, 8), torch.tensor([0, 3])
    with torch.no_grad():
        expected = model(x, labels)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert_close(compiled(x, labels), expected, torch.float32, "torch.compile(fullgraph=True)")


def test_backward_reaches_every_parameter():
    model = randomize_(tiny())
    model(torch.rand(2, 2, 8, 8), torch.tensor([1, 2])).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in model.parameters())


# ---------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------
def test_official_checkpoint_loads_with_and_without_ema():
    source = randomize_(tiny())
    score = {"module." + k: v.clone() for k, v in source.state_dict().items()}  # DataParallel keys
    shadow = {k: v + 1.0 for k, v in source.named_parameters()}  # EMAHelper: parameters only, no prefix
    checkpoint = [score, {"state": {}}, 3, 1000, shadow]
    x, labels = torch.rand(2, 2, 8, 8), torch.tensor([0, 2])

    model = tiny()
    model.load_state_dict(official_state_dict(checkpoint))
    with torch.no_grad():
        assert torch.equal(model(x, labels), source(x, labels))
    model.load_state_dict(official_state_dict(checkpoint, ema=True))
    assert torch.equal(model.begin_conv.weight, shadow["begin_conv.weight"])
    assert torch.equal(model.sigmas, source.sigmas)
    assert official_state_dict(source.state_dict()).keys() == source.state_dict().keys()
    with pytest.raises(ValueError, match="ema=True"):
        official_state_dict(source.state_dict(), ema=True)
    with pytest.raises(ValueError, match="no EMA state"):
        official_state_dict(checkpoint[:4], ema=True)


# ---------------------------------------------------------------------------
# Training: denoising score matching (Song & Ermon 2019, Eq. 5-6; official anneal_dsm_score_estimation)
# ---------------------------------------------------------------------------
def dsm_loss(model, x, labels, noise):
    """½ λ(σ) ||s(x̃, i) - (-(x̃ - x)/σ²)||², λ(σ) = σ², x̃ = x + σ z, averaged over the batch."""
    sigma = model.sigmas[labels].reshape(-1, 1, 1, 1)
    perturbed = x + sigma * noise
    target = -(perturbed - x) / sigma**2
    per_sample = 0.5 * (model(perturbed, labels) - target).square().flatten(1).sum(1)
    return (per_sample * sigma.flatten() ** 2).mean()


def test_a_few_dsm_steps_decrease_the_loss():
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    centres = torch.rand(16, 2, generator=g) * 7  # blobs at random places: a structured data set
    data = torch.exp(-((xx - centres[:, :1, None]) ** 2 + (yy - centres[:, 1:, None]) ** 2) / 4)[:, None]
    model = NCSNv2.digits8(ngf=8, num_classes=6, sigma_begin=1.0, sigma_end=0.05)
    eval_labels = torch.arange(16) % 6
    eval_noise = torch.randn(16, 1, 8, 8, generator=g)
    with torch.no_grad():
        before = dsm_loss(model, data, eval_labels, eval_noise).item()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(40):
        loss = dsm_loss(model, data, torch.randint(0, 6, (16,), generator=g), torch.randn(16, 1, 8, 8, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = dsm_loss(model, data, eval_labels, eval_noise).item()
    assert after < 0.7 * before, (before, after)


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(ngf=1), "ngf must be >= 2"),
    (dict(num_classes=0), "num_classes"),
    (dict(sigma_end=0.0), "sigma_begin and sigma_end"),
    (dict(nonlinearity="gelu"), "nonlinearity"),
    (dict(dilations=(2,)), "dilations"),
    (dict(backend="cudnn"), "backend"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


@pytest.mark.parametrize("make, error, match", [
    (lambda: (torch.zeros(1, 2, 8, 8, dtype=torch.int64), 0), TypeError, "x must be a floating"),
    (lambda: (torch.zeros(1, 2, 8, 8, dtype=torch.float64), 0), TypeError, "parameters are"),
    (lambda: (torch.zeros(1, 3, 8, 8), 0), ValueError, r"x must have shape \(N, 2, H, W\)"),
    (lambda: (torch.zeros(1, 2, 8, 7), 0), ValueError, "even"),
    (lambda: (torch.zeros(2, 2, 8, 8), torch.tensor([1, 2, 3])), ValueError, r"labels must have shape \(2,\)"),
    (lambda: (torch.zeros(2, 2, 8, 8), torch.tensor([0.5, 1.0])), TypeError, "integer noise-level"),
    (lambda: (torch.zeros(2, 2, 8, 8), 6), ValueError, r"labels must be in \[0, 6\)"),
    (lambda: (torch.zeros(2, 2, 8, 8), "1"), TypeError, "labels must be an int64 Tensor"),
])
def test_bad_inputs(make, error, match):
    x, labels = make()
    with pytest.raises(error, match=match):
        tiny()(x, labels)


def test_bad_backend_argument():
    with pytest.raises(ValueError, match="backend"):
        tiny()(torch.zeros(1, 2, 8, 8), 1, backend="fast")
