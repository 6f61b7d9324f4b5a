"""patch_embed's CUDA kernels (tensor-core implicit GEMM forward; weight / pixel gradients on tensor cores,
bias / pos / cls reductions) run on the CPU by the SIMT emulator (the cuda_sim backend, whose mma /
ldmatrix / cp.async follow the PTX fragment layouts lane by lane), against the float64 reference with
the DESIGN §6 policy (tests/patch_embed_testing.py). float32 runs on 3xTF32 and is held to the float32
floor. With VLMK_TEST_DEVICE=cuda (tests/devices.py) the same tests run the compiled kernels (the cuda
backend) on CUDA tensors; the race-checker tests are emulator-only.

Outputs and the workspace come from ``at::empty``, which fills them with NaN in deterministic mode
(``_poison_uninitialized``), so an element a kernel forgets to write fails the finiteness check. The
emulator runs every CUDA thread as a fiber: shapes stay tiny.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import vlm_kernels as vk
from tests.devices import ON_CUDA, cpu_only
from tests.patch_embed_testing import (
    BF16,
    F16,
    F32,
    GRAD_NAMES,
    assert_close,
    case_id,
    case_inputs,
    check_against_reference,
    make_inputs,
    norm_args,
    op_args,
    reference64,
    torch_low_precision,
)
from vlm_kernels._backends import _extension
from vlm_kernels.ops.patch_embed import TABLE, patch_embed_op

BACKEND = "cuda" if ON_CUDA else "cuda_sim"
pytestmark = [
    pytest.mark.usefixtures("tensors_on_test_device"),
    pytest.mark.skipif(_extension()[0] is None, reason="vlm_kernels._C is not built"),
]


@pytest.fixture(autouse=True)
def _poison_uninitialized():
    """In deterministic mode ``at::empty`` fills float tensors with NaN: unwritten outputs show up."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def forward(inputs):
    return TABLE.forward[BACKEND](*op_args(inputs), *norm_args(inputs))


def backward(inputs, grad_out, need_pixels_grad):
    return TABLE.backward[BACKEND](
        grad_out,
        inputs["pixels"],
        inputs["weight"],
        *norm_args(inputs),
        inputs["cls_token"] is not None,
        need_pixels_grad,
    )


# (B, C, H, W, P, D, weight dtype, pixels, cls, pos, bias, norm). Blocks are 64 GEMM rows x 64 columns
# with reduction steps of 32; together the cases cover P 8 / 14 / 16 (K = 64 .. 768, partial K steps),
# C 1 and 3, D 64 / 48 / 40 / 36 (partial column tiles; D = 36: grad_out rows off 16 bytes, element
# copies), D = 96 (two column blocks), K = 196 / 588 in 16-bit (weight rows off 16 bytes: element
# copies) and in float32 (cp.async), uint8 / float16 / bfloat16 / float64 / strided pixels, every
# epilogue term on and off, every normalization, more than one row block (96 and 256 patches) and
# the weight gradient's B*Np reduction over several steps (96 patches: 3 steps of 32) and in two
# split-K ranges (256 patches: two ranges of 4 steps, partials summed in order).
CASES = [
    (2, 3, 16, 32, 8, 64, F32, "float32", True, True, True, "both"),
    (2, 1, 28, 14, 14, 48, BF16, "uint8", False, True, False, "both"),
    (1, 3, 28, 28, 14, 64, F16, "strided", True, False, True, None),
    (2, 1, 32, 16, 16, 32, F32, "uint8", False, False, False, None),
    (1, 3, 32, 16, 16, 64, BF16, "strided", True, True, True, "both"),
    (1, 3, 28, 14, 14, 64, F32, "float32", True, True, False, "mean"),
    (1, 3, 16, 8, 8, 40, F16, "float16", False, True, True, "std"),
    (2, 3, 16, 16, 8, 64, BF16, "bfloat16", True, False, False, None),
    (1, 1, 16, 16, 8, 36, BF16, "float32", True, True, True, "both"),
    (1, 3, 16, 16, 16, 64, F32, "float64", True, True, True, "both"),
    (2, 1, 48, 64, 8, 64, F16, "strided", True, True, True, "both"),
    (1, 3, 28, 42, 14, 96, BF16, "uint8", True, True, False, "both"),
    (2, 1, 64, 128, 8, 64, F32, "float32", False, True, True, "mean"),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_backward_match_reference(case):
    check_against_reference(case_inputs(case), forward, backward)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_empty_batch(dtype):
    """B = 0: an empty output, zero parameter gradients, an empty pixel gradient."""
    inputs = make_inputs(0, 3, 16, 16, 8, 32, dtype, "float32")
    out = forward(inputs)
    assert out.shape == (0, 5, 32) and out.dtype == dtype
    grads = backward(inputs, torch.randn_like(out), True)
    assert grads[0].shape == (0, 3, 16, 16)
    for name, grad in zip(GRAD_NAMES[1:], grads[1:], strict=True):
        assert grad.dtype == dtype, name
        assert torch.equal(grad, torch.zeros_like(grad)), name


def test_weight_gradient_is_deterministic():
    """256 patches in 2 split-K ranges of the weight gradient (partials summed in a fixed order): two
    runs give the same bits for every gradient."""
    inputs = make_inputs(2, 1, 64, 128, 8, 64, F32, "float32", norm="both")
    grad_out = torch.randn(2, 129, 64)
    first = backward(inputs, grad_out, True)
    second = backward(inputs, grad_out, True)
    for name, a, b in zip(GRAD_NAMES, first, second, strict=True):
        assert torch.equal(a, b), f"grad_{name} differs between two runs"


def test_nan_pixel_reaches_its_token_only():
    """A NaN pixel makes its own patch's output row NaN (through the tensor cores, 3xTF32 included)
    and leaves the other tokens finite."""
    inputs = make_inputs(1, 3, 16, 16, 8, 32, F32, "float32", cls=True)
    inputs["pixels"][0, 1, 9, 2] = float("nan")  # patch r = 1, s = 0: token 1 + 2 = 3
    out = forward(inputs)
    assert torch.isnan(out[0, 3]).all()
    others = torch.cat([out[0, :3], out[0, 4:]])
    assert torch.isfinite(others).all()


def test_through_the_op_with_autograd():
    """vk.patch_embed(backend=...) forward and autograd gradients against the reference backend."""
    inputs = make_inputs(2, 3, 16, 24, 8, 32, F32, "strided", norm="both")
    results = {}
    for backend in (BACKEND, "reference"):
        tensors = {
            name: (t.detach().clone().requires_grad_(name in GRAD_NAMES) if t is not None else None)
            for name, t in inputs.items()
        }
        out = vk.patch_embed(
            *op_args(tensors)[:3],
            cls_token=tensors["cls_token"],
            pos_embed=tensors["pos_embed"],
            pixel_mean=tensors["pixel_mean"],
            pixel_std=tensors["pixel_std"],
            backend=backend,
        )
        out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1]))
        results[backend] = (out, [tensors[name].grad for name in GRAD_NAMES])
    out, grads = results[BACKEND]
    ref_out, ref_grads = results["reference"]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_unaligned_and_strided_operands(dtype):
    """A weight and a grad_out 8 bytes off 16-byte alignment (their tiles are staged by element
    copies instead of cp.async), a strided bias and a transposed pos_embed give the same results."""
    inputs = make_inputs(2, 3, 16, 24, 8, 64, dtype, "float32", norm="both")
    shift = 8 // dtype.itemsize  # elements in 8 bytes
    weight = inputs["weight"]
    storage = torch.empty(weight.numel() + shift, dtype=dtype)
    inputs["weight"] = storage[shift:].view(weight.shape).copy_(weight)
    assert inputs["weight"].data_ptr() % 16 != 0
    inputs["bias"] = torch.randn(2 * 64, dtype=dtype)[::2]
    inputs["pos_embed"] = torch.randn(64, 7, dtype=dtype).T
    out = forward(inputs)
    grad = torch.randn(out.numel() + shift, dtype=dtype)[shift:].view(out.shape)
    assert grad.data_ptr() % 16 != 0
    exact_out, exact_grads = reference64(inputs, grad, True)
    peer_out, peer_grads = torch_low_precision(inputs, grad, True)
    assert_close("out", out, exact_out, peer_out, dtype)
    grads = backward(inputs, grad, True)
    for name, ours, exact in zip(GRAD_NAMES, grads, exact_grads, strict=True):
        assert_close(f"grad_{name}", ours, exact, peer_grads[name], dtype)


def test_opcheck():
    """torch.library.opcheck through the op with this backend: float pixels with every term (pixel
    gradient included), and uint8 pixels with none."""
    inputs = make_inputs(2, 3, 16, 24, 8, 16, F32, norm="both")
    for name in ("pixels", "weight", "bias", "cls_token", "pos_embed"):
        inputs[name].requires_grad_()
    torch.library.opcheck(patch_embed_op, (*op_args(inputs), *norm_args(inputs), BACKEND))
    bare = make_inputs(
        1, 1, 16, 8, 8, 16, BF16, "uint8", cls=False, pos=False, bias=False, norm=None
    )
    bare["weight"].requires_grad_()
    torch.library.opcheck(patch_embed_op, (*op_args(bare), None, None, BACKEND))


def test_uint8_pixels_have_no_gradient():
    inputs = make_inputs(1, 1, 8, 8, 8, 16, F32, "uint8")
    grad_out = torch.randn(1, 2, 16)
    with pytest.raises(ValueError, match="uint8 pixels have no gradient"):
        backward(inputs, grad_out, True)


# ---- under the emulator's race checker ------------------------------------------------------------


@contextlib.contextmanager
def _racecheck():
    extension = _extension()[0]
    previous = extension.simt_set_config(racecheck=True)
    try:
        yield
    finally:
        extension.simt_set_config(**previous)


@cpu_only
@pytest.mark.parametrize(
    "case",
    [
        (2, 3, 16, 16, 8, 48, BF16, "uint8", True, True, True, "both"),  # cp.async weight tiles
        (1, 1, 28, 14, 14, 64, F16, "float32", True, True, False, None),  # element copies (K = 196)
        # 3xTF32, 2 row blocks, 6 double-buffered K steps, dW over 3 steps of 32 patches
        (2, 3, 48, 64, 8, 64, F32, "strided", False, True, True, "both"),
    ],
    ids=case_id,
)
def test_race_free_forward_and_backward(case):
    """Forward and backward under SIMT_RACECHECK: a missing barrier between the double-buffered
    stages (cp.async or plain stores) and the ldmatrix / fragment reads is a reported race."""
    inputs = case_inputs(case)
    with _racecheck():
        check_against_reference(inputs, forward, backward)
