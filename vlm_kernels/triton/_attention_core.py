"""The flash-attention core that the Triton attention ops share: tile loads, the online-softmax step of
the forward, its epilogue, and the dk/dv and dq tile steps of the backward.

Each op file (``image_text_attention.py``, ``perceiver_attention.py``) keeps what is particular to it:
which key tiles a program walks, which (row, key) pairs are visible, its grid and its configs. These
helpers are ``@triton.jit`` functions the kernels call in their tile loops; Triton inlines them, so a
kernel compiles as if their bodies were written in place (the compile report's figures follow).

Conventions (flash-attention 2, as in the kernels that call them):
- scores in log2 units: ``qk_scale = scale * log2(e)``, ``exp2`` throughout; ``lse`` in the backward
  steps is the forward's natural-log lse times log2(e);
- ``visible``: a bool tile (or a broadcastable row/column of one) of the (query row, key) pairs that
  count; an invisible pair contributes exactly 0 whatever its score (its -inf or NaN is dropped by a
  ``where``, never multiplied by 0);
- float32 softmax statistics and accumulators; dot operands in the inputs' dtype;
- ``INPUT_PRECISION``: ``tl.dot``'s input precision for float32 operands ("ieee", "tf32", "tf32x3");
  the float32 backward's follows PyTorch's TF32 switch (``float32_backward_precision``, host side).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log2 units back to natural log


def float32_backward_precision() -> str:
    """The ``tl.dot`` input precision of the float32 backward: ``"tf32"`` when PyTorch allows TF32 for
    float32 CUDA matmuls, else ``"ieee"`` (FMA, the default). Read at each backward launch, as a
    torch matmul reads it when it runs, through the TF32 API that does not mix with the legacy one:
    ``torch.backends.cuda.matmul.fp32_precision`` (which ``torch.set_float32_matmul_precision("high")``
    and ``torch.backends.cuda.matmul.allow_tf32 = True`` set to ``"tf32"``), and when that is
    ``"none"``, the generic ``torch.backends.fp32_precision`` it inherits from."""
    precision = torch.backends.cuda.matmul.fp32_precision
    if precision == "none":
        precision = torch.backends.fp32_precision
    return "tf32" if precision == "tf32" else "ieee"


@triton.jit
def load_rows(base, rows, stride_row, offs_d, row_in, d_in):
    """[R, BLOCK_D]: rows ``rows`` (int64) of a [*, Dh] slab at ``base`` with row stride
    ``stride_row`` (unit stride along d); 0 outside ``row_in`` x ``d_in``."""
    return tl.load(
        base + rows[:, None] * stride_row + offs_d[None, :],
        mask=row_in[:, None] & d_in[None, :],
        other=0.0,
    )


@triton.jit
def load_rows_t(base, rows, stride_row, offs_d, row_in, d_in):
    """[BLOCK_D, R]: ``load_rows`` transposed (read as K^T for a q k^T dot)."""
    return tl.load(
        base + rows[None, :] * stride_row + offs_d[:, None],
        mask=d_in[:, None] & row_in[None, :],
        other=0.0,
    )


@triton.jit
def online_softmax_step(scores, m_i, l_i):
    """One key tile of the online softmax over ``scores`` [R, N] (log2 units, -inf where invisible).
    Returns ``(p, alpha, m_new, l_new)``: the tile's unnormalized probabilities, the factor that
    rescales what was accumulated so far, the new running max and running sum. A row that has seen
    nothing yet keeps m = -inf and gets p = 0, alpha = 1 (no NaN from -inf - -inf)."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def attend_tile(
    q,  # [R, BLOCK_D] queries
    acc,  # [R, BLOCK_D] float32: unnormalized output so far
    m_i,  # [R] float32: running max (log2 units)
    l_i,  # [R] float32: running sum of exp2
    k_base,  # keys' slab (batch and kv head applied)
    v_base,  # values' slab
    keys,  # [N] int64: the tile's key indices in the slab
    key_in,  # [N] bool: keys to load (others read as 0)
    stride_kt,
    stride_vt,
    offs_d,
    d_in,
    visible,  # bool, broadcastable to [R, N]
    qk_scale,  # scale * log2(e)
    INPUT_PRECISION: tl.constexpr,
):
    """The forward's step over one key tile: loads K^T, scores it against ``q``, folds it into the
    online softmax, loads V and accumulates P V. Returns ``(acc, m_i, l_i)``."""
    k_t = load_rows_t(k_base, keys, stride_kt, offs_d, key_in, d_in)  # [BLOCK_D, N]
    scores = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale
    scores = tl.where(visible, scores, float("-inf"))
    p, alpha, m_i, l_i = online_softmax_step(scores, m_i, l_i)
    v = load_rows(v_base, keys, stride_vt, offs_d, key_in, d_in)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def softmax_epilogue(acc, m_i, l_i):
    """``(out, lse)`` from the online softmax's state: out = acc / l (float32), lse in natural log;
    a row that saw no key gets out = 0 and lse = -inf (a visible key adds exp2(0) = 1 at the max,
    so l == 0 means none)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    return out, lse


@triton.jit
def row_dot(out_base, grad_base, rows, stride_ot, stride_gt, offs_d, row_in, d_in):
    """[R] float32: rowsum(dO * O) over rows ``rows`` (the backward's delta)."""
    out = load_rows(out_base, rows, stride_ot, offs_d, row_in, d_in)
    grad_out = load_rows(grad_base, rows, stride_gt, offs_d, row_in, d_in)
    return tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)


@triton.jit
def dkdv_step(
    k,  # [N, BLOCK_D] this program's keys
    v,  # [N, BLOCK_D] this program's values
    dk,  # [N, BLOCK_D] float32 accumulator (unscaled: times scale at the end)
    dv,  # [N, BLOCK_D] float32 accumulator
    q_t,  # [BLOCK_D, R] queries of one block, transposed
    lse,  # [R] float32: the rows' lse in log2 units
    grad_base,  # the output cotangents' slab (batch and query head applied)
    rows,  # [R] int64: the block's rows in the slab
    stride_gt,
    offs_d,
    row_in,  # [R] bool: rows in range
    d_in,
    delta_ptrs,  # [R] pointers to the rows' rowsum(dO * O), float32
    visible_t,  # bool, broadcastable to [N, R]
    qk_scale,
    INPUT_PRECISION: tl.constexpr,
):
    """One query block's contribution to a key tile's dk and dv: P^T = exp2(s^T - lse),
    dv += P^T dO, dS^T = P^T (V dO^T - delta), dk += dS^T Q. dO and delta are loaded here, each just
    before its first use (loading them ahead of the scores' dot cost the float32 single-pass dk/dv
    kernel of image_text_attention a 4-byte spill on sm_90a at Dh=128). Returns ``(dk, dv, ds_t)``
    (``ds_t`` for a caller that also forms this block's dq share)."""
    scores_t = tl.dot(k, q_t, input_precision=INPUT_PRECISION) * qk_scale  # [N, R]
    p_t = tl.where(visible_t, tl.exp2(scores_t - lse[None, :]), 0.0)
    grad_out = load_rows(grad_base, rows, stride_gt, offs_d, row_in, d_in)
    dv += tl.dot(p_t.to(grad_out.dtype), grad_out, input_precision=INPUT_PRECISION)
    delta = tl.load(delta_ptrs, mask=row_in, other=0.0)
    dp_t = tl.dot(v, tl.trans(grad_out), input_precision=INPUT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=INPUT_PRECISION)
    return dk, dv, ds_t


@triton.jit
def dq_step(
    dq,  # [R, BLOCK_D] float32 accumulator (unscaled: times scale at the end)
    q,  # [R, BLOCK_D]
    grad_out,  # [R, BLOCK_D]
    k_t,  # [BLOCK_D, N] one key tile, transposed
    v_t,  # [BLOCK_D, N] its values, transposed
    lse,  # [R] float32, log2 units
    delta,  # [R] float32
    visible,  # bool, broadcastable to [R, N]
    qk_scale,
    INPUT_PRECISION: tl.constexpr,
):
    """One key tile's contribution to a query block's dq: P = exp2(s - lse), dS = P (dO V^T - delta),
    dq += dS K. Returns the new ``dq``."""
    scores = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale
    p = tl.where(visible, tl.exp2(scores - lse[:, None]), 0.0)
    dp = tl.dot(grad_out, v_t, input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=INPUT_PRECISION)
    return dq
