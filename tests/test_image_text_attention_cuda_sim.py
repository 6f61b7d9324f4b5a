"""image_text_attention's CUDA kernels (tensor-core prefill, split-KV decode + combine) run on the CPU by
the SIMT emulator (the cuda_sim backend, whose mma / ldmatrix / cp.async follow the PTX fragment layouts
lane by lane), against the float64 reference with the DESIGN §6 policy. float32 runs on 3xTF32, held
to the float32 tolerance (err <= 2 * torch fp32 error + 1e-5). With
VLMK_TEST_DEVICE=cuda (tests/devices.py) the same tests run the compiled kernels (the cuda backend) on
CUDA tensors.

The emulator runs every CUDA thread as a fiber, so the cases stay small; bigger ones are marked slow.
Outputs and the decode workspace come from ``at::empty``, which fills them with NaN here (deterministic
mode, see ``_poison_uninitialized``), so an element a kernel forgets to write fails the NaN check.
"""

from __future__ import annotations

import pytest
import torch

from tests.attention_testing import check_against_reference, make_case, random_media_mask
from tests.devices import ON_CUDA
from vlm_kernels._backends import _extension
from vlm_kernels.ops.image_text_attention import TABLE

DECODE_MAX_QUERY_LEN = (
    16  # kImageTextAttentionDecodeMaxQueryLen in csrc/cuda/image_text_attention.h
)


# The cuda_sim (or, on a GPU, cuda) entry of the op's kernel table (signature of
# vlm_kernels/ops/image_text_attention.py); test inputs are built on the test device.
BACKEND = "cuda" if ON_CUDA else "cuda_sim"
forward = TABLE.forward[BACKEND]
pytestmark = pytest.mark.usefixtures("tensors_on_test_device")


@pytest.fixture(autouse=True)
def _poison_uninitialized():
    """In deterministic mode ``at::empty`` fills float tensors with NaN: unwritten outputs show up."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


# (batch, Lq, Hq, Hkv, Dh, chunks, media_len, mask kind): together they cover Lq 1/7/33/97, media_len
# 1/17/64/65, 1-5 chunks, Hq/Hkv 4/4, 8/2, 8/1, Dh 64/80/96/128 and every mask kind. A block holds 64
# (query, head) rows (4 warps x one m16 tile) and K/V tiles of 32 keys (float32: 8).
SHAPES = [
    (1, 33, 4, 4, 64, 3, 17, "random"),
    (2, 7, 8, 2, 80, 5, 65, "random"),
    (1, 33, 8, 1, 128, 4, 64, "runs"),
    (1, 7, 8, 2, 64, 1, 65, "all"),
    (2, 33, 4, 4, 80, 2, 17, "none"),
    (1, 33, 8, 2, 128, 5, 17, "gappy"),
    (2, 7, 4, 4, 64, 5, 1, "random"),
    (1, 1, 8, 1, 80, 3, 64, "random"),
    (1, 7, 4, 2, 96, 2, 33, "random"),
    (1, 97, 2, 1, 96, 3, 17, "gappy"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _id(shape):
    batch, query_len, heads_q, heads_kv, head_dim, chunks, media_len, kind = shape
    return f"B{batch}-Lq{query_len}-H{heads_q}-{heads_kv}-D{head_dim}-M{chunks}x{media_len}-{kind}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_matches_reference(shape, dtype):
    *dims, kind = shape
    check_against_reference(make_case(*dims, dtype=dtype, mask_kind=kind), forward)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "none", "runs"])
@pytest.mark.parametrize("query_len", [7, 33])
def test_uniform_empty_rows(query_len, kind, dtype):
    """empty_rows="uniform": a row that sees no chunk attends to every key (Hugging Face Mllama)."""
    case = make_case(
        1, query_len, 8, 2, 64, 4, 17, dtype=dtype, mask_kind=kind, empty_rows="uniform"
    )
    check_against_reference(case, forward)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
def test_fused_qkv_strided_inputs(empty_rows, dtype):
    """q, k and v are strided slices of one fused [B, L, 3 * H, Dh] projection output."""
    case = make_case(2, 33, 4, 4, 80, 3, 17, dtype=dtype, fused_qkv=True, empty_rows=empty_rows)
    assert not case.q.is_contiguous()
    check_against_reference(case, forward)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_inputs_and_strided_mask(dtype):
    """Base pointers off 16-byte alignment (the kernels fall back to element loads) and a mask read
    through non-unit strides."""
    case = make_case(1, 33, 4, 2, 64, 5, 17, dtype=dtype)
    wide = torch.randn(1, 33, 4, 65).to(dtype)
    wide_kv = torch.randn(2, 85, 2, 65).to(dtype)
    wide[..., 1:] = case.q
    wide_kv[0, :, :, 1:] = case.k
    wide_kv[1, :, :, 1:] = case.v
    case.q, case.k, case.v = wide[..., 1:], wide_kv[0:1, :, :, 1:], wide_kv[1:2, :, :, 1:]
    assert case.q.data_ptr() % 16 != 0
    case.media_mask = case.media_mask.transpose(1, 2).contiguous().transpose(1, 2)
    assert case.media_mask.stride(2) != 1
    check_against_reference(case, forward)


@pytest.mark.parametrize("query_len", [1, 33])
def test_broadcast_mask(query_len):
    """A mask expanded from [1, 1, M] (stride 0 over batch and queries)."""
    case = make_case(3, query_len, 4, 2, 64, 4, 17)
    case.media_mask = torch.tensor([[[True, False, False, True]]]).expand(3, query_len, 4)
    check_against_reference(case, forward)


@pytest.mark.parametrize(
    ("heads_q", "heads_kv", "query_len"),
    [(6, 2, 33), (32, 1, 3), (32, 1, 20)],
    ids=["G3", "G32-decode", "G32-prefill"],
)
def test_query_head_groups_not_dividing_the_slot_tile(heads_q, heads_kv, query_len):
    """A block takes 16 (query, head) slots: groups of 3 straddle blocks, groups of 32 span two."""
    case = make_case(1, query_len, heads_q, heads_kv, 64, 3, 17, mask_kind="random")
    check_against_reference(case, forward)


@pytest.mark.parametrize("chunks", [130, 300])
def test_many_chunks_cross_the_chunk_window(chunks):
    """More chunks than the 128 a block tests at once, with runs that cross the window boundary."""
    case = make_case(1, 33, 4, 4, 64, chunks, 1, mask_kind="random")
    case.media_mask[:, 5, 120:140] = True
    check_against_reference(case, forward)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("logit_scale", [30.0, 300.0])
def test_large_logits(logit_scale, dtype):
    """Scores in the hundreds to thousands: the online softmax must not overflow."""
    case = make_case(1, 33, 4, 2, 64, 3, 65, dtype=dtype, logit_scale=logit_scale)
    out, lse = forward(case.q, case.k, case.v, case.media_mask, case.media_len, case.scale, "zero")
    assert not out.isnan().any() and not lse.isnan().any()
    check_against_reference(case, forward)


@pytest.mark.parametrize("query_len", [1, 7, 33])
def test_deterministic(query_len):
    case = make_case(2, query_len, 8, 2, 128, 5, 65, dtype=torch.bfloat16)
    args = (case.media_mask, case.media_len, case.scale, case.empty_rows)
    first = forward(case.q, case.k, case.v, *args)
    second = forward(case.q, case.k, case.v, *args)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("batch", "query_len", "heads_q", "heads_kv", "head_dim"),
    [(2, 1, 8, 2, 128), (1, 16, 8, 1, 64), (3, 1, 4, 4, 80), (1, 16, 8, 2, 128)],
    ids=["Lq1-G4", "Lq16-G8", "Lq1-MHA", "Lq16-G4"],
)
@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
def test_decode_split_kv(batch, query_len, heads_q, heads_kv, head_dim, empty_rows, dtype):
    """Lq <= 16 takes the split-KV decode path: a few hundred keys in splits of 32-key tiles (split
    edges inside media chunks), then the combine kernel."""
    assert query_len <= DECODE_MAX_QUERY_LEN
    case = make_case(
        batch, query_len, heads_q, heads_kv, head_dim, 5, 65, dtype=dtype, empty_rows=empty_rows
    )
    check_against_reference(case, forward)


@pytest.mark.parametrize("query_len", [1, 16])
def test_decode_single_split(query_len):
    """At most one 32-key tile: the decode kernel writes out/lse itself, without a workspace."""
    check_against_reference(make_case(2, query_len, 8, 2, 64, 2, 13), forward)


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize("query_len", [1, 7, 33])
def test_no_keys(query_len, empty_rows):
    """M = 0 (Lk = 0): zeros and lse -inf in both modes."""
    q = torch.randn(2, query_len, 4, 64)
    k = torch.randn(2, 0, 2, 64)
    mask = torch.zeros(2, query_len, 0, dtype=torch.bool)
    out, lse = forward(q, k, k, mask, 7, 0.125, empty_rows)
    assert torch.equal(out, torch.zeros_like(q))
    assert lse.shape == (2, 4, query_len) and (lse == float("-inf")).all()


@pytest.mark.parametrize("query_len", [1, 16, 33])
def test_chunks_nobody_sees_are_never_read(query_len):
    """NaN in the keys and values of a chunk that no query sees leaves the output bit-identical: the
    kernels skip the chunk instead of masking it (0 * NaN would be NaN)."""
    case = make_case(2, query_len, 8, 2, 64, 5, 17, mask_kind="random")
    hidden = 2
    case.media_mask[:, :, hidden] = False
    args = (case.media_mask, case.media_len, case.scale, "zero")
    want_out, want_lse = forward(case.q, case.k, case.v, *args)
    keys = slice(hidden * case.media_len, (hidden + 1) * case.media_len)
    k, v = case.k.clone(), case.v.clone()
    k[:, keys] = float("nan")
    v[:, keys] = float("nan")
    out, lse = forward(case.q, k, v, *args)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    check_against_reference(case, forward)


def test_bad_inputs():
    """The C++ glue's own checks (direct callers of vlm_kernels._C skip the Python validation)."""
    raw_forward = getattr(_extension()[0], f"image_text_attention_fwd_{BACKEND}")
    q = torch.randn(1, 4, 4, 64)
    k = torch.randn(1, 34, 2, 64)
    mask = torch.ones(1, 4, 2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="head dim Dh must be 64, 80, 96 or 128, got 32"):
        raw_forward(q[..., :32], k[..., :32], k[..., :32], mask, 17, 0.1, False)
    with pytest.raises(
        RuntimeError, match="Lk=34 keys but media_mask has M=2 chunks of media_len=16"
    ):
        raw_forward(q, k, k, mask, 16, 0.1, False)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        raw_forward(q, k.half(), k.half(), mask, 17, 0.1, False)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        raw_forward(q, k.transpose(1, 3).contiguous().transpose(1, 3), k, mask, 17, 0.1, False)
    with pytest.raises(RuntimeError, match="must be a multiple of Hkv=3"):
        raw_forward(q, torch.randn(1, 34, 3, 64), torch.randn(1, 34, 3, 64), mask, 17, 0.1, False)
    with pytest.raises(RuntimeError, match="media_mask must be bool"):
        raw_forward(q, k, k, mask.float(), 17, 0.1, False)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("query_len", [16, 97])
def test_larger_cases(query_len, dtype):
    """Lq 97 (prefill across several blocks) and decode with ~2000 keys; Dh 96."""
    case = make_case(2, query_len, 8, 2, 96, 4, 501, dtype=dtype, mask_kind="runs")
    check_against_reference(case, forward)


def test_random_masks_over_many_seeds():
    """Small random problems: every mask kind, both modes, prefill and decode lengths."""
    kinds = ["random", "runs", "all", "none", "gappy"]
    for trial in range(10):
        query_len = [1, 5, 16, 17, 40][trial % 5]
        case = make_case(
            1,
            query_len,
            4,
            2,
            64,
            1 + trial % 5,
            [1, 17, 33, 64, 65][trial // 2],
            mask_kind=kinds[trial % 5],
            empty_rows=["zero", "uniform"][trial % 2],
        )
        check_against_reference(case, forward)


def test_batches_with_different_masks():
    """One batch element per mask kind: each block reads its own batch's mask."""
    masks = [
        random_media_mask(1, 9, 3, kind) for kind in ["random", "runs", "all", "none", "gappy"]
    ]
    case = make_case(5, 9, 4, 1, 64, 3, 17)
    case.media_mask = torch.cat(masks)
    check_against_reference(case, forward)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("query_len", "heads_q", "heads_kv", "head_dim", "media_len"),
    [(97, 4, 1, 80, 1), (256, 2, 2, 96, 64), (7, 8, 8, 128, 65), (1, 4, 4, 80, 17)],
    ids=["Lq97-MQA-D80-ml1", "Lq256-MHA-D96-ml64", "Lq7-MHA-D128-ml65", "Lq1-D80-ml17"],
)
@pytest.mark.slow
def test_issue_shape_grid(query_len, heads_q, heads_kv, head_dim, media_len, dtype):
    """The issue's Lq {1, 7, 97, 256} x media_len {1, 17, 64, 65} x Dh 80/96 x GQA/MQA grid."""
    case = make_case(1, query_len, heads_q, heads_kv, head_dim, 4, media_len, dtype=dtype)
    check_against_reference(case, forward)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["MHA", "G2"])
def test_chunks_a_block_does_not_see_are_never_read(heads, dtype):
    """Lq 256 with the "runs" mask: every block of 64 (query, head) rows sees one chunk. NaN in the
    keys and values of chunk 2 makes the rows that see it NaN (they must) and leaves every other row
    bit-identical: other blocks never load the chunk (a masked load would give 0 * NaN = NaN in P V)."""
    heads_q, heads_kv = heads
    case = make_case(1, 256, heads_q, heads_kv, 64, 4, 33, dtype=dtype, mask_kind="runs")
    args = (case.media_mask, case.media_len, case.scale, "zero")
    want_out, want_lse = forward(case.q, case.k, case.v, *args)
    keys = slice(2 * case.media_len, 3 * case.media_len)
    k, v = case.k.clone(), case.v.clone()
    k[:, keys] = float("nan")
    v[:, keys] = float("nan")
    out, lse = forward(case.q, k, v, *args)
    sees = case.media_mask[0, :, 2]  # [Lq]
    assert out[0, sees].isnan().all()
    assert torch.equal(out[0, ~sees], want_out[0, ~sees])
    assert torch.equal(lse[0, :, ~sees], want_lse[0, :, ~sees])
    check_against_reference(case, forward)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("query_len", [1, 16])
def test_decode_splits_only_the_visible_keys(query_len, dtype):
    """Decode with a "last image" mask: 1 of 24 chunks visible, the rest NaN. The decode blocks split
    the visible key tiles among themselves (most of the planned splits get none and write an empty
    partial that the combine must ignore); a split over the whole key range would read NaN."""
    case = make_case(1, query_len, 8, 2, 128, 24, 40, dtype=dtype, mask_kind="all")
    case.media_mask[:] = False
    case.media_mask[..., -1] = True
    case.media_mask[:, 0, 20] = True  # one row sees one more chunk: two visible runs
    args = (case.media_mask, case.media_len, case.scale, "zero")
    want_out, want_lse = forward(case.q, case.k, case.v, *args)
    hidden = ~case.media_mask.any(1)[0].repeat_interleave(case.media_len)
    k, v = case.k.clone(), case.v.clone()
    k[:, hidden] = float("nan")
    v[:, hidden] = float("nan")
    out, lse = forward(case.q, k, v, *args)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    check_against_reference(case, forward)


def test_float32_error_is_fp32_level():
    """3xTF32: float32 inputs come out as close to the float64 reference as torch's own float32 (1xTF32
    would be ~1e-3). Measured here (all-visible, |out| <= 0.9): Dh 64 / 195 keys max 4.8e-7, RMS 4.7e-8
    (torch fp32 4.3e-7 / 4.3e-8); Dh 128 / 195 keys 5.3e-7 / 5.3e-8 (torch 8.9e-7 / 5.9e-8)."""
    from vlm_kernels.reference.image_text_attention import image_text_attention_reference

    case = make_case(1, 33, 4, 2, 128, 2, 65, mask_kind="all")
    out, _ = forward(case.q, case.k, case.v, case.media_mask, case.media_len, case.scale, "zero")
    ref = image_text_attention_reference(
        case.q.double(),
        case.k.double(),
        case.v.double(),
        case.media_mask,
        media_len=case.media_len,
        scale=case.scale,
    )
    assert (out.double() - ref).abs().max().item() < 1e-5
