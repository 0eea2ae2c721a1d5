"""Synthetic inputs for the benchmarks that must run anywhere (no dataset): token shards in the real format.

Images come from ``pipelines.demo_data.make_demo_dataset`` (procedural ImageFolder at any size); token shards are
written here with the real writer (``pipelines.tokens.shards``), so the AR trainer reads them as it reads
extracted ones (checksums, manifest, range checks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.tokens.shards import ShardManifest, shard_name, token_dtype, write_shard


def write_token_shards(out: str | Path, num_images: int, num_codes: int, grid: tuple[int, int], num_classes: int,
                       shard_size: int = 64, seed: int = 0) -> Path:
    """Uniformly random tokens and labels as ``num_images`` centre-crop items; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(num_codes)
    records = []
    for k, start in enumerate(range(0, num_images, shard_size)):
        end = min(num_images, start + shard_size)
        tokens = rng.integers(0, num_codes, (end - start, 1, *grid)).astype(dtype)
        labels = rng.integers(0, num_classes, end - start)
        rec = write_shard(out / shard_name(k), tokens, labels, np.arange(start, end), f"synthetic [{start}, {end})")
        records.append({**rec, "start": start, "end": end})
    ShardManifest(num_images=num_images, num_tokens=grid[0] * grid[1], num_codes=num_codes, grid=list(grid),
                  dtype=dtype.name, variants=["center"], resolution=0,
                  classes=[f"class_{i:04d}" for i in range(num_classes)], num_classes=num_classes,
                  tokenizer_hash="synthetic", tokenizer_path=None, dataset={"root": "synthetic", "split": "train"},
                  shard_size=shard_size, num_shards=len(records), shards=records).write(out)
    return out
