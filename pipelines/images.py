"""Image tensors <-> PNG files and comparison grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from pipelines.util import atomic_write


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), rounded as PNG writers do."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_png(img: Tensor, path: str | Path) -> None:
    """One uint8 (H, W, 3) image, written atomically."""
    pil = Image.fromarray(img.numpy())
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def rows_grid(rows: Sequence[Tensor], pad: int = 2) -> Tensor:
    """Equally sized batches in [-1, 1] as the rows of one uint8 (H, W, 3) image on a white background."""
    batch = torch.cat([r.detach().float().cpu() for r in rows])
    grid = make_grid(batch.clamp(-1, 1), nrow=rows[0].shape[0], padding=pad, value_range=(-1, 1),
                     normalize=True, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0)


def save_rows(rows: Sequence[Tensor], path: str | Path, pad: int = 2) -> None:
    """Stack equally sized batches in [-1, 1] as rows of one PNG (e.g. originals above, reconstructions below)."""
    save_png(rows_grid(rows, pad), path)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR (dB) of 8-bit quantized images given in [-1, 1]."""
    a, b = to_uint8(x).float(), to_uint8(y).float()
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(255.0**2 / mse)
