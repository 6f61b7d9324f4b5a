"""`python -m model demo`: train on the three tasks, then report held-out accuracy, decoded examples,
a PNG grid of test images with their generated captions, a PNG loss curve, the auto-vs-reference
backend check and decode tokens/s with and without the image key/value cache."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import vlm_kernels as vk
from model.config import TrainConfig
from model.data import TASKS, Batch, Digits, caption_words, eval_batch
from model.evaluate import predict
from model.train import Trainer, TrainResult, train
from model.vlm import VisionLanguageModel, generate

TARGETS = {"caption": 0.95, "interleaved": 0.90, "video": 0.85}
OPS = ("patch_embed", "concat_project", "image_text_attention", "perceiver_attention")
# Losses of the auto and reference backends over the comparison steps: the kernels reassociate fp32
# sums (blocked softmax, split GEMMs), ~1e-6 relative per op, and 50 AdamW steps amplify that a little.
LOSS_TOLERANCE = 2e-3
DECODE_BATCH = 256  # prompts decoded together in the decode-speed measurement


def auto_backends() -> dict[str, str]:
    """The backend "auto" gives each op for CPU tensors here: its C++ kernel when it has one, the
    extension is built and the kernel runs on this CPU (the attention kernels need AVX-512), else the
    reference (VLMK_BACKEND, when set, overrides)."""
    from vlm_kernels.ops._registry import TABLES

    available = vk.available_backends()
    return {
        op: "cpu"
        if "cpu" in vk.op_backends(op)
        and available["cpu"]
        and TABLES[op].usable.get("cpu", lambda: True)()
        else "reference"
        for op in OPS
    }


def run_demo(args, config: TrainConfig) -> int:
    """Runs the demo on ``args.device`` (a torch.device; every batch is moved there) and writes its
    report to ``args.out``; 0 when every task meets its accuracy target."""
    began = time.perf_counter()
    device = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; ops on auto"
        f" for CPU tensors: {auto_backends()}"
    )
    print(
        f"training the {config.preset!r} model on {', '.join(config.tasks)} for {config.steps} steps "
        f"of {config.batch_size} sequences per task"
    )
    result = train(config, out=out / "checkpoint", device=device)
    model, tokenizer = result.model.eval(), result.tokenizer
    print(f"trained in {result.seconds:.1f} s ({1000 * result.seconds / config.steps:.0f} ms/step)")

    data = Digits(seed=config.seed)
    batches, texts, scores = {}, {}, {}
    print(
        f"\nheld-out accuracy (generated, every caption of a sequence right), {args.eval_count} per task:"
    )
    for task in config.tasks:
        batch = eval_batch(
            task,
            data,
            tokenizer,
            args.eval_count,
            interleaved_images=config.interleaved_images,
            video_frames=config.video_frames,
        )
        predictions, texts[task] = predict(model, batch.to(device), tokenizer)
        right = [p == t for p, t in zip(predictions, batch.digits.tolist(), strict=True)]
        scores[task] = sum(right) / len(right)
        batches[task] = (batch, right)
        verdict = "meets" if scores[task] >= TARGETS[task] else "MISSES"
        print(
            f"  {task:<12} {scores[task]:6.1%} of {len(right)}  (target {TARGETS[task]:.0%}: {verdict})"
        )
    print("\nexamples (images of -> generated):")
    for task in config.tasks:
        batch, right = batches[task]
        for row in range(3):
            mark = "ok " if right[row] else "BAD"
            print(
                f"  {mark} {task:<12} {caption_words(batch.digits[row]):<22} -> {texts[task][row]}"
            )

    result.evals.append({"step": config.steps, **scores})
    grid_path = plot_examples(out / "examples.png", batches, texts)
    curve_path = plot_loss(out / "loss.png", result)
    print(f"\nwrote {grid_path} and {curve_path}; checkpoint in {out / 'checkpoint'}")

    report = {
        "train_seconds": result.seconds,
        "steps": config.steps,
        "accuracy": scores,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "auto_backends": auto_backends(),
    }
    if args.compare_steps:
        report["backend_check"] = compare_backends(config, args.compare_steps, device)
    report["decode"] = decode_speed(model, tokenizer, data, config, device)
    report["demo_seconds"] = time.perf_counter() - began
    print(f"\ndemo wall time {report['demo_seconds']:.0f} s")
    (out / "demo_results.json").write_text(json.dumps(report, indent=2))
    return 0 if all(scores[t] >= TARGETS[t] for t in scores) else 1


def _synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a timer on CUDA would otherwise read launch time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_backends(config: TrainConfig, steps: int, device: torch.device) -> dict:
    """The same run (seed, data, model) for ``steps`` steps on backend auto and on "reference", one
    step of each in turn (so load on the machine hits both alike): per-step losses and median step times."""
    print(f"\nbackend check: {steps} training steps, auto vs reference, alternating")
    trainers = {
        name: Trainer(
            dataclasses.replace(config, steps=steps, eval_every=0, backend=backend), device=device
        )
        for name, backend in (("auto", None), ("reference", "reference"))
    }
    times = {name: [] for name in trainers}
    order = list(trainers)
    for _ in range(steps):
        for name in order:
            start = time.perf_counter()
            trainers[name].step()  # (ends in a host sync: it reads the loss back)
            times[name].append(time.perf_counter() - start)
        order.reverse()  # neither backend always goes first
    auto, ref = (trainers[name].result.losses for name in ("auto", "reference"))
    max_diff = max(abs(a - b) for a, b in zip(auto, ref, strict=True))
    median = {name: statistics.median(t[1:]) for name, t in times.items()}
    ratio = median["reference"] / median["auto"]
    agree = max_diff <= LOSS_TOLERANCE
    print(
        f"  losses agree within {max_diff:.2e} over {steps} steps (tolerance {LOSS_TOLERANCE:g}: "
        f"{'ok' if agree else 'DISAGREE'}); final loss auto {auto[-1]:.4f}, reference {ref[-1]:.4f}"
    )
    print(
        f"  median step: auto {1000 * median['auto']:.1f} ms, reference "
        f"{1000 * median['reference']:.1f} ms -> auto is {ratio:.2f}x the reference's speed"
    )
    return {
        "steps": steps,
        "max_loss_diff": max_diff,
        "tolerance": LOSS_TOLERANCE,
        "agree": agree,
        "auto_median_step_s": median["auto"],
        "reference_median_step_s": median["reference"],
        "speedup": ratio,
    }


@torch.no_grad()
def decode_speed(
    model: VisionLanguageModel,
    tokenizer,
    data: Digits,
    config: TrainConfig,
    device: torch.device,
) -> dict:
    """Batched greedy decoding of video captions with the image keys/values cached ("kv"), with only
    the image states cached and the k/v projections recomputed every step ("states"), and with the
    vision tower and the k/v recomputed every step ("none"); the self-attention KV cache is on in all
    three. tokens/s end to end (prefill included) and of the decode phase alone (the tokens after the
    first, timed as generate(n) - generate(1)); medians of 9."""
    task = "video" if "video" in config.tasks else config.tasks[0]
    batch = eval_batch(
        task,
        data,
        tokenizer,
        DECODE_BATCH,
        interleaved_images=config.interleaved_images,
        video_frames=config.video_frames,
    ).to(device)
    prompt = batch.input_ids[:, : batch.prompt_length()]
    new_tokens = batch.digits.shape[1] + 1

    modes = ("kv", "states", "none")
    times = {(mode, count): [] for mode in modes for count in (1, new_tokens)}
    tokens = {}
    for _ in range(9):  # round robin over the cases, so load on the machine hits them alike
        for mode, count in times:
            _synchronize(device)
            start = time.perf_counter()
            out = generate(model, prompt, batch.media, count, image_cache=mode)
            _synchronize(device)
            times[mode, count].append(time.perf_counter() - start)
            tokens[mode, count] = int((out[:, prompt.shape[1] :] != tokenizer.pad_id).sum())
    results = {}
    for mode in modes:
        full_s = statistics.median(times[mode, new_tokens])
        first_s = statistics.median(times[mode, 1])
        results[mode] = {
            "end_to_end_tokens_per_s": tokens[mode, new_tokens] / full_s,
            "decode_tokens_per_s": (tokens[mode, new_tokens] - tokens[mode, 1])
            / (full_s - first_s),
        }
    print(f"\ndecode ({task}, batch {prompt.shape[0]}, {new_tokens} new tokens, greedy), tokens/s:")
    print(f"  {'image cache':<34} {'decode phase':>12} {'end to end':>11}")
    names = {
        "kv": "image k/v cached (default)",
        "states": "k/v projections recomputed",
        "none": "vision + k/v recomputed",
    }
    for mode, name in names.items():
        r = results[mode]
        decode_ratio = results["kv"]["decode_tokens_per_s"] / r["decode_tokens_per_s"]
        e2e_ratio = results["kv"]["end_to_end_tokens_per_s"] / r["end_to_end_tokens_per_s"]
        note = "" if mode == "kv" else f"   (cache: {decode_ratio:.2f}x / {e2e_ratio:.2f}x)"
        print(
            f"  {name:<34} {r['decode_tokens_per_s']:12.0f} {r['end_to_end_tokens_per_s']:11.0f}"
            + note
        )
    return {"task": task, "batch": prompt.shape[0], "new_tokens": new_tokens, **results}


def plot_examples(path: Path, batches: dict[str, tuple[Batch, list[bool]]], texts) -> Path:
    """Test images with their generated captions: 16 captioned digits, then 4 interleaved pairs and
    4 video clips (green: right, red: wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []  # (list of images [8, 8], title, right)
    for task, count in (("caption", 16), ("interleaved", 4), ("video", 4)):
        if task not in batches:
            continue
        batch, right = batches[task]
        for row in range(min(count, batch.digits.shape[0])):
            frames = batch.media[row].reshape(-1, *batch.media.shape[-2:])
            rows.append((task, frames, texts[task][row].replace(" <eos>", ""), right[row]))
    columns = 8
    figure = plt.figure(figsize=(2 * columns, 2.3 * ((len(rows) + columns - 1) // columns)))
    for i, (task, frames, text, right) in enumerate(rows):
        axis = figure.add_subplot((len(rows) + columns - 1) // columns, columns, i + 1)
        strip = torch.cat([torch.nn.functional.pad(f, (0, 1), value=255) for f in frames], dim=1)
        axis.imshow(strip[:, :-1].numpy(), cmap="gray_r", vmin=0, vmax=255)
        axis.set_title(f"{task}\n{text}", color="green" if right else "red", fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def plot_loss(path: Path, result: TrainResult) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = torch.tensor(result.losses)
    steps = torch.arange(1, len(losses) + 1)
    window = max(1, len(losses) // 50)
    smooth = torch.nn.functional.avg_pool1d(
        losses[None, None], window, stride=1, padding=0
    ).flatten()
    figure, axis = plt.subplots(figsize=(8, 4.5))
    axis.plot(steps, losses, color="tab:blue", alpha=0.3, label="loss per step")
    axis.plot(steps[window - 1 :], smooth, color="tab:blue", label=f"mean of {window}")
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (mean over tasks)")
    if result.evals:
        twin = axis.twinx()
        for task in TASKS:
            points = [(e["step"], e[task]) for e in result.evals if task in e]
            if points:
                twin.plot(*zip(*points, strict=True), marker="o", label=f"{task} accuracy")
        twin.set_ylabel("held-out accuracy")
        twin.set_ylim(0, 1)
        twin.legend(loc="center right")
    axis.legend(loc="lower left")
    axis.set_title("training loss")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
