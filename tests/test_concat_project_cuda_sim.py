"""concat_project's CUDA kernels (one tensor-core GEMM whose K loop walks the sources' pointers; input,
weight and bias gradients, the weight's split over T summed in order) run on the CPU by the SIMT emulator
(the cuda_sim backend, whose mma / ldmatrix / cp.async follow the PTX fragment layouts lane by lane),
against the float64 reference. With VLMK_TEST_DEVICE=cuda (tests/devices.py) the same tests run the
compiled kernels (the cuda backend) on CUDA tensors; the race-checker tests are emulator-only.

Tolerance (DESIGN §6, the relative form for reductions): every output and gradient must stay within
``2 * err(torch) + floor`` of the float64 reference, where torch is ``torch.cat`` + ``F.linear`` run by
autograd in the weight's dtype and ``floor`` a small per-dtype fraction of the reference's magnitude.
float32 runs on 3xTF32 and is held to the float32 floor. Outputs and workspaces come from ``at::empty``,
which fills them with NaN in deterministic mode, so an element a kernel forgets to write fails the
finiteness check. The emulator runs every CUDA thread as a fiber: shapes stay tiny.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import vlm_kernels as vk
from tests.devices import ON_CUDA, cpu_only
from vlm_kernels._backends import _extension
from vlm_kernels.ops.concat_project import TABLE, concat_project_op
from vlm_kernels.reference.concat_project import (
    concat_project_backward_reference,
    concat_project_reference,
)

BACKEND = "cuda" if ON_CUDA else "cuda_sim"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# Per dtype: the floor of the tolerance, as a fraction of the reference's largest magnitude.
FLOOR = {F32: 1e-5, BF16: 1e-2, F16: 2e-3}

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


def make_features(leading, widths, dtype, layout="contiguous", seed=0):
    """Sources [*leading, D_l]. layout "rows": every row strided (the last dim contiguous, 8 spare
    elements per row); "leading": the leading dims permuted (no single row stride: the glue copies
    that one source); "contiguous": plain."""
    generator = torch.Generator().manual_seed(seed)
    features = []
    for width in widths:
        if layout == "rows":
            base = torch.randn(*leading, width + 8, generator=generator, device="cpu").to(dtype)
            f = base[..., 3 : 3 + width]
        elif layout == "leading" and len(leading) >= 2:
            swapped = [leading[1], leading[0], *leading[2:]]
            f = (
                torch.randn(*swapped, width, generator=generator, device="cpu")
                .to(dtype)
                .transpose(0, 1)
            )
        else:
            f = torch.randn(*leading, width, generator=generator, device="cpu").to(dtype)
        features.append(f.to(torch.get_default_device()))
    return features


def make_params(widths, dim, dtype, bias=True, seed=1):
    generator = torch.Generator().manual_seed(seed)
    total = sum(widths)
    scale = 1.0 / math.sqrt(max(total, 1))
    weight = (torch.randn(dim, total, generator=generator, device="cpu") * scale).to(dtype)
    b = torch.randn(dim, generator=generator, device="cpu").to(dtype) if bias else None
    device = torch.get_default_device()
    return weight.to(device), b.to(device) if b is not None else None


def exact(features, weight, bias, grad_out):
    """The float64 reference: output and (grad of each feature, grad_weight, grad_bias)."""
    up = [f.double() for f in features]
    out = concat_project_reference(up, weight.double(), None if bias is None else bias.double())
    grads = concat_project_backward_reference(grad_out.double(), up, weight.double())
    return out, grads


def peer(features, weight, bias, grad_out):
    """torch.cat + F.linear in the weight's dtype, by autograd: the peer of the tolerance."""
    leaves = [f.detach().clone().requires_grad_() for f in features]
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out = F.linear(torch.cat(leaves, dim=-1), w, b)
    out.backward(grad_out)
    grad_bias = b.grad if b is not None else grad_out.reshape(-1, weight.shape[0]).sum(0)
    return out.detach(), ([f.grad for f in leaves], w.grad, grad_bias)


def assert_close(name, ours, ref, torch_result, dtype):
    """``ours`` within ``2 * |torch - ref| + floor`` of ``ref`` (all finite)."""
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    assert ours.dtype == dtype, (name, ours.dtype)
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (an unwritten element?)"
    if ref.numel() == 0:
        return
    err = (ours.double() - ref).abs().max().item()
    peer_err = (torch_result.double() - ref).abs().max().item()
    bound = 2 * peer_err + FLOOR[dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch {peer_err:.3g})"


def check(features, weight, bias):
    """The backend's forward and every gradient against the float64 reference."""
    dtype = weight.dtype
    out = TABLE.forward[BACKEND](features, weight, bias)
    assert out.is_contiguous()
    grad_out = torch.randn_like(out)
    ref_out, (ref_features, ref_weight, ref_bias) = exact(features, weight, bias, grad_out)
    peer_out, (peer_features, peer_weight, peer_bias) = peer(features, weight, bias, grad_out)
    assert_close("out", out, ref_out, peer_out, dtype)
    grad_features, grad_weight, grad_bias = TABLE.backward[BACKEND](grad_out, features, weight)
    assert len(grad_features) == len(features)
    for i, (ours, ref, p) in enumerate(
        zip(grad_features, ref_features, peer_features, strict=True)
    ):
        assert_close(f"grad features[{i}]", ours, ref, p, dtype)
    assert_close("grad_weight", grad_weight, ref_weight, peer_weight, dtype)
    assert_close("grad_bias", grad_bias, ref_bias, peer_bias, dtype)


# (leading shape, widths, N, dtype, bias, layout). Blocks are 64 rows x 64 columns with reduction steps
# of 32: together the cases cover 1, 2, 6, 8 and 9 sources (9: two forward chunks through the float32
# partial, two backward chunks over one weight workspace), widths that are not multiples of the step
# (24, 40, 8, 20) and of 16 bytes (20, 12 in 16-bit; element copies instead of cp.async), columns of W
# off 16 bytes, N = 40 / 72 / 130 (partial and several column blocks), leading shapes [T, D] and
# [B, I, T, N, D], strided rows and permuted leading dims, more than one row block, and the weight
# gradient in two split-T ranges (T = 256: two ranges of 4 steps, partials summed in order).
CASES = [
    ((40,), (64,), 48, F32, True, "contiguous"),
    ((2, 1, 3, 2, 5), (24, 40), 40, BF16, True, "contiguous"),
    ((70,), (24, 40), 72, F16, False, "rows"),
    ((2, 3, 1, 2, 6), (16, 24, 40, 8, 32, 20), 64, BF16, True, "leading"),
    ((67,), (8, 24, 12, 32, 40, 16, 8, 20), 40, F16, True, "contiguous"),
    ((3, 11), (8, 24, 12, 32, 40, 16, 8, 20), 72, F32, True, "rows"),
    ((33,), (8, 16, 24, 8, 40, 12, 8, 24, 20), 24, BF16, False, "contiguous"),
    ((1, 2, 3, 1, 5), (8, 16, 24, 8, 40, 12, 8, 24, 20), 130, F32, True, "leading"),
    ((256,), (24, 40), 16, F32, True, "contiguous"),
]


def _case_id(case):
    leading, widths, dim, dtype, bias, layout = case
    name = str(dtype).replace("torch.", "")
    shape = "x".join(map(str, leading))
    return f"{name}-T{shape}-D{'_'.join(map(str, widths))}-N{dim}-{layout}-{'bias' if bias else 'nobias'}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_backward_match_reference(case):
    leading, widths, dim, dtype, bias, layout = case
    features = make_features(leading, widths, dtype, layout)
    weight, b = make_params(widths, dim, dtype, bias)
    check(features, weight, b)


@pytest.mark.parametrize("leading", [(0,), (2, 0, 3, 1)], ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_no_rows(leading, dtype):
    """T = 0: an empty output, empty feature gradients, zero weight and bias gradients."""
    widths = (24, 40)
    features = make_features(leading, widths, dtype)
    weight, bias = make_params(widths, 16, dtype)
    out = TABLE.forward[BACKEND](features, weight, bias)
    assert out.shape == (*leading, 16) and out.dtype == dtype
    grad_features, grad_weight, grad_bias = TABLE.backward[BACKEND](
        torch.randn_like(out), features, weight
    )
    assert [g.shape for g in grad_features] == [f.shape for f in features]
    for grad in (grad_weight, grad_bias):
        assert grad.dtype == dtype
        assert torch.equal(grad, torch.zeros_like(grad))


def test_weight_gradient_is_deterministic():
    """T = 256 in two split-T ranges of the weight gradient: two runs give the same bits."""
    features = make_features((256,), (24, 40), F32)
    weight, _ = make_params((24, 40), 16, F32)
    grad_out = torch.randn(256, 16)
    first = TABLE.backward[BACKEND](grad_out, features, weight)
    second = TABLE.backward[BACKEND](grad_out, features, weight)
    for a, b in zip([*first[0], *first[1:]], [*second[0], *second[1:]], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_unaligned_operands(dtype):
    """A weight, a source and a grad_out 8 bytes off 16-byte alignment (their tiles are staged by
    element copies instead of cp.async) give the same results."""
    shift = 8 // dtype.itemsize  # elements in 8 bytes
    widths = (32, 16)
    features = make_features((40,), widths, dtype)
    weight, bias = make_params(widths, 32, dtype)
    storage = torch.empty(weight.numel() + shift, dtype=dtype)
    weight = storage[shift:].view(weight.shape).copy_(weight)
    storage = torch.empty(features[1].numel() + shift, dtype=dtype)
    features[1] = storage[shift:].view(features[1].shape).copy_(features[1])
    assert weight.data_ptr() % 16 != 0 and features[1].data_ptr() % 16 != 0
    out = TABLE.forward[BACKEND](features, weight, bias)
    grad_out = torch.randn(out.numel() + shift, dtype=dtype)[shift:].view(out.shape)
    assert grad_out.data_ptr() % 16 != 0
    ref_out, (ref_features, ref_weight, ref_bias) = exact(features, weight, bias, grad_out)
    peer_out, (peer_features, peer_weight, peer_bias) = peer(features, weight, bias, grad_out)
    assert_close("out", out, ref_out, peer_out, dtype)
    grad_features, grad_weight, grad_bias = TABLE.backward[BACKEND](grad_out, features, weight)
    for i, (ours, ref, p) in enumerate(
        zip(grad_features, ref_features, peer_features, strict=True)
    ):
        assert_close(f"grad features[{i}]", ours, ref, p, dtype)
    assert_close("grad_weight", grad_weight, ref_weight, peer_weight, dtype)
    assert_close("grad_bias", grad_bias, ref_bias, peer_bias, dtype)


def test_through_the_op_with_autograd():
    """vk.concat_project(backend=...) forward and autograd gradients against the reference backend,
    with a source whose last dim is not contiguous (the op makes it so) and 9 sources."""
    widths = (8, 16, 24, 8, 40, 12, 8, 24, 20)
    features = make_features((2, 9), widths, F32)
    features[2] = torch.randn(2, 9, 24 * 2)[..., ::2]  # last dim stride 2
    weight, bias = make_params(widths, 24, F32)
    results = {}
    for backend in (BACKEND, "reference"):
        leaves = [f.detach().clone().requires_grad_() for f in features]
        w = weight.detach().clone().requires_grad_()
        b = bias.detach().clone().requires_grad_()
        out = vk.concat_project(leaves, w, b, backend=backend)
        out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1]))
        results[backend] = (out, [leaf.grad for leaf in leaves] + [w.grad, b.grad])
    out, grads = results[BACKEND]
    ref_out, ref_grads = results["reference"]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5, msg=lambda m, i=i: f"grad {i}: {m}")


def test_opcheck():
    """torch.library.opcheck through the op with this backend, with and without bias."""
    widths = (24, 40)
    features = [f.requires_grad_() for f in make_features((2, 5), widths, F32)]
    weight, bias = make_params(widths, 16, F32)
    torch.library.opcheck(
        concat_project_op, (features, weight.requires_grad_(), bias.requires_grad_(), BACKEND)
    )
    torch.library.opcheck(concat_project_op, (features, weight, None, BACKEND))


def test_bad_inputs_are_rejected():
    """float64 has no kernel here (the reference runs it); mismatched widths are a clear error from
    the extension itself (direct callers skip the op's validation)."""
    features = make_features((4,), (8, 8), torch.float64)
    weight, bias = make_params((8, 8), 8, torch.float64)
    with pytest.raises((ValueError, RuntimeError), match="concat_project"):
        vk.concat_project(features, weight, bias, backend=BACKEND)
    function = getattr(_extension()[0], f"concat_project_fwd_{BACKEND}")
    features = make_features((4,), (8, 8), F32)
    weight, bias = make_params((8, 12), 8, F32)
    with pytest.raises(ValueError, match=r"weight must be \[N, 16\]"):
        function(features, weight, bias)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        function([f.double() for f in features], weight[:, :16].double(), None)


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
        # 16-bit: cp.async tiles, two sources, one partial step each
        ((40,), (24, 40), 24, BF16, True, "contiguous"),
        # 3xTF32, 9 sources in two chunks (partial carried), element copies (width 12 / 20)
        ((33,), (8, 16, 24, 8, 40, 12, 8, 24, 20), 16, F32, True, "rows"),
    ],
    ids=_case_id,
)
def test_race_free_forward_and_backward(case):
    """Forward and backward under SIMT_RACECHECK: a missing barrier between the double-buffered
    stages and the ldmatrix / fragment reads is a reported race."""
    leading, widths, dim, dtype, bias, layout = case
    features = make_features(leading, widths, dtype, layout)
    weight, b = make_params(widths, dim, dtype, bias)
    with _racecheck():
        check(features, weight, b)
