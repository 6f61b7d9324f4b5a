"""Llama 3.2 Vision's staged training: a text-only stage trains the language model, then the fusion
stage trains the adapter (vision encoder, projector, resampler, gated cross-attention blocks) with every
text-model parameter frozen (``requires_grad=False``), so text-only behaviour is unchanged: text-only
prompts skip the cross-attention blocks, and the logits are bit-identical before and after fusion.

Text-only data: the three tasks' captions with their <image> tokens left out, of random digits:

    caption      <bos> seven <eos>
    interleaved  <bos> seven two <eos>
    video        <bos> video three one four <eos>

every token after <bos> a target (the language model learns the captions' grammar, not the digits).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.config import TrainConfig
from model.tokenizer import Tokenizer
from model.vlm import IGNORE_INDEX, VisionLanguageModel


def text_model_parameters(model: VisionLanguageModel) -> dict[str, nn.Parameter]:
    """The text model's parameters by name: the decoder's, without its cross-attention blocks
    (which belong to the adapter with the vision path)."""
    return {
        f"decoder.{name}": param
        for name, param in model.decoder.named_parameters()
        if not name.startswith("cross_layers.")
    }


def freeze_text_model(model: VisionLanguageModel) -> list[str]:
    """Sets ``requires_grad=False`` on every text-model parameter; returns their names."""
    params = text_model_parameters(model)
    for param in params.values():
        param.requires_grad_(False)
    return list(params)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def text_batch(
    tokenizer: Tokenizer,
    batch_size: int,
    generator: torch.Generator,
    *,
    interleaved_images: int = 2,
    video_frames: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, S], targets [B, S]) of text-only captions, a third of each task's form
    (module docstring), right-padded with <pad> (IGNORE_INDEX targets) to one length."""
    t = tokenizer
    forms = [[], [], [t.ids["video"]]]  # prefix words of caption, interleaved, video
    counts = [1, interleaved_images, video_frames]
    kinds = torch.randint(3, (batch_size,), generator=generator)
    digits = torch.randint(10, (batch_size, max(counts)), generator=generator)
    rows = []
    for kind, row_digits in zip(kinds.tolist(), digits.tolist(), strict=True):
        words = [t.digit_id(d) for d in row_digits[: counts[kind]]]
        rows.append([t.bos_id, *forms[kind], *words, t.eos_id])
    width = max(len(r) for r in rows)
    input_ids = torch.full((batch_size, width), t.pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    targets[targets == t.pad_id] = IGNORE_INDEX
    return input_ids, targets


@dataclass
class TextStageResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_text_stage(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    config: TrainConfig,
    steps: int,
    *,
    device: torch.device | str = "cpu",
) -> TextStageResult:
    """Trains the text model alone (text-only forward: the adapter is neither run nor changed) for
    ``steps`` AdamW steps on ``text_batch``es of ``config.batch_size`` rows, with config's lr
    (warmup, then cosine to min_lr_ratio), weight decay, clipping and seed."""
    params = list(text_model_parameters(model).values())
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed + 2)
    warmup = max(1, min(config.warmup_steps, steps // 5))
    result = TextStageResult()
    model.train()
    began = time.perf_counter()
    for step in range(steps):
        if step < warmup:
            lr = config.lr * (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, steps - warmup)
            cosine = 0.5 * (1 + math.cos(math.pi * progress))
            lr = config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)
        for group in optimizer.param_groups:
            group["lr"] = lr
        input_ids, targets = text_batch(
            tokenizer,
            config.batch_size,
            generator,
            interleaved_images=config.interleaved_images,
            video_frames=config.video_frames,
        )
        input_ids, targets = input_ids.to(device), targets.to(device)
        logits = model(input_ids, None)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
    result.seconds = time.perf_counter() - began
    return result
