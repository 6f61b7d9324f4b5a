"""The public ops as torch.library custom ops: opcheck, torch.compile(fullgraph=True), autograd through
the op vs the reference, dispatch, and the validation errors. Tensors live on ``TEST_DEVICE``
(tests/devices.py: CPU by default, the GPU under VLMK_TEST_DEVICE=cuda)."""

import warnings

import pytest
import torch

import vlm_kernels as vk
from tests.devices import ON_CUDA, TEST_DEVICE, backends_for
from vlm_kernels._backends import _warn_once
from vlm_kernels.ops._registry import TABLES
from vlm_kernels.ops.block_chunk_schedule import block_chunk_schedule_op
from vlm_kernels.ops.concat_project import concat_project_op
from vlm_kernels.ops.image_text_attention import image_text_attention_op
from vlm_kernels.ops.patch_embed import patch_embed_op
from vlm_kernels.ops.perceiver_attention import perceiver_attention_op
from vlm_kernels.reference import (
    concat_project_reference,
    image_text_attention_reference,
    patch_embed_reference,
    perceiver_attention_reference,
)

pytestmark = pytest.mark.usefixtures("tensors_on_test_device")


def _attention_inputs(
    batch=2, query_len=7, heads_q=4, heads_kv=2, head_dim=16, chunks=3, media_len=5
):
    dev = TEST_DEVICE
    q = torch.randn(batch, query_len, heads_q, head_dim, device=dev, requires_grad=True)
    k = torch.randn(batch, chunks * media_len, heads_kv, head_dim, device=dev, requires_grad=True)
    v = torch.randn(batch, chunks * media_len, heads_kv, head_dim, device=dev, requires_grad=True)
    media_mask = torch.rand(batch, query_len, chunks, device=dev) > 0.5
    media_mask[0, 0] = False
    return q, k, v, media_mask, media_len


def _perceiver_inputs(batch=2, latents=4, media=9, heads_q=4, heads_kv=2, head_dim=8):
    dev = TEST_DEVICE
    q = torch.randn(batch, latents, heads_q, head_dim, device=dev, requires_grad=True)
    media_kv = [
        torch.randn(batch, media, heads_kv, head_dim, device=dev, requires_grad=True)
        for _ in range(2)
    ]
    latent_kv = [
        torch.randn(batch, latents, heads_kv, head_dim, device=dev, requires_grad=True)
        for _ in range(2)
    ]
    return q, *media_kv, *latent_kv, torch.rand(batch, media, device=dev) > 0.3


def _patch_inputs(with_uint8=False):
    dev = TEST_DEVICE
    pixels = (
        torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8, device=dev)
        if with_uint8
        else torch.randn(2, 3, 8, 12, device=dev, requires_grad=True)
    )
    weight = torch.randn(6, 3, 4, 4, device=dev, requires_grad=True)
    bias, cls = (torch.randn(6, device=dev, requires_grad=True) for _ in range(2))
    pos = torch.randn(7, 6, device=dev, requires_grad=True)
    mean, std = torch.rand(3, device=dev), torch.rand(3, device=dev) + 0.5
    return pixels, weight, bias, cls, pos, mean, std


# ---- opcheck -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends_for("image_text_attention"))
def test_opcheck_image_text_attention(backend):
    q, k, v, media_mask, media_len = _attention_inputs(head_dim=64)
    for empty_rows in ("zero", "uniform"):
        args = (q, k, v, media_mask, media_len, 0.25, empty_rows, backend)
        torch.library.opcheck(image_text_attention_op, args)


@pytest.mark.parametrize("query_len", [5, 40])  # decode and prefill schedules
def test_opcheck_image_text_attention_with_schedule_tensors(query_len):
    """The op with a MediaSchedule's tensors unpacked into its optional arguments (what the public
    function passes for the triton backend), forward and backward schedules."""
    if "triton" not in backends_for("image_text_attention"):
        pytest.skip("no triton backend here")
    q, k, v, media_mask, media_len = _attention_inputs(query_len=query_len)
    schedule = vk.MediaSchedule(media_mask, media_len=media_len, empty_rows="uniform")
    from vlm_kernels.triton.image_text_attention import schedule_blocks

    forward_block, dq_block, dkdv_block = schedule_blocks(q)
    tensors = (
        *schedule.chunk_schedule(forward_block),
        *schedule.chunk_schedule(dq_block),
        *schedule.transposed_schedule(dkdv_block),
    )
    args = (q, k, v, schedule.kernel_mask, media_len, 0.25, "uniform", "triton", *tensors)
    torch.library.opcheck(image_text_attention_op, args)


def test_opcheck_perceiver_attention():
    *tensors, padding = _perceiver_inputs()
    torch.library.opcheck(perceiver_attention_op, (*tensors, padding, 0.3, "reference"))
    torch.library.opcheck(perceiver_attention_op, (*tensors, None, 0.3, "reference"))


def test_opcheck_patch_embed():
    for with_uint8 in (False, True):
        pixels, weight, bias, cls, pos, mean, std = _patch_inputs(with_uint8)
        torch.library.opcheck(
            patch_embed_op, (pixels, weight, bias, cls, pos, mean, std, "reference")
        )
    torch.library.opcheck(
        patch_embed_op, (pixels, weight, None, None, None, None, None, "reference")
    )


def test_opcheck_concat_project():
    features = [torch.randn(2, 5, d, requires_grad=True) for d in (3, 4)]
    weight = torch.randn(6, 7, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    torch.library.opcheck(concat_project_op, (features, weight, bias, "reference"))
    torch.library.opcheck(concat_project_op, (features, weight, None, "reference"))


@pytest.mark.parametrize("backend", backends_for("block_chunk_schedule"))
def test_opcheck_block_chunk_schedule(backend):
    media_mask = torch.rand(2, 9, 5, device=TEST_DEVICE) > 0.7
    torch.library.opcheck(block_chunk_schedule_op, (media_mask, 4, backend))


# ---- autograd through the ops vs the reference ---------------------------------------------------------


def _check_grads(outputs, expected, inputs):
    cotangent = torch.randn_like(outputs)
    got = torch.autograd.grad(outputs, inputs, cotangent)
    want = torch.autograd.grad(expected, inputs, cotangent)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
def test_image_text_attention_op_forward_backward(empty_rows):
    q, k, v, media_mask, media_len = _attention_inputs(heads_q=8, heads_kv=1, head_dim=80)
    kwargs = dict(media_len=media_len, empty_rows=empty_rows)
    out = vk.image_text_attention(q, k, v, media_mask, backend="reference", **kwargs)
    expected = image_text_attention_reference(q, k, v, media_mask, **kwargs)
    torch.testing.assert_close(out, expected)
    _check_grads(out, expected, (q, k, v))


def test_image_text_attention_strided_q_from_fused_qkv():
    fused = torch.randn(2, 7, 3 * 4, 16, requires_grad=True)  # [B, Lq, 3 * H, Dh]
    q = fused[:, :, :4]
    k = torch.randn(2, 10, 4, 16)
    media_mask = torch.rand(2, 7, 2) > 0.4
    out = vk.image_text_attention(q, k, k, media_mask, media_len=5, backend="reference")
    torch.testing.assert_close(
        out, image_text_attention_reference(q, k, k, media_mask, media_len=5)
    )


def test_perceiver_attention_op_forward_backward():
    *tensors, padding = _perceiver_inputs()
    out = vk.perceiver_attention(*tensors, media_padding_mask=padding, backend="reference")
    expected = perceiver_attention_reference(*tensors, media_padding_mask=padding)
    torch.testing.assert_close(out, expected)
    _check_grads(out, expected, tensors)


def test_patch_embed_op_forward_backward():
    pixels, weight, bias, cls, pos, mean, std = _patch_inputs()
    kwargs = dict(cls_token=cls, pos_embed=pos, pixel_mean=mean, pixel_std=std)
    out = vk.patch_embed(pixels, weight, bias, backend="reference", **kwargs)
    expected = patch_embed_reference(pixels, weight, bias, **kwargs)
    torch.testing.assert_close(out, expected)
    _check_grads(out, expected, (pixels, weight, bias, cls, pos))


def test_concat_project_op_forward_backward():
    features = [torch.randn(3, 5, d, requires_grad=True) for d in (3, 1, 4)]
    weight = torch.randn(6, 8, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    out = vk.concat_project(features, weight, bias, backend="reference")
    expected = concat_project_reference(features, weight, bias)
    torch.testing.assert_close(out, expected)
    _check_grads(out, expected, (*features, weight, bias))


def test_empty_inputs():
    q = torch.randn(0, 3, 2, 8)
    k = torch.randn(0, 4, 2, 8)
    assert vk.image_text_attention(
        q, k, k, torch.ones(0, 3, 2, dtype=torch.bool), media_len=2
    ).shape == (
        0,
        3,
        2,
        8,
    )
    q = torch.randn(1, 3, 2, 8)
    no_media = torch.zeros(1, 3, 0, dtype=torch.bool)
    for empty_rows in ("zero", "uniform"):
        out = vk.image_text_attention(
            q,
            torch.randn(1, 0, 2, 8),
            torch.randn(1, 0, 2, 8),
            no_media,
            media_len=4,
            empty_rows=empty_rows,
        )
        assert torch.equal(out, torch.zeros_like(q))
    count, ids = vk.block_chunk_schedule(torch.zeros(2, 0, 3, dtype=torch.bool), 16)
    assert count.shape == (2, 0) and ids.shape == (2, 0, 3)


# ---- torch.compile(fullgraph=True) through each op ------------------------------------------------------


def test_compile_fullgraph_all_ops():
    q, k, v, media_mask, media_len = _attention_inputs()
    *perceiver_tensors, padding = _perceiver_inputs()
    pixels, weight, bias, cls, pos, _, _ = _patch_inputs()
    features = [torch.randn(2, 5, d) for d in (3, 4)]
    project_weight = torch.randn(6, 7)

    def model(q, k, v, media_mask, pixels, features):
        attended = vk.image_text_attention(q, k, v, media_mask, media_len=media_len)
        latents = vk.perceiver_attention(*perceiver_tensors, media_padding_mask=padding)
        tokens = vk.patch_embed(pixels, weight, bias, cls_token=cls, pos_embed=pos)
        projected = vk.concat_project(features, project_weight)
        count, _ = vk.block_chunk_schedule(media_mask, 4)
        return attended.sum() + latents.sum() + tokens.sum() + projected.sum() + count.sum()

    args = (q, k, v, media_mask, pixels, features)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), model(*args))
    compiled(*args).backward()
    assert q.grad is not None and pixels.grad is not None


# ---- dispatch -----------------------------------------------------------------------------------------


def test_available_backends_reports_every_backend_with_reasons():
    status = vk.available_backends()
    for name in vk.BACKENDS:
        assert isinstance(status[name], bool)
        assert status[name] or name in status["reasons"]
    assert status["reference"] is True


def test_explicit_backend_without_kernel_is_a_clear_error(monkeypatch):
    q, k, v, media_mask, media_len = _attention_inputs()
    *perceiver_tensors, _ = _perceiver_inputs()
    # Every op has every backend now: take one kernel out of the table for the check.
    monkeypatch.delitem(TABLES["perceiver_attention"].forward, "cuda_sim")
    with pytest.raises(ValueError, match="no 'cuda_sim' kernel"):
        vk.perceiver_attention(*perceiver_tensors, backend="cuda_sim")
    elsewhere = (
        "cpu" if ON_CUDA else "cuda"
    )  # a backend with a kernel that cannot run these tensors
    with pytest.raises(ValueError, match=f"cannot run {TEST_DEVICE} tensors"):
        vk.image_text_attention(q, k, v, media_mask, media_len=media_len, backend=elsewhere)
    with pytest.raises(ValueError, match="backend must be"):
        vk.image_text_attention(q, k, v, media_mask, media_len=media_len, backend="gpu")


def test_auto_and_env_override(monkeypatch):
    from vlm_kernels._backends import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("x", ["reference", "cpu"], cpu, None) in ("cpu", "reference")
    assert resolve_backend("x", ["reference"], cpu, "auto") == "reference"
    monkeypatch.setenv("VLMK_BACKEND", "reference")
    assert resolve_backend("x", ["reference", "cpu"], cpu, None) == "reference"
    monkeypatch.setenv("VLMK_BACKEND", "cuda")
    with pytest.warns(RuntimeWarning, match="VLMK_BACKEND"):
        assert resolve_backend("y", ["reference"], cpu, None) == "reference"
    with pytest.raises(ValueError, match="cannot run cpu tensors"):
        resolve_backend("x", ["reference", "cuda"], cpu, "cuda")


def test_backward_without_kernel_warns_and_uses_the_reference_on_cpu(monkeypatch):
    """A backend with a forward kernel only (cuda_sim, its backward kernel removed for the test): its
    gradients run on the reference backward, with a warning naming the op and the backend (once),
    never silently."""
    if "cuda_sim" not in backends_for("image_text_attention"):
        pytest.skip("cuda_sim does not run on this test device")
    monkeypatch.delitem(TABLES["image_text_attention"].backward, "cuda_sim", raising=False)
    q, k, v, media_mask, media_len = _attention_inputs(head_dim=64)
    out = vk.image_text_attention(q, k, v, media_mask, media_len=media_len, backend="cuda_sim")
    _warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"image_text_attention.*'cuda_sim'.*'reference'"):
        out.sum().backward()
    expected = image_text_attention_reference(q, k, v, media_mask, media_len=media_len)
    want = torch.autograd.grad(expected.sum(), (q,))[0]
    torch.testing.assert_close(q.grad, want, atol=1e-4, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per (op, backend): the second backward is quiet
        vk.image_text_attention(
            q, k, v, media_mask, media_len=media_len, backend="cuda_sim"
        ).sum().backward()


def test_backward_without_kernel_takes_the_gpu_kernel_on_cuda_tensors(monkeypatch):
    """On CUDA tensors a forward-only backend (cuda, its backward kernel removed for the test)
    borrows the Triton backward, not the dense reference one that would materialize [B, H, Lq, Lk]."""
    table = TABLES["image_text_attention"]
    if not vk.available_backends()["triton"]:
        pytest.skip("triton is not available here")
    monkeypatch.delitem(table.backward, "cuda", raising=False)
    _warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"'cuda' backend has no backward.*'triton'"):
        chosen = table.backward_for(torch.device("cuda"), "cuda", torch.bfloat16)
    assert chosen is table.backward["triton"]


# ---- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["image_text_attention", "perceiver_attention"])
def test_zero_head_dim_is_a_clear_error(op):
    if op == "image_text_attention":
        q, k, v, media_mask, media_len = _attention_inputs()
        args = (q[..., :0], k[..., :0], v[..., :0], media_mask)
        call = lambda: vk.image_text_attention(*args, media_len=media_len)  # noqa: E731
    else:
        q, k_media, v_media, k_lat, v_lat, _ = _perceiver_inputs()
        args = (t[..., :0] for t in (q, k_media, v_media, k_lat, v_lat))
        call = lambda: vk.perceiver_attention(*args)  # noqa: E731
    with pytest.raises(ValueError, match=r"q must have a head dim Dh >= 1 .*got shape"):
        call()


def test_image_text_attention_bad_inputs():
    q, k, v, media_mask, media_len = _attention_inputs()
    call = vk.image_text_attention
    with pytest.raises(ValueError, match=r"q must have 4 dimensions .*got shape \(7, 4, 16\)"):
        call(q[0], k, v, media_mask, media_len=media_len)
    with pytest.raises(ValueError, match="Lk == M \\* media_len == 12"):
        call(q, k, v, media_mask, media_len=4)
    with pytest.raises(ValueError, match=r"Hq=4 .* multiple of .* Hkv=3"):
        call(
            q,
            k[:, :, :1].expand(-1, -1, 3, -1),
            v[:, :, :1].expand(-1, -1, 3, -1),
            media_mask,
            media_len=media_len,
        )
    with pytest.raises(TypeError, match="media_mask must have dtype in \\(bool\\)"):
        call(q, k, v, media_mask.float(), media_len=media_len)
    with pytest.raises(ValueError, match="media_mask must have shape"):
        call(q, k, v, media_mask[:, :3], media_len=media_len)
    with pytest.raises(TypeError, match="share one dtype"):
        call(q, k.double(), v, media_mask, media_len=media_len)
    with pytest.raises(ValueError, match="v must have shape"):
        call(q, k, v[:, :-1], media_mask, media_len=media_len)
    with pytest.raises(ValueError, match="empty_rows"):
        call(q, k, v, media_mask, media_len=media_len, empty_rows="nan")
    with pytest.raises(ValueError, match="media_len must be a positive int"):
        call(q, k, v, media_mask, media_len=0)
    with pytest.raises(ValueError, match="scale must be a finite"):
        call(q, k, v, media_mask, media_len=media_len, scale=float("nan"))
    with pytest.raises(TypeError, match=r"q must be a torch\.Tensor"):
        call(q.tolist(), k, v, media_mask, media_len=media_len)


def test_patch_embed_bad_inputs():
    pixels, weight, bias, _, pos, _, _ = _patch_inputs()
    with pytest.raises(ValueError, match=r"H=10 and W=12 .* multiples of the patch size P=4"):
        vk.patch_embed(torch.randn(2, 3, 10, 12), weight)
    with pytest.raises(ValueError, match="pos_embed must have shape \\(6, 6\\)"):
        vk.patch_embed(pixels, weight, bias, cls_token=None, pos_embed=pos)
    with pytest.raises(ValueError, match="pixels must have shape"):
        vk.patch_embed(torch.randn(2, 4, 8, 12), weight)
    with pytest.raises(TypeError, match="pixels must have dtype"):
        vk.patch_embed(pixels.detach().to(torch.int32), weight)
    with pytest.raises(ValueError, match="pixel_mean must have shape"):
        vk.patch_embed(pixels, weight, pixel_mean=torch.rand(4))


def test_patch_embed_rejects_off_by_one_shapes():
    pixels, weight, bias, cls, pos, _, _ = _patch_inputs()  # 8 x 12 pixels: 2 x 3 patches of 4 x 4
    with pytest.raises(ValueError, match=r"H=8 and W=10 .* multiples of the patch size P=4"):
        vk.patch_embed(torch.randn(2, 3, 8, 10), weight)
    with pytest.raises(
        ValueError, match=r"pixels must have shape \(\*, 3, \*, \*\).*\(dimension 1\)"
    ):
        vk.patch_embed(torch.randn(2, 2, 8, 12), weight)  # 2 channels, weight has 3
    # pos_embed one row short / long: 6 patches + the CLS = 7 rows, without the CLS 6
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(7, 6\).*got \(6, 6\)"):
        vk.patch_embed(pixels, weight, bias, cls_token=cls, pos_embed=pos[:6])
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(7, 6\).*got \(8, 6\)"):
        vk.patch_embed(pixels, weight, bias, cls_token=cls, pos_embed=torch.randn(8, 6))
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(6, 6\).*got \(5, 6\)"):
        vk.patch_embed(pixels, weight, bias, pos_embed=pos[:5])


@pytest.mark.parametrize("backend", backends_for("patch_embed"))
def test_patch_embed_uint8_without_mean_std_reads_x_over_255(backend):
    """uint8 pixels with no pixel_mean / pixel_std are read as x / 255 (the op's docstring), not as raw
    0..255 values: the convolution of the [0, 1] image, in float64."""
    pixels, weight, bias, *_ = _patch_inputs(with_uint8=True)
    weight, bias = weight.detach(), bias.detach()
    out = vk.patch_embed(pixels, weight, bias, backend=backend)
    image = pixels.double() / 255
    expected = torch.nn.functional.conv2d(image, weight.double(), bias.double(), stride=4)
    expected = expected.flatten(2).transpose(1, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_concat_project_bad_inputs():
    features = [torch.randn(2, 5, 3), torch.randn(2, 5, 4)]
    with pytest.raises(ValueError, match=r"weight must have shape \(\*, 7\)"):
        vk.concat_project(features, torch.randn(6, 8))
    with pytest.raises(ValueError, match="leading shape"):
        vk.concat_project([features[0], torch.randn(2, 4, 4)], torch.randn(6, 7))
    with pytest.raises(TypeError, match="non-empty list"):
        vk.concat_project([], torch.randn(6, 0))
    with pytest.raises(ValueError, match="bias must have shape"):
        vk.concat_project(features, torch.randn(6, 7), torch.randn(5))


def test_perceiver_attention_bad_inputs():
    q, k_media, v_media, k_lat, v_lat, padding = _perceiver_inputs()
    with pytest.raises(ValueError, match="k_latents must have shape"):
        vk.perceiver_attention(q, k_media, v_media, k_lat[:, :2], v_lat)
    with pytest.raises(TypeError, match="media_padding_mask must have dtype"):
        vk.perceiver_attention(q, k_media, v_media, k_lat, v_lat, media_padding_mask=padding.int())
    with pytest.raises(ValueError, match="media_padding_mask must have shape"):
        vk.perceiver_attention(q, k_media, v_media, k_lat, v_lat, media_padding_mask=padding[:, 1:])
