"""Training: AdamW, linear warmup + cosine decay, gradient clipping, optional bf16 autocast, a tqdm bar,
periodic held-out evaluation, seeded and resumable (the loss after a resume equals the uninterrupted
run's at the same step), and DistributedDataParallel under torchrun (gloo on CPU, nccl on GPU).

A step takes one batch of every task (``batch_size`` sequences each, global over ranks), one forward and
backward per task with the gradients accumulated (DDP syncs on the last), and one optimizer step. The
step's loss is the mean of the tasks' mean token losses.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.checkpoint import (
    load_model,
    load_train_state,
    save_model,
    save_train_state,
    saved_model_step,
)
from model.config import TrainConfig, preset
from model.data import TASKS, Digits, TrainSampler, eval_batch
from model.evaluate import predict, score_counts
from model.tokenizer import Tokenizer
from model.vlm import VisionLanguageModel, build_vlm


@dataclass
class TrainResult:
    model: VisionLanguageModel
    tokenizer: Tokenizer
    config: TrainConfig
    losses: list[float] = field(default_factory=list)  # one per step, from step 1
    evals: list[dict] = field(default_factory=list)  # {"step": s, task: sequence accuracy}
    seconds: float = 0.0  # wall time of the steps run in this call
    # wall time of each step of this call (the evaluations between steps excluded)
    step_seconds: list[float] = field(default_factory=list)


def learning_rate(config: TrainConfig, step: int) -> float:
    """lr for optimizer step ``step`` (0-based): linear warmup, then cosine down to min_lr_ratio * lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def build_model(config: TrainConfig, tokenizer: Tokenizer) -> VisionLanguageModel:
    model_config = preset(
        config.preset,
        **{
            "vocab_size": len(tokenizer),
            "pad_id": tokenizer.pad_id,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "image_id": tokenizer.image_id,
            "max_frames": max(config.video_frames, 1),
            "backend": config.backend,
            **config.model_overrides,
        },
    )
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    return build_vlm(model_config)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad (a frozen part stays out); weight decay on
    matrices and embeddings (dim >= 2), none on norms, biases and gates."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-8)


# TrainConfig fields a resumed run cannot change, and why: the model's shape, or its initial weights
# and the train/test split (a new seed would evaluate on images the run trained on). Every other
# field (steps, the lr schedule, eval and checkpoint cadence, batch size, tasks...) takes its new value.
RESUME_FIXED = {
    "preset": "the model's shape",
    "model_overrides": "the model's shape",
    "video_frames": "the model's max_frames",
    "seed": "the initial weights and the train/test split",
}


def check_resume_config(saved: TrainConfig, config: TrainConfig) -> None:
    """Raises ValueError listing every field of RESUME_FIXED that ``config`` changes from the run
    being resumed (``saved``)."""
    changes = [
        f"{name} {getattr(saved, name)!r} -> {getattr(config, name)!r} ({why})"
        for name, why in RESUME_FIXED.items()
        if getattr(saved, name) != getattr(config, name)
    ]
    if changes:
        raise ValueError(
            "a resumed run cannot change " + "; ".join(changes) + ": start a new run to change them"
        )


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env(device: torch.device | None = None) -> None:
    """Under torchrun (WORLD_SIZE > 1): one process group, gloo on CPU, nccl on GPU (``device``:
    where this rank trains; None: its GPU when there is one)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        on_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
        dist.init_process_group("nccl" if on_gpu else "gloo")
        if on_gpu:
            torch.cuda.set_device(
                device if device is not None else int(os.environ.get("LOCAL_RANK", "0"))
            )


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def evaluate_tasks(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    data: Digits,
    config: TrainConfig,
    num_examples: int,
    device: torch.device,
    *,
    rank: int = 0,
    world: int = 1,
) -> dict[str, dict[str, float]]:
    """{task: {"sequence": ..., "digit": ...}} on held-out images.

    ``world`` > 1 (every rank of the process group calls it): each rank decodes its share of the
    rows and the counts are summed with one all_reduce per task, so every rank gets the whole
    batch's scores and none waits in a collective while another evaluates alone."""
    was_training = model.training
    model.eval()
    results = {}
    for task in config.tasks:
        batch = eval_batch(
            task,
            data,
            tokenizer,
            num_examples,
            interleaved_images=config.interleaved_images,
            video_frames=config.video_frames,
        )
        total = batch.input_ids.shape[0]
        per_rank = -(-total // world)
        share = batch.rows(min(total, rank * per_rank), min(total, (rank + 1) * per_rank))
        counts = torch.zeros(4, dtype=torch.float64, device=device)
        if share.input_ids.shape[0]:
            predictions, _ = predict(model, share.to(device), tokenizer)
            right, hits = score_counts(predictions, share.digits.tolist())
            counts += torch.tensor(
                [right, hits, len(predictions), share.digits.numel()],
                dtype=torch.float64,
                device=device,
            )
        if world > 1:
            dist.all_reduce(counts)
        right, hits, rows, digits = counts.tolist()
        results[task] = {"sequence": right / rows, "digit": hits / digits}
    model.train(was_training)
    return results


class Trainer:
    """One training run: model, optimizer, data sampler and history; ``step()`` runs one optimizer step.

    ``resume``: a checkpoint directory of this run to continue from (weights, AdamW moments, RNG states,
    step). ``model``: the model to train in place of ``build_model``'s (one with pre-trained or
    frozen parts: only the parameters that require grad are optimized). Under an initialised process
    group the model is wrapped in DistributedDataParallel and each rank takes its rows of every
    global batch."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: str | Path | None = None,
        device: torch.device | None = None,
        model: VisionLanguageModel | None = None,
    ):
        self.rank, self.world = _distributed()
        self.device = device or default_device()
        self.config = config
        for task in config.tasks:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")
        # The task that uses every weight (video: the resampler too) goes last, where DDP syncs.
        self.tasks = tuple(sorted(config.tasks, key=lambda t: t == "video"))
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} must divide among {self.world} ranks")
        self.tokenizer = Tokenizer.for_tasks()
        self.data = Digits(seed=config.seed)
        self.sampler = TrainSampler(
            self.data,
            self.tokenizer,
            seed=config.seed + 1,
            augment=config.augment,
            interleaved_images=config.interleaved_images,
            video_frames=config.video_frames,
        )
        if model is None:
            model = build_model(config, self.tokenizer)
        self.model = model.to(self.device)
        self.optimizer = make_optimizer(self.model, config)
        self.result = TrainResult(self.model, self.tokenizer, config)
        self.step_count = 0
        if resume is not None:
            check_resume_config(saved_train_config(resume), config)
            saved, _ = load_model(resume, self.device, backend=config.backend)
            self.model.load_state_dict(saved.state_dict())
            train_state, rng = load_train_state(resume, self.optimizer)
            model_step = saved_model_step(resume)
            if model_step is not None and model_step != train_state["step"]:
                raise ValueError(
                    f"{resume}: the weights are of step {model_step} but the train state of step "
                    f"{train_state['step']} (a save interrupted between its two files)"
                )
            # The optimizer state brought the saved groups' settings; the decay may have changed.
            self.optimizer.param_groups[0]["weight_decay"] = config.weight_decay
            self.step_count = train_state["step"]
            self.result.losses = train_state["losses"]
            self.result.evals = train_state["evals"]
            torch.set_rng_state(rng["torch"])
            self.sampler.generator.set_state(rng["sampler"])
        self.model.train()
        self.wrapped = self.model
        if self.world > 1:
            self.wrapped = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters="video" not in self.tasks,  # the resampler idles otherwise
            )

    def step(self) -> float:
        """One optimizer step over a batch of every task; returns the loss (mean over tasks/ranks)."""
        config, device = self.config, self.device
        lr = learning_rate(config, self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        local = config.batch_size // self.world
        step_loss = torch.zeros((), device=device)
        for i, task in enumerate(self.tasks):
            share = (self.rank * local, (self.rank + 1) * local)
            batch = self.sampler.next(task, config.batch_size, rows=share).to(device)
            sync = i == len(self.tasks) - 1 or self.world == 1
            with (
                contextlib.nullcontext() if sync else self.wrapped.no_sync(),
                torch.autocast(device.type, torch.bfloat16, enabled=config.bf16),
            ):
                _, loss = self.wrapped(batch.input_ids, batch.media, batch.targets)
            (loss / len(self.tasks)).backward()
            step_loss += loss.detach() / len(self.tasks)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            dist.all_reduce(step_loss)
            step_loss /= self.world
        self.step_count += 1
        self.result.losses.append(step_loss.item())
        return self.result.losses[-1]

    def evaluate(self, num_examples: int) -> dict[str, dict[str, float]]:
        scores = evaluate_tasks(
            self.model,
            self.tokenizer,
            self.data,
            self.config,
            num_examples,
            self.device,
            rank=self.rank,
            world=self.world,
        )
        self.result.evals.append(
            {"step": self.step_count, **{t: s["sequence"] for t, s in scores.items()}}
        )
        return scores

    def save(self, out: str | Path) -> None:
        """The model (+ config, tokenizer) and everything a resume needs."""
        save_model(out, self.model, self.tokenizer, step=self.step_count)
        rng = {"torch": torch.get_rng_state(), "sampler": self.sampler.generator.get_state()}
        train_state = {
            "step": self.step_count,
            "config": self.config.to_json(),
            "losses": self.result.losses,
            "evals": self.result.evals,
        }
        save_train_state(out, self.optimizer, rng, train_state)


def train(
    config: TrainConfig,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    device: torch.device | None = None,
    model: VisionLanguageModel | None = None,
) -> TrainResult:
    """Trains ``config.steps`` steps (or continues the run saved in ``resume``), evaluating every
    ``eval_every`` steps, and saves the final checkpoint to ``out`` (also every ``checkpoint_every``
    steps). ``stop_after``: stop after that step (an interrupted run; the schedule still follows
    ``config.steps``).

    ``resume``: ``config`` may change what RESUME_FIXED does not list: ``steps`` above the saved step
    extends the run (the cosine then spans the new length), the eval and checkpoint cadence apply
    from the resumed step on. ``model``: as in ``Trainer``."""
    trainer = Trainer(config, resume=resume, device=device, model=model)
    rank = trainer.rank
    if resume is not None and trainer.step_count >= config.steps:
        raise ValueError(
            f"the run in {resume} is at step {trainer.step_count}: steps={config.steps} leaves nothing "
            "to train (pass more steps to extend it)"
        )
    last = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(
        range(trainer.step_count, last),
        initial=trainer.step_count,
        total=config.steps,
        disable=not progress or rank != 0,
    )
    began = time.perf_counter()
    for _ in bar:
        step_began = time.perf_counter()
        loss = trainer.step()  # (ends in a host sync: it reads the loss back)
        trainer.result.step_seconds.append(time.perf_counter() - step_began)
        done = trainer.step_count
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate(config, done - 1):.2e}")
        evaluate = config.eval_every and done % config.eval_every == 0 and done != config.steps
        if evaluate:  # every rank: each decodes its share of the held-out rows
            scores = trainer.evaluate(config.eval_examples)
            if rank == 0:
                bar.write(
                    f"step {done}: held-out accuracy "
                    + ", ".join(f"{t} {s['sequence']:.1%}" for t, s in scores.items())
                )
        periodic = config.checkpoint_every and done % config.checkpoint_every == 0
        if out is not None and rank == 0 and (done == last or periodic):
            trainer.save(out)
    bar.close()
    trainer.result.seconds = time.perf_counter() - began
    return trainer.result


def saved_train_config(directory: str | Path) -> TrainConfig:
    """The TrainConfig of the run saved in ``directory`` (to resume it)."""
    import json

    from safetensors import safe_open

    from model.checkpoint import TRAIN_FILE

    path = Path(directory) / TRAIN_FILE
    if not path.exists():
        raise FileNotFoundError(f"no training state at {path}")
    with safe_open(path, framework="pt") as f:
        return TrainConfig.from_json(json.loads(f.metadata()["train"])["config"])
