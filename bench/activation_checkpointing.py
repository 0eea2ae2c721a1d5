"""Peak memory and step time of one AR training step with and without activation checkpointing (CPU).

    python bench/activation_checkpointing.py                      # dim 256, 8 layers, 16x16 tokens, batch 16 (~1 min)
    python bench/activation_checkpointing.py layers=4 batch=64 dim=512

Each setting runs in a fresh process (peak RSS only grows), which builds the model, takes one warm-up step, then
reads its peak RSS (``resource.getrusage``) before and after timed forward + backward steps. The difference is
what the step needs on top of the model, optimizer state and the allocator's warm pool: mostly the saved
activations, which checkpointing replaces by one block input per layer plus one block's recomputation.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from generator.llama import GPTConfig, LlamaGPT, next_token_loss  # noqa: E402

DEFAULTS = {"dim": 256, "layers": 8, "heads": 4, "grid": 16, "vocab": 1024, "batch": 16, "steps": 1, "threads": 2}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(opts: dict, checkpointing: bool) -> dict:
    torch.set_num_threads(opts["threads"])
    torch.manual_seed(0)
    model = LlamaGPT(GPTConfig(vocab_size=opts["vocab"], num_classes=10, grid=(opts["grid"], opts["grid"]),
                               dim=opts["dim"], n_layer=opts["layers"], n_head=opts["heads"], ffn_multiple_of=64,
                               token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)).train()
    model.set_activation_checkpointing(checkpointing)
    tokens = torch.randint(0, opts["vocab"], (opts["batch"], opts["grid"] ** 2))
    labels = torch.randint(0, 10, (opts["batch"],))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        next_token_loss(model(tokens, labels), tokens).backward()

    # Gradients exist before the baseline so that only the step's transient memory is measured; peak RSS
    # includes the warm-up step's own peak, so the baseline is read *before* it, after allocating grads.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    base = peak_rss_mib()
    step()
    t0 = time.perf_counter()
    for _ in range(opts["steps"]):
        step()
    seconds = (time.perf_counter() - t0) / opts["steps"]
    return {"checkpointing": checkpointing, "step_peak_mib": peak_rss_mib() - base, "base_mib": base,
            "seconds_per_step": seconds, "params_m": model.num_params() / 1e6}


def main(argv: list[str]) -> None:
    opts = dict(DEFAULTS)
    for arg in argv:
        key, value = arg.split("=", 1)
        if key not in opts:
            raise SystemExit(f"error: unknown option {key!r}; options: {', '.join(opts)}")
        opts[key] = int(value)
    rows = []
    for checkpointing in (False, True):
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(opts), str(int(checkpointing))],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"LlamaGPT {rows[0]['params_m']:.1f}M params (dim {opts['dim']}, {opts['layers']} layers), "
          f"batch {opts['batch']} x {opts['grid'] ** 2} tokens, {opts['threads']} threads, float32 CPU")
    print(f"{'checkpointing':>14} {'step peak MiB':>14} {'s/step':>8}")
    for r in rows:
        print(f"{'on' if r['checkpointing'] else 'off':>14} {r['step_peak_mib']:14.0f} {r['seconds_per_step']:8.2f}")
    off, on = rows
    print(f"memory of the step: {on['step_peak_mib'] / off['step_peak_mib']:.2f}x, "
          f"time: {on['seconds_per_step'] / off['seconds_per_step']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]), bool(int(sys.argv[3])))))
    else:
        main(sys.argv[1:])
