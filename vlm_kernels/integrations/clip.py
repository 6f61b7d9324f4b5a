"""Hugging Face CLIP: the vision embeddings (patch Conv2d + class embedding + position embedding)
run as one ``vk.patch_embed`` call.

Applies to every ``CLIPVisionEmbeddings`` in a ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``
or ``CLIPModel`` (found by duck typing, as ``PatchEmbed.from_hf_clip`` does: transformers is not
imported here). The patched forward reads the module's own parameters, so training updates them and
``state_dict()`` keys and values are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

import vlm_kernels as vk
from vlm_kernels.integrations._patching import patch_instance, revert_tree
from vlm_kernels.nn.patch_embed import PatchEmbed


def _is_clip_vision_embeddings(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "patch_embedding", None), nn.Conv2d)
        and isinstance(getattr(module, "position_embedding", None), nn.Embedding)
        and isinstance(getattr(module, "class_embedding", None), torch.Tensor)
    )


def _clip_embeddings_forward(
    self: nn.Module, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
) -> torch.Tensor:
    """``CLIPVisionEmbeddings.forward`` through ``vk.patch_embed`` (CLS and position fused)."""
    if interpolate_pos_encoding:
        # The op's position embedding has a fixed grid; resampling it to another image size is HF's
        # bicubic interpolation, which stays HF's own code (documented in the README's table).
        return type(self).forward(self, pixel_values, interpolate_pos_encoding=True)
    weight = self.patch_embedding.weight
    return vk.patch_embed(
        pixel_values.to(dtype=weight.dtype),
        weight,
        self.patch_embedding.bias,
        cls_token=self.class_embedding,
        pos_embed=self.position_embedding.weight,
    )


def apply_vlm_kernels_to_clip(model: nn.Module) -> int:
    """Swaps ``vk.patch_embed`` into every CLIP vision embedding of ``model`` (this instance only).

    Args:
        model: a ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel`` or a
            ``CLIPVisionEmbeddings``.

    Returns:
        The number of embedding modules patched (at least 1).

    Raises:
        TypeError: ``model`` holds no CLIP vision embeddings.
        ValueError: an embedding's layout is one ``vk.patch_embed`` cannot compute (the checks of
            ``vlm_kernels.nn.PatchEmbed.from_hf_clip``, e.g. a Conv2d with kernel != stride).

    ``embeddings(x, interpolate_pos_encoding=True)`` keeps running HF's code (bicubic resampling of
    the position grid); the default path runs the op. ``revert_vlm_kernels_to_clip`` undoes it.
    """
    found = [module for module in model.modules() if _is_clip_vision_embeddings(module)]
    if not found:
        raise TypeError(
            f"model ({type(model).__name__}) holds no CLIPVisionEmbeddings (a module with "
            f"patch_embedding, class_embedding and position_embedding)"
        )
    for embeddings in found:
        # The loader's checks define which layouts the op reproduces; the copy it builds is dropped.
        PatchEmbed.from_hf_clip(embeddings)
        patch_instance(embeddings, forward=_clip_embeddings_forward)
    return len(found)


def revert_vlm_kernels_to_clip(model: nn.Module) -> int:
    """Restores the stock forward of every patched module under ``model``; returns how many."""
    return revert_tree(model)
