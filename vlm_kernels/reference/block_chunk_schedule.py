"""block_chunk_schedule, reference: which media chunks each block of query rows must visit.

media_mask [B, Lq, M] bool, block_q >= 1, nQB = ceil(Lq / block_q).
    chunk_count[b, qb]          = number of chunks m visible to some row t in [qb*block_q, (qb+1)*block_q)
    chunk_ids[b, qb, :count]    = those m, ascending;   chunk_ids[b, qb, count:] = -1
Both int32. The attention kernels loop over chunk_ids[b, qb, :chunk_count[b, qb]] and never touch the
other chunks, so their cost follows the visible work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_chunk_schedule_reference(
    media_mask: torch.Tensor, block_q: int
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, query_len, num_chunks = media_mask.shape
    num_blocks = -(-query_len // block_q)
    padded = F.pad(media_mask, (0, 0, 0, num_blocks * block_q - query_len))
    visible = padded.reshape(batch, num_blocks, block_q, num_chunks).any(2)  # [B, nQB, M]
    chunk_count = visible.sum(-1, dtype=torch.int32)
    # A stable sort of "not visible" puts the visible chunk indices first, in ascending order.
    order = torch.sort((~visible).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    slots = torch.arange(num_chunks, device=media_mask.device)
    chunk_ids = torch.where(slots < chunk_count[..., None], order, -1).to(torch.int32)
    return chunk_count, chunk_ids
