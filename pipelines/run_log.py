"""Training metrics to stdout, ``metrics.jsonl`` and TensorBoard (main process only)."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm


class RunLogger:
    """One JSON line per log step (keys may appear later, e.g. GAN terms after ``disc_start``)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                tqdm.write("tensorboard is not installed: metrics go to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        tqdm.write(f"[step {step}] {shown}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
