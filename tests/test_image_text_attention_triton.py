"""The Triton image_text_attention kernels (forward, backward, split-KV decode) against the reference,
on CPU tensors through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 and patches the
interpreter's bf16 ``tl.dot``), or compiled on CUDA tensors with VLMK_TEST_DEVICE=cuda (tests/devices.py).
Tolerances: DESIGN §6 via tests/attention_testing.py.

The interpreter runs every program one after another in numpy, so shapes stay small; heavier cases are
marked ``slow``. Every kernel output buffer is poisoned with NaN at allocation (``poisoned_allocations``),
so an element a kernel forgets to write fails the comparison. Every autotune config of every kernel runs
in ``test_every_config_matches_reference`` (``force_triton_config``).
"""

import contextlib
import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from tests.attention_testing import (
    FLOOR,
    check_against_reference,
    make_case,
    random_media_mask,
)
from tests.devices import ON_CUDA, TEST_DEVICE

triton = pytest.importorskip("triton")
if not ON_CUDA and not triton.knobs.runtime.interpret:
    pytest.skip(
        "TRITON_INTERPRET=1 was not set before triton was imported", allow_module_level=True
    )

import vlm_kernels as vk  # noqa: E402
from vlm_kernels.reference._attention import masked_attention_backward  # noqa: E402
from vlm_kernels.reference.image_text_attention import (  # noqa: E402
    image_text_attention_reference,
    key_visibility,
)
from vlm_kernels.triton import image_text_attention as ita  # noqa: E402
from vlm_kernels.triton._launch import force_triton_config  # noqa: E402
from vlm_kernels.triton.aot import REGISTRY  # noqa: E402

# The op tests' cases, on the device under test.
make_case = functools.partial(make_case, device=TEST_DEVICE)


@contextlib.contextmanager
def poisoned_allocations():
    """``torch.empty`` / ``torch.empty_like`` give NaN-filled float tensors while active."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    torch.empty = lambda *a, **kw: poison(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def forward(q, k, v, media_mask, media_len, scale, empty_rows):
    """The kernel-table forward (decode path for Lq <= 16, else prefill)."""
    with poisoned_allocations():
        return ita.image_text_attention_fwd_triton(
            q, k, v, media_mask, media_len, scale, empty_rows
        )


def backward(grad_out, q, k, v, media_mask, out, lse, media_len, scale, empty_rows):
    with poisoned_allocations():
        return ita.image_text_attention_bwd_triton(
            grad_out, q, k, v, media_mask, out, lse, media_len, scale, empty_rows
        )


def backward_single_pass(grad_out, q, k, v, media_mask, out, lse, media_len, scale, empty_rows):
    """The opt-in single-pass backward (``deterministic=False``): dq by float32 atomics."""
    with poisoned_allocations():
        return ita.image_text_attention_bwd_triton(
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
            deterministic=False,
        )


def _outputs(q):
    batch, query_len, heads_q, _ = q.shape
    with poisoned_allocations():
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, heads_q, query_len), dtype=torch.float32, device=q.device)
    return out, lse


def prefill_forward(q, k, v, media_mask, media_len, scale, empty_rows):
    """The prefill kernel whatever Lq (the forward routes Lq <= 16 to the decode path)."""
    return split_prefill_forward(None)(q, k, v, media_mask, media_len, scale, empty_rows)


def split_prefill_forward(num_splits):
    """The prefill kernel whatever Lq, with its split-KV ``num_splits`` forced (None: the
    heuristic; above 1: partials merged by the prefill combine kernel)."""

    def run(q, k, v, media_mask, media_len, scale, empty_rows):
        out, lse = _outputs(q)
        with poisoned_allocations():
            ita._prefill_forward(
                q, k, v, media_mask, media_len, scale, empty_rows, out, lse, num_splits=num_splits
            )
        return out, lse

    return run


def decode_forward(num_splits=None):
    """The split-KV decode path whatever Lq, with ``num_splits`` forced (None: the heuristic)."""

    def run(q, k, v, media_mask, media_len, scale, empty_rows):
        out, lse = _outputs(q)
        with poisoned_allocations():
            ita._decode_forward(
                q, k, v, media_mask, media_len, scale, empty_rows, out, lse, num_splits
            )
        return out, lse

    return run


# ---- forward and backward against the reference ----------------------------------------------------

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (batch, Lq, Hq, Hkv, Dh, chunks, media_len, dtype, mask kind, empty_rows). A covering set rather than
# the full product (each case costs ~1-3 s in the interpreter): every dtype, Lq in {1, 7, 97},
# media_len in {1, 17, 64, 65}, 1-5 chunks, Hq/Hkv 4/4, 8/2, 8/1, Dh 64/80/128, every mask kind and
# both empty-row modes appear; Lq 1 and 7 take the decode path forward.
CASES = [
    (1, 97, 4, 4, 64, 3, 65, F32, "random", "zero"),
    (1, 97, 8, 2, 80, 2, 17, BF16, "random", "uniform"),
    (1, 97, 8, 1, 128, 2, 64, F16, "runs", "zero"),
    (1, 97, 8, 2, 128, 5, 17, F32, "gappy", "zero"),
    (2, 97, 4, 4, 64, 1, 64, BF16, "all", "zero"),
    (1, 97, 4, 4, 80, 3, 1, F32, "random", "uniform"),
    (1, 97, 8, 2, 64, 4, 17, F16, "none", "uniform"),
    (1, 97, 4, 4, 64, 2, 65, F32, "none", "zero"),
    (1, 97, 4, 4, 64, 4, 17, BF16, "runs", "uniform"),
    (1, 7, 8, 2, 64, 3, 65, BF16, "random", "zero"),
    (2, 1, 4, 4, 80, 5, 17, F32, "random", "uniform"),
    (1, 7, 8, 1, 128, 2, 64, F16, "runs", "uniform"),
    (1, 7, 4, 4, 64, 4, 1, F32, "gappy", "zero"),
    (2, 1, 8, 2, 64, 2, 65, F16, "none", "zero"),
]


def _case_id(case):
    batch, query_len, hq, hkv, dh, chunks, media_len, dtype, kind, empty = case
    name = str(dtype).replace("torch.", "")
    return f"{name}-B{batch}-Lq{query_len}-h{hq}/{hkv}-d{dh}-M{chunks}x{media_len}-{kind}-{empty}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_backward_match_reference(case):
    batch, query_len, hq, hkv, dh, chunks, media_len, dtype, kind, empty = case
    attention = make_case(
        batch,
        query_len,
        hq,
        hkv,
        dh,
        chunks,
        media_len,
        dtype=dtype,
        mask_kind=kind,
        empty_rows=empty,
    )
    check_against_reference(attention, forward, backward)


# The single pass on the cases whose dk/dv walk differs most: GQA 8/2 and 8/1 (dq of every head of
# the group from one program), empty rows of both modes, a partial key tile (17, 65), every dtype.
SINGLE_PASS_CASES = [CASES[i] for i in (0, 1, 2, 6)]


@pytest.mark.parametrize("case", SINGLE_PASS_CASES, ids=_case_id)
def test_single_pass_backward_matches_reference(monkeypatch, case):
    """``deterministic=False``: one dk/dv kernel that also adds dq by atomics, no dq kernel."""
    batch, query_len, hq, hkv, dh, chunks, media_len, dtype, kind, empty = case
    attention = make_case(
        batch,
        query_len,
        hq,
        hkv,
        dh,
        chunks,
        media_len,
        dtype=dtype,
        mask_kind=kind,
        empty_rows=empty,
    )
    launched = []

    def spy(name, *args, **kwargs):
        launched.append((name, kwargs.get("ATOMIC_DQ")))
        return launch(name, *args, **kwargs)

    launch = ita.launch
    monkeypatch.setattr(ita, "launch", spy)
    check_against_reference(attention, forward, backward_single_pass)
    backward_launches = [entry for entry in launched if "_bwd_" in entry[0]]
    assert backward_launches == [
        ("image_text_attention_bwd_preprocess", None),
        ("image_text_attention_bwd_fused", True),
    ]


def test_deterministic_algorithms_mode_keeps_the_two_passes(monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` a ``deterministic=False`` backward still
    runs the two deterministic passes; through the public function too, where ``deterministic``
    reaches the kernels (and the default keeps the two passes)."""
    import vlm_kernels as vk

    launched = []

    def spy(name, *args, **kwargs):
        launched.append(name)
        return launch(name, *args, **kwargs)

    launch = ita.launch
    monkeypatch.setattr(ita, "launch", spy)
    attention = make_case(1, 40, 4, 2, 64, 2, 17, dtype=F32)
    q, k, v = (x.clone().requires_grad_() for x in (attention.q, attention.k, attention.v))
    mask, media_len = attention.media_mask, attention.media_len

    def backward_kernels(**kwargs):
        launched.clear()
        out = vk.image_text_attention(
            q, k, v, mask, media_len=media_len, backend="triton", **kwargs
        )
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        return [name for name in launched if "_bwd_d" in name or "_bwd_fused" in name], grads

    two_pass = ["image_text_attention_bwd_dkdv", "image_text_attention_bwd_dq"]
    assert backward_kernels()[0] == two_pass
    single, single_grads = backward_kernels(deterministic=False)
    assert single == ["image_text_attention_bwd_fused"]
    schedule = vk.MediaSchedule(mask, media_len=media_len)
    launched.clear()
    out = vk.image_text_attention(q, k, v, schedule, backend="triton", deterministic=False)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert "image_text_attention_bwd_fused" in launched
    for first, second in zip(grads, single_grads, strict=True):
        torch.testing.assert_close(first, second)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert backward_kernels(deterministic=False)[0] == two_pass
    finally:
        torch.use_deterministic_algorithms(previous)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        vk.image_text_attention(q, k, v, mask, media_len=media_len, deterministic=None)


@pytest.mark.parametrize(
    "query_len, dtype, kind, empty",
    [(1, F32, "random", "zero"), (7, BF16, "gappy", "uniform"), (7, F16, "random", "zero")],
)
def test_prefill_kernel_at_decode_lengths(query_len, dtype, kind, empty):
    attention = make_case(
        1, query_len, 8, 2, 80, 3, 17, dtype=dtype, mask_kind=kind, empty_rows=empty
    )
    check_against_reference(attention, prefill_forward)


@pytest.mark.parametrize(
    "query_len, heads, chunks, media_len, dtype, num_splits",
    [
        (1, (4, 4), 4, 100, F32, None),
        (1, (8, 1), 5, 97, BF16, 3),
        (16, (8, 2), 4, 100, F32, 1),
        (16, (8, 2), 4, 100, F16, 7),
        (16, (8, 1), 3, 128, BF16, None),  # 128 rows of one kv group: two row blocks
        (16, (4, 4), 2, 65, BF16, 16),  # more splits than tiles: empty splits
    ],
    ids=lambda value: str(value).replace("torch.", ""),
)
def test_decode_path_matches_reference(query_len, heads, chunks, media_len, dtype, num_splits):
    """Split-KV decode over several hundred keys, each split count giving the same answer."""
    attention = make_case(
        2, query_len, *heads, 64, chunks, media_len, dtype=dtype, mask_kind="random"
    )
    check_against_reference(attention, decode_forward(num_splits))


@pytest.mark.parametrize(
    "query_len, chunks, media_len, dtype, kind, empty_rows, num_splits",
    [
        (97, 4, 65, F32, "random", "zero", 3),
        (97, 3, 17, BF16, "gappy", "uniform", 2),
        (40, 2, 37, F16, "runs", "zero", 16),  # more splits than a block's tiles: empty splits
        (33, 4, 17, F32, "none", "zero", 4),  # rows that see nothing: every split empty
    ],
    ids=lambda value: str(value).replace("torch.", ""),
)
def test_split_kv_prefill_matches_reference(
    query_len, chunks, media_len, dtype, kind, empty_rows, num_splits
):
    """The prefill forward split over the key tiles (partials, then the combine kernel) equals the
    reference, whatever the split count."""
    attention = make_case(
        1, query_len, 4, 2, 80, chunks, media_len, dtype=dtype, mask_kind=kind,
        empty_rows=empty_rows,
    )  # fmt: skip
    check_against_reference(attention, split_prefill_forward(num_splits))


def test_split_kv_prefill_only_when_the_grid_is_smaller_than_the_gpu(monkeypatch):
    """B * query blocks * Hq programs below the SM count: splits for two programs per SM, at least
    ~4 tiles of 64 keys each, at most 64; at or above the SM count: one pass."""
    monkeypatch.setattr(ita, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    assert ita._prefill_num_splits(132, 1000, cpu) == 1
    assert ita._prefill_num_splits(64, 1000, cpu) == 5  # ceil(264 / 64)
    assert ita._prefill_num_splits(1, 1000, cpu) == 64
    assert ita._prefill_num_splits(8, 10, cpu) == 3  # ceil(10 / 4): splits of >= 4 tiles
    launches = []
    real_launch = ita.launch

    def spy(name, kernel, configs, grid, args, **kw):
        launches.append((name, kw.get("SPLIT")))
        return real_launch(name, kernel, configs, grid, args, **kw)

    monkeypatch.setattr(ita, "launch", spy)
    # 1 x 33 rows x 4 heads: 4 query blocks of 32 x 4 heads... 16 programs < 132 SMs.
    attention = make_case(1, 33, 4, 2, 64, 3, 65, dtype=F32, mask_kind="random")
    check_against_reference(attention, prefill_forward)
    assert ("image_text_attention_fwd", True) in launches
    assert any(name == "image_text_attention_prefill_combine" for name, _ in launches)


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
def test_decode_path_matches_prefill_kernel(empty_rows):
    attention = make_case(1, 16, 8, 2, 64, 3, 65, mask_kind="random", empty_rows=empty_rows)
    args = (attention.q, attention.k, attention.v, attention.media_mask, 65, attention.scale)
    out_decode, lse_decode = decode_forward(3)(*args, empty_rows)
    out_prefill, lse_prefill = prefill_forward(*args, empty_rows)
    torch.testing.assert_close(out_decode, out_prefill, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_decode, lse_prefill, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "query_len, dtype",
    [(97, BF16), (97, F32), (7, F16)],
    ids=["prefill-bf16", "prefill-fp32", "decode-fp16"],
)
def test_fused_qkv_strided_inputs(query_len, dtype):
    attention = make_case(
        1, query_len, 4, 2, 64, 2, 65, dtype=dtype, fused_qkv=True, mask_kind="random"
    )
    assert not attention.q.is_contiguous() and attention.q.stride(-1) == 1
    check_against_reference(attention, forward, backward)


def test_strided_media_mask():
    attention = make_case(1, 97, 4, 4, 64, 3, 17, mask_kind="random")
    mask = torch.rand(1, 3, 97, device=TEST_DEVICE) < 0.5  # [B, M, Lq] storage, as [B, Lq, M]
    mask[:, :, 0] = False
    attention.media_mask = mask.transpose(1, 2)
    assert not attention.media_mask.is_contiguous()
    check_against_reference(attention, forward, backward)


@pytest.mark.parametrize(
    "query_len, dtype",
    [(97, F32), (97, BF16), (16, F16)],
    ids=["prefill-fp32", "prefill-bf16", "decode-fp16"],
)
def test_large_logits_do_not_overflow(query_len, dtype):
    attention = make_case(1, query_len, 4, 2, 64, 3, 17, dtype=dtype, logit_scale=30.0)
    check_against_reference(attention, forward, backward)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        (2, 256, 8, 2, 96, 4, 64, BF16, "runs", "zero"),
        (1, 256, 8, 8, 128, 5, 65, F32, "random", "uniform"),
        (2, 200, 8, 1, 80, 3, 129, F16, "gappy", "zero"),
    ],
    ids=_case_id,
)
def test_larger_shapes(case):
    batch, query_len, hq, hkv, dh, chunks, media_len, dtype, kind, empty = case
    attention = make_case(
        batch,
        query_len,
        hq,
        hkv,
        dh,
        chunks,
        media_len,
        dtype=dtype,
        mask_kind=kind,
        empty_rows=empty,
    )
    check_against_reference(attention, forward, backward)


# ---- determinism, skipping, edges ------------------------------------------------------------------


@pytest.mark.parametrize("query_len", [97, 7], ids=["prefill", "decode"])
def test_forward_and_backward_are_deterministic(query_len):
    attention = make_case(1, query_len, 4, 2, 64, 2, 65, dtype=BF16, mask_kind="random")
    args = (attention.media_mask, attention.media_len, attention.scale, attention.empty_rows)
    out, lse = forward(attention.q, attention.k, attention.v, *args)
    again = forward(attention.q, attention.k, attention.v, *args)
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])
    grad_out = torch.randn_like(out)
    grads = backward(grad_out, attention.q, attention.k, attention.v, args[0], out, lse, *args[1:])
    grads_again = backward(
        grad_out, attention.q, attention.k, attention.v, args[0], out, lse, *args[1:]
    )
    for first, second in zip(grads, grads_again, strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize(
    "query_len, empty_rows",
    [(97, "zero"), (97, "uniform"), (5, "zero")],
    ids=["prefill-zero", "prefill-uniform", "decode-zero"],
)
def test_invisible_chunks_are_never_loaded(query_len, empty_rows):
    """k and v of a chunk that no query sees are NaN: a kernel that loaded them, even under a mask,
    would spread the NaN (0 * NaN); the outputs must instead equal those of clean inputs bit for bit,
    and that chunk's dk, dv must be exactly 0."""
    chunks, media_len, hidden = 4, 33, 2
    attention = make_case(1, query_len, 4, 2, 64, chunks, media_len, dtype=BF16)
    mask = attention.media_mask
    mask[:, :, hidden] = False
    if empty_rows == "uniform":
        mask[:, :, 0] = True  # no empty row: it would see every chunk
    attention.empty_rows = empty_rows
    keys = slice(hidden * media_len, (hidden + 1) * media_len)
    poisoned_k, poisoned_v = attention.k.clone(), attention.v.clone()
    poisoned_k[:, keys] = float("nan")
    poisoned_v[:, keys] = float("nan")
    args = (mask, media_len, attention.scale, empty_rows)

    out, lse = forward(attention.q, attention.k, attention.v, *args)
    out_poisoned, lse_poisoned = forward(attention.q, poisoned_k, poisoned_v, *args)
    assert torch.equal(out, out_poisoned) and torch.equal(lse, lse_poisoned)
    check_against_reference(attention, forward)

    grad_out = torch.randn_like(out)
    dq, dk, dv = backward(
        grad_out, attention.q, attention.k, attention.v, mask, out, lse, *args[1:]
    )
    grads = backward(grad_out, attention.q, poisoned_k, poisoned_v, mask, out, lse, *args[1:])
    assert torch.equal(dq, grads[0])
    for clean, poisoned in ((dk, grads[1]), (dv, grads[2])):
        assert torch.equal(poisoned[:, keys], torch.zeros_like(poisoned[:, keys]))
        assert torch.equal(clean, poisoned)


def test_query_blocks_visit_only_their_chunks(monkeypatch):
    """The forward walks the schedule of its own query blocks: with the Mllama "runs" mask each block
    gets only the chunks its rows see (the poison test proves the kernel loads nothing else)."""
    seen = []

    def spy(media_mask, block_q):
        result = schedule(media_mask, block_q)
        seen.append((block_q, *result))
        return result

    schedule = ita.block_chunk_schedule_triton
    monkeypatch.setattr(ita, "block_chunk_schedule_triton", spy)
    # bf16: query blocks of 64 rows; runs of 32 rows, so each block sees two of the four chunks.
    attention = make_case(1, 128, 4, 4, 64, 4, 17, dtype=BF16, mask_kind="runs")
    check_against_reference(attention, forward)
    block_q, chunk_count, chunk_ids = seen[0]
    assert block_q == ita._TILES[2].fwd_block_m[0] == 64
    assert chunk_count.tolist() == [[2, 2]]
    assert chunk_ids[0, :, :2].tolist() == [[0, 1], [2, 3]]


def test_block_heuristics_pick_fa2_tiles_when_the_grid_is_large(monkeypatch):
    """On a GPU (faked: 4 SMs) each launcher takes its larger tile (16-bit: forward and dq query
    blocks of 128 rows, dk/dv programs of 128 keys) when that still gives every SM two programs, else
    the smaller; a forced config brings its own block; ``schedule_blocks`` names what the launchers
    run, so a MediaSchedule hands over matching schedules."""
    monkeypatch.setattr(ita, "_interpreting", lambda: False)
    monkeypatch.setattr(ita, "_sm_count", lambda device: 4)
    big_q = torch.zeros(1, 512, 4, 64, dtype=BF16)  # 4 heads x 4 blocks of 128 rows: 16 programs
    small_q = torch.zeros(1, 130, 2, 64, dtype=BF16)  # 2 heads x 2 blocks of 128 rows: 4 programs
    many_keys = torch.zeros(1, 2 * 577, 2, 64, dtype=BF16)  # 2 heads x 2 chunks x 5 tiles of 128
    few_keys = torch.zeros(1, 2 * 37, 1, 64, dtype=BF16)  # 1 head x 2 chunks x 1 tile of 128
    assert ita.schedule_blocks(big_q, many_keys, 577) == (128, 128, 16)
    assert ita.schedule_blocks(small_q, few_keys, 37) == (64, 64, 32)
    assert ita.schedule_blocks(big_q)[2] == 32  # keys unknown: the first dk/dv block
    dkdv = ita._kernel_configs(ita._TILES[2])["image_text_attention_bwd_dkdv"]
    last = len(dkdv) - 1
    assert dkdv[last].kwargs == {"BLOCK_M": 16, "BLOCK_N": 128} and dkdv[last].num_warps == 8
    with force_triton_config("image_text_attention_bwd_dkdv", 0):
        assert ita.schedule_blocks(big_q, many_keys, 577)[2] == 32
    with force_triton_config("image_text_attention_bwd_dq", 4):  # the first 128-row dq config
        assert ita.schedule_blocks(small_q, few_keys, 37)[1] == 128
    f32 = torch.zeros(1, 512, 4, 64)
    assert ita.schedule_blocks(f32, many_keys.float(), 577) == (32, 32, 16)  # one block each
    # The single pass's lists hold the dk/dv blocks and take the two-pass heuristic's: the same
    # transposed schedule serves both; a forced single-pass config brings its own block.
    for width in (2, 4):
        assert list(ita._FUSED_CONFIGS[width]) == list(ita._DKDV_CONFIGS[width])
    for keys, media_len in ((many_keys, 577), (few_keys, 37)):
        fused = ita._dkdv_block(big_q, keys, media_len, "image_text_attention_bwd_fused")
        assert fused == ita.schedule_blocks(big_q, keys, media_len)[2]
    with force_triton_config("image_text_attention_bwd_fused", 0):
        fused = ita._dkdv_block(big_q, many_keys, 577, "image_text_attention_bwd_fused")
        assert fused == 32 and ita.schedule_blocks(big_q, many_keys, 577)[2] == 16


def test_heaviest_first_orders_query_blocks_by_visible_chunks():
    counts = torch.tensor([[1, 3, 2], [3, 0, 1]], dtype=torch.int32, device=TEST_DEVICE)
    order = ita.heaviest_first(counts)
    assert order.dtype == torch.int32 and order.device == counts.device
    assert order.tolist() == [1, 3, 2, 0, 5, 4]  # ties keep index order


def test_forward_launches_heaviest_query_blocks_first(monkeypatch):
    """A cumulative mask (row t sees the chunks of the images before it): the last query blocks see
    the most chunks, and the forward hands the kernel the (batch, block) pairs heaviest first, sorted
    on the device from the schedule's counts; the result still matches the reference."""
    passed = []

    def spy(name, kernel, configs, grid, args, **kwargs):
        if name == "image_text_attention_fwd":
            chunk_count, order = args[4], args[6]
            passed.append((chunk_count.clone(), order.clone(), grid(kwargs)))
        return launch(name, kernel, configs, grid, args, **kwargs)

    launch = ita.launch
    monkeypatch.setattr(ita, "launch", spy)
    attention = make_case(2, 200, 2, 1, 64, 4, 9, dtype=BF16)
    rows = torch.arange(200, device=TEST_DEVICE)
    cumulative = torch.arange(4, device=TEST_DEVICE)[None, :] <= rows[:, None] // 50
    attention.media_mask[:] = cumulative
    attention.media_mask[1, :, 3] = False  # the second sequence: three images
    check_against_reference(attention, forward)
    chunk_count, order, grid = passed[0]
    n_qb = chunk_count.shape[1]
    assert grid == (2 * n_qb * 2, 1)  # B * nQB * Hq programs; one split (16 programs >= 2 SMs)
    flat = chunk_count.flatten()
    assert sorted(order.tolist()) == list(range(2 * n_qb))
    assert (flat[order.long()].diff() <= 0).all()
    # Blocks of 64 rows: rows 128-191 and 192-199 of the first sequence see all four images (ties
    # keep index order); the first sequence's first block (two images) ranks after the second's
    # last blocks (three).
    assert n_qb == 4 and order[:2].tolist() == [2, 3]
    assert order.tolist().index(0) > order.tolist().index(n_qb + 2)


def test_block_visibility_and_transposed_schedule():
    mask = random_media_mask(2, 70, 5).to(TEST_DEVICE)
    mask[1, 32:64] = False  # block 1 of batch 1 sees nothing
    visible = ita._block_visibility(mask, 32)
    padded = torch.zeros(2, 96, 5, dtype=torch.bool, device=TEST_DEVICE)
    padded[:, :70] = mask
    assert torch.equal(visible, padded.view(2, 3, 32, 5).any(2))
    qb_count, qb_ids = ita.block_chunk_schedule_triton(visible.transpose(1, 2), 1)
    for b in range(2):
        for m in range(5):
            expected = visible[b, :, m].nonzero().flatten().tolist()
            assert qb_count[b, m].item() == len(expected)
            assert qb_ids[b, m, : len(expected)].tolist() == expected


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize("query_len", [97, 3], ids=["prefill", "decode"])
def test_no_keys(query_len, empty_rows):
    q = torch.randn(1, query_len, 4, 64, device=TEST_DEVICE)
    k = v = torch.randn(1, 0, 2, 64, device=TEST_DEVICE)
    mask = torch.zeros(1, query_len, 0, dtype=torch.bool, device=TEST_DEVICE)
    out, lse = forward(q, k, v, mask, 17, 0.125, empty_rows)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))
    dq, dk, dv = backward(torch.randn_like(out), q, k, v, mask, out, lse, 17, 0.125, empty_rows)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape


def test_no_queries():
    q = torch.randn(2, 0, 4, 64, device=TEST_DEVICE)
    k = v = torch.randn(2, 34, 4, 64, device=TEST_DEVICE)
    mask = torch.zeros(2, 0, 2, dtype=torch.bool, device=TEST_DEVICE)
    out, lse = forward(q, k, v, mask, 17, 0.125, "zero")
    assert out.shape == q.shape and lse.shape == (2, 4, 0)
    dq, dk, dv = backward(out, q, k, v, mask, out, lse, 17, 0.125, "zero")
    assert dq.shape == q.shape
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


def test_rejects_what_it_cannot_run():
    q = torch.randn(1, 4, 2, 64, dtype=torch.float64, device=TEST_DEVICE)
    mask = torch.ones(1, 4, 1, dtype=torch.bool, device=TEST_DEVICE)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        ita.image_text_attention_fwd_triton(q, q, q, mask, 4, 0.125, "zero")
    q = torch.randn(1, 4, 2, 256, device=TEST_DEVICE)
    with pytest.raises(ValueError, match="head dim Dh=256"):
        ita.image_text_attention_fwd_triton(q, q, q, mask, 4, 0.125, "zero")
    q = torch.randn(1, 4, 2, 64, device=TEST_DEVICE)
    with pytest.raises(ValueError, match="empty_rows"):
        ita.image_text_attention_fwd_triton(q, q, q, mask, 4, 0.125, "ones")


# ---- every autotune config -------------------------------------------------------------------------


def _width_config_count(width: int) -> int:
    """The longest config list among the kernels for inputs of ``width`` bytes."""
    return max(len(configs) for configs in ita._kernel_configs(ita._TILES[width]).values())


CONFIG_CASES = [(width, index) for width in (2, 4) for index in range(_width_config_count(width))]


@contextlib.contextmanager
def every_kernel_at_config(width: int, index: int):
    """Every image_text_attention kernel forced to config #index of its list for ``width`` (a shorter
    list runs its last config)."""
    with contextlib.ExitStack() as stack:
        for name in ita._kernel_configs(ita._TILES[width]):
            stack.enter_context(force_triton_config(name, index))
        yield


def _check_with_poisoned_chunk(attention, hidden: int, forward_fn, backward_fn=None) -> None:
    """``attention`` against the reference; then its chunk ``hidden`` (seen by no row) poisoned with
    NaN in k and v must leave every output bit for bit as it was, and that chunk's dk, dv at 0."""
    check_against_reference(attention, forward_fn, backward_fn)
    media_len = attention.media_len
    keys = slice(hidden * media_len, (hidden + 1) * media_len)
    poisoned_k, poisoned_v = attention.k.clone(), attention.v.clone()
    poisoned_k[:, keys] = float("nan")
    poisoned_v[:, keys] = float("nan")
    args = (attention.media_mask, media_len, attention.scale, attention.empty_rows)
    out, lse = forward_fn(attention.q, attention.k, attention.v, *args)
    out_poisoned, lse_poisoned = forward_fn(attention.q, poisoned_k, poisoned_v, *args)
    assert torch.equal(out, out_poisoned) and torch.equal(lse, lse_poisoned)
    if backward_fn is None:
        return
    grad_out = torch.randn_like(out)
    clean = backward_fn(
        grad_out, attention.q, attention.k, attention.v, args[0], out, lse, *args[1:]
    )
    grads = backward_fn(grad_out, attention.q, poisoned_k, poisoned_v, args[0], out, lse, *args[1:])
    for name, first, second in zip(("dq", "dk", "dv"), clean, grads, strict=True):
        assert torch.equal(first, second), f"{name} changed with an invisible chunk poisoned"
    assert not grads[1][:, keys].any() and not grads[2][:, keys].any()


@pytest.mark.parametrize(
    "width, index",
    CONFIG_CASES,
    ids=[f"{'fp32' if width == 4 else '16bit'}-config{index}" for width, index in CONFIG_CASES],
)
def test_every_config_matches_reference(width, index):
    """Each kernel at config #index (``force_triton_config``), on cases that put every mask of the
    kernels to work at every tile size: Lq=150 (a partial query block at BLOCK_M 32/64/128), 37 keys
    per chunk (a partial key tile at every BLOCK_N), Dh=80 (a partial BLOCK_D), GQA, a row that sees
    nothing (empty_rows alternates), a chunk no row sees poisoned with NaN ("zero" mode), and the
    split-KV decode with 9 x 4 rows (row blocks of 32 and 64) over three splits. The backward runs
    twice: the two deterministic passes and the single pass with atomic dq."""
    dtype = F32 if width == 4 else (BF16, F16)[index % 2]
    empty_rows = ("zero", "uniform")[index % 2]
    hidden = 2
    with every_kernel_at_config(width, index):
        prefill = make_case(1, 150, 4, 2, 80, 4, 37, dtype=dtype, empty_rows=empty_rows)
        decode = make_case(1, 9, 8, 2, 80, 4, 37, dtype=dtype, empty_rows=empty_rows)
        single_pass = make_case(1, 150, 4, 2, 80, 4, 37, dtype=dtype, empty_rows=empty_rows)
        split_prefill = make_case(1, 150, 4, 2, 80, 4, 37, dtype=dtype, empty_rows=empty_rows)
        for attention, forward_fn, backward_fn in (
            (prefill, forward, backward),
            (single_pass, forward, backward_single_pass),
            (decode, decode_forward(3), None),
            (split_prefill, split_prefill_forward(3), None),
        ):
            if empty_rows == "uniform":  # an empty row sees every chunk: nothing is hidden
                check_against_reference(attention, forward_fn, backward_fn)
                continue
            attention.media_mask[:, :, hidden] = False
            _check_with_poisoned_chunk(attention, hidden, forward_fn, backward_fn)


# ---- the forward's spanning tiles ----------------------------------------------------------------------
# For 16-bit inputs and M <= 32 the forward and decode kernels read a query block's visible chunks as
# one virtual key sequence cut into tiles of BLOCK_N keys (SPAN_TILES): a tile may straddle chunks, and
# runs with gaps between them, each key checked against its row's chunk bits. Beyond 32 chunks, and
# for float32, they keep the chunk-aligned walk. The cases below put chunk boundaries inside tiles at
# every place: media_len 5 (a 32-key tile holds parts of up to 8 chunks), 37 and 129 (not multiples
# of any BLOCK_N).


def cumulative_mask(batch: int, query_len: int, chunks: int) -> torch.Tensor:
    """[B, Lq, M]: row t sees chunks 0 .. t * M // Lq (OpenFlamingo's every-previous-image mask)."""
    last = torch.arange(query_len) * chunks // query_len
    return (torch.arange(chunks) <= last[:, None]).expand(batch, query_len, chunks).clone()


def walk_forward(span_tiles=None, num_splits=None):
    """The forward (decode path for Lq <= 16, else prefill) with the walk forced (``span_tiles``:
    None picks by M) and the split count forced (None: the heuristic)."""

    def run(q, k, v, media_mask, media_len, scale, empty_rows):
        out, lse = _outputs(q)
        decode = q.shape[1] <= ita.DECODE_MAX_QUERY_LEN
        path = ita._decode_forward if decode else ita._prefill_forward
        with poisoned_allocations():
            path(
                q, k, v, media_mask, media_len, scale, empty_rows, out, lse,
                num_splits=num_splits, span_tiles=span_tiles,
            )  # fmt: skip
        return out, lse

    return run


def _span_case(batch, query_len, heads, head_dim, chunks, media_len, dtype, kind):
    kinds = ("random", "runs", "all", "gappy")
    attention = make_case(
        batch, query_len, *heads, head_dim, chunks, media_len, dtype=dtype,
        mask_kind=kind if kind in kinds else "random",
    )  # fmt: skip
    if kind == "cumulative":
        attention.media_mask = cumulative_mask(batch, query_len, chunks).to(TEST_DEVICE)
    elif kind == "1of4":  # each row sees one chunk in four, runs of rows taking turns
        rows = torch.arange(query_len)[:, None] * 4 // query_len
        chunk_mask = (torch.arange(chunks) % 4 == rows).expand(batch, query_len, chunks).clone()
        attention.media_mask = chunk_mask.to(TEST_DEVICE)
    return attention


# (batch, Lq, (Hq, Hkv), Dh, M, media_len, dtype, mask kind, splits): the first config runs (bf16
# prefill BLOCK_N=32, float32 32, decode 32/16); Lq <= 16 takes the decode path.
SPAN_CASES = [
    (1, 97, (4, 2), 80, 7, 5, BF16, "random", None),  # a tile holds up to 8 chunks' keys
    (1, 61, (4, 2), 64, 5, 37, F16, "gappy", 3),  # every other chunk: runs with gaps, split
    (1, 97, (4, 4), 64, 4, 129, F16, "1of4", None),
    (1, 45, (4, 2), 80, 6, 37, BF16, "cumulative", 2),
    (2, 33, (4, 2), 64, 1, 37, BF16, "all", None),  # M = 1
    (1, 1, (8, 2), 80, 6, 37, BF16, "random", None),  # Lq = 1 (decode)
    (1, 7, (8, 2), 64, 5, 5, F16, "cumulative", 3),  # decode, split
    (1, 33, (4, 2), 64, 32, 3, BF16, "random", None),  # M = 32: chunk 31 is the bits' sign bit
    (1, 5, (4, 2), 64, 32, 3, F16, "random", 2),  # ... on the decode path
    (1, 33, (2, 1), 64, 33, 3, BF16, "gappy", 2),  # M = 33: the chunk-aligned walk
    (1, 61, (4, 2), 64, 5, 37, F32, "gappy", 3),  # float32: the chunk-aligned walk
]


@pytest.mark.parametrize(
    "case", SPAN_CASES, ids=lambda case: "-".join(str(x).replace("torch.", "") for x in case)
)
def test_spanning_tiles_match_reference(monkeypatch, case):
    *shape, dtype, kind, num_splits = case
    attention = _span_case(*shape, dtype, kind)
    launched = []
    real_launch, real_named_launch = ita.launch, ita._launch

    def spy(name, kernel, configs, grid, args, **kw):
        launched.append(kw.get("SPAN_TILES"))
        return real_launch(name, kernel, configs, grid, args, **kw)

    def named_spy(name, kernel, tiles, grid, args, **kw):
        launched.append(kw.get("SPAN_TILES"))
        return real_named_launch(name, kernel, tiles, grid, args, **kw)

    monkeypatch.setattr(ita, "launch", spy)
    monkeypatch.setattr(ita, "_launch", named_spy)
    check_against_reference(attention, walk_forward(num_splits=num_splits))
    # The walk M and the dtype pick.
    assert launched[0] is (attention.media_mask.shape[2] <= 32 and dtype != F32)


def test_chunk_bits():
    """One int32 per row, bit m for chunk m, up to 32 chunks (chunk 31 the sign bit); None beyond.
    A MediaSchedule builds them from its kernel mask, once."""
    from vlm_kernels.ops.media_schedule import chunk_bits

    mask = torch.rand(2, 9, 32, device=TEST_DEVICE) < 0.5
    mask[0, 0] = True
    bits = chunk_bits(mask)
    assert bits.dtype == torch.int32 and bits.shape == (2, 9)
    assert bits[0, 0].item() == -1 and torch.equal(bits < 0, mask[:, :, 31])
    chunk = torch.arange(32, device=TEST_DEVICE, dtype=torch.int32)
    decoded = ((bits[:, :, None] >> chunk) & 1) != 0  # the kernels' test
    assert torch.equal(decoded, mask)
    assert chunk_bits(mask[:, :, :5]).tolist() == (
        (mask[:, :, :5].long() * 2 ** torch.arange(5, device=TEST_DEVICE)).sum(-1).tolist()
    )
    assert chunk_bits(torch.ones(1, 3, 33, dtype=torch.bool)) is None
    empty = torch.zeros(1, 3, 5, dtype=torch.bool, device=TEST_DEVICE)
    empty[0, 1, 2] = True
    schedule = vk.MediaSchedule(empty, media_len=4, empty_rows="uniform")
    assert schedule.chunk_bits().tolist() == [[31, 4, 31]]  # rows that see nothing see all
    assert schedule.chunk_bits() is schedule.chunk_bits()
    many = vk.MediaSchedule(torch.ones(1, 3, 33, dtype=torch.bool), media_len=1)
    assert many.chunk_bits() is None


def test_span_walk_choice_and_tile_counts():
    """The walk (spanning for 16-bit inputs and M <= 32) and its tile count: a run of n chunks of
    577 keys takes ceil(577 n / 128) tiles of 128 instead of 5 n."""
    mask = torch.ones(1, 3, 32, dtype=torch.bool)
    span, bits = ita._span_walk(mask, BF16, None, None)
    assert span and bits.shape == (1, 3) and bits.dtype == torch.int32
    assert ita._span_walk(mask, BF16, bits, None)[1] is bits  # a schedule's bits are read as given
    assert ita._span_walk(mask, BF16, None, False) == (False, None)
    assert ita._span_walk(mask, F32, None, None) == (False, None)
    assert ita._span_walk(torch.ones(1, 3, 33, dtype=torch.bool), F16, None, None) == (False, None)
    with pytest.raises(ValueError, match="M <= 32"):
        ita._span_walk(torch.ones(1, 3, 33, dtype=torch.bool), BF16, None, True)
    assert ita._max_walk_tiles(1, 577, span=False, block_n=128) == 5
    assert ita._max_walk_tiles(4, 577, span=False, block_n=128) == 20
    assert ita._max_walk_tiles(4, 577, span=True, block_n=128) == 19
    assert ita._max_walk_tiles(4, 5, span=True, block_n=128) == 1


def test_spanning_tiles_skip_invisible_chunks():
    """Chunks that no row sees, between visible ones (gaps inside what a tile would cover), are
    poisoned with NaN: the spanning walk at BLOCK_N=128 (a tile spans ~3 chunks of 37 keys), one
    pass, split and decode, gives bit for bit the clean inputs' outputs (every config:
    test_every_config_matches_reference)."""
    chunks, media_len, hidden = 7, 37, [1, 4, 5]
    for query_len, num_splits in ((70, None), (40, 3), (9, 2)):
        attention = make_case(1, query_len, 2, 1, 64, chunks, media_len, dtype=BF16)
        attention.media_mask[:, :, hidden] = False
        keys = torch.cat([torch.arange(m * media_len, (m + 1) * media_len) for m in hidden])
        poisoned_k, poisoned_v = attention.k.clone(), attention.v.clone()
        poisoned_k[:, keys] = float("nan")
        poisoned_v[:, keys] = float("nan")
        args = (attention.media_mask, media_len, attention.scale, "zero")
        forward_fn = walk_forward(num_splits=num_splits)
        # bf16 forward config 2: (128, 8, 1) at BLOCK_M=64; the decode path's 128-key config: 3.
        with (
            force_triton_config("image_text_attention_fwd", 2),
            force_triton_config("image_text_attention_decode_split", 3),
        ):
            out, lse = forward_fn(attention.q, attention.k, attention.v, *args)
            poisoned = forward_fn(attention.q, poisoned_k, poisoned_v, *args)
            assert torch.equal(out, poisoned[0]) and torch.equal(lse, poisoned[1])
            check_against_reference(attention, forward_fn)


# 16-bit configs with each walk forced; float32 configs with theirs (the chunk-aligned walk).
FWD_CONFIG_CASES = [
    (width, index, span)
    for width, spans in ((2, (True, False)), (4, (None,)))
    for index in range(len(ita._kernel_configs(ita._TILES[width])["image_text_attention_fwd"]))
    for span in spans
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "width, index, span_tiles",
    FWD_CONFIG_CASES,
    ids=[
        f"{'fp32' if width == 4 else '16bit'}-config{index}-{ {True: 'span', False: 'aligned', None: 'own'}[span] }"
        for width, index, span in FWD_CONFIG_CASES
    ],
)
def test_every_forward_config_walks_spanning_tiles(width, index, span_tiles):
    """Each forward config (and the decode kernel at the same index), one pass and split, on chunks
    of 5 and 129 keys (tiles that straddle many chunks, and chunks longer than a tile), odd Lq,
    Dh=80, a cumulative mask, a 1-of-4 mask and a random one; each walk forced."""
    dtype = F32 if width == 4 else (BF16, F16)[index % 2]
    shapes = ((75, 9, 5, "cumulative"), (41, 4, 129, "1of4"), (9, 6, 5, "random"))
    with every_kernel_at_config(width, index):
        for query_len, chunks, media_len, kind in shapes:
            attention = _span_case(1, query_len, (4, 2), 80, chunks, media_len, dtype, kind)
            for num_splits in (1, 3):
                check_against_reference(attention, walk_forward(span_tiles, num_splits))


# ---- float32 input precision -------------------------------------------------------------------------
# The interpreter computes every tl.dot in float32 numpy, whatever ``input_precision`` says, so the
# float32 precision choice (ita._TILES[4]) cannot be seen in the kernels' outputs here. What the choice
# implies can: the products a tensor core computes for each setting, emulated in torch. "tf32" rounds
# both operands to TF32 (10 mantissa bits) once; "tf32x3" splits each operand into a TF32 high part and
# a TF32 low part (the rounding error) and sums the three largest products; "ieee" multiplies in
# float32 with FMA (what the interpreter does, so the backward's choice is also what the other tests
# execute). On a GPU the same tests run the real instructions (VLMK_TEST_DEVICE=cuda).


def _round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    bits = x.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF  # round to nearest even, 13 bits dropped
    return bits.view(torch.float32)


def _matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    if precision == "ieee":
        return a @ b
    a_hi, b_hi = _round_to_tf32(a), _round_to_tf32(b)
    if precision == "tf32":
        return a_hi @ b_hi
    assert precision == "tf32x3", precision
    a_lo, b_lo = _round_to_tf32(a - a_hi), _round_to_tf32(b - b_hi)
    return a_hi @ b_lo + a_lo @ b_hi + a_hi @ b_hi


def _emulated_attention(q, k, v, visible, grad_out, fwd_precision, bwd_precision):
    """out and (dq, dk, dv) of softmax(q k^T / sqrt(Dh) | visible) v, [H, L, Dh] operands, with the
    kernels' dots at the given precisions (softmax, sums and the rest in the operands' dtype)."""
    scale = q.shape[-1] ** -0.5
    scores = _matmul(q, k.transpose(-1, -2), fwd_precision) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = _matmul(probs, v, fwd_precision)
    delta = (grad_out * out).sum(-1, keepdim=True)
    d_scores = probs * (_matmul(grad_out, v.transpose(-1, -2), bwd_precision) - delta)
    dq = _matmul(d_scores, k, bwd_precision) * scale
    dk = _matmul(d_scores.transpose(-1, -2), q, bwd_precision) * scale
    dv = _matmul(probs.transpose(-1, -2), grad_out, bwd_precision)
    return out, (dq, dk, dv)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_float32_dot_precision_choice(head_dim):
    """The float32 forward needs 3xTF32 and the backward FMA: at Dh=128 one TF32 rounding leaves an
    error of ~5e-4 (measured: 5.0e-4 to 5.7e-4 on the forward, 40x the float32 bound of DESIGN §6,
    2 * ~9e-7 + 1e-5), while 3xTF32 and FMA stay at ~1e-6, as float32 torch does."""
    tiles = ita._TILES[4]
    assert (tiles.fwd_precision, tiles.bwd_precision) == ("tf32x3", "ieee")
    heads, query_len, keys = 4, 97, 130
    q, k, v, grad_out = (
        torch.randn(heads, n, head_dim) for n in (query_len, keys, keys, query_len)
    )
    visible = torch.rand(1, query_len, keys) < 0.5
    visible[..., 0] = True
    exact = _emulated_attention(
        *(t.double() for t in (q, k, v)), visible, grad_out.double(), "ieee", "ieee"
    )
    torch_fp32 = _emulated_attention(q, k, v, visible, grad_out, "ieee", "ieee")

    def within_bound(fwd_precision, bwd_precision):
        ours = _emulated_attention(q, k, v, visible, grad_out, fwd_precision, bwd_precision)
        verdicts = []
        for name, x, yardstick, ref in zip(
            ("out", "dq", "dk", "dv"),
            (ours[0], *ours[1]),
            (torch_fp32[0], *torch_fp32[1]),
            (exact[0], *exact[1]),
            strict=True,
        ):
            err = (x.double() - ref).abs().max().item()
            bound = 2 * (yardstick.double() - ref).abs().max().item() + FLOOR[torch.float32]
            verdicts.append((name, err <= bound, err, bound))
        return verdicts

    chosen = within_bound(tiles.fwd_precision, tiles.bwd_precision)
    assert all(ok for _, ok, _, _ in chosen), chosen
    one_pass_forward = within_bound("tf32", tiles.bwd_precision)
    assert not one_pass_forward[0][1], one_pass_forward  # out: TF32 is not enough
    one_pass_backward = within_bound(tiles.fwd_precision, "tf32")
    assert not any(ok for _, ok, _, _ in one_pass_backward[1:]), one_pass_backward


@contextlib.contextmanager
def _matmul_precision(setting: str):
    """PyTorch's float32 matmul precision set one of the ways a user sets it, restored after (through
    the new API's getter and setter, which never mix with the legacy one)."""
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.fp32_precision
    if setting == "set_float32_matmul_precision":
        torch.set_float32_matmul_precision("high")
    elif setting == "matmul.fp32_precision":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    elif setting == "backends.fp32_precision":
        torch.backends.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.fp32_precision = saved


@pytest.mark.parametrize(
    "setting",
    ["default", "set_float32_matmul_precision", "matmul.fp32_precision", "backends.fp32_precision"],
)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_float32_backward_honours_pytorch_tf32_setting(monkeypatch, setting, dtype):
    """The float32 backward's dots are FMA ("ieee") unless PyTorch allows TF32 for float32 matmuls
    (any of the ways it is set), then "tf32"; the float32 forward keeps 3xTF32 and 16-bit inputs are
    unaffected. The interpreter computes float32 whatever the precision, so the test reads the
    constexpr each launch passes (the outputs are still checked against the reference)."""
    passed = {}

    def spy(name, kernel, configs, grid, args, **kwargs):
        passed[name] = kwargs.get("INPUT_PRECISION")
        return launch(name, kernel, configs, grid, args, **kwargs)

    launch = ita.launch
    monkeypatch.setattr(ita, "launch", spy)
    attention = make_case(1, 40, 4, 2, 64, 2, 17, dtype=dtype)
    with _matmul_precision(setting):
        check_against_reference(attention, forward, backward)
    tf32 = setting != "default"
    expected = "tf32" if dtype != F32 else ("tf32" if tf32 else "ieee")
    assert passed["image_text_attention_bwd_dkdv"] == expected
    assert passed["image_text_attention_bwd_dq"] == expected
    assert passed["image_text_attention_fwd"] == ("tf32x3" if dtype == F32 else "tf32")
    assert ita.float32_backward_precision() == "ieee"  # restored


def test_float32_single_pass_with_tf32_runs_its_own_tiles(monkeypatch):
    """The float32 single pass has a tile list per precision (no shape compiles spill-free with both):
    with TF32 allowed it launches the TF32 list's config, and matches the reference."""
    passed = {}

    def spy(name, kernel, configs, grid, args, **kwargs):
        passed[name] = (kwargs.get("INPUT_PRECISION"), kwargs.get("tune_configs"))
        return launch(name, kernel, configs, grid, args, **kwargs)

    launch = ita.launch
    monkeypatch.setattr(ita, "launch", spy)
    attention = make_case(1, 40, 4, 2, 80, 2, 17, dtype=F32)
    for setting, configs in (
        ("default", ita._FUSED_CONFIGS[4][16]),
        ("set_float32_matmul_precision", ita._FUSED_TF32_CONFIGS[16]),
    ):
        with _matmul_precision(setting):
            check_against_reference(attention, forward, backward_single_pass)
        precision, tuned = passed["image_text_attention_bwd_fused"]
        assert precision == ("ieee" if setting == "default" else "tf32")
        assert tuned == configs


# ---- NaN and inf -------------------------------------------------------------------------------------
# A non-finite input must show in every output the math makes it reach: a query row -> that row's
# output and gradients (and the dk, dv of the keys it sees); a visible key or value -> the rows that
# see it. It must not be masked away (a diverging training run would be hidden). The kernels work on
# tiles, so within a loaded tile a non-finite value can also reach, through 0 * NaN in a tile's dot,
# rows of the same tile that do not see it (as the dense reference and SDPA's math path reach every
# row); a chunk no row of a block sees is never loaded and reaches nothing
# (test_invisible_chunks_are_never_loaded). The test checks both bounds: the "exact" outputs (a
# reference in which a masked-out term contributes nothing at all, not 0 * x) are non-finite ⊆ ours
# ⊆ the dense reference's, and in the forward ours equals the exact pattern for q and k.


def _exact_matmul(a, b, visible):
    """a @ b over the visible terms only: visible [..., M, K] masks a [..., M, K]; a non-finite
    b[j] reaches the rows whose visible terms include j."""
    b_bad = ~torch.isfinite(b)
    result = torch.where(visible, a, 0) @ torch.where(b_bad, 0, b)
    reached = (visible.to(b.dtype) @ b_bad.to(b.dtype)) > 0
    return torch.where(reached, float("nan"), result)


def _exact_attention(q, k, v, key_visible, grad_out, scale):
    """float64 (out, lse, dq, dk, dv) in which masked terms contribute nothing ([B, L, H, Dh] in)."""
    group = q.shape[2] // k.shape[2]
    qh, dout = (x.double().transpose(1, 2) for x in (q, grad_out))
    kh, vh = (x.double().transpose(1, 2).repeat_interleave(group, 1) for x in (k, v))
    visible = key_visible[:, None].expand(-1, qh.shape[1], -1, -1)
    scores = (qh @ kh.transpose(-1, -2)) * scale  # no masking of non-finite values needed
    scores = torch.where(visible, scores, float("-inf"))
    lse = torch.logsumexp(scores, -1, keepdim=True)
    empty = ~visible.any(-1, keepdim=True)
    probs = torch.where(visible, torch.exp(scores - torch.where(empty, 0, lse)), 0)
    out = _exact_matmul(probs, vh, visible)
    delta = (dout * out).sum(-1, keepdim=True)
    dp = dout @ vh.transpose(-1, -2)
    ds = torch.where(visible, probs * (dp - delta), 0)
    dq = _exact_matmul(ds, kh, visible) * scale
    dk = _exact_matmul(ds.transpose(-1, -2), qh, visible.transpose(-1, -2)) * scale
    dv = _exact_matmul(probs.transpose(-1, -2), dout, visible.transpose(-1, -2))
    batch, heads_q, keys, head_dim = dk.shape

    def per_kv_head(x):
        return x.reshape(batch, heads_q // group, group, keys, head_dim).sum(2).transpose(1, 2)

    return out.transpose(1, 2), lse[..., 0], dq.transpose(1, 2), per_kv_head(dk), per_kv_head(dv)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the interpreter's NaN arithmetic
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize(
    "query_len, dtype",
    [(97, F32), (97, BF16), (5, F32)],
    ids=["prefill-fp32", "prefill-bf16", "decode"],
)
def test_non_finite_inputs_propagate(where, value, query_len, dtype):
    attention = make_case(1, query_len, 4, 2, 64, 3, 17, dtype=dtype, mask_kind="random")
    mask, media_len, scale = attention.media_mask, attention.media_len, attention.scale
    args = (mask, media_len, scale, "zero")
    clean_out, _ = forward(attention.q, attention.k, attention.v, *args)
    inputs = {"q": attention.q.clone(), "k": attention.k.clone(), "v": attention.v.clone()}
    # The last query row sees every chunk (random_media_mask plants it); key 20 is in chunk 1.
    row, key, head = query_len - 1, 20, 1
    if where == "q":
        inputs["q"][0, row, head, 3] = value
    else:
        inputs[where][0, key, head // 2, 3] = value
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    out, lse = forward(q, k, v, *args)
    grad_out = torch.randn_like(out)
    grads = backward(grad_out, q, k, v, mask, out, lse, media_len, scale, "zero")

    key_visible = key_visibility(mask, media_len, "zero")
    exact = _exact_attention(q, k, v, key_visible, grad_out, scale)
    ref_out, ref_lse = image_text_attention_reference(
        q.double(), k.double(), v.double(), mask, media_len=media_len, scale=scale, return_lse=True
    )
    dense_grads = masked_attention_backward(
        grad_out.double(), q.double(), k.double(), v.double(), key_visible, ref_out, ref_lse, scale
    )
    dense = (ref_out, ref_lse, *dense_grads)
    assert not torch.isfinite(exact[0]).all(), "the planted value reaches no output: a bad case"
    for name, ours, lower, upper in zip(
        ("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), exact, dense, strict=True
    ):
        bad, must, may = (~torch.isfinite(x) for x in (ours, lower, upper))
        if name == "lse":  # -inf on rows that see nothing, in all three
            bad, must, may = (
                x & ~torch.isneginf(y) for x, y in ((bad, lse), (must, lower), (may, upper))
            )
        assert (bad | ~must).all(), (
            f"{name}: a non-finite value was masked away at {(~bad & must).nonzero()[:4].tolist()}"
        )
        assert (may | ~bad).all(), f"{name}: non-finite where even the dense reference is finite"
    if where != "v":  # q, k: a score row stays in its row, so the forward is exact
        assert torch.equal(~torch.isfinite(out), ~torch.isfinite(exact[0]))
        # Outputs the planted value does not change (exactly) are those of the clean inputs.
        clean = _exact_attention(
            attention.q, attention.k, attention.v, key_visible, grad_out, scale
        )
        same = exact[0] == clean[0]
        assert same.any() and torch.equal(out[same], clean_out[same])


# ---- ahead-of-time registration ----------------------------------------------------------------------


def test_every_config_is_registered_for_the_compile_report():
    """Per kernel and input width, the compile report gets every config the launchers can run (at
    Dh=128) and the first config at Dh=80 and 96 (and 64 for 16-bit); the first config is the one
    the interpreter runs here."""
    families = {
        "image_text_attention_fwd": (
            ita._fwd_kernel,
            lambda t: [c for m in t.fwd_block_m for c in ita._FWD_CONFIGS[m]],
        ),
        "image_text_attention_decode_split": (
            ita._decode_split_kernel,
            lambda t: ita._DECODE_CONFIGS[t.decode_max_rows],
        ),
        "image_text_attention_decode_combine": (
            ita._decode_combine_kernel,
            lambda t: ita._COMBINE_CONFIGS,
        ),
        "image_text_attention_fwd_split": (
            ita._fwd_kernel,
            lambda t: [c for m in t.fwd_block_m for c in ita._FWD_CONFIGS[m]],
        ),
        "image_text_attention_prefill_combine": (
            ita._prefill_combine_kernel,
            lambda t: ita._COMBINE_CONFIGS,
        ),
        # The chunk-aligned walks (SPAN_TILES off: M > 64) of the forward and decode kernels.
        "image_text_attention_fwd_chunks": (
            ita._fwd_kernel,
            lambda t: [c for m in t.fwd_block_m for c in ita._FWD_CONFIGS[m]],
        ),
        "image_text_attention_fwd_split_chunks": (
            ita._fwd_kernel,
            lambda t: [c for m in t.fwd_block_m for c in ita._FWD_CONFIGS[m]],
        ),
        "image_text_attention_decode_split_chunks": (
            ita._decode_split_kernel,
            lambda t: ita._DECODE_CONFIGS[t.decode_max_rows],
        ),
        "image_text_attention_bwd_preprocess": (
            ita._bwd_preprocess_kernel,
            lambda t: ita._PREPROCESS_CONFIGS,
        ),
        "image_text_attention_bwd_dkdv": (
            ita._bwd_dkdv_kernel,
            lambda t: ita._by_block(ita._DKDV_CONFIGS, t, t.dkdv_block_m),
        ),
        "image_text_attention_bwd_dq": (
            ita._bwd_dq_kernel,
            lambda t: ita._by_block(ita._DQ_CONFIGS, t, t.dq_block_m),
        ),
        "image_text_attention_bwd_fused": (
            ita._bwd_dkdv_kernel,
            lambda t: ita._by_block(ita._FUSED_CONFIGS, t, t.dkdv_block_m),
        ),
    }
    registered = {entry.name: entry for entry in REGISTRY.from_modules([ita.__name__])}
    backward = (
        "image_text_attention_bwd_dkdv",
        "image_text_attention_bwd_dq",
        "image_text_attention_bwd_fused",
    )
    # The float32 backward once more with TF32 dots (float32_backward_precision).
    assert len(registered) == len(families) * 7 + len(backward) * 4
    for name in backward:
        for head_dim in (128, 64, 80, 96):
            entry = registered[f"{name}[fp32tf32,d{head_dim}]"]
            assert all(aot.constexprs["INPUT_PRECISION"] == "tf32" for aot in entry.configs)
            assert entry.signature["q_ptr"] == "*fp32:16"
            assert len(entry.configs) == (
                len(families[name][1](ita._TILES[4])) if head_dim == 128 else 1
            )
    for name in ("fwd", "fwd_split", "decode_split"):
        for suffix, span in (("", True), ("_chunks", False)):
            for label in ("bf16", "fp32"):  # float32 has one walk, the chunk-aligned one
                entry = registered[f"image_text_attention_{name}{suffix}[{label},d128]"]
                expected = span and label == "bf16"
                assert all(aot.constexprs["SPAN_TILES"] is expected for aot in entry.configs)
                assert entry.signature["row_bits_ptr"] == "*i32:16"
    for label in ("bf16", "fp32", "fp32tf32"):
        for name, atomic_dq in (("bwd_dkdv", False), ("bwd_fused", True)):
            entry = registered[f"image_text_attention_{name}[{label},d128]"]
            assert all(aot.constexprs["ATOMIC_DQ"] is atomic_dq for aot in entry.configs)
    for name, (kernel, configs_for) in families.items():
        for dtype, width, head_dims in (("bf16", 2, (64, 80, 96)), ("fp32", 4, (80, 96))):
            configs = list(configs_for(ita._TILES[width]))
            for head_dim in (128, *head_dims):
                entry = registered[f"{name}[{dtype},d{head_dim}]"]
                assert entry.fn is kernel
                expected = configs if head_dim == 128 else configs[:1]
                assert len(entry.configs) == len(expected)
                for aot, config in zip(entry.configs, expected, strict=True):
                    assert config.kwargs.items() <= dict(aot.constexprs).items()
                    assert aot.constexprs["HEAD_DIM"] == head_dim
                    assert (aot.num_warps, aot.num_stages) == (config.num_warps, config.num_stages)
