"""timm ``VisionTransformer``: ``patch_embed`` (Conv2d) + ``cls_token`` + ``pos_embed`` run as one
``vk.patch_embed`` call.

timm's ``forward_features`` / ``forward_intermediates`` run ``x = vit.patch_embed(x)`` and then
``x = vit._pos_embed(x)`` (concat the CLS, add the position embedding, ``pos_drop``). The patch moves
the whole embedding into the second call (the first only checks the image size), on this ViT
instance only. Parameters stay where they are (``state_dict()`` unchanged, training updates them).
"""

from __future__ import annotations

import torch
from torch import nn

import vlm_kernels as vk
from vlm_kernels.integrations._patching import is_patched, patch_instance, revert_instance
from vlm_kernels.nn.patch_embed import PatchEmbed


def _is_timm_vit(module: nn.Module) -> bool:
    return (
        hasattr(module, "patch_embed")
        and hasattr(module, "_pos_embed")
        and hasattr(module, "pos_drop")
        and hasattr(module, "blocks")
    )


def apply_vlm_kernels_to_timm_vit(model: nn.Module) -> None:
    """Swaps ``vk.patch_embed`` into the embedding of a timm ``VisionTransformer`` (this instance).

    After the patch ``model.patch_embed(x)`` checks the image size and passes the pixels on, and
    ``model._pos_embed(x)`` computes the whole embedding (Conv2d, CLS first, position embedding
    added, then ``pos_drop``), so ``forward``, ``forward_features`` and ``forward_intermediates``
    compute what they computed before. (Calling ``model.patch_embed`` alone now returns the pixels.)

    Raises:
        TypeError: ``model`` is not a timm VisionTransformer.
        ValueError: a layout ``vk.patch_embed`` cannot compute, named by
            ``vlm_kernels.nn.PatchEmbed.from_timm_vit`` (register tokens, ``no_embed_class`` with a
            class token, ``dynamic_img_size``, a norm after the projection, hybrid backbones).
    """
    if not _is_timm_vit(model):
        raise TypeError(
            f"model must be a timm VisionTransformer (patch_embed, _pos_embed, pos_drop, blocks), "
            f"got {type(model).__name__}"
        )
    if is_patched(model):
        return
    # The loader's checks define which layouts the op reproduces; the copy it builds is dropped.
    PatchEmbed.from_timm_vit(model)
    patch_instance(model.patch_embed, forward=_pass_pixels)
    patch_instance(model, _pos_embed=_embed)


def _pass_pixels(self: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The patched ``vit.patch_embed``: hands the pixels on to ``vit._pos_embed`` (which embeds)."""
    height, width = self.img_size
    if pixels.dim() != 4 or tuple(pixels.shape[-2:]) != (height, width):
        raise ValueError(
            f"pixels must be [B, C, {height}, {width}] for this ViT (its pos_embed has a fixed "
            f"grid), got {tuple(pixels.shape)}"
        )
    return pixels


def _embed(self: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The patched ``vit._pos_embed``: patch Conv2d + CLS + position embedding in one op, then
    ``pos_drop`` as timm does."""
    conv = self.patch_embed.proj
    cls_token = None if self.cls_token is None else self.cls_token.reshape(-1)
    pos_embed = None if self.pos_embed is None else self.pos_embed.reshape(-1, self.embed_dim)
    tokens = vk.patch_embed(
        pixels, conv.weight, conv.bias, cls_token=cls_token, pos_embed=pos_embed
    )
    return self.pos_drop(tokens)


def revert_vlm_kernels_to_timm_vit(model: nn.Module) -> None:
    """Restores the stock ``patch_embed.forward`` and ``_pos_embed`` of a patched ViT."""
    revert_instance(model.patch_embed)
    revert_instance(model)
