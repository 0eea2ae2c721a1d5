"""``tools/fid.py mode=demo``: the demo's metrics, judged by the demo classifier (``demo_classifier.py``).

Adds to the protocol modes (``modes.py``) what only the built-in dataset allows: per-class recognition accuracy
of samples and of tokenizer reconstructions, and ``fd_demo``, a Fréchet distance on the classifier's features
(not FID).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from pipelines.data import collate_images
from pipelines.eval.demo_classifier import DEMO_CLASSIFIER_DIR, load_demo_classifier, per_class_accuracy
from pipelines.eval.metrics import (
    FeatureStats,
    ImageArrayError,
    extract_features,
    feature_stats,
    frechet_distance,
    open_images,
    save_images_npz,
    ssim,
)
from pipelines.eval.modes import (
    Features,
    Report,
    finish,
    generate_samples,
    generation_metrics,
    recon_metrics,
    reference_stats,
    spread_subset,
)
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
        self.preds.append(self.classifier.classify(to_uint8(rec).permute(0, 3, 1, 2))["logits"].argmax(1).cpu())
        self.labels.append(labels.cpu())

    def summary(self) -> dict[str, Any]:
        preds, labels = torch.cat(self.preds), torch.cat(self.labels)
        per_class = per_class_accuracy(preds, labels, len(self.names))
        return {"recon_accuracy": float((preds == labels).float().mean()),
                "recon_accuracy_per_class": {n: a for n, a in zip(self.names, per_class, strict=True) if a is not None}}


@torch.no_grad()
def baseline_rows(dataset: Dataset, judge: ReconRecognition, grid: int = 8) -> dict[str, dict[str, Any]]:
    """PSNR, SSIM and recognition of two reconstructions that need no tokenizer, on ``dataset``'s images:
    each image's mean colour, and ``grid`` x ``grid`` average pooling (one flat colour per token position)."""
    images, labels = collate_images([dataset[i] for i in range(len(dataset))])
    size = images.shape[-1]
    baselines = {
        "baseline: mean colour": images.mean((2, 3), keepdim=True).expand_as(images),
        f"baseline: {grid}x{grid} avg pool": F.interpolate(F.avg_pool2d(images, size // grid), size=size,
                                                            mode="nearest"),
    }
    rows = {}
    x8 = to_uint8(images).permute(0, 3, 1, 2).float()
    for name, rec in baselines.items():
        judge.reset()
        judge(images, rec, labels)
        r8 = to_uint8(rec).permute(0, 3, 1, 2).float()
        rows[name] = {"psnr": float(psnr(images, rec).mean()), "ssim": float(ssim(x8, r8).mean()), **judge.summary()}
    return rows


def recon_accuracy(report: Report, hook: Any, names: list[str]) -> None:
    """Classifier accuracy on real and reconstructed val images, per class, and ``fd_demo_recon``."""
    labels = torch.cat(hook.labels)
    real_pred = hook.get("classifier_real_logits").argmax(1)
    rec_pred = hook.get("classifier_rec_logits").argmax(1)
    report.add("val_accuracy_real", float((real_pred == labels).float().mean()))
    report.add("val_accuracy_recon", float((rec_pred == labels).float().mean()))
    for name, acc in zip(names, per_class_accuracy(rec_pred, labels, len(names)), strict=True):
        report.add(f"recon_accuracy/{name}", acc)
    report.add("fd_demo_recon", frechet_distance(
        feature_stats(hook.get("classifier_rec_features"), "demo-classifier"),
        feature_stats(hook.get("classifier_real_features"), "demo-classifier")))


def run_demo(cfg: DictConfig, device: torch.device) -> dict | None:
    """Demo metrics: classifier (trained once, cached), tokenizer half (if tokenizer=), samples half (if ar=)."""
    root = Path(cfg.demo_data)
    classifier, info = load_demo_classifier(root, cfg.classifier, device, cfg.classifier_epochs)
    names: list[str] = list(info["classes"])
    report = Report("demo metrics")
    report.add("classifier_val_accuracy", info["val_accuracy"])
    feats = Features(cfg, device) if "fid" in cfg.metrics else None
    if cfg.tokenizer is not None:
        sub = OmegaConf.merge(cfg, {"data": str(root), "split": "val"})
        hook = recon_metrics(sub, device, report, feats, {"classifier": classifier.classify})
        recon_accuracy(report, hook, names)
    if cfg.ar is None and cfg.samples is None:
        return finish(cfg, report, Path(cfg.tokenizer or cfg.classifier) / "demo_eval.json")

    val = open_images(root / "val", classifier.cfg.resolution, names)  # same cache entry as the recon half
    val = spread_subset(val, cfg.max_images)
    extra: dict[str, Any] = {}
    extractors: dict[str, Callable] = {"classifier": classifier.classify}
    if feats is not None:
        extractors["inception"] = feats
    if cfg.ar is not None:
        out, labels, images, ar_config = generate_samples(cfg, extractors, keep_images=bool(cfg.save_samples),
                                                          shard=False)
        extra["sampling"] = ar_config["sampling_used"]
        if cfg.save_samples:
            print(f"samples saved to {save_images_npz(cfg.save_samples, images, labels)}")
    else:
        samples = open_images(cfg.samples, None, names)
        if isinstance(samples, FeatureStats) or samples.labels is None:
            raise ImageArrayError(f"samples={cfg.samples} needs images with labels (npz arr_1, or class folders)")
        out = {}
        for name, fn in extractors.items():
            out.update({f"{name}_{k}": v for k, v in extract_features(samples, fn, cfg.batch_size, name).items()})
        labels = torch.from_numpy(samples.labels)
    report.add("num_samples", len(labels))
    if feats is not None:
        ref_stats, ref_pool, _ = reference_stats(cfg, feats, val, "prc" in cfg.metrics, desc="demo val")
        generation_metrics(cfg, report, out["inception_pool"], out.get("inception_logits"), ref_stats, ref_pool,
                           prefix="sample_")
    val_feats = extract_features(val, classifier.classify, cfg.batch_size, "classifier: demo val")
    report.add("fd_demo", frechet_distance(feature_stats(out["classifier_features"], "demo-classifier"),
                                           feature_stats(val_feats["features"], "demo-classifier")))
    preds = out["classifier_logits"].argmax(1)
    report.add("sample_accuracy", float((preds == labels).float().mean()))
    for name, acc in zip(names, per_class_accuracy(preds, labels, len(names)), strict=True):
        report.add(f"sample_accuracy/{name}", acc)
    return finish(cfg, report, Path(cfg.ar or Path(cfg.samples).parent) / "demo_eval.json", extra=extra)

