"""Reconstruct images through a tokenizer: per-image reconstructions, a side-by-side grid, token grids.

    python tools/reconstruct.py tokenizer=runs/tokenizer_demo input=data/demo/val out=runs/reconstruct max_images=16

``max_images`` picks that many evenly spaced over the sorted file list. Writes ``<out>/<name>.png``
(reconstruction), ``<out>/side_by_side.png`` (originals above, reconstructions below, up to 16 per
grid) and ``<out>/tokens.json`` (the token grid of every image, and the tokenizer: its path or ``hf://`` spec,
weights hash and, from the Hub, commit).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from accelerate import PartialState
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipelines.checkpoint import weights_hash
from pipelines.cli import entry_point, require_checkpoint, require_int, require_text
from pipelines.data import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    DatasetNotFoundError,
    image_files,
    load_rgb,
    resize_and_crop,
)
from pipelines.errors import ConfigError
from pipelines.hub import hub_record
from pipelines.images import psnr, save_png, save_rows, to_uint8
from pipelines.progress import progress_bar
from pipelines.util import atomic_write_text, claim_directory, evenly_spaced, pick_device
from tokenizer.model import ImageTokenizer, load_tokenizer


def list_images(spec: str | list[str]) -> list[Path]:
    """Image files from a file, a folder (recursive, sorted) or a list of either."""
    specs = list(spec) if isinstance(spec, list | tuple | ListConfig) else [spec]
    files: list[Path] = []
    for s in specs:
        p = Path(s)
        if not (p.is_dir() or p.is_file()):
            raise DatasetNotFoundError(f"input {p} is neither an image file nor a folder")
        files += image_files(p) if p.is_dir() else [p]
    if not files:
        raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {spec}")
    return files


def load_for_tokenizer(path: str | Path, resolution: int) -> torch.Tensor:
    """An image file as the tokenizer sees it: shorter side to ``resolution``, centre crop; (3, R, R) in [-1, 1].
    A file that is not a decodable image raises ``CorruptImageError`` naming it."""
    return resize_and_crop(load_rgb(str(path)), resolution, None)


def round_trip(model: ImageTokenizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids (B, h, w), reconstructions in [-1, 1]) of images ``x`` (B, 3, R, R) in [-1, 1]."""
    with torch.no_grad():
        idx = model.tokenize(x)
        return idx, model.decode_tokens(idx).clamp(-1, 1)


def check_options(cfg: DictConfig) -> None:
    require_int(cfg, "batch_size", 1)
    require_int(cfg, "max_images", 1, optional=True)
    require_checkpoint(cfg, "tokenizer")
    for key in ("out", "device"):
        require_text(cfg, key)
    if OmegaConf.is_missing(cfg, "input"):
        raise ConfigError("input is required: input=<image | folder | [a.png, b.png]>")


def reconstruct(cfg: DictConfig) -> dict:
    check_options(cfg)
    device = pick_device(cfg.device)
    model = load_tokenizer(cfg.tokenizer, device)
    files = list_images(cfg.input)
    files = [files[i] for i in evenly_spaced(len(files), cfg.max_images or None)]  # every class of a sorted folder
    out = Path(cfg.out)
    with claim_directory(PartialState(), out, "reconstruction directory"):
        return _reconstruct(cfg, model, files, out, device)


def _reconstruct(cfg: DictConfig, model, files: list[Path], out: Path, device: torch.device) -> dict:
    res = model.cfg.resolution
    tokens, originals, recons, scores = {}, [], [], []
    chunks = [files[start:start + cfg.batch_size] for start in range(0, len(files), cfg.batch_size)]
    with progress_bar(len(chunks), "reconstruct", unit="batch") as bar:
        for chunk in bar.iter(chunks):
            batch, names = [], []
            for f in chunk:
                try:
                    batch.append(load_for_tokenizer(f, res))
                    names.append(f)
                except CorruptImageError as err:
                    warnings.warn(f"skipping {err}", stacklevel=1)
            if not batch:
                continue
            x = torch.stack(batch).to(device)
            idx, rec = round_trip(model, x)
            scores += psnr(x, rec).tolist()
            for f, img, grid in zip(names, to_uint8(rec), idx.cpu(), strict=True):
                stem = f"{f.parent.name}_{f.stem}"
                save_png(img, out / f"{stem}.png")
                tokens[str(f)] = grid.tolist()
            originals.append(x.cpu())
            recons.append(rec.cpu())
    originals, recons = torch.cat(originals), torch.cat(recons)
    for g in range(0, len(originals), 16):
        suffix = "" if g == 0 else f"_{g // 16}"
        save_rows([originals[g:g + 16], recons[g:g + 16]], out / f"side_by_side{suffix}.png")
    source = {"dir": str(cfg.tokenizer), "weights_hash": weights_hash(cfg.tokenizer), **hub_record(cfg.tokenizer)}
    atomic_write_text(out / "tokens.json", json.dumps({"grid": list(idx.shape[1:]), "tokens": tokens,
                                                       "tokenizer": source}))
    summary = {"images": len(scores), "psnr": sum(scores) / max(len(scores), 1), "out": str(out)}
    print(f"{summary['images']} images reconstructed, mean PSNR {summary['psnr']:.2f} dB -> "
          f"{out}/side_by_side.png, per-image PNGs, tokens.json")
    return summary


main = entry_point("reconstruct", reconstruct, tool=True)


if __name__ == "__main__":
    main()
