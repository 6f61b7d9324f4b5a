"""perceiver_attention, reference: Perceiver-resampler latents attend to [media tokens ; latents].

Shapes: q [B, Nl, Hq, Dh] (from the latents), k_media/v_media [B, Nm, Hkv, Dh], k_latents/v_latents
[B, Nl, Hkv, Dh], media_padding_mask [B, Nm] bool (True = real token).

    K = concat(k_media, k_latents, dim=1), V likewise              -> [B, Nm + Nl, Hkv, Dh]
    out = softmax(scale * q K^T + (-inf on padded media tokens)) V  -> [B, Nl, Hq, Dh]
The latent keys are always visible, so no row is empty. Also returns lse [B, Hq, Nl].
"""

from __future__ import annotations

import torch

from vlm_kernels.reference._attention import masked_attention, masked_attention_backward


def _concat_keys(k_media, k_latents, v_media, v_latents, media_padding_mask, num_latents):
    k = torch.cat([k_media, k_latents.to(k_media.dtype)], dim=1)
    v = torch.cat([v_media, v_latents.to(v_media.dtype)], dim=1)
    batch, num_media = k_media.shape[:2]
    media_visible = (
        torch.ones(batch, num_media, dtype=torch.bool, device=k.device)
        if media_padding_mask is None
        else media_padding_mask
    )
    latent_visible = torch.ones(batch, num_latents, dtype=torch.bool, device=k.device)
    key_visible = torch.cat([media_visible, latent_visible], dim=1)[:, None, :]
    return k, v, key_visible.expand(batch, num_latents, k.shape[1])


def perceiver_attention_reference(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor,
    v_latents: torch.Tensor,
    *,
    media_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """The spec of ``vlm_kernels.perceiver_attention``; ``(out, lse)`` when ``return_lse``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v, visible = _concat_keys(
        k_media, k_latents, v_media, v_latents, media_padding_mask, q.shape[1]
    )
    out, lse = masked_attention(q, k, v, visible, scale)
    return (out, lse) if return_lse else out


def perceiver_attention_backward_reference(
    grad_out, q, k_media, v_media, k_latents, v_latents, media_padding_mask, out, lse, *, scale
):
    """(dq, dk_media, dv_media, dk_latents, dv_latents) for the cotangent ``grad_out [B, Nl, Hq, Dh]``."""
    k, v, visible = _concat_keys(
        k_media, k_latents, v_media, v_latents, media_padding_mask, q.shape[1]
    )
    dq, dk, dv = masked_attention_backward(grad_out, q, k, v, visible, out, lse, scale)
    num_media = k_media.shape[1]
    return (
        dq,
        dk[:, :num_media],
        dv[:, :num_media],
        dk[:, num_media:].to(k_latents.dtype),
        dv[:, num_media:].to(v_latents.dtype),
    )
