"""image_text_attention's CUDA backward (csrc/cuda/image_text_attention_bwd.cu: delta preprocess,
dk/dv pass over the transposed chunk schedule, dq pass; tensor cores, 3xTF32 for float32) run on the
CPU by the SIMT emulator (cuda_sim), whose mma / ldmatrix / cp.async follow the PTX fragment layouts
lane by lane: dq, dk and dv against the float64 reference with the DESIGN §6 policy. With
VLMK_TEST_DEVICE=cuda the same tests run the compiled kernels (the cuda backend) on CUDA tensors.

Outputs come from ``at::empty``, NaN-filled here (deterministic mode), so an element the kernels
forget to write fails the NaN check. The emulator is slow: the default subset stays small, the rest
is marked slow.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import vlm_kernels as vk
from tests.attention_testing import check_against_reference, make_case
from tests.devices import ON_CUDA, cpu_only
from vlm_kernels._backends import _extension
from vlm_kernels.ops.image_text_attention import TABLE
from vlm_kernels.reference.image_text_attention import image_text_attention_reference

BACKEND = "cuda" if ON_CUDA else "cuda_sim"
forward = TABLE.forward[BACKEND]
backward = TABLE.backward[BACKEND]
pytestmark = pytest.mark.usefixtures("tensors_on_test_device")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _poison_uninitialized():
    """In deterministic mode ``at::empty`` fills float tensors with NaN: unwritten outputs show up."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def _check(case):
    check_against_reference(case, forward, backward)


# (batch, Lq, Hq, Hkv, Dh, chunks, media_len, mask kind). Together: Dh 64/80/96/128, MHA / GQA /
# MQA, Lq 1/7/97 (97: two dq blocks of 64, four dk/dv blocks of 32, ragged tails), media_len
# 1/17/64/65 (65: a 64-key dk/dv tile plus a 1-key tail), every mask kind.
SHAPES = [
    (1, 7, 4, 2, 64, 3, 17, "random"),
    (1, 97, 4, 1, 80, 2, 65, "random"),
    (2, 7, 4, 4, 96, 4, 64, "runs"),
    (1, 1, 8, 1, 64, 3, 65, "random"),
    (2, 7, 2, 2, 128, 5, 1, "random"),
    (1, 7, 4, 2, 80, 2, 17, "none"),
]
SLOW_SHAPES = [
    (1, 97, 8, 2, 128, 5, 17, "gappy"),
    (2, 97, 8, 1, 96, 3, 65, "runs"),
    (1, 97, 4, 4, 64, 4, 64, "all"),
    (1, 1, 4, 4, 128, 2, 64, "gappy"),
    (2, 7, 16, 2, 80, 6, 1, "random"),
]


def _id(shape):
    batch, query_len, heads_q, heads_kv, head_dim, chunks, media_len, kind = shape
    return f"B{batch}-Lq{query_len}-H{heads_q}-{heads_kv}-D{head_dim}-M{chunks}x{media_len}-{kind}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_matches_reference(shape, dtype):
    *dims, kind = shape
    _check(make_case(*dims, dtype=dtype, mask_kind=kind))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SLOW_SHAPES, ids=_id)
def test_matches_reference_more_shapes(shape, dtype):
    *dims, kind = shape
    _check(make_case(*dims, dtype=dtype, mask_kind=kind))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("query_len", "kind"), [(7, "random"), (97, "none"), (1, "none")])
def test_uniform_empty_rows(query_len, kind, dtype):
    """empty_rows="uniform": a row that sees no chunk attends to (and sends gradient to) every key."""
    _check(
        make_case(1, query_len, 4, 2, 64, 3, 17, dtype=dtype, mask_kind=kind, empty_rows="uniform")
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
def test_fused_qkv_strided_inputs(empty_rows, dtype):
    """q, k and v are strided slices of one fused [B, L, 3 * H, Dh] projection output."""
    case = make_case(2, 40, 4, 2, 80, 3, 17, dtype=dtype, fused_qkv=True, empty_rows=empty_rows)
    assert not case.q.is_contiguous() and not case.k.is_contiguous()
    _check(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unaligned_inputs_and_strided_mask(dtype):
    """Base pointers off 16-byte alignment (the kernels stage with plain loads, not cp.async) and a
    mask read through non-unit strides."""
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
    _check(case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize("query_len", [7, 97])
def test_chunks_nobody_sees_never_reach_a_gradient(query_len, empty_rows, dtype):
    """NaN in the keys and values of a chunk that no query sees leaves every gradient bit-identical
    and that chunk's dk, dv exactly 0: the kernels skip the chunk instead of masking it."""
    case = make_case(1, query_len, 4, 2, 64, 4, 17, dtype=dtype, empty_rows=empty_rows)
    hidden = 2
    case.media_mask[:, :, hidden] = False
    case.media_mask[:, :, 0] = True  # no empty row: "uniform" would make it see the hidden chunk
    args = (case.media_mask, case.media_len, case.scale, empty_rows)
    out, lse = forward(case.q, case.k, case.v, *args)
    grad_out = torch.randn_like(out)
    want = backward(grad_out, case.q, case.k, case.v, case.media_mask, out, lse, *args[1:])
    keys = slice(hidden * case.media_len, (hidden + 1) * case.media_len)
    k, v = case.k.clone(), case.v.clone()
    k[:, keys] = float("nan")
    v[:, keys] = float("nan")
    got = backward(grad_out, case.q, k, v, case.media_mask, out, lse, *args[1:])
    for name, ours, ref in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert torch.equal(ours, ref), f"{name} changed by NaN in a chunk nobody sees"
    assert (got[1][:, keys] == 0).all() and (got[2][:, keys] == 0).all()


def test_nan_query_row_gives_a_nan_dq_row():
    """As the reference: a NaN query row gets a NaN dq row; the other query heads' rows stay finite."""
    case = make_case(1, 7, 4, 2, 64, 3, 17, mask_kind="all")
    case.q[0, 3, 1] = float("nan")
    args = (case.media_mask, case.media_len, case.scale, "zero")
    out, lse = forward(case.q, case.k, case.v, *args)
    dq, _, _ = backward(
        torch.randn_like(out), case.q, case.k, case.v, case.media_mask, out, lse, *args[1:]
    )
    assert dq[0, 3, 1].isnan().all()
    assert not dq[0, :, 2:].isnan().any() and not dq[0, :, 0].isnan().any()


def test_large_logits_bf16():
    """Scores in the hundreds: P = exp2(s - lse) stays in [0, 1]."""
    _check(make_case(1, 33, 4, 2, 64, 3, 65, dtype=torch.bfloat16, logit_scale=30.0))


def test_large_logits_fp32():
    """float32 with scores in the hundreds, where the 3xTF32 products show: an operand split into
    two tf32 parts keeps ~21-22 of float32's 24 mantissa bits, so a score of ~300 carries an absolute
    error of ~300 * 2^-21 ~ 1.4e-4, and P = exp(S - lse) (recomputed in the backward) carries it into
    every gradient. Measured on this case over seeds 0-5 (cuda_sim, with the tensor-core forward's
    lse; the float64 lse gives the same): dq 1.8-6x, dk 2.4-10.5x, dv 4.6-18x torch's float32 error;
    so the bound here is 24x torch's error, not the default 2x. At logit scale 1 every gradient is
    within 2x (test_matches_reference); a wrong gradient is off by orders of magnitude more."""
    case = make_case(1, 33, 4, 2, 64, 3, 65, logit_scale=30.0)
    args = (case.media_mask, case.media_len, case.scale, case.empty_rows)
    out, lse = forward(case.q, case.k, case.v, *args)
    grad_out = torch.randn_like(out)
    got = backward(grad_out, case.q, case.k, case.v, case.media_mask, out, lse, *args[1:])
    kwargs = dict(media_len=case.media_len, scale=case.scale, empty_rows=case.empty_rows)
    leaves64 = [t.detach().double().requires_grad_() for t in (case.q, case.k, case.v)]
    leaves32 = [t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v)]
    ref = torch.autograd.grad(
        image_text_attention_reference(*leaves64, case.media_mask, **kwargs),
        leaves64,
        grad_out.double(),
    )
    torch32 = torch.autograd.grad(
        image_text_attention_reference(*leaves32, case.media_mask, **kwargs), leaves32, grad_out
    )
    for name, ours, lowp, want in zip(("dq", "dk", "dv"), got, torch32, ref, strict=True):
        err = (ours.double() - want).abs().max().item()
        err_torch = (lowp.double() - want).abs().max().item()
        assert err <= 24 * err_torch + 1e-5, f"{name}: {err:.3e} > 24 * {err_torch:.3e} + 1e-5"


@pytest.mark.slow
@pytest.mark.parametrize("chunks", [130])
def test_many_chunks(chunks):
    """Many one-key chunks: the dk/dv grid has one block per chunk, the dq pass walks long schedules."""
    case = make_case(1, 40, 4, 2, 64, chunks, 1, mask_kind="random")
    case.media_mask[:, 5, 120:130] = True
    _check(case)


def test_deterministic():
    """No atomics: two calls give bit-identical gradients (GQA heads summed in one order)."""
    case = make_case(1, 40, 4, 2, 64, 3, 65, dtype=torch.bfloat16)
    args = (case.media_mask, case.media_len, case.scale, case.empty_rows)
    out, lse = forward(case.q, case.k, case.v, *args)
    grad_out = torch.randn_like(out)
    first = backward(grad_out, case.q, case.k, case.v, case.media_mask, out, lse, *args[1:])
    second = backward(grad_out, case.q, case.k, case.v, case.media_mask, out, lse, *args[1:])
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize(("batch", "query_len", "chunks"), [(0, 7, 2), (2, 0, 2), (2, 7, 0)])
def test_empty_inputs(batch, query_len, chunks, empty_rows):
    """B = 0, Lq = 0 or M = 0: no launch; gradients of the right shapes, zeros where defined."""
    q = torch.randn(batch, query_len, 4, 64)
    k = torch.randn(batch, chunks * 7, 2, 64)
    mask = torch.ones(batch, query_len, chunks, dtype=torch.bool)
    out = torch.zeros_like(q)
    lse = torch.full((batch, 4, query_len), float("-inf"))
    dq, dk, dv = backward(torch.randn_like(q), q, k, k, mask, out, lse, 7, 0.125, empty_rows)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def test_bad_inputs():
    """The C++ glue's own checks (direct callers of vlm_kernels._C skip the Python validation)."""
    raw = getattr(_extension()[0], f"image_text_attention_bwd_{BACKEND}")
    q = torch.randn(1, 4, 4, 64)
    k = torch.randn(1, 34, 2, 64)
    mask = torch.ones(1, 4, 2, dtype=torch.bool)
    lse = torch.zeros(1, 4, 4)
    with pytest.raises(RuntimeError, match="head dim Dh must be 64, 80, 96 or 128, got 32"):
        raw(
            q[..., :32],
            q[..., :32],
            k[..., :32],
            k[..., :32],
            mask,
            q[..., :32],
            lse,
            17,
            0.1,
            False,
        )
    with pytest.raises(RuntimeError, match="k has Lk=34 keys, expected M=2 chunks of media_len=16"):
        raw(q, q, k, k, mask, q, lse, 16, 0.1, False)
    with pytest.raises(RuntimeError, match="grad_out and out must have q's dtype"):
        raw(q.half(), q, k, k, mask, q, lse, 17, 0.1, False)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        raw(q, q, k.transpose(1, 3).contiguous().transpose(1, 3), k, mask, q, lse, 17, 0.1, False)
    with pytest.raises(RuntimeError, match="lse must be float32"):
        raw(q, q, k, k, mask, q, lse[:, :2], 17, 0.1, False)
    with pytest.raises(RuntimeError, match="media_mask must be bool"):
        raw(q, q, k, k, mask.float(), q, lse, 17, 0.1, False)


def test_op_trains_without_the_fallback():
    """backend="cuda"/"cuda_sim" runs its own backward through autograd: no fallback warning."""
    case = make_case(1, 7, 4, 2, 64, 3, 17)
    q, k, v = (t.detach().requires_grad_() for t in (case.q, case.k, case.v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = vk.image_text_attention(q, k, v, case.media_mask, media_len=17, backend=BACKEND)
        out.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@contextlib.contextmanager
def _simt_settings(**settings):
    extension = _extension()[0]
    previous = extension.simt_set_config(**settings)
    try:
        yield
    finally:
        extension.simt_set_config(**previous)


@cpu_only
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (torch.bfloat16, (1, 40, 4, 2, 64, 2, 65, "random")),
        (torch.float32, (1, 7, 2, 1, 80, 3, 17, "gappy")),
    ],
    ids=["bf16-Lq40-G2-D64", "fp32-Lq7-MQA-D80"],
)
def test_race_checker_and_random_schedule(dtype, shape, seed):
    """Under SIMT_RACECHECK and a random thread schedule: no shared-memory race (a missing barrier
    or cp.async wait would be reported or read the 0xff poison), same gradients."""
    *dims, kind = shape
    with _simt_settings(racecheck=True, schedule="random", seed=seed):
        _check(make_case(*dims, dtype=dtype, mask_kind=kind))
