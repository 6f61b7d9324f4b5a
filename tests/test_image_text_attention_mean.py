"""image_text_attention(empty_rows="mean"): rows that see no media chunk output the mean of all values
(OpenFlamingo's all-previous-media mode).

- The reference backend vs an independent float64 spec written as OpenFlamingo writes it (every
  invisible score filled with -finfo.max, then an ordinary softmax).
- The C++ CPU kernels and the Triton kernels (interpreter on CPU tensors, compiled with
  VLMK_TEST_DEVICE=cuda) vs the float64 reference, forward (out, lse) and every gradient, with torch's
  own OpenFlamingo computation in the inputs' dtype as the yardstick (DESIGN §6), plus exact checks of
  what only this mode does: the empty rows are mean(v) (over every key, hidden chunks included), their
  lse is log(Lk), their dq is 0, and dv carries their dO / Lk.
- The CUDA kernels do not implement the mode and raise a ValueError naming themselves.
"""

from __future__ import annotations

import contextlib
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import vlm_kernels as vk
from tests.attention_testing import (
    assert_within_policy,
    make_case,
    random_media_mask,
)
from tests.devices import ON_CUDA, TEST_DEVICE
from vlm_kernels.ops.image_text_attention import CPU_EMPTY_ROW_CODES, TABLE
from vlm_kernels.ops.media_schedule import write_mean_rows
from vlm_kernels.reference.image_text_attention import image_text_attention_reference

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def flamingo_spec(q, k, v, media_mask, media_len, scale, dtype=torch.float64):
    """softmax(scale q k^T with invisible scores := -finfo.max) v in ``dtype``, GQA by repeating kv."""
    group = q.shape[2] // k.shape[2]
    qh = q.to(dtype).transpose(1, 2)
    kh = k.to(dtype).transpose(1, 2).repeat_interleave(group, 1)
    vh = v.to(dtype).transpose(1, 2).repeat_interleave(group, 1)
    visible = media_mask.repeat_interleave(media_len, -1)[:, None]  # [B, 1, Lq, Lk]
    scores = (scale * qh @ kh.transpose(-1, -2)).masked_fill(~visible, -torch.finfo(dtype).max)
    return (scores.softmax(-1) @ vh).transpose(1, 2)


# ---- the reference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask_kind", ["random", "runs", "none", "all"])
def test_mean_rows_forward_and_backward_match_the_flamingo_spec(heads, mask_kind):
    heads_q, heads_kv = heads
    batch, query_len, chunks, media_len, head_dim = 2, 9, 3, 5, 16
    q = torch.randn(batch, query_len, heads_q, head_dim, requires_grad=True)
    k = torch.randn(batch, chunks * media_len, heads_kv, head_dim, requires_grad=True)
    v = torch.randn(batch, chunks * media_len, heads_kv, head_dim, requires_grad=True)
    media_mask = random_media_mask(batch, query_len, chunks, mask_kind)
    scale = head_dim**-0.5
    out = vk.image_text_attention(
        q, k, v, media_mask, media_len=media_len, empty_rows="mean", backend="reference"
    )
    expected = flamingo_spec(q, k, v, media_mask, media_len, scale)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    empty = ~media_mask.any(-1)
    if empty.any():  # the empty rows really are the mean of the values (not 0, not a softmax)
        mean = v.double().mean(1).repeat_interleave(heads_q // heads_kv, 1)  # [B, Hq, Dh]
        torch.testing.assert_close(
            out.double()[empty], mean[empty.nonzero()[:, 0]], rtol=1e-5, atol=1e-5
        )
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad((out * cotangent).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * cotangent.double()).sum(), (q, k, v))
    for name, ours, theirs in zip("qkv", grads, expected_grads, strict=True):
        err = (ours.double() - theirs).abs().max().item()
        assert err <= 1e-5 * (1 + theirs.abs().max().item()), f"d{name}: max error {err:.2e}"


def test_mean_differs_from_zero_and_uniform_only_on_empty_rows():
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
    media_mask = random_media_mask(1, 6, 2, "random")  # row 0 empty, row 5 full
    outs = {
        mode: vk.image_text_attention(
            q, k, v, media_mask, media_len=4, empty_rows=mode, backend="reference"
        )
        for mode in ("zero", "uniform", "mean")
    }
    seen = media_mask.any(-1)[0]
    for mode in ("zero", "uniform"):
        torch.testing.assert_close(outs["mean"][0, seen], outs[mode][0, seen])
        assert not torch.allclose(outs["mean"][0, ~seen], outs[mode][0, ~seen], atol=1e-3)


# ---- kernels vs the reference ----------------------------------------------------------------------


def check_mean_against_reference(case, forward, backward=None) -> None:
    """``forward(q, k, v, mask, media_len, scale, "mean") -> (out, lse)`` and ``backward(grad_out, q,
    k, v, mask, out, lse, media_len, scale, "mean") -> (dq, dk, dv)`` vs the float64 reference."""
    q, k, v, mask = case.q, case.k, case.v, case.media_mask
    media_len, scale = case.media_len, case.scale
    dtype, keys, group = q.dtype, k.shape[1], q.shape[2] // k.shape[2]
    out, lse = forward(q, k, v, mask, media_len, scale, "mean")

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    leaves_lowp = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = image_text_attention_reference(
        *leaves64, mask, media_len=media_len, scale=scale, empty_rows="mean", return_lse=True
    )
    if dtype == torch.float32:
        lowp_out = image_text_attention_reference(
            *leaves_lowp, mask, media_len=media_len, scale=scale, empty_rows="mean"
        )
    else:  # OpenFlamingo's own computation, in the inputs' dtype
        lowp_out = flamingo_spec(*leaves_lowp, mask, media_len, scale, dtype=dtype)
    assert_within_policy("out", out, lowp_out, ref_out, dtype)

    empty = ~mask.any(-1)  # [B, Lq]
    assert torch.isfinite(lse).all(), "lse: finite on every row (log(Lk) on the mean rows)"
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-3, atol=1e-3)
    mean_rows_lse = lse.transpose(1, 2)[empty]  # [rows, Hq]
    assert torch.equal(mean_rows_lse, torch.full_like(mean_rows_lse, math.log(keys)))
    # The empty rows are mean(v) of their kv head, over every key (chunks no row sees included),
    # rounded once to the output dtype.
    mean = v.double().mean(1).repeat_interleave(group, 1)  # [B, Hq, Dh]
    expected_rows = mean[:, None].expand(out.shape)[empty]
    tolerance = 1e-6 if dtype == torch.float32 else 2 * 2.0**-8
    torch.testing.assert_close(out[empty].double(), expected_rows, rtol=tolerance, atol=tolerance)
    if backward is None:
        return

    grad_out = torch.randn_like(out)
    dq, dk, dv = backward(grad_out, q, k, v, mask, out, lse, media_len, scale, "mean")
    ref_grads = torch.autograd.grad(ref_out, leaves64, grad_out.double())
    lowp_grads = torch.autograd.grad(lowp_out, leaves_lowp, grad_out)
    grads = (dq, dk, dv)
    for name, ours, lowp, ref in zip(("dq", "dk", "dv"), grads, lowp_grads, ref_grads, strict=True):
        assert_within_policy(name, ours, lowp, ref, dtype)
    assert not dq[empty].any(), "dq: a mean row's scores are constant, its dq is 0"
    # dv = (the zero-rule dv) + the mean rows' dO / Lk: the difference, computed in float64 from
    # the reference, must match to the dtype's rounding.
    zero_dv = torch.autograd.grad(
        image_text_attention_reference(
            *leaves64, mask, media_len=media_len, scale=scale, empty_rows="zero"
        ),
        leaves64[2],
        grad_out.double(),
    )[0]
    mean_term = (grad_out.double() * empty[:, :, None, None]).sum(1)  # [B, Hq, Dh]
    mean_term = mean_term.view(mean_term.shape[0], k.shape[2], group, -1).sum(2) / keys
    expected_dv = zero_dv + mean_term[:, None]
    bound = (1e-5 if dtype == torch.float32 else 2.0**-6) * (1 + expected_dv.abs().max().item())
    err = (dv.double() - expected_dv).abs().max().item()
    assert err <= bound, f"dv: max error {err:.2e} vs the zero-rule dv + mean term (bound {bound})"


# (batch, Lq, Hq, Hkv, Dh, chunks, media_len, dtype, mask kind, fused qkv (strided q/k/v)). "random"
# plants a row that sees no chunk in every batch entry among normal rows; "none" hides every chunk
# from every row. Lq <= 16 is the decode range of the Triton forward.
CPU_CASES = [
    (2, 9, 4, 4, 64, 3, 5, F32, "random", False),
    (2, 1, 8, 2, 64, 3, 17, F32, "none", False),
    (2, 16, 8, 2, 64, 4, 13, BF16, "random", False),
    (1, 97, 8, 2, 80, 2, 17, BF16, "random", False),
    (1, 97, 8, 1, 128, 3, 17, F32, "random", True),
    (2, 40, 4, 2, 64, 4, 9, F16, "random", False),
    (2, 33, 4, 1, 64, 2, 16, BF16, "none", False),
    (3, 300, 4, 2, 64, 3, 40, F32, "random", False),
    (1, 7, 4, 2, 64, 3, 5, BF16, "random", True),
]


def _case_id(case):
    batch, query_len, hq, hkv, dh, chunks, media_len, dtype, kind, fused = case
    name = str(dtype).replace("torch.", "")
    strided = "-strided" if fused else ""
    return f"{name}-B{batch}-Lq{query_len}-h{hq}/{hkv}-d{dh}-M{chunks}x{media_len}-{kind}{strided}"


def _make(case, device=None):
    batch, query_len, hq, hkv, dh, chunks, media_len, dtype, kind, fused = case
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
        empty_rows="mean",
        fused_qkv=fused,
        device=device,
    )
    if chunks > 2:
        attention.media_mask[:, :, 1] = False  # a chunk no row sees: its values still count
    return attention


def _cpu_kernels():
    if ON_CUDA:
        pytest.skip("the C++ CPU kernels run CPU tensors only (VLMK_TEST_DEVICE=cuda)")
    from vlm_kernels._backends import _extension

    extension = _extension()[0]
    if extension is None or not extension.image_text_attention_cpu_supported():
        pytest.skip("no C++ extension with the AVX-512 CPU kernels here")
    return extension


def cpu_forward(q, k, v, mask, media_len, scale, empty_rows):
    return _cpu_kernels().image_text_attention_fwd_cpu(
        q, k, v, mask, media_len, scale, CPU_EMPTY_ROW_CODES[empty_rows]
    )


def cpu_backward(grad_out, q, k, v, mask, out, lse, media_len, scale, empty_rows):
    return _cpu_kernels().image_text_attention_bwd_cpu(
        grad_out, q, k, v, mask, out, lse, media_len, scale, CPU_EMPTY_ROW_CODES[empty_rows]
    )


@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_cpu_kernels_match_reference(case):
    _cpu_kernels()
    check_mean_against_reference(_make(case, device="cpu"), cpu_forward, cpu_backward)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernels_match_reference_at_any_thread_count(threads):
    _cpu_kernels()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        case = (1, 20, 8, 2, 64, 3, 7, F32, "random", False)
        check_mean_against_reference(_make(case, device="cpu"), cpu_forward, cpu_backward)
    finally:
        torch.set_num_threads(before)


def test_cpu_kernels_reject_an_unknown_mode_code():
    extension = _cpu_kernels()
    q = torch.randn(1, 4, 1, 8)
    mask = torch.ones(1, 4, 1, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"empty_rows must be 0 \(zero\), 1 \(uniform\)"):
        extension.image_text_attention_fwd_cpu(q, q, q, mask, 4, 0.25, 3)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("schedule", [False, True], ids=["mask", "schedule"])
@pytest.mark.parametrize("query_len", [5, 40])
def test_public_op_runs_the_kernel_with_autograd(backend, schedule, query_len):
    """Through vk.image_text_attention (autograd, plain mask or MediaSchedule): the kernel's gradients
    equal the reference's within the float32 bound."""
    if backend == "cpu":
        _cpu_kernels()
    if backend == "triton" and not _triton_runs():
        pytest.skip("triton cannot run here")
    device = "cpu" if backend == "cpu" else TEST_DEVICE
    attention = _make((2, query_len, 4, 2, 64, 3, 5, F32, "random", False), device=device)
    leaves = [t.detach().clone().requires_grad_() for t in (attention.q, attention.k, attention.v)]
    mask = attention.media_mask
    target = vk.MediaSchedule(mask, media_len=5, empty_rows="mean") if schedule else mask
    kwargs = {} if schedule else dict(media_len=5, empty_rows="mean")
    out = vk.image_text_attention(*leaves, target, backend=backend, **kwargs)
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad((out * cotangent).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected = flamingo_spec(*leaves64, mask, 5, 64**-0.5)
    expected_grads = torch.autograd.grad((expected * cotangent.double()).sum(), leaves64)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for name, ours, theirs in zip("qkv", grads, expected_grads, strict=True):
        err = (ours.double() - theirs).abs().max().item()
        assert err <= 1e-5 * (1 + theirs.abs().max().item()), f"d{name}: max error {err:.2e}"


# ---- Triton ----------------------------------------------------------------------------------------


def _triton_runs() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return ON_CUDA or bool(triton.knobs.runtime.interpret)


def _ita():
    if not _triton_runs():
        pytest.skip("triton is missing, or TRITON_INTERPRET=1 was not set before it was imported")
    from vlm_kernels.triton import image_text_attention as ita

    return ita


def triton_forward(q, k, v, mask, media_len, scale, empty_rows):
    return _ita().image_text_attention_fwd_triton(q, k, v, mask, media_len, scale, empty_rows)


def triton_prefill_forward(q, k, v, mask, media_len, scale, empty_rows):
    """The prefill kernel whatever Lq (the forward sends Lq <= 16 to the decode path)."""
    ita = _ita()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    ita._prefill_forward(q, k, v, mask, media_len, scale, empty_rows, out, lse)
    write_mean_rows(v, mask, out, lse)
    return out, lse


def triton_backward(grad_out, q, k, v, mask, out, lse, media_len, scale, empty_rows):
    return _ita().image_text_attention_bwd_triton(
        grad_out, q, k, v, mask, out, lse, media_len, scale, empty_rows
    )


def triton_backward_single_pass(grad_out, q, k, v, mask, out, lse, media_len, scale, empty_rows):
    return _ita().image_text_attention_bwd_triton(
        grad_out, q, k, v, mask, out, lse, media_len, scale, empty_rows, deterministic=False
    )


# Smaller than the CPU cases: the interpreter runs every program in numpy.
TRITON_CASES = [
    (2, 9, 4, 2, 64, 3, 5, F32, "random", False),
    (1, 1, 8, 1, 64, 3, 17, BF16, "none", False),
    (1, 40, 8, 2, 80, 3, 17, BF16, "random", False),
    (1, 40, 4, 4, 64, 4, 9, F32, "random", True),
    (2, 33, 4, 1, 64, 2, 16, F16, "none", False),
    (1, 16, 4, 2, 64, 3, 13, F32, "random", True),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_kernels_match_reference(case):
    _ita()
    check_mean_against_reference(_make(case, device=TEST_DEVICE), triton_forward, triton_backward)


@pytest.mark.parametrize("query_len", [7, 40])
def test_triton_single_pass_backward_and_prefill_at_decode_lengths(query_len):
    _ita()
    case = (1, query_len, 4, 2, 64, 3, 13, F32, "random", False)
    attention = _make(case, device=TEST_DEVICE)
    check_mean_against_reference(attention, triton_prefill_forward, triton_backward_single_pass)


def _config_cases():
    if not _triton_runs():
        return []
    from vlm_kernels.triton import image_text_attention as ita

    return [
        (width, index)
        for width in (2, 4)
        for index in range(max(len(c) for c in ita._kernel_configs(ita._TILES[width]).values()))
    ]


@contextlib.contextmanager
def _every_kernel_at_config(width: int, index: int):
    """Every image_text_attention kernel forced to config #index of its list for ``width`` (a
    shorter list runs its last config), as test_image_text_attention_triton.py does."""
    ita = _ita()
    from vlm_kernels.triton._launch import force_triton_config

    with contextlib.ExitStack() as stack:
        for name in ita._kernel_configs(ita._TILES[width]):
            stack.enter_context(force_triton_config(name, index))
        yield


@pytest.mark.parametrize(
    "width, index",
    _config_cases(),
    ids=[f"{'fp32' if w == 4 else '16bit'}-config{i}" for w, i in _config_cases()],
)
def test_triton_every_config_matches_reference(width, index):
    """Each kernel at config #index: prefill (partial query block, partial key tiles at 37 keys per
    chunk, Dh=80, GQA) with both backwards, and the split-KV decode over three splits."""
    ita = _ita()
    dtype = F32 if width == 4 else (BF16, F16)[index % 2]
    with _every_kernel_at_config(width, index):
        prefill = _make((1, 70, 4, 2, 80, 3, 37, dtype, "random", False), device=TEST_DEVICE)
        check_mean_against_reference(prefill, triton_forward, triton_backward)
        check_mean_against_reference(prefill, triton_forward, triton_backward_single_pass)
        decode = _make((1, 9, 8, 2, 80, 3, 37, dtype, "random", False), device=TEST_DEVICE)

        def decode_forward(q, k, v, mask, media_len, scale, empty_rows):
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), device=q.device)
            ita._decode_forward(q, k, v, mask, media_len, scale, empty_rows, out, lse, 3)
            write_mean_rows(v, mask, out, lse)
            return out, lse

        check_mean_against_reference(decode, decode_forward)


@pytest.mark.parametrize("query_len", [1, 16])
def test_triton_decode_path_does_no_host_sync(monkeypatch, query_len):
    """The "mean" decode forward (plain mask and MediaSchedule) stays free of host syncs, so it can
    be captured in a CUDA graph, as the other modes (tests/test_media_schedule.py)."""
    _ita()
    from tests.test_media_schedule import _inputs, _SyncGuard

    q, k, v, mask, media_len = _inputs(2, query_len, 4, 2, 16, 4, 3)
    q, k, v = (x.detach() for x in (q, k, v))
    expected = vk.image_text_attention(
        q, k, v, mask, media_len=media_len, empty_rows="mean", backend="reference"
    )
    guard = _SyncGuard(monkeypatch)
    guard.active = True
    try:
        schedule = vk.MediaSchedule(mask, media_len=media_len, empty_rows="mean")
        shared = vk.image_text_attention(q, k, v, schedule, backend="triton")
        plain = vk.image_text_attention(
            q, k, v, mask, media_len=media_len, empty_rows="mean", backend="triton"
        )
    finally:
        guard.active = False
    torch.testing.assert_close(shared, expected, atol=2e-5, rtol=2e-5)
    assert torch.equal(plain, shared)
    assert (~mask.any(-1)).any(), "the inputs must hold a mean row"


# ---- CUDA (through the SIMT emulator here) ------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted({"cuda", "cuda_sim"} & set(TABLE.forward)))
@pytest.mark.parametrize("query_len", [5, 40])
def test_cuda_backends_run_mean_rows(backend, query_len):
    """The CUDA kernels run "mean" rows as "zero" rows and the glue fills them (out = mean of v,
    lse = log(Lk); dv += their dO / Lk): forward, lse and gradients equal the float64 spec, through
    the public op with autograd (prefill and, at Lq = 5, the split-KV decode kernel)."""
    if backend == "cuda" and not ON_CUDA:
        pytest.skip("the cuda backend runs CUDA tensors")
    if backend == "cuda_sim" and ON_CUDA:
        pytest.skip("cuda_sim runs CPU tensors")
    device = "cpu" if backend == "cuda_sim" else TEST_DEVICE
    attention = _make((1, query_len, 4, 2, 64, 3, 5, F32, "random", False), device=device)
    leaves = [t.detach().clone().requires_grad_() for t in (attention.q, attention.k, attention.v)]
    mask = attention.media_mask
    assert (~mask.any(-1)).any(), "the inputs must hold a mean row"
    out = vk.image_text_attention(*leaves, mask, media_len=5, empty_rows="mean", backend=backend)
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad((out * cotangent).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected = flamingo_spec(*leaves64, mask, 5, 64**-0.5)
    expected_grads = torch.autograd.grad((expected * cotangent.double()).sum(), leaves64)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for name, ours, theirs in zip("qkv", grads, expected_grads, strict=True):
        err = (ours.double() - theirs).abs().max().item()
        assert err <= 1e-5 * (1 + theirs.abs().max().item()), f"d{name}: max error {err:.2e}"
    _, lse = TABLE.forward[backend](*(t.detach() for t in leaves), mask, 5, 64**-0.5, "mean")
    empty = ~mask.any(-1)
    assert torch.equal(
        lse.transpose(1, 2)[empty], torch.full_like(lse.transpose(1, 2)[empty], math.log(15))
    )


# ---- mode errors ---------------------------------------------------------------------------------------


def test_mode_errors_name_the_modes():
    q = torch.randn(1, 2, 1, 8)
    mask = torch.ones(1, 2, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\('zero', 'uniform', 'mean'\)"):
        vk.image_text_attention(q, q, q, mask, media_len=2, empty_rows="average")
    with pytest.raises(ValueError, match=r"\('zero', 'uniform', 'mean'\)"):
        vk.MediaSchedule(mask, media_len=2, empty_rows="average")
    assert vk.MediaSchedule(mask, media_len=2, empty_rows="mean").empty_rows == "mean"
