"""torch.compile executed on CPU (inductor, the system C compiler): both trainers with ``train.compile=true`` follow
the eager run step by step, and what a compiled run saves is plain (no ``_orig_mod.`` keys) and loads eagerly.

Compiling takes tens of seconds on a small CPU (much less once inductor's cache in /tmp is warm): slow tests.
Tolerance: inductor fuses and reorders float32 arithmetic, so values differ in the last bits. Measured over 5 steps:
per-step losses within ~1e-6 relative of eager (asserted: 1e-4), weights within ~1e-5 of their norm (asserted:
1e-3; Adam divides by sqrt(v), so a weight whose gradient is ~0 can take a step of up to lr on last-bit noise).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from generator.llama import load_generator
from pipelines.checkpoint import MODEL_FILE, load_train_state
from pipelines.train import ar
from pipelines.train import tokenizer as tokenizer_trainer
from tests.conftest import ar_cfg
from tokenizer.model import load_tokenizer

pytestmark = pytest.mark.slow
STEPS = 5


def _losses(run_dir, key):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if key in json.loads(line)]


def _assert_plain_and_close(eager_dir, compiled_dir, key):
    eager, compiled = _losses(eager_dir, key), _losses(compiled_dir, key)
    assert len(eager) == len(compiled) == STEPS
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=0)
    e_state, c_state = load_train_state(eager_dir)["model"], load_train_state(compiled_dir)["model"]
    c_weights = load_file(compiled_dir / MODEL_FILE)
    assert c_state.keys() == e_state.keys() and c_weights.keys() == load_file(eager_dir / MODEL_FILE).keys()
    assert not [k for k in [*c_state, *c_weights] if "_orig_mod" in k]
    diff = sum(((c_state[k].double() - v.double()) ** 2).sum() for k, v in e_state.items()) ** 0.5
    norm = sum((v.double() ** 2).sum() for v in e_state.values()) ** 0.5
    assert diff / norm < 1e-3, (diff / norm).item()
    return (diff / norm).item()


def test_tokenizer_compiled_matches_eager_and_loads_eagerly(tokenizer_cfg, tmp_path):
    common = ["log_every=1", "image_every=100", "ckpt_every=100", "eval_at_end=false", f"train.max_steps={STEPS}",
              "tokenizer.loss.disc_start=2",  # the GAN steps too: the adaptive weight differentiates the compiled graph
              "tokenizer.model.channel_mult=[1,1]", "tokenizer.model.enc_res_blocks=1",
              "tokenizer.model.dec_res_blocks=1"]
    tokenizer_trainer.train(tokenizer_cfg(tmp_path / "eager", common))
    out = tokenizer_trainer.train(tokenizer_cfg(tmp_path / "compiled", [*common, "train.compile=true"]))
    _assert_plain_and_close(tmp_path / "eager", tmp_path / "compiled", "total")
    loaded, x = load_tokenizer(tmp_path / "compiled"), torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], out.ema_model(x)[0])
    # the compiled run's train_state resumes in an eager run
    tokenizer_trainer.train(tokenizer_cfg(tmp_path / "compiled", [*common, "train.max_steps=6", "resume=true"]))
    assert load_train_state(tmp_path / "compiled")["step"] == 6


def test_ar_compiled_matches_eager_and_loads_eagerly(token_shards, tmp_path):
    # No label dropout here: compiled random ops draw other numbers than eager ones (inductor's own generator),
    # which is a different run, not an error (measured: weights 1.3e-2 apart after 5 steps with class_dropout 0.1).
    common = ["log_every=1", "ckpt_every=100", f"train.max_steps={STEPS}", "train.ema_decay=null",
              "generator.model.class_dropout=0"]
    ar.train(ar_cfg(token_shards, tmp_path / "eager", common))
    out = ar.train(ar_cfg(token_shards, tmp_path / "compiled", [*common, "train.compile=true"]))
    _assert_plain_and_close(tmp_path / "eager", tmp_path / "compiled", "loss")
    loaded, _ = load_generator(tmp_path / "compiled", "cpu")
    tokens, labels = torch.randint(0, 64, (2, 64)), torch.tensor([1, 7])
    out.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens, labels), out.model(tokens, labels))
    ar.train(ar_cfg(token_shards, tmp_path / "compiled", [*common, "train.max_steps=6", "resume=true"]))
    assert load_train_state(tmp_path / "compiled")["step"] == 6
