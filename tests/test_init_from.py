"""init_from: strict loading and its refusals, the class embedding rebuild, the tokenizer-hash refusal, and
tokenizing / training / sampling at a resolution other than the source's (a tiny official-layout checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from generator.llama import GPTConfig, LlamaGPT
from pipelines.checkpoint import load_config, load_model, save_model, weights_hash
from pipelines.errors import ConfigError
from pipelines.tokens.extract import extract
from pipelines.train.ar import train as train_ar
from pipelines.train.init_from import SOURCE_KEY, SourceMismatchError, rebuild_class_embedding
from pipelines.train.tokenizer import train as train_tokenizer
from tests.conftest import TINY_TOKENIZER, ar_cfg, compose_config, tool_config
from tests.test_convert import _ibq_ar_file, lightning_module  # noqa: F401  (fixture)


def _extract(tokenizer: Path, root: Path, out: Path, extra: list[str] = ()) -> Path:
    extract(compose_config("extract_tokens", [f"tokenizer_ckpt={tokenizer}", f"data.root={root}", f"out_dir={out}",
                                              "data.num_workers=0", "cpu=true", "batch_size=16", *extra]))
    return out


@pytest.fixture(scope="module")
def ar_source(token_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ar_src") / "run"
    train_ar(ar_cfg(token_shards, run_dir, ["train.max_steps=4", "ckpt_every=4"]))
    return run_dir


# ----------------------------------------------------------------------------- options

def test_resume_with_init_from_is_refused_in_one_line(token_shards, ar_source, tokenizer_cfg, tmp_path):
    for cfg, train in ((ar_cfg(token_shards, tmp_path / "a", [f"init_from={ar_source}", "resume=true"]), train_ar),
                       (tokenizer_cfg(tmp_path / "t", [f"init_from={ar_source}", "resume=true"]), train_tokenizer)):
        with pytest.raises(ConfigError) as err:
            train(cfg)
        assert "init_from" in str(err.value) and "resume" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "t").exists()  # refused before anything is made
    with pytest.raises(ConfigError, match="init_from and run_dir are the same directory"):
        train_ar(ar_cfg(token_shards, ar_source, [f"init_from={ar_source}", "overwrite=true"]))


# ----------------------------------------------------------------------------- class embedding

def test_class_embedding_rebuild_carries_null_keeps_shared_names_and_starts_new_ones_at_the_mean():
    old = ["cat", "dog", "owl"]
    weight = torch.randn(len(old) + 1, 5)
    rows, counts = rebuild_class_embedding(weight, old, ["owl", "fox", "cat", "yak"])
    assert rows.shape == (5, 5) and counts == {"kept": 2, "new": 2}
    assert torch.equal(rows[0], weight[2]) and torch.equal(rows[2], weight[0])   # shared names keep their row
    mean = weight[:3].mean(0)                                                     # the class rows, not the null row
    assert torch.allclose(rows[1], mean) and torch.allclose(rows[3], mean)
    assert torch.equal(rows[-1], weight[-1])                                      # null (CFG) row carried over
    with pytest.raises(SourceMismatchError, match="4 rows for 2 classes"):
        rebuild_class_embedding(weight, old[:2], ["x"])


def _subset_root(demo_root: Path, tmp_path: Path, keep: dict[str, str]) -> Path:
    """A dataset of some demo classes, renamed as ``keep`` says (source name -> new name)."""
    root = tmp_path / "mine"
    for split in ("train", "val"):
        for src, dst in keep.items():
            shutil.copytree(demo_root / split / src, root / split / dst)
    return root


def test_ar_fine_tune_on_new_classes(demo_root, tiny_tokenizer, ar_source, tmp_path, capsys):
    names = sorted(p.name for p in (demo_root / "train").iterdir())
    root = _subset_root(demo_root, tmp_path, {names[3]: names[3], names[5]: "my_new_class"})
    shards = _extract(tiny_tokenizer, root, tmp_path / "tokens")
    src_state, _ = load_model(ar_source)
    run_dir = tmp_path / "ft"
    out = train_ar(ar_cfg(shards, run_dir, [f"init_from={ar_source}", "train.max_steps=2", "ckpt_every=2",
                                            "train.lr=1e-9", "train.warmup_steps=0", "train.weight_decay=0"]))
    printed = capsys.readouterr().out
    assert out.step == 2 and "1 kept by name, 1 new" in printed and "not applied" not in printed
    config = load_config(run_dir)
    assert config["classes"] == sorted([names[3], "my_new_class"])
    assert config[SOURCE_KEY]["dir"] == str(ar_source) and config[SOURCE_KEY]["weights_hash"] == weights_hash(ar_source)
    assert config[SOURCE_KEY]["classes_kept"] == 1 and config[SOURCE_KEY]["classes_new"] == 1
    assert json.loads((run_dir / "class_index.json").read_text()) is not None
    # Started from the source (lr ~ 0: the weights are still the source's), class rows rebuilt by the rule.
    emb, src = out.model.class_embedding.weight.detach(), src_state["class_embedding.weight"]
    order = config["classes"]
    assert emb.shape == (3, src.shape[1])
    assert torch.allclose(emb[order.index(names[3])], src[3], atol=1e-5)
    assert torch.allclose(emb[order.index("my_new_class")], src[:-1].mean(0), atol=1e-5)
    assert torch.allclose(emb[-1], src[-1], atol=1e-5)
    assert torch.allclose(out.model.output.weight, src_state["output.weight"], atol=1e-5)
    assert not (run_dir / "train_state" / "state.pt").read_bytes() == b""  # a new run with its own state


def test_ar_init_from_refuses_shards_of_another_tokenizer(demo_root, ar_source, tmp_path):
    cfg = compose_config("train_tokenizer", [f"data.root={demo_root}", *TINY_TOKENIZER])
    config = OmegaConf.to_container(cfg, resolve=True)
    from tokenizer.model import ImageTokenizer, TokenizerConfig

    torch.manual_seed(1)
    other = tmp_path / "other_tok"
    save_model(other, ImageTokenizer(TokenizerConfig.from_dict(config["tokenizer"]["model"])).state_dict(), config)
    shards = _extract(other, demo_root, tmp_path / "tokens", ["max_images=16"])
    with pytest.raises(SourceMismatchError) as err:
        train_ar(ar_cfg(shards, tmp_path / "ft", [f"init_from={ar_source}"]))
    msg = str(err.value)
    assert weights_hash(other) in msg and load_config(ar_source)["tokenizer_hash"] in msg
    assert "python -m pipelines.tokens.extract tokenizer_ckpt=" in msg and "\n" not in msg


def test_strict_loading_names_the_first_key_and_both_shapes(token_shards, ar_source, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ar_source, bad, ignore=shutil.ignore_patterns("train_state"))
    config = load_config(bad)
    config["generator"]["model"]["dim"] = 48  # config.yaml no longer describes the weights
    OmegaConf.save(OmegaConf.create(config), bad / "config.yaml")
    with pytest.raises(SourceMismatchError) as err:
        train_ar(ar_cfg(token_shards, tmp_path / "ft", [f"init_from={bad}"]))
    assert str(err.value).startswith(f"init_from={bad}: tok_embeddings.weight is (64, 32) in the source, (64, 48) "
                                     "in the model")
    with pytest.raises(SourceMismatchError, match="is not a tokenizer checkpoint"):
        train_tokenizer(compose_config("train_tokenizer", [f"init_from={ar_source}", f"run_dir={tmp_path / 't'}",
                                                           *TINY_TOKENIZER]))
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        train_ar(ar_cfg(token_shards, tmp_path / "ft2", [f"init_from={tmp_path / 'nowhere'}"]))


def test_tokenizer_init_from_a_run_takes_its_discriminator(tokenizer_cfg, tmp_path, capsys):
    src = tmp_path / "src"
    source = train_tokenizer(tokenizer_cfg(src, ["train.max_steps=2", "ckpt_every=2", "eval_at_end=false",
                                                 "tokenizer.loss.disc_start=0"]))
    capsys.readouterr()
    out = train_tokenizer(tokenizer_cfg(tmp_path / "ft", [f"init_from={src}", "train.max_steps=1", "ckpt_every=1",
                                                          "eval_at_end=false", "tokenizer.loss.disc_start=5",
                                                          "tokenizer.loss.disc_channels=8"]))
    printed = capsys.readouterr().out
    assert out.step == 1 and "discriminator: from the source" in printed
    assert "tokenizer.loss.disc_channels of the config not applied" in printed
    # The GAN is off in the fine-tune's single step, so its discriminator is exactly the source's.
    for k, v in source.discriminator.state_dict().items():
        assert torch.equal(out.discriminator.state_dict()[k], v), k
    assert load_config(tmp_path / "ft")[SOURCE_KEY] == {"dir": str(src), "weights_hash": weights_hash(src),
                                                        "discriminator": "source"}


# ----------------------------------------------------------------------------- other resolutions

def test_official_layout_tokenizer_and_generator_at_another_resolution(demo_root, tmp_path, lightning_module,  # noqa: F811
                                                                      capsys):
    """A converted IBQ tokenizer (8 px, 4x4 tokens, attention at the lowest level) tokenizes and fine-tunes at
    16 px (8x8 tokens); the converted AR fine-tunes on the 8x8 grid with the demo's classes and samples there."""
    from pipelines.convert import convert
    from pipelines.sample import sample

    src, yaml, _, _ = _ibq_ar_file(tmp_path, lightning_module)
    conv = tmp_path / "ibq_ar"
    convert("ibq-ar", src, conv, config=str(yaml))
    tok = conv / "tokenizer"
    assert load_config(tok)["tokenizer"]["model"]["resolution"] == 8

    shards = _extract(tok, demo_root, tmp_path / "tokens16", ["resolution=16"])
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["grid"] == [8, 8] and manifest["resolution"] == 16

    tok_run = tmp_path / "tok16"
    out = train_tokenizer(compose_config("train_tokenizer", [
        f"init_from={tok}", f"data.root={demo_root}", f"run_dir={tok_run}", "data.resolution=16", *TINY_TOKENIZER[1:],
        "train.max_steps=2", "ckpt_every=2", "eval_max_images=8"]))
    printed = capsys.readouterr().out
    assert "trained at 8px, fine-tuned at 16px (8x8 tokens)" in printed and "discriminator: fresh" in printed
    assert out.step == 2 and load_config(tok_run)["data"]["resolution"] == 16
    assert json.loads((tok_run / "eval.json").read_text())["images"] == 8

    ar_run = tmp_path / "ar16"
    out = train_ar(ar_cfg(shards, ar_run, [f"init_from={conv}", "train.max_steps=2", "ckpt_every=2",
                                           "generator.model.dim=64"]))
    printed = capsys.readouterr().out  # the source's architecture is used, the configured width reported
    assert "'dim'" in printed and "of the config not applied (the source's)" in printed
    config = load_config(ar_run)
    assert config["generator"]["model"]["grid"] == [8, 8] and config["generator"]["model"]["dim"] == 32
    assert out.model.rope.shape[0] == 1 + 64 and config[SOURCE_KEY]["classes_new"] == 10
    result = sample(tool_config("sample", [f"ckpt={ar_run}", "class=[0]", "n=2", "save_npz=true", "device=cpu",
                                           f"out={tmp_path / 's'}", "cfg=2.0"]))
    assert result["num_samples"] == 2
    with np.load(tmp_path / "s" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (2, 16, 16, 3)


def test_generator_rope_follows_the_grid_not_the_weights():
    """The RoPE table is rebuilt from the grid (a buffer outside the state dict), so grids share weights."""
    a = LlamaGPT(GPTConfig(vocab_size=16, num_classes=3, grid=(4, 4), dim=32, n_layer=1, n_head=2))
    b = LlamaGPT(GPTConfig(vocab_size=16, num_classes=3, grid=(6, 6), dim=32, n_layer=1, n_head=2))
    b.load_state_dict(a.state_dict(), strict=True)
    assert "rope" not in a.state_dict() and b.rope.shape[0] == 37 and a.rope.shape[0] == 17
