"""Tokenizer recipes at a fixed CPU budget: one table row per recipe, next to two reference baselines.

Why: PSNR or codebook utilisation alone can look fine while the tokens carry less than a flat colour per
patch. Every row therefore reports what a reconstruction is *worth*: PSNR and SSIM against a per-image mean
colour and 8x8 average pooling (one flat colour per token position) on the same val images, and whether the
demo classifier still recognises the class of each reconstruction (overall and the worst class).

    python bench/tokenizer_recipe.py                                   # every recipe, 300 steps each
    python bench/tokenizer_recipe.py recipes=demo,vq_16k steps=600 threads=2
    python bench/tokenizer_recipe.py list=true                         # names and overrides only

Each recipe is a list of Hydra overrides of ``conf/train_tokenizer.yaml`` trained with the real trainer
(``pipelines.train.tokenizer``), so a row is exactly what ``make train-tokenizer ARGS="..."`` would give.
Results go to ``<out>/<recipe>/`` (a normal run directory) and ``<out>/results.jsonl``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipelines.data import ImageFolderDataset
from pipelines.eval.demo import ReconRecognition, baseline_rows
from pipelines.eval.demo_classifier import DEMO_CLASSIFIER_DIR
from pipelines.eval.recon import evaluate_reconstruction
from pipelines.train.tokenizer import train

CONF = Path(__file__).resolve().parents[1] / "conf"
IBQ_ARGS = "tokenizer.model.quantizer_args"
VQ = ["tokenizer.model.quantizer=vq", f"{IBQ_ARGS}=null", f"{IBQ_ARGS}={{beta:0.25}}"]

# name -> (what it tests, overrides). "demo" is what `make demo` trains; the others vary one thing from it.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "demo": ("the make-demo recipe", []),
    "reference_layout": ("the reference's layout scaled down: 32 ch, mult 1,2,2,4, 1 res block, attention at 8, "
                         "mid block", ["tokenizer.model.base_channels=32", "tokenizer.model.channel_mult=[1,2,2,4]",
                                       "tokenizer.model.enc_res_blocks=1", "tokenizer.model.dec_res_blocks=1",
                                       "tokenizer.model.attn_resolutions=[8]", "tokenizer.model.mid_block=true"]),
    "init_std_1": ("codebook N(0, 1), the reference init, instead of the demo scale",
                   ["tokenizer.model.quantizer_args.init_std=1.0"]),
    "codebook_lr_x10": ("demo with a 10x codebook learning rate", ["train.codebook_lr_mult=10"]),
    "no_gan": ("demo without the GAN phase (L1 + quantizer losses only)", ["tokenizer.loss.disc_start=1000000"]),
    "no_entropy": ("demo without the entropy loss", ["tokenizer.model.quantizer_args.entropy_weight=0"]),
    "ibq_16k": ("IBQ with 16,384 codes", ["tokenizer.model.num_codes=16384"]),
    "vq_1k": ("plain VQ (nearest neighbour, codebook + commitment loss), 1,024 codes", VQ),
    "vq_16k": ("plain VQ, 16,384 codes", [*VQ, "tokenizer.model.num_codes=16384"]),
}


def compose_recipe(overrides: list[str], run_dir: Path, steps: int, data_root: str) -> Any:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train_tokenizer", overrides=[
            *overrides, f"run_dir={run_dir}", f"train.max_steps={steps}", f"data.root={data_root}",
            "eval_at_end=false", "tensorboard=false", "overwrite=true", f"image_every={steps}", f"ckpt_every={steps}",
            f"log_every={max(1, steps // 4)}"])


def evaluate(model: torch.nn.Module, val: ImageFolderDataset, judge: ReconRecognition) -> dict[str, Any]:
    judge.reset()
    result = evaluate_reconstruction(model, val, batch_size=100, on_batch=judge)
    return {**result, **judge.summary()}


def row(name: str, r: dict[str, Any]) -> str:
    worst = min((v, k) for k, v in r["recon_accuracy_per_class"].items())
    util = f"{r['utilisation']:.1%}" if "utilisation" in r else "-"
    ppl = f"{r['perplexity']:.0f}" if "perplexity" in r else "-"
    steps = r.get("steps", "-")
    minutes = f"{r['minutes']:.1f}" if "minutes" in r else "-"
    return (f"| {name} | {steps} | {minutes} | {r['psnr']:.2f} | {r['ssim']:.3f} | {util} | {ppl} | "
            f"{r['recon_accuracy']:.1%} | {worst[0]:.0%} ({worst[1]}) |")


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    names = args.get("recipes", ",".join(RECIPES)).split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"error: unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    if args.get("list") == "true":
        for n in names:
            print(f"{n}: {RECIPES[n][0]}\n    {' '.join(RECIPES[n][1]) or '(no overrides)'}")
        return
    steps, data_root = int(args.get("steps", 300)), args.get("data", "data/demo")
    out = Path(args.get("out", "runs/tokenizer_recipes"))
    torch.set_num_threads(int(args.get("threads", torch.get_num_threads())))
    resolution = int(OmegaConf.load(CONF / "data" / "demo.yaml").resolution)
    val = ImageFolderDataset(data_root, "val", resolution, "error")
    judge = ReconRecognition(data_root, args.get("classifier", DEMO_CLASSIFIER_DIR))

    print(f"{steps} steps per recipe, {torch.get_num_threads()} threads, {len(val)} val images of {data_root}")
    header = ("| recipe | steps | minutes | PSNR dB | SSIM | utilisation | perplexity | recognised | worst class |\n"
              "|---|---|---|---|---|---|---|---|---|")
    lines = [row(k, v) for k, v in baseline_rows(val, judge).items()]
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        cfg = compose_recipe(RECIPES[name][1], out / name, steps, data_root)
        start = time.perf_counter()
        outcome = train(cfg)
        minutes = (time.perf_counter() - start) / 60
        result = {"recipe": name, "overrides": RECIPES[name][1], "steps": steps, "minutes": minutes,
                  **evaluate(outcome.ema_model, val, judge)}
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        lines.append(row(name, result))
        print("\n".join([header, *lines]), flush=True)
    print(f"\nrows also in {out / 'results.jsonl'}")


if __name__ == "__main__":

    main(sys.argv[1:])
