"""perceiver_attention: Perceiver-resampler latents attend to [media tokens ; latents], without the concat.

    q [B, Nl, Hq, Dh], k_media/v_media [B, Nm, Hkv, Dh], k_latents/v_latents [B, Nl, Hkv, Dh],
    media_padding_mask [B, Nm] bool (True = real token)
    out = softmax(scale * q [k_media ; k_latents]^T, padded media tokens excluded) [v_media ; v_latents]

The public function validates, then calls the custom op ``vlmk::perceiver_attention``; its backward is
``vlmk::perceiver_attention_backward``. Backends: see ``TABLE`` at the bottom.
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
from vlm_kernels.reference.perceiver_attention import (
    perceiver_attention_backward_reference,
    perceiver_attention_reference,
)

TABLE = kernel_table("perceiver_attention")


def perceiver_attention(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor,
    v_latents: torch.Tensor,
    *,
    media_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of the latents to the media tokens followed by the latents themselves.

    Args:
        q: [B, Nl, Hq, Dh] queries from the latents.
        k_media, v_media: [B, Nm, Hkv, Dh] keys/values of the media tokens (video: frames x tokens
            flattened into Nm by the caller); ``Hq % Hkv == 0``.
        k_latents, v_latents: [B, Nl, Hkv, Dh] keys/values of the latents (always visible).
        media_padding_mask: [B, Nm] bool, True = real token, False = padding to ignore.
        scale: softmax scale, default ``Dh ** -0.5``.
        backend: None/"auto", "reference", "cpu", "triton", "cuda" or "cuda_sim".

    Returns:
        [B, Nl, Hq, Dh] in q's dtype. Softmax in float32.
    """
    backend = check_backend(backend)
    _check_inputs(q, k_media, v_media, k_latents, v_latents, media_padding_mask, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tensors = (
        x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()
        for x in (q, k_media, v_media, k_latents, v_latents)
    )
    out, _ = perceiver_attention_op(*tensors, media_padding_mask, scale, backend)
    return out


def _check_inputs(q, k_media, v_media, k_latents, v_latents, media_padding_mask, scale) -> None:
    check_tensor("q", q, ndim=4, dtypes=(*FLOAT_DTYPES, torch.float64), shape_doc="[B, Nl, Hq, Dh]")
    check_head_dim("q", q, "[B, Nl, Hq, Dh]")
    batch, num_latents, heads_q, head_dim = q.shape
    check_tensor(
        "k_media",
        k_media,
        ndim=4,
        shape=(batch, None, None, head_dim),
        shape_doc="[B, Nm, Hkv, Dh]",
    )
    batch, num_media, heads_kv, _ = k_media.shape
    check_tensor(
        "v_media", v_media, ndim=4, shape=tuple(k_media.shape), shape_doc="[B, Nm, Hkv, Dh]"
    )
    latent_shape = (batch, num_latents, heads_kv, head_dim)
    check_tensor("k_latents", k_latents, ndim=4, shape=latent_shape, shape_doc="[B, Nl, Hkv, Dh]")
    check_tensor("v_latents", v_latents, ndim=4, shape=latent_shape, shape_doc="[B, Nl, Hkv, Dh]")
    check_same_dtype(
        q=q, k_media=k_media, v_media=v_media, k_latents=k_latents, v_latents=v_latents
    )
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(
            f"the number of query heads Hq={heads_q} (q {tuple(q.shape)}) must be a multiple of the "
            f"number of key/value heads Hkv={heads_kv} (k_media {tuple(k_media.shape)})"
        )
    if media_padding_mask is not None:
        check_tensor(
            "media_padding_mask",
            media_padding_mask,
            ndim=2,
            dtypes=(torch.bool,),
            shape=(batch, num_media),
            shape_doc="[B, Nm]",
        )
    check_same_device(
        q=q,
        k_media=k_media,
        v_media=v_media,
        k_latents=k_latents,
        v_latents=v_latents,
        media_padding_mask=media_padding_mask,
    )
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")


@torch.library.custom_op("vlmk::perceiver_attention", mutates_args=())
def perceiver_attention_op(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor,
    v_latents: torch.Tensor,
    media_padding_mask: torch.Tensor | None,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, Nl, Hq, Dh], lse [B, Hq, Nl] float32)."""
    kernel = TABLE.forward_for(q.device, backend, q.dtype)
    return kernel(q, k_media, v_media, k_latents, v_latents, media_padding_mask, scale)


@perceiver_attention_op.register_fake
def _(q, k_media, v_media, k_latents, v_latents, media_padding_mask, scale, backend):
    batch, num_latents, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, num_latents), dtype=torch.float32)


@torch.library.custom_op("vlmk::perceiver_attention_backward", mutates_args=())
def perceiver_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor,
    v_latents: torch.Tensor,
    media_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk_media, dv_media, dk_latents, dv_latents)."""
    kernel = TABLE.backward_for(q.device, backend, q.dtype)
    return kernel(
        grad_out, q, k_media, v_media, k_latents, v_latents, media_padding_mask, out, lse, scale
    )


@perceiver_attention_backward_op.register_fake
def _(
    grad_out,
    q,
    k_media,
    v_media,
    k_latents,
    v_latents,
    media_padding_mask,
    out,
    lse,
    scale,
    backend,
):
    return tuple(x.new_empty(x.shape) for x in (q, k_media, v_media, k_latents, v_latents))


def _setup_context(ctx, inputs, output):
    *tensors, media_padding_mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(*tensors, media_padding_mask, out, lse)
    ctx.args = (scale, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    grads = perceiver_attention_backward_op(grad_out.contiguous(), *ctx.saved_tensors, *ctx.args)
    return (*grads, None, None, None)


perceiver_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---- kernels, one entry per backend -------------------------------------------------------------------


def _forward_reference(q, k_media, v_media, k_latents, v_latents, media_padding_mask, scale):
    out, lse = perceiver_attention_reference(
        q,
        k_media,
        v_media,
        k_latents,
        v_latents,
        media_padding_mask=media_padding_mask,
        scale=scale,
        return_lse=True,
    )
    return out.contiguous(), lse.float().contiguous()


def _backward_reference(
    grad_out, q, k_media, v_media, k_latents, v_latents, media_padding_mask, out, lse, scale
):
    grads = perceiver_attention_backward_reference(
        grad_out,
        q,
        k_media,
        v_media,
        k_latents,
        v_latents,
        media_padding_mask,
        out,
        lse,
        scale=scale,
    )
    return tuple(g.contiguous() for g in grads)


TABLE.forward["reference"] = _forward_reference
TABLE.backward["reference"] = _backward_reference


def _forward_cpu(q, k_media, v_media, k_latents, v_latents, media_padding_mask, scale):
    return _extension()[0].perceiver_attention_fwd_cpu(
        q, k_media, v_media, k_latents, v_latents, media_padding_mask, scale
    )


def _backward_cpu(
    grad_out, q, k_media, v_media, k_latents, v_latents, media_padding_mask, out, lse, scale
):
    return _extension()[0].perceiver_attention_bwd_cpu(
        grad_out, q, k_media, v_media, k_latents, v_latents, media_padding_mask, out, lse, scale
    )


def _cpu_supported() -> bool:
    """The C++ kernels need AVX-512 (checked at run time by the extension)."""
    extension = _extension()[0]
    return extension is not None and extension.perceiver_attention_cpu_supported()


TABLE.forward["cpu"] = _forward_cpu
TABLE.backward["cpu"] = _backward_cpu
TABLE.usable["cpu"] = _cpu_supported
# The C++ kernels take 16/32-bit floats; float64 stays on the reference.
TABLE.dtypes["cpu"] = FLOAT_DTYPES


def _forward_triton(q, k_media, v_media, k_latents, v_latents, media_padding_mask, scale):
    from vlm_kernels.triton.perceiver_attention import perceiver_attention_fwd_triton

    return perceiver_attention_fwd_triton(
        q, k_media, v_media, k_latents, v_latents, media_padding_mask, scale
    )


def _backward_triton(
    grad_out, q, k_media, v_media, k_latents, v_latents, media_padding_mask, out, lse, scale
):
    from vlm_kernels.triton.perceiver_attention import perceiver_attention_bwd_triton

    return perceiver_attention_bwd_triton(
        grad_out, q, k_media, v_media, k_latents, v_latents, media_padding_mask, out, lse, scale
    )


# Triton: flash-style forward and deterministic two-pass backward over the two segments in place.
TABLE.forward["triton"] = _forward_triton
TABLE.backward["triton"] = _backward_triton
TABLE.dtypes["triton"] = FLOAT_DTYPES  # 16/32-bit floats; float64 stays on the reference


# CUDA: the tensor-core forward and backward (dk/dv pass per key block of either segment + dq pass;
# deterministic), and the same source under the SIMT emulator on CPU tensors (cuda_sim).
CUDA_HEAD_DIMS = (64, 80, 96, 128)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_cuda_inputs(function_name: str, q: torch.Tensor) -> None:
    if q.dtype not in CUDA_DTYPES:
        raise ValueError(
            f"{function_name} supports dtypes {CUDA_DTYPES}, got q of {q.dtype}; use "
            f"backend='reference' for float64"
        )
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        raise ValueError(
            f"{function_name} supports head dims {CUDA_HEAD_DIMS}, got Dh={q.shape[-1]}"
        )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _compiled_forward(function_name: str):
    """A forward kernel of vlm_kernels._C."""

    def kernel(q, k_media, v_media, k_latents, v_latents, media_padding_mask, scale):
        _check_cuda_inputs(function_name, q)
        tensors = (_last_dim_contiguous(x) for x in (q, k_media, v_media, k_latents, v_latents))
        function = getattr(_extension()[0], function_name)
        return function(*tensors, media_padding_mask, scale)

    kernel.__name__ = function_name
    return kernel


def _compiled_backward(function_name: str):
    """A backward kernel of vlm_kernels._C: (dq, dk_media, dv_media, dk_latents, dv_latents)."""

    def kernel(
        grad_out, q, k_media, v_media, k_latents, v_latents, media_padding_mask, out, lse, scale
    ):
        _check_cuda_inputs(function_name, q)
        tensors = (
            _last_dim_contiguous(x) for x in (grad_out, q, k_media, v_media, k_latents, v_latents)
        )
        function = getattr(_extension()[0], function_name)
        return function(*tensors, media_padding_mask, _last_dim_contiguous(out), lse.float(), scale)

    kernel.__name__ = function_name
    return kernel


TABLE.forward["cuda"] = _compiled_forward("perceiver_attention_fwd_cuda")
TABLE.forward["cuda_sim"] = _compiled_forward("perceiver_attention_fwd_cuda_sim")
TABLE.backward["cuda"] = _compiled_backward("perceiver_attention_bwd_cuda")
TABLE.backward["cuda_sim"] = _compiled_backward("perceiver_attention_bwd_cuda_sim")
for _backend in ("cuda", "cuda_sim"):
    TABLE.dtypes[_backend] = FLOAT_DTYPES  # float64 on auto stays on the reference
