"""apply_vlm_kernels_to_mllama against transformers' real Mllama classes (a tiny random config, no
downloads): logits and every parameter's gradient vs the stock model (eager and sdpa), several /
adjacent images, padding tiles and text before the first image in both empty_rows modes,
cross_attention_mask=None, greedy generate() with the cache, a 20-step training run, revert (instance
and pre-construction), no global class modified, save after patch -> load into a stock model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.integration_testing import assert_patched_matches_stock
from vlm_kernels.integrations import apply_vlm_kernels_to_mllama, revert_vlm_kernels_to_mllama

transformers = pytest.importorskip("transformers", reason="requirements.txt pins transformers")
from transformers.models.mllama import modeling_mllama  # noqa: E402

VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_global_layers=1,
    attention_heads=4,
    vision_output_dim=96,  # hidden_size * (1 + len(intermediate_layers_indices))
    image_size=28,  # 4 x 4 patches of 7 x 7: 17 tokens per tile with the CLS
    patch_size=7,
    max_num_tiles=2,
    supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    intermediate_layers_indices=[0, 1],
)
TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    cross_attention_layers=[1],
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
TOKENS_PER_TILE = 17


def tiny_mllama(attn: str = "eager", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.MllamaConfig(vision_config=VISION, text_config=TEXT, image_token_index=63)
    model = transformers.MllamaForConditionalGeneration._from_config(
        config, attn_implementation=attn
    )
    with torch.no_grad():
        # HF initializes the tanh gates (and the CLS / position gates) at 0, where the
        # cross-attention would not reach the logits at all; O(1) values make every path count.
        for name, param in model.named_parameters():
            if "gate" in name or "class_embedding" in name or "positional_embedding" in name:
                param.normal_()
    return model.eval()


def image_inputs(batch: int = 2, seq: int = 10, images: int = 3) -> dict:
    """Several images, two of them adjacent, padding tiles, and text before the first image."""
    generator = torch.Generator().manual_seed(1)
    mask = torch.zeros(batch, seq, images, VISION["max_num_tiles"], dtype=torch.long)
    mask[0, 2:5, 0, :1] = 1  # image 0 has one real tile (tile 1 is padding)
    mask[0, 5:, 1:, :] = 1  # images 1 and 2 adjacent: later text sees both
    mask[1, 0:4, 0, :] = 1  # sequence 1 starts with an image
    mask[1, 4:, 2, :1] = 1  # ... then skips image 1; image 2 padded to one tile
    return {
        "input_ids": torch.randint(4, 60, (batch, seq), generator=generator),
        "pixel_values": torch.randn(
            batch, images, VISION["max_num_tiles"], 3, 28, 28, generator=generator
        ),
        "aspect_ratio_ids": torch.tensor([[1, 2, 2], [2, 1, 1]])[:batch, :images],
        "aspect_ratio_mask": torch.tensor([[[1, 0], [1, 1], [1, 1]], [[1, 1], [1, 0], [1, 0]]])[
            :batch, :images
        ],
        "cross_attention_mask": mask,
    }


def logits(out) -> torch.Tensor:
    return out.logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_and_gradients_match_stock(attn):
    """empty_rows="uniform" (HF's behaviour): the patched model is the stock model."""
    assert_patched_matches_stock(
        f"mllama {attn}", tiny_mllama(attn), apply_vlm_kernels_to_mllama, image_inputs(), logits
    )


def test_zero_empty_rows_give_text_before_the_first_image_no_image_signal():
    """empty_rows="zero" equals the stock model with the cross-attention output of the rows that see
    no tile set to 0 (Meta / torchtune); those rows differ from HF's uniform attention."""
    inputs = image_inputs()
    sees_an_image = inputs["cross_attention_mask"].flatten(2).any(-1)  # [B, S]
    assert not sees_an_image[0, :2].any() and sees_an_image.any()
    model = tiny_mllama()
    uniform, zero = copy.deepcopy(model), copy.deepcopy(model)  # before the hooks below

    def zero_empty_rows(module, args, output):
        return (output[0] * sees_an_image[..., None].to(output[0].dtype), *output[1:])

    class ZeroedStock(nn.Module):
        """The stock model with hooks that zero those rows of every cross-attention output."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            for layer in inner.model.language_model.layers:
                if hasattr(layer, "cross_attn_attn_gate"):
                    layer.cross_attn.register_forward_hook(zero_empty_rows)

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    def apply_zero(wrapper):
        apply_vlm_kernels_to_mllama(wrapper.inner, empty_rows="zero")

    assert_patched_matches_stock("mllama zero", ZeroedStock(model), apply_zero, inputs, logits)
    # ... and it is not the uniform model on the rows before the first image
    apply_vlm_kernels_to_mllama(uniform)
    apply_vlm_kernels_to_mllama(zero, empty_rows="zero")
    with torch.no_grad():
        diff = (uniform(**inputs).logits - zero(**inputs).logits).abs().amax(-1)
    # sequence 1 has no such row (its later rows see rows 0-1 of sequence 0 through self-attention)
    assert diff[0, :2].min() > 1e-3 and diff[1].max() < 1e-5


def test_no_cross_attention_mask_means_every_token_sees_every_image():
    """HF's eager path (no mask: all keys visible) is the spec; its sdpa path is causal there."""
    inputs = image_inputs()
    del inputs["cross_attention_mask"]
    assert_patched_matches_stock(
        "mllama no mask", tiny_mllama("eager"), apply_vlm_kernels_to_mllama, inputs, logits
    )
    stock_sdpa, patched_sdpa = tiny_mllama("sdpa"), tiny_mllama("sdpa")
    apply_vlm_kernels_to_mllama(patched_sdpa)
    eager = tiny_mllama("eager")
    with torch.no_grad():
        ours = patched_sdpa(**inputs).logits
        torch.testing.assert_close(ours, eager(**inputs).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(stock_sdpa(**inputs).logits, ours, atol=1e-3)


@pytest.mark.parametrize("empty_rows", ["uniform", "zero"])
def test_greedy_generate_with_cache_is_identical(empty_rows):
    inputs = image_inputs()
    stock, patched = tiny_mllama(), tiny_mllama()
    apply_vlm_kernels_to_mllama(patched, empty_rows=empty_rows)
    if empty_rows == "zero":
        # Every prompt row sees an image, so "zero" and HF agree on every step.
        inputs["cross_attention_mask"][0, :2, 0, 0] = 1
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=3)
    with torch.no_grad():
        ours = patched.generate(**inputs, **kwargs)
        theirs = stock.generate(**inputs, **kwargs)
    assert ours.shape[1] == inputs["input_ids"].shape[1] + 6
    assert torch.equal(ours, theirs)


def test_training_run_tracks_stock_step_by_step():
    """20 AdamW steps on the same batches: the losses agree step by step (Liger's convergence idea)."""
    inputs = image_inputs()
    labels = torch.randint(
        4, 60, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(2)
    )
    losses = {}
    for name in ("stock", "patched"):
        model = tiny_mllama().train()
        if name == "patched":
            apply_vlm_kernels_to_mllama(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for _ in range(20):
            loss = model(**inputs, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert losses["stock"][-1] < losses["stock"][0] - 0.5  # it does learn
    torch.testing.assert_close(
        torch.tensor(losses["patched"]), torch.tensor(losses["stock"]), rtol=1e-4, atol=1e-4
    )


def test_instance_patch_touches_nothing_global_and_reverts():
    classes = (
        nn.Conv2d,
        nn.LayerNorm,
        modeling_mllama.MllamaTextCrossAttention,
        modeling_mllama.MllamaCrossAttentionDecoderLayer,
        modeling_mllama.MllamaVisionModel,
    )
    forwards = [cls.forward for cls in classes]
    model_class = modeling_mllama.MllamaModel
    inputs = image_inputs()
    model, other = tiny_mllama(), tiny_mllama()
    keys = set(model.state_dict())
    with torch.no_grad():
        before = model(**inputs).logits
    apply_vlm_kernels_to_mllama(model)
    assert [cls.forward for cls in classes] == forwards
    assert modeling_mllama.MllamaModel is model_class
    assert not any("forward" in module.__dict__ for module in other.modules())
    assert set(model.state_dict()) == keys
    patched_modules = [m for m in model.modules() if "forward" in m.__dict__]
    # The MllamaModel (projector), the patch Conv2d, one cross-attention layer and its attention.
    assert len(patched_modules) == 4
    revert_vlm_kernels_to_mllama(model)
    assert not any("forward" in module.__dict__ for module in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_pre_construction_patch_touches_only_the_modeling_module_and_reverts():
    original = modeling_mllama.MllamaModel
    try:
        apply_vlm_kernels_to_mllama(empty_rows="zero")
        assert modeling_mllama.MllamaModel is not original
        assert transformers.MllamaForConditionalGeneration.__init__ is not None
        model = tiny_mllama()
        assert isinstance(model.model, original)
        layer = model.model.language_model.layers[1]
        assert "forward" in layer.__dict__ and layer._vlmk_schedules.empty_rows == "zero"
    finally:
        revert_vlm_kernels_to_mllama()
    assert modeling_mllama.MllamaModel is original
    assert not any("forward" in module.__dict__ for module in tiny_mllama().modules())


def test_save_after_patch_loads_into_a_stock_model(tmp_path):
    inputs = image_inputs()
    model = tiny_mllama()
    apply_vlm_kernels_to_mllama(model)
    model.save_pretrained(tmp_path)
    stock = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs).logits, stock(**inputs).logits, rtol=1e-5, atol=1e-5
        )


def test_projector_runs_as_one_concat_project_and_keeps_the_weight_in_hf_layout(monkeypatch):
    """The intermediate stack + concat + projector is one vk.concat_project over the final and the
    intermediate states; the parameter keeps HF's interleaved layout (state_dict unchanged), the
    inference-time reordered weight is cached and rebuilt after the weight changes."""
    import vlm_kernels as vk

    calls = []
    real = vk.concat_project

    def spy(features, weight, bias=None, **kwargs):
        calls.append([tuple(f.shape) for f in features])
        return real(features, weight, bias, **kwargs)

    monkeypatch.setattr(vk, "concat_project", spy)
    inputs = image_inputs()
    stock, model = tiny_mllama(), tiny_mllama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_vlm_kernels_to_mllama(model, patch_embed=False, cross_attention=False)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs).logits, stock(**inputs).logits, rtol=1e-5, atol=1e-5
        )
        model(**inputs)
    sources = 1 + len(VISION["intermediate_layers_indices"])
    leading = (2 * 3, VISION["max_num_tiles"], TOKENS_PER_TILE)
    assert calls == [[(*leading, VISION["hidden_size"])] * sources] * 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    cached = model.model._vlmk_projector_weight[1]
    with torch.no_grad():
        model(**inputs)
        assert (
            model.model._vlmk_projector_weight[1] is cached
        )  # reused while the weight is unchanged
        for m in (model, stock):
            m.model.multi_modal_projector.weight.mul_(-0.5)
        torch.testing.assert_close(
            model(**inputs).logits, stock(**inputs).logits, rtol=1e-5, atol=1e-5
        )
    assert model.model._vlmk_projector_weight[1] is not cached
    revert_vlm_kernels_to_mllama(model)
    assert "_vlmk_projector_weight" not in model.model.__dict__
    calls.clear()
    apply_vlm_kernels_to_mllama(model, projector=False)
    with torch.no_grad():
        model(**inputs)
    assert calls == []


def test_clear_errors():
    with pytest.raises(ValueError, match="empty_rows"):
        apply_vlm_kernels_to_mllama(tiny_mllama(), empty_rows="mean")
    with pytest.raises(TypeError, match="MllamaForConditionalGeneration"):
        apply_vlm_kernels_to_mllama(nn.Linear(2, 2))
