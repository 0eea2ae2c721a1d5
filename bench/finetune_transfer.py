"""Does ``init_from`` help? Fine-tuning vs training from scratch on new classes, at equal step budgets.

Demo data split in two: A = classes 0-4, B = classes 5-9. A source is trained on A; then, for each budget, one
run fine-tunes it on B (``init_from=``) and one trains from scratch on B for the same steps with the same
settings. Judged by the demo classifier (trained on all ten classes, so "recognised" means the right one of ten):

- tokenizer: PSNR and recognition of the reconstructions of B's val images;
- AR generator (on tokens of the A-trained tokenizer, the source's, as ``init_from`` requires): recognition of
  ``per_class`` samples of each B class (the B classes are new to the source: their class rows start at the mean).

    python bench/finetune_transfer.py                                  # budgets 100,200,400; pretrain 400
    python bench/finetune_transfer.py budgets=10,20 pretrain=20 per_class=4 train_per_class=20   # smoke run

Every run is the real trainer (``pipelines.train.tokenizer`` / ``pipelines.train.ar``) in ``<out>/runs/``;
the table is printed and written to ``<out>/results.md`` and ``results.json``, the plot to ``<out>/transfer.png``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from pipelines.cli import load_config
from pipelines.data import ImageFolderDataset
from pipelines.demo_data import make_demo_dataset
from pipelines.eval.demo_classifier import ClassifierConfig, load_or_train
from pipelines.eval.recon import evaluate_reconstruction
from pipelines.generate import iter_images, load_pipeline, sample_plan, sampling_recipe
from pipelines.images import to_uint8
from pipelines.tokens.extract import extract
from pipelines.train.ar import train as train_ar
from pipelines.train.tokenizer import train as train_tokenizer
from tokenizer.model import load_tokenizer

DEFAULTS = OmegaConf.create({
    "out": "runs/bench_transfer", "budgets": [100, 200, 400], "pretrain": 400, "threads": 2, "seed": 0,
    "size": 32, "train_per_class": 100, "val_per_class": 20, "per_class": 20, "cfg": 4.0,
    # A small tokenizer for 32 px: 8x8 tokens of 256 codes (the demo's layout, one level less, narrower).
    "tokenizer": ["tokenizer.model.base_channels=32", "tokenizer.model.channel_mult=[1,1,1]",
                  "tokenizer.model.z_channels=32", "tokenizer.model.embed_dim=32", "tokenizer.model.num_codes=256",
                  "tokenizer.loss.disc_channels=16", "train.batch_size=16"],
    "generator": ["generator.model.dim=128", "generator.model.n_layer=2", "generator.model.n_head=4",
                  "train.batch_size=32", "train.warmup_steps=20"],
})
COMMON = ["train.cpu=true", "tensorboard=false", "overwrite=true", "data.num_workers=0"]


def split_classes(root: Path, out: Path, names: list[str]) -> Path:
    """A dataset of some classes of ``root``: symbolic links to its class folders (followed by the scanner)."""
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for name in names:
            link = out / split / name
            if not link.exists():
                link.symlink_to((root / split / name).resolve(), target_is_directory=True)
    return out


def tokenizer_run(o: Any, data: Path, run_dir: Path, steps: int, init_from: Path | None) -> float:
    start = time.time()
    train_tokenizer(load_config("train_tokenizer", [
        *o.tokenizer, *COMMON, f"data.root={data}", f"data.resolution={o.size}", f"run_dir={run_dir}",
        f"train.max_steps={steps}", f"ckpt_every={steps}", f"image_every={steps}", f"log_every={max(1, steps // 2)}",
        "eval_at_end=false", f"seed={o.seed}", f"init_from={init_from or 'null'}"]))
    return time.time() - start


def ar_run(o: Any, shards: Path, run_dir: Path, steps: int, init_from: Path | None) -> float:
    start = time.time()
    train_ar(load_config("train_ar", [
        *o.generator, *COMMON, f"shards={shards}", f"run_dir={run_dir}", f"train.max_steps={steps}",
        f"ckpt_every={steps}", f"log_every={max(1, steps // 2)}", f"seed={o.seed}",
        f"init_from={init_from or 'null'}"]))
    return time.time() - start


@torch.no_grad()
def judge_tokenizer(run_dir: Path, val: ImageFolderDataset, classifier: Any, to_global: list[int]) -> dict[str, float]:
    preds, labels = [], []

    def hook(x: torch.Tensor, rec: torch.Tensor, y: torch.Tensor) -> None:
        preds.append(classifier.classify(to_uint8(rec).permute(0, 3, 1, 2)).logits.argmax(1).cpu())
        labels.append(torch.tensor([to_global[int(i)] for i in y]))

    r = evaluate_reconstruction(load_tokenizer(run_dir), val, batch_size=100, on_batch=hook)
    return {"psnr": r["psnr"], "recognised": float((torch.cat(preds) == torch.cat(labels)).float().mean())}


@torch.no_grad()
def judge_generator(run_dir: Path, o: Any, classifier: Any, all_classes: list[str]) -> dict[str, float]:
    model, tokenizer, config = load_pipeline(run_dir)
    recipe = sampling_recipe({"cfg": o.cfg}, config)
    to_global = torch.tensor([all_classes.index(n) for n in config["classes"]])
    labels, indices = sample_plan(list(range(model.cfg.num_classes)), o.per_class)
    hits = total = 0
    for chunk, images in iter_images(model, tokenizer, labels, indices, recipe, seed=o.seed, batch_size=50,
                                     progress=False):
        pred = classifier.classify(images.permute(0, 3, 1, 2)).logits.argmax(1).cpu()
        hits += int((pred == to_global[chunk]).sum())
        total += len(chunk)
    return {"recognised": hits / max(total, 1)}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("tokenizer", "psnr", "tokenizer: PSNR of B recon (dB)"),
              ("tokenizer", "recognised", "tokenizer: B recon recognised"),
              ("ar", "recognised", "AR: B samples recognised")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    budgets = sorted({r["steps"] for r in rows if r["steps"]})
    for ax, (stage, key, title) in zip(axes, panels, strict=True):
        for how, style in (("fine-tune", "o-"), ("scratch", "s--")):
            pts = [(r["steps"], r[key]) for r in rows if r["stage"] == stage and r["start"] == how]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=how)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("steps on classes 5-9")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    o = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(sys.argv[1:]))
    torch.set_num_threads(int(o.threads))
    out = Path(o.out)
    data = make_demo_dataset(out / "data", seed=o.seed, train_per_class=o.train_per_class,
                             val_per_class=o.val_per_class, size=o.size)
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    data_a, data_b = split_classes(data, out / "data_A", classes[:5]), split_classes(data, out / "data_B", classes[5:])
    classifier, info = load_or_train(data, out / "classifier", ClassifierConfig(resolution=o.size))
    print(f"demo classifier: val accuracy {info['val_accuracy']:.3f} on all 10 classes")
    val_b = ImageFolderDataset(data_b, "val", o.size)
    to_global = [classes.index(n) for n in val_b.classes]
    runs, rows, timing = out / "runs", [], {}

    # Tokenizer: source on A, then fine-tune vs scratch on B.
    tok_src = runs / "tok_A"
    timing["tok_A"] = tokenizer_run(o, data_a, tok_src, o.pretrain, None)
    rows.append({"stage": "tokenizer", "start": "source (A)", "steps": 0,
                 **judge_tokenizer(tok_src, val_b, classifier, to_global)})
    for steps in o.budgets:
        for how, init in (("fine-tune", tok_src), ("scratch", None)):
            run = runs / f"tok_B_{how}_{steps}"
            sec = tokenizer_run(o, data_b, run, steps, init)
            rows.append({"stage": "tokenizer", "start": how, "steps": steps, "seconds": round(sec, 1),
                         **judge_tokenizer(run, val_b, classifier, to_global)})

    # AR: tokens of A and B from the A tokenizer; source on A, then fine-tune vs scratch on B.
    shards = {}
    for name, root in (("A", data_a), ("B", data_b)):
        shards[name] = out / f"tokens_{name}"
        extract(load_config("extract_tokens", [f"tokenizer_ckpt={tok_src}", f"data.root={root}", "cpu=true",
                                               f"out_dir={shards[name]}", "overwrite=true", "data.num_workers=0"]))
    ar_src = runs / "ar_A"
    timing["ar_A"] = ar_run(o, shards["A"], ar_src, o.pretrain, None)
    for steps in o.budgets:
        for how, init in (("fine-tune", ar_src), ("scratch", None)):
            run = runs / f"ar_B_{how}_{steps}"
            sec = ar_run(o, shards["B"], run, steps, init)
            rows.append({"stage": "ar", "start": how, "steps": steps, "seconds": round(sec, 1),
                         **judge_generator(run, o, classifier, classes)})

    lines = ["| stage | start | steps on B | PSNR (dB) | recognised | train s |", "|---|---|---|---|---|---|"]
    for r in rows:
        psnr = f"{r['psnr']:.2f}" if "psnr" in r else "-"
        lines.append(f"| {r['stage']} | {r['start']} | {r['steps']} | {psnr} | {r['recognised']:.1%} | "
                     f"{r.get('seconds', '-')} |")
    table = "\n".join(lines)
    print(table)
    settings = OmegaConf.to_container(o)
    (out / "results.md").write_text(f"{table}\n\nsources: {json.dumps(timing)}\nsettings: {json.dumps(settings)}\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "source_seconds": timing, "settings": settings},
                                                 indent=1))
    plot(rows, out / "transfer.png")
    print(f"-> {out}/results.md, results.json, transfer.png")


if __name__ == "__main__":
    main()
