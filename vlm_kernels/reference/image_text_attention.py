"""image_text_attention, reference: text queries attend to image keys under a per-token image mask.

Shapes: q [B, Lq, Hq, Dh], k/v [B, Lk, Hkv, Dh] with Hq % Hkv == 0 (GQA/MQA), media_mask [B, Lq, M] bool,
Lk == M * media_len (chunk m holds keys [m*media_len, (m+1)*media_len)).

    visible[b, t, j] = media_mask[b, t, j // media_len]
    out = softmax(scale * q k^T + (0 where visible else -inf)) v,   scale = Dh ** -0.5 by default
Rows that see no chunk: empty_rows="zero" -> out = 0, gradient 0 (Meta / torchtune);
empty_rows="uniform" -> the row attends to all Lk keys (Hugging Face Mllama: its additive mask row is 0).
Also returns lse [B, Hq, Lq] (float32; -inf on zeroed rows), which the backward kernels consume.
"""

from __future__ import annotations

import torch

from vlm_kernels.reference._attention import masked_attention, masked_attention_backward


def key_visibility(media_mask: torch.Tensor, media_len: int, empty_rows: str) -> torch.Tensor:
    """[B, Lq, M] chunk mask -> [B, Lq, M * media_len] key mask, with the ``empty_rows`` rule applied."""
    visible = media_mask.repeat_interleave(media_len, dim=-1)
    if empty_rows == "uniform":
        visible = visible | ~media_mask.any(-1, keepdim=True)
    return visible


def image_text_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_mask: torch.Tensor,
    *,
    media_len: int,
    scale: float | None = None,
    empty_rows: str = "zero",
    return_lse: bool = False,
):
    """The spec of ``vlm_kernels.image_text_attention``; ``(out, lse)`` when ``return_lse``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = masked_attention(q, k, v, key_visibility(media_mask, media_len, empty_rows), scale)
    return (out, lse) if return_lse else out


def image_text_attention_backward_reference(
    grad_out, q, k, v, media_mask, out, lse, *, media_len, scale, empty_rows
):
    """(dq, dk, dv) for the output cotangent ``grad_out [B, Lq, Hq, Dh]``."""
    visible = key_visibility(media_mask, media_len, empty_rows)
    return masked_attention_backward(grad_out, q, k, v, visible, out, lse, scale)
