"""Atomic writes: the target appears whole, with the permissions a plain open() would give it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.util import atomic_write


def test_atomic_write_keeps_old_file_on_failure_and_uses_umask_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    atomic_write(target, lambda tmp: Path(tmp).write_text("first"))
    assert target.read_text() == "first"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others when the umask allows it

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]  # no temp file left behind
