"""Shared pieces of the concat_project backend tests: inputs, the float64 reference, the PyTorch
peer of the tolerance, and the comparison.

Tolerance (DESIGN §6, the relative form for reductions): an output or gradient is compared with the
reference in float64; its error must stay within ``2 * err(torch) + floor``, where torch is
``F.linear(torch.cat(features, -1), weight, bias)`` run by autograd in the weight's dtype (what a
PyTorch user of that dtype gets) and ``floor`` a small per-dtype fraction of the reference's largest
magnitude. NaN never passes; kernel outputs are NaN-filled at allocation (``poisoned_allocations``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tests.allocations import poisoned_allocations
from vlm_kernels.reference.concat_project import (
    concat_project_backward_reference,
    concat_project_reference,
)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# Per dtype: the floor of the tolerance, as a fraction of the reference's largest magnitude.
FLOOR = {F32: 1e-5, BF16: 1e-2, F16: 2e-3}


def make_inputs(
    lead: Sequence[int],
    widths: Sequence[int],
    dim: int,
    dtype: torch.dtype,
    *,
    strided: bool = False,
    bias: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """``(features [*lead, D_l] per width, weight [dim, sum D_l], bias [dim] or None)``. ``strided``:
    every source is a last-dim slice of a wider tensor, and every other one also a slice along the
    first leading dim (leading dims that no longer collapse to one row stride), so no source is
    contiguous."""
    features = []
    for index, width in enumerate(widths):
        if not strided:
            features.append(torch.randn(*lead, width, dtype=dtype))
            continue
        if index % 2 and len(lead) > 1:  # rows 0, 2, 4... of a taller tensor: no single row stride
            wide = torch.randn(2 * lead[0], *lead[1:], width + 3, dtype=dtype)[::2]
        else:
            wide = torch.randn(*lead, width + 3, dtype=dtype)
        feature = wide[..., 2 : 2 + width]
        assert not feature.is_contiguous() or feature.numel() <= 1
        features.append(feature)
    total = sum(widths)
    weight = (torch.randn(dim, total) / max(total, 1) ** 0.5).to(dtype)
    return features, weight, (torch.randn(dim).to(dtype) if bias else None)


def reference64(features, weight, bias, grad_out):
    """Forward and gradients (features, weight, bias) of the reference in float64."""
    features64 = [f.double() for f in features]
    out = concat_project_reference(
        features64, weight.double(), None if bias is None else bias.double()
    )
    grads = concat_project_backward_reference(grad_out.double(), features64, weight.double())
    return out, grads


def torch_peer(features, weight, bias, grad_out):
    """cat + linear with autograd in the weight's dtype: (out, (grad features, grad weight, grad
    bias or None))."""
    leaves = [f.detach().clone().requires_grad_() for f in features]
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = F.linear(torch.cat(leaves, dim=-1), w, b)
    out.backward(grad_out)
    return out.detach(), ([leaf.grad for leaf in leaves], w.grad, None if b is None else b.grad)


def assert_close(name, ours, exact, peer, dtype):
    assert ours.shape == exact.shape, (name, ours.shape, exact.shape)
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (an unwritten element?)"
    if ours.numel() == 0:
        return
    err = (ours.double() - exact).abs().max().item()
    peer_err = (peer.double() - exact).abs().max().item()
    bound = 2 * peer_err + FLOOR[dtype] * max(1.0, exact.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch {peer_err:.3g})"


def check_case(forward, backward, features, weight, bias):
    """``forward(features, weight, bias)`` and ``backward(grad_out, features, weight)`` (a kernel
    table's pair) against the reference: output dtype, shape and layout, every gradient."""
    dtype = weight.dtype
    with poisoned_allocations():
        out = forward(features, weight, bias)
    assert out.dtype == dtype and out.is_contiguous()
    assert out.shape == (*features[0].shape[:-1], weight.shape[0])
    grad_out = torch.randn_like(out)
    exact_out, exact_grads = reference64(features, weight, bias, grad_out)
    peer_out, peer_grads = torch_peer(features, weight, bias, grad_out)
    assert_close("out", out, exact_out, peer_out, dtype)

    with poisoned_allocations():
        grad_features, grad_weight, grad_bias = backward(grad_out, features, weight)
    assert len(grad_features) == len(features)
    for index, (ours, exact, peer, f) in enumerate(
        zip(grad_features, exact_grads[0], peer_grads[0], features, strict=True)
    ):
        assert ours.dtype == f.dtype and ours.is_contiguous(), (index, ours.dtype)
        assert_close(f"grad_features[{index}]", ours, exact, peer, dtype)
    assert grad_weight.dtype == dtype and grad_bias.dtype == dtype
    assert_close("grad_weight", grad_weight, exact_grads[1], peer_grads[1], dtype)
    # Without a bias the peer has no bias gradient (the op discards ours): compare with the exact.
    peer_bias = exact_grads[2] if peer_grads[2] is None else peer_grads[2]
    assert_close("grad_bias", grad_bias, exact_grads[2], peer_bias, dtype)


# (lead, widths, N, dtype, strided, bias): 1, 2, 6 and 8 sources (and 10: two chunks of a Triton
# launch), unequal widths (odd ones: the CPU brgemm path's last-column update; a width under and
# over every BLOCK_K), leading shapes [T] and
# [B, I, T, N], every dtype, strided sources, with and without bias.
CASES = [
    ((37,), (48,), 40, F32, False, True),
    ((2, 19), (24, 40), 33, BF16, False, True),
    ((2, 1, 3, 4), (16, 8, 24, 16, 16, 40), 24, F32, True, True),
    ((2, 2, 3, 3), (16, 32, 16, 16, 16, 16), 48, BF16, True, False),
    ((29,), (5, 16, 70, 3, 9, 33, 1, 12), 20, F16, False, True),
    ((2, 13), (5, 16, 70, 3, 9, 33, 1, 12), 20, BF16, True, True),
    ((3, 11), (8, 16, 8, 24, 8, 16, 8, 40), 65, F32, True, True),
    ((21,), (8, 12, 4, 16, 20, 8, 4, 12, 24, 6), 36, F32, False, True),
    ((1, 2, 2, 3), (8,) * 10, 24, BF16, True, True),
]


def case_id(case):
    lead, widths, dim, dtype, strided, bias = case
    name = str(dtype).replace("torch.", "")
    shape = "x".join(map(str, lead))
    return (
        f"{name}-lead{shape}-L{len(widths)}-K{sum(widths)}-N{dim}"
        f"{'-strided' if strided else ''}{'' if bias else '-nobias'}"
    )


def case_inputs(case):
    lead, widths, dim, dtype, strided, bias = case
    return make_inputs(lead, widths, dim, dtype, strided=strided, bias=bias)
