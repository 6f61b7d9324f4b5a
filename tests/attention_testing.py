"""Shared helpers for the attention kernel tests: input builders, mask generators and the tolerance policy
of DESIGN §6 (err(ours) <= 2 * err(torch in the same low precision) + floor, both against float64).

A kernel under test is given as two callables with the kernel-table signatures of
``vlm_kernels/ops/image_text_attention.py``:
    forward(q, k, v, media_mask, media_len, scale, empty_rows) -> (out [B, Lq, Hq, Dh], lse [B, Hq, Lq] fp32)
    backward(grad_out, q, k, v, media_mask, out, lse, media_len, scale, empty_rows) -> (dq, dk, dv)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlm_kernels.reference.image_text_attention import image_text_attention_reference

# The floor of the bound, for when torch's own low-precision error is ~0 (e.g. a row of one visible
# key, or a tiny case whose few elements happen to round well in torch): float32 an absolute 1e-5;
# 16-bit types two ulps of the largest reference value (4 x unit roundoff x max|ref|: the output's own
# rounding plus the 16-bit P of the PV product; a bf16 decode case with 6 rows measured 3.2x torch's
# max error at 1.2e-2). An absolute 2e-2 bf16 floor let a kernel with a 3% softmax-scale error pass
# (its max error 0.04-0.07 at max|ref| ~1.5); this floor and the RMS check below (floor: one unit
# roundoff of the RMS) catch it (tests/test_attention_testing.py plants it).
MAX_FLOOR_ROUNDOFFS = 4
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 0.0, torch.float16: 0.0}
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def random_media_mask(
    batch: int, query_len: int, chunks: int, kind: str = "random", *, generator=None
) -> torch.Tensor:
    """[B, Lq, M] bool. kinds: "random" (independent, with one empty and one full row planted),
    "runs" (text split into M equal runs, run i sees chunk i: the Mllama "1 of M" case),
    "all" (every chunk visible), "none" (no chunk visible), "gappy" (non-contiguous visibility:
    every other chunk)."""
    if kind == "random":
        mask = torch.rand(batch, query_len, chunks, generator=generator) < 0.5
        if query_len > 1:
            mask[:, 0] = False  # a row that sees nothing
            mask[:, -1] = True  # a row that sees everything
        return mask
    if kind == "runs":
        run = torch.arange(query_len) * chunks // max(query_len, 1)
        return (run[:, None] == torch.arange(chunks)).expand(batch, query_len, chunks).clone()
    if kind == "all":
        return torch.ones(batch, query_len, chunks, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(batch, query_len, chunks, dtype=torch.bool)
    if kind == "gappy":
        return (torch.arange(chunks) % 2 == 0).expand(batch, query_len, chunks).clone()
    raise ValueError(f"unknown mask kind {kind!r}")


@dataclass
class AttentionCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    media_mask: torch.Tensor
    media_len: int
    scale: float
    empty_rows: str


def make_case(
    batch: int,
    query_len: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    chunks: int,
    media_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    mask_kind: str = "random",
    empty_rows: str = "zero",
    fused_qkv: bool = False,
    logit_scale: float = 1.0,
    device: str | torch.device | None = None,
) -> AttentionCase:
    """Random inputs (fresh each call). ``fused_qkv``: q, k and v are strided slices of one
    [B, L, 3 * H, Dh] tensor, the layout a fused projection produces. ``logit_scale`` multiplies q
    (large values test overflow safety of the online softmax). ``device`` None: torch's default device
    (the ``tensors_on_test_device`` fixture of tests/conftest.py sets it)."""
    keys = chunks * media_len
    if fused_qkv:
        length = max(query_len, keys)
        heads = max(heads_q, heads_kv)
        fused = torch.randn(batch, length, 3 * heads, head_dim, device=device).to(dtype)
        q = fused[:, :query_len, :heads_q]
        k = fused[:, :keys, heads : heads + heads_kv]
        v = fused[:, :keys, 2 * heads : 2 * heads + heads_kv]
    else:
        q = torch.randn(batch, query_len, heads_q, head_dim, device=device).to(dtype)
        k = torch.randn(batch, keys, heads_kv, head_dim, device=device).to(dtype)
        v = torch.randn(batch, keys, heads_kv, head_dim, device=device).to(dtype)
    if logit_scale != 1.0:
        q = (q.float() * logit_scale).to(dtype)
    mask = random_media_mask(batch, query_len, chunks, mask_kind).to(q.device)
    return AttentionCase(q, k, v, mask, media_len, head_dim**-0.5, empty_rows)


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def _rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item() if x.numel() else 0.0


def policy_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """The floor of the max-error bound for outputs ``ref`` in ``dtype`` (see FLOOR)."""
    largest = ref.abs().max().item() if ref.numel() else 0.0
    return FLOOR[dtype] + MAX_FLOOR_ROUNDOFFS * UNIT_ROUNDOFF[dtype] * largest


def assert_within_policy(
    name: str,
    ours: torch.Tensor,
    lowp: torch.Tensor,
    ref: torch.Tensor,
    dtype,
    extra_floor: float = 0.0,
):
    """ours and lowp (torch's same computation in ``dtype``) against ref (float64), DESIGN §6:
    max error <= 2 * torch's max error + floor (+ ``extra_floor``), and the same for the RMS error (a
    small systematic error, e.g. a wrong softmax scale, hides under the max of rounding noise but not
    under its RMS)."""
    assert not torch.isnan(ours).any(), f"{name}: NaN in output"
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ref = ref.double()
    err, err_lowp = _max_err(ours, ref), _max_err(lowp, ref)
    floor = policy_floor(ref, dtype) + extra_floor
    assert err <= 2 * err_lowp + floor, (
        f"{name}: max error {err:.3e} > 2 * {err_lowp:.3e} (torch {dtype}) + floor {floor:.1e}"
    )
    rms, rms_lowp = _rms(ours.double() - ref), _rms(lowp.double() - ref)
    rms_floor = FLOOR[dtype] + UNIT_ROUNDOFF[dtype] * _rms(ref)
    assert rms <= 2 * rms_lowp + rms_floor, (
        f"{name}: RMS error {rms:.3e} > 2 * {rms_lowp:.3e} (torch {dtype}) + floor {rms_floor:.1e}"
    )


def check_against_reference(
    case: AttentionCase,
    forward: Callable,
    backward: Callable | None = None,
) -> None:
    """Runs ``forward`` (and ``backward``) on ``case`` and checks out, lse (and dq, dk, dv) against the
    float64 reference, with torch's own error in the case's dtype as the yardstick."""
    dtype = case.q.dtype
    args = (case.media_mask, case.media_len, case.scale, case.empty_rows)
    out, lse = forward(case.q, case.k, case.v, *args)

    leaves64 = [t.detach().double().requires_grad_() for t in (case.q, case.k, case.v)]
    leaves_lowp = [t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v)]
    kwargs = dict(media_len=case.media_len, scale=case.scale, empty_rows=case.empty_rows)
    ref_out, ref_lse = image_text_attention_reference(
        *leaves64, case.media_mask, return_lse=True, **kwargs
    )
    lowp_out = _lowp_attention(*leaves_lowp, case.media_mask, **kwargs)
    assert_within_policy("out", out, lowp_out, ref_out, dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf exactly on rows that see nothing"
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-3, atol=1e-3)
    if backward is None:
        return
    grad_out = torch.randn_like(out)
    grads = backward(grad_out, case.q, case.k, case.v, case.media_mask, out, lse, *args[1:])
    ref_grads = torch.autograd.grad(ref_out, leaves64, grad_out.double())
    lowp_grads = torch.autograd.grad(lowp_out, leaves_lowp, grad_out)
    # Loosened for large logits: the kernels' backward recomputes P = exp(s - lse) from the float32
    # lse the forward saved, where torch's autograd keeps the forward's probabilities. s and lse are
    # rounded to float32 at their magnitude, so every P carries a relative error of about
    # eps_fp32 * |lse| (139 at logit_scale 30: 1.7e-5, with the exact lse rounded to float32 too),
    # which no kernel of this design avoids and torch's yardstick does not have. Negligible for
    # ordinary logits (|lse| ~ 5).
    largest_lse = ref_lse[finite].abs().max().item() if finite.any() else 0.0
    relative = torch.finfo(torch.float32).eps * largest_lse
    for name, ours, lowp, ref in zip(("dq", "dk", "dv"), grads, lowp_grads, ref_grads, strict=True):
        recompute_floor = relative * (ref.abs().max().item() if ref.numel() else 0.0)
        assert_within_policy(name, ours, lowp, ref, dtype, extra_floor=recompute_floor)


def _lowp_attention(q, k, v, media_mask, *, media_len, scale, empty_rows):
    """The same attention computed by torch in the inputs' own dtype (scores, softmax and products in
    low precision, as SDPA's math path does): the yardstick for acceptable low-precision error."""
    if q.dtype == torch.float32:
        return image_text_attention_reference(
            q, k, v, media_mask, media_len=media_len, scale=scale, empty_rows=empty_rows
        )
    group = q.shape[2] // k.shape[2]
    visible = media_mask.repeat_interleave(media_len, dim=-1)
    if empty_rows == "uniform":
        visible = visible | ~media_mask.any(-1, keepdim=True)
    row_empty = ~visible.any(-1)[:, None, :, None]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, 1)
    vh = v.transpose(1, 2).repeat_interleave(group, 1)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None] & ~row_empty, float("-inf")).masked_fill(
        row_empty, 0
    )
    probs = torch.softmax(scores, dim=-1).masked_fill(row_empty, 0)
    return (probs @ vh).transpose(1, 2)
