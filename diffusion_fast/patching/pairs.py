"""The generic layer: adjacent ``GroupNorm`` → ``SiLU`` pairs become one ``group_norm_silu`` call.

Two places are known to apply a pair back to back:

- an ``nn.Sequential`` holding ``[..., GroupNorm, SiLU, ...]``: its ``forward`` is rebound to
  one that runs each pair fused. The children stay as they are, so state-dict keys do not
  move, and code that calls a child or a slice alone (guided-diffusion's ``ResBlock`` runs
  ``out_layers[0]`` then ``out_layers[1:]`` for scale-shift) still gets plain GroupNorm / SiLU.
- attribute pairs that a known class's ``forward`` applies one after the other (diffusers'
  ``UNet2DModel.conv_norm_out`` then ``.conv_act``): the GroupNorm becomes a
  ``PatchedGroupNormSiLU`` sharing its parameters and the SiLU an ``nn.Identity``.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from diffusion_fast.nn import FusedGroupNormSiLU
from diffusion_fast.ops.group_norm_silu import group_norm_silu
from diffusion_fast.patching.report import (
    ATTR,
    Record,
    Replaced,
    Skipped,
    backend_scope,
)

KIND = "group_norm_silu"

# diffusers class -> (GroupNorm, SiLU) attribute pairs its forward applies back to back.
ATTRIBUTE_PAIRS = {
    "UNet2DModel": (("conv_norm_out", "conv_act"),),
    "UNet2DConditionModel": (("conv_norm_out", "conv_act"),),
    "Encoder": (("conv_norm_out", "conv_act"),),
    "Decoder": (("conv_norm_out", "conv_act"),),
}


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def has_hooks(module: nn.Module) -> bool:
    """Hooks that a fused call would silently skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def norm_problem(norm: nn.Module) -> Optional[str]:
    """Why ``norm`` cannot run as our op (None if it can). Plain nn.GroupNorm qualifies, and
    guided-diffusion's ``GroupNorm32`` (GroupNorm in fp32, cast back), which our op matches."""
    if not isinstance(norm, nn.GroupNorm) or isinstance(norm, FusedGroupNormSiLU):
        return f"{type(norm).__name__} is not an nn.GroupNorm"
    if type(norm).forward is not nn.GroupNorm.forward and type(norm).__name__ != "GroupNorm32":
        return f"{type(norm).__name__} overrides GroupNorm.forward"
    if has_hooks(norm):
        return f"{type(norm).__name__} has hooks that a fused call would skip"
    return None


def act_problem(act: nn.Module) -> Optional[str]:
    """Why ``act`` is not a plain SiLU (None if it is)."""
    if not isinstance(act, nn.SiLU) or type(act).forward is not nn.SiLU.forward:
        return f"{type(act).__name__} follows the GroupNorm, not SiLU"
    if has_hooks(act):
        return "SiLU has hooks that a fused call would skip"
    return None


def run_group_norm_silu(norm: nn.GroupNorm, x: Tensor, **extras) -> Tensor:
    """``silu(norm(x))`` (with the op's pre_bias/scale/shift extras) in one call."""
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, **extras)


class PatchedGroupNormSiLU(FusedGroupNormSiLU):
    """``FusedGroupNormSiLU`` that runs on the backend ``patch`` was given."""

    backend = "auto"

    def forward(self, x: Tensor, pre_bias: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                shift: Optional[Tensor] = None) -> Tensor:
        with backend_scope(self.backend):
            return super().forward(x, pre_bias, scale, shift)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend}"


# --------------------------------------------------------------------------- nn.Sequential
def sequential_forward(self: nn.Sequential, input: Tensor) -> Tensor:
    """nn.Sequential.forward, with each recorded (GroupNorm, SiLU) position pair run fused."""
    record = getattr(self, ATTR)
    skip_next = False
    with backend_scope(record.backend):
        for i, module in enumerate(self):
            if skip_next:
                skip_next = False
            elif i in record.saved:
                input = run_group_norm_silu(module, input)
                skip_next = True
            else:
                input = module(input)
    return input


def patch_sequential(seq: nn.Sequential, path: str, backend: str, report) -> Optional[Record]:
    names, modules = list(seq._modules), list(seq._modules.values())
    fused, problems = [], []
    i = 0
    while i < len(modules) - 1:
        if isinstance(modules[i], nn.GroupNorm) and not isinstance(modules[i], FusedGroupNormSiLU):
            problem = norm_problem(modules[i]) or act_problem(modules[i + 1])
            if problem is None:
                fused.append(i)
                i += 2
                continue
            problems.append((i, problem))
        i += 1
    where = None
    if type(seq).forward is not nn.Sequential.forward:
        where = f"{type(seq).__name__} overrides Sequential.forward"
    elif "forward" in seq.__dict__:
        where = "forward is already overridden on the instance (e.g. by accelerate hooks)"
    if where is not None:
        problems += [(i, where) for i in fused]
        fused = []
    for i, problem in sorted(problems):
        report.skipped.append(Skipped(join(path, names[i]), KIND, problem))
    for i in fused:
        report.replaced.append(Replaced(join(path, names[i]), KIND,
                                        f"Sequential [{names[i]}] GroupNorm + [{names[i + 1]}] SiLU run fused"))
    if not fused:
        return None
    seq.forward = sequential_forward.__get__(seq)
    return Record("sequential", backend, frozenset(fused))


def unpatch_sequential(seq: nn.Sequential, record: Record) -> None:
    if getattr(seq.__dict__.get("forward"), "__func__", None) is sequential_forward:
        del seq.__dict__["forward"]


# --------------------------------------------------------------------------- attribute pairs
def patch_attribute_pairs(module: nn.Module, path: str, backend: str, report, *, attributes) -> Optional[Record]:
    saved = []
    for norm_name, act_name in attributes:
        norm, act = getattr(module, norm_name, None), getattr(module, act_name, None)
        if norm is None:  # e.g. UNet2DConditionModel(norm_num_groups=None) has no output norm
            continue
        problem = norm_problem(norm) or act_problem(act)
        if problem is not None:
            report.skipped.append(Skipped(join(path, norm_name), KIND, problem))
            continue
        fused = PatchedGroupNormSiLU.from_group_norm(norm)
        fused.backend = backend
        fused.train(norm.training)
        setattr(module, norm_name, fused)
        setattr(module, act_name, nn.Identity())
        saved.append((norm_name, act_name, norm, act))
        report.replaced.append(Replaced(join(path, norm_name), KIND,
                                        f"{norm_name} + {act_name} -> PatchedGroupNormSiLU + Identity"))
    return Record("attribute_pairs", backend, saved) if saved else None


def unpatch_attribute_pairs(module: nn.Module, record: Record) -> None:
    for norm_name, act_name, norm, act in record.saved:
        fused = getattr(module, norm_name)
        if not isinstance(fused, PatchedGroupNormSiLU):
            continue  # replaced by the user since: leave theirs
        norm.weight, norm.bias = fused.weight, fused.bias  # current parameters (load_state_dict(assign=True))
        norm.train(fused.training)
        act.train(fused.training)
        setattr(module, norm_name, norm)
        setattr(module, act_name, act)
