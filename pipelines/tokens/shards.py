"""The token shard format: the only contract between stage one (tokenizer) and stage two (AR generator).

A shard directory holds ``manifest.json`` (a ``ShardManifest``, written last) and ``shard_NNNNN.safetensors``
files. Shard k holds the images [k*S, (k+1)*S) of the sorted ImageFolder listing (S = ``shard_size``) as three
arrays: ``tokens`` (n, V, h, w) in ``token_dtype(num_codes)``, ``labels`` (n,) int32 and ``indices`` (n,) int64
(each image's position in the listing). V counts the stored views (``variants``; variant 0 is the centre crop).

Why safetensors rather than .npy: one shard is one file, so "complete" is one atomic rename and one checksum.
The header gives each array's byte offset, so the reader memory-maps it with ``np.memmap`` (zero copy, random
access, uint16 included, which torch handles poorly) and loads no code (unlike pickle).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import Tensor
from torch.utils.data import Dataset

from pipelines.data import DatasetNotFoundError, augment_seed
from pipelines.errors import UserError
from pipelines.util import atomic_write, atomic_write_text, file_sha256

TOKEN_SHARD_FORMAT = "ibq-token-shards/1"
MANIFEST_FILE = "manifest.json"
_SAFETENSORS_DTYPES = {"U8": "u1", "U16": "<u2", "I32": "<i4", "I64": "<i8", "U32": "<u4", "I16": "<i2"}


class ShardMismatchError(UserError, ValueError):
    """Token shards made with a different tokenizer (codebook size, grid or weights) than the one configured."""


class ShardIntegrityError(UserError, RuntimeError):
    """A token shard that is missing, truncated or altered since extraction; the message names the file."""


def token_dtype(num_codes: int) -> np.dtype:
    """uint16 holds ids of codebooks up to 2^16 codes; larger ones (2^18 ...) use int32."""
    return np.dtype(np.uint16) if num_codes <= 1 << 16 else np.dtype(np.int32)


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


@dataclass
class ShardManifest:
    """``manifest.json``. Deterministic (no times, no process count), so any world size writes the same bytes."""

    num_images: int
    num_tokens: int
    num_codes: int
    grid: list[int]                      # [h, w]
    dtype: str                           # token_dtype(num_codes).name
    variants: list[str]                  # stored views, in storage order; variant 0 = "center"
    resolution: int
    classes: list[str]
    num_classes: int
    tokenizer_hash: str                  # pipelines.checkpoint.weights_hash of the tokenizer
    tokenizer_path: str | None
    dataset: dict[str, str]              # root, split
    shard_size: int
    num_shards: int
    shards: list[dict[str, Any]]         # file, start, end, count, bytes, sha256
    skipped: list[dict[str, Any]] = field(default_factory=list)   # corrupt images left out: index, path
    settings: dict[str, Any] = field(default_factory=dict)        # what a resumed extraction must match
    format: str = TOKEN_SHARD_FORMAT

    def __post_init__(self) -> None:
        problems = [what for what, bad in (
            ("grid is not [h, w]", len(self.grid) != 2),
            (f"dtype {self.dtype!r} is not uint16 or int32", self.dtype not in ("uint16", "int32")),
            (f"{len(self.shards)} shards listed, num_shards {self.num_shards}", len(self.shards) != self.num_shards),
            ("variant 0 is not 'center'", not self.variants or self.variants[0] != "center"),
            (f"{len(self.classes)} classes but num_classes is {self.num_classes}",
             len(self.classes) != self.num_classes),
        ) if bad]
        if problems:
            raise ShardIntegrityError(f"invalid token shard manifest: {'; '.join(problems)}")

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps({"format": d.pop("format"), **d}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_FILE) -> ShardManifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise ShardIntegrityError(f"{where} is damaged ({err.msg} at character {err.pos}); run the extraction "
                                      "command again: it rewrites the manifest from the verified shards") from err
        if not isinstance(d, dict):
            raise ShardIntegrityError(f"{where} is not a token shard manifest (a JSON object)")
        if d.get("format") != TOKEN_SHARD_FORMAT:
            raise ShardMismatchError(f"{where}: format {d.get('format')!r}, expected {TOKEN_SHARD_FORMAT!r}")
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        if missing := sorted(required - set(d)):
            raise ShardIntegrityError(f"{where} lacks the keys {missing}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def read(cls, shard_dir: str | Path) -> ShardManifest:
        path = Path(shard_dir) / MANIFEST_FILE
        if not path.exists():
            raise DatasetNotFoundError(f"no token shards at {shard_dir} ({MANIFEST_FILE} missing); "
                                       "run `python -m pipelines.tokens.extract` (make tokenize) first")
        try:
            text = path.read_text()
        except UnicodeDecodeError as err:
            raise ShardIntegrityError(f"{path} is damaged (not UTF-8 text); run the extraction command again: it "
                                      "rewrites the manifest from the verified shards") from err
        return cls.from_json(text, str(path))

    def write(self, shard_dir: str | Path) -> None:
        atomic_write_text(Path(shard_dir) / MANIFEST_FILE, self.to_json())

    def check(self, shard_dir: str | Path, num_codes: int | None = None, grid: tuple[int, int] | None = None,
              tokenizer_hash: str | None = None) -> None:
        """``ShardMismatchError`` naming both values when an expectation (None = any) differs."""
        for what, expected, found in (("num_codes", num_codes, self.num_codes),
                                      ("grid", None if grid is None else list(grid), self.grid),
                                      ("tokenizer_hash", tokenizer_hash, self.tokenizer_hash)):
            if expected is not None and expected != found:
                raise ShardMismatchError(
                    f"token shards in {shard_dir} do not match the configured tokenizer: {what} is {found} in the "
                    f"shards (tokenizer {self.tokenizer_path}) but {expected} is expected; re-extract the tokens "
                    "with this tokenizer")


def write_shard(path: Path, tokens: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                description: str) -> dict[str, Any]:
    """One shard, atomically; returns its record (file, count, bytes, sha256) for the manifest."""
    arrays = {"tokens": tokens, "labels": labels.astype(np.int32), "indices": indices.astype(np.int64)}
    # One metadata key: safetensors stores the metadata map in hash order, which would vary between runs.
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata={"format": f"{TOKEN_SHARD_FORMAT} {description}"}))
    return {"file": path.name, "count": len(labels), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _safetensors_layout(path: Path) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int]], int]:
    """Parse a safetensors header: name -> (numpy dtype, shape, absolute byte offset), and the file size the
    header implies (8 bytes little-endian header length, a JSON header, then raw little-endian C-order arrays)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ShardIntegrityError(f"token shard {path} is truncated ({len(raw)} bytes, no header)")
        n = int.from_bytes(raw, "little")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ShardIntegrityError(f"token shard {path} has a damaged header ({err})") from err
    header.pop("__metadata__", None)
    layout, end = {}, 8 + n
    for name, t in header.items():
        begin, stop = t["data_offsets"]
        layout[name] = (np.dtype(_SAFETENSORS_DTYPES[t["dtype"]]), tuple(t["shape"]), 8 + n + begin)
        end = max(end, 8 + n + stop)
    return layout, end


def check_shard(shard_dir: Path, manifest: ShardManifest, k: int, verify: bool) -> dict:
    """Shard k's layout after checking its size, arrays (dtype, shape) and, with ``verify``, its sha256."""
    entry = manifest.shards[k]
    path = shard_dir / entry["file"]
    if not path.exists():
        raise ShardIntegrityError(f"token shard {path} listed in {MANIFEST_FILE} is missing")
    layout, expected_size = _safetensors_layout(path)
    size = path.stat().st_size
    if size != expected_size or size != entry.get("bytes", size):
        raise ShardIntegrityError(f"token shard {path} is truncated or altered: {size} bytes, "
                                  f"expected {entry.get('bytes', expected_size)}")
    count = entry["count"]
    expected = {"tokens": (np.dtype(manifest.dtype), (count, len(manifest.variants), *manifest.grid)),
                "labels": (None, (count,)), "indices": (None, (count,))}
    for name, (dtype, shape) in expected.items():
        found = layout.get(name)
        if found is None or found[1] != shape or (dtype is not None and found[0] != dtype):
            raise ShardIntegrityError(f"token shard {path} holds {name} as "
                                      f"{(None, None) if found is None else found[:2]}, the manifest says "
                                      f"{(dtype, shape)}")
    if verify and (found := file_sha256(path)) != entry["sha256"]:
        raise ShardIntegrityError(f"token shard {path} fails its checksum (sha256 {found[:16]}..., manifest "
                                  f"{entry['sha256'][:16]}...): the file was altered or damaged; re-run "
                                  "extraction with the same settings to rebuild it")
    _check_ranges(path, open_shard(path, layout), manifest)
    return layout


def _check_ranges(path: Path, arrays: dict[str, np.ndarray], manifest: ShardManifest) -> None:
    """Token ids in [0, num_codes) and labels in [0, num_classes): one pass over the memory-mapped arrays, so a
    shard that disagrees with its manifest is named here rather than failing as an IndexError mid-training."""
    for name, bound, what in (("tokens", manifest.num_codes, "num_codes"),
                              ("labels", manifest.num_classes, "num_classes")):
        a = arrays[name]
        if a.size and (int(a.min()) < 0 or int(a.max()) >= bound):
            raise ShardIntegrityError(f"token shard {path} holds {name} in [{int(a.min())}, {int(a.max())}] but the "
                                      f"manifest's {what} is {bound}: the shard and manifest.json do not belong "
                                      "together; re-extract with overwrite=true")


def open_shard(path: Path, layout: dict) -> dict[str, np.ndarray]:
    """The arrays of a checked shard, memory-mapped read-only (empty arrays as plain zeros)."""
    return {name: np.memmap(path, dtype=dt, mode="r", offset=off, shape=shape) if np.prod(shape) else
            np.zeros(shape, dt) for name, (dt, shape, off) in layout.items()}


class TokenShardDataset(Dataset):
    """Pre-extracted token grids (``python -m pipelines.tokens.extract``) as a map-style dataset.

    ``ds[i]`` -> (tokens of variant 0 as a LongTensor (h*w,) in raster order, label); ``ds[(i, epoch)]`` ->
    a variant drawn by a generator seeded with (seed, epoch, i) when ``variant == "random"`` (the
    ``EpochBatchSampler`` convention, so resuming reproduces the same views). ``variant`` may also name
    one stored variant (e.g. ``"center"``) to always use it.

    Shards are memory-mapped (opened lazily in each DataLoader worker), so the dataset costs no RAM
    beyond the page cache. On construction the manifest is checked against ``expect_*`` (a mismatch
    raises ``ShardMismatchError`` naming both values), every shard's size against its header and, with
    ``verify=True``, its sha256 against the manifest (``ShardIntegrityError`` naming the file).
    """

    def __init__(self, shard_dir: str | Path, variant: str = "random", seed: int = 0, verify: bool = True,
                 expect_num_codes: int | None = None, expect_grid: tuple[int, int] | None = None,
                 expect_tokenizer_hash: str | None = None) -> None:
        self.shard_dir = Path(shard_dir)
        self.manifest = m = ShardManifest.read(self.shard_dir)
        m.check(self.shard_dir, expect_num_codes, expect_grid, expect_tokenizer_hash)
        self.variants: list[str] = list(m.variants)
        if variant != "random" and variant not in self.variants:
            raise ShardMismatchError(f"variant {variant!r} is not stored in {self.shard_dir}; choose 'random' or "
                                     f"one of {self.variants}")
        self.variant, self.seed = variant, seed
        self.grid: tuple[int, int] = tuple(m.grid)
        self.num_codes: int = m.num_codes
        self._layouts = [check_shard(self.shard_dir, m, k, verify) for k in range(len(m.shards))]
        counts = [s["count"] for s in m.shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._arrays: list[dict[str, np.ndarray] | None] | None = None
        self.labels = np.concatenate([self._shard(k)["labels"] for k in range(len(counts))]).astype(np.int64) \
            if counts else np.zeros(0, np.int64)

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = [None] * len(self._layouts)
        if self._arrays[k] is None:
            self._arrays[k] = open_shard(self.shard_dir / self.manifest.shards[k]["file"], self._layouts[k])
        return self._arrays[k]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}  # memmaps are reopened in each worker, not pickled

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = (key, None) if isinstance(key, int | np.integer) else key
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} token grids")
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        local = index - int(self._starts[k])
        if self.variant != "random":
            v = self.variants.index(self.variant)
        elif epoch is None or len(self.variants) == 1:
            v = 0
        else:
            gen = torch.Generator().manual_seed(augment_seed(self.seed, epoch, index))
            v = int(torch.randint(0, len(self.variants), (1,), generator=gen))
        tokens = np.asarray(self._shard(k)["tokens"][local, v]).reshape(-1).astype(np.int64)
        return torch.from_numpy(tokens), int(self.labels[index])
