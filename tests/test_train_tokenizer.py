"""Stage-one training: shapes, learning, checkpoints, exact resume, multi-process, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.checkpoint import MissingCheckpointError, load_train_state
from pipelines.train.tokenizer import lr_factor, train
from tests.conftest import ROOT, TINY_TOKENIZER, assert_same_weights, compose_config, launch_two_processes
from tokenizer.model import ImageTokenizer, TokenizerConfig, load_tokenizer


@pytest.mark.parametrize("name,res,grid", [("demo", 64, 8), ("imagenet_256", 256, 16)])
def test_autoencoder_shapes_for_both_configs(name, res, grid):
    cfg = compose_config("train_tokenizer", [f"tokenizer={name}", f"data.resolution={res}"])
    model_cfg = TokenizerConfig.from_dict(dict(cfg.tokenizer.model))
    assert model_cfg.grid == grid
    with torch.device("meta"):  # shapes without allocating the 100M-parameter reference model
        model = ImageTokenizer(model_cfg)
        z = model.quant_conv(model.encoder(torch.empty(2, 3, res, res)))
        indices = model.quantizer.encode_indices(z)
        recon = model.decode_tokens(indices)
    assert z.shape == (2, model_cfg.embed_dim, grid, grid) and indices.shape == (2, grid, grid)
    assert recon.shape == (2, 3, res, res)
    if name == "imagenet_256":
        assert model_cfg.channel_mult == (1, 1, 2, 2, 4) and model_cfg.num_codes == 16384
        assert (model_cfg.enc_res_blocks, model_cfg.dec_res_blocks) == (4, 5)


def test_lr_schedule_warmup_and_step_decay():
    assert lr_factor(0, 4, [], 0.1) == 0.25 and lr_factor(3, 4, [], 0.1) == 1.0
    assert lr_factor(10, 0, [10, 20], 0.1) == pytest.approx(0.1)
    assert lr_factor(25, 0, [10, 20], 0.1) == pytest.approx(0.01)


def test_training_reduces_reconstruction_loss_and_checkpoint_roundtrips(tokenizer_cfg, tmp_path):
    run_dir = tmp_path / "run"
    out = train(tokenizer_cfg(run_dir, ["train.max_steps=100", "log_every=5", "image_every=50",
                                        "ckpt_every=50", "tokenizer.loss.disc_start=80"]))
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(5, 101, 5))
    before_gan = [r["l1"] for r in logs if r["step"] <= 80]
    assert min(before_gan[-4:]) < 0.7 * before_gan[0], before_gan
    assert "g_loss" in logs[-1] and "lecam" in logs[-1] and "g_loss" not in logs[0]
    assert 0 < logs[-1]["utilisation_window"] <= 1
    assert (run_dir / "images" / "recon_0000100.png").exists()
    saved = json.loads((run_dir / "eval.json").read_text())  # generic: no demo classifier in the trainer
    assert saved == out.metrics and saved["step"] == 100 and saved["images"] == 20
    assert {"psnr", "ssim", "utilisation", "codes_used", "perplexity"} <= set(saved)
    assert not any(k.startswith("recon_accuracy") for k in saved)
    assert 0 < saved["utilisation"] <= 1 and 1 <= saved["perplexity"] <= 64 and saved["psnr"] > 10

    loaded = load_tokenizer(run_dir)  # safetensors + config only
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.tokenize(x), out.ema_model.tokenize(x))
        assert torch.equal(loaded(x)[0], out.ema_model(x)[0])


def _all_state(run_dir: Path) -> dict[str, torch.Tensor]:
    s = load_train_state(run_dir)
    flat = {f"model.{k}": v for k, v in s["model"].items()}
    flat |= {f"ema.{k}": v for k, v in s["ema"].items()}
    flat |= {f"disc.{k}": v for k, v in s["disc"].items()}
    flat |= {f"crit.{k}": v for k, v in s["criterion"].items()}
    for name in ("opt_ae", "opt_d"):
        for pid, st in s[name]["state"].items():
            flat |= {f"{name}.{pid}.{k}": torch.as_tensor(v) for k, v in st.items()}
    return flat


def test_resume_equals_uninterrupted_run(tokenizer_cfg, tmp_path):
    common = ["log_every=3", "image_every=100", "ckpt_every=100", "tokenizer.loss.disc_start=2",
              "eval_at_end=false", "train.warmup_steps=3"]
    # 5 batches per epoch at batch 8 of 60 images: the runs cross an epoch boundary.
    train(tokenizer_cfg(tmp_path / "full", [*common, "train.max_steps=12"]))
    train(tokenizer_cfg(tmp_path / "split", [*common, "train.max_steps=6"]))
    assert load_train_state(tmp_path / "split")["step"] == 6
    train(tokenizer_cfg(tmp_path / "split", [*common, "train.max_steps=12", "resume=true"]))
    full, split = _all_state(tmp_path / "full"), _all_state(tmp_path / "split")
    assert full.keys() == split.keys()
    different = [k for k in full if not torch.equal(full[k], split[k])]
    assert not different, different[:5]


@pytest.mark.slow
def test_two_processes_stay_in_step_and_only_main_writes(demo_root, tmp_path):
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    overrides = [f"data.root={demo_root}", f"run_dir={run_dir}", *TINY_TOKENIZER, "train.max_steps=2",
                 "log_every=1", "tensorboard=true", "tokenizer.loss.disc_start=0", "eval_at_end=false"]
    ranks = launch_two_processes("train_tokenizer", overrides, dump, port=29517)
    assert_same_weights(ranks, ("model", "ema", "disc"))
    # Both processes saw different images (sharded), yet one log line per step and one writer.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert len(list((run_dir / "tb").glob("events.*"))) == 1
    assert (run_dir / "model.safetensors").exists() and (run_dir / "train_state" / "state.pt").exists()
    assert not list(run_dir.rglob("*.tmp"))


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(MissingCheckpointError, match="checkpoint directory not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingCheckpointError, match="model.safetensors"):
        load_tokenizer(tmp_path / "empty")
    proc = subprocess.run([sys.executable, "tools/reconstruct.py", f"tokenizer={tmp_path / 'nope'}", "input=."],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: checkpoint directory not found")
    assert "Traceback" not in proc.stderr


def test_missing_dataset_is_one_clear_error(tokenizer_cfg, tmp_path):
    cfg = tokenizer_cfg(extra=[f"data.root={tmp_path / 'no_data'}"])
    proc = subprocess.run([sys.executable, "-m", "pipelines.train.tokenizer", f"data.root={tmp_path / 'no_data'}",
                           f"run_dir={tmp_path / 'r'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cfg.data.root.endswith("no_data")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
