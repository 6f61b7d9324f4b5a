"""The vision encoder: a ViT (pre-LN) on ``vlm_kernels.nn.PatchEmbed`` with CLS token and position
embedding, returning the hidden states the projector concatenates (Llama 3.2 Vision style).

Module names follow timm's VisionTransformer (patch_embed, blocks.{i}.norm1/attn.qkv/attn.proj/norm2/
mlp.fc1/mlp.fc2, norm).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from vlm_kernels import nn as vkn


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (N, H, T, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = VisionAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = VisionMlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """pixels [N, C, H, W] (uint8 or float) -> [norm(final), hidden_{t} for t in vision_taps], each
    [N, T, Dv] with T = (H/P)*(W/P) + 1 (CLS first); hidden_t is the input of block t."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        for tap in config.vision_taps:
            if not 0 <= tap < config.vision_layers:
                raise ValueError(
                    f"vision_taps must be block indices in [0, {config.vision_layers}), got {tap}"
                )
        self.taps = tuple(config.vision_taps)
        self.patch_embed = vkn.PatchEmbed(
            config.image_size,
            config.patch_size,
            config.channels,
            config.vision_dim,
            class_token=True,
            pos_embed=True,
            pixel_mean=config.pixel_mean,
            pixel_std=config.pixel_std,
            backend=config.backend,
        )
        self.blocks = nn.ModuleList(
            VisionBlock(config.vision_dim, config.vision_heads, config.vision_mlp_ratio)
            for _ in range(config.vision_layers)
        )
        self.norm = nn.LayerNorm(config.vision_dim)

    @property
    def num_features(self) -> int:
        return 1 + len(self.taps)

    @property
    def feature_dims(self) -> tuple[int, ...]:
        """The last dim of each returned hidden state (what the projector concatenates)."""
        return (self.norm.normalized_shape[0],) * self.num_features

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(pixels)  # (N, T, Dv)
        tapped = []
        for index, block in enumerate(self.blocks):
            if index in self.taps:
                tapped.append(x)
            x = block(x)
        return [self.norm(x), *tapped]


class MultiVisionEncoder(nn.Module):
    """Two ViTs of different patch sizes and widths (the MoE-encoder recipe: concatenate the
    encoders' features channel-wise): pixels -> the first encoder's hidden states, then the
    second's, each [N, T, D_l] on the first encoder's token grid (the second's finer patch grid
    average-pooled onto it; CLS kept), for one vk.concat_project projector over all of them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        second = dataclasses.replace(
            config, patch_size=config.vision2_patch_size, vision_dim=config.vision2_dim
        )
        grid, grid2 = config.image_size // config.patch_size, config.image_size // second.patch_size
        if config.image_size % second.patch_size or grid2 % grid:
            raise ValueError(
                f"vision2_patch_size={second.patch_size} must divide image_size={config.image_size}"
                f" into a grid that is a multiple of the first encoder's {grid}x{grid} "
                f"(patch_size={config.patch_size}), got {config.image_size / second.patch_size:g}"
            )
        self.first = VisionEncoder(config)
        self.second = VisionEncoder(second)
        self.grid, self.pool = grid, grid2 // grid

    @property
    def num_features(self) -> int:
        return self.first.num_features + self.second.num_features

    @property
    def feature_dims(self) -> tuple[int, ...]:
        return self.first.feature_dims + self.second.feature_dims

    def _to_first_grid(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, 1 + (g*pool)^2, D] -> [N, 1 + g^2, D]: patch tokens average-pooled pool x pool."""
        cls, patches = hidden[:, :1], hidden[:, 1:]
        side = self.grid * self.pool
        patches = patches.transpose(1, 2).unflatten(-1, (side, side))  # (N, D, side, side)
        patches = F.avg_pool2d(patches, self.pool).flatten(2).transpose(1, 2)  # (N, g*g, D)
        return torch.cat([cls, patches], dim=1)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return [*self.first(pixels), *(self._to_first_grid(h) for h in self.second(pixels))]
