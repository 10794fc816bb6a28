"""What ``diffusion_fast.patch`` did: the report it returns, and the undo record it leaves."""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from diffusion_fast.backends import use_backend

__all__ = ["ATTR", "PatchReport", "Record", "Replaced", "Skipped", "backend_scope"]

ATTR = "_diffusion_fast_patch"  # instance attribute holding a patched module's Record


@dataclass(frozen=True)
class Replaced:
    """One fused site. ``path``: its module in ``model.named_modules()`` ("" for the model);
    ``kind``: "resnet_block", "attention" or "group_norm_silu"; ``detail``: what runs now."""

    path: str
    kind: str
    detail: str


@dataclass(frozen=True)
class Skipped:
    """A candidate left unchanged, and why."""

    path: str
    kind: str
    reason: str


@dataclass
class PatchReport:
    """Returned by ``patch``: what was replaced and what was skipped (with reasons); ``layers``:
    how many nn.Conv2d / nn.Linear now run as ours (``patching.layers``)."""

    backend: str
    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    layers: int = 0

    def counts(self) -> Counter:
        """Number of replaced sites per kind."""
        return Counter(r.kind for r in self.replaced)

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.counts().items())) or "nothing"
        lines = [f"diffusion_fast.patch (backend={self.backend}): replaced {kinds}; skipped {len(self.skipped)}; "
                 f"{self.layers} Conv2d/Linear on prepacked oneDNN weights when sampling on the CPU"]
        lines += [f"  replaced {r.path or '<model>'} [{r.kind}]: {r.detail}" for r in self.replaced]
        lines += [f"  skipped  {s.path or '<model>'} [{s.kind}]: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


@dataclass
class Record:
    """Left on a patched module (attribute ``ATTR``) so ``unpatch`` can undo the change.

    ``handler`` names the undo; ``saved`` is what it restores (indices, modules, processor).
    """

    handler: str
    backend: str
    saved: Any = None


def backend_scope(backend: str):
    """``use_backend(backend)``, or no scope for "auto" (then the caller's choice holds)."""
    return contextlib.nullcontext() if backend == "auto" else use_backend(backend)
