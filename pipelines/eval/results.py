"""Typed evaluation results: what each step of ``tools/fid.py`` computes, as fields, passed between the modes
(``modes.py``, ``demo.py``) as such.

Only ``Report`` turns them into names: the ``rows()`` of each result give the keys of the printed table and of
the JSON files (``recon_eval_<split>.json``, ``gen_eval.json``, ``demo_eval.json``, ``runs/results.jsonl``),
which users and the README read, so the keys stay what they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from pipelines.eval.metrics import format_table


@dataclass(frozen=True)
class Unavailable:
    """A metric that could not be computed: written as null, with ``reason`` under the table and in the JSON."""

    reason: str


# A table value: a number, None (no value, e.g. a class without images) or Unavailable (with the reason).
Metric = float | int | None | Unavailable
Rows = list[tuple[str, Metric]]


@dataclass
class Report:
    """One evaluation's table: (key, value) rows in order, under a title."""

    title: str
    rows: Rows = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        """Key -> value, None where unavailable (never a made-up number)."""
        return {k: None if isinstance(v, Unavailable) else v for k, v in self.rows}

    @property
    def unavailable(self) -> dict[str, str]:
        return {k: v.reason for k, v in self.rows if isinstance(v, Unavailable)}

    def table(self) -> str:
        text = format_table(list(self.metrics.items()), self.title)
        notes = [f"  {k}: unavailable - {why}" for k, why in self.unavailable.items()]
        return text + ("\n" + "\n".join(notes) if notes else "")


# ----------------------------------------------------------------------------------------------- features


def _cat(parts: Sequence[Tensor | None]) -> Tensor | None:
    return None if not parts or any(p is None for p in parts) else torch.cat(list(parts))


@dataclass
class ImageFeatures:
    """Features of a set of images (or of one batch) from the extractors that ran; absent ones are None."""

    inception_pool: Tensor | None = None       # (N, 2048) Inception pool_3: FID, precision/recall
    inception_logits: Tensor | None = None     # (N, 1008): the Inception Score (None when the weights lack them)
    classifier_features: Tensor | None = None  # demo classifier's pooled features: fd_demo
    classifier_logits: Tensor | None = None    # demo classifier's logits: recognition accuracy

    def cpu(self) -> ImageFeatures:
        """float32 copies on the CPU (so batches of a long run do not pile up in GPU memory)."""
        return ImageFeatures(**{f.name: None if (t := getattr(self, f.name)) is None else t.float().cpu()
                                for f in fields(self)})

    @staticmethod
    def cat(parts: Sequence[ImageFeatures]) -> ImageFeatures:
        """Batches joined in order; a feature some batch lacks is None."""
        return ImageFeatures(**{f.name: _cat([getattr(p, f.name) for p in parts]) for f in fields(ImageFeatures)})


@dataclass
class ReconFeatures:
    """Features of both sides of a reconstruction run, with the labels. ``real`` lacks the Inception features
    when the reference statistics came from the cache."""

    real: ImageFeatures
    rec: ImageFeatures
    labels: Tensor


@dataclass
class GeneratedSamples:
    """Samples of an AR run (``modes.generate_samples``): their features, labels, images when kept, and the
    sampling recipe used."""

    features: ImageFeatures
    labels: Tensor
    images: Tensor | None
    sampling: dict[str, Any]


# ------------------------------------------------------------------------------------------------ metrics


@dataclass
class GenerationMetrics:
    """FID, IS, precision and recall of generated images against a reference; None: not asked for (left out)."""

    fid: float | None = None
    inception_score: float | Unavailable | None = None
    inception_score_std: float | None = None
    precision: float | Unavailable | None = None
    recall: float | Unavailable | None = None

    def rows(self, prefix: str = "") -> Rows:
        """Keys as the field names; mode=demo writes its samples' metrics as ``sample_fid`` ... (prefix)."""
        return [(prefix + f.name, v) for f in fields(self) if (v := getattr(self, f.name)) is not None]


@dataclass
class ReconMetrics:
    """A tokenizer's reconstructions of an image split (``recon.evaluate_reconstruction``, LPIPS, rFID)."""

    images: int
    psnr: float
    ssim: float
    l1: float
    utilisation: float
    codes_used: int
    num_codes: int
    usage_entropy: float
    usage_entropy_max: float
    perplexity: float
    lpips: float | Unavailable
    rfid: float | None = None  # None: fid not in metrics

    def rows(self) -> Rows:
        rows = [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "rfid"]
        return rows + ([("rfid", self.rfid)] if self.rfid is not None else [])


def _per_class(key: str, accuracy: dict[str, float | None]) -> Rows:
    return [(f"{key}/{name}", acc) for name, acc in accuracy.items()]


@dataclass
class DemoRecognition:
    """The demo classifier on real and reconstructed val images (the tokenizer half of mode=demo)."""

    val_accuracy_real: float
    val_accuracy_recon: float
    recon_accuracy: dict[str, float | None]  # class name -> accuracy on its reconstructions (None: no image)
    fd_demo_recon: float                     # Fréchet distance of the classifier's features, not FID

    def rows(self) -> Rows:
        return [("val_accuracy_real", self.val_accuracy_real), ("val_accuracy_recon", self.val_accuracy_recon),
                *_per_class("recon_accuracy", self.recon_accuracy), ("fd_demo_recon", self.fd_demo_recon)]


@dataclass
class DemoSamples:
    """Samples judged by the demo classifier (the samples half of mode=demo), with the Inception metrics when
    fid is among the metrics."""

    num_samples: int
    inception: GenerationMetrics | None
    fd_demo: float
    sample_accuracy: float
    sample_accuracy_per_class: dict[str, float | None]

    def rows(self) -> Rows:
        inception = self.inception.rows("sample_") if self.inception is not None else []
        return [("num_samples", self.num_samples), *inception, ("fd_demo", self.fd_demo),
                ("sample_accuracy", self.sample_accuracy),
                *_per_class("sample_accuracy", self.sample_accuracy_per_class)]
