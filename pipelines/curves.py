"""Training curves as pictures: ``curves.png`` beside a run's ``metrics.jsonl`` (written at every checkpoint), and
overlays of several runs (``tools/plot.py``).

Why a PNG when TensorBoard exists: it opens anywhere (a file browser, a pull request, the README) and travels with
the checkpoint. Plotting is a side job: a failure while training is one warning line, never a stopped run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from pipelines.progress import write
from pipelines.run_log import METRICS_FILE
from pipelines.util import atomic_write

CURVES_FILE = "curves.png"
# Bookkeeping columns, not curves (throughput such as tokens_per_s is a curve: it shows slow-downs).
NOT_CURVES = ("step", "epoch")
# Keys that get a logarithmic y axis (the learning rate spans decades under warm-up and decay).
LOG_SCALE = ("lr",)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl`` (or of the one in a run directory), in file order; lines cut short by a
    kill, or without a numeric ``step``, are skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int | float):
            records.append(record)
    return records


def curve_keys(records: Sequence[dict]) -> list[str]:
    """Every logged numeric term, in first-seen order, less the bookkeeping columns."""
    keys: dict[str, None] = {}
    for record in records:
        for k, v in record.items():
            if k not in NOT_CURVES and isinstance(v, int | float) and not isinstance(v, bool):
                keys.setdefault(k)
    return list(keys)


def series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` where it was logged with a finite value (keys may start late, e.g. GAN terms)."""
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: dict[str, Sequence[dict]], out: str | Path, keys: Sequence[str] | None = None,
              title: str | None = None) -> Path:
    """One panel per key (every logged term when ``keys`` is None), one line per run; written atomically as PNG.
    A key no run logged is a ``ValueError`` naming the keys that exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = list(dict.fromkeys(k for records in runs.values() for k in curve_keys(records)))
    if keys is None:
        keys = present
    missing = [k for k in keys if k not in present]
    if missing:
        raise ValueError(f"no run logged {', '.join(missing)}; logged keys: {', '.join(present) or 'none'}")
    if not keys:
        raise ValueError("nothing to plot: no numeric term is logged yet")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for label, records in runs.items():
            x, y = series(records, key)
            if x:
                ax.plot(x, y, label=label, marker="." if len(x) < 30 else None, linewidth=1.2)
        if key in LOG_SCALE and all(v > 0 for records in runs.values() for v in series(records, key)[1]):
            ax.set_yscale("log")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
    return Path(out)


def write_curves(run_dir: str | Path) -> Path | None:
    """``run_dir/curves.png`` from ``run_dir/metrics.jsonl`` (nothing when no line is logged yet). Called at every
    checkpoint: any failure is one warning line, the run goes on."""
    run_dir = Path(run_dir)
    try:
        path = run_dir / METRICS_FILE
        records = read_metrics(path) if path.is_file() else []
        if not curve_keys(records):
            return None
        return plot_runs({run_dir.name: records}, run_dir / CURVES_FILE, title=f"{run_dir.name} (step "
                         f"{records[-1]['step']})")
    except Exception as err:  # noqa: BLE001 - a plot must never stop training
        write(f"warning: {run_dir / CURVES_FILE} not written ({type(err).__name__}: {err})")
        return None


# ------------------------------------------------------------------------------------------------ tools/plot.py


def _require_text_list(cfg: object, key: str, optional: bool = False) -> list[str] | None:
    """``key`` is a non-empty list of non-empty strings (or null when ``optional``)."""
    from omegaconf import ListConfig

    from pipelines.errors import ConfigError

    value = cfg[key]
    if value is None and optional:
        return None
    items = list(value) if isinstance(value, list | tuple | ListConfig) else None
    if not items or not all(isinstance(x, str) and x.strip() for x in items):
        raise ConfigError(f"{key} must be a non-empty list of names (e.g. {key}=[a,b])"
                          f"{' or null' if optional else ''}, got {value!r}")
    return items


def check_options(cfg: object) -> None:
    from pipelines.cli import require_text

    _require_text_list(cfg, "runs", optional=True)  # required, but reported by plot() (the shipped default is null)
    _require_text_list(cfg, "keys", optional=True)
    _require_text_list(cfg, "labels", optional=True)
    require_text(cfg, "out")
    require_text(cfg, "title", optional=True)


def plot(cfg: object) -> Path:
    """``tools/plot.py runs=[dir1,dir2] keys=[loss,lr]``: the runs' curves overlaid in one PNG."""
    from pipelines.errors import ConfigError, MissingCheckpointError

    check_options(cfg)
    runs = _require_text_list(cfg, "runs", optional=True)
    if runs is None:
        raise ConfigError("runs=[run_dir,...] is required: the runs (or metrics.jsonl files) to overlay")
    labels = list(cfg.labels) if cfg.labels is not None else [Path(r).name if Path(r).is_dir() else
                                                               Path(r).parent.name for r in runs]
    if len(labels) != len(runs):
        raise ConfigError(f"labels must name each of the {len(runs)} runs, got {len(labels)} label(s)")
    loaded = {}
    for label, run in zip(labels, runs, strict=True):
        path = Path(run) / METRICS_FILE if Path(run).is_dir() else Path(run)
        if not path.is_file():
            raise MissingCheckpointError(f"runs: no {METRICS_FILE} at {path}")
        loaded[label] = read_metrics(path)
    try:
        out = plot_runs(loaded, cfg.out, list(cfg["keys"]) if cfg["keys"] is not None else None, cfg.title)
    except ValueError as err:
        raise ConfigError(f"keys: {err}") from err
    print(f"curves of {len(loaded)} run(s) written to {out}")
    return out


def main() -> None:
    from pipelines.cli import entry_point

    entry_point("plot", plot, tool=True)()
