"""The Triton patch_embed kernels (implicit-GEMM forward; weight / bias / pos / cls / pixel gradients)
against the reference, on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 and patches the interpreter's bf16 ``tl.dot``), or compiled on CUDA tensors with
VLMK_TEST_DEVICE=cuda (tests/devices.py).

Tolerance (DESIGN §6, the relative form for reductions): every output and gradient is compared with the
reference computed in float64, and its error must stay within ``2 * err(torch) + floor``, where torch
is the unfold + matmul patch embedding run by autograd in the weight's dtype (pixels normalized in that
dtype first: what a PyTorch user of that dtype gets) and ``floor`` is a small per-dtype fraction of the
reference's magnitude. Kernel outputs are poisoned with NaN at allocation (``poisoned_allocations``), so
an element a kernel forgets to write fails; NaN never passes. Every autotune config of every kernel runs
in ``test_every_config_matches_reference`` (``force_triton_config``). Heavy cases are marked ``slow``.
"""

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from tests.devices import ON_CUDA

triton = pytest.importorskip("triton")
if not ON_CUDA and not triton.knobs.runtime.interpret:
    pytest.skip(
        "TRITON_INTERPRET=1 was not set before triton was imported", allow_module_level=True
    )

import vlm_kernels as vk  # noqa: E402
from tests.patch_embed_testing import (  # noqa: E402
    BF16,
    F16,
    F32,
    GRAD_NAMES,
    case_id,
    case_inputs,
    check_against_reference,
    make_inputs,
    poisoned_allocations,
)
from tests.patch_embed_testing import norm_args as _norm  # noqa: E402
from tests.patch_embed_testing import op_args as _args  # noqa: E402
from vlm_kernels.ops.patch_embed import patch_embed_op  # noqa: E402
from vlm_kernels.triton import patch_embed as pe  # noqa: E402
from vlm_kernels.triton._launch import force_triton_config, triton_config_counts  # noqa: E402

pytestmark = pytest.mark.usefixtures("tensors_on_test_device")


def triton_forward(inputs):
    with poisoned_allocations():
        return pe.patch_embed_fwd_triton(*_args(inputs), *_norm(inputs))


def triton_backward(inputs, grad_out, need_pixels_grad, splits=None):
    with poisoned_allocations():
        return pe.patch_embed_bwd_triton(
            grad_out,
            inputs["pixels"],
            inputs["weight"],
            *_norm(inputs),
            inputs["cls_token"] is not None,
            need_pixels_grad,
            splits=splits,
        )


def check_case(inputs, splits=None):
    """Forward and every gradient of the Triton kernels against the reference."""
    check_against_reference(
        inputs,
        triton_forward,
        lambda inputs, grad_out, need: triton_backward(inputs, grad_out, need, splits),
    )


# (B, C, H, W, P, D, weight dtype, pixels, cls, pos, bias, norm): every patch size, C 1 and 3, non-square
# images, uint8 and float (and strided) pixels, every combination of the epilogue terms appears.
CASES = [
    (2, 3, 16, 24, 8, 64, F32, "float32", True, True, True, "both"),
    (2, 1, 24, 16, 8, 64, BF16, "uint8", False, True, False, "both"),
    (1, 3, 28, 14, 14, 64, F16, "strided", True, False, True, None),
    (2, 1, 16, 32, 16, 64, F32, "uint8", False, False, False, None),
    (1, 3, 32, 16, 16, 64, BF16, "strided", True, True, True, "both"),
    (2, 3, 14, 42, 14, 64, F32, "float32", True, True, False, "mean"),
    (1, 3, 16, 8, 8, 64, F16, "float16", False, True, True, "std"),
    (2, 3, 16, 16, 8, 64, BF16, "bfloat16", True, False, False, None),
]
SLOW_CASES = [
    (2, 3, 56, 42, 14, 768, BF16, "uint8", True, True, True, "both"),
    (1, 3, 48, 64, 16, 1024, F32, "float32", True, True, False, "both"),
    (2, 3, 42, 28, 14, 1280, F16, "strided", True, True, False, None),
    (1, 1, 32, 48, 8, 768, F32, "strided", False, True, True, "both"),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_backward_match_reference(case):
    check_case(case_inputs(case))


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=case_id)
def test_larger_shapes(case):
    check_case(case_inputs(case))


def test_weight_gradient_split_reduction():
    """The dW / dbias reduction over B*Np cut into float32 partials (144 patches: two ranges of
    128 rows, the second partial), summed on the host: same values as one range, and run twice, the
    same bits (no atomics)."""
    splits = 3
    inputs = make_inputs(2, 3, 64, 72, 8, 64, F32, cls=True, norm="both")
    check_case(inputs, splits=splits)
    grad_out = torch.randn(2, 73, 64)
    first = triton_backward(inputs, grad_out, True, splits)
    second = triton_backward(inputs, grad_out, True, splits)
    for name, a, b in zip(GRAD_NAMES, first, second, strict=True):
        assert torch.equal(a, b), f"grad_{name} differs between two runs"


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_uint8_normalization_matches_normalizing_first(dtype):
    """uint8 pixels with the normalization fused into the load give what normalizing the image in
    float32 first ((x / 255 - mean) / std) and embedding that gives; the weight / bias / pos
    gradients match too."""
    inputs = make_inputs(2, 3, 16, 24, 8, 64, dtype, "uint8", norm="both")
    mean, std = _norm(inputs)
    normalized = (inputs["pixels"].float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    first = {**inputs, "pixels": normalized, "pixel_mean": None, "pixel_std": None}
    fused, unfused = triton_forward(inputs), triton_forward(first)
    tol = {F32: dict(atol=1e-5, rtol=1e-5), BF16: dict(atol=2e-2, rtol=2e-2)}[dtype]
    torch.testing.assert_close(fused, unfused, **tol)
    grad_out = torch.randn_like(fused)
    fused_grads = triton_backward(inputs, grad_out, False)
    unfused_grads = triton_backward(first, grad_out, False)
    for name, a, b in zip(GRAD_NAMES[1:], fused_grads[1:], unfused_grads[1:], strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad_{name}: {m}")


# ---- every autotune config ---------------------------------------------------------------------------


def _config_count(width: int) -> int:
    return max(len(lists[width]) for lists in pe._CONFIGS.values())


CONFIG_CASES = [(width, index) for width in (2, 4) for index in range(_config_count(width))]


def test_config_counts_are_declared():
    counts = triton_config_counts()
    for name, lists in pe._CONFIGS.items():
        assert counts[name] == max(len(configs) for configs in lists.values())


@pytest.mark.parametrize(
    "width, index",
    CONFIG_CASES,
    ids=[f"{'fp32' if width == 4 else '16bit'}-config{index}" for width, index in CONFIG_CASES],
)
def test_every_config_matches_reference(width, index):
    """Every kernel at config #index (``force_triton_config``; a shorter list runs its last) on cases
    that put every mask to work at every tile size: D=96 (a partial BLOCK_N of 64 and 128), K = 588
    and 192 (partial K tiles), 73 and 146 output rows (partial BLOCK_M, CLS rows inside a tile), the
    dW reduction split in two (the second range partial), strided and uint8 pixels."""
    dtype = F32 if width == 4 else (BF16, F16)[index % 2]
    with contextlib.ExitStack() as stack:
        for name in pe._CONFIGS:
            stack.enter_context(force_triton_config(name, index))
        check_case(make_inputs(1, 3, 28, 42, 14, 96, dtype, "strided", norm="both"))
        check_case(make_inputs(2, 1, 64, 72, 8, 96, dtype, "uint8", bias=False), splits=2)


# ---- through the op ----------------------------------------------------------------------------------


def test_op_autograd_matches_reference():
    """vk.patch_embed(backend="triton") forward and autograd gradients against the reference backend."""
    inputs = make_inputs(2, 3, 16, 24, 8, 64, F32, "strided", norm="both")
    leaves = {
        name: (value.detach().clone().requires_grad_() if value is not None else None)
        for name, value in inputs.items()
    }
    results = {}
    for backend in ("triton", "reference"):
        tensors = {
            name: (t.detach().clone().requires_grad_() if t is not None else None)
            for name, t in leaves.items()
        }
        tensors["pixel_mean"].requires_grad_(False)
        tensors["pixel_std"].requires_grad_(False)
        out = vk.patch_embed(
            tensors["pixels"],
            tensors["weight"],
            tensors["bias"],
            cls_token=tensors["cls_token"],
            pos_embed=tensors["pos_embed"],
            pixel_mean=tensors["pixel_mean"],
            pixel_std=tensors["pixel_std"],
            backend=backend,
        )
        out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1]))
        results[backend] = (out, [tensors[name].grad for name in GRAD_NAMES])
    out, grads = results["triton"]
    ref_out, ref_grads = results["reference"]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_opcheck():
    """opcheck through the op with backend="triton": float pixels with every term (pixel gradient
    included), and uint8 pixels with none."""
    inputs = make_inputs(2, 3, 8, 12, 4, 16, F32, norm="both")
    for name in ("pixels", "weight", "bias", "cls_token", "pos_embed"):
        inputs[name].requires_grad_()
    torch.library.opcheck(patch_embed_op, (*_args(inputs), *_norm(inputs), "triton"))
    bare = make_inputs(1, 1, 8, 8, 4, 16, F32, "uint8", cls=False, pos=False, bias=False, norm=None)
    bare["weight"].requires_grad_()
    torch.library.opcheck(patch_embed_op, (*_args(bare), None, None, "triton"))


def test_float64_weight_is_not_a_triton_dtype():
    inputs = make_inputs(1, 3, 16, 16, 8, 16, F32)
    with pytest.raises(ValueError, match="triton"):
        vk.patch_embed(inputs["pixels"], inputs["weight"].double(), backend="triton")
