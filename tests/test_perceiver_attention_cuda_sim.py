"""perceiver_attention's CUDA kernels (tensor-core forward; backward dk/dv + dq passes) run on the CPU by
the SIMT emulator (the cuda_sim backend), through the public op and its autograd, against the float64
reference with the DESIGN §6 policy (err <= 2 * torch's own error in the same dtype + floor; float32 runs
on 3xTF32 and is held to the float32 tolerance). With VLMK_TEST_DEVICE=cuda (tests/devices.py) the same
tests run the compiled kernels (the cuda backend) on CUDA tensors.

The emulator runs every CUDA thread as a fiber, so the default cases stay small; bigger ones are marked
slow. Outputs come from ``at::empty``, which fills them with NaN here (deterministic mode), so an element
a kernel forgets to write fails the NaN check.
"""

from __future__ import annotations

import pytest
import torch

import vlm_kernels as vk
from tests.attention_testing import assert_within_policy
from tests.devices import ON_CUDA
from vlm_kernels.ops.perceiver_attention import TABLE
from vlm_kernels.reference.perceiver_attention import perceiver_attention_reference

BACKEND = "cuda" if ON_CUDA else "cuda_sim"
pytestmark = pytest.mark.usefixtures("tensors_on_test_device")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _poison_uninitialized():
    """In deterministic mode ``at::empty`` fills float tensors with NaN: unwritten outputs show up."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def padding_mask(batch: int, num_media: int, kind: str) -> torch.Tensor | None:
    """[B, Nm] bool (True = real token). kinds: "none" (no mask), "random" (about half real, one real
    token at least), "one-real" (all padding but one token), "all-padding" (the last batch item is all
    padding, the others random), "all-real"."""
    if kind == "none":
        return None
    if kind == "all-real":
        return torch.ones(batch, num_media, dtype=torch.bool)
    mask = torch.rand(batch, num_media) < 0.5
    mask[:, torch.randint(num_media, (1,))] = True
    if kind == "one-real":
        mask[:] = False
        mask[:, num_media // 2] = True
    elif kind == "all-padding":
        mask[-1] = False
    elif kind != "random":
        raise ValueError(kind)
    return mask


def make_inputs(batch, num_latents, num_media, heads_q, heads_kv, head_dim, dtype, strided=None):
    """q, k_media, v_media, k_latents, v_latents (fresh random). ``strided="fused"``: every tensor is a
    slice of a fused tensor (the layout of a fused kv / qkv projection; rows stay 16-byte aligned, so
    the kernels stage them with cp.async); ``strided="unaligned"``: also slices, but k_media / v_media
    start one element into a wider last dim, so their rows are not 16-byte aligned and the kernels
    stage every tile with plain loads. The last dim stays contiguous."""
    if strided is not None:
        pad = 1 if strided == "unaligned" else 0
        media = torch.randn(batch, num_media, 2 * heads_kv + 1, head_dim + pad).to(dtype)
        latents = torch.randn(batch, num_latents, heads_q + 2 * heads_kv, head_dim).to(dtype)
        q = latents[:, :, :heads_q]
        k_latents = latents[:, :, heads_q : heads_q + heads_kv]
        v_latents = latents[:, :, heads_q + heads_kv :]
        k_media = media[:, :, 1 : 1 + heads_kv, pad:]
        v_media = media[:, :, 1 + heads_kv :, pad:]
        return q, k_media, v_media, k_latents, v_latents
    q = torch.randn(batch, num_latents, heads_q, head_dim).to(dtype)
    k_media = torch.randn(batch, num_media, heads_kv, head_dim).to(dtype)
    v_media = torch.randn(batch, num_media, heads_kv, head_dim).to(dtype)
    k_latents = torch.randn(batch, num_latents, heads_kv, head_dim).to(dtype)
    v_latents = torch.randn(batch, num_latents, heads_kv, head_dim).to(dtype)
    return q, k_media, v_media, k_latents, v_latents


def _lowp_perceiver(q, k_media, v_media, k_latents, v_latents, mask, scale):
    """The same attention computed by torch in the inputs' own dtype (scores, softmax and products in
    low precision): the yardstick for acceptable low-precision error."""
    if q.dtype == torch.float32:
        return perceiver_attention_reference(
            q, k_media, v_media, k_latents, v_latents, media_padding_mask=mask, scale=scale
        )
    batch, num_latents, heads_q, _ = q.shape
    group = heads_q // k_media.shape[2]
    k = torch.cat([k_media, k_latents], 1).transpose(1, 2).repeat_interleave(group, 1)
    v = torch.cat([v_media, v_latents], 1).transpose(1, 2).repeat_interleave(group, 1)
    media_visible = (
        torch.ones(batch, k_media.shape[1], dtype=torch.bool, device=q.device)
        if mask is None
        else mask
    )
    visible = torch.cat(
        [media_visible, torch.ones(batch, num_latents, dtype=torch.bool, device=q.device)], 1
    )
    scores = (q.transpose(1, 2) @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)


def check_case(inputs, mask, *, backward=True, scale=None):
    """Forward (out, lse) and the five gradients through the public op vs the float64 reference."""
    dtype = inputs[0].dtype
    scale = inputs[0].shape[-1] ** -0.5 if scale is None else scale
    leaves = [t.detach().clone().requires_grad_(backward) for t in inputs]
    out = vk.perceiver_attention(*leaves, media_padding_mask=mask, scale=scale, backend=BACKEND)
    _, lse = TABLE.forward[BACKEND](*(t.detach() for t in inputs), mask, scale)

    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    leaves_lowp = [t.detach().clone().requires_grad_() for t in inputs]
    ref_out, ref_lse = perceiver_attention_reference(
        *leaves64, media_padding_mask=mask, scale=scale, return_lse=True
    )
    lowp_out = _lowp_perceiver(*leaves_lowp, mask, scale)
    assert_within_policy("out", out, lowp_out, ref_out, dtype)
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-3, atol=1e-3)
    if not backward:
        return
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref_out, leaves64, grad_out.double())
    lowp_grads = torch.autograd.grad(lowp_out, leaves_lowp, grad_out)
    names = ("dq", "dk_media", "dv_media", "dk_latents", "dv_latents")
    for name, ours, lowp, ref in zip(names, grads, lowp_grads, ref_grads, strict=True):
        assert_within_policy(name, ours, lowp, ref, dtype)


# (Nm, Nl): every pair of Nm 1 / 5 / 257 (partial key tiles of 32 and dk/dv blocks of 64 in the media
# segment) and Nl 1 / 8 / 64 (a partial query block, a full one). The emulator is slow: the biggest pair
# is marked slow (the whole grid took 18 s on 2 workers here).
SIZES = [
    (1, 1),
    (1, 8),
    (1, 64),
    (5, 1),
    (5, 8),
    (5, 64),
    (257, 1),
    (257, 8),
    pytest.param(257, 64, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_media,num_latents", SIZES)
def test_forward_backward_sizes(num_media, num_latents, dtype):
    inputs = make_inputs(1, num_latents, num_media, 2, 1, 64, dtype)
    check_case(inputs, padding_mask(1, num_media, "random"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["none", "random", "one-real", "all-padding", "all-real"])
def test_padding_masks(kind, dtype):
    """Including a media item with all padding but one token, and one with all padding (its latents
    then attend only to themselves: the math of the concat with every media key masked)."""
    inputs = make_inputs(2, 8, 37, 2, 2, 64, dtype)
    check_case(inputs, padding_mask(2, 37, kind))


def test_all_padding_is_latent_self_attention():
    """An all-padding media item gives exactly the attention of the latents to themselves, and zero
    gradients for its media keys and values."""
    q, k_media, v_media, k_latents, v_latents = make_inputs(1, 8, 40, 2, 1, 64, torch.float32)
    mask = torch.zeros(1, 40, dtype=torch.bool)
    leaves = [t.clone().requires_grad_() for t in (q, k_media, v_media, k_latents, v_latents)]
    out = vk.perceiver_attention(*leaves, media_padding_mask=mask, backend=BACKEND)
    empty = k_media[:, :0]
    alone = vk.perceiver_attention(q, empty, empty, k_latents, v_latents, backend=BACKEND)
    torch.testing.assert_close(out, alone, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert torch.equal(grads[1], torch.zeros_like(k_media))
    assert torch.equal(grads[2], torch.zeros_like(v_media))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads_q,heads_kv", [(4, 2), (4, 1), (2, 2)], ids=lambda v: str(v))
def test_gqa(heads_q, heads_kv, dtype):
    inputs = make_inputs(1, 8, 33, heads_q, heads_kv, 64, dtype)
    check_case(inputs, padding_mask(1, 33, "random"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [80, 96, 128])
def test_head_dims(head_dim, dtype):
    inputs = make_inputs(1, 8, 20, 2, 1, head_dim, dtype)
    check_case(inputs, padding_mask(1, 20, "random"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strided", ["fused", "unaligned"])
def test_strided_views(strided, dtype):
    """Slices of fused tensors; "unaligned": rows off 16-byte alignment (plain loads, not cp.async)."""
    inputs = make_inputs(2, 8, 21, 2, 1, 64, dtype, strided=strided)
    assert not inputs[0].is_contiguous() and not inputs[1].is_contiguous()
    assert (inputs[1].data_ptr() % 16 != 0) == (strided == "unaligned")
    check_case(inputs, padding_mask(2, 21, "random"))


def test_no_media_tokens():
    inputs = make_inputs(1, 8, 0, 2, 1, 64, torch.float32)
    check_case(inputs, None)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_flamingo_like(dtype):
    """Two media items of 4 frames x 65 tokens (the second half padded), 64 latents, GQA 4/2, Dh 128."""
    inputs = make_inputs(2, 64, 260, 4, 2, 128, dtype)
    mask = torch.ones(2, 260, dtype=torch.bool)
    mask[1, 130:] = False
    check_case(inputs, mask)


def test_nan_in_q_gives_nan():
    q, k_media, v_media, k_latents, v_latents = make_inputs(1, 8, 9, 2, 1, 64, torch.float32)
    q[0, 3, 1, 5] = float("nan")
    out = vk.perceiver_attention(q, k_media, v_media, k_latents, v_latents, backend=BACKEND)
    assert torch.isnan(out[0, 3, 1]).all()
    out[0, 3, 1] = 0
    assert not torch.isnan(out).any()


def test_nan_in_padded_key_does_not_leak():
    """A padded media key holding NaN is masked by a select: scores of real keys stay finite."""
    q, k_media, v_media, k_latents, v_latents = make_inputs(1, 8, 9, 2, 1, 64, torch.float32)
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, 4] = False
    k_media[0, 4] = float("nan")
    out = vk.perceiver_attention(
        q, k_media, v_media, k_latents, v_latents, media_padding_mask=mask, backend=BACKEND
    )
    ref = perceiver_attention_reference(
        q, k_media, v_media, k_latents, v_latents, media_padding_mask=mask
    )
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_rejected():
    q, k_media, v_media, k_latents, v_latents = make_inputs(1, 4, 5, 2, 1, 32, torch.float32)
    with pytest.raises(ValueError, match="head dims"):
        vk.perceiver_attention(q, k_media, v_media, k_latents, v_latents, backend=BACKEND)
    q, k_media, v_media, k_latents, v_latents = make_inputs(1, 4, 5, 2, 1, 64, torch.float64)
    # float64: the op's kernel table has no CUDA kernel for it (auto keeps it on the reference)...
    with pytest.raises(ValueError, match=rf"float64\) has no '{BACKEND}' kernel"):
        vk.perceiver_attention(q, k_media, v_media, k_latents, v_latents, backend=BACKEND)
    # ... and the kernel itself says so to a direct caller.
    with pytest.raises(ValueError, match="dtypes"):
        TABLE.forward[BACKEND](q, k_media, v_media, k_latents, v_latents, None, 0.125)
    q, k_media, v_media, k_latents, v_latents = make_inputs(1, 4, 5, 2, 1, 64, torch.float32)
    with pytest.raises(ValueError, match="media_padding_mask"):
        vk.perceiver_attention(
            q,
            k_media,
            v_media,
            k_latents,
            v_latents,
            media_padding_mask=torch.ones(1, 6, dtype=torch.bool),
            backend=BACKEND,
        )
    with pytest.raises(ValueError, match="multiple"):
        vk.perceiver_attention(
            q[:, :, :1].repeat(1, 1, 3, 1),
            k_media.repeat(1, 1, 2, 1),
            v_media.repeat(1, 1, 2, 1),
            k_latents.repeat(1, 1, 2, 1),
            v_latents.repeat(1, 1, 2, 1),
            backend=BACKEND,
        )


@pytest.mark.skipif(ON_CUDA, reason="direct calls of the emulator entry point")
def test_extension_checks_guard_direct_callers():
    """The C++ glue's own checks (for callers of vlm_kernels._C that skip the Python op)."""
    from vlm_kernels._backends import _extension

    function = _extension()[0].perceiver_attention_fwd_cuda_sim
    q, k_media, v_media, k_latents, v_latents = make_inputs(1, 4, 5, 2, 1, 64, torch.float32)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        function(
            q.transpose(-1, -2).contiguous().transpose(-1, -2),
            k_media,
            v_media,
            k_latents,
            v_latents,
            None,
            0.125,
        )
    with pytest.raises(RuntimeError, match="k_latents and v_latents"):
        function(q, k_media, v_media, k_latents[:, :3], v_latents, None, 0.125)
    with pytest.raises(RuntimeError, match="head dim"):
        function(
            q[..., :32],
            k_media[..., :32],
            v_media[..., :32],
            k_latents[..., :32],
            v_latents[..., :32],
            None,
            0.125,
        )


def test_opcheck():
    """The custom op with this backend under torch.library.opcheck (schema, fake tensors, autograd
    registration, AOT dispatch)."""
    from vlm_kernels.ops.perceiver_attention import perceiver_attention_op

    inputs = make_inputs(1, 8, 9, 2, 1, 64, torch.float32)
    inputs = [t.requires_grad_() for t in inputs]
    mask = padding_mask(1, 9, "random")
    torch.library.opcheck(perceiver_attention_op, (*inputs, mask, 0.125, BACKEND))
    torch.library.opcheck(perceiver_attention_op, (*inputs, None, 0.125, BACKEND))


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) of a function around the op (no graph break), forward and
    backward, gives the eager results."""
    inputs = make_inputs(1, 8, 9, 2, 1, 64, torch.float32)
    mask = padding_mask(1, 9, "random")

    def attend(*tensors):
        return vk.perceiver_attention(*tensors, media_padding_mask=mask, backend=BACKEND)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in inputs]
    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    out, eager = compiled(*leaves), attend(*eager_leaves)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    eager_grads = torch.autograd.grad(eager, eager_leaves, grad_out)
    for ours, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(ours, want, rtol=0, atol=0)
