"""The thin VLM of model/: it trains, decodes the same with and without its caches and through the
static (CUDA-graph) decode step, builds the media mask by the Mllama rule, round-trips and resumes checkpoints exactly, trains the same on 2 DDP ranks as on one
process, and rejects bad inputs with clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vlm_kernels as vk
from model.checkpoint import load_model, save_model
from model.cli import build_parser, main
from model.config import TrainConfig, preset
from model.data import TASKS, Digits, eval_batch, make_batch
from model.evaluate import predict
from model.static_decode import StaticDecodeStep
from model.text import TextDecoder
from model.tokenizer import Tokenizer
from model.train import build_model, learning_rate, train
from model.vlm import _generate, generate
from tests.devices import cuda_only

TINY = TrainConfig(preset="tiny", steps=30, batch_size=8, warmup_steps=5, eval_every=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """This model's ops are small: one thread each is fastest, and pytest-xdist runs a worker per core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompt_through_last_image(batch, tokenizer):
    """The ids up to and including the last <image> token (all the media inserted)."""
    last = int((batch.input_ids[0] == tokenizer.image_id).nonzero().max())
    return batch.input_ids[:, : last + 1]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.for_tasks()


@pytest.fixture(scope="module")
def data():
    return Digits()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny model with open gates, so the images change what it says."""
    model = build_model(TINY, tokenizer).eval()
    with torch.no_grad():
        for block in model.decoder.cross_layers:
            block.cross_attn_attn_gate.fill_(1.0)
            block.cross_attn_mlp_gate.fill_(1.0)
    return model


def test_tiny_model_trains_and_its_loss_falls():
    result = train(TINY, progress=False)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert len(result.losses) == TINY.steps
    assert last < 0.6 * first, (first, last)


@pytest.mark.parametrize("task", TASKS)
def test_generate_with_and_without_cache_agree(model, tokenizer, data, task):
    batch = eval_batch(task, data, tokenizer, 6)
    prompt = prompt_through_last_image(batch, tokenizer)
    reference = generate(model, prompt, batch.media, 5, use_cache=False)
    for image_cache in ("kv", "states", "none"):
        cached = generate(model, prompt, batch.media, 5, image_cache=image_cache)
        assert torch.equal(cached, reference), image_cache
    sampled = [
        generate(
            model,
            prompt,
            batch.media,
            5,
            temperature=0.8,
            top_k=4,
            use_cache=use_cache,
            generator=torch.Generator().manual_seed(7),
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(*sampled)
    assert not torch.isin(sampled[0][:, prompt.shape[1] :], torch.tensor([1, 3])).any()


def test_generate_stops_at_eos_and_pads_finished_rows(model, tokenizer, data):
    batch = eval_batch("caption", data, tokenizer, 4)
    out = generate(model, batch.input_ids[:, :2], batch.media, 8)
    for row in out[:, 2:].tolist():
        if tokenizer.eos_id in row:
            after = row[row.index(tokenizer.eos_id) + 1 :]
            assert all(t == tokenizer.pad_id for t in after)


def _static_generate(model, prompt, media, max_new_tokens, **options):
    """generate with every token after the first decoded by the static step that cuda_graph=True
    captures, run eagerly (the graph's computation, on the CPU)."""
    settings = dict(temperature=0.0, top_k=None, use_cache=True, image_cache="kv", generator=None)
    return _generate(
        model, prompt, media, max_new_tokens, **{**settings, **options}, decode="static"
    )


@pytest.mark.parametrize("task", TASKS)
def test_static_decode_step_generates_what_generate_does(model, tokenizer, data, task, monkeypatch):
    """The step a CUDA graph captures (whole static KV cache under a mask, static buffers, the
    decode media mask built once) gives the eager generate's tokens, greedy and sampled."""
    batch = eval_batch(task, data, tokenizer, 6)
    prompt = prompt_through_last_image(batch, tokenizer)
    calls = []
    original_call = StaticDecodeStep.__call__

    def counting_call(self, token, position):
        calls.append(position)
        return original_call(self, token, position)

    monkeypatch.setattr(StaticDecodeStep, "__call__", counting_call)
    eager = generate(model, prompt, batch.media, 7)
    assert calls == []  # the eager path is untouched
    static = _static_generate(model, prompt, batch.media, 7)
    assert torch.equal(static, eager)
    steps = static.shape[1] - prompt.shape[1]
    assert calls == list(range(prompt.shape[1], prompt.shape[1] + steps - 1))  # all but the first
    sampled = [
        generate_fn(
            model,
            prompt,
            batch.media,
            7,
            temperature=0.8,
            top_k=4,
            generator=torch.Generator().manual_seed(3),
        )
        for generate_fn in (generate, _static_generate)
    ]
    assert torch.equal(*sampled)


def test_decoded_tokens_all_see_the_first_decoded_tokens_media(tokenizer):
    """What lets the static step build its media mask once: under the Mllama rule every token after
    the prompt that is not an <image> (generate never samples one) sees the same media, the last
    image group of the prompt, whatever the tokens between."""
    image, word = tokenizer.image_id, tokenizer.words.index("seven")
    prompts = [
        [tokenizer.bos_id, image, word, image, image],  # a group of two images at the end
        [tokenizer.bos_id, image, word, word, image],
        [tokenizer.bos_id, image, image, word, image],
    ]
    decoded = torch.randint(4, len(tokenizer), (3, 9))  # never <pad>, <bos>, <eos> or <image>
    decoded[0, 4] = tokenizer.eos_id
    decoded[1, 5:] = tokenizer.pad_id  # a finished row
    ids = torch.cat([torch.tensor(prompts), decoded], dim=1)
    mask = vk.masks.from_image_token_ids(ids, image, num_media=3)
    first = mask[:, 5:6]
    assert torch.equal(mask[:, 5:], first.expand_as(mask[:, 5:]))
    assert first[:, 0].tolist() == [[False, True, True], [False, True, False], [False, False, True]]


def _prefilled_step(model, prompt, media, cuda_graph=False):
    """The decoder's caches holding ``prompt`` (which ends with an <image>), and a StaticDecodeStep
    for the tokens after it."""
    image_kv, media_len = model.image_kv(media)
    batch_size, prompt_len = prompt.shape
    model.decoder.setup_caches(batch_size, prompt_len + 8, torch.float32)
    mask = model.media_mask(prompt, media.shape[1])
    positions = torch.arange(prompt_len, device=prompt.device)
    model.decoder(prompt, mask, image_kv, media_len, positions)
    step = StaticDecodeStep(model.decoder, image_kv, mask[:, -1:], media_len, cuda_graph=cuda_graph)
    return step, prompt_len


class _NoHostSync:
    """While active, every device-to-host synchronization of a tensor raises (as in
    tests/test_media_schedule.py's guard of the attention decode path)."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.active = False
        for method in self.METHODS:
            monkeypatch.setattr(torch.Tensor, method, self._guarded(method))
        monkeypatch.setattr(torch.cuda, "synchronize", self._guarded("synchronize", lambda: None))

    def _guarded(self, method, original=None):
        original = original or getattr(torch.Tensor, method)

        def guarded(*args, **kwargs):
            if self.active:
                raise AssertionError(f"host sync in the decode step: Tensor.{method}")
            return original(*args, **kwargs)

        return guarded


@torch.no_grad()
def test_static_decode_step_does_no_host_sync(model, tokenizer, data, monkeypatch):
    batch = eval_batch("interleaved", data, tokenizer, 3)
    prompt = prompt_through_last_image(batch, tokenizer)
    step, prompt_len = _prefilled_step(model, prompt, batch.media)
    guard = _NoHostSync(monkeypatch)
    token = torch.full((3,), tokenizer.words.index("seven"))
    try:
        guard.active = True
        logits = [step(token, prompt_len + i) for i in range(3)]
        # The eager decode step reads the cache length back: the guard catches that.
        with pytest.raises(AssertionError, match="host sync"):
            model.decoder(
                token[:, None],
                step.media_mask,
                step.image_kv,
                step.media_len,
                torch.tensor([prompt_len + 3]),
            )
    finally:
        guard.active = False
        model.decoder.clear_caches()
    assert all(x.shape == (3, model.config.vocab_size) for x in logits)
    assert not torch.equal(logits[0], logits[1])  # the position and the cache moved on


def test_cuda_graph_decode_needs_a_cuda_device_and_the_caches(model, tokenizer, data):
    batch = eval_batch("caption", data, tokenizer, 2)
    prompt = prompt_through_last_image(batch, tokenizer)
    with pytest.raises(ValueError, match="CUDA device, got input_ids on cpu"):
        generate(model, prompt, batch.media, 3, cuda_graph=True)
    for options in (dict(use_cache=False), dict(image_cache="states")):
        with pytest.raises(ValueError, match="use_cache=True and image_cache='kv'"):
            _static_generate(model, prompt, batch.media, 3, **options)
    mask = torch.ones(2, 1, 1, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="setup_caches"):
        StaticDecodeStep(model.decoder, [], mask, 4, cuda_graph=False)
    with pytest.raises(ValueError, match="CUDA graph needs CUDA tensors"):
        StaticDecodeStep(model.decoder, [], mask, 4, cuda_graph=True)
    with pytest.raises(ValueError, match=r"\[B, 1, M\] bool"):
        StaticDecodeStep(model.decoder, [], mask.expand(2, 2, 1), 4, cuda_graph=False)
    with pytest.raises(ValueError, match="pass input_pos"):
        model.decoder(prompt, mask, [], 4, static_cache=True)


@cuda_only
@torch.no_grad()
def test_cuda_graph_decode_replays_the_eager_step(tokenizer, data, monkeypatch):
    """On a GPU: generate(cuda_graph=True) gives the eager tokens, and a captured step replayed over
    teacher-forced tokens gives the eager static step's logits."""
    model = build_model(TINY, tokenizer).eval().cuda()
    for block in model.decoder.cross_layers:
        block.cross_attn_attn_gate.fill_(1.0)
        block.cross_attn_mlp_gate.fill_(1.0)
    replays = []
    original_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(
        torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or original_replay(graph)
    )
    for task in TASKS:
        batch = eval_batch(task, data, tokenizer, 8)
        prompt = prompt_through_last_image(batch, tokenizer).cuda()
        media = batch.media.cuda()
        eager = generate(model, prompt, media, 8)
        graphed = generate(model, prompt, media, 8, cuda_graph=True)
        assert torch.equal(graphed, eager), task
    batch = eval_batch("interleaved", data, tokenizer, 8)
    prompt = prompt_through_last_image(batch, tokenizer).cuda()
    forced = torch.randint(4, len(tokenizer), (6, 8), device="cuda")  # 6 steps of 8 rows
    results = []
    for cuda_graph in (False, True):
        step, prompt_len = _prefilled_step(model, prompt, batch.media.cuda(), cuda_graph)
        try:
            results.append([step(t, prompt_len + i).clone() for i, t in enumerate(forced)])
        finally:
            model.decoder.clear_caches()
    assert step.graph is not None and step.replays == len(forced) - step.warmup_steps
    for eager_logits, graph_logits in zip(*results, strict=True):
        torch.testing.assert_close(graph_logits, eager_logits, atol=1e-4, rtol=1e-4)
    assert replays


def test_media_mask_in_the_model_equals_the_builder(model, tokenizer, data):
    batch = eval_batch("interleaved", data, tokenizer, 3, interleaved_images=3)
    seen = []
    hook = model.decoder.cross_layers[0].cross_attn.register_forward_hook(
        lambda module, args, out: seen.append(args[1].media_mask)  # the layer gets the schedule
    )
    try:
        model(batch.input_ids, batch.media)
    finally:
        hook.remove()
    expected = vk.masks.from_image_token_ids(batch.input_ids, tokenizer.image_id)
    assert torch.equal(seen[0], expected)
    # <bos> <image> w1 <image> w2 <image> w3 <eos>: each caption sees only its own image
    by_hand = torch.tensor(
        [[0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]]
    ).bool()
    assert torch.equal(seen[0][0], by_hand)


def test_one_media_schedule_per_model_forward(tokenizer, data, monkeypatch):
    """The decoder builds the media schedule once per forward and hands the same object to every
    cross-attention layer (prefill and each decode step alike)."""
    config = dataclasses.replace(TINY, model_overrides={"cross_attention_every": 1})
    model = build_model(config, tokenizer).eval()
    assert len(model.decoder.cross_layers) >= 2
    builds = []
    original_init = vk.MediaSchedule.__init__

    def counting_init(self, *args, **kwargs):
        builds.append(self)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(vk.MediaSchedule, "__init__", counting_init)
    received = []
    hooks = [
        block.cross_attn.register_forward_hook(lambda module, args, out: received.append(args[1]))
        for block in model.decoder.cross_layers
    ]
    try:
        batch = eval_batch("interleaved", data, tokenizer, 2, interleaved_images=2)
        model(batch.input_ids, batch.media)
        assert len(builds) == 1
        assert len(received) == len(model.decoder.cross_layers)
        assert all(schedule is builds[0] for schedule in received)
        builds.clear()
        prompt = prompt_through_last_image(batch, tokenizer)
        out = generate(model, prompt, batch.media, 3)
        steps = out.shape[1] - prompt.shape[1]
        assert steps >= 1
        assert len(builds) == steps  # one per decode step, whatever the number of layers
    finally:
        for hook in hooks:
            hook.remove()


def test_text_before_the_first_image_passes_unchanged(model, tokenizer, data):
    batch = eval_batch("video", data, tokenizer, 2)  # <bos> video <image> ...
    other = batch.media.flip(0)
    logits, other_logits = model(batch.input_ids, batch.media), model(batch.input_ids, other)
    assert torch.equal(logits[:, :2], other_logits[:, :2])
    assert not torch.allclose(logits[:, 2:], other_logits[:, 2:])


def test_each_caption_comes_from_its_own_image(model, tokenizer, data):
    batch = eval_batch("interleaved", data, tokenizer, 2)  # <bos> <image> w1 <image> w2 <eos>
    changed = batch.media.clone()
    changed[:, 1] = changed.flip(0)[:, 1]  # swap only the second image between the rows
    logits, other = model(batch.input_ids, batch.media), model(batch.input_ids, changed)
    assert torch.equal(logits[:, :3], other[:, :3])  # up to the first caption: unchanged
    assert not torch.allclose(logits[:, 3:], other[:, 3:])


def test_checkpoint_round_trip(model, tokenizer, data, tmp_path):
    save_model(tmp_path, model, tokenizer)
    loaded, loaded_tokenizer = load_model(tmp_path)
    assert loaded_tokenizer.words == tokenizer.words
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    batch = eval_batch("video", data, tokenizer, 3)
    assert torch.equal(model(batch.input_ids, batch.media), loaded(batch.input_ids, batch.media))


def test_resume_continues_the_same_run(tmp_path):
    config = dataclasses.replace(TINY, steps=6, warmup_steps=2)
    uninterrupted = train(config, progress=False)
    train(config, out=tmp_path, stop_after=3, progress=False)
    resumed = train(config, resume=tmp_path, progress=False)
    assert resumed.losses == uninterrupted.losses  # bit for bit, steps 1-3 saved, 4-6 recomputed
    for a, b in zip(resumed.model.parameters(), uninterrupted.model.parameters(), strict=True):
        assert torch.equal(a, b)


def _ddp_worker(rank: int, world: int, store: str, config: TrainConfig, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = train(config, progress=False, device=torch.device("cpu"))
        if rank == 0:
            torch.save(
                {
                    "losses": result.losses,
                    "state": result.model.state_dict(),
                    "evals": result.evals,
                },
                out,
            )
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_match_single_process_training(tmp_path):
    # Each rank prepares only its rows of every batch (TrainSampler rows=) and decodes its share of
    # the held-out rows at step 2 (5 rows: 3 + 2), the counts summed across the ranks.
    config = dataclasses.replace(TINY, steps=4, warmup_steps=2, eval_every=2, eval_examples=5)
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), config, str(out)), nprocs=2)
    ddp = torch.load(out)
    single = train(config, progress=False)
    torch.testing.assert_close(ddp["losses"], single.losses, atol=1e-5, rtol=1e-5)
    assert ddp["evals"] == single.evals and [e["step"] for e in single.evals] == [2]
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_bad_inputs_give_clear_errors(model, tokenizer, data):
    batch = eval_batch("interleaved", data, tokenizer, 2)
    with pytest.raises(ValueError, match=r"one <image> token .* per media item"):
        model(batch.input_ids, batch.media[:, :1])
    with pytest.raises(ValueError, match=r"each image must be \[C, H, W\] = \[1, 8, 8\]"):
        model(batch.input_ids, torch.zeros(2, 2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="batch size"):
        model(batch.input_ids, batch.media[:1])
    with pytest.raises(ValueError, match="media must be"):
        model(batch.input_ids, batch.media[0])
    clip = torch.zeros(2, 1, 9, 1, 8, 8, dtype=torch.uint8)
    ids = batch.input_ids[:, :3]
    with pytest.raises(ValueError, match="max_frames"):
        model(ids[:, :2], clip)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, batch.input_ids, batch.media, 1000)
    with pytest.raises(ValueError, match="image_cache"):
        generate(model, batch.input_ids, batch.media, 2, image_cache="sometimes")


def test_batches_and_targets(tokenizer):
    images = torch.zeros(1, 3, 1, 8, 8, dtype=torch.uint8)
    batch = make_batch("video", images, torch.tensor([[3, 1, 4]]), tokenizer)
    assert tokenizer.decode(batch.input_ids[0]) == "<bos> video <image> three one four <eos>"
    predicted = [tokenizer.words[t] if t >= 0 else "-" for t in batch.targets[0].tolist()]
    assert predicted == ["-", "-", "three", "one", "four", "<eos>", "-"]
    assert batch.media.shape == (1, 1, 3, 1, 8, 8)
    assert tokenizer.decode(tokenizer.encode("<image> seven")) == "<image> seven"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.encode("eleven")


def test_learning_rate_schedule():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 99) == pytest.approx(0.1, abs=1e-3)


def test_presets_and_backend_switch(tokenizer):
    assert preset("tiny").dim < preset("demo").dim
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    model = build_model(TINY, tokenizer)
    model.set_backend("reference")
    assert model.decoder.cross_layers[0].cross_attn.backend == "reference"
    assert model.vision.patch_embed.backend == "reference"
    assert all(a.backend == "reference" for a, _ in model.resampler.layers)


def test_cli_help_explains_every_command(capsys):
    for command in ([], ["train"], ["generate"], ["eval"], ["demo"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--resume",
        "--bf16",
        "--temperature",
        "--top-k",
        "--compare-steps",
        "--cuda-graph",
    ):
        assert flag in text
    assert build_parser().parse_args(["train", "--steps", "3"]).steps == 3


def test_cli_train_generate_eval(tmp_path, capsys):
    out = str(tmp_path / "ckpt")
    common = ["--threads", "1"]
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--out",
                out,
                "--eval-every",
                "0",
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                out,
                "--task",
                "video",
                "--digits",
                "3",
                "1",
                "4",
                "--count",
                "2",
                *common,
            ]
        )
        == 0
    )
    assert main(["eval", "--checkpoint", out, "--examples", "4", *common]) == 0
    captured = capsys.readouterr()
    assert "three one four" in captured.out and "every caption right" in captured.out
    assert main(["generate", "--checkpoint", out, "--cuda-graph", *common]) == 2  # on the CPU
    assert "--cuda-graph needs --device cuda" in capsys.readouterr().err


def test_predict_interleaved_writes_one_caption_per_image(model, tokenizer, data):
    batch = eval_batch("interleaved", data, tokenizer, 3, interleaved_images=3)
    predictions, texts = predict(model, batch, tokenizer)
    assert all(len(p) >= 3 for p in predictions)
    assert len(texts) == 3


def test_bf16_autocast_training_runs():
    config = dataclasses.replace(TINY, steps=3, warmup_steps=1, bf16=True)
    losses = train(config, progress=False).losses
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def _text_decoder_alone(model):
    """The text model alone: a decoder of the same shape without cross-attention blocks, holding
    the model's text weights (so nothing of the image path can reach its logits)."""
    config = dataclasses.replace(model.config, cross_attention_every=model.config.n_layers + 1)
    text = TextDecoder(config)
    result = text.load_state_dict(model.decoder.state_dict(), strict=False)
    assert not result.missing_keys
    assert result.unexpected_keys and all(
        k.startswith("cross_layers.") for k in result.unexpected_keys
    )
    assert not text.cross_layers
    return text.eval()


@pytest.mark.parametrize("empty", ["none", "zero_media"])
def test_text_only_batches_give_the_text_models_logits(model, tokenizer, empty):
    ids = torch.tensor(
        [
            [tokenizer.bos_id, *tokenizer.encode(words)]
            for words in ("video three one", "seven two four")
        ]
    )
    media = None if empty == "none" else torch.zeros(2, 0, 1, 8, 8, dtype=torch.uint8)
    text = _text_decoder_alone(model)
    assert torch.equal(model(ids, media), text(ids, None, None, 0))
    # The gates are open: a cross-attention block run on these tokens would change them.
    assert all(float(b.cross_attn_attn_gate.detach()) != 0 for b in model.decoder.cross_layers)
    for options in (dict(), dict(use_cache=False)):
        out = generate(model, ids, media, 4, **options)
        expected = ids
        for _ in range(out.shape[1] - ids.shape[1]):  # greedy by the text model, no cache
            logits = text(expected, None, None, 0)[:, -1]
            logits[:, [tokenizer.pad_id, tokenizer.bos_id, tokenizer.image_id]] = float("-inf")
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out, expected), options
    static = _generate(
        model,
        ids,
        media,
        4,
        temperature=0.0,
        top_k=None,
        use_cache=True,
        image_cache="kv",
        generator=None,
        decode="static",
    )
    assert torch.equal(static, generate(model, ids, media, 4))


def test_text_only_rejects_image_tokens(model, tokenizer):
    ids = torch.tensor([[tokenizer.bos_id, tokenizer.image_id]])
    with pytest.raises(ValueError, match=r"media is None \(text only\) but the rows hold \[1\]"):
        model(ids, None)
    with pytest.raises(ValueError, match="one <image> token"):
        model(ids, torch.zeros(1, 0, 1, 8, 8, dtype=torch.uint8))


def test_left_padded_prompts_of_different_lengths(model, tokenizer, data):
    pad, bos, image, video = (
        tokenizer.pad_id,
        tokenizer.bos_id,
        tokenizer.image_id,
        tokenizer.ids["video"],
    )
    media = eval_batch("caption", data, tokenizer, 8).media  # (8, 1, 1, 8, 8)
    prompts = [[bos, image] if row % 2 == 0 else [bos, video, image] for row in range(8)]
    ids = torch.tensor([[pad] * (3 - len(p)) + p for p in prompts])
    out = generate(model, ids, media, 3)
    # The rows of one length say different things, so a row put in another's place would show.
    assert len({tuple(row) for row in out[::2, 1:].tolist()}) > 1
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), media[row : row + 1], 3)[0]
        start = 3 - len(prompt)
        assert torch.equal(out[row, :start], torch.full((start,), pad))
        assert torch.equal(out[row, start : start + len(alone)], alone), row
        assert bool((out[row, start + len(alone) :] == pad).all())
    # Text only, too; and the same rows unpadded give the equal-length path's tokens.
    text = torch.tensor([[pad, bos, video], [bos, video, tokenizer.digit_id(3)]])
    text_out = generate(model, text, None, 3)
    assert torch.equal(text_out[1], generate(model, text[1:], None, 3)[0][: text_out.shape[1]])
    with pytest.raises(ValueError, match=r"rows \[0\] .* must be left-padded"):
        generate(model, torch.tensor([[bos, video, pad]]), None, 2)
    with pytest.raises(ValueError, match=r"rows \[1\] of input_ids are all <pad>"):
        generate(model, torch.tensor([[bos, video], [pad, pad]]), None, 2)


def _cli_train(out, *flags):
    tiny = ["--preset", "tiny", "--batch-size", "4", "--warmup-steps", "1", "--eval-every", "0"]
    return main(["train", *tiny, "--threads", "1", "--out", str(out), *flags])


def test_resume_extends_a_run_with_steps_into_its_own_directory(tmp_path, monkeypatch, capsys):
    from model.checkpoint import saved_model_step
    from model.train import saved_train_config

    monkeypatch.chdir(tmp_path)  # where the default --out would land
    run = tmp_path / "run"
    assert _cli_train(run, "--steps", "3") == 0
    before = saved_train_config(run)
    assert main(["train", "--resume", str(run), "--steps", "5", "--eval-every", "2"]) == 0
    assert "trained to step 5" in capsys.readouterr().out
    after = saved_train_config(run)
    assert (after.steps, after.eval_every) == (5, 2)  # the flags given
    assert after.batch_size == before.batch_size == 4  # the saved run's, not the parser default
    assert saved_model_step(run) == 5
    assert not (tmp_path / "model").exists()  # nothing written to the default --out
    # Asking for no more steps than the run has is an error, not a silent no-op.
    assert main(["train", "--resume", str(run), "--steps", "5"]) == 2
    assert "at step 5: steps=5 leaves nothing to train" in capsys.readouterr().err


def test_resume_refuses_a_model_shape_change(tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli_train(run, "--steps", "2") == 0
    capsys.readouterr()
    code = main(
        ["train", "--resume", str(run), "--steps", "4", "--preset", "demo", "--video-frames", "2"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "a resumed run cannot change preset 'tiny' -> 'demo'" in err
    assert "video_frames 3 -> 2" in err and "seed" not in err
    config = dataclasses.replace(TINY, steps=4, seed=5)
    with pytest.raises(ValueError, match=r"seed 0 -> 5 \(the initial weights and the train/test"):
        train(config, resume=run, progress=False)


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import model.checkpoint as checkpoint
    from model.train import Trainer

    config = dataclasses.replace(TINY, steps=4, warmup_steps=1)
    train(config, out=tmp_path, stop_after=2, progress=False)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(saved) == {checkpoint.MODEL_FILE, checkpoint.TRAIN_FILE}
    trainer = Trainer(config, resume=tmp_path)
    trainer.step()

    def fail(fd):
        raise OSError("disk gone mid-write")

    monkeypatch.setattr(checkpoint.os, "fsync", fail)  # the data is written, not yet on disk
    with pytest.raises(OSError, match="disk gone"):
        trainer.save(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved  # no temp file left
    assert train(config, resume=tmp_path, progress=False).losses[:2] == trainer.result.losses[:2]
    # A pair from two steps (a kill between the two renames) is refused by name.
    model, tokenizer = load_model(tmp_path)
    checkpoint.save_model(tmp_path, model, tokenizer, step=3)
    with pytest.raises(ValueError, match="weights are of step 3 but the train state of step 2"):
        Trainer(dataclasses.replace(config, steps=6), resume=tmp_path)


def test_train_sampler_rank_share_is_the_global_batchs_rows(tokenizer, data):
    from model.data import TrainSampler

    whole = TrainSampler(data, tokenizer, seed=3)
    shares = [TrainSampler(data, tokenizer, seed=3) for _ in range(2)]
    for task in TASKS:
        batch = whole.next(task, 8)
        parts = [s.next(task, 8, rows=(4 * r, 4 * r + 4)) for r, s in enumerate(shares)]
        for r, part in enumerate(parts):
            expected = batch.rows(4 * r, 4 * r + 4)
            assert torch.equal(part.media, expected.media), (task, r)
            assert torch.equal(part.input_ids, expected.input_ids), (task, r)
    with pytest.raises(ValueError, match="rows"):
        whole.next("caption", 8, rows=(4, 9))


def test_generate_cli_takes_images_and_frames_from_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli_train(run, "--steps", "1", "--interleaved-images", "3", "--video-frames", "2") == 0
    capsys.readouterr()
    for task, count in (("interleaved", 3), ("video", 2)):
        assert main(["generate", "--checkpoint", str(run), "--task", task, "--count", "2"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 2
        assert all(len(line.split("->")[0].split()) - 2 == count for line in lines), lines


def test_cli_device_errors_are_clear(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the error of a machine without CUDA")
    assert _cli_train(tmp_path, "--steps", "1", "--device", "cuda") == 2
    assert "--device cuda: this machine has no CUDA device" in capsys.readouterr().err
    assert _cli_train(tmp_path, "--steps", "1", "--device", "gpu0") == 2
    assert "--device 'gpu0' is not a device" in capsys.readouterr().err
