"""PatchEmbed: image -> patch tokens on ``vlm_kernels.patch_embed``, with timm's parameter names.

    pixels [B, C, H, W] (uint8 camera bytes or float) -> tokens [B, N, D], N = (H/P)*(W/P) + (1 if CLS)

Parameters (timm ``VisionTransformer`` names, so a timm state dict loads as it is):
    proj.weight [D, C, P, P], proj.bias [D]      (timm ``patch_embed.proj``)
    cls_token [1, 1, D], pos_embed [1, N, D]     (timm keeps these on the ViT; here they ride along
                                                  so the op can fuse them into its epilogue)
Optional ``pixel_mean`` / ``pixel_std`` [C] are non-persistent buffers: the normalization runs inside the
op's load (uint8 pixels are read as ``(x / 255 - mean) / std``), so no normalized copy of the image exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import vlm_kernels as vk
from vlm_kernels.nn._autocast import autocast_dtype, cast


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


class PatchEmbed(nn.Module):
    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        *,
        bias: bool = True,
        class_token: bool = False,
        pos_embed: bool = False,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = int(patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}"
            )
        self.grid_size = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens = 1 if class_token else 0
        self.num_tokens = self.num_patches + self.num_prefix_tokens
        self.backend = backend
        # An nn.Conv2d only holds proj.weight / proj.bias (and its init); the op does the work.
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.patch_size, bias=bias)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 1e-6) if class_token else None
        self.pos_embed = (
            nn.Parameter(torch.randn(1, self.num_tokens, embed_dim) * 0.02) if pos_embed else None
        )
        for name, values in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
            if values is not None and len(values) != in_chans:
                raise ValueError(f"{name} needs {in_chans} values (one per channel), got {values}")
            buffer = None if values is None else torch.tensor(values, dtype=torch.float32)
            self.register_buffer(name, buffer, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, C, H, W] uint8 or float, H x W = img_size -> [B, N, D]."""
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels)
            raise ValueError(f"pixels must be [B, C, H, W], got {shape}")
        # A position embedding fixes the grid, so the image size must be img_size; without one any
        # multiple of the patch size works (the op checks that).
        if pixels.shape[1] != self.in_chans or (
            self.pos_embed is not None and tuple(pixels.shape[2:]) != self.img_size
        ):
            height, width = self.img_size
            raise ValueError(
                f"pixels must be [B, {self.in_chans}, {height}, {width}] for this PatchEmbed "
                f"(in_chans={self.in_chans}, img_size={self.img_size}), got {tuple(pixels.shape)}"
            )
        dtype = autocast_dtype(pixels.device)
        dim = self.embed_dim
        cls_token = None if self.cls_token is None else self.cls_token.reshape(dim)
        pos_embed = None if self.pos_embed is None else self.pos_embed.reshape(-1, dim)
        return vk.patch_embed(
            cast(pixels, dtype),
            cast(self.proj.weight, dtype),
            cast(self.proj.bias, dtype),
            cls_token=cast(cls_token, dtype),
            pos_embed=cast(pos_embed, dtype),
            pixel_mean=self.pixel_mean,
            pixel_std=self.pixel_std,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"img_size={self.img_size}, patch_size={self.patch_size}, in_chans={self.in_chans}, "
            f"embed_dim={self.embed_dim}, class_token={self.cls_token is not None}, "
            f"pos_embed={self.pos_embed is not None}, backend={self.backend!r}"
        )
