"""Helpers shared by the attention ops' peers and FLOP counts."""

from __future__ import annotations

import torch


def repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, L, Dh) -> (B, Hkv * n_rep, L, Dh), as Hugging Face's repeat_kv (a copy)."""
    if n_rep == 1:
        return hidden
    b, hkv, length, dh = hidden.shape
    return hidden[:, :, None].expand(b, hkv, n_rep, length, dh).reshape(b, hkv * n_rep, length, dh)


def attention_flops(pairs: int, num_heads: int, head_dim: int, mode: str) -> int:
    """Visible work of attention: 2 matmuls of 2 * Dh flops per visible (query, key) pair and head.

    Backward counts 2.5x the forward (5 matmuls incl. the recomputed q k^T), the FlashAttention
    benchmark convention, so fwd_bwd = 3.5x fwd.
    """
    fwd = 4 * head_dim * num_heads * pairs
    return fwd if mode == "fwd" else fwd * 7 // 2
