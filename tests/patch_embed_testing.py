"""Shared by the patch_embed backend tests: input cases, the float64 reference, the PyTorch peer in the
weight's dtype and the DESIGN §6 comparison.

Tolerance (the relative form for reductions): every output and gradient is compared with the reference
computed in float64, and its error must stay within ``2 * err(torch) + floor``, where torch is the
unfold + matmul patch embedding run by autograd in the weight's dtype (pixels normalized in that dtype
first: what a PyTorch user of that dtype gets) and ``floor`` is a small per-dtype fraction of the
reference's magnitude. NaN never passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from vlm_kernels.reference.patch_embed import (
    patch_embed_backward_reference,
    patch_embed_reference,
    to_patches,
)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# Per weight dtype: the floor of the tolerance, as a fraction of the reference's largest magnitude.
FLOOR = {F32: 1e-5, BF16: 1e-2, F16: 2e-3}
GRAD_NAMES = ("pixels", "weight", "bias", "cls_token", "pos_embed")


@contextlib.contextmanager
def poisoned_allocations():
    """``torch.empty`` gives NaN-filled float tensors while active."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    torch.empty = poisoned
    try:
        yield
    finally:
        torch.empty = empty


def make_inputs(
    batch,
    channels,
    height,
    width,
    patch,
    dim,
    dtype,
    pixels="float32",
    *,
    cls=True,
    pos=True,
    bias=True,
    norm="both",
):
    """pixels: "uint8", a float dtype name, or "strided" (a float32 view: every other row of a
    taller image, channels last); norm: "both", "mean", "std" or None."""
    shape = (batch, channels, height, width)
    if pixels == "uint8":
        x = torch.randint(0, 256, shape, dtype=torch.uint8)
    elif pixels == "strided":
        x = torch.randn(batch, 2 * height, width, channels).permute(0, 3, 1, 2)[:, :, ::2]
        assert not x.is_contiguous() or x.numel() == 0
    else:
        x = torch.randn(shape, dtype=getattr(torch, pixels))
    fan_in = channels * patch * patch
    weight = (torch.randn(dim, channels, patch, patch) / fan_in**0.5).to(dtype)
    tokens = (height // patch) * (width // patch) + cls
    return {
        "pixels": x,
        "weight": weight,
        "bias": torch.randn(dim, dtype=dtype) if bias else None,
        "cls_token": torch.randn(dim, dtype=dtype) if cls else None,
        "pos_embed": torch.randn(tokens, dim, dtype=dtype) if pos else None,
        "pixel_mean": torch.rand(channels) if norm in ("both", "mean") else None,
        "pixel_std": torch.rand(channels) + 0.5 if norm in ("both", "std") else None,
    }


def op_args(inputs):
    """(pixels, weight, bias, cls_token, pos_embed) of a case."""
    return tuple(inputs[name] for name in ("pixels", "weight", "bias", "cls_token", "pos_embed"))


def norm_args(inputs):
    """(pixel_mean, pixel_std) of a case."""
    return inputs["pixel_mean"], inputs["pixel_std"]


def reference64(inputs, grad_out, need_pixels_grad):
    """Forward and gradients of the reference in float64."""

    def up(t):
        return None if t is None or t.dtype == torch.uint8 else t.double()

    pixels = inputs["pixels"]
    pixels64 = pixels if pixels.dtype == torch.uint8 else pixels.double()
    mean, std = (up(t) for t in norm_args(inputs))
    out = patch_embed_reference(
        pixels64,
        inputs["weight"].double(),
        up(inputs["bias"]),
        cls_token=up(inputs["cls_token"]),
        pos_embed=up(inputs["pos_embed"]),
        pixel_mean=mean,
        pixel_std=std,
    )
    grads = patch_embed_backward_reference(
        grad_out.double(),
        pixels64,
        inputs["weight"].double(),
        mean,
        std,
        inputs["cls_token"] is not None,
        need_pixels_grad,
    )
    return out, grads


def torch_low_precision(inputs, grad_out, need_pixels_grad):
    """The patch embedding as a PyTorch user of the weight's dtype writes it (normalize, unfold,
    matmul, cat CLS, add pos), with autograd: the peer of the tolerance."""
    weight = inputs["weight"]
    dtype, (dim, channels, patch, _) = weight.dtype, weight.shape
    leaves = {
        name: inputs[name].detach().clone().requires_grad_()
        for name in ("weight", "bias", "cls_token", "pos_embed")
        if inputs[name] is not None
    }
    pixels = inputs["pixels"]
    if need_pixels_grad:
        pixels = leaves["pixels"] = pixels.detach().clone().requires_grad_()
    mean, std = norm_args(inputs)
    x = pixels.to(dtype)
    if pixels.dtype == torch.uint8:
        x = x / 255
    if mean is not None:
        x = x - mean.to(dtype).view(1, channels, 1, 1)
    if std is not None:
        x = x / std.to(dtype).view(1, channels, 1, 1)
    out = to_patches(x, patch) @ leaves["weight"].reshape(dim, -1).T
    if "bias" in leaves:
        out = out + leaves["bias"]
    if "cls_token" in leaves:
        out = torch.cat([leaves["cls_token"].expand(out.shape[0], 1, dim), out], dim=1)
    if "pos_embed" in leaves:
        out = out + leaves["pos_embed"]
    if out.numel():
        out.backward(grad_out)
    grads = {
        name: leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        for name, leaf in leaves.items()
    }
    return out.detach(), grads


def assert_close(name, ours, exact, peer, dtype):
    """``ours`` within ``2 * |peer - exact| + floor`` of ``exact`` (all finite)."""
    assert ours.shape == exact.shape, (name, ours.shape, exact.shape)
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (an unwritten element?)"
    if exact.numel() == 0:
        return
    err = (ours.double() - exact).abs().max().item()
    peer_err = (peer.double() - exact).abs().max().item()
    bound = 2 * peer_err + FLOOR[dtype] * max(1.0, exact.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch {peer_err:.3g})"


def check_against_reference(
    inputs,
    forward: Callable[[dict], torch.Tensor],
    backward: Callable[[dict, torch.Tensor, bool], tuple[torch.Tensor, ...]],
) -> None:
    """A backend's forward ``forward(inputs)`` and every gradient ``backward(inputs, grad_out,
    need_pixels_grad)`` (the op's backward tuple) against the float64 reference."""
    dtype = inputs["weight"].dtype
    need_pixels_grad = inputs["pixels"].dtype != torch.uint8
    out = forward(inputs)
    assert out.dtype == dtype and out.is_contiguous()
    grad_out = torch.randn_like(out)
    exact_out, exact_grads = reference64(inputs, grad_out, need_pixels_grad)
    peer_out, peer_grads = torch_low_precision(inputs, grad_out, need_pixels_grad)
    assert_close("out", out, exact_out, peer_out, dtype)

    grads = backward(inputs, grad_out, need_pixels_grad)
    for name, ours, exact in zip(GRAD_NAMES, grads, exact_grads, strict=True):
        if name == "pixels" and not need_pixels_grad:
            assert ours.numel() == 0
            continue
        if name == "cls_token" and inputs["cls_token"] is None:
            assert ours.numel() == 0
            continue
        expected_dtype = inputs["pixels"].dtype if name == "pixels" else dtype
        assert ours.dtype == expected_dtype, (name, ours.dtype)
        # Without the parameter in the model the peer has no gradient: grad_pos and grad_bias are
        # still returned (the op discards them); their peer is the exact value itself.
        peer = peer_grads.get(name, exact)
        assert_close(f"grad_{name}", ours, exact, peer, dtype)


def case_id(case) -> str:
    """pytest id of a case tuple (B, C, H, W, P, D, weight dtype, pixels, cls, pos, bias, norm)."""
    batch, channels, height, width, patch, dim, dtype, pixels, cls, pos, bias, norm = case
    terms = "".join(flag for flag, on in (("c", cls), ("p", pos), ("b", bias)) if on) or "none"
    name = str(dtype).replace("torch.", "")
    return f"{name}-B{batch}-C{channels}-{height}x{width}-P{patch}-D{dim}-{pixels}-{terms}-{norm}"


def case_inputs(case) -> dict:
    """``make_inputs`` of a case tuple; pixels "channels_last" = float32 in channels-last memory."""
    batch, channels, height, width, patch, dim, dtype, pixels, cls, pos, bias, norm = case
    kind = "float32" if pixels == "channels_last" else pixels
    inputs = make_inputs(
        batch,
        channels,
        height,
        width,
        patch,
        dim,
        dtype,
        kind,
        cls=cls,
        pos=pos,
        bias=bias,
        norm=norm,
    )
    if pixels == "channels_last":
        inputs["pixels"] = inputs["pixels"].contiguous(memory_format=torch.channels_last)
        assert not inputs["pixels"].is_contiguous()
    return inputs
