"""Mixed precision on CPU: bf16 runs and resumes exactly in both trainers, the quantizer's code search stays
float32 under autocast, and the tokenizer trainer's fp16 path (one GradScaler, two optimizers) step by step.

No GPU here: bf16 runs through Accelerate's own CPU path (autocast on CPU). Accelerate refuses to scale fp16 on CPU
(no GradScaler there), so ``CpuFp16Accelerator`` gives it what it gives a GPU run: float16 autocast and one
GradScaler wrapping every prepared optimizer (torch's CPU GradScaler behaves as the CUDA one).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import pipelines.train.tokenizer as tokenizer_trainer
from pipelines.checkpoint import load_train_state
from pipelines.errors import ConfigError
from pipelines.train import ar
from tests.conftest import ar_cfg
from tokenizer.quantizer import IBQuantizer

OVERFLOWING = 2.0**24  # a loss scale far too large: float16 gradients overflow, so those steps are skipped


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state and refuses a second precision in it; each test starts clean."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


class CpuFp16Accelerator(Accelerator):
    """What Accelerate sets up for fp16 on a GPU, on CPU: float16 autocast and one GradScaler that each prepared
    optimizer's ``step()`` uses. Counts ``scaler.update`` calls and keeps the weights as ``prepare`` got them."""

    last: CpuFp16Accelerator | None = None
    init_scale = OVERFLOWING

    def __init__(self, mixed_precision: str | None = None, **kwargs) -> None:
        AcceleratorState._reset_state(True)  # it set fp16 in the process-wide state: a second run starts over
        super().__init__(mixed_precision="bf16", **kwargs)  # CPU bf16: Accelerate turns its native autocast on
        self.state._mixed_precision = "fp16"  # ... and autocasts to float16 instead
        self.scaler = torch.amp.GradScaler("cpu", init_scale=self.init_scale, growth_interval=3)
        self.updates, self.initial = 0, []
        update = self.scaler.update

        def counted_update(*args, **kw):
            self.updates += 1
            return update(*args, **kw)

        self.scaler.update = counted_update
        CpuFp16Accelerator.last = self

    def prepare(self, *args):
        self.initial = [{k: v.clone() for k, v in a.state_dict().items()} for a in args
                        if isinstance(a, torch.nn.Module)]
        return super().prepare(*args)


def _logs(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _finite(logs, keys=("total", "l1")):
    return all(math.isfinite(r[k]) for r in logs for k in keys if k in r)


def _common(extra=()):
    return ["log_every=1", "image_every=100", "ckpt_every=100", "eval_at_end=false", *extra]


# ------------------------------------------------------------------------------------------------- bf16

def test_tokenizer_bf16_runs_and_resumes_exactly(tokenizer_cfg, tmp_path):
    from tests.test_train_tokenizer import _all_state

    common = _common(["train.mixed_precision=bf16", "tokenizer.loss.disc_start=2", "train.max_grad_norm=1.0"])
    tokenizer_trainer.train(tokenizer_cfg(tmp_path / "full", [*common, "train.max_steps=6"]))
    tokenizer_trainer.train(tokenizer_cfg(tmp_path / "split", [*common, "train.max_steps=3"]))
    tokenizer_trainer.train(tokenizer_cfg(tmp_path / "split", [*common, "train.max_steps=6", "resume=true"]))
    logs = _logs(tmp_path / "full")
    assert len(logs) == 6 and _finite(logs, ("total", "l1", "d_total", "g_loss")) and "d_total" in logs[-1]
    full, split = _all_state(tmp_path / "full"), _all_state(tmp_path / "split")
    assert full.keys() == split.keys()
    assert not [k for k in full if not torch.equal(full[k], split[k])]  # bitwise: CPU bf16 is deterministic
    # bf16 was in effect: the first step's loss is rounded differently from a float32 run's (and close to it)
    AcceleratorState._reset_state(True)
    tokenizer_trainer.train(tokenizer_cfg(tmp_path / "fp32", _common(["train.max_steps=1"])))
    bf16_l1, fp32_l1 = logs[0]["l1"], _logs(tmp_path / "fp32")[0]["l1"]
    assert bf16_l1 != fp32_l1 and bf16_l1 == pytest.approx(fp32_l1, rel=2e-2)


def test_ar_bf16_runs_and_resumes_exactly(token_shards, tmp_path):
    from tests.test_train_ar import _all_state

    common = ["ckpt_every=100", "log_every=1", "train.ema_decay=0.9", "train.mixed_precision=bf16",
              "train.max_steps=8"]
    ar.train(ar_cfg(token_shards, tmp_path / "full", common))
    ar.train(ar_cfg(token_shards, tmp_path / "split", [*common, "train.stop_at_step=4"]))
    ar.train(ar_cfg(token_shards, tmp_path / "split", [*common, "resume=true"]))
    logs = [r for r in _logs(tmp_path / "full") if "loss" in r]
    assert len(logs) == 8 and all(math.isfinite(r["loss"]) for r in logs)
    full, split = _all_state(tmp_path / "full"), _all_state(tmp_path / "split")
    assert full.keys() == split.keys() and not [k for k in full if not torch.equal(full[k], split[k])]
    assert load_train_state(tmp_path / "full")["grad_scaler"] is None  # bf16 needs no loss scaling


def test_ar_auto_precision_is_bf16_on_gpu_only(monkeypatch):
    for cuda, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert ar.resolve_mixed_precision("auto") == expected
        assert ar.resolve_mixed_precision("fp16") == "fp16"


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_quantizer_code_search_stays_float32_under_bf16_autocast(impl):
    torch.manual_seed(0)
    q = IBQuantizer(300, 16, impl=impl, code_tile=64, pos_tile=40)
    # Latents as a bf16 encoder hands them over; codes closer than bf16's resolution, so a bf16 search would differ.
    z = (torch.randn(4, 16, 6, 6) * 0.3).to(torch.bfloat16)
    with torch.no_grad():
        q.embedding.weight.copy_(q.embedding.weight * 0.3 + 1e-3 * torch.randn(300, 16))
        expected = q(z.float()).indices
        assert torch.equal(q.encode_indices(z.float()), expected)
        bf16_search = (z.permute(0, 2, 3, 1).reshape(-1, 16) @ q.embedding.weight.bfloat16().t()).argmax(1)
        assert not torch.equal(bf16_search, expected.reshape(-1))  # the case tells float32 from bf16 apart
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q(z)
            assert torch.equal(out.indices, expected) and torch.equal(q.encode_indices(z), expected)
            assert q.logits(z.reshape(-1, 16)).dtype == torch.float32 and out.loss.dtype == torch.float32


# ------------------------------------------------------------------------ fp16: one scaler, two optimizers

@pytest.fixture
def fp16_trainer(monkeypatch):
    """The tokenizer trainer with ``CpuFp16Accelerator``; returns a function that sets the initial loss scale."""
    monkeypatch.setattr(tokenizer_trainer, "Accelerator", CpuFp16Accelerator)

    def set_scale(scale: float) -> None:
        monkeypatch.setattr(CpuFp16Accelerator, "init_scale", scale)

    return set_scale


def _params_unchanged(module, initial):
    return all(torch.equal(p.detach(), initial[name]) for name, p in module.named_parameters())


def test_fp16_overflow_skips_both_steps_and_updates_the_scale_once(fp16_trainer, tokenizer_cfg, tmp_path):
    # GAN on from the start, both backward passes overflow: both optimizers skip, the scale halves once per step.
    out = tokenizer_trainer.train(tokenizer_cfg(tmp_path / "run", _common(
        ["train.max_steps=2", "tokenizer.loss.disc_start=0", "train.max_grad_norm=1.0"])))
    acc = CpuFp16Accelerator.last
    assert acc.updates == 2 and acc.scaler.get_scale() == OVERFLOWING / 4
    assert _params_unchanged(out.model, acc.initial[0]) and _params_unchanged(out.discriminator, acc.initial[1])
    state = load_train_state(tmp_path / "run")
    assert state["opt_ae"]["state"] == {} and state["opt_d"]["state"] == {}  # no Adam moment was touched
    assert _finite(_logs(tmp_path / "run"), ("total", "d_total"))  # the forward losses themselves are finite


def test_fp16_trains_and_never_steps_the_discriminator_before_disc_start(fp16_trainer, tokenizer_cfg, tmp_path):
    fp16_trainer(2.0**8)
    run = tmp_path / "run"
    out = tokenizer_trainer.train(tokenizer_cfg(run, _common(["train.max_steps=3", "tokenizer.loss.disc_start=3",
                                                              "train.max_grad_norm=1.0"])))
    acc = CpuFp16Accelerator.last
    assert acc.updates == 3 and not _params_unchanged(out.model, acc.initial[0])
    assert _params_unchanged(out.discriminator, acc.initial[1])
    state = load_train_state(run)
    assert state["opt_ae"]["state"] and state["opt_d"]["state"] == {}
    # then the GAN: the discriminator steps too, one update per step still
    tokenizer_trainer.train(tokenizer_cfg(run, _common(["train.max_steps=5", "tokenizer.loss.disc_start=3",
                                                        "train.max_grad_norm=1.0", "resume=true"])))
    acc = CpuFp16Accelerator.last
    assert acc.updates == 2 and load_train_state(run)["opt_d"]["state"]
    assert "d_total" in _logs(run)[-1] and _finite(_logs(run), ("total", "d_total", "g_loss"))


def test_fp16_resume_is_exact_with_the_loss_scale(fp16_trainer, tokenizer_cfg, tmp_path):
    from tests.test_train_tokenizer import _all_state

    # From 2^24 the scale backs off while gradients overflow, then grows every 3 clean steps: it moves across
    # the split, so the resumed run must continue the saved scale (and its growth tracker).
    common = _common(["tokenizer.loss.disc_start=2"])
    tokenizer_trainer.train(tokenizer_cfg(tmp_path / "full", [*common, "train.max_steps=14"]))
    full_scale = CpuFp16Accelerator.last.scaler.state_dict()
    tokenizer_trainer.train(tokenizer_cfg(tmp_path / "split", [*common, "train.max_steps=7"]))
    assert load_train_state(tmp_path / "split")["grad_scaler"]["scale"] != OVERFLOWING
    tokenizer_trainer.train(tokenizer_cfg(tmp_path / "split", [*common, "train.max_steps=14", "resume=true"]))
    assert CpuFp16Accelerator.last.scaler.state_dict() == full_scale
    full, split = _all_state(tmp_path / "full"), _all_state(tmp_path / "split")
    assert full.keys() == split.keys() and not [k for k in full if not torch.equal(full[k], split[k])]
    assert _logs(tmp_path / "full")[-1]["total"] == _logs(tmp_path / "split")[-1]["total"]


def test_fp16_on_cpu_is_refused(tokenizer_cfg, tmp_path):
    # Accelerate would run it in float32 without autocast or a scaler, silently.
    with pytest.raises(ConfigError, match="train.mixed_precision=fp16 needs a GPU"):
        tokenizer_trainer.train(tokenizer_cfg(tmp_path / "run", ["train.mixed_precision=fp16"]))
