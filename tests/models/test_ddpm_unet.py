"""DDPMUNet: paper configs, an independent float64 reference of the official network, backends, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKEND_DEVICES, assert_close, randomize_

import diffusion_fast
from diffusion_fast import backends
from diffusion_fast.models import DDPMUNet, attention
from diffusion_fast.models.blocks import timestep_embedding
from diffusion_fast.models.param_cache import cached
from diffusion_fast.nn import FusedGroupNormSiLU
from diffusion_fast.ops.group_norm_silu import _unsupported as group_norm_silu_unsupported

# (backend, device) pairs that must give the same network. A backend that cannot run here
# (extension not built/loaded) is skipped, not failed: tests/ops fail loudly for that already.
# Triton's CPU interpreter takes over a minute for a whole UNet, so Triton runs here only on a
# GPU (tests/ops cover its kernels on the CPU).
MODEL_BACKENDS = [p for p in BACKEND_DEVICES if p.id != "triton-interp"]


def tiny(**overrides):
    """8x8 inputs, two levels, attention at 4x4: every kind of block, cheap on a CPU."""
    return DDPMUNet.tiny(**{**dict(resolution=8, attn_resolutions=(4,)), **overrides})


# ---------------------------------------------------------------------------
# Independent reference: the official unet.py written out with plain float64 ops on the
# state dict (TF "SAME" padding, einsum attention as in attn_block), no diffusion_fast code.
# ---------------------------------------------------------------------------
def reference_unet(sd, cfg, x, t):
    sd = {k: v.double() for k, v in sd.items()}
    groups, eps = cfg["num_groups"], cfg["eps"]

    def norm(h, name, swish=True):
        h = F.group_norm(h, groups, sd[name + ".weight"], sd[name + ".bias"], eps)
        return h * torch.sigmoid(h) if swish else h

    def conv(h, name, stride=1):
        w = sd[name + ".weight"]
        if stride == 2:  # TF SAME for stride 2, even size: pad 0 before, 1 after
            return F.conv2d(F.pad(h, (0, 1, 0, 1)), w, sd[name + ".bias"], stride=2)
        return F.conv2d(h, w, sd[name + ".bias"], padding=w.shape[-1] // 2)

    def nin(h, name):  # dense over channels: "bchw,dc->bdhw"
        return torch.einsum("bchw,dc->bdhw", h, sd[name + ".weight"]) + sd[name + ".bias"][None, :, None, None]

    def resnet(h_in, temb, name):
        h = conv(norm(h_in, name + ".norm1"), name + ".conv1")
        h = h + (F.silu(temb) @ sd[name + ".temb_proj.weight"].T + sd[name + ".temb_proj.bias"])[:, :, None, None]
        h = conv(norm(h, name + ".norm2"), name + ".conv2")
        if name + ".nin_shortcut.weight" in sd:
            h_in = conv(h_in, name + ".nin_shortcut")
        return h_in + h

    def attn(h_in, name):
        b, c, hh, ww = h_in.shape
        h = norm(h_in, name + ".norm", swish=False)
        q, k, v = (nin(h, f"{name}.{n}") for n in "qkv")
        w = torch.einsum("bchw,bcHW->bhwHW", q, k) * c ** -0.5
        w = torch.softmax(w.reshape(b, hh, ww, hh * ww), -1).reshape(b, hh, ww, hh, ww)
        return h_in + nin(torch.einsum("bhwHW,bcHW->bchw", w, v), name + ".proj_out")

    half = cfg["ch"] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - 1))
    emb = torch.cat([torch.sin(t.double()[:, None] * freqs), torch.cos(t.double()[:, None] * freqs)], 1)
    temb = F.silu(emb @ sd["temb.dense.0.weight"].T + sd["temb.dense.0.bias"])
    temb = temb @ sd["temb.dense.1.weight"].T + sd["temb.dense.1.bias"]

    levels, attn_res = len(cfg["ch_mult"]), cfg["attn_resolutions"]
    hs = [conv(x.double(), "conv_in")]
    for i in range(levels):
        for j in range(cfg["num_res_blocks"]):
            h = resnet(hs[-1], temb, f"down.{i}.block.{j}")
            hs.append(attn(h, f"down.{i}.attn.{j}") if h.shape[-1] in attn_res else h)
        if i != levels - 1:
            hs.append(conv(hs[-1], f"down.{i}.downsample.conv", stride=2))
    h = resnet(attn(resnet(hs[-1], temb, "mid.block_1"), "mid.attn_1"), temb, "mid.block_2")
    for i in reversed(range(levels)):
        for j in range(cfg["num_res_blocks"] + 1):
            h = resnet(torch.cat([h, hs.pop()], 1), temb, f"up.{i}.block.{j}")
            if h.shape[-1] in attn_res:
                h = attn(h, f"up.{i}.attn.{j}")
        if i != 0:
            h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"up.{i}.upsample.conv")
    assert not hs
    return conv(norm(h, "norm_out"), "conv_out")


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------
def test_cifar10_has_the_papers_parameter_count():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = DDPMUNet.cifar10()
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    assert model.config["dropout"] == 0.1 and model.config["attn_resolutions"] == (16,)


def test_256_configs_match_the_official_114m_network():
    with torch.device("meta"):
        model = DDPMUNet.celebahq256()
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6) == 114  # "114M for block_size=1" in the official run_celebahq.py
    with torch.device("meta"):
        assert model.config == DDPMUNet.lsun256().config
    assert model.config["ch_mult"] == (1, 1, 2, 2, 4, 4) and model.config["dropout"] == 0.0
    assert [len(level.attn) for level in model.down] == [0, 0, 0, 0, 2, 0]  # 256 / 2^4 = 16


def test_layout_follows_the_official_network():
    model = tiny(num_res_blocks=2)
    assert [len(level.block) for level in model.down] == [2, 2]
    assert [len(level.block) for level in model.up] == [3, 3]  # num_res_blocks + 1 on the way up
    assert [len(level.attn) for level in model.down] == [0, 2] and [len(level.attn) for level in model.up] == [0, 3]
    assert model.down[0].downsample is not None and model.down[1].downsample is None
    assert model.up[1].upsample is not None and model.up[0].upsample is None
    assert model.down[1].block[0].nin_shortcut is not None  # 32 -> 64 channels
    assert model.down[0].block[0].nin_shortcut is None
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, FusedGroupNormSiLU) and m.eps == 1e-6 for m in norms)
    assert not any(isinstance(m, (torch.nn.SiLU,)) for m in model.modules())
    zero_init = [model.conv_out, model.mid.attn_1.proj_out] + [b.conv2 for level in model.down for b in level.block]
    assert all(m.weight.abs().max() < 2e-5 and m.bias.abs().max() == 0 for m in zero_init)
    assert model.conv_in.weight.abs().max() > 1e-2


# ---------------------------------------------------------------------------
# Forward against the float64 reference, on every backend
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend, device", MODEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_forward_matches_float64_reference(backend, device, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton kernels do not take float64")
    model = randomize_(tiny(num_res_blocks=2)).to(dtype).eval()
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    reason = group_norm_silu_unsupported(backend, x.to(device))
    if reason is not None:
        pytest.skip(reason)
    t = torch.tensor([0, 999]) if dtype == torch.float64 else torch.tensor([3, 40])
    expected = reference_unet(model.state_dict(), model.config, x, t)
    with torch.no_grad(), diffusion_fast.use_backend(backend):
        actual = model.to(device)(x.to(device), t.to(device))
    assert actual.dtype == dtype and actual.device.type == device
    assert_close(actual, expected, dtype, f"DDPMUNet on {backend}")


def test_forward_float32_at_large_t():
    """float32 embeddings of t ~ 1000 carry ~1e-4 phase error (as in the official code and diffusers)."""
    model = randomize_(tiny()).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([500, 999])
    expected = reference_unet(model.state_dict(), model.config, x, t)
    err = (model(x, t, backend="torch").double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-3


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, 10, torch.float64)
    k = torch.arange(5, dtype=torch.float64)
    arg = t.double()[:, None] * 10000.0 ** (-k / 4)
    assert_close(emb, torch.cat([arg.sin(), arg.cos()], 1), torch.float64, "embedding")
    assert timestep_embedding(t, 9).shape == (4, 9) and (timestep_embedding(t, 9)[:, -1] == 0).all()
    assert timestep_embedding(t, 8).dtype == torch.float32


def test_scalar_and_float_timesteps():
    model = randomize_(tiny()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x, torch.tensor([7, 7]))
        assert torch.equal(model(x, 7), ref)
        assert torch.equal(model(x, torch.tensor(7)), ref)
        assert torch.allclose(model(x, torch.tensor([7.0, 7.0])), ref)


def test_attention_is_scaled_dot_product():
    q, k, v = (torch.randn(2, 1, 5, 4, dtype=torch.float64) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    assert_close(attention(q, k, v), expected, torch.float64, "attention")


def test_compiles_into_one_graph():
    model = randomize_(tiny()).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 600])
    with torch.no_grad():
        expected = model(x, t)  # eager first: a backend fallback is noted (with a warning) outside the trace
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert_close(compiled(x, t), expected, torch.float32, "torch.compile(fullgraph=True)")


def test_backward_reaches_every_parameter():
    model = randomize_(tiny())
    model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), backend="torch").square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_input_gradient_through_a_frozen_network_after_sampling(layout):
    """Guidance: sampling (inference_mode) keeps derived weights (the joint q/k/v projection, channels-last
    conv weights) as inference tensors; a later gradient with respect to the input through the frozen
    network must not hand them to autograd, which cannot save them."""
    model = randomize_(tiny()).eval().requires_grad_(False)
    x, t = torch.randn(2, 3, 8, 8).contiguous(memory_format=layout), torch.tensor([1, 2])
    with torch.inference_mode():
        model(x, t)
    xg = x.clone().requires_grad_()
    model(xg, t).square().sum().backward()
    want = x.clone().requires_grad_()
    model(want, t, backend="torch").square().sum().backward()
    assert_close(xg.grad, want.grad, torch.float32, "input gradient")


# ---------------------------------------------------------------------------
# backend= switch
# ---------------------------------------------------------------------------
def _backends_seen(model, x, t, **kw):
    seen = []
    hook = model.norm_out.register_forward_pre_hook(lambda *_: seen.append(backends.current()))
    with torch.no_grad():
        y = model(x, t, **kw)
    hook.remove()
    return seen, y


def test_backend_switch_routes_the_fused_ops():
    model = randomize_(tiny(backend="torch")).eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    assert _backends_seen(model, x, t)[0] == ["torch"]
    assert _backends_seen(model, x, t, backend="cuda")[0] == ["cuda"]  # per-call override
    model.backend = None  # follow the caller's use_backend
    with diffusion_fast.use_backend("cuda"):
        assert _backends_seen(model, x, t)[0] == ["cuda"]
    assert "backend=None" in repr(model)


def test_same_weights_same_output_on_torch_and_extension():
    model = randomize_(tiny()).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    reason = group_norm_silu_unsupported("cuda", x)
    if reason is not None:
        pytest.skip(reason)
    with torch.no_grad():
        assert_close(model(x, t, backend="cuda"), model(x, t, backend="torch"), torch.float32, "ext vs torch")


def _norm_out_layouts(model, runs) -> list:
    """For each run() in runs: whether the model's last GroupNorm saw channels_last memory."""
    layouts = []
    hook = model.norm_out.register_forward_pre_hook(
        lambda _, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        for run in runs:
            run()
    hook.remove()
    return layouts


def test_extension_runs_channels_last_and_returns_the_callers_layout():
    """Our kernels run the UNet in NHWC memory (see ddpm_unet._run_channels_last); the reference stays NCHW."""
    model = randomize_(tiny()).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    if group_norm_silu_unsupported("cuda", x) is not None:
        pytest.skip("extension not loaded")
    out = {}
    layouts = _norm_out_layouts(model, [
        lambda: out.update(ref=model(x, t, backend="torch")),
        lambda: out.update(y=model(x, t, backend="cuda")),
        lambda: out.update(cl=model(x.contiguous(memory_format=torch.channels_last), t, backend="cuda"))])
    y_ref, y, y_cl = out["ref"], out["y"], out["cl"]
    assert layouts == [False, True, True]
    assert y.is_contiguous() and y_cl.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, y_ref, torch.float32, "NHWC run vs reference")
    assert torch.equal(y, y_cl)


def test_layout_knob_forces_either_layout(monkeypatch):
    """DIFFUSION_FAST_CHANNELS_LAST=0/1 overrides the automatic layout (read per call, same result either way);
    another value is a clear error; the reference backend stays NCHW."""
    model = randomize_(tiny()).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    if group_norm_silu_unsupported("cuda", x) is not None:
        pytest.skip("extension not loaded")
    outputs = {}

    def run(knob, backend="cuda"):
        monkeypatch.setenv("DIFFUSION_FAST_CHANNELS_LAST", knob)
        outputs[knob, backend] = model(x, t, backend=backend)

    layouts = _norm_out_layouts(model, [lambda: run("0"), lambda: run("1"), lambda: run("1", "torch")])
    assert layouts == [False, True, False]
    assert_close(outputs["0", "cuda"], outputs["1", "cuda"], torch.float32, "NCHW vs NHWC run")
    monkeypatch.setenv("DIFFUSION_FAST_CHANNELS_LAST", "yes")
    with pytest.raises(ValueError, match="DIFFUSION_FAST_CHANNELS_LAST"):
        model(x, t, backend="cuda")


@pytest.mark.cuda
def test_gpu_runs_16bit_channels_last_and_fp32_nchw(monkeypatch):
    """On a GPU our kernels run the UNet NHWC for fp16/bf16 (cuDNN's native 16-bit layout, measured faster on an
    H100) and NCHW for fp32; the output keeps the caller's layout."""
    monkeypatch.delenv("DIFFUSION_FAST_CHANNELS_LAST", raising=False)
    model = randomize_(tiny()).eval().cuda().double()
    t = torch.tensor([3, 900], device="cuda")
    x = torch.randn(2, 3, 8, 8, device="cuda", dtype=torch.float64)
    with torch.no_grad():
        ref = model(x, t, backend="torch")
    outputs, baselines = {}, {}

    def run(dtype):
        m = model.to(dtype)
        outputs[dtype] = m(x.to(dtype), t, backend="cuda")
        baselines[dtype] = m(x.to(dtype), t, backend="torch")  # PyTorch's own error in this dtype

    layouts = _norm_out_layouts(model, [lambda: run(torch.float32), lambda: run(torch.bfloat16)])
    assert layouts == [False, False, True, False]  # ours fp32, torch fp32, ours bf16, torch bf16
    for dtype, y in outputs.items():
        assert y.dtype == dtype and y.is_contiguous()
        assert_close(y, ref, dtype, f"{dtype} run vs the float64 reference", baseline=baselines[dtype])


def test_channels_last_gradients_match_the_reference():
    model = randomize_(tiny())
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([3, 900])
    model = model.double()
    if group_norm_silu_unsupported("cuda", x) is not None:
        pytest.skip("extension not loaded")
    grads = {}
    for backend in ("torch", "cuda"):
        model.zero_grad()
        xg = x.clone().requires_grad_()
        model(xg, t, backend=backend).square().sum().backward()
        grads[backend] = [xg.grad] + [p.grad for p in model.parameters()]
    for got, want in zip(grads["cuda"], grads["torch"]):
        assert_close(got, want, torch.float64, "gradient through the NHWC run")


@pytest.mark.parametrize("shape", [(2, 64, 4, 4), (1, 32, 3, 5)], ids=["4x4", "3x5"])
def test_attention_block_fused_paths_equal_the_plain_path(shape):
    """AttnBlock on NHWC memory (one C -> 3C projection, no transposes) and, on our backends, on
    NCHW memory (one q/k/v GEMM, residual in the output GEMM) is the reference function."""
    from diffusion_fast.models.blocks import AttnBlock
    block = randomize_(AttnBlock(shape[1])).double()
    x = torch.randn(shape, dtype=torch.float64)
    runs = [("torch", torch.contiguous_format), ("torch", torch.channels_last)]
    if group_norm_silu_unsupported("cuda", x) is None:
        runs += [("cuda", torch.contiguous_format), ("cuda", torch.channels_last)]
    outs = []
    for backend, layout in runs:
        block.zero_grad()
        xg = x.clone(memory_format=layout).requires_grad_()
        with diffusion_fast.use_backend(backend):
            y = block(xg)
        y.square().sum().backward()
        outs.append([y, xg.grad] + [p.grad for p in block.parameters()])
    for (backend, layout), out in zip(runs[1:], outs[1:]):
        for got, want in zip(out, outs[0]):
            assert_close(got, want, torch.float64, f"AttnBlock on {backend}, {layout}")


def test_attention_block_reuses_its_joint_projection_until_a_parameter_changes():
    """Sampling (no autograd) concatenates q/k/v once; an in-place update, a dtype change or a
    new tensor must each be seen, so the result is always the plain path's."""
    from diffusion_fast.models.blocks import AttnBlock
    block = randomize_(AttnBlock(32)).double()
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)

    def check(what):
        with torch.no_grad():
            with diffusion_fast.use_backend("torch"):
                want = block(x.contiguous())
            got = block(x)
        assert_close(got, want, x.dtype, what)

    check("first call")
    joint = cached(block, "_qkv_cache")
    check("second call")
    assert cached(block, "_qkv_cache") is joint, "the joint weight was rebuilt although nothing changed"
    with torch.no_grad():
        block.k.weight.mul_(-2.0)
    check("after an in-place update of k's weight")
    block.v.bias = torch.nn.Parameter(torch.randn(32, dtype=torch.float64))
    check("after replacing v's bias")
    block.float()
    x = x.float()
    check("after .float()")


@pytest.mark.parametrize("shape", [(1, 8, 5, 7), (3, 6, 4, 4)])
def test_conv2d_keeps_a_channels_last_weight_for_channels_last_inputs(shape):
    """Same result as nn.Conv2d on every layout, with and without autograd; when sampling on a
    channels_last input the weight is converted once (no clone inside the convolution) and the
    copy is refreshed after an in-place update."""
    from diffusion_fast.models.blocks import Conv2d
    n, c, h, w = shape
    conv = randomize_(Conv2d(c, 5, 3, padding=1)).double()
    plain = torch.nn.Conv2d(c, 5, 3, padding=1).double()
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.clone(memory_format=layout).requires_grad_()
        y = conv(xl)
        y.square().sum().backward()
        xg = x.clone().requires_grad_()
        y_want = plain(xg)
        y_want.square().sum().backward()
        assert_close(y, y_want, torch.float64, f"forward, {layout}")
        assert_close(xl.grad, xg.grad, torch.float64, f"grad x, {layout}")
        assert_close(conv.weight.grad, plain.weight.grad, torch.float64, f"grad weight, {layout}")
        conv.zero_grad(), plain.zero_grad()
    assert cached(conv, "_channels_last_weight") is None, "cached a weight although autograd was recording"

    xl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv(xl)
        kept = cached(conv, "_channels_last_weight")
        assert kept.is_contiguous(memory_format=torch.channels_last)
        with torch.profiler.profile() as prof:
            got = conv(xl)
        assert not [e.key for e in prof.key_averages() if e.key == "aten::clone"], "the weight was copied again"
        assert cached(conv, "_channels_last_weight") is kept
        assert_close(got, plain(x), torch.float64, "cached weight")
        conv.weight.mul_(-0.5)
        plain.weight.mul_(-0.5)
        assert_close(conv(xl), plain(x), torch.float64, "after an in-place update of the weight")
    assert list(conv.state_dict()) == ["weight", "bias"]


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_groups=5), ValueError, "num_groups"),
    (dict(ch=0), ValueError, "ch must"),
    (dict(ch_mult=()), ValueError, "ch_mult"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(backend="cudnn"), ValueError, "backend"),
])
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny(**kwargs)


@pytest.mark.parametrize("make, error, match", [
    (lambda: (torch.zeros(1, 3, 8, 8, dtype=torch.int64), torch.tensor([1])), TypeError, "x must be a floating"),
    (lambda: (torch.zeros(1, 3, 8, 8, dtype=torch.float64), torch.tensor([1])), TypeError, "parameters are"),
    (lambda: (torch.zeros(1, 4, 8, 8), torch.tensor([1])), ValueError, r"x must have shape \(N, 3, H, W\)"),
    (lambda: (torch.zeros(1, 3, 8, 6, 2), torch.tensor([1])), ValueError, "x must have shape"),
    (lambda: (torch.zeros(1, 3, 8, 7), torch.tensor([1])), ValueError, "divisible by 2"),
    (lambda: (torch.zeros(2, 3, 8, 8), torch.tensor([1, 2, 3])), ValueError, r"t must be a scalar or have shape \(2"),
    (lambda: (torch.zeros(2, 3, 8, 8), torch.tensor([True, False])), TypeError, "t must hold integer or real"),
    (lambda: (torch.zeros(2, 3, 8, 8), "5"), TypeError, "t must be a Tensor or a number"),
])
def test_bad_inputs(make, error, match):
    x, t = make()
    with pytest.raises(error, match=match):
        tiny()(x, t)


def test_bad_backend_argument():
    with pytest.raises(ValueError, match="backend"):
        tiny()(torch.zeros(1, 3, 8, 8), 1, backend="fast")
