"""Drop-in speed-up of an existing model: ``report = patch(model)``, ``unpatch(model)``.

See ``diffusion_fast.patching.core.patch`` for what is replaced; ``PatchReport`` lists it.
"""

from diffusion_fast.patching.attention import DiffusionFastAttnProcessor
from diffusion_fast.patching.core import patch, unpatch
from diffusion_fast.patching.pairs import PatchedGroupNormSiLU
from diffusion_fast.patching.report import PatchReport, Replaced, Skipped

__all__ = [
           "DiffusionFastAttnProcessor",
           "PatchReport",
           "PatchedGroupNormSiLU",
           "Replaced",
           "Skipped",
           "patch",
           "unpatch",
]
