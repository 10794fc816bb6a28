"""Drop-in nn.Modules whose forward runs our fused ops."""

from diffusion_fast.nn.dwconv_bn_swish import BNSwish, DWConvBNSwish
from diffusion_fast.nn.group_norm_silu import FusedGroupNormSiLU
from diffusion_fast.nn.instance_norm_plus import InstanceNorm2dPlus

__all__ = ["FusedGroupNormSiLU", "InstanceNorm2dPlus", "DWConvBNSwish", "BNSwish"]
