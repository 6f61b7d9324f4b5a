"""vlm_kernels.nn modules against plain-PyTorch equivalents (nn.Conv2d, nn.Linear over a concat, an
OpenFlamingo-style perceiver, a Hugging Face Mllama-style cross attention): outputs and every gradient,
weight loading by the counterparts' parameter names, autocast, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlm_kernels as vk
from vlm_kernels import nn as vkn

pytestmark = pytest.mark.usefixtures(
    "tensors_on_test_device"
)  # the GPU under VLMK_TEST_DEVICE=cuda
BACKENDS = [None, "reference"]  # None = auto: the fastest kernel here, picked up with no change


def assert_close(actual, expected, atol=2e-5, rtol=1e-4):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def grads(*tensors):
    return [t.grad.clone() for t in tensors]


def zero_grads(*tensors):
    for t in tensors:
        t.grad = None


# ---- PatchEmbed --------------------------------------------------------------------------------------


def conv_patch_embed(module: vkn.PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    """timm's VisionTransformer front: Conv2d, flatten, CLS in front, add the position embedding."""
    tokens = F.conv2d(x, module.proj.weight, module.proj.bias, stride=module.patch_size)
    tokens = tokens.flatten(2).transpose(1, 2)  # (B, Np, D)
    if module.cls_token is not None:
        tokens = torch.cat([module.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
    if module.pos_embed is not None:
        tokens = tokens + module.pos_embed
    return tokens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("class_token", [True, False])
def test_patch_embed_matches_conv2d_with_gradients(backend, class_token):
    module = vkn.PatchEmbed(
        (12, 8), 4, 3, 24, class_token=class_token, pos_embed=True, backend=backend
    )
    with torch.no_grad():
        module.cls_token.normal_() if class_token else None
    pixels = torch.randn(2, 3, 12, 8, requires_grad=True)
    params = [p for p in module.parameters()]
    out = module(pixels)
    assert out.shape == (2, 6 + class_token, 24)
    cotangent = torch.randn_like(out)
    out.backward(cotangent)
    ours = grads(pixels, *params)
    zero_grads(pixels, *params)
    expected = conv_patch_embed(module, pixels)
    expected.backward(cotangent)
    assert_close(out, expected)
    for got, want in zip(ours, grads(pixels, *params), strict=True):
        assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_uint8_with_fused_normalization(backend):
    mean, std = [0.48, 0.45, 0.40], [0.27, 0.26, 0.28]
    module = vkn.PatchEmbed(8, 2, 3, 16, pixel_mean=mean, pixel_std=std, backend=backend)
    pixels = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    normalized = (pixels / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None
    ]
    assert_close(module(pixels), conv_patch_embed(module, normalized))
    assert "pixel_mean" not in module.state_dict()  # derived from the constructor, not weights


def test_patch_embed_loads_timm_names_and_rejects_wrong_sizes():
    module = vkn.PatchEmbed(8, 4, 1, 8, class_token=True, pos_embed=True)
    timm_state = {
        "proj.weight": torch.randn(8, 1, 4, 4),
        "proj.bias": torch.randn(8),
        "cls_token": torch.randn(1, 1, 8),
        "pos_embed": torch.randn(1, 5, 8),
    }
    module.load_state_dict(timm_state)
    x = torch.randn(2, 1, 8, 8)
    assert_close(module(x), conv_patch_embed(module, x))
    with pytest.raises(ValueError, match=r"pixels must be \[B, 1, 8, 8\]"):
        module(torch.randn(2, 1, 12, 12))
    with pytest.raises(ValueError, match=r"pixels must be \[B, 1, 8, 8\]"):
        module(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vkn.PatchEmbed(10, 4, 1, 8)


def test_patch_embed_under_bf16_autocast():
    module = vkn.PatchEmbed(8, 2, 1, 16, class_token=True, pos_embed=True)
    pixels = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with torch.autocast("cpu", torch.bfloat16):
        out = module(pixels)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), module(pixels), atol=5e-2, rtol=5e-2)  # bf16 weights and sums


# ---- MultiLayerProjector -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_projector_matches_linear_over_concat_with_gradients(backend):
    sizes = (16, 8, 24)
    module = vkn.MultiLayerProjector(sizes, 12, backend=backend)
    linear = nn.Linear(sum(sizes), 12)
    linear.load_state_dict(
        module.state_dict()
    )  # the same names and shapes as the Linear it replaces
    features = [torch.randn(2, 5, d, requires_grad=True) for d in sizes]
    out = module(features)
    cotangent = torch.randn_like(out)
    out.backward(cotangent)
    ours = grads(*features, module.weight, module.bias)
    expected = linear(torch.cat(features, dim=-1))
    zero_grads(*features)
    expected.backward(cotangent)
    assert_close(out, expected)
    for got, want in zip(ours, grads(*features, linear.weight, linear.bias), strict=True):
        assert_close(got, want)


def test_projector_rejects_wrong_features():
    module = vkn.MultiLayerProjector((8, 8), 4)
    with pytest.raises(ValueError, match=r"last dims \(8, 8\)"):
        module([torch.randn(2, 8), torch.randn(2, 7)])
    with pytest.raises(ValueError, match="2 features"):
        module([torch.randn(2, 8)])


# ---- PerceiverResampler ------------------------------------------------------------------------------


def open_flamingo_attention(attention: vkn.PerceiverAttention, x, latents):
    """OpenFlamingo's PerceiverAttention.forward, verbatim in plain torch: concat, einsum, softmax."""
    x = attention.norm_media(x)
    latents = attention.norm_latents(latents)
    h = attention.heads
    q = attention.to_q(latents)
    kv_input = torch.cat((x, latents), dim=-2)
    k, v = attention.to_kv(kv_input).chunk(2, dim=-1)

    def split_heads(t):  # b t n (h d) -> b h t n d
        return t.unflatten(-1, (h, -1)).permute(0, 3, 1, 2, 4)

    q, k, v = split_heads(q) * attention.scale, split_heads(k), split_heads(v)
    sim = torch.einsum("... i d, ... j d -> ... i j", q, k)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    out = torch.einsum("... i j, ... j d -> ... i d", sim.softmax(dim=-1), v)
    out = out.permute(0, 2, 3, 1, 4).flatten(-2)  # b h t n d -> b t n (h d)
    return attention.to_out(out)


def open_flamingo_resampler(resampler: vkn.PerceiverResampler, x):
    """OpenFlamingo's PerceiverResampler.forward on the module's own parameters."""
    b, T, F_ = x.shape[:3]
    if resampler.frame_embs is not None:
        x = x + resampler.frame_embs[:F_][None, None, :, None, :]
    x = x.flatten(2, 3)
    if resampler.media_time_embs is not None:
        x = x + resampler.media_time_embs[:T]
    latents = resampler.latents.expand(b, T, -1, -1)
    for attention, feed_forward in resampler.layers:
        latents = open_flamingo_attention(attention, x, latents) + latents
        latents = feed_forward(latents) + latents
    return resampler.norm(latents)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resampler_matches_open_flamingo_with_gradients(backend):
    resampler = vkn.PerceiverResampler(
        dim=32,
        depth=2,
        dim_head=16,
        heads=2,
        num_latents=4,
        max_num_media=3,
        max_num_frames=3,
        ff_mult=2,
        backend=backend,
    )
    x = torch.randn(2, 2, 3, 5, 32, requires_grad=True)  # (b, T, F, v, D)
    params = list(resampler.parameters())
    out = resampler(x)
    assert out.shape == (2, 2, 4, 32)
    cotangent = torch.randn_like(out)
    out.backward(cotangent)
    ours = grads(x, *params)
    zero_grads(x, *params)
    expected = open_flamingo_resampler(resampler, x)
    expected.backward(cotangent)
    assert_close(out, expected)
    for got, want in zip(ours, grads(x, *params), strict=True):
        assert_close(got, want, atol=5e-5)


def test_resampler_state_dict_has_open_flamingo_names():
    resampler = vkn.PerceiverResampler(
        dim=16, depth=1, dim_head=8, heads=2, num_latents=2, max_num_frames=2
    )
    names = set(resampler.state_dict())
    for name in (
        "latents",
        "frame_embs",
        "layers.0.0.norm_media.weight",
        "layers.0.0.norm_latents.bias",
        "layers.0.0.to_q.weight",
        "layers.0.0.to_kv.weight",
        "layers.0.0.to_out.weight",
        "layers.0.1.0.weight",
        "layers.0.1.1.weight",
        "layers.0.1.3.weight",
        "norm.weight",
    ):
        assert name in names, name


def test_resampler_frame_mask_equals_dropping_the_padding_frames():
    resampler = vkn.PerceiverResampler(
        dim=16, depth=1, dim_head=8, heads=2, num_latents=3, max_num_frames=3
    )
    x = torch.randn(2, 1, 3, 4, 16)
    frame_mask = torch.tensor([[[True, True, False]], [[True, True, True]]])
    out = resampler(x, frame_mask)
    assert_close(out[0:1], open_flamingo_resampler(resampler, x[0:1, :, :2]))
    assert_close(out[1:2], open_flamingo_resampler(resampler, x[1:2]))
    with pytest.raises(ValueError, match="frame_mask must be"):
        resampler(x, frame_mask[:, :, :2])
    with pytest.raises(ValueError, match="max_num_frames=3"):
        resampler(torch.randn(1, 1, 4, 4, 16))


# ---- ImageTextCrossAttention -------------------------------------------------------------------------


def mllama_cross_attention(
    module: vkn.ImageTextCrossAttention, hidden, image_states, media_mask, media_len, empty_rows
):
    """Hugging Face MllamaTextCrossAttention (eager): dense additive mask, fp32 softmax; for "zero"
    the rows that see no image are zeroed afterwards (Meta's full_text_row_masked_out_mask)."""
    b, length, _ = hidden.shape
    h, hkv, dh = module.num_heads, module.num_key_value_heads, module.head_dim
    q = module.q_proj(hidden).view(b, length, h, dh).transpose(1, 2)
    q = module.q_norm(q)
    k = module.k_proj(image_states).view(b, -1, hkv, dh).transpose(1, 2)
    v = module.v_proj(image_states).view(b, -1, hkv, dh).transpose(1, 2)
    k = module.k_norm(k)
    k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
    scores = q @ k.transpose(-1, -2) * dh**-0.5 + vk.masks.to_additive(media_mask, media_len)
    out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v  # (B, H, L, Dh)
    out = out.transpose(1, 2).reshape(b, length, h * dh)
    if empty_rows == "zero":
        out = out * media_mask.any(-1, keepdim=True)
    return module.o_proj(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
def test_cross_attention_matches_mllama_with_gradients(backend, empty_rows, heads):
    num_heads, num_kv = heads
    module = vkn.ImageTextCrossAttention(
        48, num_heads, num_kv, head_dim=64, kv_input_size=40, backend=backend
    )
    with torch.no_grad():  # non-trivial norm weights so their gradients are tested too
        module.q_norm.weight.uniform_(0.5, 1.5)
        module.k_norm.weight.uniform_(0.5, 1.5)
    ids = torch.tensor([[5, 3, 7, 3, 3, 8, 9], [3, 6, 6, 6, 3, 2, 2]])
    media_mask = vk.masks.from_image_token_ids(ids, 3)  # (2, 7, 3); row 0 token 0 sees nothing
    media_len = 4
    hidden = torch.randn(2, 7, 48, requires_grad=True)
    image_states = torch.randn(2, 3 * media_len, 40, requires_grad=True)
    params = list(module.parameters())
    out = module(hidden, media_mask, image_states, empty_rows=empty_rows)
    cotangent = torch.randn_like(out)
    out.backward(cotangent)
    ours = grads(hidden, image_states, *params)
    zero_grads(hidden, image_states, *params)
    expected = mllama_cross_attention(
        module, hidden, image_states, media_mask, media_len, empty_rows
    )
    expected.backward(cotangent)
    assert_close(out, expected)
    for got, want in zip(ours, grads(hidden, image_states, *params), strict=True):
        assert_close(got, want)
    if empty_rows == "zero":
        assert torch.equal(out[0, 0], torch.zeros(48))  # text before the first image gets nothing


def test_cross_attention_cached_image_kv_equals_recomputing():
    module = vkn.ImageTextCrossAttention(64, 2, 1, head_dim=64)
    media_mask = torch.rand(3, 5, 2) < 0.6
    image_states = torch.randn(3, 2 * 6, 64)
    kv = module.compute_image_kv(image_states)
    assert kv[0].shape == (3, 12, 1, 64)
    assert torch.equal(
        module(torch.ones(3, 5, 64), media_mask, kv, media_len=6),
        module(torch.ones(3, 5, 64), media_mask, image_states),
    )


def test_cross_attention_loads_mllama_names():
    module = vkn.ImageTextCrossAttention(32, 2, 1, head_dim=16)
    hf_names = {
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "o_proj.weight",
        "q_norm.weight",
        "k_norm.weight",
    }
    assert set(module.state_dict()) == hf_names
    plain = vkn.ImageTextCrossAttention(32, 2, 1, head_dim=16, qk_norm=False)
    assert set(plain.state_dict()) == hf_names - {"q_norm.weight", "k_norm.weight"}


def test_cross_attention_rejects_bad_inputs():
    module = vkn.ImageTextCrossAttention(32, 2, 1, head_dim=16)
    with pytest.raises(ValueError, match="cannot infer media_len"):
        module(torch.randn(1, 3, 32), torch.ones(1, 3, 2, dtype=torch.bool), torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="hidden_states must be"):
        module(torch.randn(3, 32), torch.ones(1, 3, 1, dtype=torch.bool), torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        vkn.ImageTextCrossAttention(32, 3, 2)


def test_cross_attention_under_bf16_autocast():
    module = vkn.ImageTextCrossAttention(64, 2, 1, head_dim=64)
    hidden, states = torch.randn(2, 4, 64), torch.randn(2, 8, 64)
    mask = torch.ones(2, 4, 2, dtype=torch.bool)
    with torch.autocast("cpu", torch.bfloat16):
        out = module(hidden, mask, states)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), module(hidden, mask, states), atol=5e-2, rtol=5e-2)
