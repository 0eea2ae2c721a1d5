"""The full-size configurations through the real trainers on CPU: step time, peak memory, parameters.

    python bench/full_size.py                        # both: tokenizer +experiment=imagenet_256, AR generator=B
    python bench/full_size.py parts=[ar] ar_batch=2 steps=3
    python bench/full_size.py perceptual=none        # tokenizer without the perceptual term

Tokenizer: ``+experiment=imagenet_256`` (256 px, 16,384 codes, the reference widths, discriminator and GAN loss
on from step 0) on a procedural 256 px ImageFolder written to a temp dir, float32, perceptual term ST-LPIPS
(``stlpips_vgg``: offline weights from the stlpips-pytorch wheel) unless ``perceptual=none``. AR: ``generator=B``
on synthetic token shards of 16x16 tokens from 16,384 codes, 1,000 classes. Each part runs in its own process
(``pipelines.train.*.train`` with ``train.cpu=true``), so its peak RSS (``ru_maxrss``: model, optimizer, EMA,
discriminator, data, activations) is its own. Step time: the interval between consecutive optimizer steps of the
main optimizer (a global step hook), the first step (warm-up) excluded. CPU timings on a shared machine are noisy.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.optim.optimizer import register_optimizer_step_post_hook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synthetic import write_token_shards  # noqa: E402
from pipelines.cli import load_config  # noqa: E402

DEFAULTS = {"parts": ["tokenizer", "ar"], "steps": 3, "tok_batch": 1, "ar_batch": 2, "perceptual": "stlpips_vgg",
            "threads": 2, "generator": "B"}


def step_times(optimizer_cls: type) -> list[float]:
    """A list that fills with the time of each ``optimizer_cls.step`` (global hook: the trainer is not touched)."""
    times: list[float] = []

    def hook(opt, args, kwargs) -> None:
        if type(opt) is optimizer_cls:
            times.append(time.perf_counter())

    register_optimizer_step_post_hook(hook)
    return times


def run_tokenizer(opts, tmp: Path) -> dict:
    from pipelines.demo_data import make_demo_dataset
    from pipelines.train.tokenizer import train

    data = make_demo_dataset(tmp / "images", seed=0, train_per_class=1, val_per_class=1, size=256)
    perceptual = [f"tokenizer.loss.perceptual={opts.perceptual}"]
    if opts.perceptual == "none":
        perceptual.append("tokenizer.loss.perceptual_weight=0")
    cfg = load_config("train_tokenizer", [
        "+experiment=imagenet_256", f"data.root={data}", f"run_dir={tmp / 'tok_run'}", "data.num_workers=0",
        f"train.batch_size={opts.tok_batch}", "train.epochs=null", f"train.max_steps={opts.steps}",
        "train.mixed_precision=no", "train.cpu=true", "eval_at_end=false", "tensorboard=false", "log_every=1",
        "image_every=1000000", "ckpt_every=1000000", *perceptual])
    # The autoencoder's Adam has the most parameters; the discriminator's is the same class, so keep every
    # second stamp (the trainer steps the discriminator first, then the autoencoder).
    times = step_times(torch.optim.Adam)
    outcome = train(cfg)
    ae_times = times[1::2]
    model = outcome.model
    return {"part": "tokenizer +experiment=imagenet_256", "batch": opts.tok_batch,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "disc_params_m": sum(p.numel() for p in outcome.discriminator.parameters()) / 1e6,
            "num_codes": model.cfg.num_codes, "resolution": model.cfg.resolution, "perceptual": opts.perceptual,
            "steps": outcome.step, "step_s": _mean_interval(ae_times)}


def run_ar(opts, tmp: Path) -> dict:
    from pipelines.train.ar import train

    shards = write_token_shards(tmp / "shards", num_images=4 * opts.ar_batch, num_codes=16384, grid=(16, 16),
                                num_classes=1000)
    cfg = load_config("train_ar", [
        f"generator={opts.generator}", f"shards={shards}", f"run_dir={tmp / 'ar_run'}", "data.num_workers=0",
        f"train.batch_size={opts.ar_batch}", f"train.max_steps={opts.steps}", "train.cpu=true",
        "train.mixed_precision=no", "tensorboard=false", "log_every=1", "ckpt_every=1000000"])
    times = step_times(torch.optim.AdamW)
    outcome = train(cfg)
    model = outcome.model
    step_s = _mean_interval(times)
    return {"part": f"AR generator={opts.generator}", "batch": opts.ar_batch, "params_m": model.num_params() / 1e6,
            "num_codes": model.cfg.vocab_size, "grid": list(model.cfg.grid), "steps": outcome.step, "step_s": step_s,
            "tokens_per_s": opts.ar_batch * model.cfg.block_size / step_s if step_s else None}


def _mean_interval(stamps: list[float]) -> float | None:
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None


def child(opts, part: str) -> dict:
    torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_tokenizer if part == "tokenizer" else run_ar)(opts, Path(tmp))
    return {**result, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv: list[str]) -> list[dict]:
    opts = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(argv))
    rows = []
    for part in opts.parts:
        cmd = [sys.executable, __file__, "--child", part, *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            rows.append({"part": part, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"})
        else:
            rows.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"full-size configurations on CPU ({opts.threads} threads, float32, {torch.__version__}); "
          f"{opts.steps} optimizer steps, step time = mean of steps 2..{opts.steps}")
    print("| part | batch | params | s/step | peak RSS GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['part']} | error: {r['error'].splitlines()[-1] if r['error'] else ''} | | | |")
            continue
        params = f"{r['params_m']:.1f}M" + (f" (+ discriminator {r['disc_params_m']:.1f}M)" if "disc_params_m" in r
                                             else "")
        step = f"{r['step_s']:.1f}" if r["step_s"] else "-"
        print(f"| {r['part']} | {r['batch']} | {params} | {step} | {r['peak_rss_gib']:.1f} |")
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        o = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(sys.argv[3:]))
        print("RESULT " + json.dumps(child(o, sys.argv[2])), flush=True)
    else:
        main(sys.argv[1:])
