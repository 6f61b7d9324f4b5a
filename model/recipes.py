"""`python -m model recipes`: the seeds' VLM recipes on the same kernels, data and training loop, in one
comparison table (held-out accuracy per task, steps to the demo's targets, train time, step time,
tokens through every decoder layer, trainable parameters).

    cross_attention  Llama 3.2 Vision / Flamingo: gated cross-attention blocks read the image tokens
                     (the demo's model)
    unified          LLaVA: the projected image tokens replace each <image> token in the decoder's
                     input; no cross-attention blocks
    unified_mlp      LLaVA-1.5: the same with a 2-layer MLP connector after vk.concat_project
    staged           Llama 3.2 Vision's staged training: a text-only stage, then the fusion stage
                     with every text-model parameter frozen (text-only logits checked bit-identical)
    multi_encoder    two ViTs (patch 4 width 64, patch 2 width 32) concatenated channel-wise by one
                     vk.concat_project projector (the MoE-encoder seed)
    clip             CLIP pre-training of the vision encoder against a small text encoder (zero-shot
                     accuracy), then the cross-attention fusion from that encoder

Every recipe trains the same steps on the same batches (seed) as ``cross_attention``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.clip import ContrastiveConfig, load_pretrained_vision, train_contrastive
from model.config import TrainConfig
from model.data import Digits, eval_batch
from model.demo import TARGETS
from model.staged import freeze_text_model, text_batch, train_text_stage, trainable_parameters
from model.tokenizer import Tokenizer
from model.train import build_model, evaluate_tasks, train

RECIPES = {
    "cross_attention": "gated cross-attention (Llama 3.2 Vision; the demo's model)",
    "unified": "unified embedding (LLaVA), linear projector",
    "unified_mlp": "unified embedding (LLaVA-1.5), MLP connector",
    "staged": "text-only stage, then fusion with the LM frozen (Llama 3.2)",
    "multi_encoder": "two vision encoders concatenated by one concat_project",
    "clip": "CLIP-pre-trained vision encoder, then cross-attention fusion",
}
# TrainConfig.model_overrides of each recipe that is a model variant.
MODEL_OVERRIDES = {
    "cross_attention": {},
    "unified": {"fusion": "unified"},
    "unified_mlp": {"fusion": "unified", "connector": "mlp"},
    "staged": {},
    "multi_encoder": {"vision2_patch_size": 2, "vision2_dim": 32},
    "clip": {},
}


@dataclass
class RecipeRow:
    recipe: str
    accuracy: dict[str, float]  # task -> held-out sequence accuracy (every caption right)
    steps: int
    # the first evaluation where every task met TARGETS (None: none did)
    steps_to_targets: int | None
    train_seconds: float  # the steps of every stage of the recipe (periodic evals excluded)
    step_ms: float  # median fusion-stage step
    decoder_tokens: dict[str, int]  # task -> tokens per sequence through every decoder layer
    trainable_parameters: int  # in the fusion stage
    notes: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)  # {"step": s, task: accuracy}, the final last


def _steps_to_targets(evals: list[dict]) -> int | None:
    for entry in evals:
        if all(entry.get(task, 0.0) >= target for task, target in TARGETS.items() if task in entry):
            return entry["step"]
    return None


def run_recipe(
    name: str,
    config: TrainConfig,
    *,
    eval_count: int,
    text_steps: int,
    contrastive: ContrastiveConfig,
    device: torch.device,
    progress: bool = False,
) -> RecipeRow:
    """Trains recipe ``name`` (one of RECIPES) with ``config`` and measures its row."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {list(RECIPES)}")
    tokenizer = Tokenizer.for_tasks()
    config = dataclasses.replace(config, model_overrides=MODEL_OVERRIDES[name])
    notes: dict = {}
    seconds = 0.0
    model = None
    if name == "staged":
        model = build_model(config, tokenizer).to(device)
        text = train_text_stage(model, tokenizer, config, text_steps, device=device)
        seconds += text.seconds
        frozen = freeze_text_model(model)
        check_ids, _ = text_batch(tokenizer, 64, torch.Generator().manual_seed(99))
        check_ids = check_ids.to(device)
        with torch.no_grad():
            before = model.eval()(check_ids, None)
        notes.update(
            text_stage_steps=text_steps,
            text_stage_seconds=round(text.seconds, 1),
            text_stage_final_loss=round(text.losses[-1], 4),
            frozen_text_parameters=sum(
                p.numel() for n, p in model.named_parameters() if n in frozen
            ),
        )
    elif name == "clip":
        pretrained = train_contrastive(
            build_model(config, tokenizer).config, tokenizer, contrastive, device=device
        )
        seconds += pretrained.seconds
        model = build_model(config, tokenizer).to(device)
        load_pretrained_vision(model, pretrained.model)
        notes.update(
            clip_steps=contrastive.steps,
            clip_seconds=round(pretrained.seconds, 1),
            zero_shot_test_accuracy=round(pretrained.zero_shot, 4),
            clip_final_temperature=round(math.exp(-pretrained.logit_scales[-1]), 4),
        )
    result = train(config, device=device, model=model, progress=progress)
    seconds += sum(result.step_seconds)
    model = result.model.eval()
    if name == "staged":
        with torch.no_grad():
            after = model(check_ids, None)
        notes["text_only_logits_bit_identical"] = bool(torch.equal(before, after))
    data = Digits(seed=config.seed)
    scores = evaluate_tasks(model, tokenizer, data, config, eval_count, device)
    accuracy = {task: s["sequence"] for task, s in scores.items()}
    evals = [*result.evals, {"step": config.steps, **accuracy}]
    tokens = {}
    for task in config.tasks:
        batch = eval_batch(
            task,
            data,
            tokenizer,
            1,
            interleaved_images=config.interleaved_images,
            video_frames=config.video_frames,
        )
        tokens[task] = model.decoder_tokens(batch.input_ids, batch.media)
    notes["projector_sources"] = list(model.vision.feature_dims)
    notes["image_tokens_per_image"] = (model.config.image_size // model.config.patch_size) ** 2 + 1
    notes["image_tokens_per_clip"] = model.config.num_latents
    return RecipeRow(
        recipe=name,
        accuracy=accuracy,
        steps=config.steps,
        steps_to_targets=_steps_to_targets(evals),
        train_seconds=seconds,
        step_ms=1000 * statistics.median(result.step_seconds),
        decoder_tokens=tokens,
        trainable_parameters=trainable_parameters(model),
        notes=notes,
        evals=evals,
    )


def run_recipes(
    names: list[str],
    config: TrainConfig,
    *,
    eval_count: int,
    text_steps: int,
    contrastive: ContrastiveConfig,
    device: torch.device,
    out: Path | None = None,
    progress: bool = True,
) -> list[RecipeRow]:
    """Runs each recipe of ``names`` in turn, prints one line per recipe and then the comparison
    table; with ``out``, writes recipes.json (the rows) and recipes.md (the table) there."""
    rows = []
    for name in names:
        print(f"\nrecipe {name}: {RECIPES[name]}", flush=True)
        row = run_recipe(
            name,
            config,
            eval_count=eval_count,
            text_steps=text_steps,
            contrastive=contrastive,
            device=device,
            progress=progress,
        )
        rows.append(row)
        print(
            f"  {name}: "
            + ", ".join(f"{task} {acc:.1%}" for task, acc in row.accuracy.items())
            + f"; {row.train_seconds:.0f} s of training, {row.step_ms:.0f} ms/step",
            flush=True,
        )
    table = format_table(rows, config, eval_count)
    print("\n" + table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipes.json").write_text(
            json.dumps([dataclasses.asdict(row) for row in rows], indent=2)
        )
        (out / "recipes.md").write_text(table + "\n")
        print(f"wrote {out / 'recipes.json'} and {out / 'recipes.md'}")
    return rows


def _note(row: RecipeRow) -> str:
    n = row.notes
    if row.recipe == "staged":
        same = "yes" if n["text_only_logits_bit_identical"] else "NO"
        return (
            f"text stage {n['text_stage_steps']} steps ({n['text_stage_seconds']} s); LM frozen "
            f"({n['frozen_text_parameters']:,} params, requires_grad=False); text-only logits "
            f"bit-identical after fusion: {same}"
        )
    if row.recipe == "clip":
        return (
            f"CLIP {n['clip_steps']} steps ({n['clip_seconds']} s): zero-shot "
            f"{n['zero_shot_test_accuracy']:.1%} on the test split, temperature "
            f"{n['clip_final_temperature']}"
        )
    sources = f"concat_project over {len(n['projector_sources'])} sources {n['projector_sources']}"
    if row.recipe == "multi_encoder":
        return f"two ViTs (patch 4 / patch 2 pooled to 2x2); {sources}"
    if row.recipe.startswith("unified"):
        connector = "+ GELU + Linear" if row.recipe == "unified_mlp" else "alone"
        return (
            f"no cross-attention; {n['image_tokens_per_image']} tokens per image, "
            f"{n['image_tokens_per_clip']} per clip spliced in; {sources} {connector}"
        )
    return (
        f"{n['image_tokens_per_image']} tokens per image, {n['image_tokens_per_clip']} per clip "
        f"as cross-attention keys/values; {sources}"
    )


def format_table(rows: list[RecipeRow], config: TrainConfig, eval_count: int) -> str:
    """The rows as a markdown table (accuracy: held-out, every caption of a sequence right)."""
    tasks = list(config.tasks)
    target = " / ".join(f"{TARGETS[t]:.0%}" for t in tasks if t in TARGETS)
    header = [
        "recipe",
        *tasks,
        f"steps to {target}",
        "train s",
        "ms/step",
        f"decoder tokens ({' / '.join(tasks)})",
        "trainable params",
        "notes",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        reached = "-" if row.steps_to_targets is None else str(row.steps_to_targets)
        cells = [
            f"`{row.recipe}`",
            *(f"{row.accuracy[t]:.1%}" for t in tasks),
            reached,
            f"{row.train_seconds:.0f}",
            f"{row.step_ms:.0f}",
            " / ".join(str(row.decoder_tokens[t]) for t in tasks),
            f"{row.trainable_parameters:,}",
            _note(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"{config.steps} fusion steps of {config.batch_size} sequences per task for every recipe "
        f"(same seed and batches); accuracy on {eval_count} held-out sequences per task; steps to "
        f"targets: the first evaluation (every {config.eval_every} steps on {config.eval_examples} "
        f"sequences per task, and the final one) where every task met the demo's target ('-': "
        "none did); train s: the steps of every stage, evaluations "
        "excluded; decoder tokens: per sequence, through every decoder layer."
    )
    return "\n".join(lines)
