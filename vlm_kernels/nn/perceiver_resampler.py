"""PerceiverResampler: media tokens (frames x patches) -> a fixed number of latents per media item, on
``vlm_kernels.perceiver_attention`` (the latents attend to [media ; latents] with no concatenated copy).

    x [b, T, F, v, D] (T media per sample, F frames per media, v tokens per frame) -> [b, T, n, D]

Parameter names follow OpenFlamingo's ``PerceiverResampler`` so its state dict loads as it is:
    latents [n, D], frame_embs [F_max, D], media_time_embs [T_max, 1, D] (both optional),
    layers.{i}.0 = PerceiverAttention (norm_media, norm_latents, to_q, to_kv, to_out),
    layers.{i}.1 = FeedForward (0: LayerNorm, 1: Linear, 2: GELU, 3: Linear), norm.
"""

from __future__ import annotations

import torch
from torch import nn

import vlm_kernels as vk
from vlm_kernels.nn._autocast import autocast_dtype, cast


def FeedForward(dim: int, mult: int = 4) -> nn.Sequential:  # OpenFlamingo's name
    """OpenFlamingo's feed-forward block: LayerNorm, Linear, GELU, Linear (indices 0..3)."""
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to the media tokens followed by the latents themselves.

    forward(x [..., n1, D] media, latents [..., n2, D], media_padding_mask [..., n1] bool or None)
        -> [..., n2, D]; the leading dims of x and latents must match (OpenFlamingo: [b, T]).
    """

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8, backend: str | None = None):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        self.dim_head = dim_head
        self.backend = backend
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        latents: torch.Tensor,
        media_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        lead = latents.shape[:-2]
        if x.shape[:-2] != lead:
            raise ValueError(
                f"x [..., n1, D] and latents [..., n2, D] need the same leading dims, got "
                f"{tuple(x.shape)} and {tuple(latents.shape)}"
            )
        num_media, num_latents = x.shape[-2], latents.shape[-2]
        x = self.norm_media(x).reshape(-1, num_media, x.shape[-1])  # (B', n1, D)
        latents = self.norm_latents(latents).reshape(-1, num_latents, latents.shape[-1])
        batch = latents.shape[0]
        heads, dim_head = self.heads, self.dim_head
        q = self.to_q(latents).view(batch, num_latents, heads, dim_head)  # (B', n2, H, Dh)
        # Strided views of the fused kv projections: the op reads them in place.
        k_media, v_media = self.to_kv(x).chunk(2, dim=-1)
        k_latents, v_latents = self.to_kv(latents).chunk(2, dim=-1)
        k_media, v_media = (t.unflatten(-1, (heads, dim_head)) for t in (k_media, v_media))
        k_latents, v_latents = (t.unflatten(-1, (heads, dim_head)) for t in (k_latents, v_latents))
        if media_padding_mask is not None:
            media_padding_mask = media_padding_mask.reshape(batch, num_media)
        dtype = autocast_dtype(q.device)
        out = vk.perceiver_attention(
            *(cast(t, dtype) for t in (q, k_media, v_media, k_latents, v_latents)),
            media_padding_mask=media_padding_mask,
            scale=self.scale,
            backend=self.backend,
        )  # (B', n2, H, Dh)
        out = self.to_out(out.reshape(batch, num_latents, heads * dim_head))
        return out.reshape(*lead, num_latents, -1)


class PerceiverResampler(nn.Module):
    def __init__(
        self,
        *,
        dim: int,
        depth: int = 6,
        dim_head: int = 64,
        heads: int = 8,
        num_latents: int = 64,
        max_num_media: int | None = None,
        max_num_frames: int | None = None,
        ff_mult: int = 4,
        backend: str | None = None,
    ):
        super().__init__()
        self.num_latents = num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = (
            nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames is not None else None
        )
        self.media_time_embs = (
            nn.Parameter(torch.randn(max_num_media, 1, dim)) if max_num_media is not None else None
        )
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads, backend=backend),
                    FeedForward(dim=dim, mult=ff_mult),
                ]
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def set_backend(self, backend: str | None) -> None:
        for attention, _ in self.layers:
            attention.backend = backend

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [b, T, F, v, D] -> [b, T, num_latents, D].

        frame_mask [b, T, F] bool (True = real frame) leaves padding frames out of the attention.
        """
        if x.dim() != 5:
            raise ValueError(f"x must be [b, T, F, v, D], got {tuple(x.shape)}")
        batch, num_media, num_frames, tokens = x.shape[:4]
        if self.frame_embs is not None:
            if num_frames > self.frame_embs.shape[0]:
                raise ValueError(
                    f"x has F={num_frames} frames but max_num_frames={self.frame_embs.shape[0]}"
                )
            x = x + self.frame_embs[:num_frames, None, :]  # (F, 1, D) over (b, T, F, v, D)
        x = x.flatten(2, 3)  # (b, T, F*v, D): frames and tokens in one media axis
        if self.media_time_embs is not None:
            if num_media > self.media_time_embs.shape[0]:
                raise ValueError(
                    f"x has T={num_media} media but max_num_media={self.media_time_embs.shape[0]}"
                )
            x = x + self.media_time_embs[:num_media]
        padding = None
        if frame_mask is not None:
            if tuple(frame_mask.shape) != (batch, num_media, num_frames):
                raise ValueError(
                    f"frame_mask must be [b, T, F] = {(batch, num_media, num_frames)}, got "
                    f"{tuple(frame_mask.shape)}"
                )
            padding = frame_mask.bool()[..., None].expand(-1, -1, -1, tokens).flatten(2)
        latents = self.latents.expand(batch, num_media, *self.latents.shape)  # (b, T, n, D)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents, padding) + latents
            latents = feed_forward(latents) + latents
        return self.norm(latents)
