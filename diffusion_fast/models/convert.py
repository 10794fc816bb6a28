"""DDPMUNet <-> diffusers ``UNet2DModel`` (the layout of google/ddpm-cifar10-32 and friends).

The DDPM layout in diffusers: ``time_embedding_type="positional"``, ``flip_sin_to_cos=False``,
``freq_shift=1`` (the paper's sin-then-cos embedding with frequencies 10000^(-k/(h-1))),
``act_fn="silu"``, ``norm_num_groups=32``, ``norm_eps=1e-6``, ``downsample_padding=0`` (TensorFlow
"SAME" padding of the stride-2 conv), single-head attention (``attention_head_dim=None``),
``block_out_channels = ch * ch_mult``, ``down_block_types`` "AttnDownBlock2D" at the attention
levels and "DownBlock2D" elsewhere, and the mirrored ``up_block_types``. Weights map one to
one, with the same shapes:

    temb.dense.{0,1}                 time_embedding.linear_{1,2}
    down.i.block.j.{norm1,conv1,temb_proj,norm2,conv2,nin_shortcut}
                                     down_blocks.i.resnets.j.{norm1,conv1,time_emb_proj,norm2,conv2,conv_shortcut}
    down.i.attn.j.{norm,q,k,v,proj_out}
                                     down_blocks.i.attentions.j.{group_norm,to_q,to_k,to_v,to_out.0}
    down.i.downsample.conv           down_blocks.i.downsamplers.0.conv
    mid.{block_1,attn_1,block_2}     mid_block.{resnets.0,attentions.0,resnets.1}
    up.i.*  (i = level)              up_blocks.{L-1-i}.*  (upsample.conv -> upsamplers.0.conv)
    norm_out, conv_in, conv_out      conv_norm_out, conv_in, conv_out

Old checkpoints' attention names (``query``, ``key``, ``value``, ``proj_attn``) are accepted.
diffusers is never imported here; a ``UNet2DModel`` is recognised by its ``config``.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from diffusion_fast.models.ddpm_unet import DDPMUNet

__all__ = ["ddpm_unet_from_diffusers", "to_diffusers_state_dict", "diffusers_config"]

_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
           "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_FIXED = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
          "conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out",
          "mid.block_1": "mid_block.resnets.0", "mid.attn_1": "mid_block.attentions.0",
          "mid.block_2": "mid_block.resnets.1"}
_LISTED = 20  # keys named per kind of mismatch in an error message
_LAYER = re.compile(r"^(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)$")
_RESAMPLE = re.compile(r"^(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)$")
_MID = re.compile(r"^(mid\.(?:block_1|block_2|attn_1))\.(\w+)\.(weight|bias)$")


def _diffusers_key(key: str, num_levels: int) -> str:
    """Our state-dict key -> the diffusers UNet2DModel key (see the module doc's table)."""
    m = _LAYER.match(key)
    if m:
        side, level, kind, j, layer, param = m.groups()
        index = int(level) if side == "down" else num_levels - 1 - int(level)
        sub = ("resnets", _RESNET) if kind == "block" else ("attentions", _ATTN)
        return f"{side}_blocks.{index}.{sub[0]}.{j}.{sub[1][layer]}.{param}"
    m = _RESAMPLE.match(key)
    if m:
        side, level, kind, param = m.groups()
        index = int(level) if side == "down" else num_levels - 1 - int(level)
        return f"{side}_blocks.{index}.{kind}rs.0.conv.{param}"
    m = _MID.match(key)
    if m:
        block, layer, param = m.groups()
        return f"{_FIXED[block]}.{(_ATTN if 'attn' in block else _RESNET)[layer]}.{param}"
    prefix, param = key.rsplit(".", 1)
    return f"{_FIXED[prefix]}.{param}"


def _key_map(model: DDPMUNet) -> dict:
    num_levels = len(model.config["ch_mult"])
    return {k: _diffusers_key(k, num_levels) for k in model.state_dict()}


def to_diffusers_state_dict(model: DDPMUNet) -> dict:
    """``model``'s weights under diffusers ``UNet2DModel`` names (tensors shared, not copied).

    Load them with ``UNet2DModel(**diffusers_config(model)).load_state_dict(...)``.
    """
    if not isinstance(model, DDPMUNet):
        raise TypeError(f"to_diffusers_state_dict: model must be a DDPMUNet, got {type(model).__name__}")
    state = model.state_dict()
    return {theirs: state[ours] for ours, theirs in _key_map(model).items()}


def diffusers_config(model: DDPMUNet) -> dict:
    """Keyword arguments that build the diffusers ``UNet2DModel`` equivalent to ``model``."""
    cfg = model.config
    if not cfg["resamp_with_conv"]:
        raise ValueError("diffusers_config: diffusers' UNet2DModel always resamples with convs; "
                         "this model has resamp_with_conv=False")
    levels = range(len(cfg["ch_mult"]))
    attn = [cfg["resolution"] // 2 ** i in cfg["attn_resolutions"] for i in levels]
    return dict(
        sample_size=cfg["resolution"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        center_input_sample=False, time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(cfg["ch"] * m for m in cfg["ch_mult"]), layers_per_block=cfg["num_res_blocks"],
        mid_block_scale_factor=1, downsample_padding=0, downsample_type="conv", upsample_type="conv",
        dropout=cfg["dropout"], act_fn="silu", attention_head_dim=None, norm_num_groups=cfg["num_groups"],
        norm_eps=cfg["eps"], resnet_time_scale_shift="default", add_attention=True,
    )


# ---------------------------------------------------------------------------
# diffusers -> DDPMUNet
# ---------------------------------------------------------------------------
def _config_from_diffusers(config: Mapping) -> dict:
    """DDPMUNet kwargs from a UNet2DModel config; ValueError on anything outside the DDPM layout."""
    def get(name, default=None):
        return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)

    required = dict(time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1, act_fn="silu",
                    center_input_sample=False, resnet_time_scale_shift="default", downsample_padding=0,
                    downsample_type="conv", upsample_type="conv", mid_block_type="UNetMidBlock2D",
                    add_attention=True, mid_block_scale_factor=1, class_embed_type=None, num_class_embeds=None)
    defaults = dict(mid_block_type="UNetMidBlock2D", add_attention=True, downsample_type="conv",
                    upsample_type="conv", resnet_time_scale_shift="default", mid_block_scale_factor=1)
    for name, want in required.items():
        have = get(name, defaults.get(name))
        if have != want:
            raise ValueError(f"ddpm_unet_from_diffusers: config.{name} must be {want!r} for the DDPM layout, "
                             f"got {have!r}")
    widths = tuple(get("block_out_channels"))
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"ddpm_unet_from_diffusers: config.block_out_channels must be multiples of the first, "
                         f"got {widths}")
    down, up = tuple(get("down_block_types")), tuple(get("up_block_types"))
    if len(down) != len(widths) or any(d not in ("DownBlock2D", "AttnDownBlock2D") for d in down):
        raise ValueError(f"ddpm_unet_from_diffusers: config.down_block_types must be {len(widths)} of "
                         f"'DownBlock2D'/'AttnDownBlock2D', got {down}")
    mirrored = tuple(d.replace("Down", "Up") for d in reversed(down))
    if up != mirrored:
        raise ValueError(f"ddpm_unet_from_diffusers: config.up_block_types must mirror down_block_types, "
                         f"i.e. {mirrored}, got {up}")
    attn_widths = {w for w, d in zip(widths, down) if d.startswith("Attn")} | {widths[-1]}
    head_dim = get("attention_head_dim")
    if head_dim is not None and attn_widths != {head_dim}:
        raise ValueError(f"ddpm_unet_from_diffusers: DDPM attention is single-head; config.attention_head_dim must "
                         f"be None or the attention width {sorted(attn_widths)}, got {head_dim}")
    if get("time_embedding_dim") not in (None, 4 * ch):
        raise ValueError(f"ddpm_unet_from_diffusers: config.time_embedding_dim must be None or {4 * ch}, "
                         f"got {get('time_embedding_dim')}")
    groups = get("norm_num_groups", 32)
    if get("attn_norm_num_groups") not in (None, groups):
        raise ValueError(f"ddpm_unet_from_diffusers: config.attn_norm_num_groups must be None or {groups}, "
                         f"got {get('attn_norm_num_groups')}")
    size = get("sample_size")
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"ddpm_unet_from_diffusers: config.sample_size must be square, got {size}")
        size = size[0]
    if not isinstance(size, int):
        raise ValueError(f"ddpm_unet_from_diffusers: config.sample_size must be an int, got {size!r}")
    return dict(in_channels=get("in_channels"), out_channels=get("out_channels"), ch=ch,
                ch_mult=tuple(w // ch for w in widths), num_res_blocks=get("layers_per_block"),
                attn_resolutions=tuple(size // 2 ** i for i, d in enumerate(down) if d.startswith("Attn")),
                resolution=size, dropout=float(get("dropout", 0.0)), num_groups=groups, eps=float(get("norm_eps")))


def _rename_legacy(state_dict: Mapping) -> dict:
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) >= 2 and "attentions" in parts and parts[-2] in _LEGACY_ATTN:
            key = ".".join(parts[:-2] + [_LEGACY_ATTN[parts[-2]], parts[-1]])
        out[key] = value
    return out


def _config_from_state_dict(state: Mapping, resolution: Optional[int]) -> dict:
    """DDPMUNet kwargs read off the weights' names and shapes (num_groups/eps/dropout are not stored)."""
    needed = ("conv_in.weight", "conv_out.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"ddpm_unet_from_diffusers: cannot read the architecture, missing keys {missing}; "
                         "pass model= (a DDPMUNet of the right config) to get the full list of missing keys")
    if resolution is None:
        raise ValueError("ddpm_unet_from_diffusers: a bare state dict does not record the image size; "
                         "pass resolution= (e.g. 32 for google/ddpm-cifar10-32) or a UNet2DModel")
    ch, in_ch = state["conv_in.weight"].shape[:2]
    levels = sorted({int(m.group(1)) for k in state for m in [re.match(r"down_blocks\.(\d+)\.", k)] if m})
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"ddpm_unet_from_diffusers: down_blocks must be numbered 0..L-1, found {levels}")
    widths, attn = [], []
    for i in levels:
        key = f"down_blocks.{i}.resnets.0.conv1.weight"
        if key not in state:
            raise ValueError(f"ddpm_unet_from_diffusers: cannot read level {i}'s width, missing key {key!r}")
        widths.append(state[key].shape[0])
        attn.append(any(k.startswith(f"down_blocks.{i}.attentions.") for k in state))
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)] if m}
    if any(w % ch for w in widths):
        raise ValueError(f"ddpm_unet_from_diffusers: level widths {widths} are not multiples of ch={ch}")
    return dict(in_channels=in_ch, out_channels=state["conv_out.weight"].shape[0], ch=ch,
                ch_mult=tuple(w // ch for w in widths), num_res_blocks=len(blocks),
                attn_resolutions=tuple(resolution // 2 ** i for i, a in enumerate(attn) if a), resolution=resolution)


def check_state_dict(state: Mapping, expected: Mapping, header: str) -> None:
    """ValueError (``header`` first) listing every key of ``expected`` (key -> shape) missing from
    ``state``, every key of ``state`` not in ``expected``, and every shape that differs."""
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(shape)}"
                    for k, shape in expected.items() if k in state and tuple(state[k].shape) != tuple(shape))
    if missing or unexpected or shapes:
        lines = [header]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else ""
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:_LISTED]) + more)
        raise ValueError("\n".join(lines))


def _load_checked(model: DDPMUNet, state: Mapping) -> DDPMUNet:
    """Copy diffusers-named ``state`` into ``model``; ValueError listing every mismatch."""
    theirs_to_ours = {theirs: ours for ours, theirs in _key_map(model).items()}
    own = model.state_dict()
    check_state_dict(state, {theirs: own[ours].shape for theirs, ours in theirs_to_ours.items()},
                     f"ddpm_unet_from_diffusers: checkpoint does not match DDPMUNet({model.extra_repr()})")
    with torch.no_grad():
        for theirs, ours in theirs_to_ours.items():
            own[ours].copy_(state[theirs])
    return model


def ddpm_unet_from_diffusers(source, *, model: Optional[DDPMUNet] = None, resolution: Optional[int] = None,
                             dropout: Optional[float] = None, num_groups: int = 32, eps: float = 1e-6,
                             backend: Optional[str] = None) -> DDPMUNet:
    """A DDPMUNet holding the weights of a diffusers ``UNet2DModel`` (or its state dict).

    source: a ``UNet2DModel`` of the DDPM layout (its config is checked and used), or a state
    dict with diffusers' key names (the architecture is read off the keys and shapes; pass
    ``resolution=``, and ``num_groups``/``eps`` if they differ from DDPM's 32 / 1e-6).
    model: load into this DDPMUNet instead of building one. dropout: defaults to the
    UNet2DModel's, or 0.0 for a state dict. A model built from a UNet2DModel takes its device and
    dtype; weights are copied in the model's dtype.
    Raises ValueError naming every missing or unexpected key and every shape mismatch.
    """
    config = getattr(source, "config", None)
    if isinstance(source, nn.Module) and config is not None:
        kwargs, state = _config_from_diffusers(config), source.state_dict()
    elif isinstance(source, Mapping):
        state = _rename_legacy(source)
        if any(not isinstance(v, Tensor) for v in state.values()):
            raise TypeError("ddpm_unet_from_diffusers: every value of the state dict must be a Tensor")
        kwargs = None if model is not None else dict(_config_from_state_dict(state, resolution), num_groups=num_groups,
                                                     eps=eps, dropout=0.0)
    else:
        raise TypeError(f"ddpm_unet_from_diffusers: source must be a diffusers UNet2DModel or a state dict, "
                        f"got {type(source).__name__}")
    if model is None:
        if dropout is not None:
            kwargs["dropout"] = dropout
        model = DDPMUNet(**kwargs, backend=backend)
        if isinstance(source, nn.Module):  # a new model lives where the UNet2DModel does
            p = next(source.parameters(), None)
            if p is not None:
                model = model.to(device=p.device, dtype=p.dtype)
    elif not isinstance(model, DDPMUNet):
        raise TypeError(f"ddpm_unet_from_diffusers: model must be a DDPMUNet, got {type(model).__name__}")
    return _load_checked(model, state)
