"""Reconstruction quality of a tokenizer on an image split: PSNR, L1 and codebook utilisation."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipelines.data import collate_images
from pipelines.images import psnr
from tokenizer.model import IBQTokenizer
from tokenizer.quantizer import entropy


@torch.no_grad()
def evaluate_reconstruction(model: IBQTokenizer, dataset: Dataset, batch_size: int = 32,
                            device: str | torch.device = "cpu", max_images: int | None = None,
                            num_workers: int = 0) -> dict[str, Any]:
    """Tokenize and decode every image (centre crop); utilisation = fraction of codes used over the split."""
    model.eval()
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
    num_codes = model.cfg.num_codes
    counts = torch.zeros(num_codes, dtype=torch.long)
    psnr_sum = l1_sum = 0.0
    images = 0
    for x, _ in tqdm(loader, desc="eval reconstruction", leave=False):
        x = x.to(device)
        idx = model.tokenize(x)
        rec = model.decode_tokens(idx).clamp(-1, 1)
        counts += torch.bincount(idx.reshape(-1).cpu(), minlength=num_codes)
        psnr_sum += float(psnr(x, rec).sum())
        l1_sum += float((x - rec).abs().flatten(1).mean(1).sum())
        images += x.shape[0]
    probs = counts.float() / counts.sum().clamp_min(1)
    return {
        "images": images,
        "psnr": psnr_sum / max(images, 1),
        "l1": l1_sum / max(images, 1),
        "utilisation": float((counts > 0).float().mean()),
        "codes_used": int((counts > 0).sum()),
        "num_codes": num_codes,
        "perplexity": float(torch.exp(entropy(probs))),
    }
