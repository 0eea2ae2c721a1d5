"""Sampling speed with and without the KV cache (random weights: speed does not depend on training).

    python bench/sample.py                       # tiny generator on CPU (demo grid 8x8 and a 16x16 grid)
    python bench/sample.py device=cuda sizes=[B] # the reference B model on a GPU (16x16 tokens, 16,384 codes)

Prints one table row per (model, grid, batch, cache): generated tokens per second (batch x h*w / time)
and the cache's speed-up over recomputing the whole prefix at every step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from generator.llama import GPTConfig, LlamaGPT
from generator.sampling import generate

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"sizes": ["tiny"], "grids": None, "batch": None, "device": "cpu", "threads": 2, "repeats": 2,
            "cfg": 2.0, "vocab": None, "dtype": "float32"}


def build(size: str, grid: int, vocab: int, device: str, dtype: torch.dtype) -> LlamaGPT:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        spec = OmegaConf.to_container(compose("train_ar", [f"generator={size}"]).generator.model)
    cfg = GPTConfig.from_dict({**spec, "vocab_size": vocab, "num_classes": 1000 if size != "tiny" else 10,
                               "grid": [grid, grid]})
    torch.manual_seed(0)
    model = LlamaGPT(cfg)
    with torch.no_grad():
        model.output.weight.normal_(0, 0.02)  # non-degenerate logits
    return model.to(device=device, dtype=dtype).eval()


def timed(model: LlamaGPT, batch: int, use_cache: bool, cfg_scale: float, repeats: int) -> float:
    labels = torch.arange(batch) % model.cfg.num_classes
    device = model.tok_embeddings.weight.device
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, labels, cfg_scale=cfg_scale, generator=torch.Generator(device).manual_seed(0),
                 use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return batch * model.cfg.block_size / best


def main() -> None:
    opts = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(sys.argv[1:]))
    torch.set_num_threads(opts.threads)
    dtype = getattr(torch, opts.dtype)
    print(f"device {opts.device} | torch {torch.__version__} | {opts.threads} CPU threads | dtype {opts.dtype} | "
          f"cfg {opts.cfg} (doubled batch) | best of {opts.repeats}")
    print("| model | params | grid | vocab | batch | tokens/s no cache | tokens/s KV cache | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for size in opts.sizes:
        tiny = size == "tiny"
        vocab = opts.vocab or (1024 if tiny else 16384)
        for grid in opts.grids or ([8, 16] if tiny else [16]):
            model = build(size, grid, vocab, opts.device, dtype)
            batch = opts.batch or (16 if tiny else 32)
            generate(model, torch.zeros(2, dtype=torch.long), use_cache=True)  # warm-up
            slow = timed(model, batch, False, opts.cfg, opts.repeats)
            fast = timed(model, batch, True, opts.cfg, opts.repeats)
            print(f"| {size} | {model.num_params() / 1e6:.1f}M | {grid}x{grid} | {vocab} | {batch} | {slow:,.0f} | "
                  f"{fast:,.0f} | {fast / slow:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
