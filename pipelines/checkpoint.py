"""Checkpoint files: ``model.safetensors`` + ``config.yaml`` for inference, ``train_state/`` for exact resume.

File I/O only (building a model from a checkpoint is the job of ``tokenizer.model.load_tokenizer`` and
``generator.llama.load_generator``). Every file is written atomically (``pipelines.util.atomic_write``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from pipelines.errors import MissingCheckpointError
from pipelines.util import atomic_write, atomic_write_text, file_sha256

MODEL_FILE, CONFIG_FILE, TRAIN_STATE_DIR = "model.safetensors", "config.yaml", "train_state"

__all__ = ["MODEL_FILE", "CONFIG_FILE", "TRAIN_STATE_DIR", "MissingCheckpointError", "save_config", "save_model",
           "load_config", "load_model", "weights_hash", "capture_rng", "restore_rng", "save_train_state",
           "load_train_state"]


def save_config(config: dict[str, Any], directory: str | Path) -> None:
    atomic_write_text(Path(directory) / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(config)))


def save_model(directory: str | Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Weights as safetensors (contiguous CPU copies) plus the run's resolved config."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_write(Path(directory) / MODEL_FILE, lambda tmp: save_file(tensors, tmp))
    save_config(config, directory)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise MissingCheckpointError(f"{what} not found: {path}")
    return path


def load_config(directory: str | Path) -> dict[str, Any]:
    path = _require(Path(directory) / CONFIG_FILE, "checkpoint config")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def load_model(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config dict) from a checkpoint directory."""
    from safetensors.torch import load_file

    directory = _require(Path(directory), "checkpoint directory")
    state = load_file(str(_require(directory / MODEL_FILE, "checkpoint weights")))
    return state, load_config(directory)


def weights_hash(directory: str | Path) -> str:
    """Identity of a checkpoint's weights: the first 16 hex digits of the sha256 of ``model.safetensors``.

    Token shards record it so stage two can refuse tokens made by a different tokenizer; it depends on
    the weights only (not the path or config.yaml), so copying a checkpoint keeps its identity.
    """
    path = _require(_require(Path(directory), "checkpoint directory") / MODEL_FILE, "checkpoint weights")
    return file_sha256(path)[:16]


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_train_state(directory: str | Path, state: dict[str, Any]) -> None:
    """Everything needed to resume (weights, optimizers, EMA, step, RNG) in one file."""
    atomic_write(Path(directory) / TRAIN_STATE_DIR / "state.pt", lambda tmp: torch.save(state, tmp))


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    """The saved training state, or None when the run has none yet (fresh start)."""
    path = Path(directory) / TRAIN_STATE_DIR / "state.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
