"""Training metrics to stdout, ``metrics.jsonl`` and TensorBoard (main process only)."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.progress import write
from pipelines.util import atomic_write_text

METRICS_FILE = "metrics.jsonl"


class RunLogger:
    """One JSON line per log step (keys may appear later, e.g. GAN terms after ``disc_start``).

    ``start_step`` is where training (re)starts: lines of later steps, logged by a run that was interrupted
    before its next checkpoint, are dropped so a resumed run logs each step once.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 start_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_after(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                write("tensorboard is not installed: metrics go to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def _drop_after(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                continue
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        write(f"[step {step}] {shown}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
