"""Checkpoints: ``model.safetensors`` + ``config.yaml`` for inference, ``train_state/`` for exact resume.

Every file is written to a temporary name in the same directory and renamed into place, so a crash
mid-write leaves the previous file intact. Inference needs only the safetensors and the config.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from tokenizer.model import IBQTokenizer, TokenizerConfig

MODEL_FILE, CONFIG_FILE, TRAIN_STATE_DIR = "model.safetensors", "config.yaml", "train_state"
_UMASK = os.umask(0)
os.umask(_UMASK)


class MissingCheckpointError(FileNotFoundError):
    """Raised with one clear message when a checkpoint directory or file is absent."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` (same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_config(config: dict[str, Any], directory: str | Path) -> None:
    text = OmegaConf.to_yaml(OmegaConf.create(config))
    atomic_write(Path(directory) / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))


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
    directory = _require(Path(directory), "checkpoint directory")
    state = load_file(str(_require(directory / MODEL_FILE, "checkpoint weights")))
    return state, load_config(directory)


def load_tokenizer(directory: str | Path, device: str | torch.device = "cpu") -> IBQTokenizer:
    """An IBQ tokenizer in eval mode from ``model.safetensors`` + ``config.yaml`` alone."""
    state, config = load_model(directory)
    if "tokenizer" not in config or "model" not in config["tokenizer"]:
        raise ValueError(f"{directory} is not a tokenizer checkpoint (config has no tokenizer.model)")
    model = IBQTokenizer(TokenizerConfig.from_dict(config["tokenizer"]["model"]))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def weights_hash(directory: str | Path) -> str:
    """Identity of a checkpoint's weights: the first 16 hex digits of the sha256 of ``model.safetensors``.

    Token shards record it so stage two can refuse tokens made by a different tokenizer; it depends on
    the weights only (not the path or config.yaml), so copying a checkpoint keeps its identity.
    """
    path = _require(_require(Path(directory), "checkpoint directory") / MODEL_FILE, "checkpoint weights")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()[:16]


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
    """Everything needed to resume (weights, optimizers, schedulers, EMA, step, RNG) in one file."""
    atomic_write(Path(directory) / TRAIN_STATE_DIR / "state.pt", lambda tmp: torch.save(state, tmp))


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    """The saved training state, or None when the run has none yet (fresh start)."""
    path = Path(directory) / TRAIN_STATE_DIR / "state.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
