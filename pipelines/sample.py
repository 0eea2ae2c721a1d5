"""Sample class-conditional images: AR generator -> tokens -> tokenizer decoder -> PNGs (and an npz).

    python tools/sample.py class=207
    python tools/sample.py ckpt=runs/ar_B class=[1,2,3] n=16 cfg=2.0 temperature=1.0 top_k=0 top_p=1.0 seed=0
    python tools/sample.py class=all n=50 save_npz=true save_png=false      # for the ADM FID evaluator

Writes ``<out>/grid.png`` (one row per class), ``<out>/images/<class>_<name>_<i>.png``, ``<out>/sample.json`` (the
checkpoint, tokenizer, settings, and the commit of each ``hf://`` checkpoint read) and, with ``save_npz=true``,
``<out>/samples.npz`` (``arr_0``: uint8 N x H x W x 3, ``labels``: N), streamed to disk batch by batch so 50,000
samples need no more memory than one batch. ``ckpt=`` / ``tokenizer=`` take a path or an ``hf://`` spec; the default
``out`` of a checkpoint on the Hub is ``runs/hf/<owner>/<name>/samples``. Unset sampling options
(cfg, temperature, top_k, top_p) come from the generator config's ``sample`` section.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf

from pipelines.cli import entry_point, require_bool, require_checkpoint, require_int, require_text
from pipelines.errors import ConfigError
from pipelines.generate import (
    SAMPLING_KEYS,
    check_sampling_options,
    iter_images,
    load_run_or_demo,
    resolve_classes,
    sample_plan,
    sampling_recipe,
)
from pipelines.hub import resolved_commits, results_dir
from pipelines.images import rows_grid, save_png
from pipelines.util import atomic_write_text, claim_directory, save_npz


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def class_grid(shown: dict[int, list[torch.Tensor]], classes: list[int]) -> torch.Tensor:
    """grid.png's picture, uint8 (H, W, 3): one row per class of its uint8 (H, W, 3) samples (the web page's too)."""
    return rows_grid([torch.stack(shown[c]).permute(0, 3, 1, 2).float() / 127.5 - 1 for c in classes])


def check_options(cfg: DictConfig) -> None:
    for key in ("n", "batch_size", "grid_max_per_class"):
        require_int(cfg, key, 1)
    require_int(cfg, "seed", 0)
    check_sampling_options({k: cfg[k] for k in SAMPLING_KEYS})
    require_checkpoint(cfg, "demo_ckpt")
    for key in ("ckpt", "tokenizer"):
        require_checkpoint(cfg, key, optional=True)
    require_text(cfg, "out", optional=True)
    for key in ("use_cache", "compile", "save_png", "save_npz"):
        require_bool(cfg, key)
    if cfg.compile and not cfg.use_cache:
        raise ConfigError("compile=true needs use_cache=true (the compiled step decodes into the KV cache)")
    require_text(cfg, "device")


def sample(cfg: DictConfig) -> dict:
    check_options(cfg)
    ckpt, model, tokenizer, config, device = load_run_or_demo(cfg)
    spec = cfg["class"]
    classes = resolve_classes(OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec, config)
    names = list(config.get("classes") or [str(c) for c in range(model.cfg.num_classes)])
    opts = sampling_recipe({k: cfg[k] for k in SAMPLING_KEYS}, config)
    labels, indices = sample_plan(classes, cfg.n)
    out = Path(cfg.out or results_dir(ckpt) / "samples")
    source = {"ckpt": str(ckpt), "tokenizer": str(cfg.tokenizer or config.get("tokenizer_dir")),
              "tokenizer_hash": config["tokenizer_hash"]}
    with claim_directory(PartialState(), out, "sample directory"):
        return _sample(cfg, model, tokenizer, classes, names, opts, labels, indices, out, device, source)


def _sample(cfg: DictConfig, model, tokenizer, classes: list[int], names: list[str], opts: dict, labels: torch.Tensor,
            indices: torch.Tensor, out: Path, device: torch.device, source: dict) -> dict:
    (out / "images").mkdir(parents=True, exist_ok=True)
    tmp_npy = out / ".samples_arr_0.npy.tmp"  # removed at start-up if a killed run left it
    print(f"sampling {cfg.n} x {len(classes)} class(es) {classes} | cfg {opts['cfg']} ({opts['cfg_schedule']}) "
          f"temperature {opts['temperature']} top_k {opts['top_k']} top_p {opts['top_p']} seed {cfg.seed} | {device}")

    npy = None
    shown: dict[int, list[torch.Tensor]] = {c: [] for c in classes}
    done = 0
    counts = dict.fromkeys(classes, 0)
    for chunk, images in iter_images(model, tokenizer, labels, indices, opts, cfg.seed, cfg.batch_size, cfg.use_cache,
                                     compiled=cfg.compile):
        if cfg.save_npz and npy is None:
            npy = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8,
                                            shape=(len(labels), *images.shape[1:]))
        if npy is not None:
            npy[done:done + len(images)] = images.numpy()
        for c, img in zip(chunk.tolist(), images, strict=True):
            if cfg.save_png:
                save_png(img, out / "images" / f"{c:04d}_{_safe(names[c])}_{counts[c]:03d}.png")
            counts[c] += 1
            if len(shown[c]) < cfg.grid_max_per_class:
                shown[c].append(img)
        done += len(images)

    save_png(class_grid(shown, classes), out / "grid.png")
    written = [f"{out / 'grid.png'} (one row per class)"]
    if cfg.save_png:
        written.append(f"{len(labels)} PNGs in {out / 'images'}/")
    if npy is not None:
        npy.flush()
        del npy
        save_npz(out / "samples.npz", arr_0=np.load(tmp_npy, mmap_mode="r"), labels=labels.numpy())
        tmp_npy.unlink()
        written.append(f"{out / 'samples.npz'} (arr_0: uint8 {len(labels)} x H x W x 3)")
    summary = {"out": str(out), "classes": classes, "num_samples": len(labels), **opts}
    record = {**source, **summary, "n": cfg.n, "seed": cfg.seed, "hub_commits": resolved_commits()}
    atomic_write_text(out / "sample.json", json.dumps(record, indent=1))
    print("wrote " + ", ".join(written) + f", {out / 'sample.json'}")
    return summary


main = entry_point("sample", sample, tool=True)


if __name__ == "__main__":
    main()
