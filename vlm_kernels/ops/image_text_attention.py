"""image_text_attention: text queries attend to image keys under a per-token image mask.

    q [B, Lq, Hq, Dh], k/v [B, Lk, Hkv, Dh] (Hq % Hkv == 0), media_mask [B, Lq, M] bool, Lk == M * media_len
    out[b, t] = softmax(scale * q[b, t] k[b]^T, keys j with media_mask[b, t, j // media_len]) v[b]

The public function validates, then calls the custom op ``vlmk::image_text_attention``; its backward is
the custom op ``vlmk::image_text_attention_backward``. Backends: see ``TABLE`` at the bottom.

A ``vk.MediaSchedule`` may stand in for the mask (built once, shared by every layer): the public
function unpacks it into the op's tensor arguments (``vlm_kernels.ops.media_schedule`` says why).
"""

from __future__ import annotations

import math

import torch

from vlm_kernels._backends import _extension
from vlm_kernels._checks import (
    FLOAT_DTYPES,
    check_backend,
    check_head_dim,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from vlm_kernels.ops._registry import kernel_table
from vlm_kernels.ops.media_schedule import MediaSchedule, add_mean_rows_grad, write_mean_rows
from vlm_kernels.reference.image_text_attention import (
    image_text_attention_backward_reference,
    image_text_attention_reference,
)

EMPTY_ROW_MODES = ("zero", "uniform", "mean")
# The modes the CUDA kernels implement; "mean" (OpenFlamingo's all-previous-media rule) raises there
# (never a silent fallback). The reference, CPU and Triton backends implement every mode.
# The C++ CPU kernels' empty_rows codes (enum EmptyRows in csrc/cpu/image_text_attention.h).
CPU_EMPTY_ROW_CODES = {"zero": 0, "uniform": 1, "mean": 2}
TABLE = kernel_table("image_text_attention")


def image_text_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_mask: torch.Tensor | MediaSchedule,
    *,
    media_len: int | None = None,
    scale: float | None = None,
    empty_rows: str | None = None,
    backend: str | None = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """Cross-attention of text tokens to media tokens, each token seeing only its own media chunks.

    Args:
        q: [B, Lq, Hq, Dh] queries; any strides with a contiguous last dim (e.g. a slice of fused qkv).
        k, v: [B, Lk, Hkv, Dh] keys and values of the media tokens, ``Hq % Hkv == 0`` (GQA/MQA).
        media_mask: [B, Lq, M] bool, True where text token t may attend to media chunk m (an image or
            a tile); build it with ``vlm_kernels.masks``. Or a ``vk.MediaSchedule`` of such a mask,
            built once and shared by every layer (its chunk schedules are then not rebuilt per call);
            the result is identical to the plain-mask call.
        media_len: tokens per media chunk; ``Lk`` must equal ``M * media_len``. Required with a plain
            mask; with a schedule it comes from the schedule (if given too, it must agree).
        scale: softmax scale, default ``Dh ** -0.5``.
        empty_rows: "zero" (rows that see no chunk output 0, with 0 gradient), "uniform" (such rows
            attend to all Lk keys, as Hugging Face Mllama's additive mask makes them) or "mean" (such
            rows output the mean of all Lk values, as OpenFlamingo's all-previous-media mode does:
            every score of the row is filled with the same value; gradient to v only). Default "zero"
            with a plain mask; with a schedule it comes from the schedule (if given, it must agree;
            a schedule takes every mode). "mean" runs on the reference, cpu and triton backends; the
            cuda and cuda_sim kernels do not implement it and raise a ValueError naming themselves.
        backend: None/"auto", "reference", "cpu", "triton", "cuda" or "cuda_sim".
        deterministic: True (default): the backward is bitwise reproducible on every backend. False
            lets the Triton backward take its single pass (dk, dv and dq in one kernel, dq added with
            float32 atomics in run-dependent order, so its last bits may differ between runs), which
            skips the separate dq pass; ignored while ``torch.use_deterministic_algorithms(True)`` is
            in force (checked when the backward runs), and by the other backends, whose backward is
            deterministic.

    Returns:
        [B, Lq, Hq, Dh] in q's dtype. Softmax in float32.

    Precision of float32 inputs on the Triton backend: float32-grade products by default (3xTF32
    forward dots, FMA backward dots). Like a torch matmul, the backward honours PyTorch's TF32
    switch when it runs: after ``torch.set_float32_matmul_precision("high")`` (or ``"medium"``),
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or the legacy
    ``torch.backends.cuda.matmul.allow_tf32 = True``, its dots take TF32 inputs (10-bit mantissas,
    about 1e-3 relative error per product at Dh=128, on tensor cores). The forward keeps 3xTF32: a
    single TF32 rounding there put the output 40x over the float32 tolerance.
    """
    backend = check_backend(backend)
    schedule = media_mask if isinstance(media_mask, MediaSchedule) else None
    if schedule is not None:
        if media_len is not None and media_len != schedule.media_len:
            raise ValueError(
                f"media_len={media_len!r} disagrees with the MediaSchedule's media_len="
                f"{schedule.media_len}; pass the schedule alone (media_len comes from it)"
            )
        if empty_rows is not None and empty_rows != schedule.empty_rows:
            raise ValueError(
                f"empty_rows={empty_rows!r} disagrees with the MediaSchedule's empty_rows="
                f"{schedule.empty_rows!r}; build the schedule with the mode you want"
            )
        media_mask, media_len, empty_rows = (
            schedule.media_mask,
            schedule.media_len,
            schedule.empty_rows,
        )
    elif media_len is None:
        raise ValueError(
            "media_len is required with a plain media_mask (or pass a vk.MediaSchedule, which holds it)"
        )
    empty_rows = "zero" if empty_rows is None else empty_rows
    _check_inputs(q, k, v, media_mask, media_len, scale, empty_rows)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    row_bits = None
    if schedule is None:
        mask, schedule_tensors = media_mask, (None,) * 6
    else:
        mask = schedule.kernel_mask
        schedule_tensors = _schedule_tensors(schedule, q, k, v, backend)
        if schedule_tensors and _spans_tiles(q.dtype, mask.shape[2]):
            row_bits = schedule.chunk_bits()  # the Triton forward's spanning tiles read them
        schedule_tensors += (None,) * (6 - len(schedule_tensors))
    out, _ = image_text_attention_op(
        q,
        k,
        v,
        mask,
        media_len,
        scale,
        empty_rows,
        backend,
        *schedule_tensors,
        deterministic=deterministic,
        row_bits=row_bits,
    )
    return out


@torch.compiler.assume_constant_result
def _resolved_backend(device: torch.device, backend: str, dtype: torch.dtype) -> str:
    """The backend the op will run (a constant while tracing: it probes the machine, not tensors)."""
    return TABLE._backend(device, backend, dtype)


def _spans_tiles(dtype: torch.dtype, num_chunks: int) -> bool:
    from vlm_kernels.triton.image_text_attention import spans_tiles

    return spans_tiles(dtype, num_chunks)


def _schedule_tensors(
    schedule: MediaSchedule, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str
) -> tuple[torch.Tensor, ...]:
    """The schedule tensors the backend that will run reads, as the op's optional arguments: for the
    Triton kernels the forward schedule of the query block its launcher will run, and, when a
    gradient is needed, the backward's dq schedule and transposed (dk/dv) schedule. The C++ backends
    build theirs inside the kernel (they take ``kernel_mask`` only); the reference needs none."""
    if _resolved_backend(q.device, backend, q.dtype) != "triton":
        return ()
    from vlm_kernels.triton.image_text_attention import schedule_blocks

    forward_block, dq_block, dkdv_block = schedule_blocks(q, k, schedule.media_len)
    tensors = schedule.chunk_schedule(forward_block)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        tensors += schedule.chunk_schedule(dq_block) + schedule.transposed_schedule(dkdv_block)
    return tensors


def _check_inputs(q, k, v, media_mask, media_len, scale, empty_rows) -> None:
    check_tensor("q", q, ndim=4, dtypes=(*FLOAT_DTYPES, torch.float64), shape_doc="[B, Lq, Hq, Dh]")
    check_head_dim("q", q, "[B, Lq, Hq, Dh]")
    batch, query_len, heads_q, head_dim = q.shape
    check_tensor("k", k, ndim=4, shape=(batch, None, None, head_dim), shape_doc="[B, Lk, Hkv, Dh]")
    check_tensor("v", v, ndim=4, shape=tuple(k.shape), shape_doc="[B, Lk, Hkv, Dh] (= k's shape)")
    check_same_dtype(q=q, k=k, v=v)
    heads_kv = k.shape[2]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(
            f"the number of query heads Hq={heads_q} (q {tuple(q.shape)}) must be a multiple of the "
            f"number of key/value heads Hkv={heads_kv} (k {tuple(k.shape)})"
        )
    check_tensor(
        "media_mask",
        media_mask,
        ndim=3,
        dtypes=(torch.bool,),
        shape=(batch, query_len, None),
        shape_doc="[B, Lq, M]",
    )
    check_same_device(q=q, k=k, v=v, media_mask=media_mask)
    if isinstance(media_len, bool) or not isinstance(media_len, int) or media_len < 1:
        raise ValueError(f"media_len must be a positive int, got {media_len!r}")
    num_chunks = media_mask.shape[2]
    if k.shape[1] != num_chunks * media_len:
        raise ValueError(
            f"k has Lk={k.shape[1]} keys but media_mask has M={num_chunks} chunks of media_len="
            f"{media_len}: expected Lk == M * media_len == {num_chunks * media_len}"
        )
    if empty_rows not in EMPTY_ROW_MODES:
        raise ValueError(f"empty_rows must be one of {EMPTY_ROW_MODES}, got {empty_rows!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")


@torch.library.custom_op("vlmk::image_text_attention", mutates_args=())
def image_text_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_mask: torch.Tensor,
    media_len: int,
    scale: float,
    empty_rows: str,
    backend: str,
    chunk_count: torch.Tensor | None = None,
    chunk_ids: torch.Tensor | None = None,
    dq_chunk_count: torch.Tensor | None = None,
    dq_chunk_ids: torch.Tensor | None = None,
    qb_count: torch.Tensor | None = None,
    qb_ids: torch.Tensor | None = None,
    deterministic: bool = True,
    row_bits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, Lq, Hq, Dh], lse [B, Hq, Lq] float32, -inf on zeroed rows).

    The optional tensors are a ``MediaSchedule``'s, unpacked (then ``media_mask`` is its kernel mask):
    the forward chunk schedule and, for the backward, the dq and transposed schedules, and the
    per-row chunk bits of the forward's spanning tiles (``row_bits``, M <= 32) (the Triton kernels
    read them; the other backends ignore them). ``deterministic``: for the backward (see
    ``image_text_attention``); the forward is deterministic either way."""
    kernel = TABLE.forward_for(q.device, backend, q.dtype)
    if chunk_count is not None and kernel is _forward_triton:
        return kernel(
            q,
            k,
            v,
            media_mask,
            media_len,
            scale,
            empty_rows,
            schedule=(chunk_count, chunk_ids),
            row_bits=row_bits,
        )
    return kernel(q, k, v, media_mask, media_len, scale, empty_rows)


@image_text_attention_op.register_fake
def _(
    q,
    k,
    v,
    media_mask,
    media_len,
    scale,
    empty_rows,
    backend,
    *schedule,
    deterministic=True,
    row_bits=None,
):
    batch, query_len, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, query_len), dtype=torch.float32)


@torch.library.custom_op("vlmk::image_text_attention_backward", mutates_args=())
def image_text_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_mask: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    media_len: int,
    scale: float,
    empty_rows: str,
    backend: str,
    dq_chunk_count: torch.Tensor | None = None,
    dq_chunk_ids: torch.Tensor | None = None,
    qb_count: torch.Tensor | None = None,
    qb_ids: torch.Tensor | None = None,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) shaped like q, k, v. The optional tensors: a ``MediaSchedule``'s dq and
    transposed schedules (the Triton kernels read them). ``deterministic=False``: the Triton
    backward may take its single pass with atomic dq (see ``image_text_attention``)."""
    kernel = TABLE.backward_for(q.device, backend, q.dtype)
    args = (grad_out, q, k, v, media_mask, out, lse, media_len, scale, empty_rows)
    if kernel is not _backward_triton:
        return kernel(*args)
    schedule = None if dq_chunk_count is None else (dq_chunk_count, dq_chunk_ids, qb_count, qb_ids)
    return kernel(*args, schedule=schedule, deterministic=deterministic)


@image_text_attention_backward_op.register_fake
def _(
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
    backend,
    *schedule,
    deterministic=True,
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, media_mask, media_len, scale, empty_rows, backend = inputs[:8]
    # The backward's schedules (a MediaSchedule's dq and transposed schedules), when given.
    backward_schedule = tuple(inputs[10:14]) if len(inputs) >= 14 else (None,) * 4
    out, lse = output
    ctx.save_for_backward(q, k, v, media_mask, out, lse, *backward_schedule)
    ctx.args = (media_len, scale, empty_rows, backend)
    ctx.deterministic = inputs[14] if len(inputs) >= 15 else True
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, media_mask, out, lse, *backward_schedule = ctx.saved_tensors
    dq, dk, dv = image_text_attention_backward_op(
        grad_out.contiguous(),
        q,
        k,
        v,
        media_mask,
        out,
        lse,
        *ctx.args,
        *backward_schedule,
        deterministic=ctx.deterministic,
    )
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


image_text_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---- kernels, one entry per backend -------------------------------------------------------------------


def _forward_reference(q, k, v, media_mask, media_len, scale, empty_rows):
    out, lse = image_text_attention_reference(
        q,
        k,
        v,
        media_mask,
        media_len=media_len,
        scale=scale,
        empty_rows=empty_rows,
        return_lse=True,
    )
    return out.contiguous(), lse.float().contiguous()


def _backward_reference(grad_out, q, k, v, media_mask, out, lse, media_len, scale, empty_rows):
    dq, dk, dv = image_text_attention_backward_reference(
        grad_out,
        q,
        k,
        v,
        media_mask,
        out,
        lse,
        media_len=media_len,
        scale=scale,
        empty_rows=empty_rows,
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _compiled_forward(function_name: str):
    """A forward kernel of vlm_kernels._C (head dims 64/80/96/128). The kernels implement "zero" and
    "uniform"; "mean" rows run as "zero" rows, then ``write_mean_rows`` (device ops) fills them."""

    def kernel(q, k, v, media_mask, media_len, scale, empty_rows):
        if q.shape[-1] not in CUDA_HEAD_DIMS:
            raise ValueError(
                f"{function_name} supports head dims {CUDA_HEAD_DIMS}, got Dh={q.shape[-1]}"
            )
        function = getattr(_extension()[0], function_name)
        out, lse = function(q, k, v, media_mask, media_len, scale, empty_rows == "uniform")
        if empty_rows == "mean" and k.shape[1] > 0:
            write_mean_rows(v, media_mask, out, lse)
        return out, lse

    kernel.__name__ = function_name
    return kernel


def _compiled_backward(function_name: str):
    """A backward kernel of vlm_kernels._C (head dims 64/80/96/128); "mean" rows as in the forward:
    "zero" rows for the kernels, then ``add_mean_rows_grad`` adds their only gradient (to dv)."""

    def kernel(grad_out, q, k, v, media_mask, out, lse, media_len, scale, empty_rows):
        if q.shape[-1] not in CUDA_HEAD_DIMS:
            raise ValueError(
                f"{function_name} supports head dims {CUDA_HEAD_DIMS}, got Dh={q.shape[-1]}"
            )
        grad_out, out = (x if x.stride(-1) == 1 else x.contiguous() for x in (grad_out, out))
        function = getattr(_extension()[0], function_name)
        dq, dk, dv = function(
            grad_out,
            q,
            k,
            v,
            media_mask,
            out,
            lse.float(),
            media_len,
            scale,
            empty_rows == "uniform",
        )
        if empty_rows == "mean" and k.shape[1] > 0:
            add_mean_rows_grad(grad_out, media_mask, dv)
        return dq, dk, dv

    kernel.__name__ = function_name
    return kernel


CUDA_HEAD_DIMS = (64, 80, 96, 128)

TABLE.forward["reference"] = _forward_reference
TABLE.backward["reference"] = _backward_reference
# CUDA: forward kernels (prefill, and split-KV decode for Lq <= 16) and the tensor-core backward
# (dq pass + dk/dv pass over the transposed chunk schedule, deterministic).
TABLE.forward["cuda"] = _compiled_forward("image_text_attention_fwd_cuda")
TABLE.forward["cuda_sim"] = _compiled_forward("image_text_attention_fwd_cuda_sim")
TABLE.backward["cuda"] = _compiled_backward("image_text_attention_bwd_cuda")
TABLE.backward["cuda_sim"] = _compiled_backward("image_text_attention_bwd_cuda_sim")


def _forward_triton(
    q, k, v, media_mask, media_len, scale, empty_rows, schedule=None, row_bits=None
):
    from vlm_kernels.triton.image_text_attention import image_text_attention_fwd_triton

    return image_text_attention_fwd_triton(
        q, k, v, media_mask, media_len, scale, empty_rows, schedule=schedule, row_bits=row_bits
    )


def _backward_triton(
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
    schedule=None,
    deterministic=True,
):
    from vlm_kernels.triton.image_text_attention import image_text_attention_bwd_triton

    return image_text_attention_bwd_triton(
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
        schedule=schedule,
        deterministic=deterministic,
    )


def _forward_cpu(q, k, v, media_mask, media_len, scale, empty_rows):
    return _extension()[0].image_text_attention_fwd_cpu(
        q, k, v, media_mask, media_len, scale, CPU_EMPTY_ROW_CODES[empty_rows]
    )


def _backward_cpu(grad_out, q, k, v, media_mask, out, lse, media_len, scale, empty_rows):
    return _extension()[0].image_text_attention_bwd_cpu(
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


def _cpu_supported() -> bool:
    """The C++ kernels need AVX-512 (checked at run time by the extension)."""
    extension = _extension()[0]
    return extension is not None and extension.image_text_attention_cpu_supported()


TABLE.forward["cpu"] = _forward_cpu
TABLE.backward["cpu"] = _backward_cpu
TABLE.usable["cpu"] = _cpu_supported
TABLE.forward["triton"] = _forward_triton
TABLE.backward["triton"] = _backward_triton
# The compiled and Triton kernels take 16/32-bit floats; float64 stays on the reference.
for _backend in ("cpu", "cuda", "cuda_sim", "triton"):
    TABLE.dtypes[_backend] = FLOAT_DTYPES
