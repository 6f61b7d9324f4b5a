"""Dense masked attention with GQA in plain PyTorch, shared by the two attention references.

q [B, Lq, Hq, Dh], k/v [B, Lk, Hkv, Dh], key_visible [B, Lq, Lk] bool (True = may attend).
    out[b, t, h] = sum_j softmax_j(scale * q[b, t, h] . k[b, j, h // (Hq/Hkv)] | visible) v[b, j, ...]
    lse[b, h, t] = log sum_{visible j} exp(scale * q . k)
A row with no visible key gives out = 0 and lse = -inf (and zero gradients).
"""

from __future__ import annotations

import torch


def _heads_first(x: torch.Tensor, dtype: torch.dtype, group: int) -> torch.Tensor:
    """[B, L, H, Dh] -> [B, H * group, L, Dh] in ``dtype``, each kv head repeated for its query heads."""
    x = x.to(dtype).transpose(1, 2)
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def attention_probs(q, k, key_visible, scale, dtype):
    """Softmax probabilities [B, Hq, Lq, Lk] (0 on invisible keys and on rows that see nothing) and the
    log-sum-exp [B, Hq, Lq] (-inf on such rows)."""
    group = q.shape[2] // k.shape[2]
    scores = scale * (_heads_first(q, dtype, 1) @ _heads_first(k, dtype, group).transpose(-1, -2))
    visible = key_visible[:, None]  # [B, 1, Lq, Lk]
    row_empty = ~key_visible.any(-1)[:, None, :, None]  # [B, 1, Lq, 1]
    # Empty rows get finite scores (0) before the softmax, then their probabilities are zeroed: no
    # -inf - -inf anywhere, so neither the forward nor autograd through it produces NaN.
    scores = scores.masked_fill(~visible & ~row_empty, float("-inf")).masked_fill(row_empty, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(row_empty, 0.0)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(row_empty[..., 0], float("-inf"))
    return probs, lse


def masked_attention(q, k, v, key_visible, scale):
    """(out [B, Lq, Hq, Dh] in q's dtype, lse [B, Hq, Lq] float32 or float64). Differentiable."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[2] // k.shape[2]
    probs, lse = attention_probs(q, k, key_visible, scale, dtype)
    out = probs @ _heads_first(v, dtype, group)  # [B, Hq, Lq, Dh]
    return out.transpose(1, 2).to(q.dtype), lse


def masked_attention_backward(grad_out, q, k, v, key_visible, out, lse, scale):
    """(dq, dk, dv) of ``masked_attention`` for the cotangent ``grad_out [B, Lq, Hq, Dh]``, by the
    flash-attention identities: dS = P * (dP - rowsum(dO * O)), dP = dO V^T."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, _, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    group = heads_q // heads_kv
    probs, _ = attention_probs(q, k, key_visible, scale, dtype)
    d_out = _heads_first(grad_out, dtype, 1)  # [B, Hq, Lq, Dh]
    delta = (d_out * _heads_first(out, dtype, 1)).sum(-1, keepdim=True)  # [B, Hq, Lq, 1]
    d_probs = d_out @ _heads_first(v, dtype, group).transpose(-1, -2)
    d_scores = probs * (d_probs - delta)
    dq = scale * (d_scores @ _heads_first(k, dtype, group))
    dk = scale * (d_scores.transpose(-1, -2) @ _heads_first(q, dtype, 1))
    dv = probs.transpose(-1, -2) @ d_out

    def per_kv_head(
        x,
    ):  # [B, Hq, Lk, Dh] -> [B, Lk, Hkv, Dh], summed over each group of query heads
        x = x.reshape(batch, heads_kv, group, -1, head_dim).sum(2)
        return x.transpose(1, 2)

    return dq.transpose(1, 2).to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)
