"""Reconstruction quality of a tokenizer on an image split: PSNR, SSIM, L1, (LPIPS) and codebook utilisation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from pipelines.data import collate_images
from pipelines.eval.metrics import ssim
from pipelines.images import psnr, to_uint8
from pipelines.progress import progress_bar
from tokenizer.model import ImageTokenizer
from tokenizer.quantizer import code_counts, entropy

# Called once per batch with (originals, reconstructions, labels); images in [-1, 1] on the model's device.
BatchHook = Callable[[Tensor, Tensor, Tensor], None]


@torch.no_grad()
def evaluate_reconstruction(model: ImageTokenizer, dataset: Dataset, batch_size: int = 32,
                            device: str | torch.device = "cpu", max_images: int | None = None,
                            num_workers: int = 0, perceptual: nn.Module | None = None,
                            on_batch: BatchHook | None = None) -> dict[str, Any]:
    """Tokenize and decode every image (centre crop); utilisation = fraction of codes used over the split.

    PSNR and SSIM are on the 8-bit images (what a PNG holds). ``usage_entropy`` is the entropy (nats) of the
    code-usage histogram over the split (``perplexity`` = its exp; the maximum is log(num_codes), kept as
    ``usage_entropy_max``). ``perceptual`` (e.g. LPIPS) adds its mean under ``lpips``. ``on_batch`` lets a caller
    compute more (FID features, a classifier) from the same reconstructions.
    """
    model.eval()
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
    num_codes = model.cfg.num_codes
    counts = torch.zeros(num_codes, dtype=torch.float64)
    psnr_sum = l1_sum = ssim_sum = lpips_sum = 0.0
    images = 0
    with progress_bar(len(loader), "eval reconstruction", unit="batch", leave=False) as bar:
        for x, labels in bar.iter(loader):
            if x.shape[0] == 0:
                continue
            x = x.to(device)
            idx = model.tokenize(x)
            rec = model.decode_tokens(idx).clamp(-1, 1)
            counts += code_counts(idx, num_codes).cpu().double()
            psnr_sum += float(psnr(x, rec).sum())
            x8, rec8 = (to_uint8(t).permute(0, 3, 1, 2).float() for t in (x, rec))
            ssim_sum += float(ssim(x8, rec8).sum())
            l1_sum += float((x - rec).abs().flatten(1).mean(1).sum())
            if perceptual is not None:
                lpips_sum += float(perceptual(x, rec).sum())
            if on_batch is not None:
                on_batch(x, rec, labels)
            images += x.shape[0]
    probs = counts.float() / counts.sum().clamp_min(1)
    h = float(entropy(probs))
    result = {
        "images": images,
        "psnr": psnr_sum / max(images, 1),
        "ssim": ssim_sum / max(images, 1),
        "l1": l1_sum / max(images, 1),
        "utilisation": float((counts > 0).float().mean()),
        "codes_used": int((counts > 0).sum()),
        "num_codes": num_codes,
        "perplexity": math.exp(h),
        "usage_entropy": h,
        "usage_entropy_max": math.log(num_codes),
    }
    if perceptual is not None:
        result["lpips"] = lpips_sum / max(images, 1)
    return result
