"""Fault injection: SIGKILL each trainer and the extractor at several moments, including inside a checkpoint write
(``IBQ_TEST_PAUSE_BEFORE_RENAME`` pauses a write once its temporary file is complete), then resume.

After the resume the result equals an uninterrupted run bit for bit, no ``*.tmp`` file is left, and
``metrics.jsonl`` logs every step exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.checkpoint import load_train_state
from pipelines.tokens.extract import extract
from pipelines.train.ar import train as train_ar
from pipelines.train.tokenizer import train as train_tokenizer
from tests.conftest import ROOT, TINY_GENERATOR, TINY_TOKENIZER, ar_cfg, compose_config

pytestmark = pytest.mark.slow  # subprocesses and training runs (still part of `make test`)


def run_until_killed(module: str, overrides: list[str], tmp_path: Path, pause: str | None = None,
                     until: Path | None = None, line_step: int | None = None,
                     before_kill: Callable[[int], None] | None = None) -> None:
    """Start ``python -m <module>`` and SIGKILL it when the write named by ``pause`` ("<file>:<n>") is paused
    (its temporary file complete, not yet renamed), or once ``until`` (metrics.jsonl) logs ``line_step``.
    ``before_kill(pid)`` runs just before the kill."""
    marker = tmp_path / "paused"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if pause:
        env["IBQ_TEST_PAUSE_BEFORE_RENAME"] = f"{pause}:{marker}"
    proc = subprocess.Popen([sys.executable, "-m", module, *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if pause and marker.exists():
                break
            if until is not None and until.exists() and any(
                    json.loads(ln)["step"] >= line_step for ln in until.read_text().splitlines() if ln.endswith("}")):
                break
            if proc.poll() is not None:
                pytest.fail(f"{module} ended (code {proc.returncode}) before the kill: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        else:
            pytest.fail(f"{module} never reached the kill point")
        if before_kill is not None:
            before_kill(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_files(a: Path, b: Path, names: tuple[str, ...]) -> None:
    for name in names:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = load_train_state(a), load_train_state(b)
    for part in ("model", "ema"):
        if sa.get(part) is not None:
            assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), part
    assert sa["step"] == sb["step"]


# ------------------------------------------------------------------------------------------------ AR trainer

AR_COMMON = ["train.max_steps=8", "ckpt_every=3", "log_every=1", "train.ema_decay=0.9",
             "generator.model.class_dropout=0.5"]


@pytest.fixture(scope="module")
def ar_reference(token_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ar_ref") / "run"
    train_ar(ar_cfg(token_shards, run_dir, AR_COMMON))
    return run_dir


@pytest.mark.parametrize("moment", [
    "state.pt:2",           # inside the second train_state write (step 6), before its rename
    "state.sha256:2",       # inside the step-6 checksum record write (state.pt of step 3 still in place)
    "model.safetensors:2",  # train_state of step 6 complete, the weights of step 3 still in place
    "metrics:5",            # between checkpoints: steps 4..5 logged, the last checkpoint is step 3
])
def test_killed_ar_run_resumes_to_the_same_weights(token_shards, ar_reference, tmp_path, moment):
    run_dir = tmp_path / "run"
    args = [f"shards={token_shards}", f"run_dir={run_dir}", *TINY_GENERATOR, *AR_COMMON]
    if moment.startswith("metrics"):
        run_until_killed("pipelines.train.ar", args, tmp_path, until=run_dir / "metrics.jsonl",
                         line_step=int(moment.split(":")[1]))
    else:
        run_until_killed("pipelines.train.ar", args, tmp_path, pause=moment)
        assert list(run_dir.rglob(f".{moment.split(':')[0]}.*.tmp"))  # the kill landed inside the write
    train_ar(ar_cfg(token_shards, run_dir, [*AR_COMMON, "resume=true"]))
    assert_same_files(run_dir, ar_reference, ("model.safetensors",))
    assert_same_state(run_dir, ar_reference)
    assert not list(run_dir.rglob("*.tmp"))
    assert logged_steps(run_dir) == list(range(1, 9))


def test_second_process_on_a_run_directory_is_refused_until_the_owner_dies(token_shards, tmp_path):
    import socket

    from tests.test_robustness import one_line_error

    run_dir = tmp_path / "run"
    args = [f"shards={token_shards}", f"run_dir={run_dir}", *TINY_GENERATOR, *AR_COMMON]

    def second_owner(pid: int) -> None:
        line = one_line_error(train_ar, ar_cfg(token_shards, run_dir, [*AR_COMMON, "resume=true"]))
        assert line.startswith(f"error: run directory {run_dir} is in use by pid {pid} on {socket.gethostname()}, "
                               "started ")

    run_until_killed("pipelines.train.ar", args, tmp_path, pause="state.pt:1", before_kill=second_owner)
    train_ar(ar_cfg(token_shards, run_dir, [*AR_COMMON, "resume=true"]))  # the OS released the dead owner's lock
    assert load_train_state(run_dir)["step"] == 8 and not list(run_dir.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------- tokenizer trainer

TOK_COMMON = ["train.max_steps=6", "ckpt_every=2", "log_every=1", "image_every=100", "eval_at_end=false",
              "tokenizer.loss.disc_start=2"]


def test_killed_tokenizer_run_resumes_to_the_same_weights(demo_root, tmp_path):
    reference = tmp_path / "reference"
    train_tokenizer(compose_config("train_tokenizer", [f"data.root={demo_root}", f"run_dir={reference}",
                                                       *TINY_TOKENIZER, *TOK_COMMON]))
    run_dir = tmp_path / "run"
    args = [f"data.root={demo_root}", f"run_dir={run_dir}", *TINY_TOKENIZER, *TOK_COMMON]
    run_until_killed("pipelines.train.tokenizer", args, tmp_path, pause="state.pt:2")  # inside the step-4 write
    assert list(run_dir.rglob(".state.pt.*.tmp")) and load_train_state(run_dir)["step"] == 2
    train_tokenizer(compose_config("train_tokenizer", [*args, "resume=true"]))
    assert_same_files(run_dir, reference, ("model.safetensors",))
    assert_same_state(run_dir, reference)
    assert not list(run_dir.rglob("*.tmp"))
    assert logged_steps(run_dir) == list(range(1, 7))


# ------------------------------------------------------------------------------------------------ extractor


@pytest.mark.parametrize("moment", [
    "shard_00001.safetensors:1",       # shard 0 complete, shard 1 written to its temporary file
    "shard_00001.safetensors.json:1",  # shard 1 renamed into place, its record not yet written
    "manifest.json:1",                 # every shard done, the manifest not yet in place
])
def test_killed_extraction_resumes_to_the_same_shards(token_shards, tiny_tokenizer, demo_root, tmp_path, moment):
    out = tmp_path / "tokens"
    args = [f"tokenizer_ckpt={tiny_tokenizer}", f"data.root={demo_root}", f"out_dir={out}", "data.num_workers=0",
            "cpu=true", "shard_size=25", "batch_size=16"]  # the settings of the token_shards fixture
    run_until_killed("pipelines.tokens.extract", args, tmp_path, pause=moment)
    assert list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()
    extract(compose_config("extract_tokens", args))
    for f in sorted(token_shards.glob("*.safetensors")) + [token_shards / "manifest.json"]:
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert not list(out.rglob("*.tmp"))
