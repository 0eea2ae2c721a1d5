"""Progress display: a few plain lines in a log (no repaints), bars on a terminal, and an error line of its own."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipelines.progress as progress
from pipelines.progress import progress_bar
from pipelines.train.tokenizer import train
from tests.conftest import ROOT


def test_log_lines_every_tenth_or_thirty_seconds_with_rate_eta_and_loss(capsys, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    with progress_bar(200, "train x", unit="step") as bar:  # captured stdout: not a terminal
        for i in range(200):
            clock[0] += 0.5
            bar.update()
            if i == 100:
                bar.set(loss=0.123456)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and "\r" not in "".join(lines)
    assert lines[0] == "train x: 20/200 step (10%) | 2 step/s | ETA 1:30"
    assert lines[-1] == "train x: 200/200 step (100%) | 2 step/s | took 1:40 | loss=0.1235"

    with progress_bar(1000, "slow", unit="img") as bar:  # 10% would take 200 s: a line every 30 s instead
        for _ in range(150):
            clock[0] += 1.0
            bar.update()
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" |")[0] for ln in lines] == [f"slow: {n}/1000 img ({n / 10:.0f}%)" for n in (30, 60, 90, 120,
                                                                                                    150)]


def test_a_fast_pass_prints_its_summary_only_and_transient_or_disabled_nothing(capsys):
    with progress_bar(50, "fast pass", unit="img") as bar:
        for _ in bar.iter(range(50)):
            pass
    with progress_bar(3, "inner pass", leave=False) as bar:
        for _ in bar.iter(range(3)):
            pass
    with progress_bar(3, "other process", enabled=False) as bar:
        bar.update(3)
    out = capsys.readouterr()
    assert re.fullmatch(r"fast pass: 50/50 img \(100%\) \| \S+ img/s \| took 0:00\n", out.out), out.out
    assert out.err == ""


def _on_screen(line: str) -> str:
    """What a terminal shows of one line written with carriage returns (each goes back to column 0)."""
    shown: list[str] = []
    col = 0
    for ch in line:
        if ch == "\r":
            col = 0
            continue
        shown[col:col + 1] = ch
        col += 1
    return "".join(shown)


def _fid_with_mixed_sizes(tmp_path: Path, tty: bool) -> tuple[int, str]:
    """tools/fid.py on samples whose last image has another size: the error is raised while the check bar is open."""
    samples, ref = tmp_path / "samples", tmp_path / "ref"
    for folder, sizes in ((samples, [16] * 29 + [24]), (ref, [16] * 4)):
        folder.mkdir()
        for i, size in enumerate(sizes):
            Image.fromarray(np.full((size, size, 3), i * 8, np.uint8)).save(folder / f"{i:02d}.png")
    (tmp_path / "weights.pth").write_bytes(b"")  # present: the inputs are checked before the weights are read
    cmd = [sys.executable, "tools/fid.py", f"samples={samples}", f"ref={ref}", f"weights={tmp_path / 'weights.pth'}",
           f"results={tmp_path / 'r.jsonl'}", "stats_cache=null", "device=cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not tty:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=120)
        return proc.returncode, proc.stdout.decode()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode()


@pytest.mark.parametrize("tty", [False, True], ids=["log", "terminal"])
def test_an_error_raised_under_a_bar_starts_its_own_line(tmp_path, tty):
    code, out = _fid_with_mixed_sizes(tmp_path, tty)
    assert code == 2, out
    at = out.index("error: images of samples differ in size")
    before = out[out.rfind("\n", 0, at) + 1:at]  # what was written on the error's line before it
    # On screen: the cursor at column 0 and nothing left on the line (a bar erases itself with blanks).
    assert before.endswith("\r") or before == "", repr(out[:at + 40][-300:])
    assert _on_screen(before).strip() == "", repr(out[:at + 40][-300:])
    if tty:
        assert "check samples" in out  # the bar was drawn, then closed before the error line
    else:
        assert "\r" not in out  # no repaints in a log: the bar's line could not be left open


def test_short_training_log_is_a_few_lines_with_the_metrics(tokenizer_cfg, tmp_path, capsys):
    train(tokenizer_cfg(tmp_path / "run", ["train.max_steps=40", "log_every=10", "ckpt_every=40",
                                           "image_every=40", "eval_max_images=16"]))
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "\r" not in out
    bar_lines = [ln for ln in out.splitlines() if ln.startswith("train tokenizer: ")]
    assert 1 <= len(bar_lines) <= 11 and bar_lines[-1].startswith("train tokenizer: 40/40 step (100%)")
    done = [int(re.match(r"train tokenizer: (\d+)/40 step", ln).group(1)) for ln in bar_lines]
    assert done == sorted(set(done)) and done[-1] == 40  # each line reports new progress, never a repeat
    assert "loss=" in bar_lines[-1]
    assert [ln.split("]")[0] for ln in out.splitlines() if ln.startswith("[step")] == \
        ["[step 10", "[step 20", "[step 30", "[step 40"]
    assert re.search(r"^\[eval\] val split, EMA weights: PSNR [\d.]+ dB \| SSIM", out, re.M)
    assert len(out.splitlines()) <= 30, out
