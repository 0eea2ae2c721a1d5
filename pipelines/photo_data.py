"""A real-photograph ImageFolder without downloads: random crops of the colour photographs that ship inside the
scikit-image wheel (``skimage/data``), for measuring the tokenizer on photographs rather than synthetic shapes.

The val split is made of whole photographs that the train split never sees (``VAL_PHOTOS``), so val figures are
about generalisation, not memorisation of seven pictures. Each crop is a square of side ``scale`` x the
photograph's short side (``scale`` uniform in [min_scale, max_scale]) at a uniform position, resized with
antialiasing; train crops are also flipped left-right with probability 1/2. Crop ``i`` of a photograph is drawn
from a generator seeded by (seed, split, photograph, i), so the dataset is a function of its parameters, and the
64 and 128 px trees hold the same crops.

Layout::

    <root>/<size>px/{train,val}/<photograph>/<index:05d>.png     (one class folder per photograph)
    <root>/<size>px/photo_meta.json                              (parameters; written last)

Usage::

    python tools/make_photo_data.py root=data/photos sizes=64,128 train_per_photo=500 val_per_photo=150 seed=0
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.demo_data import _swap_in, parse_args, tree_is_complete
from pipelines.errors import ConfigError, UserError

TRAIN_PHOTOS = ("astronaut", "chelsea", "motorcycle_left", "motorcycle_right", "retina", "hubble_deep_field", "ihc")
VAL_PHOTOS = ("coffee", "rocket")  # held out: never cropped into train
SPLITS = {"train": (0, TRAIN_PHOTOS), "val": (1, VAL_PHOTOS)}  # split -> (id mixed into the seed, photographs)
META_FILE = "photo_meta.json"
FORMAT_VERSION = 1


class PhotoDataError(UserError, RuntimeError):
    """scikit-image, or one of its shipped photographs, is missing."""


def photo_path(name: str) -> Path:
    """The file of photograph ``name`` inside the installed scikit-image package (png or jpg)."""
    try:
        import skimage
    except ImportError as err:
        raise PhotoDataError("the photo dataset needs scikit-image (pip install 'scikit-image>=0.22')") from err
    data_dir = Path(skimage.__file__).parent / "data"
    for ext in (".png", ".jpg"):
        if (data_dir / f"{name}{ext}").is_file():
            return data_dir / f"{name}{ext}"
    raise PhotoDataError(f"photograph {name!r} is not in {data_dir} (scikit-image {skimage.__version__})")


def random_crop(photo: Image.Image, rng: np.random.Generator, size: int, min_scale: float, max_scale: float,
                flip: bool) -> tuple[int, int, int, bool]:
    """A crop box (left, top, side) and whether to flip, drawn in that order from ``rng``."""
    w, h = photo.size
    side = max(size // 4, round(min(w, h) * rng.uniform(min_scale, max_scale)))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return left, top, side, bool(flip and rng.random() < 0.5)


def render_crop(photo: Image.Image, box: tuple[int, int, int, bool], size: int,
                channels: Sequence[int] = (0, 1, 2)) -> Image.Image:
    """The crop resized to ``size``, flipped if drawn so, with its RGB channels in the order ``channels``."""
    left, top, side, flipped = box
    img = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else img
    return img if tuple(channels) == (0, 1, 2) else Image.merge("RGB", [img.split()[c] for c in channels])


def _meta(seed: int, train_per_photo: int, val_per_photo: int, size: int, min_scale: float,
          max_scale: float, channel_shuffle: bool) -> dict:
    return {"format_version": FORMAT_VERSION, "seed": seed, "train_per_photo": train_per_photo,
            "val_per_photo": val_per_photo, "size": size, "min_scale": min_scale, "max_scale": max_scale,
            "channel_shuffle": channel_shuffle, "train": list(TRAIN_PHOTOS), "val": list(VAL_PHOTOS)}


def _is_complete(root: Path, meta: dict) -> bool:
    expected = len(TRAIN_PHOTOS) * meta["train_per_photo"] + len(VAL_PHOTOS) * meta["val_per_photo"]
    return tree_is_complete(root, META_FILE, meta, expected)


def make_photo_dataset(root: str | Path, sizes: Sequence[int] = (64, 128), train_per_photo: int = 500,
                       val_per_photo: int = 150, seed: int = 0, min_scale: float = 0.15, max_scale: float = 0.6,
                       overwrite: bool = False, channel_shuffle: bool = False) -> list[Path]:
    """Write ``<root>/<size>px`` for every size (reusing a complete tree with the same parameters unless
    ``overwrite``) and return those directories. A tree is built in a temporary sibling and renamed into place.
    ``channel_shuffle`` puts each train crop's RGB channels in a random order (colour augmentation: seven
    photographs hold few of the colours a held-out one may have, e.g. a blue sky)."""
    root, sizes = Path(root), [int(s) for s in sizes]
    if seed < 0 or train_per_photo < 1 or val_per_photo < 1 or not sizes or min(sizes) < 8:
        raise ConfigError("need seed >= 0, train_per_photo >= 1, val_per_photo >= 1 and every size >= 8")
    if not 0 < min_scale <= max_scale <= 1:
        raise ConfigError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
    metas = {s: _meta(seed, train_per_photo, val_per_photo, s, min_scale, max_scale, channel_shuffle) for s in sizes}
    todo = [s for s in sizes if overwrite or not _is_complete(root / f"{s}px", metas[s])]
    root.mkdir(parents=True, exist_ok=True)
    tmps = {s: Path(tempfile.mkdtemp(prefix=f".{s}px.tmp-", dir=root)) for s in todo}
    try:
        for split, (split_id, photos) in SPLITS.items():
            count = train_per_photo if split == "train" else val_per_photo
            for pi, name in enumerate(photos):
                photo = Image.open(photo_path(name)).convert("RGB")
                for tmp in tmps.values():
                    (tmp / split / name).mkdir(parents=True)
                for i in range(count):
                    rng = np.random.default_rng([seed, split_id, pi, i])
                    box = random_crop(photo, rng, max(sizes), min_scale, max_scale, flip=split == "train")
                    order = rng.permutation(3) if channel_shuffle and split == "train" else (0, 1, 2)
                    for s, tmp in tmps.items():
                        render_crop(photo, box, s, order).save(tmp / split / name / f"{i:05d}.png")
        for s, tmp in tmps.items():
            tmp.chmod(0o755)
            (tmp / META_FILE).write_text(json.dumps(metas[s], indent=1) + "\n")  # last: marks completion
            _swap_in(tmp, root / f"{s}px")
    finally:
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
    return [root / f"{s}px" for s in sizes]


DEFAULTS: dict[str, str | int | bool] = {"root": "data/photos", "sizes": "64,128", "train_per_photo": 500,
                                         "val_per_photo": 150, "seed": 0, "min_scale": "0.15", "max_scale": "0.6",
                                         "channel_shuffle": False, "overwrite": False}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        cfg = parse_args(argv, DEFAULTS)
        try:
            sizes = [int(s) for s in str(cfg["sizes"]).strip("[]").split(",")]
            scales = float(cfg["min_scale"]), float(cfg["max_scale"])
        except ValueError:
            raise ConfigError("sizes must be integers separated by commas (e.g. 64,128) and min_scale / "
                              "max_scale numbers") from None
        dirs = make_photo_dataset(str(cfg["root"]), sizes, int(cfg["train_per_photo"]), int(cfg["val_per_photo"]),
                                  int(cfg["seed"]), *scales, overwrite=bool(cfg["overwrite"]),
                                  channel_shuffle=bool(cfg["channel_shuffle"]))
    except (UserError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for d in dirs:
        print(f"photo dataset: {d.resolve()}")
    print(f"  train: {len(TRAIN_PHOTOS)} photographs x {cfg['train_per_photo']} crops ({', '.join(TRAIN_PHOTOS)})")
    print(f"  val (held out): {len(VAL_PHOTOS)} photographs x {cfg['val_per_photo']} crops ({', '.join(VAL_PHOTOS)})")
    return 0
