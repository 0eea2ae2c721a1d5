"""Training curves as pictures: curves.png from a metrics.jsonl (written at each checkpoint), tools/plot.py overlays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipelines import curves
from pipelines.curves import CURVES_FILE, curve_keys, plot, read_metrics, series, write_curves
from pipelines.errors import ConfigError, MissingCheckpointError
from pipelines.run_log import RunLogger
from tests.conftest import ROOT, tool_config


def _log_run(run_dir: Path, steps: int = 6, lr: float = 1e-3, gan_from: int = 3) -> None:
    """A metrics.jsonl as a trainer writes it (a GAN term appearing late, an lr that decays)."""
    logger = RunLogger(run_dir, tensorboard=False)
    for step in range(1, steps + 1):
        terms = {"loss": 1.0 / step, "lr": lr * 0.5 ** step, "epoch": 0, "utilisation_window": step / steps}
        if step >= gan_from:
            terms["g_loss"] = 0.1 * step
        logger.log(step * 10, terms)
    logger.close()


def _is_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_curves_png_from_metrics_jsonl(tmp_path):
    run = tmp_path / "run"
    _log_run(run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 70, "loss": 0.1')  # a line cut short by a kill
    records = read_metrics(run)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert curve_keys(records) == ["loss", "lr", "utilisation_window", "g_loss"]  # not step / epoch
    assert series(records, "g_loss") == ([30, 40, 50, 60], [pytest.approx(0.3), 0.4, 0.5, pytest.approx(0.6)])
    assert write_curves(run) == run / CURVES_FILE
    width, height = _is_png(run / CURVES_FILE)
    assert width > height > 100  # 4 panels: 3 columns x 2 rows
    assert not list(run.glob(f".{CURVES_FILE}.*"))  # no temp file left by the atomic write


def test_nothing_logged_yet_writes_nothing(tmp_path):
    assert write_curves(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "epoch": 0}\n')
    assert write_curves(tmp_path) is None and not (tmp_path / CURVES_FILE).exists()


def test_a_plotting_failure_is_one_warning_line(tmp_path, monkeypatch, capsys):
    _log_run(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("no backend")

    monkeypatch.setattr(curves, "plot_runs", broken)
    capsys.readouterr()
    assert write_curves(tmp_path) is None
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "no backend" in lines[0]


def test_checkpoint_writes_curves_png(token_shards, tmp_path):
    """Each trainer saves through Checkpointer.save: the picture is beside metrics.jsonl, up to the last step."""
    from pipelines.train.ar import train
    from tests.conftest import ar_cfg

    run = tmp_path / "run"
    train(ar_cfg(token_shards, run, ["train.max_steps=10", "ckpt_every=10"]))
    assert (run / "metrics.jsonl").is_file()
    _is_png(run / CURVES_FILE)
    assert "lr" in curve_keys(read_metrics(run)) and "loss" in curve_keys(read_metrics(run))


def test_plot_tool_overlays_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _log_run(a)
    _log_run(b, lr=2e-3, gan_from=99)
    out = tmp_path / "overlay.png"
    assert plot(tool_config("plot", [f"runs=[{a},{b / 'metrics.jsonl'}]", "keys=[loss,lr]", f"out={out}"])) == out
    width, height = _is_png(out)
    assert width > height  # two panels side by side
    plot(tool_config("plot", [f"runs=[{a},{b}]", f"out={tmp_path / 'all.png'}", "labels=[x,y]"]))
    _is_png(tmp_path / "all.png")
    with pytest.raises(ConfigError, match="keys: no run logged bogus; logged keys: loss, lr, utilisation_window"):
        plot(tool_config("plot", [f"runs=[{a}]", "keys=[bogus]", f"out={out}"]))
    with pytest.raises(ConfigError, match="runs=.* is required"):
        plot(tool_config("plot", [f"out={out}"]))
    with pytest.raises(ConfigError, match="labels must name each of the 2 runs"):
        plot(tool_config("plot", [f"runs=[{a},{b}]", "labels=[x]", f"out={out}"]))
    with pytest.raises(MissingCheckpointError, match="no metrics.jsonl at"):
        plot(tool_config("plot", [f"runs=[{tmp_path / 'nope'}]", f"out={out}"]))


def test_plot_tool_command_line(tmp_path):
    _log_run(tmp_path / "a")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "plot.py"), f"runs=[{tmp_path / 'a'}]",
                          f"out={tmp_path / 'c.png'}"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    _is_png(tmp_path / "c.png")
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "plot.py"), "keys=loss"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: keys must be a non-empty list of names (e.g. keys=[a,b]) or null, got 'loss'"]
