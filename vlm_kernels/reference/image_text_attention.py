"""image_text_attention, reference: text queries attend to image keys under a per-token image mask.

Shapes: q [B, Lq, Hq, Dh], k/v [B, Lk, Hkv, Dh] with Hq % Hkv == 0 (GQA/MQA), media_mask [B, Lq, M] bool,
Lk == M * media_len (chunk m holds keys [m*media_len, (m+1)*media_len)).

    visible[b, t, j] = media_mask[b, t, j // media_len]
    out = softmax(scale * q k^T + (0 where visible else -inf)) v,   scale = Dh ** -0.5 by default
Rows that see no chunk: empty_rows="zero" -> out = 0, gradient 0 (Meta / torchtune);
empty_rows="uniform" -> the row attends to all Lk keys (Hugging Face Mllama: its additive mask row is 0);
empty_rows="mean" -> out = mean_j v[b, j] (OpenFlamingo's all-previous-media mode fills every score of
such a row with the same -finfo.max, so its softmax is uniform whatever q and k are): the gradient goes to
v only (d v[b, j] += d out[b, t] / Lk), none to q or k.
Also returns lse [B, Hq, Lq] (float32; -inf on zeroed rows; log(Lk) on "mean" rows, i.e. their scores
taken as 0), which the backward kernels consume.
"""

from __future__ import annotations

import math

import torch

from vlm_kernels.reference._attention import masked_attention, masked_attention_backward


def key_visibility(media_mask: torch.Tensor, media_len: int, empty_rows: str) -> torch.Tensor:
    """[B, Lq, M] chunk mask -> [B, Lq, M * media_len] key mask, with the ``empty_rows`` rule applied
    ("mean" rows see no key here: their output is not an attention over visible keys, see
    ``_mean_rows``)."""
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
    if empty_rows == "mean":
        out, lse = _mean_rows(out, lse, v, media_mask, q.shape[2])
    return (out, lse) if return_lse else out


def _empty_rows_mask(media_mask: torch.Tensor) -> torch.Tensor:
    """[B, Lq] True where the row sees no chunk."""
    return ~media_mask.any(-1)


def _mean_rows(out, lse, v, media_mask, heads_q):
    """The "mean" rule on the zero-rule result: empty rows get the mean of all values (per kv head,
    repeated over its query heads) and lse = log(Lk). Differentiable (torch.where, mean)."""
    num_keys = v.shape[1]
    if num_keys == 0:  # no values to average: such rows stay 0, as in the "zero" rule
        return out, lse
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    mean = v.to(dtype).mean(1)  # [B, Hkv, Dh]
    mean = mean.repeat_interleave(heads_q // v.shape[2], dim=1)  # [B, Hq, Dh]
    empty = _empty_rows_mask(media_mask)  # [B, Lq]
    out = torch.where(empty[:, :, None, None], mean[:, None].to(out.dtype), out)
    lse = lse.masked_fill(empty[:, None, :], math.log(num_keys))
    return out, lse


def image_text_attention_backward_reference(
    grad_out, q, k, v, media_mask, out, lse, *, media_len, scale, empty_rows
):
    """(dq, dk, dv) for the output cotangent ``grad_out [B, Lq, Hq, Dh]``."""
    visible = key_visibility(media_mask, media_len, empty_rows)
    dq, dk, dv = masked_attention_backward(grad_out, q, k, v, visible, out, lse, scale)
    if empty_rows == "mean" and v.shape[1] > 0:
        # A "mean" row's output is sum_j v[j] / Lk: each value gets that row's d out / Lk (summed over
        # the query heads of its kv head); its scores are constant, so q and k get nothing from it.
        dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
        batch, _, heads_q, head_dim = grad_out.shape
        heads_kv = v.shape[2]
        empty = _empty_rows_mask(media_mask)[:, :, None, None]  # [B, Lq, 1, 1]
        row_sum = (grad_out.to(dtype) * empty).sum(1)  # [B, Hq, Dh]
        per_kv = row_sum.reshape(batch, heads_kv, heads_q // heads_kv, head_dim).sum(2)
        dv = (dv.to(dtype) + per_kv[:, None] / v.shape[1]).to(v.dtype)
    return dq, dk, dv
