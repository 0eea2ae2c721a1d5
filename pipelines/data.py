"""Image data: ImageFolder reading (demo data and ImageNet alike), transforms, and a resumable sampler.

Randomness in the data pipeline is a pure function of (seed, epoch, image index): the sampler's
permutation is seeded per epoch and every random crop/flip draws from a generator seeded by
(seed, epoch, index). Resuming mid-epoch therefore reproduces exactly the batches an uninterrupted
run would have seen, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class CorruptImageError(RuntimeError):
    """An image file that cannot be decoded; the message names the file."""


class DatasetNotFoundError(FileNotFoundError):
    pass


def scan_image_folder(split_dir: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``split_dir/<class>/<image>`` -> (samples as (path, class index), sorted class names).

    Works for the demo tree (``train/00_red_circle/00000.png``) and ImageNet's
    (``train/n01440764/n01440764_10026.JPEG``); classes are sorted so indices match torchvision.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetNotFoundError(
            f"image folder {split_dir} does not exist; expected <root>/<split>/<class>/<images> "
            "(run `make demo-data` for the built-in dataset)"
        )
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"{split_dir} has no class sub-folders (<split>/<class>/<images>)")
    samples = [
        (str(f), i)
        for i, c in enumerate(classes)
        for f in sorted((split_dir / c).iterdir())
        if f.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not samples:
        raise DatasetNotFoundError(f"{split_dir} has class folders but no images ({IMAGE_EXTENSIONS})")
    return samples, classes


def save_class_index(classes: Sequence[str], path: str | Path) -> None:
    """Class name -> index mapping as JSON, so later stages decode labels the same way."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({c: i for i, c in enumerate(classes)}, indent=1))


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic per-(seed, epoch, image) seed for random crops and flips."""
    return hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise CorruptImageError(f"cannot decode image {path}: {err}") from err


def load_rgb_or_skip(path: str, on_corrupt: str) -> Image.Image | None:
    """``load_rgb``, except that with ``on_corrupt='skip'`` a corrupt file warns (naming it) and gives None."""
    try:
        return load_rgb(path)
    except CorruptImageError as err:
        if on_corrupt == "error":
            raise
        warnings.warn(f"skipping corrupt image {path} ({err.__cause__})", stacklevel=3)
        return None


def resize_and_crop(img: Image.Image, resolution: int, generator: torch.Generator | None) -> Tensor:
    """Shorter side -> ``resolution``, then a crop (random when a generator is given, else centre)
    and, when random, a horizontal flip with probability 1/2. Returns (3, R, R) in [-1, 1]."""
    img = TF.resize(img, resolution, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    w, h = img.size
    if generator is None:
        img = TF.center_crop(img, [resolution, resolution])
    else:
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
        img = TF.crop(img, top, left, resolution, resolution)
        if torch.rand((), generator=generator) < 0.5:
            img = TF.hflip(img)
    return TF.to_tensor(img) * 2.0 - 1.0


class ImageFolderDataset(Dataset):
    """Images and labels from ``root/split/<class>/*``.

    Index with an int for the deterministic (centre-crop) view, or with ``(index, epoch)`` for the
    training augmentation. A corrupt file is skipped with a warning naming it (``on_corrupt='skip'``;
    the collate function drops it) or raises ``CorruptImageError`` (``on_corrupt='error'``).
    """

    def __init__(self, root: str | Path, split: str, resolution: int, on_corrupt: str = "skip",
                 seed: int = 0) -> None:
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
        self.samples, self.classes = scan_image_folder(Path(root) / split)
        self.resolution, self.on_corrupt, self.seed = resolution, on_corrupt, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int] | None:
        index, epoch = (key, None) if isinstance(key, int) else key
        path, label = self.samples[index]
        img = load_rgb_or_skip(path, self.on_corrupt)
        if img is None:
            return None
        gen = None
        if epoch is not None:
            gen = torch.Generator().manual_seed(augment_seed(self.seed, epoch, index))
        return resize_and_crop(img, self.resolution, gen), label


def collate_images(batch: list[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor]:
    """Stack images and labels, dropping the ``None`` of skipped corrupt files."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.long)
    return torch.stack([b[0] for b in kept]), torch.tensor([b[1] for b in kept])


class EpochBatchSampler(Sampler[list]):
    """Per-process batches of one epoch: a seeded permutation cut into global batches of
    ``batch_size * world_size``, of which process ``rank`` takes its slice. The last incomplete
    global batch is dropped so every process runs the same number of steps.

    ``set_epoch(epoch, skip_batches)`` picks the epoch and how many batches to skip (resume).
    With ``shuffle=False`` the order is fixed and items are plain ints (no augmentation).
    """

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True) -> None:
        self.num_items, self.batch_size = num_items, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.skip_batches = 0, 0
        if self.drop_last and len(self) == 0:
            raise ValueError(f"{num_items} images cannot fill one global batch of {self._global} "
                             f"({batch_size} per process x {world_size} processes)")

    @property
    def _global(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        full, rest = divmod(self.num_items, self._global)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[list]:
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_items)
        for b in range(self.skip_batches, len(self)):
            chunk = order[b * self._global:(b + 1) * self._global]
            mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
            if not mine:
                continue
            yield [(i, self.epoch) for i in mine] if self.shuffle else mine


def make_loader(dataset: Dataset, sampler: EpochBatchSampler, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_images,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


# ----------------------------------------------------------------------------------------------
# Token views (what pipelines/extract_tokens.py feeds the tokenizer) and the token shard reader.

TOKEN_SHARD_FORMAT = "ibq-token-shards/1"
MANIFEST_FILE = "manifest.json"
TEN_CROP_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


class ShardMismatchError(ValueError):
    """Token shards made with a different tokenizer (codebook size, grid or weights) than the one configured."""


class ShardIntegrityError(RuntimeError):
    """A token shard that is missing, truncated or altered since extraction; the message names the file."""


def token_variant_names(flip: bool, ten_crop: bool) -> list[str]:
    """Names of the stored views of each image, in storage order. Variant 0 is always the plain centre
    crop (the tokenizer's own eval transform); ten-crop adds LlamaGen's 10 views of a slightly larger
    resize (4 corners + centre, then the same 5 flipped)."""
    names = ["center"] + (["center_hflip"] if flip else [])
    if ten_crop:
        names += [f"tencrop_{n}" for n in TEN_CROP_NAMES] + [f"tencrop_{n}_hflip" for n in TEN_CROP_NAMES]
    return names


def token_views(img: Image.Image, resolution: int, flip: bool = False, ten_crop: bool = False,
                ten_crop_scale: float = 1.1) -> Tensor:
    """All variants of one image as (V, 3, R, R) in [-1, 1], ordered as ``token_variant_names``.

    The centre crop is ``resize_and_crop`` exactly (shorter side -> R, bicubic, centre crop), so tokens of
    variant 0 equal what the tokenizer saw at evaluation. Ten-crop follows LlamaGen's extract_codes: centre
    crop at ``R * ten_crop_scale``, then ``TenCrop(R)``.
    """
    center = resize_and_crop(img, resolution, None)
    views = [center] + ([torch.flip(center, dims=[-1])] if flip else [])
    if ten_crop:
        big = resize_and_crop(img, round(resolution * ten_crop_scale), None)
        crops = list(TF.ten_crop(big, [resolution, resolution]))  # 5 crops, then the same 5 of the flip
        views += crops
    return torch.stack(views)


def _safetensors_layout(path: Path) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int]], int]:
    """Parse a safetensors header: name -> (numpy dtype, shape, absolute byte offset), and the file size
    the header implies. The format is 8 bytes little-endian header length, a JSON header, then raw
    little-endian C-order arrays, so each tensor can be memory-mapped with ``np.memmap`` directly."""
    dtypes = {"U8": "u1", "U16": "<u2", "I32": "<i4", "I64": "<i8", "U32": "<u4", "I16": "<i2"}
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
        layout[name] = (np.dtype(dtypes[t["dtype"]]), tuple(t["shape"]), 8 + n + begin)
        end = max(end, 8 + n + stop)
    return layout, end


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class TokenShardDataset(Dataset):
    """Pre-extracted token grids (``python -m pipelines.extract_tokens``) as a map-style dataset.

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
        path = self.shard_dir / MANIFEST_FILE
        if not path.exists():
            raise DatasetNotFoundError(f"no token shards at {self.shard_dir} ({MANIFEST_FILE} missing); "
                                       "run `python -m pipelines.extract_tokens` (make tokenize) first")
        self.manifest: dict = json.loads(path.read_text())
        m = self.manifest
        if m.get("format") != TOKEN_SHARD_FORMAT:
            raise ShardMismatchError(f"{path}: format {m.get('format')!r}, expected {TOKEN_SHARD_FORMAT!r}")
        for what, expected, found in (("num_codes", expect_num_codes, m["num_codes"]),
                                      ("grid", None if expect_grid is None else list(expect_grid), m["grid"]),
                                      ("tokenizer_hash", expect_tokenizer_hash, m["tokenizer_hash"])):
            if expected is not None and expected != found:
                raise ShardMismatchError(
                    f"token shards in {self.shard_dir} do not match the configured tokenizer: {what} is "
                    f"{found} in the shards (tokenizer {m.get('tokenizer_path')}) but {expected} is expected; "
                    "re-extract the tokens with this tokenizer")
        self.variants: list[str] = list(m["variants"])
        if variant != "random" and variant not in self.variants:
            raise ValueError(f"variant {variant!r} is not stored in {self.shard_dir}; choose 'random' or one of "
                             f"{self.variants}")
        self.variant, self.seed = variant, seed
        self.grid: tuple[int, int] = tuple(m["grid"])
        self.num_codes: int = m["num_codes"]
        self._layouts = [self._check_shard(s, verify) for s in m["shards"]]
        counts = [s["count"] for s in m["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._arrays: list[dict[str, np.ndarray]] | None = None
        self.labels = np.concatenate([self._shard(k)["labels"] for k in range(len(counts))]).astype(np.int64) \
            if counts else np.zeros(0, np.int64)

    def _check_shard(self, entry: dict, verify: bool) -> dict:
        path = self.shard_dir / entry["file"]
        if not path.exists():
            raise ShardIntegrityError(f"token shard {path} listed in {MANIFEST_FILE} is missing")
        layout, expected_size = _safetensors_layout(path)
        size = path.stat().st_size
        if size != expected_size or size != entry.get("bytes", size):
            raise ShardIntegrityError(f"token shard {path} is truncated or altered: {size} bytes, "
                                      f"expected {entry.get('bytes', expected_size)}")
        count = entry["count"]
        expected = {"tokens": (np.dtype(self.manifest["dtype"]), (count, len(self.manifest["variants"]),
                                                                   *self.manifest["grid"])),
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
        return layout

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = [None] * len(self._layouts)
        if self._arrays[k] is None:
            path = self.shard_dir / self.manifest["shards"][k]["file"]
            self._arrays[k] = {
                name: np.memmap(path, dtype=dt, mode="r", offset=off, shape=shape) if np.prod(shape) else
                np.zeros(shape, dt) for name, (dt, shape, off) in self._layouts[k].items()}
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
