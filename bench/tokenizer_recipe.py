"""Tokenizer recipes at a fixed CPU budget: one table row per recipe, next to two reference baselines.

Why: PSNR or codebook utilisation alone can look fine while the tokens carry less than a flat colour per
patch. Every row therefore reports what a reconstruction is *worth*: PSNR and SSIM against a per-image mean
colour and 8x8 average pooling (one flat colour per token position) on the same val images, and whether the
demo classifier still recognises the class of each reconstruction (overall and the worst class).

    python bench/tokenizer_recipe.py                                   # every recipe, 300 steps each
    python bench/tokenizer_recipe.py recipes=demo,vq_16k steps=600 threads=2
    python bench/tokenizer_recipe.py list=true                         # names and overrides only
    python bench/tokenizer_recipe.py data=data/photos/64px recipes=photos_64,photos_demo steps=2000   # photographs
    python bench/tokenizer_recipe.py data=data/photos/64px recipes=photos_64_grid_16 grid=16 kmeans=1024

On a dataset other than the demo (e.g. the photographs of ``tools/make_photo_data.py``) the demo classifier does not
apply: rows report PSNR, SSIM, utilisation and perplexity beside three baselines (mean colour, average pooling and a
bicubic down-and-up resize at the token grid; ``kmeans=<codes>`` adds a k-means codebook of raw patches, one per
token), and ``<out>/grid.png`` shows val originals above each row's
reconstructions. The ``no_quantizer`` recipes train the same autoencoder with the quantizer replaced by the identity:
the ceiling a quantizer is judged against (it has no tokens, so no utilisation).

Each recipe is a list of Hydra overrides of ``conf/train_tokenizer.yaml`` trained with the real trainer
(``pipelines.train.tokenizer``), so a row is exactly what ``make train-tokenizer ARGS="..."`` would give.
Results go to ``<out>/<recipe>/`` (a normal run directory) and ``<out>/results.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipelines.cli import register_configs
from pipelines.data import ImageFolderDataset, collate_images
from pipelines.eval.demo import ReconRecognition, baseline_reconstructions, baseline_rows
from pipelines.eval.demo_classifier import DEMO_CLASSIFIER_DIR
from pipelines.eval.metrics import ssim
from pipelines.eval.recon import evaluate_reconstruction
from pipelines.images import psnr, save_rows, to_uint8
from pipelines.train.tokenizer import train
from tokenizer import quantizer as quantizers

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

# On photographs (data=data/photos/64px): the demo recipe, its no-quantizer ceiling, then one change at a time.
NO_QUANTIZER = ["tokenizer.model.quantizer=none", f"{IBQ_ARGS}=null"]
RECIPES.update({
    "photos_demo": ("the make-demo recipe on photographs", []),
    "photos_demo_no_quantizer": ("the demo autoencoder without a quantizer (ceiling)", NO_QUANTIZER),
    "photos_norm_none": ("demo without normalisation layers", ["tokenizer.model.norm=none"]),
    "photos_norm_none_no_quantizer": ("demo without normalisation layers or quantizer (ceiling)",
                                      ["tokenizer.model.norm=none", *NO_QUANTIZER]),
    "photos_res1": ("demo with a residual block per level in encoder and decoder",
                    ["tokenizer.model.enc_res_blocks=1", "tokenizer.model.dec_res_blocks=1"]),
    "photos_lr_1e-3": ("demo with lr 1e-3 (demo: 4e-4)", ["train.lr=1e-3"]),
    "photos_norm_none_channel_shuffle": ("photos_norm_none trained on crops with shuffled RGB channels (run it with "
                                         "data=<make_photo_data.py channel_shuffle=true>/64px)",
                                         ["tokenizer.model.norm=none"]),
    "photos_norm_none_lr_1e-3": ("demo without normalisation layers, lr 1e-3",
                                 ["tokenizer.model.norm=none", "train.lr=1e-3"]),
})

# From photos_64 as first shipped (norm none, codebook init 0.125, on channel-shuffled crops:
# data=data/photos_shuffle/64px), one change each: token budget (codes per token, tokens per image), codebook scale, lr.
PHOTOS_64 = ["tokenizer=photos_64", f"{IBQ_ARGS}.init_std=0.125"]  # the recipe as first shipped (init 0.125)
PHOTOS_64_16 = ["tokenizer=photos_64", "tokenizer.model.channel_mult=[1,1,1]"]  # photos_64 (init 1), 16x16 tokens
RECIPES.update({
    "photos_64": ("photos_64 as first shipped (8x8 tokens, 1,024 codes, codebook init N(0, 0.125^2))", PHOTOS_64),
    "photos_64_codes_16k": ("photos_64 with 16,384 codes", [*PHOTOS_64, "tokenizer.model.num_codes=16384"]),
    "photos_64_grid_16": ("photos_64 with 16x16 tokens (one downsampling less: factor 4, the reference's 256 tokens "
                          "per image)", [*PHOTOS_64, "tokenizer.model.channel_mult=[1,1,1]"]),
    "photos_64_init_std_1": ("photos_64 with the reference codebook init N(0, 1) (= photos_64 as shipped now)",
                             ["tokenizer=photos_64"]),
    "photos_64_lr_1e-3": ("photos_64 with lr 1e-3", [*PHOTOS_64, "train.lr=1e-3"]),
    "photos_64_no_quantizer": ("photos_64 without a quantizer (ceiling)", [*PHOTOS_64, *NO_QUANTIZER]),
    "photos_64_grid_16_init_std_1": ("photos_64 with 16x16 tokens and the codebook init N(0, 1) (the two gains)",
                                     PHOTOS_64_16),
})
# From photos_64 at 16x16 tokens (photos_64_grid_16_init_std_1), one change each.
RECIPES.update({
    "photos_64_grid_16_lr_1e-3": ("16x16 tokens, init N(0, 1), lr 1e-3 (photos_64: 4e-4)",
                                  [*PHOTOS_64_16, "train.lr=1e-3"]),
    "photos_64_grid_16_embed_16": ("16x16 tokens, init N(0, 1), 16-d codes (photos_64: 64-d)",
                                   [*PHOTOS_64_16, "tokenizer.model.embed_dim=16"]),
    "photos_64_grid_16_lr_2e-3": ("16x16 tokens, init N(0, 1), lr 2e-3", [*PHOTOS_64_16, "train.lr=2e-3"]),
    "photos_64_grid_16_codebook_lr_1e-3": ("16x16 tokens, init N(0, 1), lr 4e-4 but 1e-3 for the codebook only",
                                           [*PHOTOS_64_16, "train.codebook_lr_mult=2.5"]),
    "photos_64_init_std_1_lr_1e-3": ("8x8 tokens, init N(0, 1) (photos_64 now), lr 1e-3",
                                     ["tokenizer=photos_64", "train.lr=1e-3"]),
})


class IdentityQuantizer(torch.nn.Module):
    """No quantizer: the continuous autoencoder, for the ceiling rows. Every latent is "code 0"."""

    def __init__(self, num_codes: int, dim: int, cfg: Any = None) -> None:
        super().__init__()
        self.num_codes = num_codes

    def forward(self, z: torch.Tensor) -> quantizers.QuantizerOutput:
        idx = torch.zeros(z.shape[0], z.shape[2], z.shape[3], dtype=torch.long, device=z.device)
        return quantizers.QuantizerOutput(z, idx, z.new_zeros(()), stats=quantizers.codebook_stats(idx, 1))

    def codebook_parameters(self) -> Iterator[torch.nn.Parameter]:
        return iter(())


@dataclasses.dataclass
class NoOptions:
    pass


@contextlib.contextmanager
def identity_quantizer() -> Iterator[None]:
    """``tokenizer.model.quantizer=none`` while a ceiling recipe trains (the library has no such quantizer)."""
    quantizers.QUANTIZERS["none"] = (IdentityQuantizer, NoOptions)
    try:
        yield
    finally:
        del quantizers.QUANTIZERS["none"]


def compose_recipe(overrides: list[str], run_dir: Path, steps: int, data_root: str, resolution: int) -> Any:
    register_configs()  # _hydra and the schemas that conf/tokenizer/*.yaml extend, in the ConfigStore
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train_tokenizer", overrides=[
            *overrides, f"run_dir={run_dir}", f"train.max_steps={steps}", f"data.root={data_root}",
            f"data.resolution={resolution}", "eval_at_end=false", "tensorboard=false", "overwrite=true",
            f"image_every={steps}", f"ckpt_every={steps}", f"log_every={max(1, steps // 4)}"])


@torch.no_grad()
def evaluate_ceiling(model: torch.nn.Module, val: ImageFolderDataset) -> dict[str, Any]:
    """PSNR and SSIM of a model without tokens (the identity quantizer), as ``evaluate_reconstruction`` computes
    them."""
    model.eval()
    x, _ = collate_images([val[i] for i in range(len(val))])
    rec = torch.cat([model(b)[0] for b in x.split(100)]).clamp(-1, 1)
    x8, r8 = (to_uint8(t).permute(0, 3, 1, 2).float() for t in (x, rec))
    return {"psnr": float(psnr(x, rec).mean()), "ssim": float(ssim(x8, r8).mean())}


@torch.no_grad()
def quantizer_health(model: torch.nn.Module, val: ImageFolderDataset, max_images: int = 100) -> dict[str, float]:
    """Is IBQ's gradient alive? IBQ reaches the encoder and the unused codes only through softmax(z . E): when the
    logits are nearly equal the softmax is uniform (``max_p`` ~ 1/N) and that gradient vanishes. Also the mean
    squared quantisation error per channel relative to the latents' variance (``q_err_ratio`` >= 1: the tokens
    carry less than the latents' spread), and how often the argmax code is also the nearest one."""
    model.eval()
    x = collate_images([val[i] for i in range(min(len(val), max_images))])[0]
    z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, model.cfg.embed_dim)
    codes = model.quantizer.embedding.weight
    logits = z @ codes.T
    idx = logits.argmax(-1)
    return {"max_p": float(logits.softmax(-1).max(-1).values.mean()), "logit_std": float(logits.std(-1).mean()),
            "q_err_ratio": float((z - codes[idx]).pow(2).mean() / z.var(0).mean()),
            "argmax_is_nearest": float((torch.cdist(z, codes).argmin(1) == idx).float().mean())}


def evaluate(model: torch.nn.Module, val: ImageFolderDataset, judge: ReconRecognition | None) -> dict[str, Any]:
    if isinstance(model.quantizer, IdentityQuantizer):
        return evaluate_ceiling(model, val)
    health = quantizer_health(model, val) if hasattr(model.quantizer, "embedding") else {}
    if judge is None:
        return {**evaluate_reconstruction(model, val, batch_size=100), **health}
    judge.reset()
    result = evaluate_reconstruction(model, val, batch_size=100, on_batch=judge)
    return {**result, **judge.summary(), **health}


@torch.no_grad()
def reconstruct(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    if isinstance(model.quantizer, IdentityQuantizer):
        return model(x)[0].clamp(-1, 1)
    return model.decode_tokens(model.tokenize(x)).clamp(-1, 1)


def preview_images(val: ImageFolderDataset, per_class: int = 8) -> torch.Tensor:
    """The first ``per_class`` val images of every class (each held-out photograph), for the picture."""
    by_class = [[j for j, (_, y) in enumerate(val.samples) if y == c] for c in range(len(val.classes))]
    picks = [i for indices in by_class for i in indices[:per_class]]
    return collate_images([val[i] for i in picks])[0]


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B * H/p * W/p, 3 p p): one row per token position."""
    return x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * p * p)


def from_patches(rows: torch.Tensor, n: int, p: int, size: int) -> torch.Tensor:
    g = size // p
    return rows.reshape(n, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, 3, size, size)


def nearest(rows: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cdist(b, centres).argmin(1) for b in rows.split(4096)])


@torch.no_grad()
def kmeans_baseline(train_root: str, val_images: torch.Tensor, grid: int, codes: int, iters: int = 12,
                    max_rows: int = 200_000, seed: int = 0) -> torch.Tensor:
    """Reconstructions by a k-means codebook of ``codes`` raw pixel patches, one per token position, fitted on (up to
    ``max_rows``) train patches: the tokens of a tokenizer whose encoder and decoder are the identity. Why: it says
    how many dB the token budget (grid x grid tokens of log2(codes) bits) allows without any learning in the
    encoder or decoder, which the mean-colour and pooling rows (continuous values per token) do not."""
    size = val_images.shape[-1]
    p = size // grid
    train = ImageFolderDataset(train_root, "train", size, "error")
    g = torch.Generator().manual_seed(seed)
    rows = to_patches(collate_images([train[i] for i in range(len(train))])[0], p)
    rows = rows[torch.randperm(len(rows), generator=g)[:max_rows]]
    centres = rows[torch.randperm(len(rows), generator=g)[:codes]].clone()
    for _ in range(iters):
        assign = nearest(rows, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, rows)
        counts = torch.zeros(codes).index_add_(0, assign, torch.ones(len(rows)))
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    val_rows = to_patches(val_images, p)
    return from_patches(centres[nearest(val_rows, centres)], len(val_images), p, size)


def row(name: str, r: dict[str, Any], recognition: bool) -> str:
    util = f"{r['utilisation']:.1%}" if "utilisation" in r else "-"
    ppl = f"{r['perplexity']:.0f}" if "perplexity" in r else "-"
    steps = r.get("steps", "-")
    minutes = f"{r['minutes']:.1f}" if "minutes" in r else "-"
    max_p = f"{r['max_p'] * r['num_codes']:.1f}" if "max_p" in r and "num_codes" in r else "-"
    line = f"| {name} | {steps} | {minutes} | {r['psnr']:.2f} | {r['ssim']:.3f} | {util} | {ppl} | {max_p} |"
    if recognition:
        worst = min((v, k) for k, v in r["recon_accuracy_per_class"].items())
        line += f" {r['recon_accuracy']:.1%} | {worst[0]:.0%} ({worst[1]}) |"
    return line


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
    resolution = int(args.get("resolution", OmegaConf.load(CONF / "data" / "demo.yaml").resolution))
    val = ImageFolderDataset(data_root, "val", resolution, "error")
    # The demo classifier judges demo images only; other data (photographs) get PSNR / SSIM / codebook rows.
    judge = ReconRecognition(data_root, args.get("classifier", DEMO_CLASSIFIER_DIR)) \
        if (Path(data_root) / "demo_meta.json").is_file() else None
    grid = resolution // 8 if "grid" not in args else int(args["grid"])

    print(f"{steps} steps per recipe, {torch.get_num_threads()} threads, {len(val)} val images of {data_root}")
    # "max p x N": the softmax's mean top probability times the number of codes (1 = uniform: IBQ's gradient is gone)
    header = "| recipe | steps | minutes | PSNR dB | SSIM | utilisation | perplexity | max p x N |"
    rule = "|---|---|---|---|---|---|---|---|"
    if judge is not None:
        header, rule = header + " recognised | worst class |", rule + "---|---|"
    baselines = baseline_rows(val, judge, grid) if args.get("baselines", "true") == "true" else {}
    if "kmeans" in args:  # kmeans=1024: the k-means token baseline with that many codes (takes a minute or two)
        codes = int(args["kmeans"])
        images = collate_images([val[i] for i in range(len(val))])[0]
        rec = kmeans_baseline(data_root, images, grid, codes)
        x8, r8 = (to_uint8(t).permute(0, 3, 1, 2).float() for t in (images, rec))
        baselines[f"baseline: k-means codebook of {codes} raw {resolution // grid}x{resolution // grid} patches"] = {
            "psnr": float(psnr(images, rec).mean()), "ssim": float(ssim(x8, r8).mean())}
    lines = [row(k, v, judge is not None) for k, v in baselines.items()]
    preview = preview_images(val)
    picture = [preview, *[v for k, v in baseline_reconstructions(preview, grid).items() if "mean colour" not in k]]
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        cfg = compose_recipe(RECIPES[name][1], out / name, steps, data_root, resolution)
        ceiling = "tokenizer.model.quantizer=none" in RECIPES[name][1]
        with identity_quantizer() if ceiling else contextlib.nullcontext():
            start = time.perf_counter()
            outcome = train(cfg)
            minutes = (time.perf_counter() - start) / 60
            result = {"recipe": name, "overrides": RECIPES[name][1], "steps": steps, "minutes": minutes,
                      "num_codes": outcome.ema_model.cfg.num_codes,
                      "data": data_root, **evaluate(outcome.ema_model, val, judge)}
            picture.append(reconstruct(outcome.ema_model, preview))
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        lines.append(row(name, result, judge is not None))
        save_rows(picture, out / "grid.png")
        print("\n".join([header, rule, *lines]), flush=True)
    print(f"\nrows also in {out / 'results.jsonl'}; picture (originals, avg pool, bicubic, then one row per recipe): "
          f"{out / 'grid.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
