"""Model configuration: one dataclass, named presets.

tiny  a few hundred thousand parameters; trains in seconds (tests)
demo  the `python -m model demo` model: digits captioning, interleaved captions and video in minutes
      on 2 CPU cores
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

FUSIONS = ("cross_attention", "unified")
CONNECTORS = ("linear", "mlp")


@dataclass
class ModelConfig:
    # images
    image_size: int = 8  # H = W of every frame
    channels: int = 1
    patch_size: int = 4  # 8x8 digits -> 2x2 patches + CLS (patch 2 learned ~3x slower here)
    pixel_mean: tuple[float, ...] = (0.25,)  # fused into vk.patch_embed's load (uint8 pixels / 255)
    pixel_std: tuple[float, ...] = (0.35,)
    # vision encoder (ViT, pre-LN)
    vision_dim: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp_ratio: int = 2
    # hidden states fed to the projector besides the final (normed) output: the input of layer i
    vision_taps: tuple[int, ...] = (1,)
    # perceiver resampler (media with more than one frame)
    resampler_layers: int = 1
    resampler_heads: int = 2
    resampler_head_dim: int = 64
    num_latents: int = 8
    max_frames: int = 4
    # text decoder (LLaMA-style)
    vocab_size: int = 16
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 2
    n_kv_heads: int = 1
    ffn_hidden: int = 256
    cross_attention_every: int = 1  # a gated cross-attention block before layer i if (i+1) % k == 0
    cross_heads: int = 2
    cross_kv_heads: int = 1
    max_seq_len: int = 32
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    # special token ids (set from the tokenizer)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    image_id: int = 3
    # which vlm_kernels backend the ops use: None = auto (or VLMK_BACKEND)
    backend: str | None = None
    # the recipes of model/recipes.py (defaults: the Llama 3.2 Vision model above)
    # fusion: "cross_attention" (gated cross-attention blocks read the image tokens) or "unified"
    # (LLaVA: the projected image tokens replace each <image> token in the decoder's input; no
    # cross-attention blocks)
    fusion: str = "cross_attention"
    # connector after the vk.concat_project projector: "linear" (the projector alone) or "mlp"
    # (LLaVA-1.5: projector, GELU, Linear)
    connector: str = "linear"
    # a second vision encoder (0: none) of this patch size and width, its taps pooled to the first
    # encoder's patch grid and concatenated channel-wise with the first's by the one projector
    vision2_patch_size: int = 0
    vision2_dim: int = 32

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.connector not in CONNECTORS:
            raise ValueError(f"connector must be one of {CONNECTORS}, got {self.connector!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        values = json.loads(text)
        for name in ("pixel_mean", "pixel_std", "vision_taps"):
            values[name] = tuple(values[name])
        return cls(**values)


PRESETS: dict[str, dict] = {
    "tiny": dict(
        vision_dim=32,
        vision_layers=2,
        vision_heads=2,
        resampler_heads=1,
        num_latents=4,
        dim=64,
        n_layers=2,
        n_heads=1,
        n_kv_heads=1,
        ffn_hidden=128,
        cross_heads=1,
        cross_kv_heads=1,
        cross_attention_every=2,
    ),
    "demo": dict(),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@dataclass
class TrainConfig:
    preset: str = "demo"
    steps: int = 800
    batch_size: int = 64  # sequences per task per step (global, over all ranks)
    tasks: tuple[str, ...] = ("caption", "interleaved", "video")
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    eval_every: int = 200
    eval_examples: int = 100
    checkpoint_every: int = 0
    augment: bool = True
    interleaved_images: int = 2
    video_frames: int = 3
    backend: str | None = None
    model_overrides: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        values = json.loads(text)
        values["tasks"] = tuple(values["tasks"])
        return cls(**values)
