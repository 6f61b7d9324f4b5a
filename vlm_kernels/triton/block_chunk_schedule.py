"""Per query block, the list of media chunks that some query of the block may see.

For ``media_mask [B, Lq, M]`` (bool) and query blocks of ``block_q`` rows, nQB = ceil(Lq / block_q):

    visible[b, qb, m]         = any(media_mask[b, t, m] for t in block qb's rows)
                                (rows qb * block_q ... min(Lq, (qb + 1) * block_q) - 1)
    chunk_count[b, qb]        = sum_m visible[b, qb, m]                  int32 [B, nQB]
    chunk_ids[b, qb, :count]  = the m with visible[b, qb, m], ascending  int32 [B, nQB, M]
    chunk_ids[b, qb, count:]  = -1

The image-text attention kernels walk ``chunk_ids[b, qb, :chunk_count[b, qb]]`` so that a chunk no
query of the block can see costs nothing (skipped, not masked).

One program per (b, qb). It sweeps M in tiles of BLOCK_M; for each tile it OR-reduces the block's
query rows (tiles of BLOCK_Q rows), then compacts the visible chunk indices with an inclusive
``tl.cumsum`` plus the running count of the tiles before. A last sweep writes -1 from
``chunk_count`` to M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlm_kernels.triton._launch import declare_configs, interpreting, launch
from vlm_kernels.triton.aot import register_aot


@triton.jit
def _block_chunk_schedule_kernel(
    # pointers
    media_mask_ptr,  # uint8 [B, Lq, M] (a bool mask reinterpreted), any strides
    chunk_count_ptr,  # int32 [B, nQB], contiguous
    chunk_ids_ptr,  # int32 [B, nQB, M], contiguous
    # sizes
    Lq,
    M,
    block_q,  # query rows per block (runtime: callers pick it per attention config)
    n_qb,  # ceil(Lq / block_q)
    # strides of media_mask, in elements
    stride_mask_b,
    stride_mask_q,
    stride_mask_m,
    # meta-parameters
    BLOCK_Q: tl.constexpr,  # query rows OR-reduced per step
    BLOCK_M: tl.constexpr,  # chunks per tile
):
    pid = tl.program_id(0).to(tl.int64)  # over B * nQB, qb fastest
    batch = pid // n_qb
    q_block = pid - batch * n_qb
    q_start = q_block * block_q
    q_end = tl.minimum(q_start + block_q, Lq)

    mask_base = media_mask_ptr + batch * stride_mask_b
    ids_base = chunk_ids_ptr + pid * M  # row (b, qb) of chunk_ids
    offs_q = tl.arange(0, BLOCK_Q)
    offs_m = tl.arange(0, BLOCK_M)

    count = tl.zeros((), dtype=tl.int32)  # visible chunks found so far (running compaction offset)
    for m_start in range(0, M, BLOCK_M):
        chunk = m_start + offs_m
        chunk_in = chunk < M
        chunk_off = chunk.to(tl.int64) * stride_mask_m
        seen = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for t_start in range(q_start, q_end, BLOCK_Q):
            rows = t_start + offs_q
            ptrs = mask_base + rows[:, None] * stride_mask_q + chunk_off[None, :]
            tile = tl.load(ptrs, mask=(rows < q_end)[:, None] & chunk_in[None, :], other=0)
            seen = tl.maximum(seen, tl.max(tile.to(tl.int32), axis=0))
        visible = (seen != 0).to(tl.int32)  # out-of-range chunks loaded 0: never visible
        slot = count + tl.cumsum(visible, axis=0) - 1  # inclusive scan -> 0-based slot
        tl.store(ids_base + slot, chunk, mask=visible != 0)
        count += tl.sum(visible, axis=0)

    tl.store(chunk_count_ptr + pid, count)
    # Pad with -1. The first tile starts at `count`, so no compacted id is overwritten.
    for pad_start in range(count, M, BLOCK_M):
        slot = pad_start + offs_m
        tl.store(ids_base + slot, tl.full((BLOCK_M,), -1, dtype=tl.int32), mask=slot < M)


# The config the interpreter runs unless a test forces another (autotune would run every config
# there); the first of the GPU list.
_INTERPRETER_CONFIG = {"BLOCK_Q": 16, "BLOCK_M": 64}


def _autotune_configs() -> list[triton.Config]:
    # Every config holds 16 mask bytes per thread: 34-63 registers on sm_80/sm_90a (gpu_report). 32
    # bytes per thread took 128-177. The loads are single bytes (a row's alignment is unknown), so
    # one thread's loads are independent and there is nothing for software pipelining to do:
    # num_stages=1.
    shapes = [  # (BLOCK_Q, BLOCK_M, num_warps)
        (_INTERPRETER_CONFIG["BLOCK_Q"], _INTERPRETER_CONFIG["BLOCK_M"], 2),
        (64, 16, 2),  # few chunks (a handful of images or tiles)
        (128, 16, 4),  # few chunks, long query blocks
        (32, 64, 4),
        (16, 256, 8),  # many chunks (video frames)
    ]
    return [
        triton.Config({"BLOCK_Q": block_q, "BLOCK_M": block_m}, num_warps=num_warps, num_stages=1)
        for block_q, block_m, num_warps in shapes
    ]


_CONFIGS = tuple(_autotune_configs())
KERNEL_NAME = "block_chunk_schedule"  # for vlm_kernels.triton._launch.force_triton_config
declare_configs(KERNEL_NAME, _CONFIGS)
# The schedule of a (M, block_q) shape is the same work whatever Lq and B are.
_TUNE_KEY = ("M", "block_q")


def block_chunk_schedule_triton(
    media_mask: torch.Tensor, block_q: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chunk_count int32 [B, nQB], chunk_ids int32 [B, nQB, M])`` for ``media_mask [B, Lq, M]``
    (bool, any strides) and query blocks of ``block_q`` rows; see the module docstring.

    CUDA tensors run the compiled (autotuned) kernel; CPU tensors need ``TRITON_INTERPRET=1`` set
    before triton is imported. The caller validates the arguments.
    """
    batch, seq_q, n_media = media_mask.shape
    n_qb = -(-seq_q // block_q)
    device = media_mask.device
    chunk_count = torch.empty((batch, n_qb), dtype=torch.int32, device=device)
    chunk_ids = torch.empty((batch, n_qb, n_media), dtype=torch.int32, device=device)
    if batch * n_qb == 0:
        return chunk_count, chunk_ids
    if n_media == 0:
        return chunk_count.zero_(), chunk_ids

    mask_u8 = media_mask.view(torch.uint8)  # same element size as bool: strides carry over
    args = (
        mask_u8,
        chunk_count,
        chunk_ids,
        seq_q,
        n_media,
        block_q,
        n_qb,
        *mask_u8.stride(),
    )
    if device.type != "cuda" and not interpreting(_block_chunk_schedule_kernel):
        raise RuntimeError(
            f"block_chunk_schedule_triton: media_mask is on {device}; the Triton kernel needs a "
            "CUDA tensor, or TRITON_INTERPRET=1 set before triton is imported to run CPU tensors "
            "through the interpreter"
        )
    grid = (batch * n_qb,)
    launch(
        KERNEL_NAME,
        _block_chunk_schedule_kernel,
        _CONFIGS,
        lambda meta: grid,
        args,
        tune_key=_TUNE_KEY,
    )
    return chunk_count, chunk_ids


register_aot(
    _block_chunk_schedule_kernel,
    # What the JIT sees for a torch bool mask: 16-byte aligned buffers, int32 sizes and strides, and
    # a contiguous last dim (an int argument equal to 1 is specialized to a constant).
    signature={
        "media_mask_ptr": "*u8:16",
        "chunk_count_ptr": "*i32:16",
        "chunk_ids_ptr": "*i32:16",
        "Lq": "i32",
        "M": "i32",
        "block_q": "i32",
        "n_qb": "i32",
        "stride_mask_b": "i32",
        "stride_mask_q": "i32",
        "stride_mask_m": 1,
    },
    configs=_CONFIGS,
)
