"""The C++ CPU image_text_attention kernels (csrc/cpu/image_text_attention.cpp, forward and backward)
against the reference. Tolerances: DESIGN §6 via tests/attention_testing.py. Every output the kernels
allocate is NaN-filled at allocation (``poisoned_allocations``), so an element they forget to write fails.

The cases steer through every path of the kernels: packed key tiles shared by several query blocks,
per-task packing and the unpacked S^T = K Q^T form (one query block), key splits with a combine (few
(batch, head, query block) tasks: decode), backward key splits, merged tiles across chunks (even
media_len) and padded ones (odd media_len in bfloat16), odd head dims, strided (fused qkv) inputs.
"""

import contextlib
import itertools

import pytest
import torch

from tests.allocations import poisoned_allocations
from tests.attention_testing import (
    _lowp_attention,
    check_against_reference,
    make_case,
    policy_floor,
    random_media_mask,
)
from tests.devices import ON_CUDA
from vlm_kernels import _C
from vlm_kernels.ops.image_text_attention import CPU_EMPTY_ROW_CODES
from vlm_kernels.reference.image_text_attention import image_text_attention_reference

if ON_CUDA:
    pytest.skip(
        "the C++ CPU kernels run CPU tensors only (VLMK_TEST_DEVICE=cuda)", allow_module_level=True
    )
KERNELS = _C
if not KERNELS.image_text_attention_cpu_supported():
    pytest.skip("the CPU kernels need AVX-512 (x86-64)", allow_module_level=True)


def forward(q, k, v, media_mask, media_len, scale, empty_rows):
    """The kernel-table forward (empty_rows as the kernel's mode code)."""
    with poisoned_allocations():
        return KERNELS.image_text_attention_fwd_cpu(
            q, k, v, media_mask, media_len, scale, CPU_EMPTY_ROW_CODES[empty_rows]
        )


def backward(grad_out, q, k, v, media_mask, out, lse, media_len, scale, empty_rows):
    with poisoned_allocations():
        return KERNELS.image_text_attention_bwd_cpu(
            grad_out,
            q,
            k,
            v,
            media_mask,
            out,
            lse,
            media_len,
            scale,
            CPU_EMPTY_ROW_CODES[empty_rows],
        )


@contextlib.contextmanager
def num_threads(count):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- forward and backward against the reference ----------------------------------------------------

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (batch, Lq, Hq, Hkv, Dh, chunks, media_len, dtype, mask kind, empty_rows, fused qkv). A covering set:
# every dtype, Lq in {1, 7, 97, 256}, media_len in {1, 17, 64, 65}, 1-5 chunks, Hq/Hkv 4/4, 8/2, 8/1,
# Dh 64/80/128, every mask kind, both empty-row modes, fused and separate q/k/v each appear with each
# dtype; the comments name the kernel path a case exists for (the full product is the slow test below).
CASES = [
    (2, 97, 4, 4, 64, 3, 65, F32, "random", "zero", True),  # 2 query blocks: packed tiles
    (1, 97, 8, 2, 80, 2, 17, BF16, "random", "uniform", False),
    (1, 97, 8, 1, 128, 2, 64, F16, "runs", "zero", True),
    (1, 256, 8, 2, 128, 5, 17, F32, "gappy", "zero", False),  # 8 blocks, gappy segments
    (2, 256, 4, 4, 64, 4, 64, BF16, "all", "zero", True),  # merged tiles across chunks
    (1, 256, 4, 4, 80, 3, 1, F32, "random", "uniform", False),  # 1 block of 256 rows: own packing
    (1, 97, 8, 2, 64, 4, 17, F16, "none", "uniform", False),
    (1, 97, 4, 4, 64, 2, 65, BF16, "none", "zero", True),
    (1, 256, 4, 4, 64, 4, 17, BF16, "runs", "uniform", False),
    (1, 7, 8, 2, 64, 3, 65, BF16, "random", "zero", True),  # one block, unpacked S^T = K Q^T
    (2, 1, 4, 4, 80, 5, 17, F32, "random", "uniform", False),
    (1, 7, 8, 1, 128, 2, 64, F16, "runs", "uniform", True),
    (1, 7, 4, 4, 64, 4, 1, F32, "gappy", "zero", True),
    (2, 1, 8, 2, 64, 2, 65, F16, "none", "zero", False),
    (1, 1, 8, 1, 128, 3, 400, BF16, "all", "zero", True),  # key splits + combine (decode)
    (1, 7, 4, 1, 80, 2, 700, F32, "random", "uniform", False),  # key splits, backward splits
    (1, 256, 4, 4, 128, 1, 65, BF16, "runs", "zero", False),  # 1 chunk
    (3, 97, 8, 8, 33, 2, 9, BF16, "random", "zero", False),  # odd head dim: padded VNNI pairs
    (2, 97, 4, 2, 96, 3, 65, F16, "gappy", "uniform", True),
]


def _case_id(case):
    batch, lq, hq, hkv, dh, chunks, media_len, dtype, kind, empty_rows, fused = case
    name = str(dtype).split(".")[-1]
    return f"b{batch}-lq{lq}-h{hq}x{hkv}-d{dh}-m{chunks}x{media_len}-{name}-{kind}-{empty_rows}" + (
        "-fused" if fused else ""
    )


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(case):
    batch, lq, hq, hkv, dh, chunks, media_len, dtype, kind, empty_rows, fused = case
    attention_case = make_case(
        batch,
        lq,
        hq,
        hkv,
        dh,
        chunks,
        media_len,
        dtype=dtype,
        mask_kind=kind,
        empty_rows=empty_rows,
        fused_qkv=fused,
    )
    check_against_reference(attention_case, forward, backward)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_thread_counts(threads, dtype):
    """Task counts, key splits and the combine depend on the thread count; results must not."""
    with num_threads(threads):
        for shape in [(1, 1, 4, 1, 64, 4, 300), (2, 97, 8, 2, 80, 3, 65)]:
            case = make_case(*shape, dtype=dtype, mask_kind="random", fused_qkv=True)
            check_against_reference(case, forward, backward)


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("query_len", [7, 97])
def test_large_logits(dtype, query_len):
    """Scores of magnitude ~300 (q scaled by 30): the online softmax must neither overflow nor lose
    accuracy beyond the policy."""
    case = make_case(
        1, query_len, 8, 2, 64, 3, 65, dtype=dtype, logit_scale=30.0, mask_kind="random"
    )
    check_against_reference(case, forward, backward)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_large_logits_decode(dtype):
    """Large logits with Lq = 1. Loosened for float32: torch's own float32 reference then runs
    q @ k^T as a GEMV with many partial sums, ~3x more accurate than any GEMM's sequential sum along
    Dh (its own GEMM included); at scores ~300 both errors are ~1 ulp of the score, so the
    2x-of-torch bound would measure the GEMV's luck, not the kernel. The bound here is 8x + floor."""
    case = make_case(2, 1, 8, 2, 80, 3, 401, dtype=dtype, logit_scale=30.0, mask_kind="random")
    out, lse = forward(case.q, case.k, case.v, case.media_mask, case.media_len, case.scale, "zero")
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    kwargs = dict(media_len=case.media_len, scale=case.scale, empty_rows="zero")
    ref = image_text_attention_reference(
        case.q.double(), case.k.double(), case.v.double(), case.media_mask, **kwargs
    )
    lowp = _lowp_attention(case.q, case.k, case.v, case.media_mask, **kwargs)
    factor = 8 if dtype == F32 else 2
    err, err_lowp = ((x.double() - ref).abs().max().item() for x in (out, lowp))
    assert err <= factor * err_lowp + policy_floor(ref, dtype), (err, err_lowp)


# ---- semantics and edge cases -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_uniform_rows_attend_to_every_key(dtype):
    """empty_rows="uniform": a row that sees no chunk equals plain attention over all Lk keys."""
    case = make_case(1, 9, 4, 2, 64, 3, 17, dtype=dtype, mask_kind="none")
    out, lse = forward(case.q, case.k, case.v, case.media_mask, 17, case.scale, "uniform")
    full = torch.ones_like(case.media_mask)
    out_all, lse_all = forward(case.q, case.k, case.v, full, 17, case.scale, "zero")
    torch.testing.assert_close(out, out_all, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_all, rtol=0, atol=0)


def test_zero_rows_give_zero_output_and_gradients():
    case = make_case(1, 12, 4, 2, 64, 3, 17, mask_kind="random")
    mask = case.media_mask.clone()
    mask[:, :5] = False  # five rows see nothing
    out, lse = forward(case.q, case.k, case.v, mask, 17, case.scale, "zero")
    assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5]))
    assert torch.isneginf(lse[:, :, :5]).all()
    grad_out = torch.randn_like(out)
    dq, dk, dv = backward(grad_out, case.q, case.k, case.v, mask, out, lse, 17, case.scale, "zero")
    assert torch.equal(dq[:, :5], torch.zeros_like(dq[:, :5]))
    unseen = ~mask.any(1)[0].repeat_interleave(17)  # keys of chunks no query sees
    assert torch.equal(dk[:, unseen], torch.zeros_like(dk[:, unseen]))
    assert torch.equal(dv[:, unseen], torch.zeros_like(dv[:, unseen]))


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_any_scale(scale):
    """The scale is any finite number: negative flips which score is the row max, 0 is uniform."""
    case = make_case(2, 33, 8, 2, 64, 3, 17, dtype=BF16, mask_kind="random")
    case.scale = scale
    check_against_reference(case, forward, backward)


def test_strided_mask():
    """media_mask as a non-contiguous view (e.g. sliced from a wider mask)."""
    case = make_case(2, 33, 4, 2, 64, 3, 17, mask_kind="random")
    wide = torch.zeros(2, 33, 7, dtype=torch.bool)
    wide[:, :, 1:7:2] = case.media_mask
    strided = wide[:, :, 1:7:2]
    assert not strided.is_contiguous()
    case.media_mask = strided
    check_against_reference(case, forward, backward)


def test_bfloat16_without_onednn():
    """With oneDNN switched off there is no bfloat16 brgemm; bfloat16 then runs through float32."""
    case = make_case(1, 33, 8, 2, 64, 3, 17, dtype=BF16, mask_kind="random")
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        check_against_reference(case, forward, backward)
    finally:
        torch.backends.mkldnn.enabled = enabled


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_deterministic(dtype):
    """Two runs are bitwise equal (tasks are handed out dynamically; their results must not depend on
    which thread ran them), key splits included."""
    for shape in [(1, 1, 8, 1, 128, 4, 300), (2, 97, 8, 2, 64, 3, 65)]:
        case = make_case(*shape, dtype=dtype, mask_kind="random")
        args = (case.media_mask, case.media_len, case.scale, "zero")
        out1, lse1 = forward(case.q, case.k, case.v, *args)
        out2, lse2 = forward(case.q, case.k, case.v, *args)
        assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
        grad_out = torch.randn_like(out1)
        grads1 = backward(grad_out, case.q, case.k, case.v, case.media_mask, out1, lse1, *args[1:])
        grads2 = backward(grad_out, case.q, case.k, case.v, case.media_mask, out1, lse1, *args[1:])
        for a, b in zip(grads1, grads2, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "batch,query_len,heads_q,heads_kv,chunks",
    [(0, 5, 4, 2, 2), (2, 0, 4, 2, 2), (2, 5, 0, 2, 2), (2, 5, 4, 2, 0)],
    ids=["B0", "Lq0", "Hq0", "Lk0"],
)
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_empty_sizes(batch, query_len, heads_q, heads_kv, chunks, dtype):
    media_len = 3
    q = torch.randn(batch, query_len, heads_q, 16).to(dtype)
    k = torch.randn(batch, chunks * media_len, heads_kv, 16).to(dtype)
    v = torch.randn_like(k)
    mask = random_media_mask(batch, query_len, chunks, "all")
    for empty_rows in ("zero", "uniform"):
        out, lse = forward(q, k, v, mask, media_len, 0.25, empty_rows)
        assert out.shape == q.shape and out.dtype == dtype
        assert lse.shape == (batch, heads_q, query_len) and lse.dtype == F32
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.isneginf(lse).all()
        grads = backward(torch.randn_like(q), q, k, v, mask, out, lse, media_len, 0.25, empty_rows)
        for grad, x in zip(grads, (q, k, v), strict=True):
            assert grad.shape == x.shape and grad.dtype == dtype
            assert torch.equal(grad, torch.zeros_like(grad))


def _valid_inputs():
    q = torch.randn(1, 5, 4, 16)
    k = torch.randn(1, 6, 2, 16)
    return dict(q=q, k=k, v=torch.randn_like(k), media_mask=torch.ones(1, 5, 2, dtype=torch.bool))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(q=torch.randn(1, 5, 4, 16, dtype=torch.float64)), "q must be float32"),
        (dict(k=torch.randn(1, 6, 2, 16).to(BF16)), "must share a dtype"),
        (dict(q=torch.randn(1, 5, 16, 4).transpose(-1, -2)), "contiguous last dim"),
        (dict(k=torch.randn(1, 6, 3, 16), v=torch.randn(1, 6, 3, 16)), "multiple of Hkv"),
        (dict(v=torch.randn(1, 6, 2, 8)), "v must have k's shape"),
        (dict(k=torch.randn(1, 6, 2, 8), v=torch.randn(1, 6, 2, 8)), "k must be"),
        (dict(media_mask=torch.ones(1, 5, 2)), "media_mask must be bool"),
        (dict(media_mask=torch.ones(1, 4, 2, dtype=torch.bool)), "media_mask must be"),
        (dict(media_mask=torch.ones(1, 5, 3, dtype=torch.bool)), "expected Lk == M \\* media_len"),
        (dict(q=torch.randn(1, 5, 4)), "q must be 4-D"),
    ],
)
def test_rejects_bad_inputs(change, message):
    inputs = _valid_inputs() | change
    with pytest.raises(RuntimeError, match=message):
        KERNELS.image_text_attention_fwd_cpu(
            inputs["q"], inputs["k"], inputs["v"], inputs["media_mask"], 3, 0.25, 0
        )


def test_rejects_bad_scale_and_lse():
    inputs = _valid_inputs()
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["media_mask"], 3)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        KERNELS.image_text_attention_fwd_cpu(*args, float("inf"), 0)
    out, lse = KERNELS.image_text_attention_fwd_cpu(*args, 0.25, 0)
    q, k, v, mask = args[:4]
    with pytest.raises(RuntimeError, match="lse must be a float32"):
        KERNELS.image_text_attention_bwd_cpu(
            torch.randn_like(out), q, k, v, mask, out, lse.double(), 3, 0.25, 0
        )
    with pytest.raises(RuntimeError, match="grad_out"):
        KERNELS.image_text_attention_bwd_cpu(
            torch.randn(1, 5, 4, 8), q, k, v, mask, out, lse, 3, 0.25, 0
        )


# ---- the full product (slow) ---------------------------------------------------------------------------

_KINDS = ("random", "runs", "all", "none", "gappy")
SLOW_CASES = [
    (lq, media_len, heads, dh, dtype)
    for lq, media_len, heads, dh, dtype in itertools.product(
        (1, 7, 97, 256), (1, 17, 64, 65), ((4, 4), (8, 2), (8, 1)), (64, 80, 128), (F32, BF16, F16)
    )
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "lq,media_len,heads,dh,dtype",
    SLOW_CASES,
    ids=[f"lq{c[0]}-ml{c[1]}-h{c[2][0]}x{c[2][1]}-d{c[3]}-{str(c[4])[6:]}" for c in SLOW_CASES],
)
def test_matches_reference_product(lq, media_len, heads, dh, dtype):
    """Every Lq x media_len x heads x Dh x dtype; chunks, mask kind, empty-row mode and fused inputs
    cycle with the case index so each appears with every other parameter value."""
    index = SLOW_CASES.index((lq, media_len, heads, dh, dtype))
    case = make_case(
        1 + index % 2,
        lq,
        *heads,
        dh,
        1 + index % 5,
        media_len,
        dtype=dtype,
        mask_kind=_KINDS[index % len(_KINDS)],
        empty_rows=("zero", "uniform")[index // 5 % 2],
        fused_qkv=index // 10 % 2 == 1,
    )
    check_against_reference(case, forward, backward)
