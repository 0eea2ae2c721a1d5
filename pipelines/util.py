"""Small helpers every pipeline shares: atomic writes, file hashing, device choice, evenly spaced picks."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` (same filesystem), so a crash mid-write
    leaves the previous file intact."""
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


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """``np.savez`` written atomically. Arrays may be memory-mapped: they are copied into the zip in chunks."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)
    return Path(path)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pick_device(name: str) -> torch.device:
    """``auto``: this process's device under Accelerate (its GPU in a multi-GPU launch, else the CPU)."""
    if name == "auto":
        from accelerate import PartialState

        return PartialState().device
    return torch.device(name)


def evenly_spaced(n: int, k: int | None) -> list[int]:
    """``k`` indices spread over ``range(n)`` (all when k is None or >= n); class-sorted lists keep every class."""
    if k is None or k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
