"""Stage-two training on token shards: learning, checkpoint contents, exact resume, two processes, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from generator.llama import load_generator
from pipelines.checkpoint import load_config, load_train_state, save_model, save_train_state, weights_hash
from pipelines.tokens.shards import ShardMismatchError
from pipelines.train.ar import lr_factor, train
from tests.conftest import (
    ROOT,
    TINY_GENERATOR,
    ar_cfg,
    assert_same_weights,
    launch_two_processes,
    tool_config,
)


def test_lr_warmup_then_linear_decay():
    assert lr_factor(0, 4, 20) == 0.25 and lr_factor(3, 4, 20) == 1.0
    assert lr_factor(12, 4, 20) == pytest.approx(0.5) and lr_factor(20, 4, 20) == 0.0
    assert lr_factor(20, 0, 20, final_ratio=0.1) == pytest.approx(0.1)


def test_training_reduces_loss_and_records_the_tokenizer(token_shards, tiny_tokenizer, tmp_path):
    run_dir = tmp_path / "run"
    out = train(ar_cfg(token_shards, run_dir, ["train.max_steps=60", "ckpt_every=30",
                                               f"val_shards={token_shards}"]))
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 12 and losses[0] > 3.5  # ln(64) = 4.16 at the start (zero-initialised head)
    assert losses[-1] < 0.75 * losses[0], losses
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in logs if "loss" in r)
    assert [r["step"] for r in logs if "val_loss" in r] == [30, 60]

    config = load_config(run_dir)
    manifest = json.loads((token_shards / "manifest.json").read_text())
    assert config["tokenizer_hash"] == manifest["tokenizer_hash"] == weights_hash(tiny_tokenizer)
    assert config["tokenizer_dir"] == str(tiny_tokenizer)
    assert config["generator"]["model"]["vocab_size"] == 64 and config["generator"]["model"]["grid"] == [8, 8]
    assert config["generator"]["model"]["num_classes"] == 10 and len(config["classes"]) == 10
    assert json.loads((run_dir / "class_index.json").read_text())[config["classes"][3]] == 3

    loaded, loaded_config = load_generator(run_dir, "cpu")  # safetensors + config only
    tokens, labels = torch.randint(0, 64, (3, 64)), torch.tensor([0, 5, 9])
    out.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens, labels), out.model(tokens, labels))
    assert loaded_config["tokenizer_hash"] == config["tokenizer_hash"]


def _all_state(run_dir: Path) -> dict[str, torch.Tensor]:
    s = load_train_state(run_dir)
    flat = {f"model.{k}": v for k, v in s["model"].items()} | {f"ema.{k}": v for k, v in s["ema"].items()}
    for pid, st in s["optimizer"]["state"].items():
        flat |= {f"opt.{pid}.{k}": torch.as_tensor(v) for k, v in st.items()}
    return flat


def test_resume_equals_uninterrupted_run(token_shards, tmp_path):
    # 7 batches of 8 per epoch (60 images): 12 steps cross an epoch boundary; dropout and label dropout
    # draw random numbers, so the RNG state must be restored too.
    common = ["ckpt_every=100", "train.ema_decay=0.9", "generator.model.resid_dropout=0.1",
              "generator.model.class_dropout=0.5", "train.grad_accum=1"]
    train(ar_cfg(token_shards, tmp_path / "full", [*common, "train.max_steps=12"]))
    # stop_at_step pauses the run without changing the lr schedule (which decays over max_steps).
    train(ar_cfg(token_shards, tmp_path / "split", [*common, "train.max_steps=12", "train.stop_at_step=5"]))
    assert load_train_state(tmp_path / "split")["step"] == 5
    train(ar_cfg(token_shards, tmp_path / "split", [*common, "train.max_steps=12", "resume=true"]))
    full, split = _all_state(tmp_path / "full"), _all_state(tmp_path / "split")
    assert full.keys() == split.keys()
    different = [k for k in full if not torch.equal(full[k], split[k])]
    assert not different, different[:5]


def test_resume_refuses_shards_of_another_tokenizer(token_shards, tmp_path):
    run_dir = tmp_path / "run"
    train(ar_cfg(token_shards, run_dir, ["train.max_steps=2"]))
    text = (run_dir / "config.yaml").read_text()
    recorded = load_config(run_dir)["tokenizer_hash"]
    (run_dir / "config.yaml").write_text(text.replace(recorded, "0123456789abcdef"))
    with pytest.raises(ShardMismatchError, match="0123456789abcdef"):
        train(ar_cfg(token_shards, run_dir, ["train.max_steps=4", "resume=true"]))


def test_resume_keeps_the_runs_own_architecture(token_shards, tmp_path, capsys):
    """A run resumes with the model its config.yaml records (here adaln / identity), not with the current
    config's (the defaults adaln_rms / zero, whose extra head weight would not load)."""
    run_dir = tmp_path / "run"
    old_model = ["generator.model.head_norm=adaln", "generator.model.rope_cls=identity"]
    train(ar_cfg(token_shards, run_dir, ["train.max_steps=2", *old_model]))
    outcome = train(ar_cfg(token_shards, run_dir, ["train.max_steps=4", "resume=true"]))
    assert outcome.step == 4
    assert (outcome.model.cfg.head_norm, outcome.model.cfg.rope_cls) == ("adaln", "identity")
    assert "['head_norm', 'rope_cls'] of the current config are not applied" in capsys.readouterr().out
    model, config = load_generator(run_dir)
    assert config["generator"]["model"]["head_norm"] == "adaln" and model.cfg.rope_cls == "identity"


def test_resume_with_another_process_count_is_refused(token_shards, tmp_path):
    run_dir = tmp_path / "run"
    train(ar_cfg(token_shards, run_dir, ["train.max_steps=2"]))
    state = load_train_state(run_dir)
    state["rng"] = state["rng"] * 2  # as if two processes had saved it
    save_train_state(run_dir, state)
    with pytest.raises(ValueError, match=r"saved by 2 process\(es\); resume it with the same number \(got 1\)"):
        train(ar_cfg(token_shards, run_dir, ["train.max_steps=4", "resume=true"]))


@pytest.mark.slow
def test_two_processes_stay_in_step(token_shards, tmp_path):
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    overrides = [f"shards={token_shards}", f"run_dir={run_dir}", *TINY_GENERATOR, "train.max_steps=3",
                 "log_every=1", "train.ema_decay=0.9", "generator.model.class_dropout=0.5"]
    ranks = launch_two_processes("train_ar", overrides, dump, port=29527)
    assert_same_weights(ranks, ("model", "ema"))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert load_train_state(run_dir)["step"] == 3 and not list(run_dir.rglob("*.tmp"))


def test_missing_shards_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.train.ar", f"shards={tmp_path / 'none'}",
                           f"run_dir={tmp_path / 'r'}", "train.cpu=true"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("error: no token shards at") and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ sampling tool

@pytest.fixture(scope="module")
def trained_run(token_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ar") / "run"
    train(ar_cfg(token_shards, run_dir, ["train.max_steps=30", "ckpt_every=30"]))
    return run_dir


def test_sample_tool_writes_grid_pngs_and_adm_npz(trained_run, tmp_path, capsys):
    from PIL import Image

    from pipelines.sample import sample

    args = [f"demo_ckpt={trained_run}", "class=[0,3]", "n=3", "save_npz=true", f"out={tmp_path / 's'}",
            "batch_size=4", "cfg=1.5", "seed=5"]
    result = sample(tool_config("sample", args))
    printed = capsys.readouterr().out
    assert f"no ckpt= given: using the demo run {trained_run}" in printed and "grid.png" in printed
    out = tmp_path / "s"
    assert result["classes"] == [0, 3] and result["cfg"] == 1.5 and result["temperature"] == 1.0
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 6 and pngs[0].name.startswith("0000_") and pngs[-1].name.startswith("0003_")
    with np.load(out / "samples.npz") as npz:
        arr, labels = npz["arr_0"], npz["labels"]
    assert arr.shape == (6, 32, 32, 3) and arr.dtype == np.uint8 and labels.tolist() == [0, 0, 0, 3, 3, 3]
    assert np.array_equal(np.asarray(Image.open(pngs[0])), arr[0])
    assert Image.open(out / "grid.png").size == (3 * 34 + 2, 2 * 34 + 2)  # 3 columns x 2 rows, 2 px padding
    assert not list(out.glob(".*.npy"))
    # Same seed, same samples.
    sample(tool_config("sample", [*args[1:], f"ckpt={trained_run}", f"out={tmp_path / 't'}", "save_png=false"]))
    with np.load(tmp_path / "t" / "samples.npz") as npz:
        assert np.array_equal(npz["arr_0"], arr)


def test_sample_tool_and_fid_gen_draw_the_same_images(trained_run, tmp_path):
    """One seeding rule: sample i of class c depends on (seed, c, i) only, not on batching or other classes."""
    from pipelines.eval.modes import Extractors, generate_samples
    from pipelines.sample import sample

    sample(tool_config("sample", [f"ckpt={trained_run}", "class=3", "n=4", "seed=0", "batch_size=3", "save_npz=true",
                                  "save_png=false", f"out={tmp_path}", "device=cpu"]))
    with np.load(tmp_path / "samples.npz") as npz:
        arr = npz["arr_0"]
    cfg = tool_config("fid", ["mode=gen", f"ar={trained_run}", "classes=[2,3]", "per_class=4", "seed=0",
                              "batch_size=5", "device=cpu"])
    generated = generate_samples(cfg, Extractors(), keep_images=True, shard=False)
    labels, images = generated.labels, generated.images
    assert labels.tolist() == [2] * 4 + [3] * 4
    assert np.array_equal(images[labels == 3].numpy(), arr)
    assert not np.array_equal(images[labels == 2].numpy(), arr)


@pytest.mark.slow
def test_compiled_sampling_in_the_tools_draws_the_eager_images(trained_run, tmp_path):
    """compile=true (tools/sample.py and tools/fid.py mode=gen): the images of compile=false, seed for seed."""
    from pipelines.errors import ConfigError
    from pipelines.eval.modes import Extractors, generate_samples
    from pipelines.sample import sample

    common = [f"ckpt={trained_run}", "class=3", "n=4", "seed=0", "batch_size=4", "save_npz=true", "save_png=false",
              "device=cpu", "cfg=2.0"]
    arrays = []
    for flag in ("false", "true"):
        sample(tool_config("sample", [*common, f"compile={flag}", f"out={tmp_path / flag}"]))
        with np.load(tmp_path / flag / "samples.npz") as npz:
            arrays.append(npz["arr_0"])
    assert np.array_equal(arrays[0], arrays[1])
    cfg = tool_config("fid", ["mode=gen", f"ar={trained_run}", "classes=[3]", "per_class=4", "seed=0", "cfg=2.0",
                              "batch_size=4", "device=cpu", "compile=true"])
    generated = generate_samples(cfg, Extractors(), keep_images=True, shard=False)
    assert np.array_equal(generated.images.numpy(), arrays[0])
    with pytest.raises(ConfigError, match="compile=true needs use_cache=true"):
        sample(tool_config("sample", [*common, "compile=true", "use_cache=false", f"out={tmp_path / 'x'}"]))


@pytest.mark.slow
def test_fid_gen_mode_writes_gen_eval_json(trained_run, demo_root, tmp_path):
    """mode=gen end to end: samples drawn, Inception features of them, FID against the reference folder."""
    from pipelines.eval.fid import evaluate
    from pipelines.eval.inception import prepare_inception_weights

    weights, _ = prepare_inception_weights(tmp_path / "inception.pth", verify_images=1)
    record = evaluate(tool_config("fid", ["mode=gen", f"ar={trained_run}", "classes=[0,1,2]", "per_class=1",
                                          f"ref={demo_root / 'val'}", "max_images=4", "metrics=[fid,prc]",
                                          f"weights={weights}", "stats_cache=null", "device=cpu",
                                          f"results={tmp_path / 'r.jsonl'}"]))
    m = record["metrics"]
    assert m["num_samples"] == 3 and m["fid"] > 0 and m["precision"] is None and m["recall"] is None
    assert record["unavailable"]["precision"] == "needs more than prc_neighborhood=3 images per set"
    assert record["sampling"]["temperature"] is not None
    assert json.loads((trained_run / "gen_eval.json").read_text())["metrics"] == m


def test_class_names_and_unknown_classes(trained_run):
    from pipelines.generate import UnknownClassError, resolve_classes

    config = load_config(trained_run)
    names = config["classes"]
    assert resolve_classes(7, config) == [7] and resolve_classes([names[2], 4], config) == [2, 4]
    assert resolve_classes("all", config) == list(range(10))
    with pytest.raises(UnknownClassError, match="unknown class id 10"):
        resolve_classes([1, 10], config)
    with pytest.raises(UnknownClassError, match="unknown class 'zebra'"):
        resolve_classes("zebra", config)
    proc = subprocess.run([sys.executable, "tools/sample.py", f"ckpt={trained_run}", "class=207"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: unknown class id 207; the generator was trained on classes 0..9")


def test_sampling_refuses_a_different_tokenizer(trained_run, tiny_tokenizer, tmp_path):
    from pipelines.checkpoint import load_model
    from pipelines.generate import TokenizerMismatchError, load_pipeline

    state, config = load_model(tiny_tokenizer)
    state = {k: v + 0.01 if k.endswith("embedding.weight") else v for k, v in state.items()}
    save_model(tmp_path / "other", state, config)
    model, tokenizer, _ = load_pipeline(trained_run)  # the recorded tokenizer is accepted
    assert tokenizer.cfg.num_codes == model.cfg.vocab_size
    with pytest.raises(TokenizerMismatchError, match=weights_hash(tmp_path / "other")):
        load_pipeline(trained_run, tmp_path / "other")
