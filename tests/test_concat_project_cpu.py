"""The C++ CPU concat_project kernels (GEMMs on the weight's column blocks through ATen's CPU GEMM, no
concatenated buffer) against the reference: forward and every gradient, 1 to 17 sources of unequal
widths, leading shapes [T] and [B, I, T, N], float32 / bfloat16 / float16, strided sources, the
16-bit forward's float32 tile at its edges, the op with backend="cpu" and "auto", opcheck and
torch.compile. Tolerances: tests/concat_project_testing.py.
"""

import pytest
import torch

import vlm_kernels as vk
from tests.concat_project_testing import (
    BF16,
    CASES,
    F16,
    F32,
    case_id,
    case_inputs,
    check_case,
    make_inputs,
)
from tests.devices import ON_CUDA, run_without_avx512
from vlm_kernels._backends import _extension
from vlm_kernels.ops.concat_project import concat_project_op

_C = _extension()[0]
if ON_CUDA or _C is None or not hasattr(_C, "concat_project_fwd_cpu"):
    pytest.skip(
        "the C++ CPU kernels run CPU tensors of a built vlm_kernels._C", allow_module_level=True
    )


def check(features, weight, bias):
    check_case(_C.concat_project_fwd_cpu, _C.concat_project_bwd_cpu, features, weight, bias)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_backward_match_reference(case):
    check(*case_inputs(case))


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_tile_edges(dtype):
    """1100 rows x 700 outputs: the 16-bit forward's 256-feature panels and 1024-row float32 tiles
    run full and partial (and its 32-row brgemm blocks); 17 sources of odd and even widths."""
    check(*make_inputs((1100,), (7, 24) * 8 + (41,), 700, dtype))


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("rows", [1, 17, 600])
def test_transposed_tile_edges(dtype, rows):
    """Fewer rows than outputs: the 16-bit forward packs the rows (out^T = W X^T). 600 rows: three
    row blocks of 200 (B padded to 208); 1000 outputs: 15 full 64-feature blocks and a partial one;
    odd and even widths (odd: the last column as a float32 rank-1 update); a 601-wide source takes
    three brgemm K steps (224, 224, 152)."""
    check(*make_inputs((rows,), (7, 24, 41, 64, 601), 1000, dtype))


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_k_steps(dtype):
    """As many rows as outputs or more: the 16-bit forward cuts each source's width into equal
    chunks of at most 2048 and those into equal brgemm K steps of at most 640, accumulating in its
    float32 tile. 4101 wide: chunks of 1376, 1376 and 1348 (steps of 480, 480, 416 and 480, 480,
    388) and the odd last column; 1301: one chunk, steps of 448, 448, 404; 700: 352, 348; 640: one
    step."""
    check(*make_inputs((300,), (4101, 1301, 700, 640, 24), 200, dtype))


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_more_rows_than_transposed_takes(dtype):
    """Fewer rows than outputs but more than 640: the untransposed path (it packs W, not the rows)."""
    check(*make_inputs((700,), (96, 33), 1000, dtype))


def test_streamed_output():
    """An output of 4 MiB and more (4200 x 520 bfloat16) is written by non-temporal stores of whole
    lines where a row starts on one (rows of 1040 bytes: every fourth row), regular stores
    elsewhere and for the 8-feature tail of the 256-feature panels."""
    check(*make_inputs((4200,), (64, 97), 520, BF16))


@pytest.mark.parametrize("outputs", [4096, 4100])
def test_transposed_streamed_output(outputs):
    """Transposed, an output of 4 MiB and more (520 x 4096 bfloat16) is written by non-temporal
    stores of whole lines; 520 rows: three row blocks of 174, each ten whole 16-row blocks and a
    14-row tail. 4100 outputs (rows of 8200 bytes) keep regular stores."""
    check(*make_inputs((520,), (64, 97), outputs, BF16))


def test_portable_loops_without_avx512():
    """VLMK_CPU_NO_AVX512=1 (a fresh process): the 16-bit paths' packing and epilogues take their
    portable loops, transposed and not, with odd widths, partial blocks and a streamed-size output."""
    script = (
        "import torch\n"
        "from tests.test_concat_project_cpu import check\n"
        "from tests.concat_project_testing import make_inputs, BF16, F16\n"
        "for dtype in (BF16, F16):\n"
        "    check(*make_inputs((600,), (7, 24, 41, 64, 601), 1000, dtype))\n"
        "    check(*make_inputs((1100,), (7, 24, 41), 700, dtype))\n"
        "check(*make_inputs((520,), (64, 97), 4096, BF16))\n"
    )
    run_without_avx512(script)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_float32_products_where_aten_has_no_16bit_gemm(dtype):
    """With oneDNN switched off (as on a CPU where ATen's 16-bit GEMM is a scalar loop, e.g. an
    AVX2-only EPYC) the 16-bit forward converts to float32: 600 rows in three blocks of 200, 1100
    outputs in panels of 512, 512 and 76, sources of odd widths. The sum is rounded once: every
    output is within half an ulp (plus float32 noise) of the float32 product rounded, where
    rounding after each source drifts further; the backward runs on float32 copies."""
    features, weight, bias = make_inputs((600,), (7, 24, 41, 64, 601), 1100, dtype)
    with torch.backends.mkldnn.flags(enabled=False):
        check(features, weight, bias)
        out = _C.concat_project_fwd_cpu(features, weight, bias)
    exact = torch.cat([f.double() for f in features], -1) @ weight.double().t() + bias.double()
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((out.double() - exact).abs() <= 0.5 * ulp + 1e-5 * exact.abs().max()).all()


def test_empty_sizes():
    for lead, widths, dim in (((0,), (8, 4), 16), ((5,), (8, 4), 0), ((5,), (8, 0, 4), 16)):
        check(*make_inputs(lead, widths, dim, F32))
        check(*make_inputs(lead, widths, dim, BF16))


def test_no_source_columns_gives_the_bias():
    features, weight, bias = make_inputs((3, 4), (0, 0), 8, BF16)
    torch.testing.assert_close(
        _C.concat_project_fwd_cpu(features, weight, bias), bias.expand(3, 4, 8)
    )
    zeros = _C.concat_project_fwd_cpu(features, weight, None)
    assert torch.equal(zeros, torch.zeros(3, 4, 8, dtype=BF16))


def test_nan_propagates():
    features, weight, bias = make_inputs((6,), (8, 16), 12, F32)
    features[1][2, 5] = float("nan")
    out = _C.concat_project_fwd_cpu(features, weight, bias)
    assert out[2].isnan().all() and not out[[0, 1, 3, 4, 5]].isnan().any()


def test_direct_calls_check_their_inputs():
    """The C++ entry points guard direct callers too (the op validates first)."""
    features, weight, bias = make_inputs((3,), (8, 4), 16, F32)
    with pytest.raises(RuntimeError, match="weight must be"):
        _C.concat_project_fwd_cpu(features, weight[:, :-1], bias)
    with pytest.raises(RuntimeError, match="leading shape"):
        _C.concat_project_fwd_cpu([features[0], features[1][:2]], weight, bias)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        _C.concat_project_fwd_cpu([f.double() for f in features], weight.double(), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        _C.concat_project_fwd_cpu(features, weight, bias[:-1])
    with pytest.raises(RuntimeError, match="grad_out must be"):
        _C.concat_project_bwd_cpu(torch.randn(3, 15), features, weight)


# ---- through the op ----------------------------------------------------------------------------------


def _leaves(features, weight, bias):
    return (
        [f.detach().clone().requires_grad_() for f in features],
        weight.detach().clone().requires_grad_(),
        bias.detach().clone().requires_grad_(),
    )


@pytest.mark.parametrize("backend", ["cpu", None])
def test_op_autograd_matches_reference(backend):
    """vk.concat_project with backend="cpu" and "auto" (the C++ kernels on CPU tensors) against the
    reference backend, forward and autograd gradients, strided sources."""
    inputs = make_inputs((2, 3, 5), (8, 16, 24), 24, F32, strided=True)
    results = {}
    for name in (backend, "reference"):
        features, weight, bias = _leaves(*inputs)
        out = vk.concat_project(features, weight, bias, backend=name)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        results[name] = [out, *(f.grad for f in features), weight.grad, bias.grad]
    for ours, ref in zip(results[backend], results["reference"], strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_opcheck():
    for dtype in (F32, BF16):
        features, weight, bias = _leaves(*make_inputs((3, 5), (8, 12, 4), 16, dtype))
        torch.library.opcheck(concat_project_op, (features, weight, bias, "cpu"))
        torch.library.opcheck(concat_project_op, (features, weight, None, "cpu"))


def test_compile_fullgraph():
    features, weight, bias = _leaves(*make_inputs((2, 7), (8, 24), 16, F32))

    def project(features, weight, bias):
        return torch.tanh(vk.concat_project(features, weight, bias, backend="cpu"))

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
