"""The Triton concat_project kernels (forward GEMM over L source pointers; feature / weight / bias
gradients) against the reference, on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 and patches the interpreter's bf16 ``tl.dot``), or compiled on CUDA tensors with
VLMK_TEST_DEVICE=cuda (tests/devices.py). Tolerances: tests/concat_project_testing.py. Every autotune
config of every kernel runs in ``test_every_config_matches_reference``. Also here: the op's
validation of bad inputs (backend-independent), opcheck and torch.compile through backend="triton".
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
from tests.concat_project_testing import (  # noqa: E402
    BF16,
    CASES,
    F16,
    F32,
    case_id,
    case_inputs,
    check_case,
    make_inputs,
)
from vlm_kernels.ops.concat_project import concat_project_op  # noqa: E402
from vlm_kernels.triton import concat_project as cp  # noqa: E402
from vlm_kernels.triton._launch import force_triton_config, triton_config_counts  # noqa: E402

pytestmark = pytest.mark.usefixtures("tensors_on_test_device")


def backward_with_splits(splits):
    def backward(grad_out, features, weight):
        return cp.concat_project_bwd_triton(grad_out, features, weight, splits=splits)

    return backward


def check(features, weight, bias, splits=None):
    check_case(cp.concat_project_fwd_triton, backward_with_splits(splits), features, weight, bias)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_backward_match_reference(case):
    check(*case_inputs(case))


def test_more_than_eight_sources_in_float16_chunks_accumulate_in_float32():
    """17 sources: three launches of the forward (8 + 8 + 1) through a float32 partial buffer, and
    per-chunk backward launches; float16 output rounded once (within the one-GEMM peer's bound)."""
    check(*make_inputs((23,), (8, 4) * 8 + (16,), 40, F16))


def test_weight_gradient_split_reduction_is_deterministic():
    """The dW / dbias reduction over M cut into float32 partials (300 rows: ranges of 128, the last
    partial), summed on the host: same values as the reference, and run twice, the same bits."""
    features, weight, bias = make_inputs((300,), (24, 40, 8), 48, F32)
    check(features, weight, bias, splits=3)
    grad_out = torch.randn(300, 48)
    first = cp.concat_project_bwd_triton(grad_out, features, weight, splits=3)
    second = cp.concat_project_bwd_triton(grad_out, features, weight, splits=3)
    for a, b in zip([*first[0], *first[1:]], [*second[0], *second[1:]], strict=True):
        assert torch.equal(a, b)


def test_empty_sizes():
    """No rows, no output features, or a source of width 0: the kernels write what exists."""
    for lead, widths, dim in (((0,), (8, 4), 16), ((5,), (8, 4), 0), ((5,), (8, 0, 4), 16)):
        check(*make_inputs(lead, widths, dim, F32))


# ---- every autotune config ---------------------------------------------------------------------------


def _config_count(width: int) -> int:
    return max(len(lists[width]) for lists in cp._CONFIGS.values())


CONFIG_CASES = [(width, index) for width in (2, 4) for index in range(_config_count(width))]


def test_config_counts_are_declared():
    counts = triton_config_counts()
    for name, lists in cp._CONFIGS.items():
        assert counts[name] == max(len(configs) for configs in lists.values())


@pytest.mark.parametrize(
    "width, index",
    CONFIG_CASES,
    ids=[f"{'fp32' if width == 4 else '16bit'}-config{index}" for width, index in CONFIG_CASES],
)
def test_every_config_matches_reference(width, index):
    """Every kernel at config #index (``force_triton_config``; a shorter list runs its last) on a case
    that puts every mask to work at every tile size: 130 rows (partial BLOCK_M), N = 72 (partial
    BLOCK_N), widths 40, 8 and 136 (partial and multiple BLOCK_K tiles per source), strided sources,
    the dW reduction split in two (the second range partial)."""
    dtype = F32 if width == 4 else (BF16, F16)[index % 2]
    with contextlib.ExitStack() as stack:
        for name in cp._CONFIGS:
            stack.enter_context(force_triton_config(name, index))
        check(*make_inputs((2, 65), (40, 8, 136), 72, dtype, strided=True), splits=2)


# ---- through the op ----------------------------------------------------------------------------------


def _leaves(features, weight, bias):
    return (
        [f.detach().clone().requires_grad_() for f in features],
        weight.detach().clone().requires_grad_(),
        bias.detach().clone().requires_grad_(),
    )


def test_op_autograd_matches_reference():
    """vk.concat_project(backend="triton") forward and autograd gradients against the reference
    backend, with strided sources and more than 8 of them."""
    inputs = make_inputs((2, 3, 5), (8, 16) * 5, 24, F32, strided=True)
    results = {}
    for backend in ("triton", "reference"):
        features, weight, bias = _leaves(*inputs)
        out = vk.concat_project(features, weight, bias, backend=backend)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        results[backend] = [out, *(f.grad for f in features), weight.grad, bias.grad]
    for ours, ref in zip(results["triton"], results["reference"], strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_opcheck():
    features, weight, bias = _leaves(*make_inputs((3, 5), (8, 12, 4), 16, F32))
    torch.library.opcheck(concat_project_op, (features, weight, bias, "triton"))
    torch.library.opcheck(concat_project_op, (features, weight, None, "triton"))


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) of a function around the op (no graph break), forward and
    backward, same values as eager."""
    features, weight, bias = _leaves(*make_inputs((2, 7), (8, 24), 16, F32))

    def project(features, weight, bias):
        return torch.tanh(vk.concat_project(features, weight, bias, backend="triton"))

    compiled = torch.compile(project, fullgraph=True, backend="aot_eager")
    out = compiled(features, weight, bias)
    out.sum().backward()
    grads = [f.grad.clone() for f in features] + [weight.grad.clone(), bias.grad.clone()]
    eager_leaves = _leaves(features, weight, bias)
    eager = project(*eager_leaves)
    eager.sum().backward()
    torch.testing.assert_close(out, eager)
    eager_grads = [f.grad for f in eager_leaves[0]] + [eager_leaves[1].grad, eager_leaves[2].grad]
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_float64_weight_is_not_a_triton_dtype():
    features, weight, bias = make_inputs((4,), (8,), 16, torch.float64)
    with pytest.raises(ValueError, match="triton"):
        vk.concat_project(features, weight, bias, backend="triton")


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda f, w, b: ([], w, b), TypeError, "non-empty list"),
        (lambda f, w, b: (f[0], w, b), TypeError, "non-empty list"),
        (lambda f, w, b: ([f[0], "x"], w, b), TypeError, r"features\[1\]"),
        (lambda f, w, b: ([f[0], f[1][:2]], w, b), ValueError, "leading shape"),
        (lambda f, w, b: (f, w[:, :-1], b), ValueError, r"weight.*\[N, sum_l D_l\]"),
        (lambda f, w, b: (f, w[0], b), ValueError, "weight must have 2 dimensions"),
        (lambda f, w, b: (f, w, b[:-1]), ValueError, r"bias.*\[N\]"),
        (lambda f, w, b: ([f[0].double(), f[1]], w, b), (TypeError, ValueError), "dtype"),
        (lambda f, w, b: ([torch.tensor(1.0), f[1]], w, b), ValueError, "at least 1 dimension"),
        (lambda f, w, b: ([f[0].int(), f[1]], w, b), TypeError, r"features\[0\]"),
    ],
    ids=[
        "empty-list",
        "not-a-list",
        "not-a-tensor",
        "leading-shape",
        "weight-width",
        "weight-rank",
        "bias-shape",
        "dtype-mix",
        "scalar",
        "int-feature",
    ],
)
def test_bad_inputs_are_rejected(mutate, error, match):
    """The op validates before any backend runs: each error names the argument and the shape or dtype."""
    features, weight, bias = make_inputs((3, 4), (8, 4), 16, F32)
    with pytest.raises(error, match=match):
        vk.concat_project(*mutate(features, weight, bias), backend="triton")
