"""Small helpers every pipeline shares: atomic writes, file hashing, device choice, evenly spaced picks."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipelines.errors import DirectoryLockedError, RunDirError, UserError, WriteError

_UMASK = os.umask(0)
os.umask(_UMASK)


TMP_SUFFIX = ".tmp"  # every temporary file of atomic_write ends so; start-up clean-up removes leftovers
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)
_PAUSE_ENV = "IBQ_TEST_PAUSE_BEFORE_RENAME"  # tests only: "<file name>:<n>:<marker path>", see _pause_for_tests
_writes_seen: dict[str, int] = {}


def write_error(err: OSError, path: Path) -> OSError:
    """A disk-full / read-only / permission error as a one-line ``WriteError`` naming the file; others unchanged."""
    previous = f"the previous {path} is intact" if path.exists() else "nothing was written"
    if err.errno in _NO_SPACE:
        message = f"no space left on device while writing {path}; {previous}"
    elif err.errno in _NO_ACCESS:
        why = "read-only file system" if err.errno == errno.EROFS else "permission denied"
        message = f"cannot write {path} ({why}); use a writable directory or fix its permissions; {previous}"
    else:
        return err
    out = WriteError(message)
    out.errno, out.filename = err.errno, str(path)
    return out


def _pause_for_tests(path: Path) -> None:
    """Fault-injection hook: with ``IBQ_TEST_PAUSE_BEFORE_RENAME=<name>:<n>:<marker>``, the n-th write of a file
    called ``<name>`` in this process creates ``<marker>`` once its temporary file is complete, then waits for the
    test to kill the process (so the kill lands inside the write, before the rename)."""
    spec = os.environ.get(_PAUSE_ENV)
    if not spec:
        return
    name, n, marker = spec.split(":", 2)
    if name != path.name:
        return
    _writes_seen[name] = _writes_seen.get(name, 0) + 1
    if _writes_seen[name] == int(n):
        Path(marker).touch()
        while True:
            time.sleep(1)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` (same filesystem), so a crash mid-write
    leaves the previous file intact. Disk full and permission problems raise a one-line ``WriteError``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
        _pause_for_tests(path)
        os.replace(tmp, path)
    except OSError as err:
        raise write_error(err, path) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
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


class HashingWriter:
    """A write-only file wrapper that hashes what passes through (sha256 of a file without reading it back)."""

    def __init__(self, f) -> None:
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def remove_stale_tmp(directory: str | Path) -> list[Path]:
    """Delete the temporary files a killed ``atomic_write`` left under ``directory`` (recursively); call it only
    while holding the directory's lock. Returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [f for f in directory.rglob(f".*{TMP_SUFFIX}") if f.is_file()]
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


LOCK_FILE = ".lock"


class DirectoryLock:
    """An exclusive ``fcntl.flock`` on ``<directory>/.lock``: one owner per run / output directory.

    The OS drops the lock when the process dies (kill -9 included), so a stale lock never blocks a restart.
    The file records the holder (pid, host, start time) for the message a second process gets. Under
    ``accelerate launch`` only the main process acquires it.
    """

    def __init__(self, directory: str | Path, what: str = "directory") -> None:
        self.directory, self.what, self._fd = Path(directory), what, None

    def acquire(self) -> DirectoryLock:
        path = self.directory / LOCK_FILE
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as err:
            raise write_error(err, path) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.read(fd, 4096) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
                   if holder else "another process")
            raise DirectoryLockedError(f"{self.what} {self.directory} is in use by {who}; wait for it to finish, "
                                       "stop it, or use another directory") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DirectoryLock:  # ``with lock.acquire():`` (a lock never acquired releases nothing)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_directory(accelerator, directory: str | Path, what: str,
                    check: Callable[[], None] | None = None) -> DirectoryLock:
    """The start of every command that owns an output directory: the main process locks it, removes the
    temporary files a killed write left there, then runs ``check`` (the directory's own rules). Every process
    raises the same error (none waits for another). Use the result as a context manager: ``with claim...:``."""
    from accelerate.utils import broadcast_object_list

    lock = DirectoryLock(directory, what)
    problem: Exception | None = None
    if accelerator.is_main_process:
        try:
            lock.acquire()
            for f in remove_stale_tmp(directory):
                print(f"removed {f} (left by an interrupted write)")
            if check is not None:
                check()
        except (UserError, OSError) as err:
            lock.release()
            problem = err
    if accelerator.num_processes > 1:
        message = broadcast_object_list([None if problem is None else str(problem)])[0]
        if message is not None and problem is None:
            raise RunDirError(message)
    if problem is not None:
        raise problem
    return lock


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
