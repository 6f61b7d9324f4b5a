"""MediaSchedule: the media mask of one forward, validated once, with the chunk schedules the kernels
walk, built once and shared by every image_text_attention call (every cross-attention layer) that
uses the mask.

    sched = vk.MediaSchedule(media_mask, media_len=1601, empty_rows="zero")
    out = vk.image_text_attention(q, k, v, sched)          # media_len and empty_rows come from sched

What it holds (FlexAttention's BlockMask plays the same part):
- ``media_mask``: the validated mask [B, Lq, M] bool, and ``kernel_mask``: the mask the kernels read
  (with ``empty_rows="uniform"`` a row that sees no chunk sees every chunk; the same tensor otherwise:
  "mean" rows see no key in the kernels, which then write their mean output apart);
- ``media_len`` and ``empty_rows``;
- per query-block size, the forward chunk schedule ``(chunk_count [B, nQB], chunk_ids [B, nQB, M])``
  (``block_chunk_schedule``); a block of at least Lq rows is the decode schedule, built with a few
  torch ops (no Triton launch, no autotuner, no host sync);
- per query-block size, the transposed (backward dk/dv) schedule: per chunk, the query blocks that see
  it, and the block visibility it is built from;
- for M <= 32 chunks, the per-row chunk bits ``(int32 [B, Lq], bit m = kernel_mask[b, t, m])``
  (``chunk_bits``), built on first use: the Triton forward's tiles span runs of visible chunks and
  check each key's chunk against its row's bits.
The schedules are built lazily, on the first call that needs each block size, and cached: a model
forward with L cross-attention layers builds each one once instead of L times (and a training step's
backward reuses the forward's). Only the Triton kernels take schedules; the C++ CPU and CUDA kernels
build theirs inside the kernel from the mask and take ``kernel_mask`` alone; the reference takes the
mask.

How it crosses the custom-op boundary. A ``torch.library`` custom op takes tensors and scalars, not
Python objects, and must stay traceable by ``torch.compile(fullgraph=True)``. So the schedule is never
passed as an object: the public ``image_text_attention`` unpacks it into the op's arguments —
``kernel_mask`` in place of the mask, ``media_len`` and ``empty_rows`` as scalars, and the schedule
tensors the chosen backend's kernels will read as optional tensor arguments (``chunk_count``,
``chunk_ids`` for the forward; ``dq_chunk_count``, ``dq_chunk_ids``, ``qb_count``, ``qb_ids`` for the
backward, passed only when a gradient is needed and saved for it by autograd). Tensors arguments keep
the op functional and its fake implementation trivial, the compiled graph sees ordinary inputs
(lazily built schedules are ordinary graph ops: ``vlmk::block_chunk_schedule`` and torch ops), and
each launcher checks a given schedule's shape against the block size it runs (building its own when
they differ, e.g. under a ``force_triton_config`` that changes the block), so a schedule can never be
read for the wrong block size.
"""

from __future__ import annotations

import math

import torch

from vlm_kernels._checks import check_tensor
from vlm_kernels.ops.block_chunk_schedule import block_chunk_schedule_op

EMPTY_ROW_MODES = ("zero", "uniform", "mean")
MAX_BIT_CHUNKS = 32  # chunks one int32 of per-row bits holds (chunk 31 is the sign bit)


def effective_mask(media_mask: torch.Tensor, empty_rows: str) -> torch.Tensor:
    """The mask the kernels read: with "uniform", a row that sees no chunk sees them all."""
    if empty_rows == "uniform":
        return media_mask | ~media_mask.any(-1, keepdim=True)
    return media_mask


def write_mean_rows(
    v: torch.Tensor, media_mask: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """The "mean" rows (no visible chunk; ``media_mask`` may be a schedule's kernel mask, the same
    tensor for this mode): out = mean of all values of the row's kv head, in float32, lse = log(Lk).
    For kernels that ran such rows as "zero" rows (Triton, CUDA): device ops, no host sync."""
    keys, heads_kv = v.shape[1], v.shape[2]
    empty = ~media_mask.any(-1)  # [B, Lq]
    mean = v.mean(1, dtype=torch.float32).repeat_interleave(out.shape[2] // heads_kv, 1)
    out.copy_(torch.where(empty[:, :, None, None], mean[:, None].to(out.dtype), out))
    lse.masked_fill_(empty[:, None, :], math.log(keys))


def add_mean_rows_grad(grad_out: torch.Tensor, media_mask: torch.Tensor, dv: torch.Tensor) -> None:
    """dv[b, j, hk] += (sum of dO over the "mean" rows of hk's query heads) / Lk for every key j:
    a mean row's output is sum_j v[j] / Lk; its constant scores give q and k nothing."""
    batch, keys, heads_kv, head_dim = dv.shape
    empty = ~media_mask.any(-1)  # [B, Lq]
    # dO * 0/1 is exact in any dtype; the sum over rows and heads runs in float32.
    row_sum = (grad_out * empty[:, :, None, None]).sum(1, dtype=torch.float32)  # [B, Hq, Dh]
    per_kv = row_sum.view(batch, heads_kv, -1, head_dim).sum(2) / keys  # [B, Hkv, Dh]
    dv.add_(per_kv[:, None])  # computed in float32, one rounding to dv's dtype


def one_block_schedule(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_chunk_schedule(mask, block_q)`` for any ``block_q >= Lq`` (one block holding every row:
    the decode schedule), with torch ops only: ``(chunk_count int32 [B, 1], chunk_ids int32 [B, 1, M])``,
    the visible chunks ascending, then -1. No host sync, no autotuner (CUDA-graph capturable)."""
    batch, _, num_chunks = mask.shape
    visible = mask.any(1)  # [B, M]
    count = visible.sum(-1, dtype=torch.int32)  # [B]
    # Compaction by scatter (no sort, no sync): visible chunk m goes to slot (visible before m);
    # the others to a spare last column, dropped.
    slot = torch.cumsum(visible, -1) - 1
    slot = torch.where(visible, slot, torch.full_like(slot, num_chunks))
    chunks = torch.arange(num_chunks, device=mask.device, dtype=torch.int32).expand(batch, -1)
    ids = torch.full((batch, num_chunks + 1), -1, dtype=torch.int32, device=mask.device)
    ids.scatter_(1, slot, chunks)
    return count[:, None].contiguous(), ids[:, None, :num_chunks].contiguous()


def chunk_bits(mask: torch.Tensor) -> torch.Tensor | None:
    """int32 [B, Lq]: bit m of row (b, t) set where ``mask[b, t, m]``, for M <= ``MAX_BIT_CHUNKS``
    (chunk 31 is the sign bit: the kernels read bit m as ``(bits >> m) & 1``, which holds for it
    too); None for more chunks. Torch ops on the mask's device: no host sync (graph-capturable)."""
    num_chunks = mask.shape[2]
    if num_chunks > MAX_BIT_CHUNKS:
        return None
    chunks = torch.arange(num_chunks, dtype=torch.int32, device=mask.device)
    weights = torch.bitwise_left_shift(torch.ones_like(chunks), chunks)
    # Distinct powers of two: their sum is their OR (1 << 31 wraps to -2**31, and the sum with the
    # lower bits stays in range, so no bit carries).
    return (mask.to(torch.int32) * weights).sum(-1, dtype=torch.int32)


def block_visibility(mask: torch.Tensor, block_m: int) -> torch.Tensor:
    """[B, nQB, M] bool: some row of query block qb (rows qb*block_m ...) sees chunk m."""
    batch, query_len, num_chunks = mask.shape
    n_qb = -(-query_len // block_m)
    padded = torch.zeros((batch, n_qb * block_m, num_chunks), dtype=torch.bool, device=mask.device)
    padded[:, :query_len] = mask
    return padded.view(batch, n_qb, block_m, num_chunks).any(2)


class MediaSchedule:
    """The media mask of one forward and the chunk schedules built from it, shared by every
    ``image_text_attention`` call that uses the mask (see the module docstring).

    Args:
        media_mask: [B, Lq, M] bool, True where text token t may attend to media chunk m.
        media_len: tokens per media chunk (the keys of a call must number ``M * media_len``).
        empty_rows: "zero", "uniform" or "mean", as in ``image_text_attention``.

    Build it once per mask (per model forward, or per decode step) and pass it in place of the mask to
    every layer; a new mask needs a new schedule (the object does not watch its mask for changes).
    """

    def __init__(self, media_mask: torch.Tensor, *, media_len: int, empty_rows: str = "zero"):
        check_tensor("media_mask", media_mask, ndim=3, dtypes=(torch.bool,), shape_doc="[B, Lq, M]")
        if isinstance(media_len, bool) or not isinstance(media_len, int) or media_len < 1:
            raise ValueError(f"media_len must be a positive int, got {media_len!r}")
        if empty_rows not in EMPTY_ROW_MODES:
            raise ValueError(f"empty_rows must be one of {EMPTY_ROW_MODES}, got {empty_rows!r}")
        self.media_mask = media_mask
        self.media_len = media_len
        self.empty_rows = empty_rows
        self.kernel_mask = effective_mask(media_mask, empty_rows)
        self._chunk_schedules: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._transposed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._chunk_bits: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        """The mask's shape, [B, Lq, M]."""
        return self.media_mask.shape

    @property
    def num_keys(self) -> int:
        """Lk = M * media_len, the keys a call with this schedule must have."""
        return self.media_mask.shape[2] * self.media_len

    @property
    def device(self) -> torch.device:
        return self.media_mask.device

    def chunk_schedule(self, block_q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chunk_count int32 [B, nQB], chunk_ids int32 [B, nQB, M])`` of ``kernel_mask`` for query
        blocks of ``block_q`` rows (``block_chunk_schedule``); built on first use, then cached. A
        block of at least Lq rows gives the one-block (decode) schedule, built with torch ops."""
        query_len = self.media_mask.shape[1]
        key = min(block_q, max(query_len, 1))  # every block_q >= Lq is the same schedule
        if key not in self._chunk_schedules:
            if key >= query_len:
                schedule = one_block_schedule(self.kernel_mask)
            else:
                schedule = block_chunk_schedule_op(self.kernel_mask, key, "auto")
            self._chunk_schedules[key] = schedule
        return self._chunk_schedules[key]

    def transposed_schedule(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(qb_count int32 [B, M], qb_ids int32 [B, M, nQB])``: per chunk, the query blocks of
        ``block_m`` rows that see it (ascending, then -1): the backward dk/dv kernel's walk. Cached."""
        if block_m not in self._transposed:
            visible = block_visibility(self.kernel_mask, block_m)
            self._transposed[block_m] = block_chunk_schedule_op(visible.transpose(1, 2), 1, "auto")
        return self._transposed[block_m]

    def chunk_bits(self) -> torch.Tensor | None:
        """``kernel_mask``'s per-row chunk bits (``chunk_bits``: int32 [B, Lq], None for M > 32),
        which the Triton forward's spanning tiles read. Built on first use, then cached."""
        if self._chunk_bits is None and self.media_mask.shape[2] <= MAX_BIT_CHUNKS:
            self._chunk_bits = chunk_bits(self.kernel_mask)
        return self._chunk_bits

    def __repr__(self) -> str:
        return (
            f"MediaSchedule(mask {tuple(self.media_mask.shape)} on {self.device}, "
            f"media_len={self.media_len}, empty_rows={self.empty_rows!r}, "
            f"cached blocks: forward {sorted(self._chunk_schedules)}, "
            f"backward {sorted(self._transposed)})"
        )
