"""Procedurally generate a small class-conditional image dataset (ImageFolder layout) for demos and tests.

Why: the tokenizer and the AR generator need labelled images to train end to end, and a download of
ImageNet is too heavy for a demo or CI. Ten classes, each a distinct shape x colour x texture, are
recognisable at 64x64 and after lossy tokenization, so a small model visibly learns them.

Layout::

    <root>/train/<NN_colour_shape>/<00000>.png
    <root>/val/<NN_colour_shape>/<00000>.png
    <root>/classes.json     class names in index order with shape, colour and texture
    <root>/demo_meta.json   generation parameters; written last, marks the dataset complete

Usage::

    python tools/make_demo_data.py root=data/demo seed=0 train_per_class=300 val_per_class=50 size=64
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.errors import ConfigError, UserError
from pipelines.progress import progress_bar

# Every pair of classes differs in colour and in shape or texture (tests check this), so a class
# stays identifiable when one attribute is blurred away by downsampling or lossy compression.
CLASSES: list[dict] = [
    {"name": "red_circle", "shape": "circle", "colour": "red", "texture": "solid"},
    {"name": "green_square", "shape": "square", "colour": "green", "texture": "striped"},
    {"name": "blue_triangle", "shape": "triangle", "colour": "blue", "texture": "dotted"},
    {"name": "yellow_diamond", "shape": "diamond", "colour": "yellow", "texture": "checkered"},
    {"name": "orange_triangle", "shape": "triangle", "colour": "orange", "texture": "striped"},
    {"name": "cyan_circle", "shape": "circle", "colour": "cyan", "texture": "dotted"},
    {"name": "pink_square", "shape": "square", "colour": "pink", "texture": "checkered"},
    {"name": "purple_diamond", "shape": "diamond", "colour": "purple", "texture": "solid"},
    {"name": "white_cross", "shape": "cross", "colour": "white", "texture": "solid"},
    {"name": "black_cross", "shape": "cross", "colour": "black", "texture": "dotted"},
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 220),
    "yellow": (245, 215, 30),
    "orange": (250, 140, 20),
    "cyan": (30, 195, 210),
    "pink": (240, 90, 185),
    "purple": (125, 45, 185),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}

SUPERSAMPLE = 4  # draw at 4x and downsample with LANCZOS for antialiased edges
DIAMOND_W, DIAMOND_H = 0.8, 1.05  # half-width and half-height of the (rhombus) diamond
MAX_ROTATION_DEG = 12.0  # small enough that a rotated square never looks like a diamond (45 deg)
PATTERN_PERIOD = 0.5  # stripe / check period in units of the shape radius, so patterns scale with it
DOT_PERIOD, DOT_RADIUS = 0.55, 0.17
SPLITS = {"train": 0, "val": 1}  # split -> id mixed into the per-image seed
META_FILE = "demo_meta.json"
FORMAT_VERSION = 1  # bump when rendering changes so stale datasets are regenerated

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]


def class_folder(class_index: int) -> str:
    """Zero-padded folder name, so sorted folder order equals the class index."""
    return f"{class_index:02d}_{CLASSES[class_index]['name']}"


# Shapes and textures are boolean masks over shape-local coordinates (u, v), in units of the shape radius.
def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Equilateral, apex up (image y points down), circumradius 1.1.
    s = math.sqrt(3) / 2
    return (v <= 0.55) & (-s * u - 0.5 * v <= 0.55) & (s * u - 0.5 * v <= 0.55)


SHAPES: dict[str, Mask] = {
    "circle": lambda u, v: u * u + v * v <= 0.85**2,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.75,
    "triangle": _triangle,
    "diamond": lambda u, v: np.abs(u) / DIAMOND_W + np.abs(v) / DIAMOND_H <= 1.0,
    "cross": lambda u, v: (np.minimum(np.abs(u), np.abs(v)) <= 0.3) & (np.maximum(np.abs(u), np.abs(v)) <= 0.9),
}


def _dots(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    du = u / DOT_PERIOD - np.round(u / DOT_PERIOD)
    dv = v / DOT_PERIOD - np.round(v / DOT_PERIOD)
    return du * du + dv * dv <= (DOT_RADIUS / DOT_PERIOD) ** 2


# Patterns follow the shape's own axes; on the diamond that makes a harlequin instead of a square grid,
# which would cut its corners into a different-looking shape.
PATTERN_AXES: dict[str, Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "diamond": lambda u, v: (0.75 * (u / DIAMOND_W + v / DIAMOND_H), 0.75 * (u / DIAMOND_W - v / DIAMOND_H)),
}

TEXTURES: dict[str, Mask] = {  # True where the secondary (contrast) colour shows
    "solid": lambda u, v: np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool),
    "striped": lambda u, v: np.floor((u + v) / (math.sqrt(2) * PATTERN_PERIOD)) % 2 == 1,
    "dotted": _dots,
    "checkered": lambda u, v: (np.floor(u / PATTERN_PERIOD) + np.floor(v / PATTERN_PERIOD)) % 2 == 1,
}


def _contrast_colour(nominal: tuple[int, int, int], base: np.ndarray) -> np.ndarray:
    """Darker shade for light colours, lighter tint for dark ones; decided on the nominal colour so
    colour jitter never flips a class's pattern from dark to light."""
    luma = 0.299 * nominal[0] + 0.587 * nominal[1] + 0.114 * nominal[2]
    return base * 0.4 if luma > 110 else base + (255 - base) * 0.6


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted random colour with a soft linear gradient: varied, but never competing with the shape."""
    rgb = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.7)))
    angle = rng.uniform(0, 2 * np.pi)
    t = np.arange(size, dtype=np.float32) + 0.5 - size / 2
    ramp = (np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]) / size  # in [-0.71, 0.71]
    return rgb * 255 + rng.uniform(0, 40) * ramp[..., None]


def _downsample(mask: np.ndarray, size: int) -> np.ndarray:
    """Antialiased coverage in [0, 1] of a supersampled boolean mask."""
    img = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(img), 0, 1)[..., None]


def render_image(class_index: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One RGB image of class ``class_index``; position, size, rotation, background, colour jitter,
    pattern phase and noise are drawn from ``rng`` so images within a class differ."""
    spec = CLASSES[class_index]
    background = _background(rng, size)

    radius = rng.uniform(0.22, 0.34) * size
    margin = 1.1 * radius + 1  # every shape fits in 1.1 radii, so it is never clipped
    cx, cy = rng.uniform(margin, size - margin, 2)
    theta = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    c, s = float(np.cos(theta)), float(np.sin(theta))  # Python floats keep the float32 arrays float32
    radius, cx, cy = float(radius), float(cx), float(cy)
    # Shape-local coordinates of the supersampled pixel centres, in units of the radius.
    t = (np.arange(size * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    x, y = t[None, :] - cx, t[:, None] - cy
    u, v = (c * x + s * y) / radius, (-s * x + c * y) / radius

    nominal = COLOURS[spec["colour"]]
    base = np.clip((np.array(nominal) + rng.normal(0, 8, 3)) * rng.uniform(0.9, 1.1), 0, 255)
    phase_u, phase_v = rng.uniform(0, 2 * PATTERN_PERIOD, 2).tolist()
    shape = SHAPES[spec["shape"]](u, v)
    pu, pv = PATTERN_AXES.get(spec["shape"], lambda a, b: (a, b))(u, v)
    pattern = TEXTURES[spec["texture"]](pu + phase_u, pv + phase_v)
    # Compositing is linear, so downsampling the two coverage masks instead of the 4x RGB canvas gives
    # the same antialiased result at a fraction of the cost.
    m_base, m_alt = _downsample(shape & ~pattern, size), _downsample(shape & pattern, size)
    out = background * (1 - m_base - m_alt) + base * m_base + _contrast_colour(nominal, base) * m_alt
    out = out + rng.normal(0, rng.uniform(0, 3), out.shape)  # mild sensor-like noise
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def _meta(seed: int, train_per_class: int, val_per_class: int, size: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "size": size,
        "classes": [class_folder(i) for i in range(len(CLASSES))],
    }


def tree_is_complete(root: Path, meta_file: str, meta: dict, expected_images: int) -> bool:
    """A generated ImageFolder is reusable: the same parameters recorded in ``meta_file`` and every image present
    (cheap: a directory listing, no decoding)."""
    try:
        if json.loads((root / meta_file).read_text()) != meta:
            return False
    except (OSError, ValueError):
        return False
    return sum(1 for _ in root.glob("*/*/*.png")) == expected_images


def _is_complete(root: Path, meta: dict) -> bool:
    return tree_is_complete(root, META_FILE, meta, len(CLASSES) * (meta["train_per_class"] + meta["val_per_class"]))


def _classes_json() -> list[dict]:
    return [
        {
            "index": i,
            "folder": class_folder(i),
            **spec,
            "description": f"{spec['colour']} {spec['texture']} {spec['shape']}",
        }
        for i, spec in enumerate(CLASSES)
    ]


def _swap_in(tmp: Path, root: Path) -> None:
    """Move the finished tree to ``root``; an old tree is moved aside first, so ``root`` is never a mix."""
    old = None
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.replace(root, old / root.name)
    os.replace(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_image(job: tuple[str, int, str, int, int, int]) -> None:
    """Render and save one image; seeded per image, so the result does not depend on order or worker."""
    out_dir, seed, split, class_index, index, size = job
    rng = np.random.default_rng([seed, SPLITS[split], class_index, index])
    render_image(class_index, rng, size).save(Path(out_dir, split, class_folder(class_index), f"{index:05d}.png"))


def _render_all(jobs: list[tuple[str, int, str, int, int, int]], workers: int, desc: str) -> None:
    with progress_bar(len(jobs), desc, unit="img") as bar:
        if workers <= 1:
            for job in bar.iter(jobs):
                _write_image(job)
        else:  # spawn, not fork: safe when the caller has threads (torch, a DataLoader) running
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in bar.iter(pool.imap_unordered(_write_image, jobs, chunksize=32)):
                    pass


def make_demo_dataset(
    root: str | Path,
    seed: int = 0,
    train_per_class: int = 300,
    val_per_class: int = 50,
    size: int = 64,
    overwrite: bool = False,
    *,
    workers: int | None = None,
) -> Path:
    """Generate the dataset under ``root`` and return it.

    Returns at once if ``root`` already holds a complete dataset with the same parameters (unless
    ``overwrite``). Images are written to a temporary sibling directory that is renamed into place at
    the end, so an interrupted run never leaves a partial dataset that looks complete. A non-empty
    ``root`` that is not a demo dataset is only replaced with ``overwrite=True``. ``workers`` processes
    render in parallel (default: up to 4 CPUs for large sets, 1 for small ones); output is identical.
    """
    root = Path(root)
    if seed < 0 or train_per_class < 1 or val_per_class < 0 or size < 8:
        raise ConfigError("need seed >= 0, train_per_class >= 1, val_per_class >= 0 and size >= 8")
    meta = _meta(seed, train_per_class, val_per_class, size)
    if not overwrite and _is_complete(root, meta):
        return root
    foreign = root.exists() and not (root / META_FILE).is_file() and (not root.is_dir() or any(root.iterdir()))
    if foreign and not overwrite:
        raise FileExistsError(f"{root} is not empty and is not a demo dataset; pass overwrite=True to replace it")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset should be readable like any folder
        for split in SPLITS:
            for ci in range(len(CLASSES)):
                (tmp / split / class_folder(ci)).mkdir(parents=True)
        jobs = [
            (str(tmp), seed, split, ci, i, size)
            for split, n in (("train", train_per_class), ("val", val_per_class))
            for ci in range(len(CLASSES))
            for i in range(n)
        ]
        if workers is None:  # starting processes costs ~0.5 s, only worth it for large sets
            workers = min(4, os.cpu_count() or 1) if len(jobs) >= 1000 else 1
        _render_all(jobs, workers, desc=f"demo data -> {root}")
        (tmp / "classes.json").write_text(json.dumps(_classes_json(), indent=1) + "\n")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")  # last: marks completion
        _swap_in(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


DEFAULTS: dict[str, str | int | bool] = {
    "root": "data/demo",
    "seed": 0,
    "train_per_class": 300,
    "val_per_class": 50,
    "size": 64,
    "overwrite": False,
    "workers": 0,  # 0: automatic
}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_args(argv: Sequence[str], defaults: dict[str, str | int | bool] | None = None) -> dict:
    """Hydra-style ``key=value`` overrides on top of ``defaults`` (DEFAULTS), typed like the defaults."""
    defaults = DEFAULTS if defaults is None else defaults
    valid = ", ".join(defaults)
    cfg = dict(defaults)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {arg!r} (valid keys: {valid})")
        if key not in defaults:
            raise ConfigError(f"unknown key {key!r} (valid keys: {valid})")
        default = defaults[key]
        if isinstance(default, bool):
            if value.lower() not in _TRUE | _FALSE:
                raise ConfigError(f"{key} must be true or false, got {value!r}")
            cfg[key] = value.lower() in _TRUE
        elif isinstance(default, int):
            try:
                cfg[key] = int(value)
            except ValueError:
                raise ConfigError(f"{key} must be an integer, got {value!r}") from None
        else:
            cfg[key] = value
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        print("\nkeys (default): " + ", ".join(f"{k} ({v})" for k, v in DEFAULTS.items()))
        return 0
    try:
        cfg = parse_args(argv)
        root = Path(str(cfg.pop("root")))
        meta = _meta(cfg["seed"], cfg["train_per_class"], cfg["val_per_class"], cfg["size"])
        reused = not cfg["overwrite"] and _is_complete(root, meta)
        make_demo_dataset(root, **{**cfg, "workers": cfg["workers"] or None})
    except (UserError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_train, n_val = len(CLASSES) * cfg["train_per_class"], len(CLASSES) * cfg["val_per_class"]
    state = "already complete, reused" if reused else "written"
    print(f"demo dataset {state}: {root.resolve()}")
    print(f"  {len(CLASSES)} classes, {n_train} train + {n_val} val images of {cfg['size']}x{cfg['size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
