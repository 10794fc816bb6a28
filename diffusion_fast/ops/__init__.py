"""Our ops: each module holds the reference, the torch.library schema and the public function."""

from diffusion_fast.ops.group_norm_silu import group_norm_silu, group_norm_silu_ref

__all__ = ["group_norm_silu", "group_norm_silu_ref"]
