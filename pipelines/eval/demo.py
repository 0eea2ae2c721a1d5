"""``tools/fid.py mode=demo``: the demo's metrics, judged by the demo classifier (``demo_classifier.py``).

Adds to the protocol modes (``modes.py``) what only the built-in dataset allows: per-class recognition accuracy
of samples and of tokenizer reconstructions, and ``fd_demo``, a Fréchet distance on the classifier's features
(not FID).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset

from pipelines.data import collate_images
from pipelines.eval.demo_classifier import DEMO_CLASSIFIER_DIR, load_demo_classifier, per_class_accuracy
from pipelines.eval.metrics import (
    FeatureStats,
    ImageArrayError,
    ImageSet,
    feature_stats,
    frechet_distance,
    open_images,
    save_images_npz,
    ssim,
)
from pipelines.eval.modes import (
    Extractors,
    LazyInception,
    extract_features,
    finish,
    generate_samples,
    generation_metrics,
    recon_metrics,
    reference_stats,
    spread_subset,
)
from pipelines.eval.results import DemoRecognition, DemoSamples, ImageFeatures, ReconFeatures, Report
from pipelines.hub import results_dir
from pipelines.images import psnr, to_uint8


class ReconRecognition:
    """Per-batch hook for ``evaluate_reconstruction``: the demo classifier's verdict on each reconstruction.

    Why: PSNR and utilisation can look fine while shapes are lost; "is a reconstructed red circle still
    recognised as a red circle" is the figure that says whether the tokens carry the class.
    """

    def __init__(self, data_root: str | Path, cache_dir: str | Path = DEMO_CLASSIFIER_DIR,
                 device: str | torch.device = "cpu") -> None:
        self.classifier, info = load_demo_classifier(data_root, cache_dir, device)
        self.names: list[str] = list(info["classes"])
        self.reset()

    def reset(self) -> None:
        self.preds: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, rec: torch.Tensor, labels: torch.Tensor) -> None:
        self.preds.append(self.classifier.classify(to_uint8(rec).permute(0, 3, 1, 2)).logits.argmax(1).cpu())
        self.labels.append(labels.cpu())

    def summary(self) -> dict[str, Any]:
        preds, labels = torch.cat(self.preds), torch.cat(self.labels)
        per_class = per_class_accuracy(preds, labels, len(self.names))
        return {"recon_accuracy": float((preds == labels).float().mean()),
                "recon_accuracy_per_class": {n: a for n, a in zip(self.names, per_class, strict=True) if a is not None}}


def baseline_reconstructions(images: Tensor, grid: int = 8) -> dict[str, Tensor]:
    """Reconstructions that need no tokenizer, carrying as many numbers as ``grid`` x ``grid`` tokens of one colour:
    each image's mean colour, average pooling to the token grid (one flat colour per token position), and a bicubic
    resize down to the grid and back up."""
    size = images.shape[-1]
    small = F.interpolate(images, size=grid, mode="bicubic", antialias=True, align_corners=False)
    return {
        "baseline: mean colour": images.mean((2, 3), keepdim=True).expand_as(images),
        f"baseline: {grid}x{grid} avg pool": F.interpolate(F.avg_pool2d(images, size // grid), size=size,
                                                            mode="nearest"),
        f"baseline: bicubic down to {grid}x{grid} and up": F.interpolate(small, size=size, mode="bicubic",
                                                                       align_corners=False).clamp(-1, 1),
    }


@torch.no_grad()
def baseline_rows(dataset: Dataset, judge: ReconRecognition | None = None, grid: int = 8) -> dict[str, dict[str, Any]]:
    """PSNR, SSIM and (with a ``judge``) recognition of ``baseline_reconstructions`` of ``dataset``'s images."""
    images, labels = collate_images([dataset[i] for i in range(len(dataset))])
    rows = {}
    x8 = to_uint8(images).permute(0, 3, 1, 2).float()
    for name, rec in baseline_reconstructions(images, grid).items():
        r8 = to_uint8(rec).permute(0, 3, 1, 2).float()
        rows[name] = {"psnr": float(psnr(images, rec).mean()), "ssim": float(ssim(x8, r8).mean())}
        if judge is not None:
            judge.reset()
            judge(images, rec, labels)
            rows[name].update(judge.summary())
    return rows


def _accuracy(logits: Tensor, labels: Tensor, names: list[str]) -> tuple[float, dict[str, float | None]]:
    """Overall and per-class (by name; None for a class without images) accuracy of the classifier's verdicts."""
    preds = logits.argmax(1)
    per_class = per_class_accuracy(preds, labels, len(names))
    return float((preds == labels).float().mean()), dict(zip(names, per_class, strict=True))


def _fd_demo(a: Tensor, b: Tensor) -> float:
    return frechet_distance(feature_stats(a, "demo-classifier"), feature_stats(b, "demo-classifier"))


def recon_recognition(features: ReconFeatures, names: list[str]) -> DemoRecognition:
    """Classifier accuracy on real and reconstructed val images, per class, and ``fd_demo_recon``."""
    real_accuracy, _ = _accuracy(features.real.classifier_logits, features.labels, names)
    recon_accuracy, per_class = _accuracy(features.rec.classifier_logits, features.labels, names)
    return DemoRecognition(real_accuracy, recon_accuracy, per_class,
                           _fd_demo(features.rec.classifier_features, features.real.classifier_features))


def judge_samples(cfg: DictConfig, samples: ImageFeatures, labels: Tensor, val: ImageSet, val_features: ImageFeatures,
                  feats: LazyInception | None, names: list[str]) -> DemoSamples:
    """The samples half: recognition accuracy, ``fd_demo`` against the demo val split, and the Inception metrics
    (``sample_fid`` ...) when fid is among the metrics."""
    inception = None
    if feats is not None:
        ref_stats, ref_pool, _ = reference_stats(cfg, feats, val, "prc" in cfg.metrics, desc="demo val")
        inception = generation_metrics(cfg, samples, ref_stats, ref_pool)
    accuracy, per_class = _accuracy(samples.classifier_logits, labels, names)
    return DemoSamples(len(labels), inception, _fd_demo(samples.classifier_features, val_features.classifier_features),
                       accuracy, per_class)


def run_demo(cfg: DictConfig, device: torch.device) -> dict | None:
    """Demo metrics: classifier (trained once, cached), tokenizer half (if tokenizer=), samples half (if ar=)."""
    root = Path(cfg.demo_data)
    classifier, info = load_demo_classifier(root, cfg.classifier, device, cfg.classifier_epochs)
    names: list[str] = list(info["classes"])
    report = Report("demo metrics", [("classifier_val_accuracy", info["val_accuracy"])])
    feats = LazyInception(cfg, device) if "fid" in cfg.metrics else None
    if cfg.tokenizer is not None:
        sub = OmegaConf.merge(cfg, {"data": str(root), "split": "val"})
        recon, features = recon_metrics(sub, device, feats, classifier)
        report.rows += recon.rows() + recon_recognition(features, names).rows()
    if cfg.ar is None and cfg.samples is None:
        return finish(cfg, report, results_dir(cfg.tokenizer or cfg.classifier) / "demo_eval.json")

    val = open_images(root / "val", classifier.cfg.resolution, names)  # same cache entry as the recon half
    val = spread_subset(val, cfg.max_images)
    extra: dict[str, Any] = {}
    extract = Extractors(feats, classifier)
    if cfg.ar is not None:
        generated = generate_samples(cfg, extract, keep_images=bool(cfg.save_samples), shard=False)
        features, labels = generated.features, generated.labels
        extra["sampling"] = generated.sampling
        if cfg.save_samples:
            print(f"samples saved to {save_images_npz(cfg.save_samples, generated.images, labels)}")
    else:
        samples = open_images(cfg.samples, None, names)
        if isinstance(samples, FeatureStats) or samples.labels is None:
            raise ImageArrayError(f"samples={cfg.samples} needs images with labels (npz arr_1, or class folders)")
        features = extract_features(samples, extract, cfg.batch_size, "samples")
        labels = torch.from_numpy(samples.labels)
    val_features = extract_features(val, Extractors(classifier=classifier), cfg.batch_size, "classifier: demo val")
    report.rows += judge_samples(cfg, features, labels, val, val_features, feats, names).rows()
    home = cfg.sweep_dir or (results_dir(cfg.ar) if cfg.ar else Path(cfg.samples).parent)
    return finish(cfg, report, Path(home) / "demo_eval.json",
                  extra=extra)  # sweep_dir: the folder of a sweep point
