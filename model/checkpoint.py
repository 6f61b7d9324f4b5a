"""Checkpoints: safetensors + json, no pickle.

    <dir>/model.safetensors        the weights; metadata "config" (ModelConfig json) and "tokenizer" (json)
    <dir>/train_state.safetensors  AdamW moments, the RNG states (torch's and the data sampler's); metadata
                                   "train" (json: TrainConfig, step, loss history, optimizer groups)

``load_model`` needs only the first file; resuming a run needs both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.vlm import VisionLanguageModel

MODEL_FILE = "model.safetensors"
TRAIN_FILE = "train_state.safetensors"


def save_model(directory: str | Path, model: VisionLanguageModel, tokenizer: Tokenizer) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    metadata = {"config": model.config.to_json(), "tokenizer": tokenizer.to_json()}
    save_file(state, directory / MODEL_FILE, metadata=metadata)
    return directory / MODEL_FILE


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", backend: str | None = None
) -> tuple[VisionLanguageModel, Tokenizer]:
    """(model, tokenizer) from ``directory``; ``backend`` overrides the saved one (None = auto)."""
    path = Path(directory) / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with safe_open(path, framework="pt", device=str(device)) as f:
        metadata = f.metadata()
        state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    config = ModelConfig.from_json(metadata["config"])
    config.backend = backend
    model = VisionLanguageModel(config).to(device)
    model.load_state_dict(state)
    return model, Tokenizer.from_json(metadata["tokenizer"])


def save_train_state(
    directory: str | Path,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    train: dict,
) -> Path:
    """Optimizer state (tensors by parameter index), RNG states and the json-able ``train`` dict."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = optimizer.state_dict()
    tensors = {f"rng.{name}": value.contiguous().cpu() for name, value in rng.items()}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).contiguous().cpu()
    metadata = {"train": json.dumps({**train, "param_groups": state["param_groups"]})}
    save_file(tensors, directory / TRAIN_FILE, metadata=metadata)
    return directory / TRAIN_FILE


def load_train_state(
    directory: str | Path, optimizer: torch.optim.Optimizer
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Loads the optimizer state in place; returns (the ``train`` dict, the RNG states)."""
    path = Path(directory) / TRAIN_FILE
    if not path.exists():
        raise FileNotFoundError(f"no training state at {path} (was the run saved with --out?)")
    with safe_open(path, framework="pt", device="cpu") as f:
        train = json.loads(f.metadata()["train"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    optimizer_state: dict[int, dict] = {}
    rng = {}
    for name, value in tensors.items():
        kind, rest = name.split(".", 1)
        if kind == "rng":
            rng[rest] = value
        else:
            index, key = rest.split(".", 1)
            optimizer_state.setdefault(int(index), {})[key] = value
    param_groups = train.pop("param_groups")
    device = optimizer.param_groups[0]["params"][0].device
    for values in optimizer_state.values():
        for key, value in values.items():
            if key != "step":
                values[key] = value.to(device)
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": param_groups})
    return train, rng
