"""Command line: train, generate, eval, demo, recipes."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from model.config import CONNECTORS, FUSIONS, PRESETS, TrainConfig
from model.data import TASKS

BACKEND_CHOICES = ("auto", "reference", "cpu", "triton", "cuda", "cuda_sim")
DEFAULT_OUT = "model/out/checkpoint"
# TrainConfig fields that are not set from a flag of the same name (the rest are).
_FLAG_FIELDS = {
    "no_augment": "augment",
    "fusion": "model_overrides",
    "connector": "model_overrides",
    "vision2_patch_size": "model_overrides",
}
# train's model-variant flags (the recipes' models), set in TrainConfig.model_overrides when not the
# default.
_MODEL_FLAGS = {"fusion": "cross_attention", "connector": "linear", "vision2_patch_size": 0}


def _backend(value: str) -> str | None:
    return None if value == "auto" else value


def resolve_device(value: str | None) -> torch.device:
    """--device: None means cuda when this machine has one, else cpu. Under torchrun, a bare "cuda"
    is this process's GPU (LOCAL_RANK)."""
    if value is None:
        value = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise ValueError(f"--device {value!r} is not a device: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {value}: this machine has no CUDA device")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: this model's ops are too small to gain from more, and on "
        "a 2-core machine with anything else running a second thread made a step 10x slower)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="vlm_kernels backend of the model's ops: auto picks the fastest kernel for the tensors' "
        "device (VLMK_BACKEND overrides auto); reference is the plain-PyTorch spec",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="where the model runs: cpu, cuda or cuda:N (default: cuda when available, else cpu; "
        "under torchrun each rank takes its LOCAL_RANK's GPU)",
    )


def _add_train_options(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    d = defaults
    parser.add_argument("--preset", choices=sorted(PRESETS), default=d.preset, help="model size")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="sequences per task per step, global over all ranks (each step takes one batch of "
        "every task)",
    )
    parser.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=list(d.tasks), help="tasks to train on"
    )
    parser.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    parser.add_argument(
        "--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr as a fraction of --lr"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup before the cosine"
    )
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay")
    parser.add_argument(
        "--grad-clip", type=float, default=d.grad_clip, help="max global gradient norm"
    )
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of weights, split and data")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="held-out accuracy every N steps (0: never during training)",
    )
    parser.add_argument(
        "--eval-examples",
        type=int,
        default=d.eval_examples,
        help="held-out sequences per task in the periodic evaluation",
    )
    parser.add_argument(
        "--no-augment", action="store_true", help="no random one-pixel shifts of training images"
    )
    parser.add_argument(
        "--interleaved-images",
        type=int,
        default=d.interleaved_images,
        help="images per interleaved sequence",
    )
    parser.add_argument(
        "--video-frames", type=int, default=d.video_frames, help="frames (digits) per video clip"
    )


def _train_config(args) -> TrainConfig:
    return TrainConfig(
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        tasks=tuple(args.tasks),
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        bf16=args.bf16,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_examples=args.eval_examples,
        augment=not args.no_augment,
        interleaved_images=args.interleaved_images,
        video_frames=args.video_frames,
        backend=_backend(args.backend),
        checkpoint_every=getattr(args, "checkpoint_every", 0),
        model_overrides={
            name: getattr(args, name)
            for name, default in _MODEL_FLAGS.items()
            if getattr(args, name, default) != default
        },
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model",
        description="A thin Llama-3.2-Vision-style VLM on vlm_kernels, trained on scikit-learn's "
        "8x8 digits: captioning, interleaved captions, and 3-frame video through a Perceiver "
        "resampler.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = TrainConfig()

    train = commands.add_parser(
        "train",
        help="train (single process, or DDP under torchrun)",
        description="Train the model. Multi-process: torchrun --nproc_per_node=2 -m model train ... "
        "(gloo on CPU, nccl on GPU).",
    )
    _add_train_options(train, defaults)
    _add_common(train)
    train.add_argument(
        "--out",
        default=None,
        help="checkpoint directory (model.safetensors + train_state.safetensors); default "
        f"{DEFAULT_OUT}, or with --resume the resumed run's directory",
    )
    train.add_argument(
        "--fusion",
        choices=FUSIONS,
        default="cross_attention",
        help="how the image tokens reach the decoder: gated cross-attention blocks (Llama 3.2 "
        "Vision) or unified (LLaVA: spliced into the decoder's input in place of each <image> "
        "token, no cross-attention blocks); generate and eval read it from the checkpoint",
    )
    train.add_argument(
        "--connector",
        choices=CONNECTORS,
        default="linear",
        help="after the vk.concat_project projector: nothing (linear) or GELU + Linear (mlp, "
        "LLaVA-1.5's 2-layer connector)",
    )
    train.add_argument(
        "--vision2-patch-size",
        type=int,
        default=0,
        help="add a second vision encoder of this patch size (width 32) whose features the one "
        "projector concatenates with the first's (0: one encoder)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="also save every N steps (0: only at the end)",
    )
    train.add_argument(
        "--resume",
        default=None,
        help="checkpoint directory of a run to continue: its saved settings, overridden by the "
        "flags given here (--steps above the saved step extends the run; the eval/checkpoint "
        "cadence, lr schedule, batch size and tasks may change; --preset, --video-frames, --seed "
        "and the model flags --fusion, --connector, --vision2-patch-size may not). Unchanged, the losses continue exactly as if it had not stopped",
    )

    generate = commands.add_parser(
        "generate",
        help="caption held-out images with a trained checkpoint",
        description="Generate captions for held-out test images (or for chosen digits).",
    )
    generate.add_argument("--checkpoint", default="model/out/checkpoint", help="checkpoint dir")
    generate.add_argument("--task", choices=TASKS, default="caption", help="which task's prompt")
    generate.add_argument("--count", type=int, default=4, help="how many sequences")
    generate.add_argument(
        "--digits",
        type=int,
        nargs="+",
        default=None,
        help="use test images of these digits (one per image of the sequence, e.g. 3 1 4 for a "
        "video) instead of random ones",
    )
    generate.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0: greedy; > 0: sampling at that temperature",
    )
    generate.add_argument("--top-k", type=int, default=None, help="sample among the k best tokens")
    generate.add_argument(
        "--seed", type=int, default=0, help="seed of the image choice and sampling"
    )
    generate.add_argument(
        "--no-cache", action="store_true", help="recompute everything each step (no KV/image cache)"
    )
    generate.add_argument(
        "--cuda-graph",
        action="store_true",
        help="decode each token after the first three by replaying one decode step captured in a "
        "CUDA graph (needs --device cuda and the caches)",
    )
    _add_common(generate)

    evaluate = commands.add_parser(
        "eval",
        help="held-out accuracy of a checkpoint",
        description="Held-out accuracy per task by generation (every caption of a sequence right).",
    )
    evaluate.add_argument("--checkpoint", default="model/out/checkpoint", help="checkpoint dir")
    evaluate.add_argument(
        "--examples", type=int, default=500, help="sequences per task (caption: up to the test set)"
    )
    evaluate.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    _add_common(evaluate)

    demo = commands.add_parser(
        "demo",
        help="train on the three tasks in minutes and report accuracy, kernels vs reference, and "
        "decode speed with/without the image cache",
        description="Trains the demo preset on the three tasks (a few minutes on 2 CPU cores), "
        "reports held-out accuracy per task against the targets, prints decoded examples, writes a "
        "PNG grid of test images with their generated captions and a PNG loss curve, compares a "
        "training step on the auto backend with backend='reference', and measures decode "
        "tokens/s with and without the image key/value cache.",
    )
    _add_train_options(demo, defaults)
    _add_common(demo)
    demo.add_argument("--out", default="model/out", help="directory for PNGs and the checkpoint")
    demo.add_argument(
        "--compare-steps",
        type=int,
        default=50,
        help="training steps of the auto-vs-reference backend comparison (0: skip)",
    )
    demo.add_argument(
        "--eval-count",
        type=int,
        default=500,
        help="held-out sequences per task in the final report",
    )
    from model.recipes import RECIPES

    recipes = commands.add_parser(
        "recipes",
        help="train the other VLM recipes (LLaVA unified embedding, CLIP pre-training, Llama 3.2 "
        "staged training with the LM frozen, two concatenated vision encoders) and compare them",
        description="Trains each recipe on the demo's tasks with the same steps and batches and "
        "prints one comparison table: held-out accuracy per task, steps to the demo's targets, "
        "train time, step time, tokens through every decoder layer, trainable parameters. "
        "Recipes: "
        + "; ".join(f"{name}: {what}" for name, what in RECIPES.items())
        + ". Default: 800 fusion steps each (about 2 minutes a recipe on 2 CPU cores); --quick: a "
        "short look (100 steps).",
    )
    _add_train_options(recipes, defaults)
    _add_common(recipes)
    recipes.set_defaults(eval_every=100)
    recipes.add_argument(
        "--recipe",
        action="append",
        choices=list(RECIPES),
        default=None,
        help="a recipe to run (repeat for several; default: all, in the order listed)",
    )
    recipes.add_argument(
        "--quick",
        action="store_true",
        help=f"short runs: {QUICK['steps']} fusion steps ({QUICK['warmup_steps']} of warmup), "
        f"{QUICK['text_steps']} text-stage and "
        f"{QUICK['clip_steps']} CLIP steps, evaluation every {QUICK['eval_every']} steps, "
        f"{QUICK['eval_count']} final held-out sequences per task (flags given explicitly win)",
    )
    recipes.add_argument(
        "--text-steps", type=int, default=300, help="steps of the staged recipe's text-only stage"
    )
    recipes.add_argument(
        "--clip-steps", type=int, default=300, help="contrastive pre-training steps (clip recipe)"
    )
    recipes.add_argument(
        "--eval-count", type=int, default=500, help="held-out sequences per task in the table"
    )
    recipes.add_argument(
        "--out", default="model/out/recipes", help="directory for recipes.json and recipes.md"
    )
    return parser


# --quick's settings of the recipes command.
QUICK = {
    "steps": 100,
    "warmup_steps": 10,
    "text_steps": 100,
    "clip_steps": 150,
    "eval_every": 25,
    "eval_count": 200,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        args.device = resolve_device(args.device)
        if args.command == "train":
            return _train(args, argv)
        if args.command == "generate":
            return _generate(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "recipes":
            return _recipes(args, argv)
        from model.demo import run_demo

        return run_demo(args, _train_config(args))
    except ValueError as error:
        # Bad arguments found past the parser (a device, a resume that cannot be): say so, exit 2.
        print(f"error: {error}", file=sys.stderr)
        return 2


def given_options(argv: list[str]) -> set[str]:
    """The dests of the options ``argv`` sets explicitly (parsed again with every default
    suppressed, so abbreviations and --flag=value count as argparse counts them)."""
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices[argv[0]]._actions:
        action.default = argparse.SUPPRESS
    namespace = parser.parse_args(argv)
    return set(vars(namespace)) - {"command"}


def _train(args, argv: list[str]) -> int:
    import dataclasses

    from model.train import init_distributed_from_env, saved_train_config, train

    init_distributed_from_env(args.device)
    if args.resume:
        # The saved run's settings, with what this command line says explicitly on top.
        fresh = dataclasses.asdict(_train_config(args))
        names = {_FLAG_FIELDS.get(dest, dest) for dest in given_options(argv)} & set(fresh)
        config = dataclasses.replace(
            saved_train_config(args.resume),
            **{name: fresh[name] for name in names},
            backend=_backend(args.backend),
        )
        out = args.out or args.resume
    else:
        config = _train_config(args)
        out = args.out or DEFAULT_OUT
    result = train(config, out=out, resume=args.resume, device=args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"trained to step {len(result.losses)} in {result.seconds:.1f} s; final loss "
            f"{result.losses[-1]:.4f}; checkpoint in {out}"
        )
    return 0


def _generate(args) -> int:
    from model.checkpoint import load_model
    from model.data import Digits, items_per_sequence, make_batch
    from model.evaluate import predict

    device = args.device
    if args.cuda_graph and (device.type != "cuda" or args.no_cache):
        print("--cuda-graph needs --device cuda and the caches (no --no-cache)", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.checkpoint, device, backend=_backend(args.backend))
    config = model.config
    run = _saved_run(args.checkpoint, config.max_frames)
    data = Digits(seed=run.seed)
    generator = torch.Generator().manual_seed(args.seed)
    # Images per sequence and frames per clip as the checkpoint's run trained them.
    per_sequence = items_per_sequence(args.task, run.interleaved_images, run.video_frames)
    if args.digits is not None:
        per_sequence = len(args.digits)
        pools = [torch.nonzero(data.test_labels == d)[:, 0] for d in args.digits]
        if any(len(pool) == 0 for pool in pools):
            print(f"no test image of some digit in {args.digits}", file=sys.stderr)
            return 2
        index = torch.stack(
            [pool[torch.randint(len(pool), (args.count,), generator=generator)] for pool in pools],
            dim=1,
        )
    else:
        index = torch.randint(
            len(data.test_labels), (args.count, per_sequence), generator=generator
        )
    if args.task == "caption" and per_sequence != 1:
        print("caption takes one image: give one --digits value", file=sys.stderr)
        return 2
    if args.task == "video" and per_sequence > config.max_frames:
        print(f"the model takes clips of at most {config.max_frames} frames", file=sys.stderr)
        return 2
    images = data.test_images[index.flatten()].view(*index.shape, *data.test_images.shape[1:])
    batch = make_batch(args.task, images, data.test_labels[index], tokenizer).to(device)
    # Sampling draws on the logits' device (on the CPU: the stream the images were drawn from).
    sampling = generator if device.type == "cpu" else torch.Generator(device).manual_seed(args.seed)
    _, texts = predict(
        model,
        batch,
        tokenizer,
        temperature=args.temperature,
        top_k=args.top_k,
        use_cache=not args.no_cache,
        generator=sampling,
        cuda_graph=args.cuda_graph,
    )
    from model.data import caption_words

    for digits, text in zip(batch.digits.tolist(), texts, strict=True):
        print(f"images of {caption_words(digits):<24} -> {text}")
    return 0


def _saved_run(checkpoint: str, max_frames: int) -> TrainConfig:
    """The TrainConfig of the checkpoint's run: its data split seed, images per interleaved sequence
    and frames per clip. A bare model checkpoint (no train state) has only the model's max_frames:
    clips of that many frames, the other settings TrainConfig's defaults."""
    from model.train import saved_train_config

    try:
        return saved_train_config(checkpoint)
    except FileNotFoundError:
        return TrainConfig(video_frames=max_frames)


def _eval(args) -> int:
    from model.checkpoint import load_model
    from model.data import Digits
    from model.train import evaluate_tasks

    model, tokenizer = load_model(args.checkpoint, args.device, backend=_backend(args.backend))
    try:
        from model.train import saved_train_config

        config = saved_train_config(args.checkpoint)
    except FileNotFoundError:
        config = TrainConfig()
    config.tasks = tuple(args.tasks)
    results = evaluate_tasks(
        model, tokenizer, Digits(seed=config.seed), config, args.examples, args.device
    )
    for task, scores in results.items():
        print(
            f"{task:<12} every caption right {scores['sequence']:.1%}   per caption "
            f"{scores['digit']:.1%}"
        )
    return 0


def _recipes(args, argv: list[str]) -> int:
    import dataclasses
    from pathlib import Path

    from model.clip import ContrastiveConfig
    from model.recipes import RECIPES, run_recipes

    if args.quick:
        given = given_options(argv)
        for name, value in QUICK.items():
            if name not in given:
                setattr(args, name, value)
    config = _train_config(args)
    run_recipes(
        args.recipe or list(RECIPES),
        config,
        eval_count=args.eval_count,
        text_steps=args.text_steps,
        contrastive=dataclasses.replace(
            ContrastiveConfig(), steps=args.clip_steps, seed=config.seed
        ),
        device=args.device,
        out=Path(args.out),
    )
    return 0
