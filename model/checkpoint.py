"""Checkpoints: safetensors + json, no pickle.

    <dir>/model.safetensors        the weights; metadata "config" (ModelConfig json) and "tokenizer" (json)
    <dir>/train_state.safetensors  AdamW moments, the RNG states (torch's and the data sampler's); metadata
                                   "train" (json: TrainConfig, step, loss history, optimizer groups)

``load_model`` needs only the first file; resuming a run needs both.

Saves are atomic: each file is written to a temporary file in the same directory, flushed to disk
(fsync) and renamed over the old one (``os.replace``), so a run killed mid-save leaves the previous
checkpoint whole. A training checkpoint's two files carry the step they were saved at, and a resume
refuses a pair from different steps (a kill between the two renames).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.vlm import VisionLanguageModel, build_vlm

MODEL_FILE = "model.safetensors"
TRAIN_FILE = "train_state.safetensors"


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` all or nothing: a temporary file in the same directory (a rename
    across file systems would not be atomic), fsync, ``os.replace``, then fsync of the directory so
    the rename itself is on disk. On any error the temporary file is removed and ``path`` is as it was."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def save_model(
    directory: str | Path,
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    *,
    step: int | None = None,
) -> Path:
    """Writes the weights, config and tokenizer to ``directory``/model.safetensors (atomically);
    ``step``: the training step, recorded so a resume can check the train state is of the same one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    metadata = {"config": model.config.to_json(), "tokenizer": tokenizer.to_json()}
    if step is not None:
        metadata["step"] = str(step)
    return atomic_write(directory / MODEL_FILE, save(state, metadata=metadata))


def saved_model_step(directory: str | Path) -> int | None:
    """The training step recorded in ``directory``/model.safetensors (None: saved outside training)."""
    with safe_open(Path(directory) / MODEL_FILE, framework="pt") as f:
        step = f.metadata().get("step")
    return None if step is None else int(step)


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
    model = build_vlm(config).to(device)
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
    return atomic_write(directory / TRAIN_FILE, save(tensors, metadata=metadata))


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
