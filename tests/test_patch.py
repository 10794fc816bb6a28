"""diffusion_fast.patch / unpatch on tiny, randomly initialised diffusers models and plain modules.

Patched outputs are compared with the float64 model (``assert_close`` with the unpatched
model's own result as the baseline), and spies check that the fused ops really ran.
"""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402
from helpers import BACKEND_DEVICES, assert_close, require_backend  # noqa: E402

import diffusion_fast as df  # noqa: E402
from diffusion_fast import backends  # noqa: E402
from diffusion_fast.patching import DiffusionFastAttnProcessor, PatchedGroupNormSiLU, PatchReport  # noqa: E402
from diffusion_fast.models import onednn  # noqa: E402
from diffusion_fast.models.blocks import Conv2d, Linear  # noqa: E402
from diffusion_fast.models.param_cache import cached  # noqa: E402
from diffusion_fast.patching import attention as attention_handler  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _tiny_models_use_one_thread(one_thread):
    yield


def tiny_unet(attn: bool = True, shift: str = "default", **kwargs) -> UNet2DModel:
    """UNet2DModel(sample_size 16, channels (32, 64), 1 layer per block, 8 groups), eval mode."""
    down = ("AttnDownBlock2D", "DownBlock2D") if attn else ("DownBlock2D", "DownBlock2D")
    up = ("UpBlock2D", "AttnUpBlock2D") if attn else ("UpBlock2D", "UpBlock2D")
    return UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                       down_block_types=down, up_block_types=up, resnet_time_scale_shift=shift, **kwargs).eval()


def unet_inputs(size: int = 16, dtype=torch.float32):
    return torch.randn(2, 3, size, size, dtype=dtype), torch.tensor([3, 517])


def run(model, x, t, dtype=None):
    return model(x if dtype is None else x.to(dtype), t).sample


@pytest.fixture
def spies(monkeypatch):
    """Counts calls of the group_norm_silu op (through backends.select) and of our attention."""
    calls = {"group_norm_silu": 0, "attention": 0}
    select, attention = backends.select, attention_handler.attention

    def counting_select(op, x, unsupported, **kwargs):
        calls["group_norm_silu"] += op == "group_norm_silu"
        return select(op, x, unsupported, **kwargs)

    def counting_attention(*args, **kwargs):
        calls["attention"] += 1
        return attention(*args, **kwargs)

    monkeypatch.setattr(backends, "select", counting_select)
    monkeypatch.setattr(attention_handler, "attention", counting_attention)
    return calls


def expected_calls(model) -> dict:
    """A patched UNet runs every GroupNorm as our op and every Attention through our function."""
    return {"group_norm_silu": sum(isinstance(m, nn.GroupNorm) for m in model.modules()),
            "attention": sum(isinstance(m, Attention) for m in model.modules())}


UNET_CONFIGS = [(False, "default"), (True, "scale_shift"), (True, "default"), (False, "scale_shift")]
# every backend x config, but the (slow) interpreter only on the first two, which cover both
# time-embedding modes and attention
UNET_CASES = [pytest.param(*bd.values, attn, shift, marks=bd.marks,
                           id=f"{bd.id}-{'attn' if attn else 'plain'}-{shift}")
              for bd in BACKEND_DEVICES for k, (attn, shift) in enumerate(UNET_CONFIGS)
              if bd.id != "triton-interp" or k < 2]


@pytest.mark.parametrize("backend,device,attn,shift", UNET_CASES)
def test_unet_matches_unpatched_fp32(backend, device, attn, shift, spies):
    size = 8 if backend == "triton" else 16  # the interpreter is slow: tiny input
    model = tiny_unet(attn, shift).to(device)
    x, t = unet_inputs(size)
    x, t = x.to(device), t.to(device)
    with torch.no_grad():
        reference = run(copy.deepcopy(model).double(), x, t, torch.float64)
        baseline = run(model, x, t)
        report = df.patch(model, backend=backend)
        require_backend(backend, "group_norm_silu", x, backends.unsupported)
        for key in spies:
            spies[key] = 0
        actual = run(model, x, t)
    assert spies == expected_calls(model)
    assert_close(actual, reference, torch.float32, f"patched UNet2DModel ({backend})", baseline=baseline)
    assert report.backend == backend and not report.skipped


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_unet_fp16(backend, device, spies):
    model = tiny_unet(True, "scale_shift").to(device)
    x, t = unet_inputs(8)
    x, t = x.to(device), t.to(device)
    with torch.no_grad():
        reference = run(copy.deepcopy(model).double(), x, t, torch.float64)
        model.half()
        try:
            baseline = run(model, x, t, torch.float16)
        except RuntimeError as exc:  # a CPU build without fp16 conv kernels
            pytest.skip(f"fp16 UNet2DModel does not run here: {exc}")
        df.patch(model, backend=backend)
        actual = run(model, x, t, torch.float16)
    assert actual.dtype == torch.float16 and spies["group_norm_silu"] > 0
    assert_close(actual, reference, torch.float16, f"fp16 patched UNet2DModel ({backend})", baseline=baseline)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.id != "triton-interp"])
def test_unet_training_step(backend, device):
    """Gradients of every parameter match the unpatched model's; an optimizer step runs."""
    model = tiny_unet(True, "scale_shift").train().to(device)
    x, t = unet_inputs(8)
    x, t = x.to(device), t.to(device)

    def grads(m, dtype):
        m.zero_grad()
        run(m, x, t, dtype).square().mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    reference, baseline = grads(copy.deepcopy(model).double(), torch.float64), grads(model, None)
    df.patch(model, backend=backend)
    actual = grads(model, None)
    assert actual.keys() == reference.keys()
    for name in actual:
        assert_close(actual[name], reference[name], torch.float32, f"grad {name}", baseline=baseline[name])
    before = run(model, x, t).detach()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    after = run(model, x, t).detach()
    assert torch.isfinite(after).all() and not torch.equal(before, after)


@pytest.mark.skipif(onednn.unsupported_globally() is not None, reason="oneDNN path off")
def test_channels_last_unet_samples_on_prepacked_onednn_layers():
    """Run channels_last on the CPU, a patched UNet2DModel's convs and attention projections take
    oneDNN with packed weights, and its output still equals the unpatched model's."""
    model = tiny_unet(True, "default").to(memory_format=torch.channels_last)
    x, t = unet_inputs(16)
    with torch.no_grad():
        reference = run(copy.deepcopy(model).double(), x, t, torch.float64)
        baseline = run(model, x, t)
        report = df.patch(model)
        actual = run(model, x, t)
    conv, linear = model.down_blocks[0].resnets[0].conv1, model.mid_block.attentions[0].to_q
    assert type(conv) is Conv2d and type(linear) is Linear and report.layers > 0
    assert cached(conv, "_onednn_weight") is not None and cached(linear, "_onednn_weight") is not None
    assert_close(actual, reference, torch.float32, "channels_last patched UNet2DModel", baseline=baseline)
    with torch.no_grad(), df.use_backend("torch"):
        assert_close(run(model, x, t), reference, torch.float32, "patched, backend torch", baseline=baseline)


def test_report_lists_every_site():
    model = tiny_unet(True, "scale_shift")
    report = df.patch(model)
    assert isinstance(report, PatchReport) and report.backend == "auto"
    assert report.counts() == {"resnet_block": 8, "attention": 4, "group_norm_silu": 1}
    by_path = {r.path: r for r in report.replaced}
    assert by_path["conv_norm_out"].kind == "group_norm_silu"
    assert "scale/shift" in by_path["down_blocks.0.resnets.0"].detail
    assert "AttnProcessor2_0" in by_path["mid_block.attentions.0"].detail
    assert report.skipped == []
    assert "resnet_block 8" in str(report) and "mid_block.attentions.0" in str(report)
    assert isinstance(model.conv_norm_out, PatchedGroupNormSiLU) and isinstance(model.conv_act, nn.Identity)
    assert isinstance(model.mid_block.attentions[0].processor, DiffusionFastAttnProcessor)


def test_non_silu_resnets_are_skipped_with_reason():
    """act_fn="relu": every ResnetBlock2D pairs GroupNorm with ReLU, so none is fused;
    UNet2DModel's output conv_act is always SiLU, so that pair still is."""
    model = tiny_unet(False, "default", act_fn="relu")
    x, t = unet_inputs(8)
    with torch.no_grad():
        before = run(model, x, t)
        report = df.patch(model)
        after = run(model, x, t)
    assert report.counts()["resnet_block"] == 0 and report.counts()["group_norm_silu"] == 1
    resnets = [s for s in report.skipped if s.kind == "resnet_block"]
    assert len(resnets) == 8 and all("ReLU is not SiLU" in s.reason for s in resnets)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_unpatch_restores_exactly():
    model = tiny_unet(True, "default")
    x, t = unet_inputs(8)
    state = model.state_dict()
    processors = {n: m.processor for n, m in model.named_modules() if isinstance(m, Attention)}
    norm_out, act = model.conv_norm_out, model.conv_act
    classes = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        before = run(model, x, t)
        report = df.patch(model)
        patched_state = model.state_dict()
        assert report.layers > 0
        # 8 resnets, 4 attentions, the model's output pair, and each plain Conv2d / Linear
        assert df.unpatch(model) == 13 + report.layers
        after = run(model, x, t)
    assert torch.equal(before, after)
    assert list(patched_state) == list(state) and all(
        patched_state[k].data_ptr() == state[k].data_ptr() for k in state)
    restored = model.state_dict()
    assert list(restored) == list(state) and all(torch.equal(restored[k], state[k]) for k in state)
    assert model.conv_norm_out is norm_out and model.conv_act is act
    assert {n: m.processor for n, m in model.named_modules() if isinstance(m, Attention)} == processors
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any("forward" in m.__dict__ or "_diffusion_fast_patch" in m.__dict__ for m in model.modules())
    assert df.unpatch(model) == 0


def test_patch_twice_is_idempotent(spies):
    model = tiny_unet(True, "default")
    x, t = unet_inputs(8)
    first = df.patch(model, backend="torch")
    second = df.patch(model, backend="torch")
    assert second == first
    with torch.no_grad():
        run(model, x, t)
    assert spies == expected_calls(model)  # one fused call per GroupNorm, not two
    assert df.unpatch(model) == 13
    assert type(model.conv_norm_out) is nn.GroupNorm and type(model.conv_act) is nn.SiLU


def test_state_dict_round_trip_while_patched():
    model, other = tiny_unet(True, "default"), tiny_unet(True, "default")
    x, t = unet_inputs(8)
    df.patch(model)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(run(model, x, t), run(other, x, t), rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == list(other.state_dict())


class GroupNorm32(nn.GroupNorm):
    """guided-diffusion's GroupNorm: computed in float32, cast back."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class ShiftedGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x) + 1.0


class ScaleShiftBlock(nn.Module):
    """guided-diffusion's ResBlock(use_scale_shift_norm=True) runs out_layers[0], then out_layers[1:]."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.out_layers = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        scale, shift = x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        return self.out_layers[1:](self.out_layers[0](x) * (1 + scale) + shift)


def test_generic_sequential_pairs(spies):
    hooked = nn.GroupNorm(4, 16)
    hooked.register_forward_hook(lambda *args: None)
    body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 16, 1),
                         GroupNorm32(4, 16), nn.SiLU(), nn.GroupNorm(4, 16), nn.ReLU(), ShiftedGroupNorm(4, 16),
                         nn.SiLU(), hooked, nn.SiLU(), ScaleShiftBlock(16))
    model = nn.Sequential(body)
    x = torch.randn(2, 3, 5, 7)
    keys = list(model.state_dict())
    double = copy.deepcopy(model).double()
    for m in double.modules():
        if type(m) is GroupNorm32:  # its float32 upcast is a float64 downcast here
            m.__class__ = nn.GroupNorm
    with torch.no_grad():
        reference, baseline = double(x.double()), model(x)
        report = df.patch(model, backend="torch")
        spies["group_norm_silu"] = 0
        actual = model(x)
    assert [(r.path, r.kind) for r in report.replaced] == [
        ("0.1", "group_norm_silu"), ("0.4", "group_norm_silu"), ("0.12.out_layers.0", "group_norm_silu")]
    reasons = {s.path: s.reason for s in report.skipped}
    assert reasons.keys() == {"0.6", "0.8", "0.10"}
    assert "ReLU follows the GroupNorm, not SiLU" in reasons["0.6"]
    assert "overrides GroupNorm.forward" in reasons["0.8"] and "hooks" in reasons["0.10"]
    assert spies["group_norm_silu"] == 2  # ScaleShiftBlock slices its Sequential: plain modules run
    assert_close(actual, reference, torch.float32, "patched Sequential", baseline=baseline)
    assert list(model.state_dict()) == keys and type(body[2]) is nn.SiLU
    df.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), baseline)


RESNET_VARIANTS = [
    pytest.param(dict(up=True), id="up"),
    pytest.param(dict(down=True, output_scale_factor=2.0), id="down-output_scale"),
    pytest.param(dict(down=True, kernel="fir"), id="fir-down"),
    pytest.param(dict(out_channels=24, conv_shortcut=True, time_embedding_norm="scale_shift", skip_time_act=True),
                 id="shortcut-scale_shift-skip_time_act"),
    pytest.param(dict(temb_channels=None), id="no-temb"),
    pytest.param(dict(groups_out=4, out_channels=24, eps=1e-3), id="groups_out"),
]


@pytest.mark.parametrize("kwargs", RESNET_VARIANTS)
def test_resnet_block_variants(kwargs, spies):
    kwargs = {"in_channels": 16, "temb_channels": 10, "groups": 8, **kwargs}
    block = ResnetBlock2D(**kwargs).eval()
    x = torch.randn(2, 16, 6, 6)
    temb = None if kwargs["temb_channels"] is None else torch.randn(2, 10)
    with torch.no_grad():
        reference = copy.deepcopy(block).double()(x.double(), None if temb is None else temb.double())
        baseline = block(x, temb)
        report = df.patch(block)
        spies["group_norm_silu"] = 0
        actual = block(x, temb)
    assert [r.kind for r in report.replaced] == ["resnet_block"] and spies["group_norm_silu"] == 2
    assert_close(actual, reference, torch.float32, f"ResnetBlock2D({kwargs})", baseline=baseline)


def test_resnet_block_dropout_in_training():
    block = ResnetBlock2D(in_channels=16, temb_channels=10, groups=8, dropout=0.5).train()
    x, temb = torch.randn(2, 16, 6, 6), torch.randn(2, 10)
    torch.manual_seed(1)
    baseline = block(x, temb)
    df.patch(block)
    torch.manual_seed(1)
    actual = block(x, temb)
    torch.testing.assert_close(actual, baseline, rtol=1e-5, atol=1e-5)


def test_resnet_block_calls_it_cannot_fuse_run_diffusers_forward():
    block = ResnetBlock2D(in_channels=16, temb_channels=10, groups=8, time_embedding_norm="scale_shift")
    x = torch.randn(2, 16, 4, 4)
    with pytest.raises(TypeError) as unpatched:
        block(x, None)
    df.patch(block)
    with pytest.raises(TypeError) as patched:  # diffusers' own error, from its own forward
        block(x, None)
    assert str(patched.value) == str(unpatched.value)


def test_resnet_block_skips():
    class Custom(ResnetBlock2D):
        def forward(self, x, temb):
            return x

    mish = ResnetBlock2D(in_channels=16, temb_channels=10, groups=8, non_linearity="mish")
    hooked = ResnetBlock2D(in_channels=16, temb_channels=10, groups=8)
    hooked.forward = hooked.forward  # what accelerate's hooks do
    model = nn.ModuleDict(dict(mish=mish, custom=Custom(in_channels=16, temb_channels=10, groups=8), hooked=hooked))
    report = df.patch(model)
    reasons = {s.path: s.reason for s in report.skipped}
    assert report.replaced == [] and reasons.keys() == {"mish", "custom", "hooked"}
    assert "Mish is not SiLU" in reasons["mish"] and "overrides ResnetBlock2D.forward" in reasons["custom"]
    assert "already overridden" in reasons["hooked"]


def test_attention_processor(spies):
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16).eval()
    classic = Attention(query_dim=32, heads=4, dim_head=8, norm_num_groups=8, residual_connection=True,
                        processor=AttnProcessor()).eval()
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    image = torch.randn(2, 32, 3, 5)
    mask = torch.zeros(2, 1, 7)
    with torch.no_grad():
        references = (copy.deepcopy(attn).double()(x.double(), context.double()),
                      copy.deepcopy(classic).double()(image.double()))
        baselines = attn(x, context), classic(image), attn(x, context, attention_mask=mask)
        report = df.patch(nn.ModuleList([attn, classic]))
        spies["attention"] = 0
        actual = attn(x, context), classic(image)
        assert spies["attention"] == 2
        masked = attn(x, context, attention_mask=mask)
        assert spies["attention"] == 2  # masks go to the processor it replaced
    assert [(r.path, r.kind) for r in report.replaced] == [("0", "attention"), ("1", "attention")]
    for got, want, base, what in zip(actual, references, baselines, ("cross", "classic+group_norm")):
        assert_close(got, want, torch.float32, f"attention {what}", baseline=base)
    assert torch.equal(masked, baselines[2])


def test_attention_skips():
    custom = Attention(query_dim=32, heads=2, dim_head=16)
    custom.set_processor(lambda attn, hidden_states, **kwargs: hidden_states)
    model = nn.ModuleDict(dict(unscaled=Attention(query_dim=32, heads=2, dim_head=16, scale_qk=False),
                               spatial=Attention(query_dim=32, heads=2, dim_head=16, spatial_norm_dim=4),
                               qk=Attention(query_dim=32, heads=2, dim_head=16, qk_norm="layer_norm"),
                               custom=custom))
    report = df.patch(model)
    reasons = {s.path: s.reason for s in report.skipped}
    assert report.replaced == [] and reasons.keys() == {"unscaled", "spatial", "qk", "custom"}
    assert "scale" in reasons["unscaled"] and "spatial_norm" in reasons["spatial"]
    assert "qk_norm" in reasons["qk"] and "not one of diffusers' defaults" in reasons["custom"]


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8).eval()


def tiny_cond_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8).eval()


@pytest.mark.parametrize("name", ["vae", "cond_unet"])
def test_other_diffusers_models(name):
    """AutoencoderKL (Encoder/Decoder output pairs, temb-less resnets, the decoder's "group" norm
    mode) and UNet2DConditionModel (self- and cross-attention processors)."""
    if name == "vae":
        model, args, counts = tiny_vae(), (torch.randn(2, 3, 16, 16),), {"resnet_block": 10, "attention": 2,
                                                                          "group_norm_silu": 2}
    else:
        model, args = tiny_cond_unet(), (torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 24))
        counts = {"resnet_block": 8, "attention": 8, "group_norm_silu": 1}
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(*(a.double() if a.is_floating_point() else a for a in args)).sample
        baseline = model(*args).sample
        report = df.patch(model)
        actual = model(*args).sample
    assert report.counts() == counts and report.skipped == []
    assert_close(actual, reference, torch.float32, f"patched {name}", baseline=baseline)


def test_bad_input():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        df.patch("unet")
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'fast'"):
        df.patch(nn.Linear(2, 2), backend="fast")
    with pytest.raises(ValueError, match="backend"):
        df.patch(nn.Linear(2, 2), backend=None)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got int"):
        df.unpatch(3)


def test_torch_compile_over_patched_unet():
    model = tiny_unet(True, "default")
    x, t = unet_inputs(8)
    df.patch(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(run(compiled, x, t), run(model, x, t), rtol=1e-5, atol=1e-5)
