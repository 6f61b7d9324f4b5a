"""The Triton perceiver_attention kernels (forward, backward) against the reference, on CPU tensors
through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 and patches the interpreter's
bf16 ``tl.dot``), or compiled on CUDA tensors with VLMK_TEST_DEVICE=cuda (tests/devices.py).
Tolerances: DESIGN §6 via tests/attention_testing.py (``assert_within_policy``: twice torch's own error
in the inputs' dtype, both against the float64 reference, plus a floor).

The interpreter runs every program one after another in numpy, so the default cases stay small;
heavier ones are marked ``slow``. Every kernel output buffer is poisoned with NaN at allocation
(tests/allocations.py), so an element a kernel forgets to write fails the comparison. Every autotune
config of every kernel runs in ``test_every_config_matches_reference`` (``force_triton_config``).
"""

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from tests.allocations import poisoned_allocations
from tests.attention_testing import assert_within_policy
from tests.devices import ON_CUDA, TEST_DEVICE

triton = pytest.importorskip("triton")
if not ON_CUDA and not triton.knobs.runtime.interpret:
    pytest.skip(
        "TRITON_INTERPRET=1 was not set before triton was imported", allow_module_level=True
    )

import vlm_kernels as vk  # noqa: E402
from vlm_kernels.ops.perceiver_attention import perceiver_attention_op  # noqa: E402
from vlm_kernels.reference.perceiver_attention import perceiver_attention_reference  # noqa: E402
from vlm_kernels.triton import perceiver_attention as pa  # noqa: E402
from vlm_kernels.triton._launch import force_triton_config, triton_config_counts  # noqa: E402
from vlm_kernels.triton.aot import REGISTRY  # noqa: E402

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
GRAD_NAMES = ("dq", "dk_media", "dv_media", "dk_latents", "dv_latents")


# ---- inputs ---------------------------------------------------------------------------------------------


def padding_mask(batch: int, num_media: int, kind: str) -> torch.Tensor | None:
    """[B, Nm] bool (True = real) or None. kinds: "none" (no mask), "all_real", "random" (about 70%
    real), "edge" (random, with item 0 all padding but one token and item 1 all padding: the latents
    of item 1 attend only to themselves), "strided" ("edge" as a view with a token stride of 2)."""
    if kind == "none":
        return None
    if kind == "all_real":
        return torch.ones(batch, num_media, dtype=torch.bool, device=TEST_DEVICE)
    if kind == "strided":
        wide = torch.zeros(batch, 2 * num_media, dtype=torch.bool, device=TEST_DEVICE)
        wide[:, ::2] = padding_mask(batch, num_media, "edge")
        return wide[:, ::2]
    mask = torch.rand(batch, num_media, device=TEST_DEVICE) < 0.7
    if kind == "edge":
        mask[0] = False
        mask[0, num_media // 2] = True
        if batch > 1:
            mask[1] = False
    elif kind != "random":
        raise ValueError(f"unknown padding kind {kind!r}")
    return mask


def make_inputs(batch, num_media, num_latents, heads_q, heads_kv, head_dim, dtype, strided=False):
    """``(q, k_media, v_media, k_latents, v_latents)``, fresh random values. ``strided``: q and the
    latents' k, v are head slices of one fused [B, Nl, Hq + 2 Hkv, Dh] projection, the media's k, v
    slices of one [B, Nm, 2, Hkv, Dh] tensor (last dim contiguous, every other stride not)."""

    def randn(*shape):
        return torch.randn(*shape, device=TEST_DEVICE).to(dtype)

    if not strided:
        q = randn(batch, num_latents, heads_q, head_dim)
        k_media, v_media = (randn(batch, num_media, heads_kv, head_dim) for _ in range(2))
        k_latents, v_latents = (randn(batch, num_latents, heads_kv, head_dim) for _ in range(2))
        return q, k_media, v_media, k_latents, v_latents
    fused = randn(batch, num_latents, heads_q + 2 * heads_kv, head_dim)
    q = fused[:, :, :heads_q]
    k_latents = fused[:, :, heads_q : heads_q + heads_kv]
    v_latents = fused[:, :, heads_q + heads_kv :]
    media = randn(batch, num_media, 2, heads_kv, head_dim)
    return q, media[:, :, 0], media[:, :, 1], k_latents, v_latents


# ---- the kernels under test, and the yardsticks -------------------------------------------------------


def forward(q, k_media, v_media, k_latents, v_latents, mask, scale):
    with poisoned_allocations():
        return pa.perceiver_attention_fwd_triton(
            q, k_media, v_media, k_latents, v_latents, mask, scale
        )


def backward(grad_out, q, k_media, v_media, k_latents, v_latents, mask, out, lse, scale):
    with poisoned_allocations():
        return pa.perceiver_attention_bwd_triton(
            grad_out, q, k_media, v_media, k_latents, v_latents, mask, out, lse, scale
        )


def lowp_perceiver(q, k_media, v_media, k_latents, v_latents, mask, scale):
    """The same attention computed by torch in the inputs' own dtype, with the concatenation (scores,
    softmax and products in low precision): the yardstick for acceptable low-precision error. float32
    inputs: the reference itself."""
    if q.dtype == torch.float32:
        return perceiver_attention_reference(
            q, k_media, v_media, k_latents, v_latents, media_padding_mask=mask, scale=scale
        )
    group = q.shape[2] // k_media.shape[2]
    k = torch.cat([k_media, k_latents], 1).transpose(1, 2).repeat_interleave(group, 1)
    v = torch.cat([v_media, v_latents], 1).transpose(1, 2).repeat_interleave(group, 1)
    scores = (q.transpose(1, 2) @ k.transpose(-1, -2)) * scale  # [B, Hq, Nl, Nm + Nl]
    if mask is not None:
        latents = torch.ones(q.shape[0], q.shape[1], dtype=torch.bool, device=q.device)
        visible = torch.cat([mask, latents], 1)[:, None, None, :]
        scores = scores.masked_fill(~visible, float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


def check_against_reference(inputs, mask, forward_fn=forward, backward_fn=backward):
    """``forward_fn`` (and ``backward_fn``) on ``inputs`` against the float64 reference: out, lse and
    all five gradients, torch's own error in the inputs' dtype as the yardstick. Returns the
    kernels' ``(out, lse, grads)``."""
    dtype = inputs[0].dtype
    scale = inputs[0].shape[-1] ** -0.5
    out, lse = forward_fn(*inputs, mask, scale)
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    leaves_lowp = [t.detach().clone().requires_grad_() for t in inputs]
    ref_out, ref_lse = perceiver_attention_reference(
        *leaves64, media_padding_mask=mask, scale=scale, return_lse=True
    )
    lowp_out = lowp_perceiver(*leaves_lowp, mask, scale)
    assert out.is_contiguous() and lse.dtype == torch.float32
    assert_within_policy("out", out, lowp_out, ref_out, dtype)
    assert torch.isfinite(lse).all(), "lse: every row sees at least the latents"
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-3, atol=1e-3)
    if backward_fn is None:
        return out, lse, None
    grad_out = torch.randn_like(out)
    grads = backward_fn(grad_out, *inputs, mask, out, lse, scale)
    ref_grads = torch.autograd.grad(ref_out, leaves64, grad_out.double())
    lowp_grads = torch.autograd.grad(lowp_out, leaves_lowp, grad_out)
    for name, ours, lowp, ref, leaf in zip(
        GRAD_NAMES, grads, lowp_grads, ref_grads, inputs, strict=True
    ):
        assert ours.dtype == leaf.dtype and ours.is_contiguous(), name
        assert_within_policy(name, ours, lowp, ref, dtype)
    return out, lse, grads


# ---- forward and all five gradients against the reference ------------------------------------------

# (batch, Nm, Nl, Hq, Hkv, Dh, dtype, padding kind, strided). A covering set rather than the full
# product (the interpreter runs every program in numpy): Nm in {1, 5, 257, 1028} and Nl in {1, 8, 64},
# every dtype, Dh 64/80/128, MHA and GQA 8/2, 4/1, 2/1, every padding kind, contiguous and strided.
CASES = [
    (1, 5, 8, 4, 4, 64, F32, "none", False),
    (2, 257, 8, 8, 2, 80, BF16, "edge", False),
    (1, 1, 1, 2, 1, 128, F16, "random", False),
    (3, 5, 1, 4, 2, 80, F32, "strided", True),
    (2, 1, 8, 4, 1, 64, BF16, "edge", True),
    (1, 1028, 8, 2, 2, 128, F16, "random", False),
    (2, 257, 64, 4, 1, 64, F32, "edge", True),
    (1, 5, 64, 2, 1, 80, F16, "all_real", False),
]
SLOW_CASES = [
    (2, 1028, 64, 8, 2, 64, BF16, "edge", False),
    (2, 1028, 64, 4, 4, 80, F32, "random", True),
    (2, 257, 64, 8, 8, 128, F16, "strided", True),
    (2, 1028, 1, 8, 2, 128, BF16, "none", True),
    (3, 257, 8, 4, 2, 128, F32, "edge", False),
]


def _case_id(case):
    batch, media, latents, hq, hkv, dh, dtype, kind, strided = case
    name = str(dtype).replace("torch.", "")
    layout = "-strided" if strided else ""
    return f"{name}-B{batch}-Nm{media}-Nl{latents}-h{hq}/{hkv}-d{dh}-{kind}{layout}"


def _run_case(case):
    batch, media, latents, hq, hkv, dh, dtype, kind, strided = case
    inputs = make_inputs(batch, media, latents, hq, hkv, dh, dtype, strided)
    check_against_reference(inputs, padding_mask(batch, media, kind))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_backward_match_reference(case):
    _run_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=_case_id)
def test_forward_and_backward_match_reference_large(case):
    _run_case(case)


# ---- padding semantics --------------------------------------------------------------------------------


def test_all_padding_item_attends_to_the_latents_only():
    """A media item that is all padding: each latent attends to the latents alone (the math of the
    concatenation with every media token masked), and its media keys get exactly zero gradient."""
    inputs = make_inputs(2, 9, 8, 4, 2, 64, F32)
    mask = padding_mask(2, 9, "edge")  # item 1: all padding
    out, lse, grads = check_against_reference(inputs, mask)
    q, _, _, k_latents, v_latents = inputs
    latents_only = perceiver_attention_reference(
        q[1:],
        k_latents[1:, :0],
        k_latents[1:, :0],
        k_latents[1:],
        v_latents[1:],
        scale=64**-0.5,
        return_lse=True,
    )
    torch.testing.assert_close(out[1:], latents_only[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[1:], latents_only[1], atol=1e-5, rtol=1e-5)
    assert not grads[1][1].any() and not grads[2][1].any()


def test_padded_media_tokens_are_never_read():
    """Padding poisoned with NaN in k_media and v_media leaves out, lse and every gradient bit for bit
    as they were; the padded tokens' dk, dv are exactly 0 (the kernels mask those loads)."""
    inputs = make_inputs(2, 40, 8, 4, 2, 80, BF16)
    mask = padding_mask(2, 40, "edge")
    out, lse, _ = check_against_reference(inputs, mask)
    q, k_media, v_media, k_latents, v_latents = inputs
    poisoned_k, poisoned_v = k_media.clone(), v_media.clone()
    poisoned_k[~mask] = float("nan")
    poisoned_v[~mask] = float("nan")
    poisoned = (q, poisoned_k, poisoned_v, k_latents, v_latents)
    scale = 80**-0.5
    out_p, lse_p = forward(*poisoned, mask, scale)
    assert torch.equal(out, out_p) and torch.equal(lse, lse_p)
    grad_out = torch.randn_like(out)
    clean = backward(grad_out, *inputs, mask, out, lse, scale)
    grads_p = backward(grad_out, *poisoned, mask, out, lse, scale)
    for name, first, second in zip(GRAD_NAMES, clean, grads_p, strict=True):
        assert torch.equal(first, second), f"{name} changed with the padding poisoned"
    assert not grads_p[1][~mask].any() and not grads_p[2][~mask].any()


def test_no_mask_equals_all_real_mask_bitwise():
    inputs = make_inputs(2, 21, 8, 4, 2, 64, F16)
    scale = 0.2
    out, lse = forward(*inputs, None, scale)
    out_m, lse_m = forward(*inputs, padding_mask(2, 21, "all_real"), scale)
    assert torch.equal(out, out_m) and torch.equal(lse, lse_m)


def test_backward_is_deterministic():
    """GQA sums over the head group in registers, in a fixed order: two runs agree bit for bit."""
    inputs = make_inputs(1, 70, 8, 8, 2, 64, BF16)
    mask = padding_mask(1, 70, "random")
    out, lse = forward(*inputs, mask, 0.125)
    grad_out = torch.randn_like(out)
    first = backward(grad_out, *inputs, mask, out, lse, 0.125)
    second = backward(grad_out, *inputs, mask, out, lse, 0.125)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# ---- every autotune config ------------------------------------------------------------------------------


def _config_count(width: int) -> int:
    dtype = F32 if width == 4 else BF16
    return max(len(configs) for configs in pa.kernel_configs(dtype).values())


CONFIG_CASES = [(width, index) for width in (2, 4) for index in range(_config_count(width))]


@contextlib.contextmanager
def every_kernel_at_config(index: int):
    """Every perceiver_attention kernel forced to config #index of its list (a shorter list runs
    its last config)."""
    with contextlib.ExitStack() as stack:
        for name in pa.kernel_configs(F32):
            stack.enter_context(force_triton_config(name, index))
        yield


@pytest.mark.parametrize(
    "width, index",
    CONFIG_CASES,
    ids=[f"{'fp32' if width == 4 else '16bit'}-config{index}" for width, index in CONFIG_CASES],
)
def test_every_config_matches_reference(width, index):
    """Each kernel at config #index on a case that puts every mask to work at every tile size:
    Nm=37 (a partial media tile at every BLOCK_N), Nl=70 (a partial query block at BLOCK_M 16/32/64
    and a partial latent tile), Dh=80 (a partial BLOCK_D), GQA 4/2, strided inputs, an item with one
    real token and one all padding."""
    dtype = F32 if width == 4 else (BF16, F16)[index % 2]
    with every_kernel_at_config(index):
        inputs = make_inputs(2, 37, 70, 4, 2, 80, dtype, strided=True)
        check_against_reference(inputs, padding_mask(2, 37, "edge"))


def _shape(constexprs, num_warps, num_stages):
    return constexprs.get("BLOCK_M"), constexprs.get("BLOCK_N"), num_warps, num_stages


def test_configs_are_declared_and_registered_for_the_compile_report():
    """Per kernel and element type, the compile report gets every config the launchers can run, at
    Dh 64, 80 and 128, with and without the padding mask; the float32 backward once more with TF32
    dots (its own list where it has one)."""
    declared = triton_config_counts()
    for name in pa._CONFIGS:
        lists = [*pa._CONFIGS[name].values(), pa._TF32_CONFIGS.get(name, ())]
        assert declared[name] == max(len(configs) for configs in lists)
        variants = [("bf16", BF16, None), ("fp32", F32, None)]
        if name in ("perceiver_attention_bwd_dkdv", "perceiver_attention_bwd_dq"):
            variants.append(("fp32tf32", F32, "tf32"))
        for label, dtype, precision in variants:
            configs = pa.kernel_configs(dtype, precision)[name]
            expected = [_shape(c.kwargs, c.num_warps, c.num_stages) for c in configs]
            suffixes = ("",) if name == "perceiver_attention_bwd_preprocess" else ("", ",nopad")
            for head_dim in (64, 80, 128):
                for suffix in suffixes:
                    entry = REGISTRY.get(f"{name}[{label},d{head_dim}{suffix}]")
                    shapes = [
                        _shape(c.constexprs, c.num_warps, c.num_stages) for c in entry.configs
                    ]
                    assert shapes == expected, (name, label, head_dim, suffix)
                    flags = {c.constexprs.get("HAS_PADDING", True) for c in entry.configs}
                    assert flags == {suffix == ""}
                    if precision is not None and "INPUT_PRECISION" in entry.configs[0].constexprs:
                        assert {c.constexprs["INPUT_PRECISION"] for c in entry.configs} == {"tf32"}


def test_float32_backward_honours_pytorch_tf32_setting(monkeypatch):
    """float32 backward dots are FMA unless PyTorch allows TF32 for float32 matmuls; with TF32 the
    dq kernel runs its own tile list (no shape compiled spill-free with both). The interpreter
    computes float32 either way: the test reads what each launch was given, and checks the outputs."""
    passed = {}

    def spy(name, kernel, configs, grid, args, **kwargs):
        passed[name] = (kwargs.get("INPUT_PRECISION"), configs)
        return launch(name, kernel, configs, grid, args, **kwargs)

    launch = pa.launch
    monkeypatch.setattr(pa, "launch", spy)
    inputs = make_inputs(1, 20, 8, 4, 2, 64, F32)
    saved = torch.backends.cuda.matmul.fp32_precision
    for precision in ("ieee", "tf32"):
        torch.backends.cuda.matmul.fp32_precision = precision
        try:
            check_against_reference(inputs, padding_mask(1, 20, "random"))
        finally:
            torch.backends.cuda.matmul.fp32_precision = saved
        assert passed["perceiver_attention_bwd_dkdv"][0] == precision
        assert passed["perceiver_attention_bwd_dq"] == (
            precision,
            pa.kernel_configs(F32, precision)["perceiver_attention_bwd_dq"],
        )
        assert passed["perceiver_attention_fwd"][0] == "tf32x3"


# ---- through the op -------------------------------------------------------------------------------------


def test_op_on_the_triton_backend_with_autograd():
    """``vk.perceiver_attention(backend="triton")``: forward and all five gradients through the custom
    op's autograd, equal to the reference backend's; and the op passes opcheck."""
    tensors = make_inputs(2, 9, 8, 4, 2, 64, F32)
    mask = padding_mask(2, 9, "edge")
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = vk.perceiver_attention(*leaves, media_padding_mask=mask, backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.clone().requires_grad_() for t in tensors]
    ref = vk.perceiver_attention(*ref_leaves, media_padding_mask=mask, backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(perceiver_attention_op, (*tensors, mask, 0.3, "triton"))


def test_bad_inputs_are_rejected():
    q, k_media, v_media, k_latents, v_latents = make_inputs(1, 4, 2, 2, 2, 160, F32)
    with pytest.raises(ValueError, match=r"head dim Dh=160 .* outside the supported 1..128"):
        pa.perceiver_attention_fwd_triton(q, k_media, v_media, k_latents, v_latents, None, 0.1)
    inputs = [t[..., :64].double() for t in (q, k_media, v_media, k_latents, v_latents)]
    with pytest.raises(TypeError, match=r"float32, bfloat16 or float16, got torch\.float64"):
        pa.perceiver_attention_fwd_triton(*inputs, None, 0.1)


def test_no_media_tokens():
    """Nm = 0 (an empty media segment, with or without a [B, 0] mask): the latents attend to
    themselves; the media gradients are empty."""
    inputs = make_inputs(2, 0, 8, 4, 2, 64, F32)
    for mask in (None, torch.zeros(2, 0, dtype=torch.bool, device=TEST_DEVICE)):
        check_against_reference(inputs, mask)


def test_empty_latents():
    inputs = make_inputs(2, 5, 0, 4, 2, 64, F32)
    out, lse = forward(*inputs, None, 0.125)
    assert out.shape == (2, 0, 4, 64) and lse.shape == (2, 4, 0)
    grads = backward(torch.zeros_like(out), *inputs, None, out, lse, 0.125)
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in inputs]
    assert not grads[1].isnan().any() and not grads[1].any()
