"""Plain-PyTorch reference ops: the spec every backend is tested against.

Math runs in float32 (float64 inputs stay float64, for the hand-math tests). Each op file also holds the
explicit backward of the ``reference`` backend, checked against autograd through the forward."""

from vlm_kernels.reference.block_chunk_schedule import block_chunk_schedule_reference
from vlm_kernels.reference.concat_project import concat_project_reference
from vlm_kernels.reference.image_text_attention import image_text_attention_reference
from vlm_kernels.reference.patch_embed import patch_embed_reference
from vlm_kernels.reference.perceiver_attention import perceiver_attention_reference

__all__ = [
    "block_chunk_schedule_reference",
    "concat_project_reference",
    "image_text_attention_reference",
    "patch_embed_reference",
    "perceiver_attention_reference",
]
