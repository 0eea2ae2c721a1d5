"""``init_from=<checkpoint dir>``: start a new run (step 0, fresh optimizers) from the weights of another one.

The source is any checkpoint directory (``model.safetensors`` + ``config.yaml``): a run of this project or an
official checkpoint converted by ``pipelines/convert.py``, local or ``hf://owner/name[@revision][/subfolder]`` on the
Hugging Face Hub (``pipelines.hub``; the record then holds the commit read). The model is built as the source's
``config.yaml`` describes it (as ``resume`` keeps a run's own architecture), then loaded strictly: a key or shape that
differs is one line naming the first such key and both shapes. What may differ from the source by design:

- tokenizer: the training resolution (``data.resolution``; the network is convolutional with global attention,
  the architecture keeps the source's ``resolution``). The discriminator comes from the source's
  ``train_state/`` when it has one (then its ``disc_channels`` / ``disc_layers`` too), else starts fresh.
- generator: the token grid (the RoPE table is built from the shards' grid and is not a weight) and the classes
  (``rebuild_class_embedding``). The shards must hold tokens of the source's tokenizer (weights hash checked).

This is not ``resume`` (which continues this run's own ``train_state/``): both at once are refused.
The run's ``config.yaml`` records the source under ``SOURCE_KEY`` (directory or spec, weights hash, ``hub_commit`` for a
source on the Hub, what was carried).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from generator.llama import MANIFEST_KEYS
from pipelines.checkpoint import checkpoint_dir, has_train_state, load_model, load_train_state, weights_hash
from pipelines.errors import ConfigError, UserError
from pipelines.hub import hub_record, is_hub
from pipelines.options import require_checkpoint

SOURCE_KEY = "init_from_source"  # the record in the run's config.yaml


class SourceMismatchError(UserError, ValueError):
    """The ``init_from`` weights do not fit the model (architecture, tokenizer): one line naming what differs."""


def check_init_from(cfg: Any) -> None:
    """``init_from``: a checkpoint directory, an ``hf://`` spec or null, and not together with ``resume=true``."""
    require_checkpoint(cfg, "init_from", optional=True)
    if not cfg.get("init_from"):
        return
    if cfg.get("resume") is True:
        raise ConfigError("init_from starts a new run from other weights, resume=true continues this run's own "
                          "train_state/: set resume=false or init_from=null")
    if (isinstance(cfg.get("run_dir"), str) and not is_hub(cfg.init_from)
            and Path(cfg.init_from).resolve() == Path(cfg.run_dir).resolve()):
        raise ConfigError(f"init_from and run_dir are the same directory ({cfg.run_dir}); the new run would replace "
                          "its source: choose another run_dir")


@dataclass
class InitSource:
    """The source checkpoint: weights, config and weights hash."""

    directory: str  # as given: a path or an hf:// spec (messages, the record)
    local: Path  # on disk (the Hugging Face cache for a spec)
    kind: str  # "tokenizer" | "generator": the config section that describes the model
    state: dict[str, Tensor]
    config: dict[str, Any]
    weights_hash: str

    @classmethod
    def read(cls, directory: str | Path, kind: str) -> InitSource:
        state, config = load_model(directory)
        if not isinstance(config.get(kind), dict) or "model" not in config[kind]:
            raise SourceMismatchError(f"init_from={directory} is not a {kind} checkpoint (its config.yaml has no "
                                      f"{kind}.model)")
        return cls(str(directory), checkpoint_dir(directory), kind, state, config, weights_hash(directory))

    @property
    def model_spec(self) -> dict[str, Any]:
        return dict(self.config[self.kind]["model"])

    def record(self, **extra: Any) -> dict[str, Any]:
        return {"dir": self.directory, "weights_hash": self.weights_hash, **hub_record(self.directory), **extra}


def load_strict(model: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """``model.load_state_dict(state, strict=True)``, a mismatch being one line: the first key (in the model's order)
    that is missing or of another shape, else the first key the model does not have."""
    own = model.state_dict()
    for key, tensor in own.items():
        if key not in state:
            raise SourceMismatchError(f"init_from={source}: the source has no {key} (model: "
                                      f"{tuple(tensor.shape)}); architecture mismatch")
        if state[key].shape != tensor.shape:
            raise SourceMismatchError(f"init_from={source}: {key} is {tuple(state[key].shape)} in the source, "
                                      f"{tuple(tensor.shape)} in the model; architecture mismatch")
    if extra := [k for k in state if k not in own]:
        raise SourceMismatchError(f"init_from={source}: the source's {extra[0]} {tuple(state[extra[0]].shape)} has no "
                                  f"place in the model ({len(extra)} such key(s)); architecture mismatch")
    model.load_state_dict(state, strict=True)


def changed_keys(used: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """Keys of the configured model section whose value the source's architecture replaces."""
    return sorted(k for k in given if k in used and used[k] != given[k])


# ------------------------------------------------------------------------------------------- tokenizer

def source_discriminator(source: InitSource) -> dict[str, Tensor] | None:
    """The discriminator weights of a project run (its ``train_state/``), or None (converted checkpoints drop it)."""
    if not has_train_state(source.local):  # never fetched from the Hub: a checkpoint there has model + config only
        return None
    state = load_train_state(source.local)
    return state.get("disc") if isinstance(state, dict) else None


def tokenizer_config(config: dict[str, Any], source: InitSource, disc: dict[str, Tensor] | None) -> list[str]:
    """Set the run's ``tokenizer.model`` (and, with the source's discriminator, its size) to the source's, in place.
    Returns the configured keys that were replaced."""
    given = config["tokenizer"]["model"]
    changed = [f"model.{k}" for k in changed_keys(source.model_spec, given)]
    config["tokenizer"]["model"] = source.model_spec
    src_loss = source.config.get("tokenizer", {}).get("loss") or {}
    if disc is not None:
        for key in ("disc_channels", "disc_layers"):
            if key in src_loss and src_loss[key] != config["tokenizer"]["loss"][key]:
                changed.append(f"loss.{key}")
                config["tokenizer"]["loss"][key] = src_loss[key]
    return changed


def init_tokenizer(model: nn.Module, disc: nn.Module, source: InitSource, disc_state: dict[str, Tensor] | None,
                   resolution: int, log: bool, replaced: list[str] = ()) -> dict[str, Any]:
    """Load the source's tokenizer (and discriminator when it has one); the record for config.yaml."""
    down = model.cfg.downsample
    if resolution % down:
        raise ConfigError(f"data.resolution must be a multiple of the source tokenizer's downsampling factor {down} "
                          f"(init_from={source.directory}), got {resolution}")
    load_strict(model, source.state, source.directory)
    if disc_state is not None:
        load_strict(disc, disc_state, source.local / "train_state")
    disc_from = "source" if disc_state is not None else "fresh"
    disc_note = "from the source" if disc_state is not None else "fresh (the source has none)"
    if log:
        print(f"init_from {source.directory} (weights {source.weights_hash}): tokenizer trained at "
              f"{model.cfg.resolution}px, fine-tuned at {resolution}px ({resolution // down}x{resolution // down} "
              f"tokens) | discriminator: {disc_note}"
              + (f" | tokenizer.{', tokenizer.'.join(replaced)} of the config not applied (the source's)"
                 if replaced else ""))
    return source.record(discriminator=disc_from)


# ------------------------------------------------------------------------------------------- generator

def source_classes(source: InitSource) -> list[str]:
    """The source's class names (a converted official model has none: its ids as names)."""
    n = int(source.model_spec["num_classes"])
    names = source.config.get("classes")
    return [str(c) for c in names] if names else [str(i) for i in range(n)]


def check_source_tokenizer(source: InitSource, manifest: Any, shards: str | Path) -> None:
    """The shards must hold tokens of the tokenizer the source generator was trained on (same weights hash)."""
    want = source.config.get("tokenizer_hash")
    if want is not None and want != manifest.tokenizer_hash:
        root = (manifest.dataset or {}).get("root", "<your images>")
        tok = source.config.get("tokenizer_dir") or "<the source's tokenizer>"
        raise SourceMismatchError(
            f"init_from={source.directory} was trained on tokens of tokenizer {want}, the shards in {shards} hold "
            f"tokens of tokenizer {manifest.tokenizer_hash} ({manifest.tokenizer_path}); re-extract them with the "
            f"source's: python -m pipelines.tokens.extract tokenizer_ckpt={tok} data.root={root} out_dir=<new dir>")


def rebuild_class_embedding(weight: Tensor, old: list[str], new: list[str]) -> tuple[Tensor, dict[str, int]]:
    """Class embedding rows for the class list ``new`` from a table of ``len(old) + 1`` rows (last = null class).

    The rule (docs/design.md, "Fine-tuning"): the null row is carried over (so guidance works from step 0); a class
    whose name is in both lists keeps its row; a new class starts from the mean of the source's class rows (not the
    null row). Returns the ``len(new) + 1`` rows and counts {"kept": ..., "new": ...}."""
    if weight.shape[0] != len(old) + 1:
        raise SourceMismatchError(f"class_embedding has {weight.shape[0]} rows for {len(old)} classes + null")
    index = {name: i for i, name in enumerate(old)}
    mean = weight[:-1].mean(0) if old else torch.zeros_like(weight[-1])
    rows = [weight[index[name]] if name in index else mean for name in new] + [weight[-1]]
    kept = sum(name in index for name in new)
    return torch.stack(rows).clone(), {"kept": kept, "new": len(new) - kept}


def init_generator(model: nn.Module, source: InitSource, classes: list[str], log: bool,
                   configured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the source generator into ``model`` (built for the shards' grid and ``classes``); the class embedding is
    rebuilt when the class lists differ. ``configured``: the run's ``generator.model`` (its keys that the source's
    architecture replaces are reported). Returns the record for config.yaml."""
    state, old = dict(source.state), source_classes(source)
    counts = {"kept": len(classes), "new": 0}
    if old != list(classes):
        state["class_embedding.weight"], counts = rebuild_class_embedding(state["class_embedding.weight"], old,
                                                                          list(classes))
    load_strict(model, state, source.directory)
    if log:
        grid = "x".join(map(str, model.cfg.grid))
        src_grid = "x".join(map(str, source.model_spec.get("grid", [])))
        how = "same classes" if old == list(classes) else \
            f"class embedding rebuilt: {counts['kept']} kept by name, {counts['new']} new (mean of the source's rows)"
        replaced = [k for k in changed_keys(source.model_spec, configured or {}) if k not in MANIFEST_KEYS]
        print(f"init_from {source.directory} (weights {source.weights_hash}): {len(old)} -> {len(classes)} classes, "
              f"{how}, null row carried | grid {src_grid} -> {grid}"
              + (f" | generator.model keys {replaced} of the config not applied (the source's)" if replaced else ""))
    return source.record(source_classes=len(old), classes_kept=counts["kept"], classes_new=counts["new"])
