"""Training activation memory per sample of each AR size, measured on CPU at batch 1-2 and scaled to all layers.

    python bench/activation_memory.py                      # B, L, XL, XXL, llamagen_3B; 16x16 tokens, 16,384 codes
    python bench/activation_memory.py sizes=[B] layers=[1,2]

A full XXL or 3B step does not fit this machine's RAM, and it need not: the activations of a step are
``fixed + n_layer * per_layer`` per sample (a block saves the same tensors whatever its depth). For each size a
fresh process builds the model at its real width with ``layers`` (default 1 and 2) blocks and measures the peak
above the model and its gradients (``bench/memory.py``: VmHWM with every allocation above 64 KiB mmapped) of one
forward + backward at ``batches`` (default 1 and 3), float32 and under bf16 autocast, with and without activation
checkpointing. Per sample = the slope of the peak in the batch size; per layer = its slope in the block count; the
remainder is the embeddings, head, logits and loss (and, with checkpointing, the one block being recomputed).
Dropout is on as in training (its masks are saved too).

``sizes=[tokenizer]`` measures the reference tokenizer (``+experiment=imagenet_256``, 256 px, 16,384 codes) at its
full depth, float32 only, batch 1 and 2: autoencoder forward, L1 + quantizer + generator GAN loss through the
discriminator, backward (the perceptual network's activations are not included).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory import cpu_env, peak, reset_peak  # noqa: E402
from generator.llama import GPTConfig, LlamaGPT, next_token_loss  # noqa: E402
from pipelines.cli import load_config  # noqa: E402

DEFAULTS = {"sizes": ["B", "L", "XL", "XXL", "llamagen_3B"], "layers": [1, 2], "vocab": 16384, "grid": 16,
            "threads": 2, "precisions": ["fp32", "bf16"], "batches": [1, 3]}
CPU = torch.device("cpu")


def size_config(size: str, vocab: int, grid: int, n_layer: int | None = None) -> GPTConfig:
    """``conf/generator/<size>.yaml`` as the trainer builds it (1,000 classes, the given codes and grid)."""
    spec = OmegaConf.to_container(load_config("train_ar", [f"generator={size}"]).generator.model, resolve=True)
    spec |= {"vocab_size": vocab, "num_classes": 1000, "grid": [grid, grid]}
    if n_layer is not None:
        spec["n_layer"] = n_layer
    return GPTConfig.from_dict(spec)


def step_peak_mib(model: LlamaGPT, batch: int, bf16: bool) -> float:
    """Peak memory (MiB) of one training forward + backward above what the model and its gradients hold."""
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    labels = torch.randint(0, cfg.num_classes, (batch,))

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = model(tokens, labels)
        next_token_loss(logits, tokens).backward()

    step()  # warm-up (and gradients allocated)
    gc.collect()
    base = reset_peak(CPU)
    step()
    return peak(CPU) - base


def tokenizer_child() -> dict:
    from tokenizer.discriminator import PatchDiscriminator
    from tokenizer.model import ImageTokenizer, TokenizerConfig

    cfg = load_config("train_tokenizer", ["+experiment=imagenet_256", "data.root=unused"])
    model_cfg = TokenizerConfig.from_dict(OmegaConf.to_container(cfg.tokenizer.model, resolve=True))
    model = ImageTokenizer(model_cfg).train()
    disc = PatchDiscriminator(base_channels=cfg.tokenizer.loss.disc_channels, num_layers=cfg.tokenizer.loss.disc_layers)
    disc.requires_grad_(False)

    def step_peak(batch: int) -> float:
        x = torch.rand(batch, 3, model_cfg.resolution, model_cfg.resolution) * 2 - 1

        def step() -> None:
            recon, q = model(x)
            ((recon - x).abs().mean() + q.loss - disc(recon).mean()).backward()

        step()
        gc.collect()
        base = reset_peak(CPU)
        step()
        return peak(CPU) - base

    p = [step_peak(b) for b in (1, 2)]
    per_sample = p[1] - p[0]
    return {"size": "tokenizer", "measured": [{"precision": "fp32", "peaks_mib": p, "per_sample": per_sample}],
            "scaled": {"fp32": {"per_sample_mib": per_sample}}}


def child(size: str, opts) -> dict:
    torch.set_num_threads(opts.threads)
    if size == "tokenizer":
        return tokenizer_child()
    full = size_config(size, opts.vocab, opts.grid)
    rows = []
    for layers in opts.layers:
        torch.manual_seed(0)
        model = LlamaGPT(size_config(size, opts.vocab, opts.grid, layers)).train()
        for precision in opts.precisions:
            for ckpt in (False, True):
                model.set_activation_checkpointing(ckpt)
                lo, hi = min(opts.batches), max(opts.batches)
                p = [step_peak_mib(model, b, precision == "bf16") for b in (lo, hi)]
                rows.append({"layers": layers, "precision": precision, "checkpointing": ckpt, "batches": [lo, hi],
                             "peaks_mib": p, "per_sample": (p[1] - p[0]) / (hi - lo)})
        del model
        gc.collect()
    return {"size": size, "n_layer": full.n_layer, "dim": full.dim, "measured": rows}


def scale(result: dict, layers: list[int]) -> dict:
    """Per-sample MiB at the full depth, per (precision, checkpointing), from the measured block counts."""
    lo, hi = min(layers), max(layers)
    out = {}
    for r_lo in result["measured"]:
        if r_lo["layers"] != lo:
            continue
        r_hi = next(r for r in result["measured"] if r["layers"] == hi and r["precision"] == r_lo["precision"]
                    and r["checkpointing"] == r_lo["checkpointing"])
        per_layer = (r_hi["per_sample"] - r_lo["per_sample"]) / (hi - lo)
        fixed = r_lo["per_sample"] - lo * per_layer
        key = f"{r_lo['precision']}{'_ckpt' if r_lo['checkpointing'] else ''}"
        out[key] = {"per_layer_mib": per_layer, "fixed_mib": fixed,
                    "per_sample_mib": fixed + result["n_layer"] * per_layer}
    return out


def main(argv: list[str]) -> list[dict]:
    opts = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(argv))
    results = []
    for size in opts.sizes:
        proc = subprocess.run([sys.executable, __file__, "--child", size, *argv], capture_output=True, text=True,
                              env=cpu_env(), cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{size}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        if "scaled" not in result:
            result["scaled"] = scale(result, list(opts.layers))
        results.append(result)
        s = result["scaled"]
        print(f"{size}: " + ", ".join(f"{k} {v['per_sample_mib']:.0f} MiB/sample" + (
            f" ({v['per_layer_mib']:.1f}/layer + {v['fixed_mib']:.0f})" if "per_layer_mib" in v else "")
            for k, v in s.items()), flush=True)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        o = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(sys.argv[3:]))
        print("RESULT " + json.dumps(child(sys.argv[2], o)), flush=True)
    else:
        main(sys.argv[1:])
