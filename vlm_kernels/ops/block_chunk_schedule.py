"""block_chunk_schedule: the media chunks each block of ``block_q`` query rows must visit.

    media_mask [B, Lq, M] bool -> chunk_count [B, nQB] int32, chunk_ids [B, nQB, M] int32 (nQB = ceil(Lq/block_q))
    chunk_ids[b, qb, :chunk_count[b, qb]] = ascending chunks visible to some row of block qb; the rest -1

The image-text attention kernels run it first and then loop only over the listed chunks, which is how
their cost follows the visible work. It is also the smallest real kernel that every backend (C++,
Triton, CUDA, CUDA through the SIMT emulator) implements, so it proves each harness end to end.
"""

from __future__ import annotations

import torch

from vlm_kernels._backends import _extension
from vlm_kernels._checks import check_backend, check_tensor
from vlm_kernels.ops._registry import kernel_table
from vlm_kernels.reference.block_chunk_schedule import block_chunk_schedule_reference

TABLE = kernel_table("block_chunk_schedule")


def block_chunk_schedule(
    media_mask: torch.Tensor, block_q: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk_count [B, nQB], chunk_ids [B, nQB, M]) for ``media_mask [B, Lq, M]``; see the module doc."""
    backend = check_backend(backend)
    check_tensor("media_mask", media_mask, ndim=3, dtypes=(torch.bool,), shape_doc="[B, Lq, M]")
    if isinstance(block_q, bool) or not isinstance(block_q, int) or block_q < 1:
        raise ValueError(f"block_q must be a positive int, got {block_q!r}")
    return block_chunk_schedule_op(media_mask, block_q, backend)


@torch.library.custom_op("vlmk::block_chunk_schedule", mutates_args=())
def block_chunk_schedule_op(
    media_mask: torch.Tensor, block_q: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = TABLE.forward_for(media_mask.device, backend)
    return kernel(media_mask, block_q)


@block_chunk_schedule_op.register_fake
def _(media_mask, block_q, backend):
    batch, query_len, num_chunks = media_mask.shape
    num_blocks = (query_len + block_q - 1) // block_q
    count = media_mask.new_empty((batch, num_blocks), dtype=torch.int32)
    return count, media_mask.new_empty((batch, num_blocks, num_chunks), dtype=torch.int32)


# ---- kernels, one entry per backend -------------------------------------------------------------------


def _triton(media_mask, block_q):
    from vlm_kernels.triton.block_chunk_schedule import block_chunk_schedule_triton

    return block_chunk_schedule_triton(media_mask, block_q)


def _compiled(function_name: str):
    def kernel(media_mask, block_q):
        return getattr(_extension()[0], function_name)(media_mask, block_q)

    kernel.__name__ = function_name
    return kernel


TABLE.forward["reference"] = block_chunk_schedule_reference
TABLE.forward["cpu"] = _compiled("block_chunk_schedule_cpu")
TABLE.forward["cuda_sim"] = _compiled("block_chunk_schedule_cuda_sim")
TABLE.forward["cuda"] = _compiled("block_chunk_schedule_cuda")
TABLE.forward["triton"] = _triton
