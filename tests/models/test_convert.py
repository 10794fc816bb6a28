"""DDPMUNet <-> diffusers UNet2DModel: same outputs both ways, clear errors on mismatched checkpoints."""

import warnings

import pytest
import torch
from helpers import assert_close

from diffusion_fast.models import DDPMUNet, ddpm_unet_from_diffusers, diffusers_config, to_diffusers_state_dict
from diffusion_fast.ops.group_norm_silu import _unsupported as group_norm_silu_unsupported

diffusers = pytest.importorskip("diffusers")

BACKENDS = [pytest.param("torch", "cpu", id="torch-cpu"), pytest.param("cuda", "cpu", id="ext-cpu")]
GPU_BACKENDS = [pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.cuda) for b in ("torch", "cuda", "triton")]

# The DDPM layout of google/ddpm-cifar10-32's config, at a small width.
SMALL = dict(
    sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-6, downsample_padding=0, attention_head_dim=None, center_input_sample=False, mid_block_scale_factor=1,
)
CIFAR10 = dict(SMALL, sample_size=32, block_out_channels=(128, 256, 256, 256),
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1)


def unet2d(**config):
    """A randomly initialised UNet2DModel with non-trivial GroupNorm affines (ones/zeros by default)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attention_head_dim=None is what the DDPM checkpoints use
        model = diffusers.UNet2DModel(**config)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(torch.randn_like(m.weight) * 0.2)
                m.bias.add_(torch.randn_like(m.bias) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def cifar10_pair():
    """google/ddpm-cifar10-32's architecture, randomly initialised, and our copy (built once)."""
    torch.manual_seed(1)
    theirs = unet2d(**CIFAR10)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    return ddpm_unet_from_diffusers(theirs).eval(), x, t, diffusers_out(theirs, x, t)


def diffusers_out(model, x, t):
    with torch.no_grad():
        return model(x, t).sample


def skip_unless_runs(backend, x):
    reason = group_norm_silu_unsupported(backend, x)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("backend, device", BACKENDS + GPU_BACKENDS)
def test_small_unet2d_same_output(backend, device):
    theirs = unet2d(**SMALL).to(device)
    ours = ddpm_unet_from_diffusers(theirs, backend=backend).eval()
    assert ours.config["attn_resolutions"] == (4,) and ours.config["ch_mult"] == (1, 2)
    x, t = torch.randn(3, 3, 8, 8, device=device), torch.tensor([0, 17, 999], device=device)
    skip_unless_runs(backend, x)
    with torch.no_grad():
        assert_close(ours(x, t), diffusers_out(theirs, x, t), torch.float32, f"small UNet2DModel on {backend}")


def test_new_model_takes_the_unet2d_dtype():
    """Built from a UNet2DModel, ours has its dtype (and device: test_small_unet2d_same_output on CUDA)."""
    theirs = unet2d(**SMALL).double()
    ours = ddpm_unet_from_diffusers(theirs, backend="torch").eval()
    assert {p.dtype for p in ours.parameters()} == {torch.float64}
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([3, 500])
    with torch.no_grad():
        # diffusers computes its timestep embedding in float32 whatever the model's dtype
        assert_close(ours(x, t), diffusers_out(theirs, x, t), torch.float32, "float64 UNet2DModel")


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_cifar10_unet2d_same_output(cifar10_pair, backend, device):
    ours, x, t, expected = cifar10_pair
    skip_unless_runs(backend, x)
    with torch.device("meta"):
        assert ours.config == DDPMUNet.cifar10().config
    with torch.no_grad():
        assert_close(ours(x, t, backend=backend), expected, torch.float32, f"CIFAR-10 UNet2DModel on {backend}")


def test_round_trip_through_diffusers():
    ours = DDPMUNet.tiny(resolution=8, attn_resolutions=(4,)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    theirs = unet2d(**diffusers_config(ours))
    theirs.load_state_dict(to_diffusers_state_dict(ours), strict=True)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        assert_close(diffusers_out(theirs, x, t), ours(x, t, backend="torch"), torch.float32, "ours -> diffusers")
    back = ddpm_unet_from_diffusers(theirs.state_dict(), resolution=8)
    assert back.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


def test_legacy_attention_names_load():
    theirs = unet2d(**SMALL)
    legacy = {}
    for key, value in theirs.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    ours = ddpm_unet_from_diffusers(legacy, resolution=8).eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([42])
    with torch.no_grad():
        assert_close(ours(x, t, backend="torch"), diffusers_out(theirs, x, t), torch.float32, "legacy names")


def test_truncated_and_extra_keys_are_listed():
    state = dict(unet2d(**SMALL).state_dict())
    del state["mid_block.attentions.0.to_q.weight"], state["up_blocks.1.resnets.2.conv2.bias"]
    state["mid_block.attentions.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        ddpm_unet_from_diffusers(state, resolution=8)
    msg = str(info.value)
    assert "2 missing keys" in msg and "mid_block.attentions.0.to_q.weight" in msg
    assert "up_blocks.1.resnets.2.conv2.bias" in msg
    assert "1 unexpected keys: mid_block.attentions.0.extra.weight" in msg
    with pytest.raises(ValueError, match=r"\d+ missing keys: .*, \.\.\. \(\d+ more\)"):  # long lists are cut
        ddpm_unet_from_diffusers({k: v for k, v in state.items() if "up_blocks" not in k}, resolution=8)


def test_shape_mismatch_is_listed():
    state = unet2d(**SMALL).state_dict()
    target = DDPMUNet.tiny(resolution=8, attn_resolutions=(4,), num_res_blocks=2, in_channels=1)
    expected = r"1 shape mismatches: conv_in.weight: checkpoint \(32, 3, 3, 3\) vs model \(32, 1, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        ddpm_unet_from_diffusers(state, model=target)


def test_unreadable_state_dict():
    with pytest.raises(ValueError, match="missing keys \\['conv_in.weight'"):
        ddpm_unet_from_diffusers({"conv_out.weight": torch.zeros(3, 32, 3, 3)}, resolution=8)
    with pytest.raises(ValueError, match="pass resolution="):
        ddpm_unet_from_diffusers(unet2d(**SMALL).state_dict())
    with pytest.raises(TypeError, match="source must be"):
        ddpm_unet_from_diffusers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("field, value", [
    ("flip_sin_to_cos", True), ("freq_shift", 0), ("downsample_padding", 1), ("act_fn", "gelu"),
    ("resnet_time_scale_shift", "scale_shift"), ("attention_head_dim", 8),
])
def test_non_ddpm_layouts_are_refused(field, value):
    with pytest.raises(ValueError, match=f"config.{field}"):
        ddpm_unet_from_diffusers(unet2d(**dict(SMALL, **{field: value})))


def test_mismatched_up_blocks_are_refused():
    config = dict(SMALL, up_block_types=("UpBlock2D", "AttnUpBlock2D"))
    with pytest.raises(ValueError, match="config.up_block_types must mirror"):
        ddpm_unet_from_diffusers(unet2d(**config))
