"""vlm_kernels: Triton, CUDA and CPU kernels for the hot spots of vision-language models.

    import vlm_kernels as vk
    vk.patch_embed(pixels, weight, bias, cls_token=..., pos_embed=..., pixel_mean=..., pixel_std=...)
    vk.concat_project(features, weight, bias)
    vk.image_text_attention(q, k, v, media_mask, media_len=...)
    vk.image_text_attention(q, k, v, vk.MediaSchedule(media_mask, media_len=...))  # shared by layers
    vk.perceiver_attention(q, k_media, v_media, k_latents, v_latents, media_padding_mask=...)
    vk.available_backends()

Every op takes ``backend=None`` ("auto"), "reference", "cpu", "triton", "cuda" or "cuda_sim"; the env var
VLMK_BACKEND overrides "auto". Each is a ``torch.library`` custom op in the ``vlmk`` namespace.
"""

from vlm_kernels import masks, nn
from vlm_kernels._backends import BACKENDS, available_backends
from vlm_kernels.ops import (
    MediaSchedule,
    block_chunk_schedule,
    concat_project,
    image_text_attention,
    op_backends,
    patch_embed,
    perceiver_attention,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "MediaSchedule",
    "available_backends",
    "block_chunk_schedule",
    "concat_project",
    "image_text_attention",
    "masks",
    "nn",
    "op_backends",
    "patch_embed",
    "perceiver_attention",
]
