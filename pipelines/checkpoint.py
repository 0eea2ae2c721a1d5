"""Checkpoint files: ``model.safetensors`` + ``config.yaml`` for inference, ``train_state/`` for exact resume.

File I/O only (building a model from a checkpoint is the job of ``tokenizer.model.load_tokenizer`` and
``generator.llama.load_generator``). A checkpoint directory is a local path or an
``hf://owner/name[@revision][/subfolder]`` spec on the Hugging Face Hub: ``checkpoint_dir`` (``pipelines.hub``) turns
either into a local directory for every reader here, so every tool and trainer that takes a checkpoint takes both.
Every file is written atomically (``pipelines.util.atomic_write``).
Everything read is verified: ``train_state/state.pt`` against the sha256 in ``train_state/state.sha256``
(hashed while writing, written last), and a damaged or truncated file of any kind is a one-line
``CorruptFileError`` naming it and saying how to recover.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from pipelines.errors import CorruptFileError, MissingCheckpointError
from pipelines.hub import resolve_checkpoint
from pipelines.util import HashingWriter, atomic_write, atomic_write_text, file_sha256

MODEL_FILE, CONFIG_FILE, TRAIN_STATE_DIR = "model.safetensors", "config.yaml", "train_state"
STATE_FILE, STATE_CHECKSUM = "state.pt", "state.sha256"
FSDP_STEP_FILE = "fsdp_step.json"  # train_state/ of an FSDP run: accelerate's sharded state in fsdp/ plus this
_NEARLY_FULL = 1 << 20  # bytes free below which a failed state.pt write is taken for a full disk

__all__ = ["MODEL_FILE", "CONFIG_FILE", "TRAIN_STATE_DIR", "MissingCheckpointError", "save_config", "save_model",
           "checkpoint_dir", "load_config", "load_model", "weights_hash", "capture_rng", "restore_rng",
           "save_train_state", "load_train_state", "has_train_state"]


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


def checkpoint_dir(directory: str | Path) -> Path:
    """The checkpoint on disk: a local directory as given, an ``hf://`` spec fetched into the Hugging Face cache
    (its ``model.safetensors`` + ``config.yaml``, once per process: ``pipelines.hub``)."""
    return resolve_checkpoint(directory, (MODEL_FILE, CONFIG_FILE))


def load_config(directory: str | Path) -> dict[str, Any]:
    path = _require(checkpoint_dir(directory) / CONFIG_FILE, "checkpoint config")
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # yaml.YAMLError, UnicodeDecodeError, OmegaConf errors: all mean "not readable"
        raise CorruptFileError(f"checkpoint config {path} is damaged ({type(err).__name__}); restore it from a copy "
                               "of the run (it is the run's resolved config)") from err
    if not isinstance(config, dict) or not config:
        raise CorruptFileError(f"checkpoint config {path} is empty or damaged; restore it from a copy of the run "
                               "(it is the run's resolved config)")
    return config


def load_model(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config dict) from a checkpoint directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = _require(checkpoint_dir(directory), "checkpoint directory")
    path = _require(directory / MODEL_FILE, "checkpoint weights")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFileError(f"checkpoint weights {path} are truncated or damaged ({' '.join(str(err).split())}); "
                               f"restore it from a copy (a run that has {TRAIN_STATE_DIR}/ rewrites it at its next "
                               "checkpoint when resumed with resume=true)") from err
    return state, load_config(directory)


def weights_hash(directory: str | Path) -> str:
    """Identity of a checkpoint's weights: the first 16 hex digits of the sha256 of ``model.safetensors``.

    Token shards record it so stage two can refuse tokens made by a different tokenizer; it depends on
    the weights only (not the path or config.yaml), so copying a checkpoint keeps its identity.
    """
    path = _require(_require(checkpoint_dir(directory), "checkpoint directory") / MODEL_FILE, "checkpoint weights")
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
    """Everything needed to resume (weights, optimizers, EMA, step, RNG) in one file, with its sha256 (hashed while
    writing, never read back) in ``state.sha256``. The record is written once the new file is complete and before
    it is renamed into place, and keeps the previous file's hash too, so a kill at any moment leaves a
    ``state.pt`` that matches its record, and any other content (a flipped byte, a truncation) does not."""
    folder = Path(directory) / TRAIN_STATE_DIR
    record = folder / STATE_CHECKSUM
    previous = _recorded_hashes(record)[0] if record.exists() and (folder / STATE_FILE).exists() else None

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            w = HashingWriter(f)
            try:
                torch.save(state, w)
            except RuntimeError as err:
                cause = _write_failure(err, folder)
                if cause is None:
                    raise
                raise cause from err
        atomic_write_text(record, json.dumps({"file": STATE_FILE, "sha256": w.sha256.hexdigest(),
                                              "previous_sha256": previous, "step": state.get("step")}))

    atomic_write(folder / STATE_FILE, write)


def _write_failure(err: RuntimeError, folder: Path) -> OSError | None:
    """torch's zip writer reports a failed write as ``RuntimeError: [enforce fail at inline_container.cc:...]
    unexpected pos ...``. Returns the OSError behind it (disk full, usually), which ``atomic_write`` turns into
    the usual one-line ``WriteError``; when torch dropped it, a nearly full disk stands for it. None: not a
    failed write."""
    if isinstance(err.__context__, OSError):
        return err.__context__
    if "inline_container" in str(err) and shutil.disk_usage(folder).free < _NEARLY_FULL:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def _recorded_hashes(record: Path) -> list[str]:
    """[sha256 of the newest state, sha256 of the one before (until the newest is renamed into place)]."""
    try:
        d = json.loads(record.read_text())
        return [d["sha256"]] + ([d["previous_sha256"]] if d.get("previous_sha256") else [])
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptFileError(f"checksum file {record} is damaged; delete it to resume without the check, or "
                               "restore it from a copy") from err


def has_train_state(directory: str | Path) -> bool:
    folder = Path(directory) / TRAIN_STATE_DIR
    return (folder / STATE_FILE).exists() or (folder / FSDP_STEP_FILE).exists()


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    """The saved training state, or None when the run has none yet (fresh start). A state that fails its checksum
    or cannot be unpickled is a ``CorruptFileError`` naming the file."""
    folder = Path(directory) / TRAIN_STATE_DIR
    path = folder / STATE_FILE
    if not path.exists():
        return None
    recover = (f"resuming is not possible from it; restore {folder} from a copy, or start again with resume=false "
               f"overwrite=true (the weights in {MODEL_FILE} stay until the first new checkpoint)")
    record = folder / STATE_CHECKSUM
    if record.exists():  # absent only for runs saved before checksums existed
        if file_sha256(path) not in _recorded_hashes(record):
            raise CorruptFileError(f"training state {path} fails its checksum ({record}): the file is truncated or "
                                   f"damaged; {recover}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # zip / unpickling errors of a damaged file
        raise CorruptFileError(f"training state {path} is truncated or damaged ({type(err).__name__}); "
                               f"{recover}") from err
