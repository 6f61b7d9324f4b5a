"""concat_project: hidden states of several ViT layers, concatenated on the feature axis, then one Linear,
without the concatenated buffer.

    features: L tensors [..., D_l] (one leading shape), weight [N, sum_l D_l], bias [N]
    out = concat(features, -1) @ weight.T + bias        -> [..., N]

The public function validates, then calls the custom op ``vlmk::concat_project``; its backward is
``vlmk::concat_project_backward``. Backends: see ``TABLE`` at the bottom.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlm_kernels._backends import _extension
from vlm_kernels._checks import (
    FLOAT_DTYPES,
    check_backend,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from vlm_kernels.ops._registry import kernel_table
from vlm_kernels.reference.concat_project import (
    concat_project_backward_reference,
    concat_project_reference,
)

TABLE = kernel_table("concat_project")


def concat_project(
    features: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Projects the feature-axis concatenation of ``features`` with ``weight``/``bias``.

    Args:
        features: list or tuple of L >= 1 tensors [..., D_l] with the same leading shape and dtype.
        weight: [N, sum_l D_l], columns ordered like the concatenation (feature 0's columns first).
        bias: [N] or None.
        backend: None/"auto", "reference", "cpu", "triton", "cuda" or "cuda_sim".

    Returns:
        [..., N] in weight's dtype.
    """
    backend = check_backend(backend)
    _check_inputs(features, weight, bias)
    features = [f if f.shape[-1] <= 1 or f.stride(-1) == 1 else f.contiguous() for f in features]
    return concat_project_op(features, weight, bias, backend)


def _check_inputs(features, weight, bias) -> None:
    if not isinstance(features, (list, tuple)) or len(features) == 0:
        raise TypeError(
            f"features must be a non-empty list or tuple of tensors [..., D_l], got {features!r}"
        )
    for i, f in enumerate(features):
        check_tensor(f"features[{i}]", f, dtypes=(*FLOAT_DTYPES, torch.float64))
        if f.dim() == 0:
            raise ValueError(
                f"features[{i}] must have at least 1 dimension [..., D_l], got a scalar"
            )
        if f.shape[:-1] != features[0].shape[:-1]:
            raise ValueError(
                f"features must share their leading shape: features[0] is {tuple(features[0].shape)}, "
                f"features[{i}] is {tuple(f.shape)}"
            )
    total = sum(f.shape[-1] for f in features)
    check_tensor("weight", weight, ndim=2, shape=(None, total), shape_doc="[N, sum_l D_l]")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, shape=(weight.shape[0],), shape_doc="[N]")
    named = {f"features[{i}]": f for i, f in enumerate(features)}
    check_same_dtype(**named, weight=weight, bias=bias)
    check_same_device(**named, weight=weight, bias=bias)


@torch.library.custom_op("vlmk::concat_project", mutates_args=())
def concat_project_op(
    features: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, backend: str
) -> torch.Tensor:
    kernel = TABLE.forward_for(weight.device, backend, weight.dtype)
    return kernel(features, weight, bias)


@concat_project_op.register_fake
def _(features, weight, bias, backend):
    return weight.new_empty((*features[0].shape[:-1], weight.shape[0]))


@torch.library.custom_op("vlmk::concat_project_backward", mutates_args=())
def concat_project_backward_op(
    grad_out: torch.Tensor, features: list[torch.Tensor], weight: torch.Tensor, backend: str
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Returns (grad of each feature, grad_weight, grad_bias)."""
    kernel = TABLE.backward_for(weight.device, backend, weight.dtype)
    return kernel(grad_out, features, weight)


@concat_project_backward_op.register_fake
def _(grad_out, features, weight, backend):
    grad_features = [f.new_empty(f.shape) for f in features]
    return grad_features, weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


def _setup_context(ctx, inputs, output):
    features, weight, bias, backend = inputs
    ctx.save_for_backward(weight, *features)
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    weight, *features = ctx.saved_tensors
    grad_features, grad_weight, grad_bias = concat_project_backward_op(
        grad_out.contiguous(), features, weight, ctx.backend
    )
    return grad_features, grad_weight, grad_bias if ctx.has_bias else None, None


concat_project_op.register_autograd(_backward, setup_context=_setup_context)


# ---- kernels, one entry per backend -------------------------------------------------------------------


def _forward_reference(features, weight, bias):
    return concat_project_reference(features, weight, bias).contiguous()


def _backward_reference(grad_out, features, weight):
    grad_features, grad_weight, grad_bias = concat_project_backward_reference(
        grad_out, features, weight
    )
    return [g.contiguous() for g in grad_features], grad_weight.contiguous(), grad_bias


TABLE.forward["reference"] = _forward_reference
TABLE.backward["reference"] = _backward_reference


def _forward_triton(features, weight, bias):
    from vlm_kernels.triton.concat_project import concat_project_fwd_triton

    return concat_project_fwd_triton(features, weight, bias)


def _backward_triton(grad_out, features, weight):
    from vlm_kernels.triton.concat_project import concat_project_bwd_triton

    return concat_project_bwd_triton(grad_out, features, weight)


def _forward_cpu(features, weight, bias):
    return _extension()[0].concat_project_fwd_cpu(features, weight, bias)


def _backward_cpu(grad_out, features, weight):
    return _extension()[0].concat_project_bwd_cpu(grad_out, features, weight)


TABLE.forward["cpu"] = _forward_cpu
TABLE.backward["cpu"] = _backward_cpu
TABLE.forward["triton"] = _forward_triton
TABLE.backward["triton"] = _backward_triton
# The C++ and Triton kernels take 16/32-bit floats (weight dtype); float64 stays on the reference.
for _backend in ("cpu", "triton"):
    TABLE.dtypes[_backend] = FLOAT_DTYPES


def _compiled_forward(function_name: str):
    """A forward kernel of vlm_kernels._C (the CUDA kernels: cuda, or cuda_sim through the emulator)."""

    def kernel(features, weight, bias):
        return getattr(_extension()[0], function_name)(list(features), weight, bias)

    kernel.__name__ = function_name
    return kernel


def _compiled_backward(function_name: str):
    """A backward kernel of vlm_kernels._C: (grad of each feature, grad_weight, grad_bias)."""

    def kernel(grad_out, features, weight):
        grad_features, grad_weight, grad_bias = getattr(_extension()[0], function_name)(
            grad_out, list(features), weight
        )
        return list(grad_features), grad_weight, grad_bias

    kernel.__name__ = function_name
    return kernel


# CUDA: one tensor-core GEMM whose K loop walks the sources' pointers (8 per launch, more in
# chunks), float32 as 3xTF32; backward on tensor cores with a deterministic split-T weight
# gradient. csrc/cuda/concat_project.cu.
TABLE.forward["cuda"] = _compiled_forward("concat_project_fwd_cuda")
TABLE.forward["cuda_sim"] = _compiled_forward("concat_project_fwd_cuda_sim")
TABLE.backward["cuda"] = _compiled_backward("concat_project_bwd_cuda")
TABLE.backward["cuda_sim"] = _compiled_backward("concat_project_bwd_cuda_sim")
TABLE.dtypes["cuda"] = FLOAT_DTYPES  # float64: the reference
TABLE.dtypes["cuda_sim"] = FLOAT_DTYPES
