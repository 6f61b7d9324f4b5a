"""image_text_attention(empty_rows="mean"): rows that see no media chunk output the mean of all values
(OpenFlamingo's all-previous-media mode). Forward and backward of the op (reference backend) vs an
independent float64 spec written as OpenFlamingo writes it (every invisible score filled with
-finfo.max, then an ordinary softmax); auto picks the reference; every kernel backend raises a
ValueError naming itself and the mode."""

from __future__ import annotations

import pytest
import torch

import vlm_kernels as vk
from tests.attention_testing import random_media_mask
from vlm_kernels.ops.image_text_attention import TABLE


def flamingo_spec(q, k, v, media_mask, media_len, scale):
    """float64: softmax(scale q k^T with invisible scores := -finfo.max) v, GQA by repeating kv."""
    group = q.shape[2] // k.shape[2]
    qh = q.double().transpose(1, 2)
    kh = k.double().transpose(1, 2).repeat_interleave(group, 1)
    vh = v.double().transpose(1, 2).repeat_interleave(group, 1)
    visible = media_mask.repeat_interleave(media_len, -1)[:, None]  # [B, 1, Lq, Lk]
    scores = (scale * qh @ kh.transpose(-1, -2)).masked_fill(
        ~visible, -torch.finfo(torch.float64).max
    )
    return (scores.softmax(-1) @ vh).transpose(1, 2)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask_kind", ["random", "runs", "none", "all"])
def test_mean_rows_forward_and_backward_match_the_flamingo_spec(heads, mask_kind):
    heads_q, heads_kv = heads
    batch, query_len, chunks, media_len, head_dim = 2, 9, 3, 5, 16
    q = torch.randn(batch, query_len, heads_q, head_dim, requires_grad=True)
    k = torch.randn(batch, chunks * media_len, heads_kv, head_dim, requires_grad=True)
    v = torch.randn(batch, chunks * media_len, heads_kv, head_dim, requires_grad=True)
    media_mask = random_media_mask(batch, query_len, chunks, mask_kind)
    scale = head_dim**-0.5
    out = vk.image_text_attention(
        q, k, v, media_mask, media_len=media_len, empty_rows="mean", backend="reference"
    )
    expected = flamingo_spec(q, k, v, media_mask, media_len, scale)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    empty = ~media_mask.any(-1)
    if empty.any():  # the empty rows really are the mean of the values (not 0, not a softmax)
        mean = v.double().mean(1).repeat_interleave(heads_q // heads_kv, 1)  # [B, Hq, Dh]
        torch.testing.assert_close(
            out.double()[empty], mean[empty.nonzero()[:, 0]], rtol=1e-5, atol=1e-5
        )
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad((out * cotangent).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * cotangent.double()).sum(), (q, k, v))
    for name, ours, theirs in zip("qkv", grads, expected_grads, strict=True):
        err = (ours.double() - theirs).abs().max().item()
        assert err <= 1e-5 * (1 + theirs.abs().max().item()), f"d{name}: max error {err:.2e}"


def test_mean_differs_from_zero_and_uniform_only_on_empty_rows():
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
    media_mask = random_media_mask(1, 6, 2, "random")  # row 0 empty, row 5 full
    outs = {
        mode: vk.image_text_attention(q, k, v, media_mask, media_len=4, empty_rows=mode)
        for mode in ("zero", "uniform", "mean")
    }
    seen = media_mask.any(-1)[0]
    for mode in ("zero", "uniform"):
        torch.testing.assert_close(outs["mean"][0, seen], outs[mode][0, seen])
        assert not torch.allclose(outs["mean"][0, ~seen], outs[mode][0, ~seen], atol=1e-3)


def test_auto_picks_the_reference_for_mean():
    q, k, v = torch.randn(2, 5, 2, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    media_mask = random_media_mask(2, 5, 2, "random")
    auto = vk.image_text_attention(q, k, v, media_mask, media_len=3, empty_rows="mean")
    reference = vk.image_text_attention(
        q, k, v, media_mask, media_len=3, empty_rows="mean", backend="reference"
    )
    assert torch.equal(auto, reference)


@pytest.mark.parametrize("backend", sorted(set(TABLE.forward) - {"reference"}))
def test_every_kernel_backend_rejects_mean_by_name(backend):
    q, k, v = torch.randn(1, 4, 1, 64), torch.randn(1, 4, 1, 64), torch.randn(1, 4, 1, 64)
    mask = torch.ones(1, 4, 1, dtype=torch.bool)
    lse = torch.zeros(1, 1, 4)
    message = rf"'{backend}' backend does not implement empty_rows='mean'"
    with pytest.raises(ValueError, match=message):
        TABLE.forward[backend](q, k, v, mask, 4, 0.125, "mean")
    with pytest.raises(ValueError, match=message):
        TABLE.backward[backend](q, q, k, v, mask, q, lse, 4, 0.125, "mean")


def test_explicit_kernel_backend_with_mean_raises_through_the_public_op():
    backend = next(name for name in ("cpu", "triton", "cuda") if name in TABLE.forward)
    q = torch.randn(1, 4, 1, 64)
    with pytest.raises(ValueError, match=r"backend does not implement empty_rows=.mean."):
        vk.image_text_attention(
            q,
            q,
            q,
            torch.ones(1, 4, 1, dtype=torch.bool),
            media_len=4,
            empty_rows="mean",
            backend=backend,
        )


def test_mode_errors_name_the_modes():
    q = torch.randn(1, 2, 1, 8)
    mask = torch.ones(1, 2, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\('zero', 'uniform', 'mean'\)"):
        vk.image_text_attention(q, q, q, mask, media_len=2, empty_rows="average")
    with pytest.raises(ValueError, match="empty_rows"):
        vk.MediaSchedule(mask, media_len=2, empty_rows="mean")
