"""apply_vlm_kernels_to_clip / apply_vlm_kernels_to_timm_vit against the real transformers / timm
classes (tiny random configs, no downloads): outputs and every parameter's gradient vs the stock model,
instance-only patching (other instances and the classes untouched), revert, state_dict unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.integration_testing import assert_patched_matches_stock
from vlm_kernels.integrations import (
    apply_vlm_kernels_to_clip,
    apply_vlm_kernels_to_timm_vit,
    revert_vlm_kernels_to_clip,
    revert_vlm_kernels_to_timm_vit,
)

transformers = pytest.importorskip("transformers", reason="requirements.txt pins transformers")
timm_vit = pytest.importorskip(
    "timm.models.vision_transformer", reason="requirements.txt pins timm"
)


def tiny_clip(cls_name: str = "CLIPVisionModel") -> nn.Module:
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    if cls_name == "CLIPModel":
        text = transformers.CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
        config = transformers.CLIPConfig(
            text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16
        )
        model = transformers.CLIPModel(config)
    else:
        model = getattr(transformers, cls_name)(vision)
    with torch.no_grad():  # O(1) CLS / position values: a dropped one would show
        for module in model.modules():
            if hasattr(module, "class_embedding"):
                module.class_embedding.normal_()
                module.position_embedding.weight.normal_()
    return model


def tiny_vit(**kwargs) -> nn.Module:
    vit = timm_vit.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **kwargs
    )
    with torch.no_grad():
        for tensor in (vit.cls_token, vit.pos_embed):
            if tensor is not None:
                tensor.normal_()
    return vit


@pytest.mark.parametrize("cls_name", ["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def test_clip_vision_matches_stock(cls_name):
    pixels = torch.randn(3, 3, 32, 32)
    field = "image_embeds" if cls_name.endswith("Projection") else "last_hidden_state"
    assert_patched_matches_stock(
        cls_name,
        tiny_clip(cls_name),
        apply_vlm_kernels_to_clip,
        {"pixel_values": pixels},
        lambda out: getattr(out, field),
    )


def test_clip_model_matches_stock_and_patches_only_the_vision_tower():
    model = tiny_clip("CLIPModel")
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": torch.randint(0, 99, (2, 7))}
    patched = assert_patched_matches_stock(
        "CLIPModel", model, apply_vlm_kernels_to_clip, inputs, lambda out: out.logits_per_image
    )
    assert "forward" in patched.vision_model.embeddings.__dict__
    assert "forward" not in patched.text_model.embeddings.__dict__


@pytest.mark.parametrize(
    "kwargs", [{}, {"class_token": False, "global_pool": "avg"}], ids=["cls", "no-cls"]
)
def test_timm_vit_matches_stock(kwargs):
    pixels = torch.randn(3, 3, 32, 32)
    patched = assert_patched_matches_stock(
        "vit", tiny_vit(**kwargs), apply_vlm_kernels_to_timm_vit, {"x": pixels}, lambda out: out
    )
    # forward_intermediates goes through the same two patched calls
    stock = tiny_vit(**kwargs)
    stock.load_state_dict(patched.state_dict())
    with torch.no_grad():
        ours = patched.eval().forward_intermediates(pixels, indices=1)[1][0]
        theirs = stock.eval().forward_intermediates(pixels, indices=1)[1][0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def clip_embeddings(model: nn.Module) -> nn.Module:
    (embeddings,) = (m for m in model.modules() if type(m).__name__ == "CLIPVisionEmbeddings")
    return embeddings


def test_patch_is_per_instance_and_reverts():
    conv_forward, layernorm_forward = nn.Conv2d.forward, nn.LayerNorm.forward
    embeddings_cls = transformers.models.clip.modeling_clip.CLIPVisionEmbeddings
    embeddings_forward = embeddings_cls.forward
    vit_pos_embed = timm_vit.VisionTransformer._pos_embed
    clip, other_clip = tiny_clip(), tiny_clip()
    vit, other_vit = tiny_vit(), tiny_vit()
    state = {key: value.clone() for key, value in clip.state_dict().items()}
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = clip(pixel_values=pixels).last_hidden_state, vit(pixels)
    assert apply_vlm_kernels_to_clip(clip) == 1
    apply_vlm_kernels_to_timm_vit(vit)
    assert nn.Conv2d.forward is conv_forward and nn.LayerNorm.forward is layernorm_forward
    assert embeddings_cls.forward is embeddings_forward
    assert timm_vit.VisionTransformer._pos_embed is vit_pos_embed
    assert "forward" not in clip_embeddings(other_clip).__dict__
    assert "_pos_embed" not in other_vit.__dict__
    assert clip.state_dict().keys() == state.keys()
    revert_vlm_kernels_to_clip(clip)
    revert_vlm_kernels_to_timm_vit(vit)
    assert "forward" not in clip_embeddings(clip).__dict__
    assert "_pos_embed" not in vit.__dict__ and "forward" not in vit.patch_embed.__dict__
    with torch.no_grad():
        after = clip(pixel_values=pixels).last_hidden_state, vit(pixels)
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old, new)


def test_patched_clip_saves_into_a_stock_model(tmp_path):
    clip = tiny_clip()
    apply_vlm_kernels_to_clip(clip)
    clip.save_pretrained(tmp_path)
    stock = transformers.CLIPVisionModel.from_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = clip.eval()(pixel_values=pixels).last_hidden_state
        theirs = stock.eval()(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_clip_interpolated_positions_keep_hf_code():
    clip = tiny_clip()
    stock = copy.deepcopy(clip)
    apply_vlm_kernels_to_clip(clip)
    pixels = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ours = clip(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        theirs = stock(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    assert torch.equal(ours, theirs)


def test_unsupported_layouts_are_rejected_by_name():
    with pytest.raises(TypeError, match="CLIPVisionEmbeddings"):
        apply_vlm_kernels_to_clip(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        apply_vlm_kernels_to_timm_vit(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="reg_token"):
        apply_vlm_kernels_to_timm_vit(tiny_vit(reg_tokens=2))
    vit = tiny_vit()
    apply_vlm_kernels_to_timm_vit(vit)
    with pytest.raises(ValueError, match=r"\[B, C, 32, 32\]"):
        vit(torch.randn(1, 3, 40, 40))
