"""Sampling speed: eager KV-cache sampling against the compiled decode step (random weights: speed does not
depend on training), and optionally against recomputing the whole prefix at every step.

    python bench/sample.py                                 # CPU: tiny demo model, ~30M model (16x16, batch 8, 32)
    python bench/sample.py sizes=[tiny] nocache=true batch=[16]       # also the no-cache sampler
    python bench/sample.py device=cuda sizes=[B]           # the reference B model on a GPU (16x16, 16,384 codes)

Each row: generated tokens per second (batch x h*w / time) of eager and compiled sampling, timed back to back
``repeats`` times (medians; the spread of the per-pair ratio shows the noise of a shared machine), and the
compile time (the first call of a batch size, less one compiled run; not in tokens/s). Guidance doubles the
batch (cfg != 1). On a busy machine ``threads=1 clock=cpu`` times this process's CPU time instead of the wall clock.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from generator.llama import GPTConfig, LlamaGPT
from generator.sampling import generate

ROOT = Path(__file__).resolve().parents[1]
# name -> (conf/generator size, architecture overrides, grid, vocab, batches)
CASES = {
    "tiny": ("tiny", {}, 8, 1024, [1, 16]),                                   # the demo generator
    "30M": ("tiny", {"dim": 512, "n_layer": 6, "n_head": 8, "ffn_multiple_of": 64}, 16, 1024, [8, 32]),
    "B": ("B", {}, 16, 16384, [32]),
}
DEFAULTS = {"sizes": ["tiny", "30M"], "batch": None, "device": "cpu", "threads": 2, "repeats": 3, "cfg": 2.0,
            "dtype": "float32", "nocache": False, "clock": "wall"}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time (a busy machine)


def build(size: str, grid: int, vocab: int, device: str, dtype: torch.dtype, **overrides) -> LlamaGPT:
    from pipelines.cli import register_configs  # conf/ composes from the registered _hydra and schemas

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        spec = OmegaConf.to_container(compose("train_ar", [f"generator={size}"]).generator.model)
    cfg = GPTConfig.from_dict({**spec, **overrides, "vocab_size": vocab,
                               "num_classes": 1000 if size != "tiny" else 10, "grid": [grid, grid]})
    torch.manual_seed(0)
    model = LlamaGPT(cfg)
    with torch.no_grad():
        model.output.weight.normal_(0, 0.02)  # non-degenerate logits
    return model.to(device=device, dtype=dtype).eval()


def run_once(model: LlamaGPT, batch: int, cfg_scale: float, clock=time.perf_counter, **kwargs) -> float:
    """Seconds for one ``generate`` call of ``batch`` images."""
    labels = torch.arange(batch) % model.cfg.num_classes
    device = model.tok_embeddings.weight.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    generate(model, labels, cfg_scale=cfg_scale, generator=torch.Generator(device).manual_seed(0), **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t0


def main() -> None:
    opts = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(sys.argv[1:]))
    torch.set_num_threads(opts.threads)
    if opts.clock not in CLOCKS:
        raise SystemExit(f"error: clock must be one of {', '.join(CLOCKS)}, got {opts.clock!r}")
    clock = CLOCKS[opts.clock]
    dtype = getattr(torch, opts.dtype)
    print(f"device {opts.device} | torch {torch.__version__} | {opts.threads} CPU threads | dtype {opts.dtype} | "
          f"cfg {opts.cfg} (doubled batch) | {opts.clock} clock | eager and compiled back to back, "
          f"median of {opts.repeats}")
    print("| model | params | grid | vocab | batch | tokens/s no cache | tokens/s eager (KV cache) | "
          "tokens/s compiled | compiled / eager (min-max) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in opts.sizes:
        if name not in CASES:
            raise SystemExit(f"error: sizes must be among {', '.join(CASES)}, got {name!r}")
        size, overrides, grid, vocab, batches = CASES[name]
        batches = opts.batch or batches
        model = build(size, grid, vocab, opts.device, dtype, **overrides)
        run_once(model, 2, opts.cfg)  # warm-up (allocator, threads)
        for batch in batches:
            tokens = batch * model.cfg.block_size
            compile_s = run_once(model, batch, opts.cfg, clock, compiled=True)  # compiles this batch size
            eager, fast = [], []
            for _ in range(opts.repeats):
                eager.append(run_once(model, batch, opts.cfg, clock))
                fast.append(run_once(model, batch, opts.cfg, clock, compiled=True))
            ratios = [e / f for e, f in zip(eager, fast, strict=True)]
            slow = f"{tokens / run_once(model, batch, opts.cfg, clock, use_cache=False):,.0f}" if opts.nocache else "-"
            print(f"| {name} | {model.num_params() / 1e6:.1f}M | {grid}x{grid} | {vocab} | {batch} | {slow} | "
                  f"{tokens / statistics.median(eager):,.0f} | {tokens / statistics.median(fast):,.0f} | "
                  f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                  f"{compile_s - statistics.median(fast):.0f} |", flush=True)


if __name__ == "__main__":
    main()
