"""The C++ CPU patch_embed kernels (csrc/cpu/patch_embed.cpp: implicit-GEMM forward, weight / bias /
pos / cls / pixel gradients) against the float64 reference, with the DESIGN §6 relative tolerance of
tests/patch_embed_testing.py (``2 * err(torch in the weight's dtype) + floor``). Every tensor ATen
allocates while a kernel runs (their outputs included) is NaN-filled (``poisoned_allocations``), so an
element a kernel forgets to write fails.

The cases steer through every path: one and several row blocks per image (a block of an odd number of
rows: the padded VNNI pair of the bfloat16 weight gradient), odd K and odd D (the zero pad of the
bfloat16 operands), uint8 / float32 / float16 / bfloat16 / float64 pixels, contiguous, channels-last
and sliced pixels (the strided gather), every combination of the epilogue terms.
"""

import pytest
import torch

import vlm_kernels as vk
from tests.allocations import poisoned_allocations
from tests.devices import ON_CUDA, run_without_avx512
from tests.patch_embed_testing import (
    BF16,
    F16,
    F32,
    GRAD_NAMES,
    case_id,
    case_inputs,
    check_against_reference,
    make_inputs,
    norm_args,
    op_args,
)
from vlm_kernels import _C
from vlm_kernels.ops.patch_embed import TABLE, patch_embed_op
from vlm_kernels.reference.patch_embed import patch_embed_reference

if ON_CUDA:
    pytest.skip(
        "the C++ CPU kernels run CPU tensors only (VLMK_TEST_DEVICE=cuda)", allow_module_level=True
    )


def cpu_forward(inputs):
    with poisoned_allocations():
        return TABLE.forward["cpu"](*op_args(inputs), *norm_args(inputs))


def cpu_backward(inputs, grad_out, need_pixels_grad):
    with poisoned_allocations():
        return TABLE.backward["cpu"](
            grad_out,
            inputs["pixels"],
            inputs["weight"],
            *norm_args(inputs),
            inputs["cls_token"] is not None,
            need_pixels_grad,
        )


def check_case(inputs):
    check_against_reference(inputs, cpu_forward, cpu_backward)


# (B, C, H, W, P, D, weight dtype, pixels, cls, pos, bias, norm). pixels: a dtype name, "uint8",
# "strided" (a sliced channels-last view) or "channels_last" (float32, channels-last memory).
CASES = [
    (2, 3, 16, 24, 8, 64, F32, "float32", True, True, True, "both"),
    (2, 1, 24, 16, 8, 64, BF16, "uint8", False, True, False, "both"),
    (1, 3, 28, 14, 14, 64, F32, "strided", True, False, True, None),
    (2, 1, 16, 32, 16, 64, F32, "uint8", False, False, False, None),
    (1, 3, 32, 16, 16, 64, BF16, "strided", True, True, True, "both"),
    (2, 3, 14, 42, 14, 64, F32, "float32", True, True, False, "mean"),
    (1, 3, 16, 8, 8, 64, F16, "float16", False, True, True, "std"),
    (2, 3, 16, 16, 8, 64, BF16, "bfloat16", True, False, False, None),
    # pixels in the GEMM's type, not normalized: the gather's plain copy (float32, odd D)
    (2, 3, 14, 28, 7, 65, F32, "float32", True, True, False, None),
    (2, 3, 28, 28, 14, 96, F32, "channels_last", True, True, True, "both"),
    (1, 3, 28, 42, 14, 96, F32, "float64", True, True, True, "both"),
    (1, 3, 28, 42, 14, 96, F16, "uint8", True, True, True, "both"),
    # K = 49 and D = 65: odd, padded to bfloat16 pairs
    (2, 1, 21, 14, 7, 65, BF16, "float32", True, True, True, "both"),
    (1, 3, 16, 16, 8, 65, F32, "float32", True, True, True, "std"),
    # 289 patches: two row blocks per image (160 + 129 rows, the second odd)
    (1, 1, 136, 136, 8, 64, BF16, "float32", True, True, True, "both"),
    (2, 1, 136, 136, 8, 64, F32, "strided", False, True, True, "both"),
    # D = 768 (three kTileN column tiles), a realistic CLIP-like case
    (1, 3, 42, 56, 14, 768, BF16, "uint8", True, True, False, "both"),
    # outputs of 4 MiB and more: written by non-temporal stores (kStreamOutputBytes); D = 1027
    # leaves rows that start mid-line (a head and a tail of regular stores per row)
    (4, 3, 224, 224, 14, 1024, F32, "float32", True, True, True, None),
    (8, 3, 224, 224, 14, 1027, BF16, "uint8", True, True, False, "both"),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_backward_match_reference(case):
    check_case(case_inputs(case))


@pytest.mark.skipif(
    not _C.patch_embed_cpu_avx512(), reason="this CPU runs the portable build in every test here"
)
def test_portable_build():
    """The kernels' portable build (cpu/patch_embed_portable.cpp), which CPUs without AVX-512 run:
    on an AVX-512 machine, reached in a fresh process with VLMK_CPU_NO_AVX512=1. Every case above,
    the streamed outputs and odd K / D among them."""
    script = (
        "from tests.test_patch_embed_cpu import CASES, check_case, case_inputs\n"
        "from vlm_kernels import _C\n"
        "assert not _C.patch_embed_cpu_avx512()\n"
        "for case in CASES:\n"
        "    check_case(case_inputs(case))\n"
    )
    run_without_avx512(script)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_empty_batch(dtype):
    """B = 0: an empty output; the gradients of the parameters are zeros (grad_pos of shape [N, D])."""
    inputs = make_inputs(0, 3, 16, 24, 8, 64, dtype, norm="both")
    check_case(inputs)
    grads = cpu_backward(inputs, torch.randn(0, 7, 64, dtype=dtype), True)
    assert grads[0].shape == (0, 3, 16, 24)
    for grad in grads[1:]:
        assert grad.numel() > 0 and not grad.any()


def test_bfloat16_without_onednn_runs_float32_operands():
    """With oneDNN switched off the bfloat16 kernels compute with float32 operands: still correct."""
    with torch.backends.mkldnn.flags(enabled=False):
        check_case(make_inputs(2, 3, 28, 14, 14, 64, BF16, "uint8", norm="both"))
        check_case(make_inputs(1, 1, 24, 16, 8, 65, BF16, "strided", norm="std"))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_uint8_normalization_matches_normalizing_first(dtype):
    """uint8 pixels with the normalization fused into the gather give what normalizing the image in
    float32 first ((x / 255 - mean) / std) and embedding that gives; so do the gradients."""
    inputs = make_inputs(2, 3, 16, 24, 8, 64, dtype, "uint8", norm="both")
    mean, std = norm_args(inputs)
    normalized = (inputs["pixels"].float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    first = {**inputs, "pixels": normalized, "pixel_mean": None, "pixel_std": None}
    fused, unfused = cpu_forward(inputs), cpu_forward(first)
    tol = {F32: dict(atol=1e-5, rtol=1e-5), BF16: dict(atol=2e-2, rtol=2e-2)}[dtype]
    torch.testing.assert_close(fused, unfused, **tol)
    grad_out = torch.randn_like(fused)
    fused_grads = cpu_backward(inputs, grad_out, False)
    unfused_grads = cpu_backward(first, grad_out, False)
    for name, a, b in zip(GRAD_NAMES[1:], fused_grads[1:], unfused_grads[1:], strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad_{name}: {m}")


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_backward_is_deterministic_across_thread_counts(dtype):
    """Every gradient has the same bits run to run and with 1 or 2 threads (no cross-thread sums)."""
    inputs = make_inputs(2, 3, 136, 72, 8, 96, dtype, "strided", norm="both")
    grad_out = torch.randn(2, 154, 96, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = cpu_backward(inputs, grad_out, True)
        second = cpu_backward(inputs, grad_out, True)
        torch.set_num_threads(1)
        single = cpu_backward(inputs, grad_out, True)
    finally:
        torch.set_num_threads(threads)
    for name, a, b, c in zip(GRAD_NAMES, first, second, single, strict=True):
        assert torch.equal(a, b), f"grad_{name} differs between two runs"
        assert torch.equal(a, c), f"grad_{name} differs between 2 threads and 1"


def test_nan_pixel_poisons_its_patch_only():
    """A NaN pixel makes its patch's output row NaN (every column) and nothing else; the weight
    gradient turns NaN (as the reference's)."""
    inputs = make_inputs(2, 3, 16, 24, 8, 64, F32, norm="both")
    inputs["pixels"][1, 2, 9, 20] = float("nan")  # patch r = 1, s = 2: token 1 + 1 * 3 + 2 = 6
    out = cpu_forward(inputs)
    expected = patch_embed_reference(
        *op_args(inputs)[:2],
        inputs["bias"],
        cls_token=inputs["cls_token"],
        pos_embed=inputs["pos_embed"],
        pixel_mean=inputs["pixel_mean"],
        pixel_std=inputs["pixel_std"],
    )
    assert torch.equal(out.isnan(), expected.isnan())
    assert out[1, 6].isnan().all() and out.isnan().sum() == 64
    grads = cpu_backward(inputs, torch.randn_like(out), True)
    assert grads[1].isnan().any()
    assert not grads[0].isnan().any()  # dx = dY W / std reads no pixel


def test_op_autograd_matches_reference():
    """vk.patch_embed(backend="cpu") forward and autograd gradients against the reference backend."""
    inputs = make_inputs(2, 3, 16, 24, 8, 64, F32, "strided", norm="both")
    results = {}
    for backend in ("cpu", "reference"):
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
    (out, grads), (ref_out, ref_grads) = results["cpu"], results["reference"]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_opcheck():
    """opcheck through the op with backend="cpu": float pixels with every term (pixel gradient
    included), bfloat16 weights with uint8 pixels, and uint8 pixels with no term."""
    inputs = make_inputs(2, 3, 8, 12, 4, 16, F32, norm="both")
    for name in GRAD_NAMES:
        inputs[name].requires_grad_()
    torch.library.opcheck(patch_embed_op, (*op_args(inputs), *norm_args(inputs), "cpu"))
    half = make_inputs(1, 3, 8, 8, 4, 16, BF16, "uint8", norm="both")
    half["weight"].requires_grad_()
    torch.library.opcheck(patch_embed_op, (*op_args(half), *norm_args(half), "cpu"))
    bare = make_inputs(1, 1, 8, 8, 4, 16, F32, "uint8", cls=False, pos=False, bias=False, norm=None)
    bare["weight"].requires_grad_()
    torch.library.opcheck(patch_embed_op, (*op_args(bare), None, None, "cpu"))


def test_torch_compile_fullgraph():
    inputs = make_inputs(2, 3, 16, 24, 8, 32, F32, "uint8", norm="both")

    def embed(pixels, weight, cls_token, pos_embed, mean, std):
        return vk.patch_embed(
            pixels,
            weight,
            cls_token=cls_token,
            pos_embed=pos_embed,
            pixel_mean=mean,
            pixel_std=std,
            backend="cpu",
        )

    args = (
        inputs["pixels"],
        inputs["weight"],
        inputs["cls_token"],
        inputs["pos_embed"],
        *norm_args(inputs),
    )
    compiled = torch.compile(embed, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), embed(*args), atol=0, rtol=0)


def test_uint8_pixels_have_no_gradient():
    inputs = make_inputs(1, 3, 16, 16, 8, 16, F32, "uint8")
    with pytest.raises(RuntimeError, match="uint8 pixels have no gradient"):
        cpu_backward(inputs, torch.randn(1, 5, 16), True)


def test_direct_calls_name_the_bad_argument():
    """The glue's own checks (for direct callers of vlm_kernels._C)."""
    inputs = make_inputs(1, 3, 16, 16, 8, 16, F32)
    with pytest.raises(RuntimeError, match=r"pixels must be \[B, C, H, W\]"):
        _C.patch_embed_fwd_cpu(inputs["pixels"][:, :, :12], inputs["weight"], *[None] * 5)
    with pytest.raises(RuntimeError, match=r"pos_embed must be \[N, D\]"):
        _C.patch_embed_fwd_cpu(
            inputs["pixels"], inputs["weight"], None, None, inputs["pos_embed"], None, None
        )
    with pytest.raises(RuntimeError, match=r"grad_out must be \[B, N, D\]"):
        _C.patch_embed_bwd_cpu(
            torch.randn(1, 4, 16), inputs["pixels"], inputs["weight"], None, None, True, False
        )


def test_float64_weight_is_not_a_cpu_kernel_dtype():
    inputs = make_inputs(1, 3, 16, 16, 8, 16, F32)
    with pytest.raises(ValueError, match="cpu"):
        vk.patch_embed(inputs["pixels"], inputs["weight"].double(), backend="cpu")
