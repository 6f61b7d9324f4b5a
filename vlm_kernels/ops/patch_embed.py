"""patch_embed: image -> patch tokens (Conv2d with kernel = stride = P) with the pixel normalization fused
into the load and bias + CLS + position embedding in the epilogue.

    pixels [B, C, H, W] float or uint8, weight [D, C, P, P], bias [D], cls_token [D], pos_embed [N, D],
    pixel_mean / pixel_std [C]; out [B, N, D] with N = (H/P)*(W/P) + (1 if cls_token)

The public function validates, then calls the custom op ``vlmk::patch_embed``; its backward is
``vlmk::patch_embed_backward``. Backends: see ``TABLE`` at the bottom.
"""

from __future__ import annotations

import torch

from vlm_kernels._backends import _extension
from vlm_kernels._checks import (
    FLOAT_DTYPES,
    check_backend,
    check_same_device,
    check_tensor,
)
from vlm_kernels.ops._registry import kernel_table
from vlm_kernels.reference.patch_embed import (
    patch_embed_backward_reference,
    patch_embed_reference,
)

TABLE = kernel_table("patch_embed")
_ALL_FLOATS = (*FLOAT_DTYPES, torch.float64)


def patch_embed(
    pixels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    cls_token: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    pixel_mean: torch.Tensor | None = None,
    pixel_std: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Embeds non-overlapping P x P patches of ``pixels``.

    Args:
        pixels: [B, C, H, W], float (any float dtype) or uint8 (read as x / 255); H, W multiples of P.
        weight: [D, C, P, P] (timm/HF ``patch_embed.proj.weight``).
        bias: [D] or None.
        cls_token: [D] or None; when given, token 0 of the output is ``cls_token + pos_embed[0]``.
        pos_embed: [N, D] or None, N = (H/P)*(W/P) + (1 if cls_token).
        pixel_mean, pixel_std: [C] or None; the pixels are normalized as ``(x - mean) / std`` on load.
        backend: None/"auto", "reference", "cpu", "triton", "cuda" or "cuda_sim".

    Returns:
        [B, N, D] in weight's dtype, patches in row-major order.
    """
    backend = check_backend(backend)
    _check_inputs(pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std)
    return patch_embed_op(
        pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std, backend
    )


def _check_inputs(pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std) -> None:
    check_tensor(
        "pixels", pixels, ndim=4, dtypes=(*_ALL_FLOATS, torch.uint8), shape_doc="[B, C, H, W]"
    )
    check_tensor("weight", weight, ndim=4, dtypes=_ALL_FLOATS, shape_doc="[D, C, P, P]")
    dim, channels, patch, patch_w = weight.shape
    if patch != patch_w or patch == 0:
        raise ValueError(
            f"weight must be [D, C, P, P] with square P x P patches, got {tuple(weight.shape)}"
        )
    check_tensor("pixels", pixels, shape=(None, channels, None, None), shape_doc="[B, C, H, W]")
    height, width = pixels.shape[2:]
    if height % patch or width % patch:
        raise ValueError(
            f"pixels H={height} and W={width} (pixels {tuple(pixels.shape)}) must be multiples of the "
            f"patch size P={patch} (weight {tuple(weight.shape)})"
        )
    num_tokens = (height // patch) * (width // patch) + (cls_token is not None)
    for name, value, shape, doc in (
        ("bias", bias, (dim,), "[D]"),
        ("cls_token", cls_token, (dim,), "[D]"),
        ("pos_embed", pos_embed, (num_tokens, dim), "[N, D], N = (H/P)*(W/P) + (1 if cls_token)"),
    ):
        if value is not None:
            check_tensor(
                name, value, ndim=len(shape), dtypes=(weight.dtype,), shape=shape, shape_doc=doc
            )
    for name, value in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
        if value is not None:
            check_tensor(
                name, value, ndim=1, dtypes=_ALL_FLOATS, shape=(channels,), shape_doc="[C]"
            )
    check_same_device(
        pixels=pixels,
        weight=weight,
        bias=bias,
        cls_token=cls_token,
        pos_embed=pos_embed,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
    )


@torch.library.custom_op("vlmk::patch_embed", mutates_args=())
def patch_embed_op(
    pixels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    pixel_mean: torch.Tensor | None,
    pixel_std: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    kernel = TABLE.forward_for(weight.device, backend, weight.dtype)
    return kernel(pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std)


@patch_embed_op.register_fake
def _(pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std, backend):
    patch = weight.shape[2]
    num_tokens = (pixels.shape[2] // patch) * (pixels.shape[3] // patch) + (cls_token is not None)
    return weight.new_empty((pixels.shape[0], num_tokens, weight.shape[0]))


@torch.library.custom_op("vlmk::patch_embed_backward", mutates_args=())
def patch_embed_backward_op(
    grad_out: torch.Tensor,
    pixels: torch.Tensor,
    weight: torch.Tensor,
    pixel_mean: torch.Tensor | None,
    pixel_std: torch.Tensor | None,
    has_cls: bool,
    need_pixels_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_pixels or empty, grad_weight, grad_bias, grad_cls or empty, grad_pos)."""
    kernel = TABLE.backward_for(weight.device, backend, weight.dtype)
    return kernel(grad_out, pixels, weight, pixel_mean, pixel_std, has_cls, need_pixels_grad)


@patch_embed_backward_op.register_fake
def _(grad_out, pixels, weight, pixel_mean, pixel_std, has_cls, need_pixels_grad, backend):
    dim = weight.shape[0]
    grad_pixels = pixels.new_empty(pixels.shape if need_pixels_grad else (0,))
    grad_cls = weight.new_empty((dim,) if has_cls else (0,))
    grad_pos = weight.new_empty(grad_out.shape[1:])
    return grad_pixels, weight.new_empty(weight.shape), weight.new_empty((dim,)), grad_cls, grad_pos


def _setup_context(ctx, inputs, output):
    pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std, backend = inputs
    ctx.save_for_backward(pixels, weight, pixel_mean, pixel_std)
    ctx.present = (bias is not None, cls_token is not None, pos_embed is not None)
    ctx.backend = backend


def _backward(ctx, grad_out):
    pixels, weight, pixel_mean, pixel_std = ctx.saved_tensors
    has_bias, has_cls, has_pos = ctx.present
    need_pixels_grad = ctx.needs_input_grad[0]
    grad_pixels, grad_weight, grad_bias, grad_cls, grad_pos = patch_embed_backward_op(
        grad_out.contiguous(),
        pixels,
        weight,
        pixel_mean,
        pixel_std,
        has_cls,
        need_pixels_grad,
        ctx.backend,
    )
    return (
        grad_pixels if need_pixels_grad else None,
        grad_weight,
        grad_bias if has_bias else None,
        grad_cls if has_cls else None,
        grad_pos if has_pos else None,
        None,
        None,
        None,
    )


patch_embed_op.register_autograd(_backward, setup_context=_setup_context)


# ---- kernels, one entry per backend -------------------------------------------------------------------


def _forward_reference(pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std):
    return patch_embed_reference(
        pixels,
        weight,
        bias,
        cls_token=cls_token,
        pos_embed=pos_embed,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
    ).contiguous()


def _backward_reference(grad_out, pixels, weight, pixel_mean, pixel_std, has_cls, need_pixels_grad):
    grads = patch_embed_backward_reference(
        grad_out, pixels, weight, pixel_mean, pixel_std, has_cls, need_pixels_grad
    )
    return tuple(g.contiguous() for g in grads)


TABLE.forward["reference"] = _forward_reference
TABLE.backward["reference"] = _backward_reference


def _forward_triton(pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std):
    from vlm_kernels.triton.patch_embed import patch_embed_fwd_triton

    return patch_embed_fwd_triton(pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std)


def _backward_triton(grad_out, pixels, weight, pixel_mean, pixel_std, has_cls, need_pixels_grad):
    from vlm_kernels.triton.patch_embed import patch_embed_bwd_triton

    return patch_embed_bwd_triton(
        grad_out, pixels, weight, pixel_mean, pixel_std, has_cls, need_pixels_grad
    )


TABLE.forward["triton"] = _forward_triton
TABLE.backward["triton"] = _backward_triton
TABLE.dtypes["triton"] = FLOAT_DTYPES  # weight dtypes (float64: the reference)


def _compiled_forward(function_name: str):
    """A forward kernel of vlm_kernels._C (the CUDA kernels: cuda, or cuda_sim through the emulator)."""

    def kernel(pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std):
        function = getattr(_extension()[0], function_name)
        return function(pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std)

    kernel.__name__ = function_name
    return kernel


def _compiled_backward(function_name: str):
    """A backward kernel of vlm_kernels._C; grad_pixels only for float pixels."""

    def kernel(grad_out, pixels, weight, pixel_mean, pixel_std, has_cls, need_pixels_grad):
        if need_pixels_grad and pixels.dtype == torch.uint8:
            raise ValueError("patch_embed: uint8 pixels have no gradient")
        function = getattr(_extension()[0], function_name)
        return function(grad_out, pixels, weight, pixel_mean, pixel_std, has_cls, need_pixels_grad)

    kernel.__name__ = function_name
    return kernel


# CUDA: implicit GEMM on tensor cores (mma.sync; float32 as 3xTF32), forward and backward
# (deterministic split-K weight gradient), csrc/cuda/patch_embed*.cu.
TABLE.forward["cuda"] = _compiled_forward("patch_embed_fwd_cuda")
TABLE.forward["cuda_sim"] = _compiled_forward("patch_embed_fwd_cuda_sim")
TABLE.backward["cuda"] = _compiled_backward("patch_embed_bwd_cuda")
TABLE.backward["cuda_sim"] = _compiled_backward("patch_embed_bwd_cuda_sim")
for _backend in ("cuda", "cuda_sim"):
    TABLE.dtypes[_backend] = FLOAT_DTYPES  # weight dtypes (float64: the reference)


def _forward_cpu(pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std):
    return _extension()[0].patch_embed_fwd_cpu(
        pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std
    )


def _backward_cpu(grad_out, pixels, weight, pixel_mean, pixel_std, has_cls, need_pixels_grad):
    return _extension()[0].patch_embed_bwd_cpu(
        grad_out, pixels, weight, pixel_mean, pixel_std, has_cls, need_pixels_grad
    )


# CPU: implicit GEMM (patch gather + normalization fused into the packing of each block of patch
# rows), bf16 operands with float32 accumulation for bf16 weights, float32 otherwise.
TABLE.forward["cpu"] = _forward_cpu
TABLE.backward["cpu"] = _backward_cpu
TABLE.dtypes["cpu"] = FLOAT_DTYPES
