"""``hf://owner/name[@revision][/subfolder]``: checkpoints on the Hugging Face Hub wherever a checkpoint is taken.

The one resolver. ``pipelines.checkpoint`` calls ``resolve_checkpoint`` for every checkpoint directory it reads
(``load_model``, ``load_config``, ``weights_hash``: so ``load_tokenizer``, ``load_generator``, ``init_from`` and every
tool), and the converter calls ``resolve_file`` for an official file; a local path passes through unchanged.

A spec is fetched by ``huggingface_hub`` into its cache (``HF_HOME`` / ``HF_HUB_CACHE``), only the files asked for
under the subfolder, once per process: later reads of the same spec use the same commit, so a checkpoint's weights,
config and weights hash come from one commit even if the branch moves meanwhile. ``HF_HUB_OFFLINE=1`` reads the
cache only. Every failure is one line naming the repository, revision and subfolder and what to do. The commit a spec
resolved to is kept: ``hub_commit`` / ``resolved_commits`` for the records outputs keep, ``pinned`` for a spec that
names it. A leaf module: it imports nothing else from the project, and ``huggingface_hub`` only when fetching.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote

from pipelines.errors import ConfigError, UserError

PREFIX = "hf://"
FORM = "hf://owner/name[@revision][/subfolder]"
RESULTS_ROOT = Path("runs") / "hf"  # tools' default output folder for a checkpoint on the Hub (the cache is not ours)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class HubSpecError(ConfigError):
    """An ``hf://`` spec that is not of the form ``hf://owner/name[@revision][/subfolder]``."""


class HubFetchError(UserError, OSError):
    """A spec that could not be fetched (no such repository, revision or file; offline and not cached)."""


@dataclass(frozen=True)
class HubSpec:
    repo: str               # owner/name
    revision: str | None    # branch, tag or commit; None: the default branch
    path: str               # subfolder (a checkpoint directory) or file inside the repository; "" = the root

    def __str__(self) -> str:
        rev = f"@{quote(self.revision, safe='')}" if self.revision else ""
        return f"{PREFIX}{self.repo}{rev}{'/' + self.path if self.path else ''}"

    def describe(self, what: str = "subfolder") -> str:
        """``repository o/n, revision main, subfolder x`` for messages."""
        return (f"repository {self.repo}, revision {self.revision or 'main (default)'}, "
                f"{what} {self.path or '(the root)'}")


def is_hub(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_spec(spec: str, file: bool = False) -> HubSpec:
    """``hf://owner/name[@revision][/path]``; ``file``: a path to one file is required. A revision holding a ``/``
    is written with ``%2F``. Anything else is a one-line ``HubSpecError``."""
    parts = spec[len(PREFIX):].split("/") if is_hub(spec) else []
    while len(parts) > 2 and parts[-1] == "":
        parts.pop()  # a trailing slash
    owner, name_rev, path = (parts[0], parts[1], parts[2:]) if len(parts) >= 2 else ("", "", [])
    name, at, revision = name_rev.partition("@")
    form = "hf://owner/name[@revision]/path/to/file" if file else FORM
    problem = None
    if not (_NAME.fullmatch(owner) and _NAME.fullmatch(name)):
        problem = "owner and name are required (letters, digits, '.', '_', '-')"
    elif at and not revision:
        problem = "an empty revision after '@'"
    elif any(p in ("", ".", "..") for p in path):
        problem = "an empty, '.' or '..' path component"
    elif file and not path:
        problem = "no file path after the repository"
    if problem:
        raise HubSpecError(f"{spec!r} is not a Hugging Face Hub spec ({problem}); expected {form}")
    return HubSpec(f"{owner}/{name}", unquote(revision) if at else None, "/".join(path))


def check_spec(spec: object, file: bool = False) -> None:
    """Parse ``spec`` when it is an ``hf://`` one (the option checks call this before any work)."""
    if is_hub(spec):
        parse_spec(spec, file)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- resolving

@dataclass(frozen=True)
class _Resolved:
    path: Path      # the local directory or file
    commit: str     # the commit it was fetched from


_RESOLVED: dict[tuple, _Resolved] = {}   # (endpoint, cache, kind, spec, files) -> what it resolved to, this process
_COMMITS: dict[str, str] = {}            # str(HubSpec) -> commit: the records


def resolve_checkpoint(spec: str | Path, files: Sequence[str]) -> Path:
    """The local directory of a checkpoint: ``spec`` itself, or for an ``hf://`` spec its subfolder in the snapshot of
    the commit the revision names, holding ``files`` (fetched unless cached; only these files)."""
    if not is_hub(spec):
        return Path(spec)
    s = parse_spec(str(spec))
    key = _key("dir", s, tuple(files))
    if key not in _RESOLVED:
        from huggingface_hub import snapshot_download

        prefix = f"{s.path}/" if s.path else ""
        with _fetching(s, "subfolder"), _bars_on_terminal_only():
            snapshot = Path(snapshot_download(s.repo, revision=s.revision, allow_patterns=[prefix + f for f in files]))
        directory = snapshot / s.path
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise HubFetchError(f"{s}: {' and '.join(missing)} not found in {s.describe()} (commit {snapshot.name}); "
                                "is it a checkpoint directory of this project? Check the subfolder after the name")
        _remember(key, s, directory, snapshot.name)
    return _RESOLVED[key].path


def resolve_file(spec: str | Path) -> Path:
    """A local file: ``spec`` itself, or for ``hf://owner/name[@revision]/path/to/file`` that file (fetched unless
    cached)."""
    if not is_hub(spec):
        return Path(spec)
    s = parse_spec(str(spec), file=True)
    key = _key("file", s, ())
    if key not in _RESOLVED:
        from huggingface_hub import hf_hub_download

        subfolder, _, filename = s.path.rpartition("/")
        with _fetching(s, "file"), _bars_on_terminal_only():
            path = Path(hf_hub_download(s.repo, filename, subfolder=subfolder or None, revision=s.revision))
        commit = path.parents[len(PurePosixPath(s.path).parts) - 1].name  # .../snapshots/<commit>/<path>
        _remember(key, s, path, commit)
    return _RESOLVED[key].path


def hub_commit(spec: object) -> str | None:
    """The commit an ``hf://`` spec resolved to in this process (None: a local path, or not resolved yet)."""
    return _COMMITS.get(str(parse_spec(spec))) if is_hub(spec) else None  # type: ignore[arg-type]


def hub_record(spec: object) -> dict[str, str]:
    """``{"hub_commit": sha}`` for a resolved ``hf://`` spec, ``{}`` otherwise: merged into the records outputs keep."""
    commit = hub_commit(spec)
    return {"hub_commit": commit} if commit else {}


def resolved_commits() -> dict[str, str]:
    """Every ``hf://`` spec resolved in this process -> its commit (the provenance an evaluation records)."""
    return dict(_COMMITS)


def pinned(spec: str | Path) -> str:
    """A spec that names what was read: an ``hf://`` spec with its revision replaced by the commit it resolved to
    (unchanged if not resolved yet), a local path as a path string."""
    if not is_hub(spec):
        return str(Path(spec))
    s = parse_spec(str(spec))
    commit = _COMMITS.get(str(s))
    return str(HubSpec(s.repo, commit, s.path)) if commit else str(s)


def results_dir(spec: str | Path) -> Path:
    """Where a tool writes results about a checkpoint by default: the checkpoint directory itself, or for an ``hf://``
    spec (the cache is no place for them) ``runs/hf/<owner>/<name>[@revision][/subfolder]``."""
    return RESULTS_ROOT / str(parse_spec(str(spec)))[len(PREFIX):] if is_hub(spec) else Path(spec)


def forget() -> None:
    """Drop what this process resolved (tests; a long-lived process that wants a branch's newest commit)."""
    _RESOLVED.clear()
    _COMMITS.clear()


def _key(kind: str, s: HubSpec, files: tuple[str, ...]) -> tuple:
    from huggingface_hub import constants

    return constants.ENDPOINT, constants.HF_HUB_CACHE, kind, str(s), files


def _remember(key: tuple, s: HubSpec, path: Path, commit: str) -> None:
    _RESOLVED[key] = _Resolved(path, commit)
    _COMMITS[str(s)] = commit
    print(f"{s}: commit {commit[:12]} -> {path}")


@contextmanager
def _bars_on_terminal_only() -> Iterator[None]:
    """huggingface_hub's download bars on a terminal; none in a log file (the one ``commit -> path`` line says it)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if sys.stderr.isatty() or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


@contextmanager
def _fetching(s: HubSpec, what: str) -> Iterator[None]:
    """``huggingface_hub``'s errors as one ``HubFetchError`` line naming the repository, revision, path and the fix."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where, hub = s.describe(what), constants.ENDPOINT
    try:
        yield
    except RevisionNotFoundError as err:
        raise HubFetchError(f"{s}: revision {s.revision} not found ({where}) on {hub}; name an existing branch, "
                            "tag or commit after '@'") from err
    except RepositoryNotFoundError as err:  # also private and gated repositories without a token
        raise HubFetchError(f"{s}: repository {s.repo} not found on {hub} ({where}); check the name, or for a private "
                            "or gated repository log in (`hf auth login`) or set HF_TOKEN") from err
    except LocalEntryNotFoundError as err:  # offline, or the Hub unreachable, and not in the cache
        if constants.HF_HUB_OFFLINE:
            raise HubFetchError(f"{s}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
                                f"forbids fetching it ({where}); fetch it once online (unset HF_HUB_OFFLINE) or pass "
                                "a local path") from err
        raise HubFetchError(f"{s}: could not reach {hub} and it is not in the Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}) ({where}); check the network (and HF_ENDPOINT), or pass a "
                            "local path") from err
    except EntryNotFoundError as err:
        raise HubFetchError(f"{s}: {what} {s.path} not found ({where}) on {hub}; check the path after the "
                            "repository name") from err
    except HfHubHTTPError as err:
        first = " ".join(str(err).split("\n\n")[0].split())
        raise HubFetchError(f"{s}: the Hub ({hub}) refused the request ({where}): {first}") from err
