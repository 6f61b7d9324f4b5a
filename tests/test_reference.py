"""The reference ops (the spec) against hand math in float64, and their explicit backward formulas
against autograd through the forward."""

import math

import pytest
import torch

from vlm_kernels.reference.block_chunk_schedule import block_chunk_schedule_reference
from vlm_kernels.reference.concat_project import (
    concat_project_backward_reference,
    concat_project_reference,
)
from vlm_kernels.reference.image_text_attention import (
    image_text_attention_backward_reference,
    image_text_attention_reference,
)
from vlm_kernels.reference.patch_embed import (
    patch_embed_backward_reference,
    patch_embed_reference,
)
from vlm_kernels.reference.perceiver_attention import (
    perceiver_attention_backward_reference,
    perceiver_attention_reference,
)

pytestmark = pytest.mark.usefixtures(
    "tensors_on_test_device"
)  # the GPU under VLMK_TEST_DEVICE=cuda

f64 = torch.float64


def _attention_by_loops(q, k, v, visible, scale):
    """Scalar loops: out[b, t, h] = sum_j softmax_j(scale q.k) v over visible j; 0 if none visible."""
    batch, query_len, heads_q, head_dim = q.shape
    group = heads_q // k.shape[2]
    out = torch.zeros(batch, query_len, heads_q, head_dim, dtype=f64)
    for b in range(batch):
        for t in range(query_len):
            for h in range(heads_q):
                keys = [j for j in range(k.shape[1]) if visible[b][t][j]]
                if not keys:
                    continue
                logits = [scale * float(q[b, t, h] @ k[b, j, h // group]) for j in keys]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                for w, j in zip(weights, keys, strict=True):
                    out[b, t, h] += w / total * v[b, j, h // group]
    return out


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
def test_image_text_attention_matches_loops(empty_rows):
    batch, query_len, heads_q, heads_kv, head_dim, chunks, media_len = 2, 5, 4, 2, 3, 3, 2
    q = torch.randn(batch, query_len, heads_q, head_dim, dtype=f64)
    k = torch.randn(batch, chunks * media_len, heads_kv, head_dim, dtype=f64)
    v = torch.randn_like(k)
    media_mask = torch.rand(batch, query_len, chunks) > 0.5
    media_mask[0, 0] = False  # a row that sees nothing
    media_mask[1, 1] = True  # a row that sees everything
    visible = [
        [
            [
                bool(media_mask[b, t, j // media_len])
                or (empty_rows == "uniform" and not media_mask[b, t].any())
                for j in range(chunks * media_len)
            ]
            for t in range(query_len)
        ]
        for b in range(batch)
    ]
    expected = _attention_by_loops(q, k, v, visible, 0.7)
    out = image_text_attention_reference(
        q, k, v, media_mask, media_len=media_len, scale=0.7, empty_rows=empty_rows
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if empty_rows == "zero":
        assert (out[0, 0] == 0).all()


def test_perceiver_attention_matches_loops():
    batch, latents, media, heads_q, heads_kv, head_dim = 2, 3, 4, 2, 1, 5
    q = torch.randn(batch, latents, heads_q, head_dim, dtype=f64)
    k_media, v_media = (torch.randn(batch, media, heads_kv, head_dim, dtype=f64) for _ in range(2))
    k_lat, v_lat = (torch.randn(batch, latents, heads_kv, head_dim, dtype=f64) for _ in range(2))
    padding = torch.tensor([[True, True, False, True], [False, False, False, False]])
    visible = [[list(padding[b].tolist()) + [True] * latents] * latents for b in range(batch)]
    expected = _attention_by_loops(
        q, torch.cat([k_media, k_lat], 1), torch.cat([v_media, v_lat], 1), visible, head_dim**-0.5
    )
    out = perceiver_attention_reference(
        q, k_media, v_media, k_lat, v_lat, media_padding_mask=padding
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_cls", [True, False])
def test_patch_embed_matches_loops(with_cls):
    batch, channels, patch, dim = 2, 3, 2, 4
    height, width = 4, 6
    pixels = torch.randint(0, 256, (batch, channels, height, width), dtype=torch.uint8)
    weight = torch.randn(dim, channels, patch, patch, dtype=f64)
    bias = torch.randn(dim, dtype=f64)
    cls = torch.randn(dim, dtype=f64) if with_cls else None
    num_patches = (height // patch) * (width // patch)
    pos = torch.randn(num_patches + with_cls, dim, dtype=f64)
    mean = torch.tensor([0.4, 0.5, 0.6], dtype=f64)
    std = torch.tensor([0.2, 0.25, 0.3], dtype=f64)
    out = patch_embed_reference(
        pixels, weight, bias, cls_token=cls, pos_embed=pos, pixel_mean=mean, pixel_std=std
    )
    expected = torch.zeros(batch, num_patches + with_cls, dim, dtype=f64)
    for b in range(batch):
        if with_cls:
            expected[b, 0] = cls + pos[0]
        for r in range(height // patch):
            for s in range(width // patch):
                token = with_cls + r * (width // patch) + s
                acc = bias.clone()
                for c in range(channels):
                    for u in range(patch):
                        for w in range(patch):
                            x = (
                                float(pixels[b, c, patch * r + u, patch * s + w]) / 255 - mean[c]
                            ) / std[c]
                            acc += x * weight[:, c, u, w]
                expected[b, token] = acc + pos[token]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    conv = torch.nn.functional.conv2d(
        (pixels.to(f64) / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1),
        weight,
        bias,
        stride=patch,
    )
    torch.testing.assert_close(out[:, with_cls:], conv.flatten(2).transpose(1, 2) + pos[with_cls:])


def test_concat_project_matches_loops():
    features = [torch.randn(2, 3, d, dtype=f64) for d in (2, 5, 1)]
    weight = torch.randn(4, 8, dtype=f64)
    bias = torch.randn(4, dtype=f64)
    out = concat_project_reference(features, weight, bias)
    expected = torch.zeros(2, 3, 4, dtype=f64)
    for i in range(2):
        for j in range(3):
            column = 0
            for f in features:
                for d in range(f.shape[-1]):
                    expected[i, j] += f[i, j, d] * weight[:, column]
                    column += 1
            expected[i, j] += bias
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_block_chunk_schedule_by_hand():
    media_mask = torch.tensor(
        [[[0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]], dtype=torch.bool
    )
    count, ids = block_chunk_schedule_reference(media_mask, block_q=2)
    assert count.tolist() == [[2, 1, 1]]
    assert ids.tolist() == [[[1, 3, -1, -1], [0, -1, -1, -1], [2, -1, -1, -1]]]
    assert count.dtype == ids.dtype == torch.int32


# ---- explicit backward formulas vs autograd -----------------------------------------------------------


def _grads(outputs, inputs, cotangent):
    return torch.autograd.grad(outputs, inputs, cotangent, allow_unused=True)


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
def test_image_text_attention_backward_formula(empty_rows):
    q = torch.randn(2, 7, 4, 8, dtype=f64, requires_grad=True)
    k = torch.randn(2, 3 * 5, 2, 8, dtype=f64, requires_grad=True)
    v = torch.randn(2, 3 * 5, 2, 8, dtype=f64, requires_grad=True)
    media_mask = torch.rand(2, 7, 3) > 0.5
    media_mask[0, 2] = False
    out, lse = image_text_attention_reference(
        q, k, v, media_mask, media_len=5, scale=0.3, empty_rows=empty_rows, return_lse=True
    )
    cotangent = torch.randn_like(out)
    expected = _grads(out, (q, k, v), cotangent)
    got = image_text_attention_backward_reference(
        cotangent, q, k, v, media_mask, out, lse, media_len=5, scale=0.3, empty_rows=empty_rows
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    assert not any(torch.isnan(g).any() for g in got)


def test_perceiver_attention_backward_formula():
    inputs = [torch.randn(2, 3, 4, 8, dtype=f64, requires_grad=True)]
    inputs += [torch.randn(2, 5, 2, 8, dtype=f64, requires_grad=True) for _ in range(2)]
    inputs += [torch.randn(2, 3, 2, 8, dtype=f64, requires_grad=True) for _ in range(2)]
    padding = torch.rand(2, 5) > 0.3
    out, lse = perceiver_attention_reference(*inputs, media_padding_mask=padding, return_lse=True)
    cotangent = torch.randn_like(out)
    expected = _grads(out, inputs, cotangent)
    got = perceiver_attention_backward_reference(
        cotangent, *inputs, padding, out, lse, scale=8**-0.5
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_patch_embed_backward_formula():
    pixels = torch.randn(2, 3, 4, 6, dtype=f64, requires_grad=True)
    weight = torch.randn(5, 3, 2, 2, dtype=f64, requires_grad=True)
    bias = torch.randn(5, dtype=f64, requires_grad=True)
    cls = torch.randn(5, dtype=f64, requires_grad=True)
    pos = torch.randn(7, 5, dtype=f64, requires_grad=True)
    mean, std = torch.rand(3, dtype=f64), torch.rand(3, dtype=f64) + 0.5
    out = patch_embed_reference(
        pixels, weight, bias, cls_token=cls, pos_embed=pos, pixel_mean=mean, pixel_std=std
    )
    cotangent = torch.randn_like(out)
    expected = _grads(out, (pixels, weight, bias, cls, pos), cotangent)
    got = patch_embed_backward_reference(cotangent, pixels, weight, mean, std, True, True)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_concat_project_backward_formula():
    features = [torch.randn(2, 3, d, dtype=f64, requires_grad=True) for d in (2, 5)]
    weight = torch.randn(4, 7, dtype=f64, requires_grad=True)
    bias = torch.randn(4, dtype=f64, requires_grad=True)
    out = concat_project_reference(features, weight, bias)
    cotangent = torch.randn_like(out)
    expected = _grads(out, (*features, weight, bias), cotangent)
    grad_features, grad_weight, grad_bias = concat_project_backward_reference(
        cotangent, features, weight
    )
    for g, e in zip((*grad_features, grad_weight, grad_bias), expected, strict=True):
        torch.testing.assert_close(g, e)
