"""Tokenize an ImageFolder split once into token shards, so stage two never touches images or the tokenizer.

    python -m pipelines.tokens.extract                                   # demo: runs/tokenizer_demo on data/demo train
    python -m pipelines.tokens.extract variants.ten_crop=true shard_size=500 out_dir=runs/tokens_demo_tc
    accelerate launch --multi_gpu --num_processes 8 -m pipelines.tokens.extract data=imagenet \
        data.root=/data/imagenet tokenizer_ckpt=runs/tokenizer_imagenet_256 out_dir=runs/tokens_imagenet \
        shard_size=10000 mixed_precision=bf16

Output directory::

    manifest.json                  written last: shards, counts, sha256, codebook size, grid, variants, classes,
                                   tokenizer weights hash and path (the reader checks all of them; an hf://
                                   tokenizer is recorded pinned to the commit it was read at)
    shard_00000.safetensors        images [0, S) of the sorted ImageFolder listing, S = shard_size
    shard_00001.safetensors        images [S, 2S) ...
    parts/                         per-shard records (count, sha256) that make resume and the merge work

The format (arrays, dtypes, manifest) is defined in ``pipelines/tokens/shards.py``.

Why results do not depend on the number of processes: shard k always holds images [k*S, (k+1)*S), in
batches cut at the same places; process r tokenizes shards r, r+W, r+2W, ... and writes them itself, and
the main process writes the manifest from the per-shard records at the end. Resume skips shards whose
record exists and whose file matches its sha256; ``stop_after_shards`` stops early to simulate a kill.
Corrupt images follow ``data.on_corrupt``: ``skip`` leaves them out and lists them in the manifest
(shard boundaries do not move), ``error`` stops with the file's name.

Mixed precision (``mixed_precision=bf16`` on GPU) runs the encoder in bf16 but the nearest-code search
in float32, so only the encoder's rounding can change a token.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from accelerate import Accelerator
from accelerate.utils import gather_object
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pipelines.checkpoint import load_config, weights_hash
from pipelines.cli import (
    entry_point,
    require_bool,
    require_checkpoint,
    require_choice,
    require_int,
    require_number,
    require_text,
)
from pipelines.data import load_rgb_or_skip, resize_and_crop, scan_image_folder
from pipelines.hub import pinned
from pipelines.progress import progress_bar
from pipelines.schemas import check_data
from pipelines.tokens.shards import (
    MANIFEST_FILE,
    TOKEN_SHARD_FORMAT,
    ShardIntegrityError,
    ShardManifest,
    ShardMismatchError,
    shard_name,
    token_dtype,
    write_shard,
)
from pipelines.util import atomic_write_text, claim_directory, file_sha256
from tokenizer.model import ImageTokenizer, load_tokenizer

PARTS_DIR, SETTINGS_FILE = "parts", "settings.json"


TEN_CROP_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


def token_variant_names(flip: bool, ten_crop: bool) -> list[str]:
    """Names of the stored views of each image, in storage order. Variant 0 is always the plain centre
    crop (the tokenizer's own eval transform); ten-crop adds LlamaGen's 10 views of a slightly larger
    resize (4 corners + centre, then the same 5 flipped)."""
    names = ["center"] + (["center_hflip"] if flip else [])
    if ten_crop:
        names += [f"tencrop_{n}" for n in TEN_CROP_NAMES] + [f"tencrop_{n}_hflip" for n in TEN_CROP_NAMES]
    return names


def token_views(img: Image.Image, resolution: int, flip: bool = False, ten_crop: bool = False,
                ten_crop_scale: float = 1.1) -> Tensor:
    """All variants of one image as (V, 3, R, R) in [-1, 1], ordered as ``token_variant_names``.

    The centre crop is ``resize_and_crop`` exactly (shorter side -> R, bicubic, centre crop), so tokens of
    variant 0 equal what the tokenizer saw at evaluation. Ten-crop follows LlamaGen's extract_codes: centre
    crop at ``R * ten_crop_scale``, then ``TenCrop(R)``.
    """
    center = resize_and_crop(img, resolution, None)
    views = [center] + ([torch.flip(center, dims=[-1])] if flip else [])
    if ten_crop:
        big = resize_and_crop(img, round(resolution * ten_crop_scale), None)
        crops = list(TF.ten_crop(big, [resolution, resolution]))  # 5 crops, then the same 5 of the flip
        views += crops
    return torch.stack(views)


class _ViewDataset(Dataset):
    """Source image ``i`` -> (views (V, 3, R, R), label, i); views is None for a skipped corrupt file."""

    def __init__(self, samples: list[tuple[str, int]], resolution: int, variants: DictConfig, on_corrupt: str):
        self.samples, self.resolution, self.on_corrupt = samples, resolution, on_corrupt
        self.flip, self.ten_crop, self.scale = bool(variants.flip), bool(variants.ten_crop), variants.ten_crop_scale

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, int]:
        path, label = self.samples[i]
        img = load_rgb_or_skip(path, self.on_corrupt)
        if img is None:
            return None, label, i
        return token_views(img, self.resolution, self.flip, self.ten_crop, self.scale), label, i


def _collate(batch: list[tuple[Tensor | None, int, int]]) -> tuple[Tensor | None, Tensor, Tensor, list[int]]:
    kept = [b for b in batch if b[0] is not None]
    x = torch.stack([b[0] for b in kept]) if kept else None
    return (x, torch.tensor([b[1] for b in kept], dtype=torch.int32),
            torch.tensor([b[2] for b in kept], dtype=torch.int64), [b[2] for b in batch if b[0] is None])


@torch.inference_mode()
def _tokenize(model: ImageTokenizer, x: Tensor, accelerator: Accelerator) -> Tensor:
    """(B, 3, R, R) -> (B, h, w). Under mixed precision only the encoder runs in low precision."""
    if accelerator.mixed_precision == "no":
        return model.tokenize(x)
    with accelerator.autocast():
        z = model.quant_conv(model.encoder(x))
    return model.quantizer.encode_indices(z.float())


def _settings(cfg: DictConfig, model: ImageTokenizer, tok_hash: str, resolution: int,
              samples: list[tuple[str, int]], split_dir: Path) -> dict[str, Any]:
    """Everything that determines the shard bytes; a resumed run must match it exactly."""
    listing = hashlib.sha256()
    for path, label in samples:
        listing.update(f"{Path(path).relative_to(split_dir).as_posix()}\t{label}\n".encode())
    grid = resolution // model.cfg.downsample
    return {
        "format": TOKEN_SHARD_FORMAT, "tokenizer_hash": tok_hash, "num_codes": model.cfg.num_codes,
        "grid": [grid, grid], "dtype": token_dtype(model.cfg.num_codes).name, "resolution": resolution,
        "variants": token_variant_names(cfg.variants.flip, cfg.variants.ten_crop),
        "ten_crop_scale": float(cfg.variants.ten_crop_scale) if cfg.variants.ten_crop else None,
        "shard_size": int(cfg.shard_size), "num_source_images": len(samples), "listing_sha256": listing.hexdigest(),
        "mixed_precision": str(cfg.mixed_precision), "on_corrupt": str(cfg.data.on_corrupt),
    }


def _read_json(path: Path, what: str, if_deleted: str) -> Any:
    """A JSON record of a previous extraction; a damaged one is a ``ShardIntegrityError`` naming the file."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardIntegrityError(f"{what} {path} is damaged ({err.__class__.__name__}); delete it ({if_deleted}) "
                                  "or re-run with overwrite=true") from err


def _check_previous(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume into a directory made with other settings (it would mix incompatible shards)."""
    path = out / PARTS_DIR / SETTINGS_FILE
    previous = _read_json(path, "extraction settings", "this run's settings are recorded again") \
        if path.exists() else None
    if previous is None and (out / MANIFEST_FILE).exists():
        previous = ShardManifest.read(out).settings
    if previous is not None and previous != settings:
        diff = ", ".join(f"{k}: {previous.get(k)} -> {settings.get(k)}" for k in sorted(set(previous) | set(settings))
                         if previous.get(k) != settings.get(k))
        raise ShardMismatchError(f"{out} already holds token shards extracted with other settings ({diff}); "
                                 "use another out_dir or overwrite=true")


def _clear(out: Path) -> None:
    for f in [out / MANIFEST_FILE, *out.glob("shard_*.safetensors"), *out.glob(".shard_*.tmp"),
              *(out / PARTS_DIR).glob("*.json")]:
        f.unlink(missing_ok=True)


def _record(out: Path, k: int) -> dict[str, Any] | None:
    path = out / PARTS_DIR / f"{shard_name(k)}.json"
    return _read_json(path, "shard record", "the shard it describes is then extracted again") if path.exists() else None


def _complete(out: Path, k: int) -> bool:
    """A shard counts as done when its record exists and the file still matches the recorded sha256."""
    rec = _record(out, k)
    path = out / shard_name(k)
    if rec is None or not path.exists():
        return False
    if path.stat().st_size != rec["bytes"] or file_sha256(path) != rec["sha256"]:
        print(f"shard {path} does not match its record (damaged or altered): extracting it again")
        return False
    return True


def _write_shard(out: Path, k: int, parts: dict[str, list], settings: dict[str, Any]) -> dict[str, Any]:
    """Shard to a temp name, rename, then its record (so a record always describes a complete file)."""
    h, w = settings["grid"]
    empty = {"tokens": np.zeros((0, len(settings["variants"]), h, w), np.dtype(settings["dtype"])),
             "labels": np.zeros(0, np.int32), "indices": np.zeros(0, np.int64)}
    arrays = {name: np.concatenate(parts[name]) if parts[name] else empty[name] for name in empty}
    start = k * settings["shard_size"]
    end = min(settings["num_source_images"], start + settings["shard_size"])
    rec = write_shard(out / shard_name(k), **arrays, description=f"images [{start}, {end})")
    rec = {"file": rec["file"], "start": start, "end": end, **{key: rec[key] for key in ("count", "bytes", "sha256")},
           "skipped": sorted(parts["skipped"])}
    atomic_write_text(out / PARTS_DIR / f"{shard_name(k)}.json", json.dumps(rec, indent=1))
    return rec


def check_options(cfg: DictConfig) -> None:
    for key in ("shard_size", "batch_size"):
        require_int(cfg, key, 1)
    require_int(cfg, "num_workers", 0)
    for key in ("max_images", "stop_after_shards"):
        require_int(cfg, key, 1, optional=True)
    require_int(cfg, "resolution", 8, optional=True)
    require_choice(cfg, "overwrite", (True, False))
    require_checkpoint(cfg, "tokenizer_ckpt")
    for key in ("split", "out_dir"):
        require_text(cfg, key)
    for key in ("variants.flip", "variants.ten_crop", "cpu"):
        require_bool(cfg, key)
    require_number(cfg, "variants.ten_crop_scale", 1)
    require_choice(cfg, "mixed_precision", ("no", "bf16", "fp16"))
    check_data(cfg)  # the data section (root, splits, resolution, on_corrupt, workers)


def _prepare(out: Path, overwrite: bool, settings: dict[str, Any]) -> None:
    """Main process, lock held: clear (overwrite) or check the previous extraction, then record the settings."""
    if overwrite:
        _clear(out)
    _check_previous(out, settings)
    atomic_write_text(out / PARTS_DIR / SETTINGS_FILE, json.dumps(settings, indent=1))


def extract(cfg: DictConfig) -> dict[str, Any] | None:
    """Extract (or resume) token shards as configured. Returns the manifest plus run figures on the main
    process once every shard is done; None on other processes or when stopped early. ``out_dir`` is locked
    for the whole run (one extraction per directory)."""
    check_options(cfg)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
    tok_dir = str(cfg.tokenizer_ckpt)  # a path or an hf:// spec (pipelines.hub)
    model = load_tokenizer(tok_dir, accelerator.device)
    tok_hash = weights_hash(tok_dir)
    resolution = int(cfg.resolution or load_config(tok_dir).get("data", {}).get("resolution")
                     or model.cfg.resolution)
    split_dir = Path(cfg.data.root) / cfg.split
    samples, classes = scan_image_folder(split_dir)
    samples = samples[:cfg.max_images] if cfg.max_images else samples
    settings = _settings(cfg, model, tok_hash, resolution, samples, split_dir)
    out = Path(cfg.out_dir)
    with claim_directory(accelerator, out, "token shard directory",
                         lambda: _prepare(out, cfg.overwrite, settings)):
        return _extract(cfg, accelerator, model, tok_dir, settings, samples, classes, split_dir)


def _extract(cfg: DictConfig, accelerator: Accelerator, model: ImageTokenizer, tok_dir: str, settings: dict[str, Any],
             samples: list[tuple[str, int]], classes: list[str], split_dir: Path) -> dict[str, Any] | None:
    rank, world = accelerator.process_index, accelerator.num_processes
    tok_hash, resolution, out = settings["tokenizer_hash"], settings["resolution"], Path(cfg.out_dir)
    variants, (h, w), dtype = settings["variants"], settings["grid"], np.dtype(settings["dtype"])
    n, size = len(samples), int(cfg.shard_size)
    num_shards = math.ceil(n / size)
    accelerator.wait_for_everyone()

    # Round-robin shards over processes; each shard is cut into the same batches whatever the world size.
    mine = list(range(rank, num_shards, world))
    pending = [k for k in mine if not _complete(out, k)]
    batches, owners = [], []
    for k in pending:
        for b in range(k * size, min(n, (k + 1) * size), cfg.batch_size):
            batches.append(list(range(b, min(n, (k + 1) * size, b + cfg.batch_size))))
            owners.append(k)
    remaining = {k: owners.count(k) for k in pending}
    dataset = _ViewDataset(samples, resolution, cfg.variants, cfg.data.on_corrupt)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers, collate_fn=_collate,
                        pin_memory=accelerator.device.type == "cuda")
    if accelerator.is_main_process:
        print(f"tokenizer {tok_dir} (hash {tok_hash}, {model.cfg.num_codes} codes, {h}x{w} grid) | {n} images of "
              f"{split_dir} at {resolution}px | {len(variants)} variant(s) {variants} | {num_shards} shards of "
              f"{size} | {world} process(es) on {accelerator.device} | out {out}")
    parts = {k: {"tokens": [], "labels": [], "indices": [], "skipped": []} for k in pending}
    written, processed, t0 = 0, 0, time.perf_counter()
    with progress_bar(sum(len(b) for b in batches), "extract tokens", unit="img",
                      enabled=accelerator.is_main_process) as progress:
        for (x, labels, indices, skipped), k in zip(loader, owners, strict=True):
            p = parts[k]
            if x is not None:
                views = x.flatten(0, 1).to(accelerator.device, non_blocking=True)
                ids = _tokenize(model, views, accelerator).reshape(x.shape[0], len(variants), h, w)
                p["tokens"].append(ids.cpu().numpy().astype(dtype))
                p["labels"].append(labels.numpy())
                p["indices"].append(indices.numpy())
            p["skipped"] += skipped
            processed += len(indices) + len(skipped)
            progress.update(len(indices) + len(skipped))
            remaining[k] -= 1
            if remaining[k] == 0:
                _write_shard(out, k, parts.pop(k), settings)
                written += 1
                progress.set(shards=written)
                if cfg.stop_after_shards is not None and written >= cfg.stop_after_shards:
                    break
    seconds = time.perf_counter() - t0
    totals = gather_object([(processed, written, len(mine) - len(pending))])
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None

    records = [_record(out, k) for k in range(num_shards)]
    done = sum(r is not None for r in records)
    if done < num_shards:
        print(f"stopped with {done}/{num_shards} shards complete; run the same command again to resume")
        return None
    manifest = _manifest(cfg, settings, records, classes, samples, tok_dir)
    manifest.write(out)
    images_done = sum(t[0] for t in totals)
    stats = {"images_per_s": images_done / seconds if images_done else 0.0, "seconds": seconds,
             "images_this_run": images_done, "shards_written": sum(t[1] for t in totals),
             "shards_resumed": sum(t[2] for t in totals),
             "bytes": sum(r["bytes"] for r in records), "tokens": manifest.num_tokens}
    speed = f"{stats['images_per_s']:.1f} images/s over {world} process(es)" if images_done else "nothing left to do"
    print(f"[tokens] {num_shards} shards ({stats['shards_written']} written, {stats['shards_resumed']} already "
          f"complete) | {manifest.num_images} images x {len(variants)} variants = {manifest.num_tokens:,} "
          f"tokens ({h}x{w}, {dtype.name}) | {len(manifest.skipped)} skipped | {speed} | "
          f"{stats['bytes'] / max(1, manifest.num_images):.0f} bytes/image | {out / MANIFEST_FILE}")
    return {**json.loads(manifest.to_json()), "stats": stats}


def _manifest(cfg: DictConfig, settings: dict[str, Any], records: list[dict], classes: list[str],
              samples: list[tuple[str, int]], tok_dir: str) -> ShardManifest:
    h, w = settings["grid"]
    num_images = sum(r["count"] for r in records)
    return ShardManifest(
        num_images=num_images, num_tokens=num_images * len(settings["variants"]) * h * w,
        num_codes=settings["num_codes"], grid=[h, w], dtype=settings["dtype"], variants=settings["variants"],
        resolution=settings["resolution"], classes=list(classes), num_classes=len(classes),
        tokenizer_hash=settings["tokenizer_hash"], tokenizer_path=pinned(tok_dir),
        dataset={"root": str(cfg.data.root), "split": str(cfg.split)}, shard_size=settings["shard_size"],
        num_shards=len(records),
        shards=[{k: r[k] for k in ("file", "start", "end", "count", "bytes", "sha256")} for r in records],
        skipped=[{"index": i, "path": samples[i][0]} for r in records for i in r["skipped"]], settings=settings)


main = entry_point("extract_tokens", extract)


if __name__ == "__main__":
    main()
