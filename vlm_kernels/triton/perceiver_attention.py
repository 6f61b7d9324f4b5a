"""perceiver_attention, Triton: flash-style forward and backward over two key/value segments read in
place (no concatenation), on the shared attention core (``_attention_core``).

Shapes: q [B, Nl, Hq, Dh], k_media/v_media [B, Nm, Hkv, Dh], k_latents/v_latents [B, Nl, Hkv, Dh] (any
strides, last dim contiguous; Hq % Hkv == 0), media_padding_mask [B, Nm] bool (True = real token; any
strides) or None.

    keys = [media ; latents]       visible(b, j) = j is a latent, or media_padding_mask[b, j]
    out[b, t, h] = softmax_j(scale * q[b, t, h] . key[b, j, h // group] | visible) value[b, j, h // group]
    lse[b, h, t] = log sum_{visible j} exp(scale * q . k)      float32
The latent keys are always visible, so no row is empty: a media item that is all padding leaves each
latent attending to the latents alone (the concat-with-masked-media math).

Kernels (exp2 with log2(e) folded into the scale, float32 softmax and accumulators):
- ``_fwd_kernel``: grid (query blocks, B*Hq); the online softmax walks the media tiles, then the
  latent tiles (``attend_tile``).
- ``_bwd_preprocess_kernel``: delta = rowsum(dO * O), [B, Hq, Nl] float32.
- ``_bwd_dkdv_kernel``: grid (media tiles + latent tiles, B*Hkv); a program owns BLOCK_N keys of one
  segment and one kv head and loops over every query block times the query heads of its group
  (``dkdv_step``): dk/dv need no atomics and the GQA sum runs in registers, in a fixed order.
- ``_bwd_dq_kernel``: grid (query blocks, B*Hq); the forward's walk, accumulating dq (``dq_step``).
Padded media keys are never loaded (masked loads), so what a padded token holds reaches nothing;
their dk and dv are written as 0.

Precision as image_text_attention's kernels: 16-bit dots on tensor cores with float32 accumulation;
float32 inputs take 3xTF32 forward dots and FMA backward dots (TF32 when PyTorch allows TF32 for
float32 matmuls, ``float32_backward_precision``). Deterministic. GPU launches autotune over configs the
compile report checks for zero spills on sm_80 and sm_90a (registered at the bottom); under
TRITON_INTERPRET=1 each kernel runs the first config of its list, and ``force_triton_config`` runs
another (the tests walk them all).
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from vlm_kernels.triton._attention_core import (
    attend_tile,
    dkdv_step,
    dq_step,
    float32_backward_precision,
    load_rows,
    load_rows_t,
    row_dot,
    softmax_epilogue,
)
from vlm_kernels.triton._launch import declare_configs, interpreting, launch
from vlm_kernels.triton.aot import register_aot

MAX_HEAD_DIM = 128  # the largest head dim the registered (spill-checked) configs cover
LOG2E = 1.4426950408889634


# ---- forward ----------------------------------------------------------------------------------------


@triton.jit
def _media_keys(pad_ptr, start, num_media, stride_pad_t, offs_n, HAS_PADDING: tl.constexpr):
    """``(keys int64 [N], key_in, key_visible)`` of the media tile at ``start``: in range, and in range
    and real (``pad_ptr``: the batch's row of the padding mask)."""
    keys = start + offs_n
    key_in = keys < num_media
    keys64 = keys.to(tl.int64)
    if HAS_PADDING:
        real = tl.load(pad_ptr + keys64 * stride_pad_t, mask=key_in, other=0) != 0
        return keys64, key_in, key_in & real
    return keys64, key_in, key_in


@triton.jit
def _fwd_kernel(
    # pointers
    q_ptr,  # [B, Nl, Hq, Dh]
    k_media_ptr,  # [B, Nm, Hkv, Dh]
    v_media_ptr,  # [B, Nm, Hkv, Dh]
    k_latents_ptr,  # [B, Nl, Hkv, Dh]
    v_latents_ptr,  # [B, Nl, Hkv, Dh]
    pad_ptr,  # uint8 [B, Nm] (the bool mask reinterpreted); unread without HAS_PADDING
    out_ptr,  # [B, Nl, Hq, Dh]
    lse_ptr,  # float32 [B, Hq, Nl], contiguous
    # sizes
    Nl,  # latents (query rows and latent keys)
    Nm,  # media tokens
    heads_q,
    group,  # Hq // Hkv
    qk_scale,  # scale * log2(e)
    # strides, in elements
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kmb,
    stride_kmt,
    stride_kmh,
    stride_vmb,
    stride_vmt,
    stride_vmh,
    stride_klb,
    stride_klt,
    stride_klh,
    stride_vlb,
    stride_vlt,
    stride_vlh,
    stride_pad_b,
    stride_pad_t,
    stride_ob,
    stride_ot,
    stride_oh,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of 2 >= HEAD_DIM
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per tile
    INPUT_PRECISION: tl.constexpr,
    HAS_PADDING: tl.constexpr,
):
    q_block = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // heads_q
    head = pid_bh - batch * heads_q
    kv_head = head // group

    rows = (q_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_in = rows < Nl
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    q = load_rows(
        q_ptr + batch * stride_qb + head * stride_qh, rows, stride_qt, offs_d, row_in, d_in
    )
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    # Segment 1: the media tokens, padded ones masked out (and never loaded).
    k_base = k_media_ptr + batch * stride_kmb + kv_head * stride_kmh
    v_base = v_media_ptr + batch * stride_vmb + kv_head * stride_vmh
    pad_row = pad_ptr + batch * stride_pad_b
    for start in range(0, Nm, BLOCK_N):
        keys, key_in, key_visible = _media_keys(
            pad_row, start, Nm, stride_pad_t, offs_n, HAS_PADDING
        )
        acc, m_i, l_i = attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_base,
            v_base,
            keys,
            key_visible,
            stride_kmt,
            stride_vmt,
            offs_d,
            d_in,
            key_visible[None, :],
            qk_scale,
            INPUT_PRECISION,
        )
    # Segment 2: the latents, all visible.
    k_base = k_latents_ptr + batch * stride_klb + kv_head * stride_klh
    v_base = v_latents_ptr + batch * stride_vlb + kv_head * stride_vlh
    for start in range(0, Nl, BLOCK_N):
        keys = (start + offs_n).to(tl.int64)
        key_in = keys < Nl
        acc, m_i, l_i = attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_base,
            v_base,
            keys,
            key_in,
            stride_klt,
            stride_vlt,
            offs_d,
            d_in,
            key_in[None, :],
            qk_scale,
            INPUT_PRECISION,
        )

    out, lse = softmax_epilogue(acc, m_i, l_i)
    out_ptrs = out_ptr + batch * stride_ob + head * stride_oh + rows[:, None] * stride_ot
    tl.store(
        out_ptrs + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_in[:, None] & d_in[None, :],
    )
    tl.store(lse_ptr + pid_bh * Nl + rows, lse, mask=row_in)


# ---- backward ---------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    out_ptr,  # [B, Nl, Hq, Dh]
    grad_out_ptr,  # [B, Nl, Hq, Dh]
    delta_ptr,  # float32 [B, Hq, Nl], contiguous: rowsum(dO * O)
    Nl,
    heads_q,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_gb,
    stride_gt,
    stride_gh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    q_block = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // heads_q
    head = pid_bh - batch * heads_q
    rows = (q_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_in = rows < Nl
    offs_d = tl.arange(0, BLOCK_D)
    delta = row_dot(
        out_ptr + batch * stride_ob + head * stride_oh,
        grad_out_ptr + batch * stride_gb + head * stride_gh,
        rows,
        stride_ot,
        stride_gt,
        offs_d,
        row_in,
        offs_d < HEAD_DIM,
    )
    tl.store(delta_ptr + pid_bh * Nl + rows, delta, mask=row_in)


@triton.jit
def _bwd_dkdv_kernel(
    # pointers
    q_ptr,  # [B, Nl, Hq, Dh]
    k_media_ptr,  # [B, Nm, Hkv, Dh]
    v_media_ptr,  # [B, Nm, Hkv, Dh]
    k_latents_ptr,  # [B, Nl, Hkv, Dh]
    v_latents_ptr,  # [B, Nl, Hkv, Dh]
    pad_ptr,  # uint8 [B, Nm]; unread without HAS_PADDING
    grad_out_ptr,  # [B, Nl, Hq, Dh]
    lse_ptr,  # float32 [B, Hq, Nl], contiguous (natural log)
    delta_ptr,  # float32 [B, Hq, Nl], contiguous
    dk_media_ptr,  # [B, Nm, Hkv, Dh], contiguous
    dv_media_ptr,  # [B, Nm, Hkv, Dh], contiguous
    dk_latents_ptr,  # [B, Nl, Hkv, Dh], contiguous
    dv_latents_ptr,  # [B, Nl, Hkv, Dh], contiguous
    # sizes
    Nl,
    Nm,
    heads_q,
    heads_kv,
    group,
    qk_scale,  # scale * log2(e)
    scale,
    # strides, in elements (the gradients: contiguous, [B, N, Hkv, Dh])
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kmb,
    stride_kmt,
    stride_kmh,
    stride_vmb,
    stride_vmt,
    stride_vmh,
    stride_klb,
    stride_klt,
    stride_klh,
    stride_vlb,
    stride_vlt,
    stride_vlh,
    stride_pad_b,
    stride_pad_t,
    stride_gb,
    stride_gt,
    stride_gh,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # keys per program
    INPUT_PRECISION: tl.constexpr,
    HAS_PADDING: tl.constexpr,
):
    key_tile = tl.program_id(0)  # media tiles first, then latent tiles
    pid_bk = tl.program_id(1).to(tl.int64)  # over B * Hkv
    batch = pid_bk // heads_kv
    kv_head = pid_bk - batch * heads_kv
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM
    offs_m = tl.arange(0, BLOCK_M)
    # The segment this program's keys lie in, chosen without a branch (selects of scalars).
    media_tiles = tl.cdiv(Nm, BLOCK_N)
    is_media = key_tile < media_tiles
    segment_len = tl.where(is_media, Nm, Nl)
    keys = (tl.where(is_media, key_tile, key_tile - media_tiles) * BLOCK_N + offs_n).to(tl.int64)
    key_in = keys < segment_len
    key_visible = key_in
    if HAS_PADDING:  # the latents read as real (other=1)
        real = tl.load(
            pad_ptr + batch * stride_pad_b + keys * stride_pad_t, mask=key_in & is_media, other=1
        )
        key_visible = key_in & (real != 0)
    k_base = tl.where(
        is_media,
        k_media_ptr + batch * stride_kmb + kv_head * stride_kmh,
        k_latents_ptr + batch * stride_klb + kv_head * stride_klh,
    )
    v_base = tl.where(
        is_media,
        v_media_ptr + batch * stride_vmb + kv_head * stride_vmh,
        v_latents_ptr + batch * stride_vlb + kv_head * stride_vlh,
    )
    stride_kt = tl.where(is_media, stride_kmt, stride_klt)
    stride_vt = tl.where(is_media, stride_vmt, stride_vlt)
    grad_offset = (batch * segment_len * heads_kv + kv_head) * HEAD_DIM  # contiguous gradients
    dk_base = tl.where(is_media, dk_media_ptr, dk_latents_ptr) + grad_offset
    dv_base = tl.where(is_media, dv_media_ptr, dv_latents_ptr) + grad_offset

    k = load_rows(k_base, keys, stride_kt, offs_d, key_visible, d_in)
    v = load_rows(v_base, keys, stride_vt, offs_d, key_visible, d_in)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # Flat loop over (query block, query head of the kv group): every latent sees every key.
    n_qb = tl.cdiv(Nl, BLOCK_M)
    for step in range(0, n_qb * group):
        slot = step // group
        head = kv_head * group + (step - slot * group)
        rows = (slot * BLOCK_M + offs_m).to(tl.int64)
        row_in = rows < Nl
        q_t = load_rows_t(
            q_ptr + batch * stride_qb + head * stride_qh, rows, stride_qt, offs_d, row_in, d_in
        )
        row_stats = (batch * heads_q + head) * Nl + rows
        lse = tl.load(lse_ptr + row_stats, mask=row_in, other=0.0) * 1.4426950408889634  # log2(e)
        dk, dv, _ = dkdv_step(
            k,
            v,
            dk,
            dv,
            q_t,
            lse,
            grad_out_ptr + batch * stride_gb + head * stride_gh,
            rows,
            stride_gt,
            offs_d,
            row_in,
            d_in,
            delta_ptr + row_stats,
            key_visible[:, None] & row_in[None, :],
            qk_scale,
            INPUT_PRECISION,
        )

    dk *= scale
    grad_ptrs = keys[:, None] * (heads_kv * HEAD_DIM) + offs_d[None, :]
    grad_in = key_in[:, None] & d_in[None, :]
    tl.store(dk_base + grad_ptrs, dk.to(dk_media_ptr.dtype.element_ty), mask=grad_in)
    tl.store(dv_base + grad_ptrs, dv.to(dv_media_ptr.dtype.element_ty), mask=grad_in)


@triton.jit
def _bwd_dq_kernel(
    # pointers
    q_ptr,  # [B, Nl, Hq, Dh]
    k_media_ptr,  # [B, Nm, Hkv, Dh]
    v_media_ptr,  # [B, Nm, Hkv, Dh]
    k_latents_ptr,  # [B, Nl, Hkv, Dh]
    v_latents_ptr,  # [B, Nl, Hkv, Dh]
    pad_ptr,  # uint8 [B, Nm]; unread without HAS_PADDING
    grad_out_ptr,  # [B, Nl, Hq, Dh]
    lse_ptr,  # float32 [B, Hq, Nl], contiguous (natural log)
    delta_ptr,  # float32 [B, Hq, Nl], contiguous
    dq_ptr,  # [B, Nl, Hq, Dh], contiguous
    # sizes
    Nl,
    Nm,
    heads_q,
    group,
    qk_scale,  # scale * log2(e)
    scale,
    # strides, in elements
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kmb,
    stride_kmt,
    stride_kmh,
    stride_vmb,
    stride_vmt,
    stride_vmh,
    stride_klb,
    stride_klt,
    stride_klh,
    stride_vlb,
    stride_vlt,
    stride_vlh,
    stride_pad_b,
    stride_pad_t,
    stride_gb,
    stride_gt,
    stride_gh,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_PADDING: tl.constexpr,
):
    q_block = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // heads_q
    head = pid_bh - batch * heads_q
    kv_head = head // group

    rows = (q_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_in = rows < Nl
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    q = load_rows(
        q_ptr + batch * stride_qb + head * stride_qh, rows, stride_qt, offs_d, row_in, d_in
    )
    grad_out = load_rows(
        grad_out_ptr + batch * stride_gb + head * stride_gh, rows, stride_gt, offs_d, row_in, d_in
    )
    row_stats = pid_bh * Nl + rows
    lse = tl.load(lse_ptr + row_stats, mask=row_in, other=0.0) * 1.4426950408889634  # log2(e)
    delta = tl.load(delta_ptr + row_stats, mask=row_in, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    k_base = k_media_ptr + batch * stride_kmb + kv_head * stride_kmh
    v_base = v_media_ptr + batch * stride_vmb + kv_head * stride_vmh
    pad_row = pad_ptr + batch * stride_pad_b
    for start in range(0, Nm, BLOCK_N):
        keys, key_in, key_visible = _media_keys(
            pad_row, start, Nm, stride_pad_t, offs_n, HAS_PADDING
        )
        k_t = load_rows_t(k_base, keys, stride_kmt, offs_d, key_visible, d_in)
        v_t = load_rows_t(v_base, keys, stride_vmt, offs_d, key_visible, d_in)
        dq = dq_step(
            dq, q, grad_out, k_t, v_t, lse, delta, key_visible[None, :], qk_scale, INPUT_PRECISION
        )
    k_base = k_latents_ptr + batch * stride_klb + kv_head * stride_klh
    v_base = v_latents_ptr + batch * stride_vlb + kv_head * stride_vlh
    for start in range(0, Nl, BLOCK_N):
        keys = (start + offs_n).to(tl.int64)
        key_in = keys < Nl
        k_t = load_rows_t(k_base, keys, stride_klt, offs_d, key_in, d_in)
        v_t = load_rows_t(v_base, keys, stride_vlt, offs_d, key_in, d_in)
        dq = dq_step(
            dq, q, grad_out, k_t, v_t, lse, delta, key_in[None, :], qk_scale, INPUT_PRECISION
        )

    dq *= scale
    dq_ptrs = (  # dq is contiguous
        dq_ptr + (batch * Nl * heads_q + head) * HEAD_DIM + rows[:, None] * (heads_q * HEAD_DIM)
    )
    tl.store(
        dq_ptrs + offs_d[None, :],
        dq.to(dq_ptr.dtype.element_ty),
        mask=row_in[:, None] & d_in[None, :],
    )


# ---- configs ------------------------------------------------------------------------------------------


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages
    )


# Per kernel and input width (bytes per element), the configs its launcher runs: under the
# interpreter the first (or the one a test forces), on a GPU the autotuner's pick. Every config is
# compiled by the compile report for sm_80 and sm_90a at Dh 64/80/128, with and without the padding
# mask (registered at the bottom), and spills nothing there under Triton 3.8 and 3.6. float32 keeps
# float32-grade products (3xTF32 forward, FMA or TF32 backward), whose operands take two to four times
# the registers of 16-bit ones: small tiles. Shapes that spilled under Triton 3.8 unless said (bytes
# of spill stores, with or without the mask), as (BLOCK_M, BLOCK_N, warps, stages):
# - forward, 16-bit: (128, 64, 8, 2) 32 B on sm_80 at Dh=80; (64, 64, 4, 3) 12 B on sm_80 at Dh=64.
#   (64, 128, 8, 1) compiles at 255 registers: left out, no room for the next Triton.
# - forward, float32: (32, 32, 8, 1) 48 B on sm_80 at Dh=80; (32, 16, 4, 1) 8-132 B on both archs;
#   (16, 16, 4, 1) 8 B on sm_80 at Dh=80; (32, 16, 8, 1), clean under 3.8, 16-80 B on both archs at
#   Dh 80/128 under Triton 3.6. (16, 32, 4, 1) compiles clean under both (at most 234 registers).
# - dq, 16-bit: (64, 64, 8, 2) 8 B on sm_80 at Dh=64.
# - dq, float32 with FMA dots: every 4-warp shape tried, (32, 16), (16, 16), (16, 32), 4-772 B on
#   sm_90a at Dh 80/128 (two key loops: ptxas keeps more live than image_text_attention's one), and
#   (32, 32, 8, 1) 4-480 B; (32, 16, 8, 1) compiles at 89 registers at most. With TF32 dots that one
#   spilled 8-72 B, and (16, 16, 4, 1) compiles at 196 registers at most: a list per precision.
# - dk/dv, float32: (16, 32, 4, 1) 8 B on sm_80 at Dh=64 (FMA); (16, 32, 4, 2) compiles with both.
_CONFIGS = {
    "perceiver_attention_fwd": {
        2: (_config(64, 64, 8, 2), _config(64, 64, 4, 2), _config(64, 32, 4, 3)),
        4: (_config(16, 32, 4, 1),),
    },
    "perceiver_attention_bwd_preprocess": {
        2: (triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1),),
        4: (triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1),),
    },
    "perceiver_attention_bwd_dkdv": {
        2: (_config(16, 32, 4, 2), _config(16, 64, 8, 2), _config(16, 128, 8, 2)),
        4: (_config(16, 32, 4, 2),),
    },
    "perceiver_attention_bwd_dq": {
        2: (_config(64, 32, 4, 2), _config(64, 32, 4, 3)),
        4: (_config(32, 16, 8, 1),),  # FMA dots (the default)
    },
}
# float32 inputs with TF32 backward dots (``float32_backward_precision``): these lists instead.
_TF32_CONFIGS = {"perceiver_attention_bwd_dq": (_config(16, 16, 4, 1),)}
_FWD_PRECISION = {2: "tf32", 4: "tf32x3"}  # 16-bit dots ignore it
# Tuned once per bucket: each int rounded up to a power of two (``_launch.tuning_key``), plus dtypes.
_TUNE_KEY = ("Nl", "Nm", "HEAD_DIM", "INPUT_PRECISION")

for _name, _lists in _CONFIGS.items():
    declare_configs(
        _name, *_lists.values(), *([_TF32_CONFIGS[_name]] if _name in _TF32_CONFIGS else [])
    )


def kernel_configs(
    dtype: torch.dtype, precision: str | None = None
) -> dict[str, tuple[triton.Config, ...]]:
    """Per kernel name, the config list its launcher uses for inputs of ``dtype`` (and, for float32,
    backward dots at ``precision``: ``"tf32"`` takes ``_TF32_CONFIGS``)."""
    configs = {name: lists[dtype.itemsize] for name, lists in _CONFIGS.items()}
    if dtype == torch.float32 and precision == "tf32":
        configs |= _TF32_CONFIGS
    return configs


# ---- launchers ---------------------------------------------------------------------------------------


def _check_runnable(q: torch.Tensor) -> None:
    if q.device.type != "cuda" and not interpreting(_fwd_kernel):
        raise RuntimeError(
            f"perceiver_attention (triton): tensors are on {q.device}; the Triton kernels need CUDA "
            "tensors, or TRITON_INTERPRET=1 set before triton is imported to run CPU tensors through "
            "the interpreter"
        )
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            "perceiver_attention (triton): q, k_media, v_media, k_latents, v_latents must be "
            f"float32, bfloat16 or float16, got {q.dtype}"
        )
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(
            f"perceiver_attention (triton): head dim Dh={q.shape[-1]} (q {tuple(q.shape)}) is "
            f"outside the supported 1..{MAX_HEAD_DIM}"
        )


def _head_dim_meta(head_dim: int) -> dict:
    return {"HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim))}


def _padding_args(media_padding_mask, q) -> tuple[torch.Tensor, int, int, bool]:
    """(uint8 mask or a dummy, its strides, HAS_PADDING)."""
    if media_padding_mask is None:
        return torch.empty(1, dtype=torch.uint8, device=q.device), 0, 0, False
    mask_u8 = media_padding_mask.view(torch.uint8)  # same element size as bool: strides carry over
    return mask_u8, *mask_u8.stride(), True


def _launch(name, kernel, dtype, grid, args, **constexprs) -> None:
    configs = kernel_configs(dtype, constexprs.get("INPUT_PRECISION"))[name]
    launch(name, kernel, configs, grid, args, tune_key=_TUNE_KEY, **constexprs)


def perceiver_attention_fwd_triton(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor,
    v_latents: torch.Tensor,
    media_padding_mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Nl, Hq, Dh] contiguous in q's dtype, lse [B, Hq, Nl] float32)``; see the module
    docstring. The caller (the op) validates shapes."""
    _check_runnable(q)
    batch, num_latents, heads_q, head_dim = q.shape
    num_media, heads_kv = k_media.shape[1], k_media.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, num_latents), dtype=torch.float32, device=q.device)
    if out.numel() == 0:  # no batch, head or latent: lse is empty too (Dh >= 1 is checked)
        return out, lse
    pad, stride_pad_b, stride_pad_t, has_padding = _padding_args(media_padding_mask, q)
    args = (
        q,
        k_media,
        v_media,
        k_latents,
        v_latents,
        pad,
        out,
        lse,
        num_latents,
        num_media,
        heads_q,
        heads_q // heads_kv,
        scale * LOG2E,
        *q.stride()[:3],
        *k_media.stride()[:3],
        *v_media.stride()[:3],
        *k_latents.stride()[:3],
        *v_latents.stride()[:3],
        stride_pad_b,
        stride_pad_t,
        *out.stride()[:3],
    )
    _launch(
        "perceiver_attention_fwd",
        _fwd_kernel,
        q.dtype,
        lambda meta: (triton.cdiv(num_latents, meta["BLOCK_M"]), batch * heads_q),
        args,
        INPUT_PRECISION=_FWD_PRECISION[q.dtype.itemsize],
        HAS_PADDING=has_padding,
        **_head_dim_meta(head_dim),
    )
    return out, lse


def _bwd_precision(dtype: torch.dtype) -> str:
    return float32_backward_precision() if dtype == torch.float32 else "tf32"


def perceiver_attention_bwd_triton(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor,
    v_latents: torch.Tensor,
    media_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, ...]:
    """``(dq, dk_media, dv_media, dk_latents, dv_latents)`` contiguous, in the inputs' dtypes, for
    the output cotangent ``grad_out``; ``out`` and ``lse`` are the forward's. Deterministic: two
    passes (dk/dv per key tile, dq per query block), no atomics."""
    _check_runnable(q)
    batch, num_latents, heads_q, head_dim = q.shape
    num_media, heads_kv = k_media.shape[1], k_media.shape[2]
    grads = tuple(
        torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for x in (q, k_media, v_media, k_latents, v_latents)
    )
    if batch == 0 or heads_q == 0 or head_dim == 0:
        return grads
    if num_latents == 0:
        return tuple(g.zero_() for g in grads)
    dq, dk_media, dv_media, dk_latents, dv_latents = grads
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    lse = lse.float().contiguous()
    group = heads_q // heads_kv
    head_meta = _head_dim_meta(head_dim)
    precision = _bwd_precision(q.dtype)
    pad, stride_pad_b, stride_pad_t, has_padding = _padding_args(media_padding_mask, q)

    delta = torch.empty((batch, heads_q, num_latents), dtype=torch.float32, device=q.device)
    _launch(
        "perceiver_attention_bwd_preprocess",
        _bwd_preprocess_kernel,
        q.dtype,
        lambda meta: (triton.cdiv(num_latents, meta["BLOCK_M"]), batch * heads_q),
        (out, grad_out, delta, num_latents, heads_q, *out.stride()[:3], *grad_out.stride()[:3]),
        **head_meta,
    )
    strides = (
        *q.stride()[:3],
        *k_media.stride()[:3],
        *v_media.stride()[:3],
        *k_latents.stride()[:3],
        *v_latents.stride()[:3],
        stride_pad_b,
        stride_pad_t,
        *grad_out.stride()[:3],
    )
    inputs = (q, k_media, v_media, k_latents, v_latents, pad, grad_out, lse, delta)
    _launch(
        "perceiver_attention_bwd_dkdv",
        _bwd_dkdv_kernel,
        q.dtype,
        lambda meta: (
            triton.cdiv(num_media, meta["BLOCK_N"]) + triton.cdiv(num_latents, meta["BLOCK_N"]),
            batch * heads_kv,
        ),
        (
            *inputs,
            dk_media,
            dv_media,
            dk_latents,
            dv_latents,
            num_latents,
            num_media,
            heads_q,
            heads_kv,
            group,
            scale * LOG2E,
            scale,
            *strides,
        ),
        INPUT_PRECISION=precision,
        HAS_PADDING=has_padding,
        **head_meta,
    )
    _launch(
        "perceiver_attention_bwd_dq",
        _bwd_dq_kernel,
        q.dtype,
        lambda meta: (triton.cdiv(num_latents, meta["BLOCK_M"]), batch * heads_q),
        (*inputs, dq, num_latents, num_media, heads_q, group, scale * LOG2E, scale, *strides),
        INPUT_PRECISION=precision,
        HAS_PADDING=has_padding,
        **head_meta,
    )
    return grads


# ---- ahead-of-time compile report ---------------------------------------------------------------------

# Compiled by `python -m vlm_kernels.tools.gpu_report` for sm_80 and sm_90a, per kernel and element
# type (bf16 stands for both 16-bit types): every config at Dh 64, 80 and 128, with and without the
# padding mask ("nopad"): the spills measured here depended on all three (a shape clean at Dh=128
# spilled at Dh=80, or only without the mask), so no variant is left to chance. The float32 backward
# compiles once more with TF32 dots ("fp32tf32"). The JIT sees 16-byte aligned buffers, int32 sizes
# and tensor strides that are multiples of 16 (Dh is).
AOT_HEAD_DIMS = (64, 80, 128)
_AOT_WIDTHS = {"bf16": 2, "fp32": 4}
_SEGMENT_STRIDES = (
    "stride_qb stride_qt stride_qh stride_kmb stride_kmt stride_kmh stride_vmb stride_vmt "
    "stride_vmh stride_klb stride_klt stride_klh stride_vlb stride_vlt stride_vlh"
)
_AOT_ARGS = {
    "perceiver_attention_fwd": (
        _fwd_kernel,
        "q_ptr k_media_ptr v_media_ptr k_latents_ptr v_latents_ptr out_ptr",
        f"{_SEGMENT_STRIDES} stride_ob stride_ot stride_oh",
    ),
    "perceiver_attention_bwd_preprocess": (
        _bwd_preprocess_kernel,
        "out_ptr grad_out_ptr",
        "stride_ob stride_ot stride_oh stride_gb stride_gt stride_gh",
    ),
    "perceiver_attention_bwd_dkdv": (
        _bwd_dkdv_kernel,
        "q_ptr k_media_ptr v_media_ptr k_latents_ptr v_latents_ptr grad_out_ptr dk_media_ptr "
        "dv_media_ptr dk_latents_ptr dv_latents_ptr",
        f"{_SEGMENT_STRIDES} stride_gb stride_gt stride_gh",
    ),
    "perceiver_attention_bwd_dq": (
        _bwd_dq_kernel,
        "q_ptr k_media_ptr v_media_ptr k_latents_ptr v_latents_ptr grad_out_ptr dq_ptr",
        f"{_SEGMENT_STRIDES} stride_gb stride_gt stride_gh",
    ),
}


def _aot_signature(kernel, dtype: str, data: str, aligned: str) -> dict:
    """``data`` pointers of the element type, ``aligned`` int32 multiples of 16, the rest fixed:
    float32 statistics, the uint8 padding mask (its token stride 1), int32 sizes, float scales."""
    signature = {name: f"*{dtype}:16" for name in data.split()}
    signature |= {name: "i32:16" for name in aligned.split()}
    signature |= {name: "*fp32:16" for name in ("lse_ptr", "delta_ptr")}
    signature |= {"pad_ptr": "*u8:16", "stride_pad_b": "i32", "stride_pad_t": 1}
    signature |= {name: "i32" for name in ("Nl", "Nm", "heads_q", "heads_kv", "group")}
    signature |= {"qk_scale": "fp32", "scale": "fp32"}
    params = inspect.signature(kernel.fn).parameters
    return {name: spec for name, spec in signature.items() if name in params}


def _register_aot() -> None:
    for name, (kernel, data, aligned) in _AOT_ARGS.items():
        params = inspect.signature(kernel.fn).parameters
        backward = name != "perceiver_attention_fwd"
        variants = [(label, label, width, None) for label, width in _AOT_WIDTHS.items()]
        if backward and "INPUT_PRECISION" in params:
            variants.append(("fp32tf32", "fp32", 4, "tf32"))
        for label, dtype, width, precision in variants:
            configs = _CONFIGS[name][width]
            if precision == "tf32":
                configs = _TF32_CONFIGS.get(name, configs)
            constexprs = {}
            if "INPUT_PRECISION" in params:
                default = _bwd_precision_label(width) if backward else _FWD_PRECISION[width]
                constexprs["INPUT_PRECISION"] = precision or default
            paddings = (True, False) if "HAS_PADDING" in params else (None,)
            for has_padding in paddings:
                flags = {} if has_padding is None else {"HAS_PADDING": has_padding}
                suffix = ",nopad" if has_padding is False else ""
                for head_dim in AOT_HEAD_DIMS:
                    register_aot(
                        kernel,
                        name=f"{name}[{label},d{head_dim}{suffix}]",
                        signature=_aot_signature(kernel, dtype, data, aligned),
                        configs=configs,
                        constexprs={**constexprs, **flags, **_head_dim_meta(head_dim)},
                    )


def _bwd_precision_label(width: int) -> str:
    """The backward's default dot precision per width: FMA for float32 (``float32_backward_precision``
    off), TF32 (ignored by 16-bit dots) otherwise."""
    return "ieee" if width == 4 else "tf32"


_register_aot()
