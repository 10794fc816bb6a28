"""Plain ``nn.Conv2d`` / ``nn.Linear`` layers run as the models' own ``blocks.Conv2d`` / ``blocks.Linear``.

The class of each module is swapped in place (same parameters, buffers and state-dict keys), so
when sampling on the CPU they take oneDNN with prepacked weights (``diffusion_fast.models.onednn``):
linears from ``MIN_ROWS`` rows up, convolutions when the model runs channels_last
(``model.to(memory_format=torch.channels_last)``; on NCHW activations packed weights gain nothing).
Elsewhere (GPU, autograd, ``backend="torch"``) they behave as the originals. Subclasses (LoRA
layers, ...) and layers with hooks are left alone.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from diffusion_fast.models.blocks import Conv2d, Linear
from diffusion_fast.patching.pairs import has_hooks
from diffusion_fast.patching.report import Record

SWAPS = {nn.Conv2d: Conv2d, nn.Linear: Linear}


def patch_layer(module: nn.Module, backend: str) -> Optional[Record]:
    """Swap an exact nn.Conv2d / nn.Linear for ours; the Record keeps the original class."""
    ours = SWAPS.get(type(module))
    if ours is None or backend == "torch" or has_hooks(module):
        return None
    original = type(module)
    module.__class__ = ours
    return Record("layer_class", backend, saved=original)


def unpatch_layer(module: nn.Module, record: Record) -> None:
    module.__class__ = record.saved
