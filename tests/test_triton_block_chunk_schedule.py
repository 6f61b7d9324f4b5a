"""The Triton ``block_chunk_schedule`` kernel vs a plain-PyTorch reference, on CPU tensors through
the Triton interpreter (or compiled on CUDA tensors with VLMK_TEST_DEVICE=cuda), at every autotune
config; and the interpreter's bf16 ``tl.dot`` fault with its test-side patch.

TRITON_INTERPRET must be set before triton is first imported (``@triton.jit`` picks interpreter or
compiler when a kernel module is imported). tests/conftest.py sets it for the session; the
``setdefault`` below keeps this module right when it is run on its own.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from tests.devices import ON_CUDA, TEST_DEVICE, cpu_only
from tests.triton_interpreter import (
    bf16_dot_patch_applied,
    patch_interpreter_bf16_dot,
    unpatch_interpreter_bf16_dot,
)

triton = pytest.importorskip("triton")
if not ON_CUDA and not triton.knobs.runtime.interpret:
    pytest.skip(
        "TRITON_INTERPRET=1 was not set before triton was imported", allow_module_level=True
    )

import triton.language as tl  # noqa: E402

from vlm_kernels.triton._launch import force_triton_config  # noqa: E402
from vlm_kernels.triton.block_chunk_schedule import (  # noqa: E402
    _CONFIGS,
    _INTERPRETER_CONFIG,
    KERNEL_NAME,
    block_chunk_schedule_triton,
)

BLOCK_M = _INTERPRETER_CONFIG["BLOCK_M"]
BLOCK_Q = _INTERPRETER_CONFIG["BLOCK_Q"]


def reference_block_chunk_schedule(media_mask: torch.Tensor, block_q: int):
    """The spec in PyTorch: OR over each block's rows (padded with False), a stable compaction."""
    batch, seq_q, n_media = media_mask.shape
    n_qb = -(-seq_q // block_q)
    padded = torch.zeros(batch, n_qb * block_q, n_media, dtype=torch.bool, device=media_mask.device)
    padded[:, :seq_q] = media_mask
    visible = padded.view(batch, n_qb, block_q, n_media).any(2)
    chunk_count = visible.sum(-1, dtype=torch.int32)
    # Stable sort on "not visible": visible indices first, ascending; then -1 past the count.
    order = torch.sort((~visible).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    slots = torch.arange(n_media, device=media_mask.device).expand_as(order)
    chunk_ids = torch.where(slots < chunk_count.unsqueeze(-1), order, torch.full_like(order, -1))
    return chunk_count, chunk_ids


def check(media_mask: torch.Tensor, block_q: int) -> None:
    chunk_count, chunk_ids = block_chunk_schedule_triton(media_mask, block_q)
    expected_count, expected_ids = reference_block_chunk_schedule(media_mask, block_q)
    batch, seq_q, n_media = media_mask.shape
    n_qb = -(-seq_q // block_q)
    assert chunk_count.shape == (batch, n_qb) and chunk_count.dtype == torch.int32
    assert chunk_ids.shape == (batch, n_qb, n_media) and chunk_ids.dtype == torch.int32
    assert torch.equal(chunk_count, expected_count)
    assert torch.equal(chunk_ids, expected_ids)


def random_mask(batch: int, seq_q: int, n_media: int, density: float = 0.1) -> torch.Tensor:
    return torch.rand(batch, seq_q, n_media, device=TEST_DEVICE) < density


def test_reference_on_a_hand_made_case():
    mask = torch.zeros(1, 5, 4, dtype=torch.bool)
    mask[0, 0, 2] = mask[0, 1, 0] = mask[0, 4, 3] = mask[0, 4, 1] = True
    count, ids = reference_block_chunk_schedule(mask, 2)
    assert count.tolist() == [[2, 0, 2]]
    assert ids.tolist() == [[[0, 2, -1, -1], [-1, -1, -1, -1], [1, 3, -1, -1]]]


@pytest.mark.parametrize(
    "batch, seq_q, n_media, block_q, density",
    [
        (2, 37, 5, 16, 0.1),  # Lq not a multiple of block_q
        (3, 64, 9, 16, 0.3),  # Lq a multiple of block_q
        (2, 50, 7, 40, 0.05),  # block_q > BLOCK_Q and not a multiple of it
        (2, 9, 6, 1, 0.4),  # block_q = 1: one query per block
        (2, 5, 7, 32, 0.2),  # Lq < block_q: one partial block
        (1, 20, 3, 8, 0.2),  # B = 1
        (1, 12, 3 * BLOCK_M + 17, 4, 0.02),  # M spans several BLOCK_M tiles, a partial last one
        (2, 33, 2 * BLOCK_M, 16, 0.01),  # M a multiple of BLOCK_M
    ],
)
def test_random_masks(batch, seq_q, n_media, block_q, density):
    check(random_mask(batch, seq_q, n_media, density), block_q)


@pytest.mark.parametrize("value", [False, True])
@pytest.mark.parametrize("n_media", [5, BLOCK_M + 3])
def test_constant_masks(value, n_media):
    mask = torch.full((2, 21, n_media), value, dtype=torch.bool, device=TEST_DEVICE)
    count, _ = block_chunk_schedule_triton(mask, 8)
    assert torch.all(count == (n_media if value else 0))
    check(mask, 8)


def test_visible_chunks_in_last_tile_only():
    n_media = 2 * BLOCK_M + 5
    mask = torch.zeros(1, 10, n_media, dtype=torch.bool, device=TEST_DEVICE)
    mask[0, 3, n_media - 1] = mask[0, 9, 2 * BLOCK_M] = True
    check(mask, 4)


def test_strided_mask_view():
    base = torch.rand(3, 2 * 29 + 1, 4, 11, device=TEST_DEVICE) < 0.15
    mask = base[:, 1::2, 2, ::2]  # [3, 29, 6]: every dim strided, none contiguous
    assert not mask.is_contiguous() and mask.stride(-1) != 1
    check(mask, 8)
    transposed = (torch.rand(2, 7, 19, device=TEST_DEVICE) < 0.2).transpose(
        1, 2
    )  # [2, 19, 7], M stride 19
    check(transposed, 5)


def test_expanded_mask_with_zero_strides():
    row = torch.rand(1, 1, 9, device=TEST_DEVICE) < 0.3
    check(row.expand(2, 13, 9), 4)


@pytest.mark.parametrize(
    "batch, seq_q, n_media",
    [(2, 7, 0), (2, 0, 5), (0, 7, 5), (0, 0, 0)],
)
def test_empty_sizes(batch, seq_q, n_media):
    mask = torch.zeros(batch, seq_q, n_media, dtype=torch.bool, device=TEST_DEVICE)
    count, ids = block_chunk_schedule_triton(mask, 4)
    n_qb = -(-seq_q // 4)
    assert count.shape == (batch, n_qb) and ids.shape == (batch, n_qb, n_media)
    assert count.dtype == ids.dtype == torch.int32
    assert torch.all(count == 0)


def test_every_output_element_is_written(monkeypatch):
    # Poison the outputs the launcher allocates, so an element the kernel does not write shows up.
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(-12345) if out.dtype == torch.int32 else out

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    zeros = torch.zeros(1, 8, 3, dtype=torch.bool, device=TEST_DEVICE)
    for mask in (random_mask(2, 23, BLOCK_M + 9, 0.05), zeros):
        count, ids = block_chunk_schedule_triton(mask, 8)
        assert not (count == -12345).any() and not (ids == -12345).any()
    no_chunks = torch.zeros(2, 5, 0, dtype=torch.bool, device=TEST_DEVICE)
    count, _ = block_chunk_schedule_triton(no_chunks, 2)  # M = 0
    assert torch.all(count == 0)


@pytest.mark.parametrize("index", range(len(_CONFIGS)))
def test_every_config(index):
    """Config #index of the autotune list (force_triton_config): Lq=150 in partial query blocks,
    block_q larger than every BLOCK_Q, and 300 chunks (past one BLOCK_M tile of each config, with a
    partial last tile)."""
    with force_triton_config(KERNEL_NAME, index):
        for batch, seq_q, n_media, block_q, density in (
            (2, 150, 300, 40, 0.02),
            (1, 150, 300, 130, 0.005),
            (2, 37, 5, 16, 0.3),
        ):
            check(random_mask(batch, seq_q, n_media, density), block_q)


# --- the interpreter's bf16 tl.dot ----------------------------------------------------------------


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, SIZE: tl.constexpr):
    offs = tl.arange(0, SIZE)
    a = tl.load(a_ptr + offs[:, None] * SIZE + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * SIZE + offs[None, :])
    tl.store(c_ptr + offs[:, None] * SIZE + offs[None, :], tl.dot(a, b))


def _interpreted_dot_error(dtype: torch.dtype) -> float:
    size = 16
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    c = torch.full((size, size), float("nan"))
    _dot_kernel[(1,)](a, b, c, SIZE=size)
    expected = a.double() @ b.double()
    return ((c.double() - expected).norm() / expected.norm()).item()


@pytest.fixture
def restore_bf16_patch():
    was_applied = bf16_dot_patch_applied()
    yield
    (patch_interpreter_bf16_dot if was_applied else unpatch_interpreter_bf16_dot)()


@cpu_only
def test_interpreter_bf16_dot_is_wrong_unpatched_and_right_patched(restore_bf16_patch):
    unpatch_interpreter_bf16_dot()
    assert _interpreted_dot_error(torch.bfloat16) > 1e3  # products of the raw uint16 bits
    assert _interpreted_dot_error(torch.float16) < 1e-6  # other dtypes were right all along

    assert patch_interpreter_bf16_dot()
    assert not patch_interpreter_bf16_dot()  # idempotent
    # bf16 inputs are exact in fp32; what is left is the fp32 accumulation order.
    assert _interpreted_dot_error(torch.bfloat16) < 1e-6
    assert _interpreted_dot_error(torch.float16) < 1e-6
    assert _interpreted_dot_error(torch.float32) < 1e-6
