"""Sample-quality metrics on features: Fréchet distance, Inception Score, precision/recall, SSIM; image readers.

IS and precision/recall call torch-fidelity's functions; the Fréchet distance is the same formula computed
through symmetric eigenproblems (faster on a CPU, checked against torch-fidelity and scipy). This module adapts
them to our inputs: image folders, ADM-layout ``.npz`` batches (``arr_0``: N x H x W x 3 uint8, optional
``arr_1`` labels) and saved statistics (``mu``, ``sigma``, the ADM reference-batch key names).
"""

from __future__ import annotations

import json
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.data import IMAGE_EXTENSIONS, DatasetNotFoundError, image_files, load_rgb, resize_and_crop
from pipelines.errors import UserError
from pipelines.progress import progress_bar
from pipelines.util import save_npz


class ImageArrayError(UserError, ValueError):
    """An image batch or statistics file with the wrong keys, shape or dtype; the message names the file."""


# --------------------------------------------------------------------------------------------- statistics


@dataclass
class FeatureStats:
    """Mean and covariance of a feature set (float64), as FID needs them; ``extractor`` names the features.

    ``features`` (in memory only, never saved) lets ``frechet_distance`` take a cheaper exact path when the set
    has fewer vectors than dimensions.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num: int
    extractor: str = ""
    features: np.ndarray | None = field(default=None, repr=False)


def feature_stats(features: Tensor | np.ndarray, extractor: str = "") -> FeatureStats:
    f = np.asarray(features.double().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ImageArrayError(f"need at least 2 images (feature vectors as an (N, D) array), got shape {f.shape}")
    return FeatureStats(f.mean(0), np.cov(f, rowvar=False), f.shape[0], extractor, f)


def _trace_sqrt_product(a: FeatureStats, b: FeatureStats) -> float:
    """Tr((S_a S_b)^(1/2)) through symmetric eigenproblems (the eigenvalues of S_a S_b are real and >= 0).

    S_a S_b has the eigenvalues of S_a^(1/2) S_b S_a^(1/2); when a set has n < D vectors (S_a = X^T X / (n-1)
    with centred X), also those of X S_b X^T / (n-1), an n x n problem. Same value as scipy's sqrtm or
    torch-fidelity's eigvals on the product, several times faster at D = 2048 and free of complex round-off.
    """
    for x, y in ((a, b), (b, a)):
        if x.features is not None and x.num < x.mu.shape[0]:
            c = x.features - x.mu
            m = c @ y.sigma @ c.T / (x.num - 1)
            break
    else:
        w, v = np.linalg.eigh(a.sigma)
        half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        m = half @ b.sigma @ half
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)): the FID formula of TTUR, ADM and
    torch-fidelity (tests check it against scipy's sqrtm and torch-fidelity's function)."""
    if a.mu.shape != b.mu.shape:
        raise ImageArrayError(f"feature dimensions differ: {a.mu.shape[0]} ({a.extractor or 'first set'}) vs "
                              f"{b.mu.shape[0]} ({b.extractor or 'second set'})")
    if a.extractor and b.extractor and a.extractor != b.extractor:
        raise ImageArrayError(f"statistics come from different feature extractors: {a.extractor!r} vs {b.extractor!r}")
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * _trace_sqrt_product(a, b))


def save_stats(path: str | Path, stats: FeatureStats) -> Path:
    """An ``.npz`` with ``mu`` and ``sigma`` (ADM's key names) plus the count and the extractor's name."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz")
    return save_npz(path, mu=stats.mu, sigma=stats.sigma, num=np.int64(stats.num), extractor=np.str_(stats.extractor))


def _stats_from_npz(data: Any, path: Path) -> FeatureStats:
    mu, sigma = np.asarray(data["mu"]), np.asarray(data["sigma"])
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or not np.issubdtype(mu.dtype, np.floating):
        raise ImageArrayError(f"{path}: mu must be a float (D,) vector and sigma (D, D); got mu {mu.shape} "
                              f"{mu.dtype}, sigma {sigma.shape}")
    num = int(data["num"]) if "num" in data else 0
    extractor = str(data["extractor"]) if "extractor" in data else ""
    return FeatureStats(mu.astype(np.float64), sigma.astype(np.float64), num, extractor)


def load_stats(path: str | Path) -> FeatureStats:
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"statistics file {path} does not exist")
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ImageArrayError(f"{path} has no 'mu' and 'sigma' arrays (keys: {sorted(data.keys())})")
        return _stats_from_npz(data, path)


# ------------------------------------------------------------------------------------------- IS, P/R, SSIM


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over ``splits`` consecutive chunks (ADM's order, no shuffle): (mean, std)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    if logits.shape[0] < splits:
        raise ImageArrayError(f"Inception Score with {splits} splits needs at least {splits} samples, "
                              f"got {logits.shape[0]}")
    out = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=False)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def precision_recall(generated: Tensor, reference: Tensor, neighborhood: int = 3,
                     batch_size: int = 10000) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k-NN balls, k = ``neighborhood``, as ADM uses."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    for name, f in (("generated", generated), ("reference", reference)):
        if f.shape[0] <= neighborhood:
            raise ImageArrayError(f"precision/recall with k={neighborhood} needs more than {neighborhood} {name} "
                             f"samples, got {f.shape[0]}")
    return calculate_precision_recall_part(generated.float().cpu(), reference.float().cpu(), neighborhood, batch_size)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: Tensor, y: Tensor, data_range: float = 255.0) -> Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K = 0.01 / 0.03, valid region, mean
    over channels) of images as float tensors (B, C, H, W) on a ``data_range`` scale. Images smaller than the
    window use a window as large as the image."""
    x, y = x.double(), y.double()
    size = min(11, x.shape[-1], x.shape[-2])
    w = _gaussian_window(size).to(x.device).expand(x.shape[1], 1, size, size)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=x.shape[1])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


# ------------------------------------------------------------------------------------------------ images


def _check_image_array(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ImageArrayError(f"{where} has shape {arr.shape} and dtype {arr.dtype}; expected uint8 images "
                              f"N x H x W x 3 (the ADM evaluator layout, values 0..255)")
    if arr.shape[0] == 0:
        raise ImageArrayError(f"{where} holds no images")
    return arr


@dataclass
class ImageSet:
    """Images to evaluate, all of one size: an in-memory uint8 (N, H, W, 3) array or files loaded per batch.

    ``labels`` (class indices) come from an npz's ``arr_1`` or the class sub-folder of each file.
    """

    array: np.ndarray | None = None
    files: list[Path] | None = None
    labels: np.ndarray | None = None
    resolution: int | None = None  # files: resize (shorter side) + centre-crop to this; None = use as they are
    source: str = ""
    stats: FeatureStats | None = None  # statistics stored beside the images (ADM reference batches)

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.files or [])

    def subset(self, indices: Sequence[int]) -> ImageSet:
        """The images at ``indices`` (without ``stats``, which describe the whole set)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(self.array[idx] if self.array is not None else None,
                        [self.files[i] for i in idx] if self.files is not None else None,
                        self.labels[idx] if self.labels is not None else None, self.resolution, self.source)

    def check(self, what: str, minimum: int = 2) -> tuple[int, int]:
        """Before any feature is computed: at least ``minimum`` images, every file decodable, all of one size.
        Returns that size (H, W). Files are decoded once here (cheap next to the Inception forward passes)."""
        if len(self) < minimum:
            raise ImageArrayError(f"{what} {self.source} holds {len(self)} image(s); at least {minimum} are needed")
        if self.array is not None:
            return tuple(self.array.shape[1:3])
        first = None
        with progress_bar(len(self.files), f"check {what}", unit="img", leave=False) as bar:
            for f in bar.iter(self.files):
                size = load_rgb(str(f)).size[::-1]
                first = first or (size, f)
                if size != first[0] and self.resolution is None:
                    raise ImageArrayError(f"images of {what} differ in size: {first[1]} is {first[0][1]}x"
                                          f"{first[0][0]}, {f} is {size[1]}x{size[0]}; set resolution=N to resize "
                                          "and centre-crop them")
        return (self.resolution, self.resolution) if self.resolution is not None else first[0]

    def _load(self, path: Path) -> np.ndarray:
        img = load_rgb(str(path))
        if self.resolution is not None:
            return ((resize_and_crop(img, self.resolution, None) + 1) * 127.5).round().clamp(0, 255) \
                .to(torch.uint8).permute(1, 2, 0).numpy()
        return np.asarray(img, dtype=np.uint8)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """uint8 (B, 3, H, W) batches in order."""
        size = None
        for start in range(0, len(self), batch_size):
            if self.array is not None:
                chunk = self.array[start:start + batch_size]
            else:
                files = self.files[start:start + batch_size]
                images = [self._load(f) for f in files]
                for f, im in zip(files, images, strict=True):
                    size = size or (im.shape[:2], f)
                    if im.shape[:2] != size[0]:
                        raise ImageArrayError(
                            f"images differ in size: {size[1]} is {size[0][1]}x{size[0][0]}, {f} is "
                            f"{im.shape[1]}x{im.shape[0]}; set resolution=N to resize and centre-crop them")
                chunk = np.stack(images)
            yield torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2)


def open_images(spec: str | Path, resolution: int | None = None,
                class_names: Sequence[str] | None = None) -> ImageSet | FeatureStats:
    """An image folder, an ADM-layout ``.npz`` of images, or an ``.npz`` of statistics (returned as FeatureStats).

    Folder labels: the name of each file's parent folder, looked up in ``class_names`` (or in the sorted
    parent names when not given); a flat folder has no labels.
    """
    path = Path(spec)
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
        parents = [f.parent.name for f in files]
        labels = None
        if any(f.parent != path for f in files):
            names = list(class_names) if class_names is not None else sorted(set(parents))
            unknown = sorted(set(parents) - set(names))
            if unknown:
                raise ImageArrayError(f"{path}: folders {unknown[:5]} are not class names {names[:5]}...")
            labels = np.array([names.index(p) for p in parents], dtype=np.int64)
        return ImageSet(files=files, labels=labels, resolution=resolution, source=str(path))
    if path.is_file() and path.suffix == ".npz":
        return read_npz(path)
    raise DatasetNotFoundError(f"{path} is neither an image folder nor an .npz file")


def read_npz(path: str | Path) -> ImageSet | FeatureStats:
    """``arr_0`` images (+ labels in ``arr_1`` or ``labels``) -> ImageSet; only ``mu``/``sigma`` -> FeatureStats.

    ADM's reference batches hold both images and statistics; they come back as an ImageSet with ``stats``.
    """
    path = Path(path)
    try:
        return _read_npz(path)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        if isinstance(err, UserError):
            raise
        raise ImageArrayError(f"{path} is not a readable .npz (truncated or damaged: {' '.join(str(err).split())}); "
                              "write it again") from err


def _read_npz(path: Path) -> ImageSet | FeatureStats:
    with np.load(path) as data:
        keys = set(data.keys())
        if "arr_0" not in keys:
            if {"mu", "sigma"} <= keys:
                return _stats_from_npz(data, path)
            raise ImageArrayError(f"{path} has neither images ('arr_0', N x H x W x 3 uint8) nor statistics "
                                  f"('mu', 'sigma'); keys: {sorted(keys)}")
        images = _check_image_array(data["arr_0"], f"{path} arr_0")
        labels = None
        label_key = "arr_1" if "arr_1" in keys else "labels" if "labels" in keys else None
        if label_key is not None:
            labels = np.asarray(data[label_key])
            if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
                raise ImageArrayError(f"{path} {label_key} (labels) has shape {labels.shape} and dtype {labels.dtype}; "
                                      f"expected {images.shape[0]} integers")
        stats = _stats_from_npz(data, path) if {"mu", "sigma"} <= keys else None
        return ImageSet(array=images, labels=labels.astype(np.int64) if labels is not None else None,
                        source=str(path), stats=stats)


def save_images_npz(path: str | Path, images: np.ndarray | Tensor, labels: np.ndarray | Tensor | None = None) -> Path:
    """ADM's sample layout: ``arr_0`` uint8 N x H x W x 3 and, when given, ``arr_1`` int64 labels."""
    images = np.asarray(images.cpu() if isinstance(images, Tensor) else images)
    _check_image_array(images, "images to save")
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    return save_npz(path, **arrays)


# ----------------------------------------------------------------------------------------------- reporting


def format_table(rows: Sequence[tuple[str, Any]], title: str = "") -> str:
    """Two-column text table under a title line; floats to 4 significant digits, None as 'unavailable'."""

    def fmt(v: Any) -> str:
        if v is None:
            return "unavailable"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [(str(k), fmt(v)) for k, v in rows]
    width = max([len(k) for k, _ in cells] + [6])
    vwidth = max([len(v) for _, v in cells] + [5])
    line = f"+-{'-' * width}-+-{'-' * vwidth}-+"
    out = ([title] if title else []) + [line]
    out += [f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in cells]
    out.append(line)
    return "\n".join(out)


def append_results(path: str | Path, record: dict[str, Any]) -> None:
    """One JSON line per evaluation (metrics + full config), so runs can be compared later."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray | Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")
