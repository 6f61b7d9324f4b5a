"""concat_project, reference: the multi-layer feature projector of Llama 3.2 Vision / LLaVA.

Shapes: features = L tensors [..., D_l] with one leading shape, weight [N, sum_l D_l], bias [N].

    out = concat(features, dim=-1) @ weight.T + bias          -> [..., N]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlm_kernels.reference._common import compute_dtype


def concat_project_reference(
    features: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The spec of ``vlm_kernels.concat_project``. Output dtype = weight dtype."""
    dtype = compute_dtype(weight, *features)
    x = torch.cat([f.to(dtype) for f in features], dim=-1)
    out = x @ weight.to(dtype).T
    if bias is not None:
        out = out + bias.to(dtype)
    return out.to(weight.dtype)


def concat_project_backward_reference(
    grad_out: torch.Tensor, features: Sequence[torch.Tensor], weight: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(grad of each feature, grad_weight, grad_bias) for the output cotangent ``grad_out [..., N]``."""
    dtype = compute_dtype(weight, *features)
    rows = grad_out.shape[:-1].numel()  # not reshape(-1, ...): ambiguous when N or K is 0
    grad = grad_out.to(dtype).reshape(rows, weight.shape[0])
    x = torch.cat([f.to(dtype) for f in features], dim=-1).reshape(rows, weight.shape[1])
    grad_x = grad @ weight.to(dtype)
    grad_features = []
    start = 0
    for f in features:
        width = f.shape[-1]
        grad_features.append(grad_x[:, start : start + width].reshape(f.shape).to(f.dtype))
        start += width
    return grad_features, (grad.T @ x).to(weight.dtype), grad.sum(0).to(weight.dtype)
