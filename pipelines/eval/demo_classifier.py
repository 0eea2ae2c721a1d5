"""A small CNN that recognises the demo classes: the judge of "is class k recognisable in samples of class k".

No downloaded weights are involved: the classifier is trained here, once, on the demo train split (CPU, about a
minute) and cached (``model.safetensors`` + ``config.yaml``). The cache is reused while the dataset's
``demo_meta.json`` and the training settings are unchanged. Its pooled features (``features``) also give
``fd_demo``, a Fréchet distance that is NOT FID (different network, different features).
CLI: ``python tools/demo_classifier.py data=data/demo out=runs/demo_classifier`` (``main`` below).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from pipelines.checkpoint import MODEL_FILE, load_model, save_model
from pipelines.cli import entry_point, require_bool, require_int, require_text
from pipelines.data import DatasetNotFoundError, load_rgb, resize_and_crop, scan_image_folder
from pipelines.demo_data import META_FILE
from pipelines.images import to_uint8
from pipelines.progress import progress_bar

DEMO_CLASSIFIER_DIR = "runs/demo_classifier"  # the shared cache; YAML: ${demo_classifier_dir:} (pipelines/cli.py)


@dataclass
class ClassifierConfig:
    num_classes: int = 10
    resolution: int = 64
    width: int = 16  # channels of the first conv; doubled at each of the 4 stages (feature dim = 8 * width)
    epochs: int = 3
    blur_prob: float = 0.5  # fraction of training images blurred (down- then up-sampled by 2 or 4)
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


class Classified(NamedTuple):
    """The classifier's verdict on a batch: pooled features (for ``fd_demo``) and class logits."""

    features: Tensor
    logits: Tensor


class DemoClassifier(nn.Module):
    """Four conv-BN-ReLU stages (the first strided, then max-pools), global average pooling, a linear head."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        chans = [3, w, 2 * w, 4 * w, 8 * w]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2 if i == 0 else 1, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
            if 0 < i < 3:
                layers.append(nn.MaxPool2d(2))
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], cfg.num_classes)

    def prepare(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> float in [-1, 1] at the classifier's resolution (antialiased resize if needed)."""
        x = images.to(self.head.weight.device, torch.float32) / 127.5 - 1
        if x.shape[-1] != self.cfg.resolution or x.shape[-2] != self.cfg.resolution:
            x = F.interpolate(x, size=(self.cfg.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return x

    def features(self, x: Tensor) -> Tensor:
        """Pooled features (B, 8 * width) of images in [-1, 1]; what ``fd_demo`` is computed on."""
        return self.trunk(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def classify(self, images: Tensor) -> Classified:
        """uint8 images -> pooled features and logits (eval mode)."""
        self.eval()
        f = self.features(self.prepare(images))
        return Classified(f, self.head(f))


def load_split_uint8(root: str | Path, split: str, resolution: int) -> tuple[Tensor, Tensor, list[str]]:
    """A whole ImageFolder split in memory: uint8 (N, 3, R, R), labels (N,), class names.

    Images already R x R are taken as they are; others are resized and centre-cropped as in training.
    """
    samples, classes = scan_image_folder(Path(root) / split)
    xs = []
    with progress_bar(len(samples), f"load {split}", unit="img", leave=False) as bar:
        for path, _ in bar.iter(samples):
            img = load_rgb(path)
            if img.size == (resolution, resolution):
                xs.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
            else:
                xs.append(to_uint8(resize_and_crop(img, resolution, None)[None])[0].permute(2, 0, 1))
    return torch.stack(xs), torch.tensor([label for _, label in samples]), classes


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random horizontal flip and shift by up to 1/8 of the size (reflect padding), per image."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def _blur(x: Tensor, prob: float, gen: torch.Generator) -> Tensor:
    """Down-sample some images by 2 or 4 (area) and back (bilinear): shape and colour survive, fine texture not.

    Trained this way the classifier still recognises a class in a blurry reconstruction or sample, as the demo
    classes are designed to be (every pair differs in colour and in shape or texture).
    """
    b, _, h, w = x.shape
    pick = torch.rand(b, generator=gen)
    factor = torch.where(torch.rand(b, generator=gen) < 0.5, 2, 4)
    out = x.clone()
    for f in (2, 4):
        mask = (pick < prob) & (factor == f)
        if mask.any():
            small = F.interpolate(x[mask], size=(h // f, w // f), mode="area")
            out[mask] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out


@torch.no_grad()
def accuracy(model: DemoClassifier, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    preds = torch.cat([model.classify(images[i:i + batch_size]).logits.argmax(1).cpu()
                       for i in range(0, len(images), batch_size)])
    return float((preds == labels).float().mean())


def per_class_accuracy(preds: Tensor, labels: Tensor, num_classes: int) -> list[float | None]:
    """Fraction of images of class k predicted as k, per k (None for a class with no images)."""
    out: list[float | None] = []
    for k in range(num_classes):
        mask = labels == k
        out.append(float((preds[mask] == k).float().mean()) if mask.any() else None)
    return out


def train_classifier(root: str | Path, cfg: ClassifierConfig, device: str | torch.device = "cpu"
                     ) -> tuple[DemoClassifier, dict[str, Any]]:
    """Train on ``root/train``, measure on ``root/val``; returns the model (eval mode) and a summary."""
    start = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, y_train, classes = load_split_uint8(root, "train", cfg.resolution)
    x_val, y_val, val_classes = load_split_uint8(root, "val", cfg.resolution)
    if val_classes != classes:
        raise DatasetNotFoundError(f"{root}: train and val have different class folders")
    cfg = replace(cfg, num_classes=len(classes))
    model = DemoClassifier(cfg).to(device)
    steps = cfg.epochs * ((len(x_train) + cfg.batch_size - 1) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.2)
    with progress_bar(steps, "train demo classifier", unit="step", leave=False) as bar:
        for _ in range(cfg.epochs):
            model.train()
            for idx in torch.randperm(len(x_train), generator=gen).split(cfg.batch_size):
                x = _blur(model.prepare(_augment(x_train[idx], gen)), cfg.blur_prob, gen)
                loss = F.cross_entropy(model(x), y_train[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.set(loss=loss.item())
                bar.update()
    model.eval()
    summary = {"val_accuracy": accuracy(model, x_val, y_val), "train_images": len(x_train),
               "val_images": len(x_val), "classes": classes, "train_seconds": round(time.time() - start, 1)}
    return model, summary


def _cache_key(root: Path, cfg: ClassifierConfig) -> dict[str, Any]:
    meta = root / META_FILE
    data = json.loads(meta.read_text()) if meta.is_file() else {"root": str(root.resolve())}
    return {"data": data, "classifier": asdict(cfg)}


def load_or_train(root: str | Path, cache_dir: str | Path = DEMO_CLASSIFIER_DIR,
                  cfg: ClassifierConfig | None = None, device: str | torch.device = "cpu",
                  retrain: bool = False) -> tuple[DemoClassifier, dict[str, Any]]:
    """The cached classifier for this dataset and config, training (and caching) it first when needed."""
    root, cache_dir = Path(root), Path(cache_dir)
    cfg = cfg or ClassifierConfig()
    key = _cache_key(root, cfg)
    if not retrain and (cache_dir / MODEL_FILE).is_file():
        state, saved = load_model(cache_dir)
        if saved.get("key") == key:
            model = DemoClassifier(ClassifierConfig(**saved["model"])).to(device)
            model.load_state_dict(state, strict=True)
            return model.eval(), {**saved["summary"], "cached": True}
    model, summary = train_classifier(root, cfg, device)
    save_model(cache_dir, model.state_dict(), {"key": key, "model": asdict(model.cfg), "summary": summary})
    return model, {**summary, "cached": False}


def load_demo_classifier(root: str | Path, cache_dir: str | Path, device: str | torch.device = "cpu",
                         epochs: int = ClassifierConfig.epochs) -> tuple[DemoClassifier, dict[str, Any]]:
    """The cached classifier at the dataset's own image size (from its ``demo_meta.json``)."""
    meta = Path(root) / META_FILE
    size = json.loads(meta.read_text())["size"] if meta.is_file() else ClassifierConfig.resolution
    return load_or_train(root, cache_dir, ClassifierConfig(resolution=size, epochs=epochs), device)


def check_options(cfg: DictConfig) -> None:
    for key in ("data", "out"):
        require_text(cfg, key)
    require_int(cfg, "resolution", 8)
    require_int(cfg, "epochs", 1)
    require_int(cfg, "seed", 0)
    require_bool(cfg, "retrain")


def report(cfg: DictConfig) -> None:
    check_options(cfg)
    ccfg = ClassifierConfig(resolution=cfg.resolution, epochs=cfg.epochs, seed=cfg.seed)
    _, summary = load_or_train(cfg.data, cfg.out, ccfg, retrain=cfg.retrain)
    how = "cached" if summary["cached"] else f"trained in {summary['train_seconds']} s"
    print(f"demo classifier ({how}) -> {cfg.out}: val accuracy {summary['val_accuracy']:.2%} "
          f"on {summary['val_images']} images")


main = entry_point("demo_classifier", report, tool=True)


if __name__ == "__main__":
    main()
