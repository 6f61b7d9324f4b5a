"""Drop-in integrations: one call swaps vlm_kernels ops into a model a user already runs.

    from vlm_kernels.integrations import apply_vlm_kernels_to_mllama
    apply_vlm_kernels_to_mllama(model)        # this instance only; revert_vlm_kernels_to_mllama(model)

Every patch sets attributes on module instances (never on torch or library classes, except Mllama's
pre-construction mode, which swaps names in transformers' Mllama modeling module only), keeps parameter
names, so checkpoints load and save unchanged, and has a revert.
"""

from vlm_kernels.integrations.clip import apply_vlm_kernels_to_clip, revert_vlm_kernels_to_clip
from vlm_kernels.integrations.mllama import (
    apply_vlm_kernels_to_mllama,
    revert_vlm_kernels_to_mllama,
)
from vlm_kernels.integrations.open_flamingo import (
    apply_vlm_kernels_to_open_flamingo,
    revert_vlm_kernels_to_open_flamingo,
)
from vlm_kernels.integrations.timm_vit import (
    apply_vlm_kernels_to_timm_vit,
    revert_vlm_kernels_to_timm_vit,
)

__all__ = [
    "apply_vlm_kernels_to_clip",
    "apply_vlm_kernels_to_mllama",
    "apply_vlm_kernels_to_open_flamingo",
    "apply_vlm_kernels_to_timm_vit",
    "revert_vlm_kernels_to_clip",
    "revert_vlm_kernels_to_mllama",
    "revert_vlm_kernels_to_open_flamingo",
    "revert_vlm_kernels_to_timm_vit",
]
