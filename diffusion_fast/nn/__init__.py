"""Drop-in nn.Modules whose forward runs our fused ops."""

from diffusion_fast.nn.dwconv_bn_swish import BNSwish, DWConvBNSwish
from diffusion_fast.nn.group_norm_silu import FusedGroupNormSiLU

__all__ = ["FusedGroupNormSiLU", "DWConvBNSwish", "BNSwish"]
