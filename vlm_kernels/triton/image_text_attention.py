"""image_text_attention, Triton: flash-style forward and backward that visit only visible media chunks,
and a split-KV decode path.

Shapes: q [B, Lq, Hq, Dh], k/v [B, Lk, Hkv, Dh] (any strides, last dim contiguous; Hq % Hkv == 0),
media_mask [B, Lq, M] bool (any strides), Lk == M * media_len (chunk m = keys [m*media_len, (m+1)*media_len)).

    visible(b, t, j) = media_mask[b, t, j // media_len]
    out[b, t, h] = softmax_j(scale * q[b, t, h] . k[b, j, h // group] | visible) v[b, j, h // group]
    lse[b, h, t] = log sum_{visible j} exp(scale * q . k)      float32, -inf on rows that see nothing
Rows that see nothing: out = 0, lse = -inf, zero gradients (empty_rows="zero"); with
empty_rows="uniform" such a row sees every chunk (the launchers OR ``~media_mask.any(-1)`` into the mask
on the host, the Hugging Face Mllama behaviour), so the kernels themselves know one rule only. With
empty_rows="mean" (OpenFlamingo's all-previous-media mode: the row's scores are all equal, so its
softmax is uniform whatever q and k are) the kernels run such rows as "zero" rows, then device torch
ops (no host sync: the decode path stays graph-capturable) write their output, mean_j v[b, j], and
lse = log(Lk) in the forward, and add their only gradient, dv[b, j] += sum of their dO / Lk, to dv in
the backward (``write_mean_rows``, ``add_mean_rows_grad`` of ``ops.media_schedule``, which the
CUDA backend uses too).

Chunk skipping. ``block_chunk_schedule_triton(media_mask, BLOCK_M)`` (or a ``vk.MediaSchedule``'s
cached copy, passed in by the op) lists, per block of BLOCK_M query
rows, the chunks some row of the block sees (ascending, count first). A forward program walks the key
tiles of those chunks only, one of two ways (``_span_walk``):
- spanning tiles (``SPAN_TILES``; 16-bit inputs, M <= 32): the visible chunks read as one sequence of
  chunk_count * media_len keys, cut into tiles of BLOCK_N (``_span_tile``). Key u of that sequence is
  key u % media_len of chunk chunk_ids[u // media_len] (a per-key gather from the block's chunk list),
  so a tile may straddle chunks, and gaps of chunks the block does not see; each row tests each key's
  chunk against its chunk bits (int32 [B, Lq], bit m: the row sees chunk m; ``chunk_bits``, built by
  torch ops per call or once by a MediaSchedule). Only the block's last tile is masked at its tail:
  media_len 577 at BLOCK_N=128 takes ceil(577 n / 128) tiles for n visible chunks, not 5 n. The cost:
  a gather and a bit test per key, up to ~45 more registers on the 16-bit tiles (compile report);
- chunk-aligned tiles (float32, whose 3xTF32 tiles have no registers to spare, and M > 32): tiles
  start at each visible chunk's first key and step by BLOCK_N (a chunk's last tile is masked at its
  tail), so a tile lies in one chunk and each row reads one mask byte per tile (``_chunk_tile``).
The split-KV paths split the same tile count. Keys of a chunk no row of the block sees are never loaded
either way (tests poison them with NaN). The backward kernels keep chunk-aligned tiles.

Kernels (flash-attention 2, exp2 with log2(e) folded into the scale, fp32 softmax and accumulators;
their tile loads, online-softmax step and epilogue, and dk/dv and dq tile steps are the shared
attention core's, ``_attention_core``, which perceiver_attention's kernels call too):
- ``_fwd_kernel``: grid (B*nQB*Hq, splits); online softmax over the scheduled key tiles. Query blocks
  start heaviest first (``heaviest_first``: the blocks that see the most chunks, sorted on the
  device). Split-KV prefill: when B*nQB*Hq is below the SM count (``_prefill_num_splits``), each
  block's visible key tiles are split evenly over the second grid axis (counted on the device, so no
  host sync) and the kernel (``SPLIT``) writes float32 partials (m, l, acc) that
  ``_prefill_combine_kernel`` merges into out and lse, as the decode path does.
- ``_bwd_preprocess_kernel``: delta = rowsum(dO * O), [B, Hq, Lq] fp32.
- ``_bwd_dkdv_kernel``: grid (key tiles, B*Hkv); a program owns BLOCK_N keys of one chunk and one kv
  head, and loops over the query blocks that see the chunk (the transposed schedule: chunk -> query
  blocks) times the query heads of its group, so dk/dv need no atomics and GQA sums in registers.
- ``_bwd_dq_kernel``: grid (nQB, B*Hq); the forward's walk, accumulating dq.
- The opt-in single pass (``deterministic=False``, kernel name ``image_text_attention_bwd_fused``):
  ``_bwd_dkdv_kernel`` with ``ATOMIC_DQ``, also adding each program's dq share into a float32 buffer
  with atomics; no dq kernel.
- ``_decode_split_kernel`` + ``_decode_combine_kernel``: for Lq <= 16. One program holds every query
  row of one kv group (Lq * group rows, up to BLOCK_R) and one slice of the scheduled key tiles (the
  slices split the visible tiles evenly, counted on the device; the forward's walk, spanning or
  chunk-aligned); it writes its partial (m, l, acc) to a float32 workspace, which the combine kernel
  merges into out and lse.

Precision: float16/bfloat16 dots on tensor cores with float32 accumulation; float32 inputs keep
float32-grade products (3xTF32 forward dots, FMA backward dots) on smaller tiles (``_TILES``), except
that the float32 backward takes TF32 dots when PyTorch allows TF32 for float32 matmuls
(``float32_backward_precision``: ``torch.set_float32_matmul_precision("high")`` and the like). The
forward and the default backward are deterministic (no atomics; the single pass is not). GPU launches pick among configs that
``python -m vlm_kernels.tools.gpu_report`` compiles for sm_80 and sm_90a with zero spills (registered
at the bottom): the prefill and backward kernels autotuned once per bucket of (head dim, dtype,
power-of-two buckets of media_len and M; ``_TUNE_KEY``), the decode kernels by a heuristic with no
autotuner (``_decode_config``); under TRITON_INTERPRET=1 each kernel runs the first config of its list
(decode: the heuristic's). Launches go
through ``vlm_kernels.triton._launch``: ``force_triton_config(name, i)`` runs config i instead (the
names are the keys of ``_kernel_configs``).

NaN and inf in q, k, v are never masked away: a non-finite query row gives a non-finite output row
(and gradients), a non-finite visible key or value reaches the rows that see it. Masking is per tile,
so inside a loaded tile such a value may also reach rows of the tile that do not see its chunk
(0 * NaN in a dot); a chunk that no row of a query block sees is never loaded and reaches nothing.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vlm_kernels.ops.media_schedule import (
    MAX_BIT_CHUNKS,
    add_mean_rows_grad,
    block_visibility,
    chunk_bits,
    effective_mask,
    one_block_schedule,
    write_mean_rows,
)
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
from vlm_kernels.triton._launch import declare_configs, forced_config, interpreting, launch
from vlm_kernels.triton.aot import register_aot
from vlm_kernels.triton.block_chunk_schedule import block_chunk_schedule_triton

EMPTY_ROW_MODES = ("zero", "uniform", "mean")
MAX_HEAD_DIM = 128  # the largest head dim the registered (spill-checked) configs cover
DECODE_MAX_QUERY_LEN = 16  # the forward takes the split-KV decode path at or below this Lq
LOG2E = 1.4426950408889634


# ---- the forward's key-tile walks ---------------------------------------------------------------------


@triton.jit
def _span_tile(tile, chunk_ids, chunk_count, media_len, row_bits, BLOCK_N: tl.constexpr):
    """Tile ``tile`` of the spanning walk (``SPAN_TILES``): a block's visible chunks (``chunk_ids``,
    ascending, ``chunk_count`` of them) read as one virtual sequence of chunk_count * media_len keys,
    cut into tiles of BLOCK_N keys, so a tile may straddle chunks and only the block's last tile has
    a masked tail. Virtual key u is key u % media_len of chunk chunk_ids[u // media_len].
    ``row_bits`` [R] int32: the rows' chunk bits (bit m: the row sees chunk m; M <= 32). Returns
    ``(keys [N] int64, key_in [N], visible [R, N])``."""
    virtual = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    key_in = virtual < chunk_count * media_len
    slot = virtual // media_len
    # A small gather from the block's chunk list (one or two cache lines); keys past the end read
    # chunk 0 and load nothing.
    chunk = tl.load(chunk_ids + slot, mask=key_in, other=0)
    keys = chunk.to(tl.int64) * media_len + (virtual - slot * media_len)
    # One 32-bit shift per (row, key): chunk 31 is the sign bit, which >> then & 1 still reads. (Two
    # words for 64 chunks cost 50-65 more registers at BLOCK_N=128 and spilled.)
    sees = ((row_bits[:, None] >> chunk[None, :]) & 1) != 0
    return keys, key_in, sees & key_in[None, :]


@triton.jit
def _chunk_tile(
    tile, chunk_ids, media_len, mask_rows, stride_mask_m, row_in, BLOCK_N: tl.constexpr
):
    """Tile ``tile`` of the chunk-aligned walk (M > 32 chunks, or float32 inputs; ``_span_walk``):
    cdiv(media_len, BLOCK_N) tiles per visible chunk, each starting at the chunk's first key (a
    chunk's last tile is masked at its tail), so a tile lies in one chunk and each row needs one mask
    byte per tile (``mask_rows``: the rows' mask pointers). Returns ``(keys, key_in, visible)``."""
    tiles_per_chunk = tl.cdiv(media_len, BLOCK_N)
    slot = tile // tiles_per_chunk
    chunk = tl.load(chunk_ids + slot).to(tl.int64)
    key_in_chunk = (tile - slot * tiles_per_chunk) * BLOCK_N + tl.arange(0, BLOCK_N)
    key_in = key_in_chunk < media_len
    keys = chunk * media_len + key_in_chunk
    row_sees = tl.load(mask_rows + chunk * stride_mask_m, mask=row_in, other=0) != 0
    return keys, key_in, row_sees[:, None] & key_in[None, :]


@triton.jit
def _walk_tile(
    tile,
    chunk_ids,
    chunk_count,
    media_len,
    row_bits,
    mask_rows,
    stride_mask_m,
    row_in,
    BLOCK_N: tl.constexpr,
    SPAN_TILES: tl.constexpr,
):
    """Tile ``tile`` of the walk the kernel was compiled for: ``_span_tile`` or ``_chunk_tile``."""
    if SPAN_TILES:
        return _span_tile(tile, chunk_ids, chunk_count, media_len, row_bits, BLOCK_N)
    else:
        return _chunk_tile(tile, chunk_ids, media_len, mask_rows, stride_mask_m, row_in, BLOCK_N)


@triton.jit
def _walk_tiles(chunk_count, media_len, BLOCK_N: tl.constexpr, SPAN_TILES: tl.constexpr):
    """The number of key tiles a block with ``chunk_count`` visible chunks walks."""
    if SPAN_TILES:
        return tl.cdiv(chunk_count * media_len, BLOCK_N)
    else:
        return chunk_count * tl.cdiv(media_len, BLOCK_N)


# ---- forward ----------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    # pointers
    q_ptr,  # [B, Lq, Hq, Dh]
    k_ptr,  # [B, Lk, Hkv, Dh]
    v_ptr,  # [B, Lk, Hkv, Dh]
    media_mask_ptr,  # uint8 [B, Lq, M] (the bool mask reinterpreted)
    chunk_count_ptr,  # int32 [B, nQB], contiguous
    chunk_ids_ptr,  # int32 [B, nQB, M], contiguous
    order_ptr,  # int32 [B * nQB]: the (batch, query block) pairs, most visible chunks first
    row_bits_ptr,  # SPAN_TILES: int32 [B, Lq], contiguous: bit m set where the row sees chunk m
    out_ptr,  # [B, Lq, Hq, Dh]
    lse_ptr,  # float32 [B, Hq, Lq], contiguous
    part_m_ptr,  # SPLIT: float32 [B * nQB * Hq, num_splits, BLOCK_M], running max (log2 units)
    part_l_ptr,  # SPLIT: float32 [B * nQB * Hq, num_splits, BLOCK_M], sum of exp2
    part_acc_ptr,  # SPLIT: float32 [B * nQB * Hq, num_splits, BLOCK_M, BLOCK_D], unnormalized out
    # sizes
    Lq,
    M,  # media chunks
    media_len,  # keys per chunk
    heads_q,
    group,  # Hq // Hkv
    n_qb,  # ceil(Lq / BLOCK_M)
    num_splits,  # SPLIT: slices of each query block's key tiles (program_id(1))
    qk_scale,  # scale * log2(e)
    # strides, in elements
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_mask_b,
    stride_mask_q,
    stride_mask_m,
    stride_ob,
    stride_ot,
    stride_oh,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of 2 >= HEAD_DIM
    BLOCK_M: tl.constexpr,  # query rows per program (= the schedule's block)
    BLOCK_N: tl.constexpr,  # keys per tile
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for float32 inputs: "ieee" or "tf32"
    SPLIT: tl.constexpr,  # split-KV prefill: write partials for _prefill_combine_kernel
    SPAN_TILES: tl.constexpr,  # tiles span runs of visible chunks (``_span_walk``), else aligned
):
    # Heaviest first: program p (axis 0) runs the pair order[p // Hq] for head p % Hq. The GPU
    # starts programs in grid order, so the query blocks that see the most chunks (the last rows of
    # a cumulative mask) start first and the light ones fill the SMs at the end. Axis 1: the split.
    pid = tl.program_id(0)
    rank = pid // heads_q
    head = (pid - rank * heads_q).to(tl.int64)
    pair = tl.load(order_ptr + rank)
    batch = (pair // n_qb).to(tl.int64)
    q_block = pair - (pair // n_qb) * n_qb
    pid_bh = batch * heads_q + head
    kv_head = head // group

    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < Lq
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM

    q = load_rows(
        q_ptr + batch * stride_qb + head * stride_qh, rows64, stride_qt, offs_d, row_in, d_in
    )
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    mask_rows = media_mask_ptr + batch * stride_mask_b + rows64 * stride_mask_q

    schedule = batch * n_qb + q_block
    chunk_count = tl.load(chunk_count_ptr + schedule)
    chunk_ids = chunk_ids_ptr + schedule * M
    row_bits = 0  # read by the spanning walk only
    if SPAN_TILES:
        row_bits = tl.load(row_bits_ptr + batch * Lq + rows64, mask=row_in, other=0)

    total_tiles = _walk_tiles(chunk_count, media_len, BLOCK_N, SPAN_TILES)
    tile_start = 0
    tile_end = total_tiles
    if SPLIT:
        # The block's visible tiles split evenly (counted on the device); a split past the end
        # writes an empty partial (m = -inf, l = 0).
        tiles_per_split = tl.cdiv(total_tiles, num_splits)
        tile_start = tl.program_id(1) * tiles_per_split
        tile_end = tl.minimum(tile_start + tiles_per_split, total_tiles)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # One flat loop over the block's visible key tiles: a single pipelined loop on the GPU.
    for tile in range(tile_start, tile_end):
        keys, key_in, visible = _walk_tile(
            tile,
            chunk_ids,
            chunk_count,
            media_len,
            row_bits,
            mask_rows,
            stride_mask_m,
            row_in,
            BLOCK_N,
            SPAN_TILES,
        )
        acc, m_i, l_i = attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_base,
            v_base,
            keys,
            key_in,
            stride_kt,
            stride_vt,
            offs_d,
            d_in,
            visible,
            qk_scale,
            INPUT_PRECISION,
        )

    if SPLIT:
        # int32: splitting happens below the SM count, so slots * BLOCK_M * BLOCK_D stays < 2^31
        # (int64 slot arithmetic here spilled 24 B at Dh=64 on sm_80).
        program = ((schedule * heads_q + head) * num_splits).to(tl.int32) + tl.program_id(1)
        _store_partial(
            part_m_ptr, part_l_ptr, part_acc_ptr, program, m_i, l_i, acc, offs_d, BLOCK_M, BLOCK_D
        )
        return
    out, lse = softmax_epilogue(acc, m_i, l_i)  # a row that saw no key: 0 and -inf
    out_ptrs = out_ptr + batch * stride_ob + head * stride_oh + rows64[:, None] * stride_ot
    tl.store(
        out_ptrs + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_in[:, None] & d_in[None, :],
    )
    tl.store(lse_ptr + pid_bh * Lq + rows64, lse, mask=row_in)


# ---- split-KV partials (prefill with few programs, and decode) ------------------------------------


@triton.jit
def _store_partial(
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    slot,
    m_i,
    l_i,
    acc,
    offs_d,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One split's (m, l, acc) of a block of ROWS rows, at ``slot`` of the float32 workspaces
    ([slots, ROWS] and [slots, ROWS, BLOCK_D])."""
    part = slot * ROWS + tl.arange(0, ROWS)
    tl.store(part_m_ptr + part, m_i)
    tl.store(part_l_ptr + part, l_i)
    tl.store(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :], acc)


@triton.jit
def _merge_partials(
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    first_slot,  # the slot of split 0 (slots of one program's splits are consecutive)
    num_splits,
    local,  # COMBINE_R rows to merge, within the block of BLOCK_ROWS rows
    offs_d,
    BLOCK_ROWS: tl.constexpr,
    COMBINE_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(acc, m, l) of ``local``'s rows merged over the splits' partials (log2 units)."""
    m_i = tl.full((COMBINE_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((COMBINE_R,), dtype=tl.float32)
    acc = tl.zeros((COMBINE_R, BLOCK_D), dtype=tl.float32)
    for split in range(0, num_splits):
        part = (first_slot + split) * BLOCK_ROWS + local
        m_s = tl.load(part_m_ptr + part)
        l_s = tl.load(part_l_ptr + part)
        acc_s = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :])
        m_new = tl.maximum(m_i, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        beta = tl.exp2(m_s - m_use)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_combine_kernel(
    # pointers
    part_m_ptr,  # float32 [B * nQB * Hq, num_splits, BLOCK_M]
    part_l_ptr,  # float32 [B * nQB * Hq, num_splits, BLOCK_M]
    part_acc_ptr,  # float32 [B * nQB * Hq, num_splits, BLOCK_M, BLOCK_D]
    out_ptr,  # [B, Lq, Hq, Dh]
    lse_ptr,  # float32 [B, Hq, Lq], contiguous
    # sizes
    Lq,
    heads_q,
    n_qb,
    num_splits,
    # strides of out, in elements
    stride_ob,
    stride_ot,
    stride_oh,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # the split forward's query block
    COMBINE_R: tl.constexpr,  # rows merged per program (divides BLOCK_M)
):
    pid = tl.program_id(0).to(tl.int64)  # (batch * nQB + query block) * Hq + head
    schedule = pid // heads_q
    head = pid - schedule * heads_q
    batch = schedule // n_qb
    q_block = schedule - batch * n_qb
    local = tl.program_id(1) * COMBINE_R + tl.arange(0, COMBINE_R)
    rows = (q_block * BLOCK_M + local).to(tl.int64)
    row_in = rows < Lq
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM

    acc, m_i, l_i = _merge_partials(
        part_m_ptr,
        part_l_ptr,
        part_acc_ptr,
        pid * num_splits,
        num_splits,
        local,
        offs_d,
        BLOCK_M,
        COMBINE_R,
        BLOCK_D,
    )
    out, lse = softmax_epilogue(acc, m_i, l_i)
    out_ptrs = out_ptr + batch * stride_ob + head * stride_oh + rows[:, None] * stride_ot
    tl.store(
        out_ptrs + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_in[:, None] & d_in[None, :],
    )
    tl.store(lse_ptr + (batch * heads_q + head) * Lq + rows, lse, mask=row_in)


# ---- decode (split-KV) ------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    # pointers
    q_ptr,  # [B, Lq, Hq, Dh]
    k_ptr,  # [B, Lk, Hkv, Dh]
    v_ptr,  # [B, Lk, Hkv, Dh]
    media_mask_ptr,  # uint8 [B, Lq, M]
    chunk_count_ptr,  # int32 [B], contiguous: the chunks some row of the sequence sees
    chunk_ids_ptr,  # int32 [B, M], contiguous
    row_bits_ptr,  # SPAN_TILES: int32 [B, Lq], contiguous: bit m set where token t sees chunk m
    part_m_ptr,  # float32 [B * Hkv * nRB, num_splits, BLOCK_R]: running max (log2 units)
    part_l_ptr,  # float32 [B * Hkv * nRB, num_splits, BLOCK_R]: sum of exp2
    part_acc_ptr,  # float32 [B * Hkv * nRB, num_splits, BLOCK_R, BLOCK_D]: unnormalized output
    # sizes
    Lq,
    M,
    media_len,
    heads_kv,
    group,  # Hq // Hkv; a program's rows are r = t * group + (head within the group)
    num_splits,
    n_row_blocks,  # ceil(Lq * group / BLOCK_R)
    qk_scale,  # scale * log2(e)
    # strides, in elements
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_mask_b,
    stride_mask_q,
    stride_mask_m,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,  # query rows (Lq * group, padded) per program
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SPAN_TILES: tl.constexpr,  # as the prefill forward's
):
    split = tl.program_id(0)
    pid = tl.program_id(1).to(tl.int64)  # over B * Hkv * nRB, row block fastest
    batch_kv = pid // n_row_blocks
    row_block = pid - batch_kv * n_row_blocks
    batch = batch_kv // heads_kv
    kv_head = batch_kv - batch * heads_kv

    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < Lq * group
    token = (rows // group).to(tl.int64)
    head = kv_head * group + rows % group
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM

    q_ptrs = q_ptr + batch * stride_qb + token[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_in[:, None] & d_in[None, :], other=0.0)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    mask_rows = media_mask_ptr + batch * stride_mask_b + token * stride_mask_q

    chunk_count = tl.load(chunk_count_ptr + batch)
    chunk_ids = chunk_ids_ptr + batch * M
    row_bits = 0  # read by the spanning walk only
    if SPAN_TILES:
        row_bits = tl.load(row_bits_ptr + batch * Lq + token, mask=row_in, other=0)
    # The visible tiles, counted on the device, split evenly: a split's share follows the visible
    # work whatever the mask, and splits past the end store an empty partial (m=-inf, l=0).
    total_tiles = _walk_tiles(chunk_count, media_len, BLOCK_N, SPAN_TILES)
    tiles_per_split = tl.cdiv(total_tiles, num_splits)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, total_tiles)

    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for tile in range(tile_start, tile_end):
        keys, key_in, visible = _walk_tile(
            tile,
            chunk_ids,
            chunk_count,
            media_len,
            row_bits,
            mask_rows,
            stride_mask_m,
            row_in,
            BLOCK_N,
            SPAN_TILES,
        )
        acc, m_i, l_i = attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_base,
            v_base,
            keys,
            key_in,
            stride_kt,
            stride_vt,
            offs_d,
            d_in,
            visible,
            qk_scale,
            INPUT_PRECISION,
        )

    _store_partial(
        part_m_ptr,
        part_l_ptr,
        part_acc_ptr,
        pid * num_splits + split,
        m_i,
        l_i,
        acc,
        offs_d,
        BLOCK_R,
        BLOCK_D,
    )


@triton.jit
def _decode_combine_kernel(
    # pointers
    part_m_ptr,  # float32 [B * Hkv * nRB, num_splits, BLOCK_R]
    part_l_ptr,  # float32 [B * Hkv * nRB, num_splits, BLOCK_R]
    part_acc_ptr,  # float32 [B * Hkv * nRB, num_splits, BLOCK_R, BLOCK_D]
    out_ptr,  # [B, Lq, Hq, Dh]
    lse_ptr,  # float32 [B, Hq, Lq], contiguous
    # sizes
    Lq,
    heads_q,
    heads_kv,
    group,
    num_splits,
    n_row_blocks,
    # strides of out, in elements
    stride_ob,
    stride_ot,
    stride_oh,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,  # the split kernel's rows per program
    COMBINE_R: tl.constexpr,  # rows merged per program here (divides BLOCK_R)
):
    pid = tl.program_id(0).to(tl.int64)  # the split kernel's program (batch, kv head, row block)
    sub = tl.program_id(1)
    batch_kv = pid // n_row_blocks
    row_block = pid - batch_kv * n_row_blocks
    batch = batch_kv // heads_kv
    kv_head = batch_kv - batch * heads_kv

    local = sub * COMBINE_R + tl.arange(0, COMBINE_R)  # rows within the split kernel's block
    rows = row_block * BLOCK_R + local
    row_in = rows < Lq * group
    token = (rows // group).to(tl.int64)
    head = kv_head * group + rows % group
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM

    acc, m_i, l_i = _merge_partials(
        part_m_ptr,
        part_l_ptr,
        part_acc_ptr,
        pid * num_splits,
        num_splits,
        local,
        offs_d,
        BLOCK_R,
        COMBINE_R,
        BLOCK_D,
    )
    out, lse = softmax_epilogue(acc, m_i, l_i)
    out_ptrs = out_ptr + batch * stride_ob + token[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(
        out_ptrs + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_in[:, None] & d_in[None, :],
    )
    tl.store(lse_ptr + (batch * heads_q + head) * Lq + token, lse, mask=row_in)


# ---- backward ---------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    out_ptr,  # [B, Lq, Hq, Dh]
    grad_out_ptr,  # [B, Lq, Hq, Dh]
    delta_ptr,  # float32 [B, Hq, Lq], contiguous: rowsum(dO * O)
    Lq,
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
    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < Lq
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    delta = row_dot(
        out_ptr + batch * stride_ob + head * stride_oh,
        grad_out_ptr + batch * stride_gb + head * stride_gh,
        rows64,
        stride_ot,
        stride_gt,
        offs_d,
        row_in,
        offs_d < HEAD_DIM,
    )
    tl.store(delta_ptr + pid_bh * Lq + rows64, delta, mask=row_in)


@triton.jit
def _bwd_dkdv_kernel(
    # pointers
    q_ptr,  # [B, Lq, Hq, Dh]
    k_ptr,  # [B, Lk, Hkv, Dh]
    v_ptr,  # [B, Lk, Hkv, Dh]
    grad_out_ptr,  # [B, Lq, Hq, Dh]
    lse_ptr,  # float32 [B, Hq, Lq], contiguous (natural log)
    delta_ptr,  # float32 [B, Hq, Lq], contiguous
    media_mask_ptr,  # uint8 [B, Lq, M]
    qb_count_ptr,  # int32 [B, M], contiguous: query blocks that see each chunk
    qb_ids_ptr,  # int32 [B, M, nQB], contiguous: those blocks, ascending
    dk_ptr,  # [B, Lk, Hkv, Dh], contiguous
    dv_ptr,  # [B, Lk, Hkv, Dh], contiguous
    dq_acc_ptr,  # float32 [B, Lq, Hq, Dh], contiguous, zeroed: dq accumulated (read if ATOMIC_DQ)
    # sizes
    Lq,
    M,
    media_len,
    heads_q,
    heads_kv,
    group,
    n_qb,
    qk_scale,  # scale * log2(e)
    scale,
    # strides, in elements
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_gb,
    stride_gt,
    stride_gh,
    stride_mask_b,
    stride_mask_q,
    stride_mask_m,
    stride_dkb,
    stride_dkt,
    stride_dkh,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per block (= the schedule's block)
    BLOCK_N: tl.constexpr,  # keys per program
    INPUT_PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,  # also add this program's share of dq into dq_acc (single pass)
):
    key_tile = tl.program_id(0)  # over M * tiles_per_chunk
    pid_bk = tl.program_id(1).to(tl.int64)  # over B * Hkv
    batch = pid_bk // heads_kv
    kv_head = pid_bk - batch * heads_kv
    tiles_per_chunk = tl.cdiv(media_len, BLOCK_N)
    chunk = key_tile // tiles_per_chunk
    key_in_chunk = (key_tile - chunk * tiles_per_chunk) * BLOCK_N + tl.arange(0, BLOCK_N)
    key_in = key_in_chunk < media_len
    keys = chunk.to(tl.int64) * media_len + key_in_chunk
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM
    offs_m = tl.arange(0, BLOCK_M)

    schedule = batch * M + chunk
    qb_count = tl.load(qb_count_ptr + schedule)
    qb_ids = qb_ids_ptr + schedule * n_qb
    # Keys of a chunk no query sees are not even loaded: their dk, dv are 0.
    kv_in = key_in & (qb_count > 0)
    k = load_rows(
        k_ptr + batch * stride_kb + kv_head * stride_kh, keys, stride_kt, offs_d, kv_in, d_in
    )
    v = load_rows(
        v_ptr + batch * stride_vb + kv_head * stride_vh, keys, stride_vt, offs_d, kv_in, d_in
    )
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    mask_chunk = media_mask_ptr + batch * stride_mask_b + chunk.to(tl.int64) * stride_mask_m
    # Flat loop over (query block that sees the chunk, query head of the kv group).
    for step in range(0, qb_count * group):
        slot = step // group
        head = kv_head * group + (step - slot * group)
        q_block = tl.load(qb_ids + slot)
        rows = q_block * BLOCK_M + offs_m
        row_in = rows < Lq
        rows64 = rows.to(tl.int64)
        row_sees = tl.load(mask_chunk + rows64 * stride_mask_q, mask=row_in, other=0) != 0
        q_t = load_rows_t(  # [BLOCK_D, BLOCK_M]
            q_ptr + batch * stride_qb + head * stride_qh, rows64, stride_qt, offs_d, row_in, d_in
        )
        row_stats = (batch * heads_q + head) * Lq + rows64
        lse = tl.load(lse_ptr + row_stats, mask=row_in, other=0.0) * 1.4426950408889634  # log2(e)
        # A row that sees nothing has lse = -inf but row_sees = 0: the step's where drops its inf.
        dk, dv, ds_t = dkdv_step(
            k,
            v,
            dk,
            dv,
            q_t,
            lse,
            grad_out_ptr + batch * stride_gb + head * stride_gh,
            rows64,
            stride_gt,
            offs_d,
            row_in,
            d_in,
            delta_ptr + row_stats,
            key_in[:, None] & row_sees[None, :],
            qk_scale,
            INPUT_PRECISION,
        )
        if ATOMIC_DQ:
            # dq[rows] += scale * ds k over this program's keys: one float32 atomic per element, in
            # whatever order the programs of the other key tiles reach the rows (not deterministic).
            dq_part = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=INPUT_PRECISION)
            dq_rows = ((batch * Lq + rows64) * heads_q + head) * HEAD_DIM
            tl.atomic_add(
                dq_acc_ptr + dq_rows[:, None] + offs_d[None, :],
                dq_part * scale,
                mask=row_in[:, None] & d_in[None, :],
                sem="relaxed",
            )

    dk *= scale
    out_in = key_in[:, None] & d_in[None, :]
    out_offs = (
        batch * stride_dkb + kv_head * stride_dkh + keys[:, None] * stride_dkt + offs_d[None, :]
    )
    tl.store(dk_ptr + out_offs, dk.to(dk_ptr.dtype.element_ty), mask=out_in)
    tl.store(dv_ptr + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=out_in)


@triton.jit
def _bwd_dq_kernel(
    # pointers
    q_ptr,  # [B, Lq, Hq, Dh]
    k_ptr,  # [B, Lk, Hkv, Dh]
    v_ptr,  # [B, Lk, Hkv, Dh]
    grad_out_ptr,  # [B, Lq, Hq, Dh]
    lse_ptr,  # float32 [B, Hq, Lq], contiguous (natural log)
    delta_ptr,  # float32 [B, Hq, Lq], contiguous
    media_mask_ptr,  # uint8 [B, Lq, M]
    chunk_count_ptr,  # int32 [B, nQB], contiguous
    chunk_ids_ptr,  # int32 [B, nQB, M], contiguous
    dq_ptr,  # [B, Lq, Hq, Dh], contiguous
    # sizes
    Lq,
    M,
    media_len,
    heads_q,
    group,
    n_qb,
    qk_scale,  # scale * log2(e)
    scale,
    # strides, in elements
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_gb,
    stride_gt,
    stride_gh,
    stride_mask_b,
    stride_mask_q,
    stride_mask_m,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // heads_q
    head = pid_bh - batch * heads_q
    kv_head = head // group

    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < Lq
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    tile_in = row_in[:, None] & d_in[None, :]

    q = load_rows(
        q_ptr + batch * stride_qb + head * stride_qh, rows64, stride_qt, offs_d, row_in, d_in
    )
    grad_out = load_rows(
        grad_out_ptr + batch * stride_gb + head * stride_gh, rows64, stride_gt, offs_d, row_in, d_in
    )
    row_stats = pid_bh * Lq + rows64
    lse = tl.load(lse_ptr + row_stats, mask=row_in, other=0.0) * 1.4426950408889634  # log2(e)
    delta = tl.load(delta_ptr + row_stats, mask=row_in, other=0.0)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    mask_rows = media_mask_ptr + batch * stride_mask_b + rows64 * stride_mask_q

    schedule = batch * n_qb + q_block
    chunk_count = tl.load(chunk_count_ptr + schedule)
    chunk_ids = chunk_ids_ptr + schedule * M
    tiles_per_chunk = tl.cdiv(media_len, BLOCK_N)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for tile in range(0, chunk_count * tiles_per_chunk):
        slot = tile // tiles_per_chunk
        chunk = tl.load(chunk_ids + slot).to(tl.int64)
        key_in_chunk = (tile - slot * tiles_per_chunk) * BLOCK_N + offs_n
        key_in = key_in_chunk < media_len
        keys = chunk * media_len + key_in_chunk
        row_sees = tl.load(mask_rows + chunk * stride_mask_m, mask=row_in, other=0) != 0
        k_t = load_rows_t(k_base, keys, stride_kt, offs_d, key_in, d_in)
        v_t = load_rows_t(v_base, keys, stride_vt, offs_d, key_in, d_in)
        visible = row_sees[:, None] & key_in[None, :]
        dq = dq_step(dq, q, grad_out, k_t, v_t, lse, delta, visible, qk_scale, INPUT_PRECISION)

    dq *= scale
    tl.store(
        dq_ptr
        + batch * stride_dqb
        + head * stride_dqh
        + rows64[:, None] * stride_dqt
        + offs_d[None, :],
        dq.to(dq_ptr.dtype.element_ty),
        mask=tile_in,
    )


# ---- tiles and configs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tiles:
    """Tile sizes and dot precision for one input width. float32 keeps float32-grade products: 3xTF32
    (``"tf32x3"``) forward dots on tensor cores and FMA (``"ieee"``) backward dots, whose operands
    take two to four times the registers of 16-bit ones (measured by the compile report: 3xTF32
    backward tiles spill even at 16x16 with Dh=128), hence the small float32 tiles.

    The backward's query blocks come in pairs like the forward's, (few programs, many programs): the
    second is the FlashAttention-2 size (dk/dv programs of 128 keys at 8 warps, dq programs of 128
    query rows), taken when it still gives every SM two programs (``_pick_block``)."""

    fwd_block_m: tuple[int, ...]  # prefill query blocks: (few programs, many programs)
    decode_max_rows: int  # most query rows (Lq * group) in one decode program
    dkdv_block_m: tuple[int, ...]  # query rows per inner step of the dk/dv kernel: (few, many)
    dq_block_m: tuple[int, ...]  # query rows per program of the dq kernel: (few, many)
    fwd_precision: str  # tl.dot input_precision of the forward and decode kernels
    bwd_precision: str  # ... of the backward kernels (float32: the default, see _bwd_precision)
    span_tiles: bool  # the forward and decode walk spanning tiles when M <= 32 (``_span_walk``)


_TILES = {
    2: _Tiles((64, 128), 64, (32, 16), (64, 128), "tf32", "tf32", True),  # float16, bfloat16
    4: _Tiles((32,), 32, (16,), (32,), "tf32x3", "ieee", False),  # float32
}


def _configs(*shapes, **fixed) -> tuple[triton.Config, ...]:
    """One config per ``(BLOCK_N, num_warps, num_stages)``, with the constexprs ``fixed``."""
    return tuple(
        triton.Config({**fixed, "BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in shapes
    )


# Configs by the block size that fixes the schedule. Under the interpreter each kernel runs the first
# config of its list unless a test forces another (force_triton_config; the tests walk every config).
# Every config compiles with zero spills on sm_80 and sm_90a at Dh=128 (and the first at Dh 64/80/96;
# registered below) under both Triton versions we meet: 3.8 (our pin) and 3.6 (the lent GPU machine's),
# so one list serves both. Shapes that spilled were dropped. 16-bit: the forward at BLOCK_M=128/
# BLOCK_N=32 with 4 warps, decode BLOCK_N>=64 with 4 warps, dk/dv BLOCK_N=64 with 4 warps and
# BLOCK_N=128. float32: every 16-bit shape (3xTF32: 100 B to 24 KB of spills), and the forward's 32x32
# tile at 4 warps (Dh=80). Triton 3.6 (its ptxas figures, 255 registers each): the float32 forward's
# (32, 8, 2) spilled 44-48 B at Dh 80/96 and (16, 4, 1) 8 B at Dh=128; the float32 decode's (16, 4, 2)
# 8-56 B at Dh 80/96/128; the 16-bit decode's (128, 8, 2) 60 B on sm_80 at Dh=128. Their one-stage
# versions, (32, 8, 1), (16, 8, 1), (16, 8, 1) and (128, 8, 1), compile at 0 B under 3.6 and 3.8 at
# Dh 64/80/96/128 (the float32 tiles at 240-255 registers: no room to spare). 16-bit forward with
# BLOCK_N=128 (heaviest-first grid): at BLOCK_M=64 with 8 warps, 2 and 3 stages spilled 60 B on sm_80
# at Dh 80/96 under Triton 3.6 (3 stages: 4 B at Dh=128; 0 B under 3.8), with 4 warps 12-320 B at
# Dh 80-128; at BLOCK_M=128 (8 warps) 48-120 B on sm_80 at Dh 80-128. (128, 8, 1) at BLOCK_M=64
# compiles at 0 B at Dh 64-128 under both (sm_80: 187-240 registers, sm_90a: 155-211). The heaviest-
# first grid (the pair loaded from the order, its divisions) costs registers: (64, 4, 2) and (64, 4, 3)
# at BLOCK_M=64, at 255 registers and 0 B before, spilled 12 and 28 B on sm_80 at Dh=128 under 3.8.
# The spanning walk (SPAN_TILES: a chunk id and a bit test per key) moves the 16-bit forward tiles by
# -47 to +40 registers (sm_80 tiles often drop: no mask byte per tile): (64, 8, 3) at BLOCK_M=128
# spilled 32 B on sm_80 at Dh=128 under 3.6 (255 registers; the chunk-aligned walk: 194) and is
# dropped; (128, 8, 1) at BLOCK_M=64 at Dh=128 takes 198-230 registers under 3.8 (was 197-209) and
# 234-254 under 3.6 (was 203-237; 254 on sm_80: no room to spare).
_FWD_CONFIGS = {
    32: _configs((32, 8, 1), (16, 8, 1), BLOCK_M=32),
    64: _configs((32, 4, 3), (32, 4, 4), (128, 8, 1), BLOCK_M=64),
    128: _configs((64, 8, 2), (32, 8, 3), BLOCK_M=128),
}
_DECODE_CONFIGS = {  # by the tiles' decode_max_rows
    32: _configs((16, 8, 1)),
    64: _configs((32, 4, 3), (64, 8, 2), (64, 8, 3), (128, 8, 1)),
}
# The backward's lists, per input width and query block. 16-bit dk/dv at FlashAttention-2 size: 128
# keys and 8 warps hold k, v (16-bit) and dk, dv (float32) of 128 x BLOCK_D in registers across the
# query loop, which leaves room for 16 query rows per inner step only: at BLOCK_M=32 they spilled
# 128-152 B on sm_80 at Dh 80/96/128 (both Triton versions; sm_90a's wgmma keeps them at 0 B, 234-254
# registers) and at BLOCK_M=64 56-10,700 B on both archs; (128, 8, 1) at BLOCK_M=32 spilled ~5 KB on
# sm_80 even at Dh=64. BLOCK_M=16 compiles at 0 B with 1-3 stages at Dh 64-128 (sm_80: 218-255
# registers, sm_90a: 122-228). 16-bit dq at BLOCK_M=128: BLOCK_N=64 spilled 28-312 B on sm_80 at
# every head dim (8 warps; 4 warps: up to 2.7 KB on both archs) and BLOCK_N=32 at 4 warps 64-864 B;
# (32, 8, 2) spilled 8 B on sm_80 at Dh=128 under Triton 3.6; (32, 8, 1) and (32, 8, 3) compile at
# 0 B under both (sm_80: 172-255 registers, sm_90a: 118-154). float32 dq, compiled with FMA and with
# TF32 dots (the backward's two float32 precisions): with TF32, (16, 4, 2) spilled 8 B on sm_90a at
# Dh=64 under Triton 3.6, (16, 4, 3) 4 B at Dh 80/96 under 3.8, (16, 8, 2) 24 B and (32, 4, 1) 8-16 B;
# (16, 2, 2) and (16, 2, 3) spilled 8-40 B with FMA. (16, 4, 1) compiles at 0 B with both, at Dh
# 64-128, under both versions (FMA: 88-144 registers, TF32: 242-254).
_DKDV_CONFIGS = {
    2: {
        32: _configs((32, 4, 2), (64, 8, 2), (32, 4, 3), BLOCK_M=32),
        16: _configs((128, 8, 2), (128, 8, 3), BLOCK_M=16),
    },
    4: {16: _configs((32, 4, 2), BLOCK_M=16)},
}
_DQ_CONFIGS = {
    2: {
        64: _configs((32, 4, 2), (64, 8, 2), (32, 4, 3), (64, 8, 3), BLOCK_M=64),
        128: _configs((32, 8, 1), (32, 8, 3), BLOCK_M=128),
    },
    4: {32: _configs((16, 4, 1), BLOCK_M=32)},
}
# The single-pass backward (the dk/dv kernel with ATOMIC_DQ): the dk/dv blocks (the two-pass lists
# pick the block, ``_dkdv_block``), with tiles that fit the dq share's extra BLOCK_M x BLOCK_D float32
# tile and atomics. At 16 bits the 128-key tiles spilled 20-84 B on sm_80 at Dh 80-128 (both Triton
# versions) and (32, 4, 2) / (32, 4, 3) at BLOCK_M=32 8-76 B; (64, 8, 2) at both blocks and (32, 4, 2)
# at BLOCK_M=16 compile at 0 B at Dh 64-128 under both (sm_80: 184-254 registers, sm_90a: 116-192).
# float32 has one list per backward precision: no shape found compiles at 0 B with both FMA and TF32
# dots at Dh 64-128 under both versions (BLOCK_M=16 x BLOCK_N 16-32 at 2-8 warps and 1-3 stages: 4-700 B
# spilled on one arch, version or head dim each). FMA: (32, 8, 2) (TF32 there: 8-16 B at Dh 64-96);
# TF32: (16, 4, 1) (FMA there: 40 B at Dh 80/96 on sm_80 under 3.8).
_FUSED_CONFIGS = {
    2: {
        32: _configs((64, 8, 2), BLOCK_M=32),
        16: _configs((64, 8, 2), (32, 4, 2), BLOCK_M=16),
    },
    4: {16: _configs((32, 8, 2), BLOCK_M=16)},
}
_FUSED_TF32_CONFIGS = {16: _configs((16, 4, 1), BLOCK_M=16)}  # float32 inputs, TF32 dots
_DKDV_LISTS = {
    "image_text_attention_bwd_dkdv": _DKDV_CONFIGS,
    "image_text_attention_bwd_fused": _FUSED_CONFIGS,
}
# The combine kernel at 4 warps spilled 8 bytes on sm_90a (at 56 registers) for Dh 80 and 96.
_COMBINE_CONFIGS = (triton.Config({"COMBINE_R": 16}, num_warps=2, num_stages=2),)
_PREPROCESS_CONFIGS = (triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1),)

# The prefill and backward kernels are tuned per bucket of this key (``_launch.tuning_key``: each int
# rounded up to a power of two, plus the dtypes): a tuned config serves every call with the same
# head dim, dtype and power-of-two buckets of media_len and of the image count M, so a new image count
# re-tunes only when it crosses a power of two; Lq and B change the grid, not the best tile. The
# decode kernels are never tuned: ``_decode_config`` picks their config.
_TUNE_KEY = ("media_len", "M", "HEAD_DIM", "INPUT_PRECISION")


def _decode_config(tiles: _Tiles, head_dim: int, block_r: int) -> triton.Config:
    """The split-KV kernel's config, by heuristic (no autotuner: a decode step must not run a tuning
    pass, nor launch through the Python autotuner, and must be graph-capturable). float32 has one
    config. 16-bit: K/V bandwidth is what decode spends, so the widest tile whose registers fit —
    BLOCK_N=128 (one stage) for head dims up to 64, else 64 keys at 8 warps, with a third pipeline
    stage when the rows are few (block_r <= 32: registers to spare). gpu_check's every-config sweep
    measures the alternatives."""
    configs = _DECODE_CONFIGS[tiles.decode_max_rows]
    if len(configs) == 1:
        return configs[0]
    wanted = (128, 8, 1) if head_dim <= 64 else (64, 8, 3) if block_r <= 32 else (64, 8, 2)
    for config in configs:
        if (config.kwargs["BLOCK_N"], config.num_warps, config.num_stages) == wanted:
            return config
    raise AssertionError(f"decode config {wanted} is not in the declared list")  # pragma: no cover


def _kernel_configs(tiles: _Tiles) -> dict[str, tuple[triton.Config, ...]]:
    """Per kernel name, the config list its launcher uses for inputs of ``tiles``' width: the lists
    ``force_triton_config`` indexes, the autotuner searches and the compile report compiles. The
    forward's list holds every query block size of the width; the launcher autotunes within the
    block size its heuristic picks (a forced config brings its own)."""
    return {
        "image_text_attention_fwd": tuple(
            config for block_m in tiles.fwd_block_m for config in _FWD_CONFIGS[block_m]
        ),
        "image_text_attention_decode_split": _DECODE_CONFIGS[tiles.decode_max_rows],
        "image_text_attention_decode_combine": _COMBINE_CONFIGS,
        "image_text_attention_prefill_combine": _COMBINE_CONFIGS,
        "image_text_attention_bwd_preprocess": _PREPROCESS_CONFIGS,
        "image_text_attention_bwd_dkdv": _by_block(_DKDV_CONFIGS, tiles, tiles.dkdv_block_m),
        "image_text_attention_bwd_dq": _by_block(_DQ_CONFIGS, tiles, tiles.dq_block_m),
        "image_text_attention_bwd_fused": _by_block(_FUSED_CONFIGS, tiles, tiles.dkdv_block_m),
    }


def _dkdv_lists(name: str, tiles: _Tiles, precision: str) -> dict[int, tuple[triton.Config, ...]]:
    """Per query block, the configs of dk/dv kernel ``name`` (two-pass, or the single pass) for inputs
    of ``tiles``' width and backward dots at ``precision``: the single pass at float32 has a list per
    precision (``_FUSED_TF32_CONFIGS``), every other list serves both."""
    if name == "image_text_attention_bwd_fused" and _width(tiles) == 4 and precision == "tf32":
        return _FUSED_TF32_CONFIGS
    return _DKDV_LISTS[name][_width(tiles)]


def _width(tiles: _Tiles) -> int:
    return next(width for width, candidate in _TILES.items() if candidate is tiles)


def _by_block(configs: dict, tiles: _Tiles, blocks: tuple[int, ...]) -> tuple[triton.Config, ...]:
    """The configs of ``configs[width]`` for each query block of ``blocks``, in that order."""
    return tuple(config for block in blocks for config in configs[_width(tiles)][block])


for _name in _kernel_configs(_TILES[2]):
    declare_configs(_name, *(_kernel_configs(tiles)[_name] for tiles in _TILES.values()))
declare_configs("image_text_attention_bwd_fused", sum(_FUSED_TF32_CONFIGS.values(), ()))


# ---- launchers ---------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return interpreting(_fwd_kernel)


def _launch(name: str, kernel, tiles: _Tiles, grid, args, *, tune_key=_TUNE_KEY, **kw) -> None:
    launch(name, kernel, _kernel_configs(tiles)[name], grid, args, tune_key=tune_key, **kw)


def _check_runnable(q: torch.Tensor, empty_rows: str) -> None:
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"image_text_attention (triton): tensors are on {q.device}; the Triton kernels need CUDA "
            "tensors, or TRITON_INTERPRET=1 set before triton is imported to run CPU tensors through "
            "the interpreter"
        )
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"image_text_attention (triton): q, k, v must be float32, bfloat16 or float16, got {q.dtype}"
        )
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"image_text_attention (triton): head dim Dh={q.shape[-1]} (q {tuple(q.shape)}) is over "
            f"the largest supported, {MAX_HEAD_DIM}"
        )
    if empty_rows not in EMPTY_ROW_MODES:
        raise ValueError(f"empty_rows must be one of {EMPTY_ROW_MODES}, got {empty_rows!r}")


def _effective_mask(media_mask: torch.Tensor, empty_rows: str) -> torch.Tensor:
    """The mask the kernels read: with "uniform", a row that sees no chunk sees them all."""
    return effective_mask(media_mask, empty_rows)


def _tiles(dtype: torch.dtype) -> _Tiles:
    return _TILES[dtype.itemsize]


def _bwd_precision(tiles: _Tiles, dtype: torch.dtype) -> str:
    """The backward kernels' ``INPUT_PRECISION``: the width's, or PyTorch's TF32 choice for float32."""
    return float32_backward_precision() if dtype == torch.float32 else tiles.bwd_precision


def _head_dim_meta(head_dim: int) -> dict:
    return {"HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim))}


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    # Under the interpreter: a pretend GPU of 2 SMs, so that small test shapes still split.
    return _num_sms(device.index or 0) if device.type == "cuda" else 2


def _pick_block(
    name: str, configs_by_block: dict[int, tuple[triton.Config, ...]], programs, device
) -> int:
    """The query block (BLOCK_M) the launch of kernel ``name`` will run: the forced config's, else
    the heuristic's. ``configs_by_block``: its configs per block, (few programs, many programs) in
    that order; ``programs(config)``: the grid size a config gives. The larger tile (more reuse of
    each loaded tile) when it still gives every SM two programs, else the smaller (more programs).
    The interpreter runs the first block."""
    blocks = list(configs_by_block)
    forced = forced_config(name, [c for block in blocks for c in configs_by_block[block]])
    if forced is not None:
        return forced.kwargs["BLOCK_M"]
    if _interpreting() or len(blocks) == 1:
        return blocks[0]
    large = configs_by_block[blocks[-1]][0]
    return blocks[-1] if programs(large) >= 2 * _sm_count(device) else blocks[0]


def _prefill_block(q: torch.Tensor) -> int:
    """The BLOCK_M of the prefill config that will run: the forced config's, else the heuristic's."""
    batch, query_len, heads_q, _ = q.shape
    return _pick_block(
        "image_text_attention_fwd",
        {block: _FWD_CONFIGS[block] for block in _tiles(q.dtype).fwd_block_m},
        lambda config: batch * heads_q * triton.cdiv(query_len, config.kwargs["BLOCK_M"]),
        q.device,
    )


def _forward_block(q: torch.Tensor) -> int:
    """The query block the forward's chunk schedule is built for: Lq on the decode path (one block
    holding every row), else the BLOCK_M of the prefill config that will run (forced, or the
    heuristic's)."""
    query_len = q.shape[1]
    return query_len if query_len <= DECODE_MAX_QUERY_LEN else _prefill_block(q)


def _dq_block(q: torch.Tensor) -> int:
    """The BLOCK_M of the dq config that will run (its programs: B * Hq * query blocks)."""
    tiles = _tiles(q.dtype)
    batch, query_len, heads_q, _ = q.shape
    return _pick_block(
        "image_text_attention_bwd_dq",
        {block: _DQ_CONFIGS[_width(tiles)][block] for block in tiles.dq_block_m},
        lambda config: batch * heads_q * triton.cdiv(query_len, config.kwargs["BLOCK_M"]),
        q.device,
    )


def _dkdv_block(
    q: torch.Tensor,
    k: torch.Tensor | None,
    media_len: int | None,
    name: str = "image_text_attention_bwd_dkdv",
) -> int:
    """The BLOCK_M of the config of dk/dv kernel ``name`` (the two-pass one, or the single pass
    ``"image_text_attention_bwd_fused"``) that will run: a forced config's, else the heuristic's on
    the two-pass lists, so both passes walk the same transposed schedule. The programs own BLOCK_N
    keys of one chunk, so the grid is B * Hkv * M * ceil(media_len / BLOCK_N): the 128-key programs
    are taken when they still give every SM two. Without ``k`` and ``media_len`` (not known): the
    first block."""
    tiles = _tiles(q.dtype)
    if name != "image_text_attention_bwd_dkdv":
        lists = _dkdv_lists(name, tiles, _bwd_precision(tiles, q.dtype))
        forced = forced_config(name, [c for block in tiles.dkdv_block_m for c in lists[block]])
        if forced is not None:
            return forced.kwargs["BLOCK_M"]

    def programs(config: triton.Config) -> int:
        if k is None or media_len is None:
            return 0  # no keys known: the first block
        batch, keys, heads_kv, _ = k.shape
        tiles_per_chunk = triton.cdiv(media_len, config.kwargs["BLOCK_N"])
        return batch * heads_kv * (keys // media_len) * tiles_per_chunk

    lists = _DKDV_CONFIGS[_width(tiles)]
    configs_by_block = {block: lists[block] for block in tiles.dkdv_block_m}
    return _pick_block("image_text_attention_bwd_dkdv", configs_by_block, programs, q.device)


def schedule_blocks(
    q: torch.Tensor, k: torch.Tensor | None = None, media_len: int | None = None
) -> tuple[int, int, int]:
    """``(forward block, dq block, dk/dv block)``: the query-block sizes whose schedules the launchers
    read for queries like ``q`` and keys like ``k`` of chunks of ``media_len`` (a ``MediaSchedule``
    builds these and no others). The dk/dv block depends on the key count: without ``k`` and
    ``media_len`` it is the first of the width's (a launcher given a schedule for another block
    builds its own)."""
    return _forward_block(q), _dq_block(q), _dkdv_block(q, k, media_len)


def _given_schedule(schedule, query_len: int, block_q: int):
    """``schedule`` (count, ids) when it was built for blocks of ``block_q`` rows (its number of
    query blocks tells: two block sizes give the same count only when both are one block, the same
    schedule), else None (the launcher builds its own)."""
    if schedule is None or schedule[0].shape[1] != triton.cdiv(query_len, block_q):
        return None
    return schedule


def _mask_args(media_mask: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    mask_u8 = media_mask.view(torch.uint8)  # same element size as bool: strides carry over
    return mask_u8, mask_u8.stride()


def image_text_attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_mask: torch.Tensor,
    media_len: int,
    scale: float,
    empty_rows: str,
    schedule: tuple[torch.Tensor, torch.Tensor] | None = None,
    row_bits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Lq, Hq, Dh] contiguous in q's dtype, lse [B, Hq, Lq] float32)``; see the module
    docstring. Lq <= 16 takes the split-KV decode path. The caller (the op) validates shapes.

    ``schedule``: a ``MediaSchedule``'s ``(chunk_count, chunk_ids)`` for the block ``schedule_blocks``
    names, and then ``media_mask`` is its kernel mask (empty rows already resolved); without one
    (or with one for another block size) the launcher builds the schedule itself. ``row_bits``: the
    schedule's per-row chunk bits (``MediaSchedule.chunk_bits``, M <= 32), else built per call."""
    _check_runnable(q, empty_rows)
    batch, query_len, heads_q, head_dim = q.shape
    out = torch.empty((batch, query_len, heads_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, query_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    if k.shape[1] == 0:  # no keys: every row sees nothing
        return out.zero_(), lse.fill_(float("-inf"))
    path = _decode_forward if query_len <= DECODE_MAX_QUERY_LEN else _prefill_forward
    path(
        q,
        k,
        v,
        media_mask,
        media_len,
        scale,
        empty_rows,
        out,
        lse,
        schedule=schedule,
        row_bits=row_bits,
    )
    if empty_rows == "mean":
        write_mean_rows(v, media_mask, out, lse)
    return out, lse


def heaviest_first(chunk_count: torch.Tensor) -> torch.Tensor:
    """int32 [B * nQB]: the flat indices ``batch * nQB + query block`` of ``chunk_count`` [B, nQB]
    (a chunk schedule's counts: the work of each query block, every chunk being media_len keys),
    most visible chunks first, ties in index order. A device sort: no host sync."""
    return torch.argsort(chunk_count.flatten(), descending=True, stable=True).to(torch.int32)


def spans_tiles(dtype: torch.dtype, num_chunks: int) -> bool:
    """Whether the forward (prefill and decode) walks spanning tiles, and so reads per-row chunk
    bits, for inputs of ``dtype`` and a mask of ``num_chunks`` chunks (``_span_walk``)."""
    return num_chunks <= MAX_BIT_CHUNKS and _tiles(dtype).span_tiles


def _span_walk(
    mask: torch.Tensor, dtype: torch.dtype, row_bits: torch.Tensor | None, span_tiles: bool | None
) -> tuple[bool, torch.Tensor | None]:
    """``(SPAN_TILES, row bits)`` of a forward launch over kernel mask ``mask`` for inputs of
    ``dtype``: tiles that span runs of visible chunks when a row's chunks fit in one int32 (M <= 32)
    and the inputs are 16-bit, reading ``row_bits`` (a MediaSchedule's) or bits built here with
    device ops (no host sync); else the chunk-aligned walk and no bits. float32 keeps the
    chunk-aligned walk: its 3xTF32 tiles sit at 246-254 registers, the per-key chunk test spilled
    20-28 B at Dh 80/96, and its 16/32-key tiles waste under 32 keys per chunk.
    ``span_tiles`` forces the choice (tests compare the two walks)."""
    fits = mask.shape[2] <= MAX_BIT_CHUNKS
    span = spans_tiles(dtype, mask.shape[2]) if span_tiles is None else span_tiles
    if span and not fits:
        raise ValueError(f"spanning tiles need M <= {MAX_BIT_CHUNKS} chunks, got {mask.shape[2]}")
    if not span:
        return False, None
    return True, row_bits if row_bits is not None else chunk_bits(mask)


def _max_walk_tiles(num_chunks: int, media_len: int, span: bool, block_n: int = 64) -> int:
    """The most key tiles of ``block_n`` keys a query block may walk (every chunk visible): the split
    heuristics' measure of work (the visible count is on the device)."""
    if span:
        return triton.cdiv(num_chunks * media_len, block_n)
    return num_chunks * triton.cdiv(media_len, block_n)


def _prefill_num_splits(programs: int, max_tiles: int, device: torch.device) -> int:
    """Split-KV prefill: with fewer programs (B * query blocks * Hq) than SMs, each query block's key
    tiles are split so that every SM gets two programs, keeping at least ~4 tiles (of 64 keys) per
    split for the most keys a block may see (``max_tiles``; the visible count is on the device)."""
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(max_tiles, 4), 64))


def _prefill_forward(
    q,
    k,
    v,
    media_mask,
    media_len,
    scale,
    empty_rows,
    out,
    lse,
    schedule=None,
    num_splits: int | None = None,
    row_bits: torch.Tensor | None = None,
    span_tiles: bool | None = None,
) -> None:
    """With a ``schedule``, ``media_mask`` is already the kernel mask (a MediaSchedule's), and
    ``row_bits`` its chunk bits. ``num_splits`` overrides ``_prefill_num_splits`` (tests); above 1 the
    forward writes partials that ``_prefill_combine_kernel`` merges (no host sync either way).
    ``span_tiles=False`` forces the chunk-aligned walk (tests; ``_span_walk``)."""
    batch, query_len, heads_q, head_dim = q.shape
    heads_kv, num_chunks = k.shape[2], media_mask.shape[2]
    mask = media_mask if schedule is not None else _effective_mask(media_mask, empty_rows)
    tiles = _tiles(q.dtype)
    configs = _kernel_configs(tiles)["image_text_attention_fwd"]
    # The schedule is built for the query block of the config that will run.
    block_m = _prefill_block(q)
    n_qb = triton.cdiv(query_len, block_m)
    schedule = _given_schedule(schedule, query_len, block_m)
    chunk_count, chunk_ids = schedule or block_chunk_schedule_triton(mask, block_m)
    order = heaviest_first(chunk_count)
    span, row_bits = _span_walk(mask, q.dtype, row_bits, span_tiles)
    mask_u8, mask_strides = _mask_args(mask)
    programs = batch * n_qb * heads_q
    if num_splits is None:
        num_splits = _prefill_num_splits(
            programs, _max_walk_tiles(num_chunks, media_len, span), q.device
        )
    head_meta = _head_dim_meta(head_dim)
    if num_splits > 1:
        part_m = torch.empty((programs, num_splits, block_m), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(
            (programs, num_splits, block_m, head_meta["BLOCK_D"]),
            dtype=torch.float32,
            device=q.device,
        )
    else:
        part_m = part_l = part_acc = lse  # not touched when SPLIT is off
    args = (
        q,
        k,
        v,
        mask_u8,
        chunk_count,
        chunk_ids,
        order,
        chunk_count if row_bits is None else row_bits,  # not read by the chunk-aligned walk
        out,
        lse,
        part_m,
        part_l,
        part_acc,
        query_len,
        num_chunks,
        media_len,
        heads_q,
        heads_q // heads_kv,
        n_qb,
        num_splits,
        scale * LOG2E,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *mask_strides,
        *out.stride()[:3],
    )
    launch(
        "image_text_attention_fwd",
        _fwd_kernel,
        configs,
        lambda meta: (programs, num_splits),
        args,
        tune_key=_TUNE_KEY,
        tune_configs=_FWD_CONFIGS[block_m],
        INPUT_PRECISION=tiles.fwd_precision,
        SPLIT=num_splits > 1,
        SPAN_TILES=span,
        **head_meta,
    )
    if num_splits > 1:
        _launch(
            "image_text_attention_prefill_combine",
            _prefill_combine_kernel,
            tiles,
            lambda meta: (programs, block_m // meta["COMBINE_R"]),
            (
                part_m,
                part_l,
                part_acc,
                out,
                lse,
                query_len,
                heads_q,
                n_qb,
                num_splits,
                *out.stride()[:3],
            ),
            BLOCK_M=block_m,
            **head_meta,
        )


def _decode_num_splits(programs: int, max_tiles: int, device: torch.device) -> int:
    """Splits of the key tiles: enough programs for two per SM, but at least ~4 tiles (of 64 keys)
    per split for the most keys the sequences may see (the visible count is known on the device)."""
    wanted = triton.cdiv(2 * _sm_count(device), programs)
    return max(1, min(wanted, triton.cdiv(max_tiles, 4), 256))


def _decode_forward(
    q,
    k,
    v,
    media_mask,
    media_len,
    scale,
    empty_rows,
    out,
    lse,
    num_splits: int | None = None,
    schedule=None,
    row_bits: torch.Tensor | None = None,
    span_tiles: bool | None = None,
) -> None:
    """The split-KV path (any Lq; the forward takes it for Lq <= 16). ``num_splits`` overrides the
    heuristic (tests). With a ``schedule``, ``media_mask`` is already the kernel mask, and ``row_bits``
    its chunk bits; ``span_tiles=False`` forces the chunk-aligned walk (tests). No host sync
    and no autotuner: the split count and the kernels' configs follow from the shapes alone, so a
    decode step can be graph-captured."""
    batch, query_len, heads_q, head_dim = q.shape
    heads_kv, num_chunks = k.shape[2], media_mask.shape[2]
    mask = media_mask if schedule is not None else _effective_mask(media_mask, empty_rows)
    group = heads_q // heads_kv
    tiles = _tiles(q.dtype)
    block_r = min(tiles.decode_max_rows, max(16, triton.next_power_of_2(query_len * group)))
    n_row_blocks = triton.cdiv(query_len * group, block_r)
    programs = batch * heads_kv * n_row_blocks
    span, row_bits = _span_walk(mask, q.dtype, row_bits, span_tiles)
    if num_splits is None:
        num_splits = _decode_num_splits(
            programs, _max_walk_tiles(num_chunks, media_len, span), q.device
        )
    head_meta = _head_dim_meta(head_dim)
    block_d = head_meta["BLOCK_D"]
    # One query block spanning the whole sequence: the chunks any of its rows sees (torch ops: no
    # autotuned schedule kernel on the decode path).
    schedule = _given_schedule(schedule, query_len, query_len)
    chunk_count, chunk_ids = schedule or one_block_schedule(mask)
    mask_u8, mask_strides = _mask_args(mask)
    part_m = torch.empty((programs, num_splits, block_r), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(
        (programs, num_splits, block_r, block_d), dtype=torch.float32, device=q.device
    )
    args = (
        q,
        k,
        v,
        mask_u8,
        chunk_count,
        chunk_ids,
        chunk_count if row_bits is None else row_bits,  # not read by the chunk-aligned walk
        part_m,
        part_l,
        part_acc,
        query_len,
        num_chunks,
        media_len,
        heads_kv,
        group,
        num_splits,
        n_row_blocks,
        scale * LOG2E,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *mask_strides,
    )
    _launch(
        "image_text_attention_decode_split",
        _decode_split_kernel,
        tiles,
        lambda meta: (num_splits, programs),
        args,
        tune_configs=(_decode_config(tiles, head_dim, block_r),),
        BLOCK_R=block_r,
        INPUT_PRECISION=tiles.fwd_precision,
        SPAN_TILES=span,
        **head_meta,
    )
    combine_args = (
        part_m,
        part_l,
        part_acc,
        out,
        lse,
        query_len,
        heads_q,
        heads_kv,
        group,
        num_splits,
        n_row_blocks,
        *out.stride()[:3],
    )
    _launch(
        "image_text_attention_decode_combine",
        _decode_combine_kernel,
        tiles,
        lambda meta: (programs, block_r // meta["COMBINE_R"]),
        combine_args,
        BLOCK_R=block_r,
        **head_meta,
    )


def _block_visibility(mask: torch.Tensor, block_m: int) -> torch.Tensor:
    """[B, nQB, M] bool: some row of query block qb sees chunk m."""
    return block_visibility(mask, block_m)


def image_text_attention_bwd_triton(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_mask: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    media_len: int,
    scale: float,
    empty_rows: str,
    schedule: tuple[torch.Tensor, ...] | None = None,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` contiguous, in the inputs' dtypes, for the output cotangent ``grad_out``;
    ``out`` and ``lse`` are the forward's. Rows that see nothing contribute 0, except under
    empty_rows="mean", where they add their dO / Lk to every value's gradient.

    ``schedule``: a ``MediaSchedule``'s ``(dq chunk_count, dq chunk_ids, qb_count, qb_ids)`` (the dq
    schedule and the transposed dk/dv schedule of ``schedule_blocks``), and then ``media_mask`` is its
    kernel mask; without one the launcher builds both.

    ``deterministic`` (default): two passes, dk/dv per key tile and dq per query block, no atomics:
    bitwise reproducible. ``deterministic=False`` takes the single pass unless
    ``torch.are_deterministic_algorithms_enabled()``: the dk/dv kernel also adds each program's dq
    share into a zeroed float32 buffer with atomics (``ATOMIC_DQ``), cast to q's dtype after; it saves
    the dq pass's recomputation of the scores and the second read of q, k, v, dO, at the price of
    float32 additions in run-dependent order (dq may differ in the last bits between runs)."""
    dq, dk, dv = _bwd_passes(
        grad_out,
        q,
        k,
        v,
        media_mask,
        out,
        lse,
        media_len,
        scale,
        empty_rows,
        schedule=schedule,
        deterministic=deterministic,
    )
    if empty_rows == "mean" and dv.numel() > 0 and q.shape[1] > 0:
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        add_mean_rows_grad(grad_out, media_mask, dv)
    return dq, dk, dv


def _bwd_passes(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_mask: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    media_len: int,
    scale: float,
    empty_rows: str,
    schedule: tuple[torch.Tensor, ...] | None = None,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention kernels' (dq, dk, dv) (see ``image_text_attention_bwd_triton``); "mean" rows
    run as "zero" rows here."""
    _check_runnable(q, empty_rows)
    batch, query_len, heads_q, head_dim = q.shape
    keys, heads_kv, num_chunks = k.shape[1], k.shape[2], media_mask.shape[2]
    dq = torch.empty((batch, query_len, heads_q, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, keys, heads_kv, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, keys, heads_kv, head_dim), dtype=v.dtype, device=v.device)
    if batch == 0 or heads_q == 0 or head_dim == 0:
        return dq, dk, dv
    if query_len == 0 or keys == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    lse = lse.float().contiguous()
    mask = media_mask if schedule is not None else _effective_mask(media_mask, empty_rows)
    group = heads_q // heads_kv
    head_meta = _head_dim_meta(head_dim)
    tiles = _tiles(q.dtype)
    precision = _bwd_precision(tiles, q.dtype)

    delta = torch.empty((batch, heads_q, query_len), dtype=torch.float32, device=q.device)
    _launch(
        "image_text_attention_bwd_preprocess",
        _bwd_preprocess_kernel,
        tiles,
        lambda meta: (triton.cdiv(query_len, meta["BLOCK_M"]), batch * heads_q),
        (out, grad_out, delta, query_len, heads_q, *out.stride()[:3], *grad_out.stride()[:3]),
        **head_meta,
    )

    single_pass = not (deterministic or torch.are_deterministic_algorithms_enabled())
    dkdv_name = "image_text_attention_bwd_fused" if single_pass else "image_text_attention_bwd_dkdv"
    # The schedules, for the query blocks of the configs that will run: query blocks per chunk (dk,
    # dv; and dq in the single pass) and chunks per query block (the dq pass).
    dkdv_block = _dkdv_block(q, k, media_len, dkdv_name)
    given = (None, None) if schedule is None else (schedule[:2], schedule[2:])
    n_qb_dkdv = triton.cdiv(query_len, dkdv_block)
    if given[1] is not None and given[1][1].shape[2] == n_qb_dkdv:
        qb_count, qb_ids = given[1]
    else:
        qb_count, qb_ids = block_chunk_schedule_triton(
            _block_visibility(mask, dkdv_block).transpose(1, 2), 1
        )
    mask_u8, mask_strides = _mask_args(mask)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    # The single pass's dq accumulator; the two-pass dk/dv kernel reads no dq_acc (delta stands in).
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if single_pass else delta
    dkdv_args = (
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        mask_u8,
        qb_count,
        qb_ids,
        dk,
        dv,
        dq_acc,
        query_len,
        num_chunks,
        media_len,
        heads_q,
        heads_kv,
        group,
        n_qb_dkdv,
        scale * LOG2E,
        scale,
        *strides,
        *mask_strides,
        *dk.stride()[:3],
    )
    dkdv_lists = _dkdv_lists(dkdv_name, tiles, precision)
    launch(
        dkdv_name,
        _bwd_dkdv_kernel,
        tuple(config for block in tiles.dkdv_block_m for config in dkdv_lists[block]),
        lambda meta: (num_chunks * triton.cdiv(media_len, meta["BLOCK_N"]), batch * heads_kv),
        dkdv_args,
        tune_key=_TUNE_KEY,
        tune_configs=dkdv_lists[dkdv_block],
        INPUT_PRECISION=precision,
        ATOMIC_DQ=single_pass,
        **head_meta,
    )
    if single_pass:
        return dq.copy_(dq_acc), dk, dv

    dq_block = _dq_block(q)
    dq_schedule = _given_schedule(given[0], query_len, dq_block)
    chunk_count, chunk_ids = dq_schedule or block_chunk_schedule_triton(mask, dq_block)
    n_qb_dq = triton.cdiv(query_len, dq_block)
    dq_args = (
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        mask_u8,
        chunk_count,
        chunk_ids,
        dq,
        query_len,
        num_chunks,
        media_len,
        heads_q,
        group,
        n_qb_dq,
        scale * LOG2E,
        scale,
        *strides,
        *mask_strides,
        *dq.stride()[:3],
    )
    _launch(
        "image_text_attention_bwd_dq",
        _bwd_dq_kernel,
        tiles,
        lambda meta: (n_qb_dq, batch * heads_q),
        dq_args,
        tune_configs=_DQ_CONFIGS[_width(tiles)][dq_block],
        INPUT_PRECISION=precision,
        **head_meta,
    )
    return dq, dk, dv


# ---- ahead-of-time compile report ---------------------------------------------------------------------

# Compiled by `python -m vlm_kernels.tools.gpu_report` for sm_80 and sm_90a. Per kernel and input
# width (bf16 stands for both 16-bit types, which compile to the same tiles): every config at Dh=128
# (BLOCK_D 128, the most registers), and the first config at Dh=80 and 96 (BLOCK_D 128 with masked
# loads, which compile differently) and, for bf16, at Dh=64. The JIT sees 16-byte aligned buffers, int32 sizes,
# q/k/v/out strides that are multiples of 16 (Dh is) and a unit stride on the mask's chunk axis (an
# int argument equal to 1 is compiled as a constant).
_AOT_WIDTHS = {"bf16": 2, "fp32": 4}  # element type -> input width (the _TILES key)
_AOT_FIRST_CONFIG_HEAD_DIMS = {"bf16": (64, 80, 96), "fp32": (80, 96)}
# The float32 backward kernels compile once more with TF32 dots (``float32_backward_precision``),
# under this label, every config at Dh=128 and the first at Dh 64/80/96.
_AOT_TF32 = "fp32tf32"
_AOT_TF32_HEAD_DIMS = (64, 80, 96)
_QKV_STRIDES = (
    "stride_qb stride_qt stride_qh stride_kb stride_kt stride_kh stride_vb stride_vt stride_vh"
)
_GRAD_STRIDES = "stride_gb stride_gt stride_gh"


def _aot_signature(
    kernel, dtype: str, data: str, i32: str = "", fp32: str = "", ints: str = "", aligned: str = ""
):
    """Argument types of ``kernel``: ``data`` pointers of the element type, ``i32``/``fp32``
    pointers, ``ints`` plain int32 and ``aligned`` int32 multiples of 16; plus the mask and scales."""
    signature = {name: f"*{dtype}:16" for name in data.split()}
    signature |= {name: "*i32:16" for name in i32.split()}
    signature |= {name: "*fp32:16" for name in fp32.split()}
    signature |= {name: "i32" for name in ints.split()}
    signature |= {name: "i32:16" for name in aligned.split()}
    signature |= {"media_mask_ptr": "*u8:16", "qk_scale": "fp32", "scale": "fp32"}
    signature |= {"stride_mask_b": "i32", "stride_mask_q": "i32", "stride_mask_m": 1}
    params = inspect.signature(kernel.fn).parameters
    return {name: spec for name, spec in signature.items() if name in params}


def _register(
    name: str, kernel, signature_for, tf32_variant=False, configs_of=None, **constexprs_for
) -> None:
    """Registers ``kernel`` per element type: the width's config list (``_kernel_configs`` of
    ``configs_of``, default ``name``), ``signature_for(dtype)`` and each
    ``constexprs_for[key](tiles)``; with ``tf32_variant`` (the backward), float32 once more at
    ``INPUT_PRECISION="tf32"``."""
    variants = [(dtype, dtype, width, {}) for dtype, width in _AOT_WIDTHS.items()]
    if tf32_variant:
        variants.append((_AOT_TF32, "fp32", 4, {"INPUT_PRECISION": "tf32"}))
    for label, dtype, width, overrides in variants:
        tiles = _TILES[width]
        configs = _kernel_configs(tiles)[configs_of or name]
        if overrides and name == "image_text_attention_bwd_fused":
            configs = sum(_dkdv_lists(name, tiles, "tf32").values(), ())
        constexprs = {key: value(tiles) for key, value in constexprs_for.items()} | overrides
        head_dims = _AOT_TF32_HEAD_DIMS if overrides else _AOT_FIRST_CONFIG_HEAD_DIMS[dtype]
        for head_dim, variant_configs in [(128, configs)] + [(d, configs[:1]) for d in head_dims]:
            register_aot(
                kernel,
                name=f"{name}[{label},d{head_dim}]",
                signature=signature_for(dtype),
                configs=variant_configs,
                constexprs={**constexprs, **_head_dim_meta(head_dim)},
            )


# The prefill forward four times: as one pass (SPLIT off) and as the split-KV first pass (SPLIT on:
# the partial stores replace the epilogue), both launched under the name "image_text_attention_fwd",
# each with the spanning walk (SPAN_TILES: 16-bit inputs, M <= 32; float32 registers its one walk, the
# chunk-aligned one, under both names) and, under the "_chunks" names, the chunk-aligned walk (M > 32);
# the decode split kernel likewise with both walks.
for _name, _split, _span in (
    ("image_text_attention_fwd", False, True),
    ("image_text_attention_fwd_split", True, True),
    ("image_text_attention_fwd_chunks", False, False),
    ("image_text_attention_fwd_split_chunks", True, False),
):
    _register(
        _name,
        _fwd_kernel,
        lambda dtype: _aot_signature(
            _fwd_kernel,
            dtype,
            "q_ptr k_ptr v_ptr out_ptr",
            i32="chunk_count_ptr chunk_ids_ptr order_ptr row_bits_ptr",
            fp32="lse_ptr part_m_ptr part_l_ptr part_acc_ptr",
            ints="Lq M media_len heads_q group n_qb num_splits",
            aligned=f"{_QKV_STRIDES} stride_ob stride_ot stride_oh",
        ),
        configs_of="image_text_attention_fwd",
        INPUT_PRECISION=lambda tiles: tiles.fwd_precision,
        SPLIT=lambda tiles, split=_split: split,
        SPAN_TILES=lambda tiles, span=_span: span and tiles.span_tiles,
    )
for _name, _span in (
    ("image_text_attention_decode_split", True),
    ("image_text_attention_decode_split_chunks", False),
):
    _register(
        _name,
        _decode_split_kernel,
        lambda dtype: _aot_signature(
            _decode_split_kernel,
            dtype,
            "q_ptr k_ptr v_ptr",
            i32="chunk_count_ptr chunk_ids_ptr row_bits_ptr",
            fp32="part_m_ptr part_l_ptr part_acc_ptr",
            ints="Lq M media_len heads_kv group num_splits n_row_blocks",
            aligned=_QKV_STRIDES,
        ),
        configs_of="image_text_attention_decode_split",
        INPUT_PRECISION=lambda tiles: tiles.fwd_precision,
        BLOCK_R=lambda tiles: tiles.decode_max_rows,
        SPAN_TILES=lambda tiles, span=_span: span and tiles.span_tiles,
    )
_register(
    "image_text_attention_decode_combine",
    _decode_combine_kernel,
    lambda dtype: _aot_signature(
        _decode_combine_kernel,
        dtype,
        "out_ptr",
        fp32="part_m_ptr part_l_ptr part_acc_ptr lse_ptr",
        ints="Lq heads_q heads_kv group num_splits n_row_blocks",
        aligned="stride_ob stride_ot stride_oh",
    ),
    BLOCK_R=lambda tiles: tiles.decode_max_rows,
)
_register(
    "image_text_attention_prefill_combine",
    _prefill_combine_kernel,
    lambda dtype: _aot_signature(
        _prefill_combine_kernel,
        dtype,
        "out_ptr",
        fp32="part_m_ptr part_l_ptr part_acc_ptr lse_ptr",
        ints="Lq heads_q n_qb num_splits",
        aligned="stride_ob stride_ot stride_oh",
    ),
    # Every query block the forward runs; BLOCK_M=64 and 128 compile alike (COMBINE_R rows each).
    BLOCK_M=lambda tiles: tiles.fwd_block_m[-1],
)
_register(
    "image_text_attention_bwd_preprocess",
    _bwd_preprocess_kernel,
    lambda dtype: _aot_signature(
        _bwd_preprocess_kernel,
        dtype,
        "out_ptr grad_out_ptr",
        fp32="delta_ptr",
        ints="Lq heads_q",
        aligned=f"stride_ob stride_ot stride_oh {_GRAD_STRIDES}",
    ),
)
for _name, _atomic_dq in (
    ("image_text_attention_bwd_dkdv", False),
    ("image_text_attention_bwd_fused", True),
):
    _register(
        _name,
        _bwd_dkdv_kernel,
        lambda dtype: _aot_signature(
            _bwd_dkdv_kernel,
            dtype,
            "q_ptr k_ptr v_ptr grad_out_ptr dk_ptr dv_ptr",
            i32="qb_count_ptr qb_ids_ptr",
            fp32="lse_ptr delta_ptr dq_acc_ptr",
            ints="Lq M media_len heads_q heads_kv group n_qb",
            aligned=f"{_QKV_STRIDES} {_GRAD_STRIDES} stride_dkb stride_dkt stride_dkh",
        ),
        tf32_variant=True,
        INPUT_PRECISION=lambda tiles: tiles.bwd_precision,
        ATOMIC_DQ=lambda tiles, atomic_dq=_atomic_dq: atomic_dq,
    )
_register(
    "image_text_attention_bwd_dq",
    _bwd_dq_kernel,
    lambda dtype: _aot_signature(
        _bwd_dq_kernel,
        dtype,
        "q_ptr k_ptr v_ptr grad_out_ptr dq_ptr",
        i32="chunk_count_ptr chunk_ids_ptr",
        fp32="lse_ptr delta_ptr",
        ints="Lq M media_len heads_q group n_qb",
        aligned=f"{_QKV_STRIDES} {_GRAD_STRIDES} stride_dqb stride_dqt stride_dqh",
    ),
    tf32_variant=True,
    INPUT_PRECISION=lambda tiles: tiles.bwd_precision,
)
