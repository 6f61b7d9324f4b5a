"""block_chunk_schedule on every backend against the reference: the smallest real kernel, run by the C++
CPU path, the Triton interpreter and the CUDA source under the SIMT emulator (or, with
VLMK_TEST_DEVICE=cuda, by Triton and CUDA on the GPU)."""

import pytest
import torch

import vlm_kernels as vk
from tests.devices import backends_for

pytestmark = pytest.mark.usefixtures("tensors_on_test_device")
BACKENDS = backends_for("block_chunk_schedule", include_reference=False)


def _check(media_mask, block_q, backend):
    want_count, want_ids = vk.block_chunk_schedule(media_mask, block_q, backend="reference")
    count, ids = vk.block_chunk_schedule(media_mask, block_q, backend=backend)
    assert count.dtype == ids.dtype == torch.int32
    assert torch.equal(count, want_count), (count, want_count)
    assert torch.equal(ids, want_ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("batch", "query_len", "chunks", "block_q", "density"),
    [
        (2, 37, 5, 16, 0.3),  # Lq not a multiple of block_q
        (1, 1, 4, 16, 0.5),  # Lq = 1 (decode)
        (3, 64, 1, 64, 0.5),  # one chunk
        (2, 9, 300, 4, 0.02),  # M larger than a thread block / BLOCK_M tile, sparse
        (1, 130, 7, 1, 0.4),  # block_q = 1
    ],
)
def test_matches_reference(backend, batch, query_len, chunks, block_q, density):
    _check(torch.rand(batch, query_len, chunks) < density, block_q, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_visible_none_visible_and_strided(backend):
    _check(torch.ones(2, 20, 6, dtype=torch.bool), 8, backend)
    _check(torch.zeros(2, 20, 6, dtype=torch.bool), 8, backend)
    # A non-contiguous view: every other chunk of a wider mask, and a transposed layout.
    wide = torch.rand(2, 20, 12) < 0.3
    _check(wide[:, :, ::2], 8, backend)
    _check((torch.rand(2, 6, 20) < 0.3).transpose(1, 2), 8, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sizes(backend):
    for shape in [(0, 5, 3), (2, 0, 3), (2, 5, 0)]:
        count, ids = vk.block_chunk_schedule(
            torch.zeros(shape, dtype=torch.bool), 4, backend=backend
        )
        batch, query_len, chunks = shape
        assert count.shape == (batch, -(-query_len // 4))
        assert ids.shape == (batch, -(-query_len // 4), chunks)
        assert (count == 0).all()


def test_bad_inputs():
    with pytest.raises(TypeError, match="media_mask must have dtype in \\(bool\\)"):
        vk.block_chunk_schedule(torch.zeros(1, 2, 3), 4)
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        vk.block_chunk_schedule(torch.zeros(1, 2, 3, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="media_mask must have 3 dimensions"):
        vk.block_chunk_schedule(torch.zeros(2, 3, dtype=torch.bool), 4)
