"""CLIP stage: contrastive pre-training of the vision encoder against a small text encoder, then
zero-shot digit classification, and the pre-trained encoder as the fusion stage's starting point.

    image  pixels [N, C, H, W] -> VisionEncoder (the VLM's) -> final CLS state -> Linear -> unit [N, E]
    text   "<bos> seven <eos>" -> TextEncoder (one LLaMA block) -> the <eos> state -> Linear -> unit [N, E]
    logits = exp(logit_scale) * image @ text^T       (logit_scale learnable, init log(1 / 0.07),
                                                     clamped to [0, log 100] after each step as CLIP does)
    loss   = (CE(logits, diag) + CE(logits^T, diag)) / 2   (symmetric InfoNCE)

A batch is G groups of the 10 digits, one training image of each (shuffled): every group is its own
10 x 10 contrastive problem, so the texts of a group are distinct and each row has exactly one positive
(with random images, same-digit captions in one batch would be false negatives).
Zero-shot: a test image's class is the digit whose caption embedding is nearest (cosine).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.data import Digits, apply_augment, augment_draws
from model.text import TransformerBlock, rope_tables
from model.tokenizer import Tokenizer
from model.vision import VisionEncoder

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp of the learned temperature: logits at most 100x


class TextEncoder(nn.Module):
    """input_ids [N, S] (each row holding one <eos>) -> [N, embed_dim]: token embeddings, LLaMA
    blocks (causal), RMSNorm, the <eos> token's state through a Linear (CLIP's text tower, small)."""

    def __init__(self, config: ModelConfig, embed_dim: int):
        super().__init__()
        self.eos_id = config.eos_id
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.projection = nn.Linear(config.dim, embed_dim, bias=False)
        cos, sin = rope_tables(config.max_seq_len, config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_eos = input_ids == self.eos_id
        if not bool((is_eos.sum(1) == 1).all()):
            raise ValueError(
                f"every text row needs exactly one <eos> (id {self.eos_id}), got counts "
                f"{is_eos.sum(1).tolist()}"
            )
        length = input_ids.shape[1]
        x = self.tok_embeddings(input_ids)  # (N, S, D)
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        for layer in self.layers:
            x = layer(x, cos, sin)
        eos = is_eos.int().argmax(1)  # (N,)
        return self.projection(self.norm(x[torch.arange(x.shape[0]), eos]))


class ContrastiveModel(nn.Module):
    """CLIP on the VLM's vision encoder (same config, so its weights load into the VLM)."""

    def __init__(
        self, config: ModelConfig, *, embed_dim: int = 64, text_dim: int = 64, text_layers: int = 1
    ):
        super().__init__()
        self.vision = VisionEncoder(config)
        self.visual_projection = nn.Linear(config.vision_dim, embed_dim, bias=False)
        text_config = dataclasses.replace(
            config,
            dim=text_dim,
            n_layers=text_layers,
            n_heads=2,
            n_kv_heads=2,
            ffn_hidden=2 * text_dim,
        )
        self.text = TextEncoder(text_config, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, C, H, W] -> unit vectors [N, E] (the final normed CLS state, projected)."""
        final = self.vision(pixels)[0]  # (N, T, Dv)
        return F.normalize(self.visual_projection(final[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(input_ids), dim=-1)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor):
        """pixels [G, K, C, H, W] and input_ids [G, K, S]: G groups of K image-text pairs (pair i of
        a group matches its text i) -> (logits [G, K, K] image x text, the symmetric InfoNCE loss)."""
        groups, pairs = pixels.shape[:2]
        image = self.encode_image(pixels.flatten(0, 1)).view(groups, pairs, -1)
        text = self.encode_text(input_ids.flatten(0, 1)).view(groups, pairs, -1)
        logits = self.logit_scale.exp() * image @ text.transpose(1, 2)  # (G, K, K)
        return logits, contrastive_loss(logits)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """CLIP's clamp after each optimizer step: the temperature stays in [1/100, 1]."""
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of logits [..., K, K] (row i's positive is column i): the mean of the
    image->text and text->image cross-entropies."""
    pairs = logits.shape[-1]
    labels = torch.arange(pairs, device=logits.device).expand(logits.shape[:-1]).flatten()
    image_to_text = F.cross_entropy(logits.flatten(0, -2), labels)
    text_to_image = F.cross_entropy(logits.transpose(-1, -2).flatten(0, -2), labels)
    return (image_to_text + text_to_image) / 2


def digit_prompts(tokenizer: Tokenizer) -> torch.Tensor:
    """[10, 3] the caption of each digit: "<bos> zero <eos>" ... "<bos> nine <eos>"."""
    return torch.tensor(
        [[tokenizer.bos_id, tokenizer.digit_id(d), tokenizer.eos_id] for d in range(10)]
    )


@torch.no_grad()
def zero_shot_accuracy(
    model: ContrastiveModel,
    tokenizer: Tokenizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device | str = "cpu",
) -> float:
    """Fraction of ``images [N, C, H, W]`` whose nearest digit caption (cosine) is their label."""
    was_training = model.training
    model.eval()
    text = model.encode_text(digit_prompts(tokenizer).to(device))  # (10, E)
    predicted = (model.encode_image(images.to(device)) @ text.T).argmax(-1).cpu()
    model.train(was_training)
    return float((predicted == labels).float().mean())


@dataclass
class ContrastiveConfig:
    steps: int = 300
    groups: int = 6  # groups of the 10 digits per step (60 image-text pairs)
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    seed: int = 0
    embed_dim: int = 64
    text_dim: int = 64
    text_layers: int = 1


@dataclass
class ContrastiveResult:
    model: ContrastiveModel
    losses: list[float] = field(default_factory=list)
    logit_scales: list[float] = field(default_factory=list)
    zero_shot: float = 0.0  # on the test split
    seconds: float = 0.0


def contrastive_batch(
    data: Digits, tokenizer: Tokenizer, groups: int, generator: torch.Generator, augment: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels [G, 10, C, H, W] uint8, input_ids [G, 10, 3]): each group one random training image
    of every digit, in a random order, with its caption."""
    by_digit = [torch.nonzero(data.train_labels == d)[:, 0] for d in range(10)]
    order = torch.stack([torch.randperm(10, generator=generator) for _ in range(groups)])  # (G, 10)
    picks = torch.randint(1 << 30, (groups, 10), generator=generator)
    index = torch.stack(
        [
            torch.stack([by_digit[d][p % len(by_digit[d])] for d, p in zip(row, pick, strict=True)])
            for row, pick in zip(order.tolist(), picks.tolist(), strict=True)
        ]
    )  # (G, 10)
    images = data.train_images[index.flatten()]
    if augment:
        images = apply_augment(images, augment_draws(images.shape[0], generator))
    pixels = images.view(groups, 10, *images.shape[1:])
    return pixels, digit_prompts(tokenizer)[order]


def train_contrastive(
    model_config: ModelConfig,
    tokenizer: Tokenizer,
    config: ContrastiveConfig,
    *,
    data: Digits | None = None,
    device: torch.device | str = "cpu",
) -> ContrastiveResult:
    """Pre-trains a ContrastiveModel (AdamW, warmup + cosine, CLIP's clamp) and measures zero-shot
    accuracy on the test split."""
    data = data or Digits(seed=config.seed)
    torch.manual_seed(config.seed)
    model = ContrastiveModel(
        model_config,
        embed_dim=config.embed_dim,
        text_dim=config.text_dim,
        text_layers=config.text_layers,
    ).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay}],
        lr=config.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        weight_decay=0.0,
    )
    generator = torch.Generator().manual_seed(config.seed + 3)
    result = ContrastiveResult(model)
    began = time.perf_counter()
    for step in range(config.steps):
        if step < config.warmup_steps:
            lr = config.lr * (step + 1) / config.warmup_steps
        else:
            progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
            lr = config.lr * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        pixels, input_ids = contrastive_batch(data, tokenizer, config.groups, generator, True)
        _, loss = model(pixels.to(device), input_ids.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
        result.losses.append(loss.item())
        result.logit_scales.append(model.logit_scale.item())
    result.seconds = time.perf_counter() - began
    result.zero_shot = zero_shot_accuracy(
        model, tokenizer, data.test_images, data.test_labels, device
    )
    return result


def load_pretrained_vision(vlm: nn.Module, contrastive: ContrastiveModel) -> None:
    """Copies the pre-trained vision encoder's weights into ``vlm.vision`` (same config)."""
    vlm.vision.load_state_dict(contrastive.vision.state_dict())
