"""The models' CPU convolutions and linears through oneDNN with prepacked weights (models/onednn.py):
same results as ATen's, the weight packed once and repacked when it changes, used only where it
may be (our backends, no autograd, float32/bfloat16), and a clean fallback to ATen."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, randomize_

import diffusion_fast
from diffusion_fast import backends
from diffusion_fast.models import DDPMUNet, onednn
from diffusion_fast.models.blocks import AttnBlock, Conv2d, Linear
from diffusion_fast.models.param_cache import cached

pytestmark = pytest.mark.skipif(onednn.unsupported_globally() is not None,
                                reason=f"oneDNN path off: {onednn.unsupported_globally()}")

CL = torch.channels_last
# (N, C, H, W), out channels, kernel, stride, padding, dilation, groups
CONVS = [
    ((1, 8, 8, 8), 16, 3, 1, 1, 1, 1),     # batch 1, 8x8: ATen's im2col path, oneDNN here
    ((3, 6, 5, 7), 5, 3, 1, 1, 1, 1),      # odd sizes and channels
    ((2, 8, 9, 9), 8, 3, 2, 0, 1, 1),      # the UNet's downsample (stride 2, pad applied before)
    ((2, 12, 6, 6), 4, 1, 1, 0, 1, 1),     # 1x1 (nin shortcut)
    ((2, 8, 11, 11), 8, 3, 1, 2, 2, 1),    # NCSNv2's dilated convs
    ((2, 8, 6, 6), 6, 3, 1, 1, 1, 2),      # grouped
]


def _conv(shape, out, k, stride, pad, dil, groups, dtype):
    conv = randomize_(Conv2d(shape[1], out, k, stride=stride, padding=pad, dilation=dil, groups=groups))
    return conv.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CONVS)
def test_conv2d_matches_reference_and_packs_once(case, dtype):
    shape, out, k, stride, pad, dil, groups = case
    conv = _conv(shape, out, k, stride, pad, dil, groups, dtype)
    x = torch.randn(shape).to(dtype).contiguous(memory_format=CL)

    def reference():
        return F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride, pad, dil, groups)

    def baseline():  # ATen in the tested dtype: its own rounding error sets the bf16 tolerance
        return F.conv2d(x.contiguous(), conv.weight, conv.bias, stride, pad, dil, groups)

    with torch.no_grad():
        y = conv(x)
        packed = cached(conv, "_onednn_weight")
        assert packed is not None and packed.is_mkldnn, "the oneDNN path was not taken"
        assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
        assert_close(y, reference(), dtype, "first call", baseline=baseline())
        assert_close(conv(x), reference(), dtype, "second call", baseline=baseline())
        assert cached(conv, "_onednn_weight") is packed, "the weight was packed again although it did not change"
        conv.weight.mul_(-0.5)
        assert_close(conv(x), reference(), dtype, "after an in-place update", baseline=baseline())
        assert cached(conv, "_onednn_weight") is not packed
        x = torch.randn((shape[0] + 1,) + shape[1:]).to(dtype).contiguous(memory_format=CL)
        assert_close(conv(x), reference(), dtype, "another batch size", baseline=baseline())


def test_conv2d_without_bias():
    conv = randomize_(Conv2d(6, 4, 3, padding=1, bias=False))
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=CL)
    with torch.no_grad():
        y = conv(x)
    assert cached(conv, "_onednn_weight") is not None
    assert_close(y, F.conv2d(x.double(), conv.weight.double(), None, 1, 1), torch.float32, "no bias")


@pytest.mark.parametrize("why", ["backend torch", "autograd", "float64", "NCHW input", "switched off",
                                 "reflect padding"])
def test_conv2d_stays_on_aten(why, monkeypatch):
    conv = randomize_(Conv2d(8, 8, 3, padding=1, padding_mode="reflect" if why == "reflect padding" else "zeros"))
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)
    if why == "float64":
        conv, x = conv.double(), x.double()
    if why == "NCHW input":
        x = x.contiguous()
    if why == "switched off":
        monkeypatch.setenv("DIFFUSION_FAST_ONEDNN", "0")
    with torch.set_grad_enabled(why == "autograd"), diffusion_fast.use_backend(
            "torch" if why == "backend torch" else "auto"):
        y = conv(x)
    assert cached(conv, "_onednn_weight") is None, f"oneDNN ran although: {why}"
    with torch.no_grad():
        want = torch.nn.Conv2d.forward(copy.deepcopy(conv).double(), x.double())
    assert_close(y, want, x.dtype, why)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, packs", [((2, 40, 24), True), ((1, 1, 64, 24), True), ((3, 24), False)])
def test_linear_packs_from_min_rows(shape, packs, dtype):
    lin = randomize_(Linear(24, 17)).to(dtype)
    x = torch.randn(shape).to(dtype)
    with torch.no_grad():
        y = lin(x)
    assert (cached(lin, "_onednn_weight") is not None) == packs
    want = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert_close(y, want, dtype, f"linear {shape}", baseline=F.linear(x, lin.weight, lin.bias))


def test_attention_block_joint_projection_through_onednn():
    """The channels_last block packs q/k/v as one weight; an in-place update of k is seen."""
    block = randomize_(AttnBlock(32))
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=CL)

    def check(what):
        with torch.no_grad():
            got = block(x)
            with diffusion_fast.use_backend("torch"):
                want = copy.deepcopy(block).double()(x.double().contiguous())
        assert_close(got, want, torch.float32, what)

    check("first call")
    packed = cached(block, "_qkv_onednn")
    assert packed is not None and packed.is_mkldnn
    check("second call")
    assert cached(block, "_qkv_onednn") is packed
    with torch.no_grad():
        block.k.weight.mul_(-2.0)
    check("after an in-place update of k's weight")
    assert cached(block, "_qkv_onednn") is not packed


def test_failure_falls_back_to_aten_once(monkeypatch):
    monkeypatch.setattr(onednn, "_broken", [])
    monkeypatch.setattr(backends, "_fallbacks", {})

    def broken(*args):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(onednn, "conv2d", broken)
    conv = randomize_(Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="planted failure"):
        y = conv(x)
    assert_close(y, F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1), torch.float32,
                 "after the fallback")
    info = diffusion_fast.env_info()
    assert any("planted failure" in f["reason"] and f["used"] == "aten" for f in info["fallbacks"])
    assert info["auto_rules"]["conv2d/linear (models, CPU sampling)"]["onednn"] is False
    lin = Linear(8, 8)
    with torch.no_grad():
        lin(torch.randn(100, 8))
    assert cached(lin, "_onednn_weight") is None, "oneDNN still used after it failed"


def test_sampled_model_still_copies_and_saves():
    """Packed weights are opaque tensors that cannot be copied or saved: they are kept beside
    the model, so deepcopy (e.g. an EMA copy), torch.save and state_dict see only parameters."""
    model = randomize_(DDPMUNet.tiny()).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 500])
    with torch.no_grad():
        y = model(x, t)
    assert cached(model.conv_in, "_onednn_weight") is not None
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert list(twin.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert torch.equal(twin(x, t), y) and torch.equal(loaded(x, t), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quickgelu", "gelu"])
def test_clip_mlp_with_the_activation_in_the_gemm(quick_gelu, dtype):
    """CLIP's MLP as two oneDNN GEMMs (QuickGELU through swish with 1.702 folded into the weights):
    the same as the plain MLP in float64; the packed weights follow in-place updates."""
    from diffusion_fast.models import CLIPTextEncoder
    model = randomize_(CLIPTextEncoder.tiny(quick_gelu=quick_gelu)).eval()
    block = model.transformer.resblocks[0]
    x = torch.randn(3, 40, model.config["width"])
    plain = copy.deepcopy(block.mlp).double()

    def check(what):
        with torch.no_grad():
            got = block._mlp(x.to(dtype))
            assert_close(got, plain(x.double()), dtype, what, baseline=block.mlp(x.to(dtype)))

    block.to(dtype)
    check("first call")
    packed = cached(block, "_fc_onednn")
    assert packed is not None and packed[0].is_mkldnn and cached(block, "_proj_onednn") is not None
    with torch.no_grad():
        for mlp in (block.mlp, plain):
            mlp.c_fc.bias.mul_(-1.5)
            mlp.c_proj.weight.mul_(0.5)
    check("after in-place updates of c_fc's bias and c_proj's weight")
    assert cached(block, "_fc_onednn") is not packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 6, 5, 7), (1, 8, 8, 8), (2, 4, 1, 3)])
def test_upsample_conv_runs_as_four_phase_convs(shape, dtype):
    """Nearest 2x upsampling + conv 3x3 as one oneDNN 2x2 conv into the four output phases: the result of
    upsample-then-conv (float64 reference), channels_last, packed once and again after a weight update."""
    from diffusion_fast.models.blocks import Upsample
    up = randomize_(Upsample(shape[1])).to(dtype)
    x = torch.randn(shape).to(dtype).contiguous(memory_format=CL)

    def reference():
        w, b = up.conv.weight.double(), up.conv.bias.double()
        return F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), w, b, padding=1)

    def baseline():
        return F.conv2d(F.interpolate(x.contiguous(), scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias,
                        padding=1)

    with torch.no_grad():
        y = up(x)
        packed = cached(up, "_phase_conv")
        assert packed is not None, "the phase path was not taken"
        assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
        assert_close(y, reference(), dtype, "first call", baseline=baseline())
        up.conv.weight.mul_(-0.5)
        assert_close(up(x), reference(), dtype, "after an in-place update", baseline=baseline())
        assert cached(up, "_phase_conv") is not packed

def test_upsample_phase_conv_only_where_it_may(monkeypatch):
    """Upsample takes the plain path on the torch backend, under autograd and on NCHW input (spied on: under
    autograd the packed weight's cache stays empty either way), the phase conv otherwise."""
    from diffusion_fast.models.blocks import Upsample
    phased = []
    real = Upsample._forward_phases
    monkeypatch.setattr(Upsample, "_forward_phases", lambda self, x: phased.append(1) or real(self, x))
    up = randomize_(Upsample(4))
    x = torch.randn(2, 4, 3, 5).contiguous(memory_format=CL)
    for setup, expect in (("sampling", True), ("torch", False), ("autograd", False), ("nchw", False)):
        phased.clear()
        with diffusion_fast.use_backend("torch" if setup == "torch" else "auto"), \
                torch.set_grad_enabled(setup == "autograd"):
            up(x.contiguous() if setup == "nchw" else x)
        assert bool(phased) == expect, setup
