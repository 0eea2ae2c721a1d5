"""What every trainer shares: the step/epoch bookkeeping, checkpoint + exact resume, the lr hook, logged sums.

The training loop itself is written out in each trainer (``pipelines/train/tokenizer.py``, ``ar.py``), so one
file tells what a step does; the batches it iterates come from ``train_batches`` here. Resume is exact because
everything random is a function of (seed, epoch, index) or restored from the saved RNG state, and the lr is a
function of the step.

A run directory has one owner (``claim_run_dir``: an OS-released lock held by the main process) and is never
clobbered: a fresh run refuses a directory that holds a checkpoint unless ``overwrite=true``, ``resume=true``
refuses weights without the ``train_state/`` to continue them, and ``config.yaml`` is written with each
checkpoint, so it always describes the weights beside it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object

from pipelines.checkpoint import (
    FSDP_STEP_FILE,
    MODEL_FILE,
    TRAIN_STATE_DIR,
    capture_rng,
    has_train_state,
    load_train_state,
    restore_rng,
    save_model,
    save_train_state,
)
from pipelines.cli import require_int, require_number
from pipelines.curves import write_curves
from pipelines.data import EpochBatchSampler
from pipelines.errors import ConfigError, RunDirError
from pipelines.run_log import METRICS_FILE
from pipelines.util import DirectoryLock, atomic_write_text, claim_directory

RUN_OUTPUTS = (METRICS_FILE, "tb", "eval.json")  # what overwrite=true removes with train_state/ (weights: replaced)


def check_train_options(cfg: Any) -> None:
    """The options every trainer shares, checked before anything is built."""
    for key in ("train.batch_size", "train.grad_accum", "train.max_steps", "log_every", "ckpt_every"):
        require_int(cfg, key, 1)
    require_int(cfg, "train.warmup_steps", 0)
    require_int(cfg, "train.stop_at_step", 1, optional=True)
    require_number(cfg, "train.epochs", 0, low_open=True, optional=True)
    require_number(cfg, "train.lr", 0, low_open=True)
    require_number(cfg, "train.ema_decay", 0, 1, high_open=True, optional=True)
    require_number(cfg, "train.max_grad_norm", 0, low_open=True, optional=True)
    for key in ("resume", "overwrite"):
        if not isinstance(cfg.get(key), bool):
            raise ConfigError(f"{key} must be true or false, got {cfg.get(key)!r}")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """The no-clobber rules; with ``overwrite`` (fresh run) the previous run's state and logs are removed, its
    ``model.safetensors`` + ``config.yaml`` pair stays until the first checkpoint replaces both."""
    weights, state = (run_dir / MODEL_FILE).exists(), has_train_state(run_dir)
    if resume:
        if weights and not state:
            raise RunDirError(f"resume=true but {run_dir} holds {MODEL_FILE} and no {TRAIN_STATE_DIR}/ to continue "
                              "from; training would start from scratch and replace those weights. Use another "
                              "run_dir, or resume=false overwrite=true to do exactly that")
        return
    if not (weights or state):
        return
    if not overwrite:
        raise RunDirError(f"{run_dir} already holds a checkpoint ({MODEL_FILE if weights else TRAIN_STATE_DIR}); "
                          "resume=true continues it, overwrite=true starts again over it, or choose another run_dir")
    shutil.rmtree(run_dir / TRAIN_STATE_DIR, ignore_errors=True)
    for name in RUN_OUTPUTS:
        target = run_dir / name
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


def start_run(cfg: Any, make_accelerator: Callable[[], Accelerator], body: Callable[[Any, Accelerator], Any],
              check: Callable[[Any], None] | None = None) -> Any:
    """How every trainer starts: options checked (the shared ones, then ``check``'s) before anything is built,
    the Accelerator made, the run directory claimed (``claim_run_dir``), then ``body(cfg, accelerator)`` with the
    lock held until it returns or raises."""
    check_train_options(cfg)
    if check is not None:
        check(cfg)
    accelerator = make_accelerator()
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu" and accelerator.scaler is None:
        raise ConfigError(f"train.mixed_precision=fp16 needs a GPU: on {accelerator.device.type} Accelerate would "
                          "train in float32 without autocast or loss scaling; use bf16 or no")
    with claim_run_dir(accelerator, Path(cfg.run_dir), cfg.resume, cfg.overwrite):
        return body(cfg, accelerator)


def claim_run_dir(accelerator: Accelerator, run_dir: Path, resume: bool, overwrite: bool) -> DirectoryLock:
    """Lock ``run_dir`` (main process), remove temporary files a killed run left, apply ``check_run_dir``.
    Use the result as a context manager."""
    return claim_directory(accelerator, run_dir, "run directory", lambda: check_run_dir(run_dir, resume, overwrite))


@dataclass
class TrainOutcome:
    """What a finished run leaves in memory (on every process): the final weights and the last metrics."""

    model: torch.nn.Module
    ema_model: torch.nn.Module | None
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)  # main process only
    discriminator: torch.nn.Module | None = None


@dataclass
class Progress:
    """Where training stands: optimizer steps done, the epoch and the batches already seen in it.

    ``begin_epoch`` makes the sampler skip the batches seen before an interruption (mid-epoch resume);
    ``advance`` counts one optimizer step and rolls over to the next epoch after ``steps_per_epoch``.
    """

    steps_per_epoch: int
    max_steps: int
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    @classmethod
    def plan(cls, sampler: EpochBatchSampler, grad_accum: int, epochs: float | None, max_steps: int) -> Progress:
        """``max_steps`` = ``epochs`` x steps per epoch when epochs is set, else ``max_steps``."""
        steps_per_epoch = len(sampler) // grad_accum
        if steps_per_epoch == 0:
            raise ConfigError(f"one epoch ({len(sampler)} batches) is shorter than grad_accum={grad_accum}")
        return cls(steps_per_epoch, int(epochs * steps_per_epoch) if epochs else int(max_steps))

    def begin_epoch(self, sampler: EpochBatchSampler, grad_accum: int) -> None:
        sampler.set_epoch(self.epoch, skip_batches=self.batch_in_epoch * grad_accum)

    def advance(self) -> bool:
        """One optimizer step done; True when it ended an epoch."""
        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            return True
        return False

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]


def lr_setter(optimizers: Iterable[tuple[torch.optim.Optimizer, float]],
              factor: Callable[[int], float]) -> Callable[[int], float]:
    """The lr hook: ``set_lr(step)`` gives every group ``base_lr * factor(step) * group['lr_mult']`` (default 1)
    and returns the first optimizer's lr. A pure function of the step, so resuming needs no scheduler state."""
    optimizers = list(optimizers)

    def set_lr(step: int) -> float:
        f = factor(step)
        for opt, base in optimizers:
            for group in opt.param_groups:
                group["lr"] = base * f * group.get("lr_mult", 1.0)
        return optimizers[0][1] * f

    return set_lr


class Checkpointer:
    """Owns ``train_state/``: saves it (with every process's RNG state and, under fp16, the gradient scaler's state)
    and ``model.safetensors`` + ``config.yaml``, and resumes from it. Under FSDP the sharded state goes through
    ``accelerator.save_state``."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, config: dict[str, Any], fsdp: bool = False) -> None:
        self.accelerator, self.run_dir, self.config, self.fsdp = accelerator, run_dir, config, fsdp
        self.fsdp_dir = run_dir / TRAIN_STATE_DIR / "fsdp"

    def resume(self, progress: Progress) -> dict[str, Any] | None:
        """Restore progress and this process's RNG; returns the saved state (None: fresh start, or FSDP)."""
        acc = self.accelerator
        if self.fsdp:
            if self.fsdp_dir.exists():
                acc.load_state(str(self.fsdp_dir))
                progress.load_state_dict(json.loads((self.fsdp_dir.parent / FSDP_STEP_FILE).read_text()))
            return None
        state = load_train_state(self.run_dir)
        if state is None:
            if acc.is_main_process:
                print(f"resume=true but {self.run_dir}/{TRAIN_STATE_DIR} does not exist yet: starting from scratch")
            return None
        if len(state["rng"]) != acc.num_processes:
            raise ConfigError(f"{self.run_dir}/{TRAIN_STATE_DIR} was saved by {len(state['rng'])} process(es); "
                              f"resume it with the same number (got {acc.num_processes}) to continue exactly")
        progress.load_state_dict(state)
        restore_rng(state["rng"][acc.process_index])
        if acc.scaler is not None and state.get("grad_scaler") is not None:  # fp16: the loss scale goes on as it was
            acc.scaler.load_state_dict(state["grad_scaler"])
        return state

    def save(self, progress: Progress, state: Callable[[], dict[str, Any]], weights: dict[str, torch.Tensor]) -> None:
        """``state()`` (models, optimizers, ...) is only called on the main process; every process must call this."""
        acc = self.accelerator
        if self.fsdp:
            acc.save_state(str(self.fsdp_dir))
        rng = gather_object([capture_rng()])
        if acc.is_main_process:
            if self.fsdp:
                atomic_write_text(self.fsdp_dir.parent / FSDP_STEP_FILE, json.dumps(progress.state_dict()))
            else:
                scaler = acc.scaler.state_dict() if acc.scaler is not None else None  # fp16's loss scale
                save_train_state(self.run_dir, {**state(), **progress.state_dict(), "rng": rng, "grad_scaler": scaler})
            save_model(self.run_dir, weights, self.config)
            write_curves(self.run_dir)  # curves.png beside metrics.jsonl (a failure is one warning line)
        acc.wait_for_everyone()


class Window:
    """Logged terms summed on their device between two log steps (no host sync per step; ``.item()`` at log time)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n, self.t0 = 0, time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """Means over the window and over processes; also ``seconds`` since the last reset. Resets the window."""
        names = sorted(self.sums)
        out: dict[str, float] = {"seconds": time.perf_counter() - self.t0, "micro_batches": float(self.n)}
        if names:
            stacked = torch.stack([self.sums[k] / self.n for k in names]).to(accelerator.device)
            out |= dict(zip(names, accelerator.reduce(stacked, "mean").tolist(), strict=True))
        self.reset()
        return out


def broadcast_buffers(accelerator: Accelerator, module: torch.nn.Module) -> None:
    """Give every process the main process's buffers. BatchNorm running stats (the tokenizer's discriminator)
    drift apart per process between DDP forwards, which re-broadcast rank 0's; align them the same way before
    saving or returning."""
    if accelerator.num_processes > 1:
        for b in module.buffers():
            b.copy_(broadcast(b, from_process=0))


def due(step: int, every: int, last: int) -> bool:
    """Whether ``step`` is a multiple of ``every`` or the last step (logging, images, checkpoints)."""
    return step % every == 0 or step == last


def train_batches(loader: Iterable, sampler: EpochBatchSampler, progress: Progress, grad_accum: int,
                  end_step: int) -> Iterator[Any]:
    """The batches from where training stands until ``end_step``, epoch after epoch; a resumed epoch skips the
    batches seen before the interruption. The caller calls ``progress.advance()`` after each optimizer step; the
    epoch ends once it rolls over (the batches left over from an incomplete accumulation window are dropped)."""
    while progress.step < end_step:
        epoch = progress.epoch
        progress.begin_epoch(sampler, grad_accum)
        for batch in loader:
            yield batch
            if progress.step >= end_step or progress.epoch != epoch:
                break
