"""The public ops, one file each: validation, the ``vlmk::`` custom op with its fake and autograd, and
the kernel table that maps each backend to its implementation."""

from vlm_kernels.ops._registry import op_backends
from vlm_kernels.ops.block_chunk_schedule import block_chunk_schedule
from vlm_kernels.ops.concat_project import concat_project
from vlm_kernels.ops.image_text_attention import image_text_attention
from vlm_kernels.ops.media_schedule import MediaSchedule
from vlm_kernels.ops.patch_embed import patch_embed
from vlm_kernels.ops.perceiver_attention import perceiver_attention

__all__ = [
    "MediaSchedule",
    "block_chunk_schedule",
    "concat_project",
    "image_text_attention",
    "op_backends",
    "patch_embed",
    "perceiver_attention",
]
