"""Image data: ImageFolder reading (demo data and ImageNet alike), transforms, and a resumable sampler.

Randomness in the data pipeline is a pure function of (seed, epoch, image index): the sampler's
permutation is seeded per epoch and every random crop/flip draws from a generator seeded by
(seed, epoch, index). Resuming mid-epoch therefore reproduces exactly the batches an uninterrupted
run would have seen, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from pipelines.errors import ConfigError, UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def image_files(directory: str | Path, recursive: bool = True) -> list[Path]:
    """Image files (by extension) under ``directory``, sorted; ``recursive=False`` looks at its own files only."""
    found = Path(directory).rglob("*") if recursive else Path(directory).iterdir()
    return sorted(f for f in found if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())


class CorruptImageError(UserError, RuntimeError):
    """An image file that cannot be decoded; the message names the file."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """An image folder or token-shard directory that is absent or empty."""


def scan_image_folder(split_dir: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``split_dir/<class>/<image>`` -> (samples as (path, class index), sorted class names).

    Works for the demo tree (``train/00_red_circle/00000.png``) and ImageNet's
    (``train/n01440764/n01440764_10026.JPEG``); classes are sorted so indices match torchvision.
    Symbolic links are followed (a linked class folder or image counts as if it were there); a class folder
    without images is an error, since it would still take a class index.
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
    per_class = [image_files(split_dir / c, recursive=False) for c in classes]
    if not any(per_class):
        raise DatasetNotFoundError(f"{split_dir} has class folders but no images ({IMAGE_EXTENSIONS})")
    if empty := [c for c, files in zip(classes, per_class, strict=True) if not files]:
        raise DatasetNotFoundError(f"class folder {split_dir / empty[0]} has no images ({len(empty)} empty class "
                                   f"folder(s) in {split_dir}); add images or remove it: it would still take a class "
                                   "index")
    samples = [(str(f), i) for i, files in enumerate(per_class) for f in files]
    return samples, classes


def save_class_index(classes: Sequence[str], path: str | Path) -> None:
    """Class name -> index mapping as JSON, so later stages decode labels the same way."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({c: i for i, c in enumerate(classes)}, indent=1))


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic per-(seed, epoch, image) seed for random crops and flips."""
    return hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, 8 bits per channel. 16-bit greyscale (PIL modes I;16* and I) is scaled to 8 bits (v / 257), not
    clipped at 255 as ``convert`` would do (which turns nearly every pixel white)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        import numpy as np

        a = np.asarray(img).astype(np.float64)
        scale = 257.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(np.rint(a / scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return _to_rgb(img)
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
            raise ConfigError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
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

    ``set_epoch(epoch, skip_batches)`` picks the epoch and how many batches to skip (resume). Items are
    ``(index, epoch)`` pairs, so the dataset draws that epoch's augmentation.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.num_items, self.batch_size = num_items, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.skip_batches = 0, 0
        if len(self) == 0:
            raise ConfigError(f"{num_items} images cannot fill one global batch of {self._global} "
                             f"({batch_size} per process x {world_size} processes)")

    @property
    def _global(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        return self.num_items // self._global

    def __iter__(self) -> Iterator[list]:
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for b in range(self.skip_batches, len(self)):
            chunk = order[b * self._global:(b + 1) * self._global]
            mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
            yield [(i, self.epoch) for i in mine]


def collate_tokens(batch: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """Stack token grids and labels (token shards hold no corrupt items to drop)."""
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


def make_loader(dataset: Dataset, sampler: EpochBatchSampler, num_workers: int,
                collate: Callable[[list], tuple[Tensor, Tensor]] = collate_images) -> DataLoader:
    """The trainers' loader: batches from ``sampler``; ``collate_images`` for images, ``collate_tokens`` for tokens."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)
