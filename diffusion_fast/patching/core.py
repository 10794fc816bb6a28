"""``patch(model)`` / ``unpatch(model)``: walk a model, apply the handlers, keep an undo record."""

from __future__ import annotations

from functools import partial
from typing import Optional

from torch import nn

from diffusion_fast.backends import BACKENDS
from diffusion_fast.patching import attention, layers, pairs, resnet
from diffusion_fast.patching.report import ATTR, PatchReport, Record, Skipped

# Per-class handlers, by the diffusers class name (diffusers itself is never imported):
# name -> function(module, path, backend, report) -> Record or None.
CLASS_HANDLERS = {
    "ResnetBlock2D": resnet.patch_resnet_block_2d,
    "Attention": attention.patch_attention,
    **{name: partial(pairs.patch_attribute_pairs, attributes=attributes)
       for name, attributes in pairs.ATTRIBUTE_PAIRS.items()},
}

UNDO = {
    "resnet_block": resnet.unpatch_resnet_block_2d,
    "attention": attention.unpatch_attention,
    "sequential": pairs.unpatch_sequential,
    "attribute_pairs": pairs.unpatch_attribute_pairs,
    "layer_class": layers.unpatch_layer,
}


def _diffusers_class(module: nn.Module) -> Optional[type]:
    """The handled diffusers class that ``module`` is (or subclasses), matched by name and module."""
    for cls in type(module).__mro__:
        if cls.__name__ in CLASS_HANDLERS and cls.__module__.split(".")[0] == "diffusers":
            return cls
    return None


def _check(model, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"diffusion_fast.{what}: model must be a torch.nn.Module, got {type(model).__name__}")


def patch(model: nn.Module, backend: str = "auto") -> PatchReport:
    """Speed up ``model`` in place with diffusion_fast's fused ops; returns a ``PatchReport``.

    Two layers (parameters, dtype, device and state-dict keys unchanged):
    - per-class handlers for diffusers modules, matched by class name: ``ResnetBlock2D``
      (GroupNorm+SiLU fused, the time embedding as the op's pre_bias or scale/shift),
      ``Attention`` (a processor calling ``diffusion_fast.models.attention``), and the output
      ``conv_norm_out`` + ``conv_act`` of ``UNet2DModel``, ``UNet2DConditionModel`` and the VAE
      ``Encoder``/``Decoder``;
    - every ``nn.Sequential`` holding ``GroupNorm`` then ``SiLU`` runs the pair fused;
    - every plain ``nn.Conv2d`` / ``nn.Linear`` becomes the models' ``Conv2d`` / ``Linear``, which
      sample on the CPU through oneDNN with prepacked weights (``patching.layers``; convolutions
      when the model runs channels_last: ``model.to(memory_format=torch.channels_last)``).

    ``backend``: "auto" (follow ``DIFFUSION_FAST_BACKEND`` / ``use_backend`` at call time) or
    one of "cuda", "triton", "torch" for the patched modules. Patching again re-applies from
    the original state (idempotent); ``unpatch`` undoes it.
    """
    _check(model, "patch")
    if not isinstance(backend, str) or backend not in BACKENDS + ("auto",):
        raise ValueError(f"diffusion_fast.patch: backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    unpatch(model)
    report = PatchReport(backend)
    swapped = 0
    for path, module in list(model.named_modules()):
        cls = _diffusers_class(module)
        if cls is not None:
            if type(module).forward is not cls.forward:
                why = f"{type(module).__name__} overrides {cls.__name__}.forward"
                report.skipped.append(Skipped(path, cls.__name__, why))
                continue
            record = CLASS_HANDLERS[cls.__name__](module, path, backend, report)
        elif isinstance(module, nn.Sequential):
            record = pairs.patch_sequential(module, path, backend, report)
        elif type(module) in layers.SWAPS:
            record = layers.patch_layer(module, backend)
            swapped += record is not None
        else:
            continue
        if record is not None:
            setattr(module, ATTR, record)
    report.layers = swapped
    return report


def unpatch(model: nn.Module) -> int:
    """Undo ``patch``: original forwards, modules and attention processors. Returns how many
    modules were restored (0 for a model that was not patched)."""
    _check(model, "unpatch")
    restored = 0
    for module in list(model.modules()):
        record: Optional[Record] = module.__dict__.pop(ATTR, None)
        if record is not None:
            UNDO[record.handler](module, record)
            restored += 1
    return restored
