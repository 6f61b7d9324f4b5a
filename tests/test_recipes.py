"""The VLM recipes of model/ (model/recipes.py): unified embedding (LLaVA), the CLIP stage, Llama 3.2
staged training with the text model frozen, and two vision encoders concatenated by one projector.
Tiny configs and a few steps: correctness properties, not accuracy (the recipes table measures that)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import vlm_kernels as vk
from model.checkpoint import load_model, save_model
from model.cli import main
from model.clip import (
    ContrastiveConfig,
    ContrastiveModel,
    contrastive_batch,
    contrastive_loss,
    load_pretrained_vision,
    train_contrastive,
)
from model.config import TrainConfig, preset
from model.data import TASKS, Digits, eval_batch
from model.staged import (
    freeze_text_model,
    text_batch,
    text_model_parameters,
    train_text_stage,
)
from model.tokenizer import Tokenizer
from model.train import Trainer, build_model, make_optimizer, train
from model.unified import UnifiedEmbeddingVLM
from model.vision import MultiVisionEncoder
from model.vlm import IGNORE_INDEX, generate

TINY = TrainConfig(preset="tiny", steps=3, batch_size=4, warmup_steps=1, eval_every=0)
UNIFIED = dataclasses.replace(TINY, model_overrides={"fusion": "unified"})
MULTI = dataclasses.replace(TINY, model_overrides={"vision2_patch_size": 2, "vision2_dim": 16})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.for_tasks()


@pytest.fixture(scope="module")
def data():
    return Digits()


def _capture(module, store, key):
    return module.register_forward_hook(lambda _m, _args, output: store.__setitem__(key, output))


# ---- unified embedding (LLaVA) ------------------------------------------------------------------


@pytest.mark.parametrize("connector", ["linear", "mlp"])
@pytest.mark.parametrize("task", TASKS)
def test_unified_decoder_input_takes_the_projected_image_tokens(tokenizer, data, task, connector):
    """Every <image> token's slots in the decoder's input are exactly the projector's (after the
    resampler for clips) tokens of its media item; text slots are the token embeddings; the logits
    at the input positions are the spliced sequence's at each token's last slot."""
    config = dataclasses.replace(
        UNIFIED, model_overrides={"fusion": "unified", "connector": connector}
    )
    model = build_model(config, tokenizer).eval()
    assert isinstance(model, UnifiedEmbeddingVLM)
    assert len(model.decoder.cross_layers) == 0
    batch = eval_batch(task, data, tokenizer, 3)
    seen = {}
    hooks = [
        _capture(model.multi_modal_projector, seen, "projected"),
        model.decoder.layers[0].register_forward_pre_hook(
            lambda _m, args: seen.__setitem__("decoder_input", args[0])
        ),
    ]
    try:
        logits = model(batch.input_ids, batch.media)
    finally:
        for hook in hooks:
            hook.remove()
    image_states, media_len = model.encode_media(batch.media)
    x = seen["decoder_input"]
    num_media = batch.media.shape[1]
    length = batch.input_ids.shape[1]
    assert x.shape == (3, length + num_media * (media_len - 1), model.config.dim)
    assert model.decoder_tokens(batch.input_ids, batch.media) == x.shape[1]
    if task != "video":  # images: the image tokens are the projector's output itself
        projected = seen["projected"].view(3, num_media * media_len, -1)
        assert torch.equal(image_states, projected)
    position, image = 0, 0
    for column, token in enumerate(batch.input_ids[0].tolist()):  # (images at the same places)
        if token == tokenizer.image_id:
            span = image_states[:, image * media_len : (image + 1) * media_len]
            assert torch.equal(x[:, position : position + media_len], span)
            position, image = position + media_len, image + 1
        else:
            expected = model.decoder.tok_embeddings.weight[batch.input_ids[:, column]]
            assert torch.equal(x[:, position], expected)
            position += 1
    spliced = model.decoder(None, None, None, 0, inputs_embeds=x)
    is_image = (batch.input_ids == tokenizer.image_id).long()
    last = (1 + is_image * (media_len - 1)).cumsum(1) - 1
    assert logits.shape == (3, length, len(tokenizer))
    assert torch.equal(logits, spliced.gather(1, last[..., None].expand(-1, -1, logits.shape[-1])))


def test_unified_image_changes_only_what_follows_it(tokenizer, data):
    """Causal splice: a different image changes the logits from its <image> token on, not before."""
    model = build_model(UNIFIED, tokenizer).eval()
    batch = eval_batch("interleaved", data, tokenizer, 2)
    other = batch.media.clone()
    other[:, 1] = 255 - other[:, 1]
    second = int((batch.input_ids[0] == tokenizer.image_id).nonzero()[1])
    a, b = model(batch.input_ids, batch.media), model(batch.input_ids, other)
    assert torch.equal(a[:, :second], b[:, :second])
    assert not torch.allclose(a[:, second:], b[:, second:])


@pytest.mark.parametrize("task", TASKS)
def test_unified_generate_with_and_without_cache_agree(tokenizer, data, task):
    model = build_model(UNIFIED, tokenizer).eval()
    batch = eval_batch(task, data, tokenizer, 4)
    prompt = batch.input_ids[:, : batch.prompt_length()]
    media = batch.media[:, :1]
    cached = generate(model, prompt, media, 3)
    assert torch.equal(cached, generate(model, prompt, media, 3, use_cache=False))
    # Greedy decoding continues the prompt as the forward's argmax says.
    logits = model(prompt, media)
    logits[..., [tokenizer.pad_id, tokenizer.bos_id, tokenizer.image_id]] = float("-inf")
    assert torch.equal(cached[:, prompt.shape[1]], logits[:, -1].argmax(-1))
    text = generate(model, torch.tensor([[tokenizer.bos_id]] * 2), None, 3)
    assert text.shape[0] == 2
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prompt, media, model.config.max_seq_len)
    with pytest.raises(ValueError, match="eagerly"):
        generate(model, prompt, media, 2, cuda_graph=True)


def test_unified_trains_and_round_trips_a_checkpoint(tokenizer, data, tmp_path):
    result = train(UNIFIED, progress=False)
    assert all(math.isfinite(loss) for loss in result.losses)
    save_model(tmp_path, result.model, tokenizer)
    loaded, _ = load_model(tmp_path)
    assert isinstance(loaded, UnifiedEmbeddingVLM)
    batch = eval_batch("caption", data, tokenizer, 2)
    model = result.model.eval()
    assert torch.equal(loaded(batch.input_ids, batch.media), model(batch.input_ids, batch.media))


# ---- CLIP stage ---------------------------------------------------------------------------------


def test_contrastive_loss_is_symmetric_infonce():
    logits = torch.randn(3, 5, 5)
    labels = torch.arange(5).repeat(3)
    by_hand = (
        F.cross_entropy(logits.flatten(0, 1), labels)
        + F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), labels)
    ) / 2
    torch.testing.assert_close(contrastive_loss(logits), by_hand, rtol=0, atol=0)
    torch.testing.assert_close(contrastive_loss(logits.transpose(1, 2)), by_hand)
    # Image->text alone is not symmetric: the loss must see both directions.
    assert not torch.allclose(
        F.cross_entropy(logits.flatten(0, 1), labels),
        F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), labels),
    )


def test_temperature_is_learned_and_clamped(tokenizer, data):
    model_config = preset("tiny", vocab_size=len(tokenizer))
    model = ContrastiveModel(model_config, embed_dim=16, text_dim=32)
    assert model.logit_scale.requires_grad
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    pixels, ids = contrastive_batch(data, tokenizer, 2, torch.Generator().manual_seed(0), True)
    logits, loss = model(pixels, ids)
    assert logits.shape == (2, 10, 10)
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()
    assert math.isclose(model.logit_scale.item(), math.log(100.0), rel_tol=1e-6)
    result = train_contrastive(
        model_config, tokenizer, ContrastiveConfig(steps=3, groups=1, warmup_steps=1, text_dim=32)
    )
    assert len(set(result.logit_scales)) > 1  # the optimizer moves it
    assert 0.0 <= result.zero_shot <= 1.0


def test_contrastive_groups_hold_each_digit_once(tokenizer, data):
    pixels, ids = contrastive_batch(data, tokenizer, 3, torch.Generator().manual_seed(1), False)
    assert pixels.shape == (3, 10, 1, 8, 8) and ids.shape == (3, 10, 3)
    words = ids[:, :, 1]
    assert all(
        sorted(row) == sorted(tokenizer.digit_id(d) for d in range(10)) for row in words.tolist()
    )
    # Each image is of the digit its text names (no augmentation here: pixels are the data's).
    for g in range(3):
        for k in range(10):
            digit = tokenizer.words[int(words[g, k])]
            matches = (data.train_images == pixels[g, k]).flatten(1).all(1)
            labels = {int(data.train_labels[i]) for i in torch.nonzero(matches)[:, 0]}
            assert tokenizer.digit_id(labels.pop()) == tokenizer.ids[digit]


def test_clip_encoder_initialises_the_fusion_model(tokenizer):
    config = TINY
    vlm = build_model(config, tokenizer)
    clip = ContrastiveModel(vlm.config, embed_dim=16, text_dim=32)
    load_pretrained_vision(vlm, clip)
    for name, tensor in clip.vision.state_dict().items():
        assert torch.equal(vlm.vision.state_dict()[name], tensor), name


# ---- Llama 3.2 staged training ------------------------------------------------------------------


def test_text_batches_are_the_captions_without_images(tokenizer):
    ids, targets = text_batch(tokenizer, 12, torch.Generator().manual_seed(0))
    assert not (ids == tokenizer.image_id).any()
    assert ((ids == tokenizer.eos_id).sum(1) == 1).all()
    real = targets != IGNORE_INDEX
    assert torch.equal(targets[real], ids[:, 1:][real[:, :-1]])
    assert not real[:, -1].any()


def test_text_stage_trains_only_the_text_model(tokenizer):
    model = build_model(TINY, tokenizer)
    text = set(text_model_parameters(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_text_stage(model, tokenizer, TINY, 2)
    assert len(result.losses) == 2
    for name, param in model.named_parameters():
        assert torch.equal(before[name], param) == (name not in text), name


def test_fusion_with_the_text_model_frozen_keeps_text_logits_bit_identical(tokenizer):
    model = build_model(TINY, tokenizer)
    train_text_stage(model, tokenizer, TINY, 2)
    frozen = set(freeze_text_model(model))
    assert frozen == set(text_model_parameters(model))
    assert any(n.startswith("decoder.tok_embeddings") for n in frozen)
    assert not any(".cross_layers." in n for n in frozen)
    for name, param in model.named_parameters():
        assert param.requires_grad == (name not in frozen), name
    optimized = {id(p) for g in make_optimizer(model, TINY).param_groups for p in g["params"]}
    assert not optimized & {id(p) for n, p in model.named_parameters() if n in frozen}

    ids, _ = text_batch(tokenizer, 16, torch.Generator().manual_seed(3))
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model.eval()(ids, None)
    trainer = Trainer(TINY, model=model, device=torch.device("cpu"))
    for _ in range(3):
        trainer.step()
    with torch.no_grad():
        after = model.eval()(ids, None)
    assert torch.equal(before, after)
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, before_params[name]), name
            assert param.grad is None, name
    adapter = [n for n in before_params if n not in frozen]
    assert any(
        not torch.equal(before_params[n], dict(model.named_parameters())[n]) for n in adapter
    )


# ---- two vision encoders, one concat_project ----------------------------------------------------


def test_multi_encoder_features_meet_in_one_concat_project(tokenizer, data, monkeypatch):
    model = build_model(MULTI, tokenizer).eval()
    assert isinstance(model.vision, MultiVisionEncoder)
    dims = model.vision.feature_dims
    config = model.config
    assert dims == (config.vision_dim,) * 2 + (16,) * 2
    calls = []
    concat_project = vk.concat_project

    def spy(features, weight, bias=None, **kwargs):
        calls.append([tuple(f.shape) for f in features])
        return concat_project(features, weight, bias, **kwargs)

    monkeypatch.setattr(vk, "concat_project", spy)
    batch = eval_batch("caption", data, tokenizer, 3)
    model(batch.input_ids, batch.media)
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    assert calls == [[(3, tokens, d) for d in dims]]
    # The second encoder's patch-2 grid is pooled onto the first's patch-4 grid.
    pixels = batch.media.flatten(0, 1)  # (3, 1, 8, 8)
    fine = model.vision.second(pixels)[0]  # (3, 1 + 16, 16)
    pooled = model.vision(pixels)[2]
    assert fine.shape[1] == 17 and pooled.shape[1] == tokens
    grid = fine[:, 1:].transpose(1, 2).unflatten(-1, (4, 4))
    expected = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled[:, 1:], expected)
    assert torch.equal(pooled[:, 0], fine[:, 0])


def test_multi_encoder_rejects_a_grid_it_cannot_pool(tokenizer):
    config = dataclasses.replace(TINY, model_overrides={"vision2_patch_size": 8})
    with pytest.raises(ValueError, match="vision2_patch_size=8"):
        build_model(config, tokenizer)


# ---- the recipes command ------------------------------------------------------------------------


def test_recipes_cli_runs_every_recipe_and_prints_one_table(tmp_path, capsys):
    out = tmp_path / "recipes"
    argv = ["recipes", "--preset", "tiny", "--steps", "2", "--batch-size", "4"]
    argv += ["--warmup-steps", "1", "--eval-every", "1", "--eval-examples", "4"]
    argv += ["--eval-count", "4", "--text-steps", "2", "--clip-steps", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "recipes.json").read_text())
    names = [row["recipe"] for row in rows]
    assert names == ["cross_attention", "unified", "unified_mlp", "staged", "multi_encoder", "clip"]
    table = (out / "recipes.md").read_text()
    assert table.strip() in printed
    for name in names:
        assert f"| `{name}` |" in table
    by_name = {row["recipe"]: row for row in rows}
    for row in rows:  # the periodic evaluations, then the final one that steps-to-targets counts
        assert [e["step"] for e in row["evals"]] == [1, 2]
        assert {t: row["evals"][-1][t] for t in TASKS} == row["accuracy"]
    assert by_name["staged"]["notes"]["text_only_logits_bit_identical"] is True
    assert (
        by_name["staged"]["trainable_parameters"]
        < by_name["cross_attention"]["trainable_parameters"]
    )
    # 5 tokens per image (2x2 patches + CLS), 4 latents per clip in the tiny preset.
    assert by_name["unified"]["decoder_tokens"] == {"caption": 8, "interleaved": 14, "video": 10}
    assert by_name["cross_attention"]["decoder_tokens"] == {
        "caption": 4,
        "interleaved": 6,
        "video": 7,
    }
    assert 0.0 <= by_name["clip"]["notes"]["zero_shot_test_accuracy"] <= 1.0


def test_recipes_cli_rejects_an_unknown_recipe(capsys):
    with pytest.raises(SystemExit):
        main(["recipes", "--recipe", "flamingo"])
    assert "invalid choice" in capsys.readouterr().err


def test_train_cli_builds_the_recipe_models_and_eval_generate_read_them(tmp_path, capsys):
    out = str(tmp_path / "unified")
    argv = ["train", "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--warmup-steps", "1"]
    argv += ["--eval-every", "0", "--fusion", "unified", "--connector", "mlp", "--out", out]
    assert main(argv) == 0
    model, _ = load_model(out)
    assert isinstance(model, UnifiedEmbeddingVLM) and model.config.connector == "mlp"
    assert main(["eval", "--checkpoint", out, "--examples", "4"]) == 0
    assert main(["generate", "--checkpoint", out, "--task", "interleaved", "--count", "2"]) == 0
    printed = capsys.readouterr().out
    assert "every caption right" in printed and "images of" in printed
    # A resume cannot change the model.
    assert main(["train", "--resume", out, "--steps", "3", "--fusion", "cross_attention"]) == 2
    assert "model_overrides" in capsys.readouterr().err
    multi = str(tmp_path / "multi")
    argv = ["train", "--preset", "tiny", "--steps", "1", "--batch-size", "4", "--warmup-steps", "1"]
    assert main([*argv, "--eval-every", "0", "--vision2-patch-size", "2", "--out", multi]) == 0
    assert isinstance(load_model(multi)[0].vision, MultiVisionEncoder)


def test_unified_generate_takes_left_padded_prompts(tokenizer, data):
    """Prompts of different lengths (left-padded) decode as each would alone."""
    model = build_model(UNIFIED, tokenizer).eval()
    batch = eval_batch("caption", data, tokenizer, 2)
    long = batch.input_ids[:1, :3]  # <bos> <image> word
    short = torch.cat([torch.tensor([[tokenizer.pad_id]]), batch.input_ids[1:2, :2]], dim=1)
    out = generate(model, torch.cat([long, short]), batch.media, 2)
    first = generate(model, long, batch.media[:1], 2)[0]
    assert torch.equal(out[0, : first.shape[0]], first)
    alone = generate(model, batch.input_ids[1:2, :2], batch.media[1:2], 2)[0]
    assert torch.equal(out[1, 1 : 1 + alone.shape[0]], alone)


def test_recipes_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["recipes", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--quick", "--recipe", "unified", "staged", "multi_encoder", "clip"):
        assert word in text
