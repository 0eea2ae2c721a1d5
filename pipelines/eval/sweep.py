"""``tools/fid.py mode=gen|demo cfg=[1.0,1.5,2.0] temperature=[...]``: a sweep of sampling settings.

Every point is evaluated with the same seeds (sample i of class c is seeded by (seed, c, i) whatever the
settings), so rows differ only by the settings. Each point keeps its samples (``samples.npz``) and its metrics
(``metrics.json``) in ``<sweep_dir>/<point>/``; a point whose samples and metrics exist is not recomputed, and a
point whose samples exist but metrics do not is only evaluated. A point made under other settings (``per_class``,
``seed``, ``ar`` ...: ``settings.json`` in its folder) is made again. The table goes to ``sweep.csv`` and
``sweep.json`` and the picture (FID and recall against the swept setting, precision against recall, the best
point marked) to ``sweep.png``. ``cfg=1.0`` is the row without guidance.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipelines.errors import ConfigError
from pipelines.generate import check_sampling_options
from pipelines.hub import results_dir
from pipelines.util import atomic_write, atomic_write_text

SWEEP_KEYS = ("cfg", "temperature")  # the sampling settings a list sweeps
SWEEP_MODES = ("gen", "demo")
SAMPLES_FILE, METRICS_FILE, SETTINGS_FILE = "samples.npz", "metrics.json", "settings.json"
# What else makes a point's samples and metrics: a point done under other values of these is done again.
SETTING_KEYS = ("mode", "ar", "ref", "per_class", "classes", "seed", "cfg_schedule", "top_k", "top_p", "metrics",
                "max_images", "resolution", "demo_data", "weights")
# The table's metric columns; mode=demo names the Inception ones sample_fid ... (read as fid ...).
METRIC_COLUMNS = ("num_samples", "fid", "inception_score", "precision", "recall", "fd_demo", "sample_accuracy")
COLUMNS = (*SWEEP_KEYS, *METRIC_COLUMNS)


def _is_list(value: Any) -> bool:
    return isinstance(value, list | tuple | ListConfig)


def is_sweep(cfg: DictConfig) -> bool:
    return any(_is_list(cfg[key]) for key in SWEEP_KEYS)


def check_sweep_option(cfg: DictConfig, key: str) -> None:
    """A swept key is a non-empty list of values each valid on its own (as ``check_sampling_options`` says)."""
    value = cfg[key]
    if not _is_list(value):
        return
    try:
        if not len(value):
            raise ConfigError("empty")
        for item in value:
            check_sampling_options({**{k: None for k in ("cfg", "cfg_schedule", "temperature", "top_k", "top_p")},
                                    key: item})
    except ConfigError as err:
        low = "(0, inf)" if key == "temperature" else "[0, inf)"
        raise ConfigError(f"{key} must be a number in {low}, null, or a non-empty list of such numbers (a sweep, "
                          f"e.g. {key}=[1.0,1.5,2.0]), got {value!r}") from err


def check_sweep(cfg: DictConfig) -> None:
    """The swept keys' values, and a mode that samples (a sweep of settings needs ``ar=``)."""
    for key in SWEEP_KEYS:
        check_sweep_option(cfg, key)
    if is_sweep(cfg) and cfg.mode not in SWEEP_MODES:
        raise ConfigError(f"a list for {' or '.join(SWEEP_KEYS)} runs a sweep, which needs mode=gen or mode=demo "
                          f"(with ar=<AR checkpoint dir>), got mode={cfg.mode}")


def sweep_points(cfg: DictConfig) -> list[dict[str, float | None]]:
    """Every combination of the swept values, in the order given (a scalar or null is one value)."""
    values = [list(cfg[k]) if _is_list(cfg[k]) else [cfg[k]] for k in SWEEP_KEYS]
    return [dict(zip(SWEEP_KEYS, combo, strict=True)) for combo in itertools.product(*values)]


def point_name(point: dict[str, float | None]) -> str:
    """Folder name of a point: ``cfg1.5_temperature1.0`` (``run`` for a setting left to the run's recipe)."""
    return "_".join(f"{k}{'run' if v is None else format(float(v), 'g')}" for k, v in point.items())


def sweep_dir(cfg: DictConfig) -> Path:
    return Path(cfg.sweep_dir) if cfg.sweep_dir else results_dir(cfg.ar) / f"sweep_{cfg.mode}"


def row_of(point: dict[str, float | None], metrics: dict[str, Any]) -> dict[str, Any]:
    """A table row: the point's settings and its metrics under the sweep's column names (None: not computed)."""
    row: dict[str, Any] = dict(point)
    for col in METRIC_COLUMNS:
        row[col] = metrics.get(col, metrics.get(f"sample_{col}"))
    return row


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def best_index(rows: list[dict[str, Any]]) -> tuple[int | None, str | None]:
    """(index, criterion) of the best point: the lowest FID, else (no FID) the lowest fd_demo."""
    for key in ("fid", "fd_demo"):
        scored = [(r[key], i) for i, r in enumerate(rows) if _finite(r.get(key))]
        if scored:
            return min(scored)[1], key
    return None, None


def point_settings(cfg: DictConfig, point: dict[str, float | None]) -> dict[str, Any]:
    """The settings a point's files were made with (compared on resume)."""
    return {**point, **OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(SETTING_KEYS)), resolve=True)}


def _same_settings(folder: Path, settings: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / SETTINGS_FILE).read_text()) == json.loads(json.dumps(settings))
    except (OSError, ValueError):
        return False


def _evaluate_point(cfg: DictConfig, device: torch.device, point: dict[str, float | None], folder: Path,
                    modes: dict[str, Callable[[DictConfig, torch.device], dict | None]],
                    reuse_samples: bool = True) -> dict | None:
    """Generate (unless the samples exist and ``reuse_samples``) and evaluate one point; its record (metrics ...)
    on the main process."""
    samples = folder / SAMPLES_FILE
    sub = OmegaConf.merge(cfg, {**point, "sweep_dir": str(folder)})  # the point's JSON goes there, not beside ar
    if reuse_samples and samples.is_file():  # samples of an interrupted run: evaluate them, no new sampling
        print(f"sweep point {folder.name}: evaluating the samples already in {samples}")
        if cfg.mode == "gen":
            sub = OmegaConf.merge(sub, {"mode": "samples", "samples": str(samples), "ar": None})
            return modes["samples"](sub, device)
        sub = OmegaConf.merge(sub, {"samples": str(samples), "ar": None, "tokenizer": None})
        return modes["demo"](sub, device)
    print(f"sweep point {folder.name}: sampling with " + ", ".join(f"{k}={v}" for k, v in point.items()))
    # tokenizer=None: the demo's tokenizer half does not depend on the sampling settings (run it once on its own)
    sub = OmegaConf.merge(sub, {"save_samples": str(samples), "tokenizer": None})
    return modes[cfg.mode](sub, device)


def run_sweep(cfg: DictConfig, device: torch.device,
              modes: dict[str, Callable[[DictConfig, torch.device], dict | None]]) -> dict | None:
    """Every point of the sweep (resuming), then the table as CSV and JSON and the plot; the summary on the main
    process, None elsewhere."""
    from accelerate import PartialState

    if cfg.ar is None:
        raise ConfigError(f"a sweep (a list for {' or '.join(SWEEP_KEYS)}) needs ar=<AR checkpoint dir>")
    main = PartialState().is_main_process
    out = sweep_dir(cfg)
    points = sweep_points(cfg)
    rows = []
    for point in points:
        folder = out / point_name(point)
        done = folder / METRICS_FILE
        settings = point_settings(cfg, point)
        fresh = not _same_settings(folder, settings)
        if fresh:  # new, or made with other settings: start the point afresh
            if main:
                for stale in (done, folder / SAMPLES_FILE):
                    if stale.is_file():
                        print(f"sweep point {folder.name}: {stale.name} was made with other settings; redoing it")
                        stale.unlink()
                atomic_write_text(folder / SETTINGS_FILE, json.dumps(settings, indent=1))
        elif done.is_file() and (folder / SAMPLES_FILE).is_file():
            if main:
                print(f"sweep point {folder.name}: done already ({done})")
                rows.append(row_of(point, json.loads(done.read_text())["metrics"]))
            continue
        elif not main and (folder / SAMPLES_FILE).is_file():
            continue  # evaluated by the main process alone
        record = _evaluate_point(cfg, device, point, folder, modes, reuse_samples=not fresh)
        if main and record is not None:
            atomic_write_text(done, json.dumps({**record, "point": point}, indent=1, default=str))
            rows.append(row_of(point, record["metrics"]))
    if not main:
        return None
    return write_sweep(out, rows, {"mode": cfg.mode, "ar": cfg.ar, "ref": cfg.ref, "per_class": cfg.per_class,
                                   "seed": cfg.seed})


def _csv_text(rows: list[dict[str, Any]], best: int | None) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, "best"], lineterminator="\n")
    writer.writeheader()
    for i, row in enumerate(rows):
        writer.writerow({**{k: "" if row.get(k) is None else row[k] for k in COLUMNS}, "best": int(i == best)})
    return buf.getvalue()


def sweep_table(rows: list[dict[str, Any]], best: int | None) -> str:
    """The rows as a Markdown table (columns nothing filled left out; floats to 4 significant digits; ``*``: best)."""
    shown = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(shown) + " | best |", "|" + "---|" * (len(shown) + 1)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in shown) + f" | {'*' if i == best else ''} |"
              for i, r in enumerate(rows)]
    return "\n".join(lines)


def write_sweep(out: Path, rows: list[dict[str, Any]], about: dict[str, Any]) -> dict[str, Any]:
    """``sweep.csv``, ``sweep.json`` and ``sweep.png`` in ``out``; prints the table. Returns the JSON's content."""
    best, criterion = best_index(rows)
    summary = {**about, "columns": list(COLUMNS), "rows": rows, "best": best, "best_by": criterion}
    atomic_write_text(out / "sweep.csv", _csv_text(rows, best))
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=1, default=str))
    print(f"sweep: {len(rows)} points" + (f", best by {criterion} marked *" if criterion else ""))
    print(sweep_table(rows, best))
    try:
        plot_sweep(rows, best, out / "sweep.png")
        print(f"written to {out}/sweep.csv, sweep.json, sweep.png")
    except Exception as err:  # noqa: BLE001 - the table is the result; the picture is a view of it
        print(f"warning: {out / 'sweep.png'} not written ({type(err).__name__}: {err}); the table is in sweep.csv")
    return summary


def plot_sweep(rows: list[dict[str, Any]], best: int | None, path: Path) -> Path:
    """FID (fd_demo without FID) and recall (recognition without it) against the swept setting (one line per value
    of the other), and precision against recall; the best point is a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [k for k in SWEEP_KEYS if len({r[k] for r in rows}) > 1] or ["cfg"]
    x_key = swept[0]
    other = next((k for k in SWEEP_KEYS if k != x_key), None)
    score = "fid" if any(_finite(r["fid"]) for r in rows) else "fd_demo"
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r[other] if other in swept else None, []).append(i)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    second = ("recall", "recall (precision dashed)") if any(_finite(r["recall"]) for r in rows) else (
        "sample_accuracy", "recognition (demo classifier)")  # demo mode without the Inception metrics
    panels = ((axes[0], score, score), (axes[1], *second))
    for ax, key, title in panels:
        for value, idx in groups.items():
            idx = sorted(idx, key=lambda i: rows[i][x_key] if rows[i][x_key] is not None else -1)
            pts = [(rows[i][x_key], rows[i][key]) for i in idx if _finite(rows[i][key]) and rows[i][x_key] is not None]
            label = None if value is None else f"{other}={value:g}"
            if pts:
                line, = ax.plot(*zip(*pts, strict=True), marker="o", label=label)
                if key == "recall":
                    prc = [(rows[i][x_key], rows[i]["precision"]) for i in idx if _finite(rows[i]["precision"])
                           and rows[i][x_key] is not None]
                    if prc:
                        ax.plot(*zip(*prc, strict=True), marker="s", linestyle="--", color=line.get_color(), alpha=0.7)
        if best is not None and _finite(rows[best][key]) and rows[best][x_key] is not None:
            ax.plot(rows[best][x_key], rows[best][key], marker="*", markersize=16, color="gold", markeredgecolor="k",
                    linestyle="none", label="best")
        ax.set_xlabel("guidance scale (cfg)" if x_key == "cfg" else x_key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"{key} unavailable", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax = axes[2]
    pr = [(i, r["recall"], r["precision"]) for i, r in enumerate(rows) if _finite(r["recall"]) and
          _finite(r["precision"])]
    for i, rec, prec in pr:
        ax.plot(rec, prec, marker="*" if i == best else "o", markersize=16 if i == best else 6,
                color="gold" if i == best else "C0", markeredgecolor="k" if i == best else None, linestyle="none")
        ax.annotate(" ".join(f"{k}={rows[i][k]:g}" for k in swept if rows[i][k] is not None), (rec, prec),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    if not pr:
        ax.text(0.5, 0.5, "precision / recall unavailable\n(metrics without prc, or no Inception weights)",
                ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("precision vs recall")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
    return path
