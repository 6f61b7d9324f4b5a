"""A thin Llama-3.2-Vision-style VLM whose hot spots run on vlm_kernels: `python -m model --help`."""

from model.config import PRESETS, ModelConfig, TrainConfig, preset
from model.tokenizer import Tokenizer
from model.vlm import VisionLanguageModel, generate

__all__ = [
    "PRESETS",
    "ModelConfig",
    "Tokenizer",
    "TrainConfig",
    "VisionLanguageModel",
    "generate",
    "preset",
]
