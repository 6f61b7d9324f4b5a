"""Drop-in nn.Modules over the public ops, with the parameter names of their timm / Hugging Face /
OpenFlamingo counterparts so that pretrained weights load as they are. One module per file.

    PatchEmbed              timm ``PatchEmbed`` (+ the ViT's cls_token / pos_embed)   -> vk.patch_embed
    MultiLayerProjector     Mllama ``multi_modal_projector`` over concatenated layers  -> vk.concat_project
    PerceiverResampler      OpenFlamingo ``PerceiverResampler``                        -> vk.perceiver_attention
    ImageTextCrossAttention Mllama ``MllamaTextCrossAttention``                        -> vk.image_text_attention
    RMSNorm                 Llama / Mllama ``RMSNorm``

Each module has a ``backend`` attribute (default None = "auto", or VLMK_BACKEND) passed to its op.
"""

from vlm_kernels.nn.image_text_cross_attention import ImageTextCrossAttention
from vlm_kernels.nn.multi_layer_projector import MultiLayerProjector
from vlm_kernels.nn.patch_embed import PatchEmbed
from vlm_kernels.nn.perceiver_resampler import FeedForward, PerceiverAttention, PerceiverResampler
from vlm_kernels.nn.rms_norm import RMSNorm

__all__ = [
    "FeedForward",
    "ImageTextCrossAttention",
    "MultiLayerProjector",
    "PatchEmbed",
    "PerceiverAttention",
    "PerceiverResampler",
    "RMSNorm",
]
