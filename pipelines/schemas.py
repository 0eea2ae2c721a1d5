"""The config dataclasses as Hydra schemas, and the checks of the keys that have no dataclass.

One home per setting: the defaults of ``TokenizerConfig``, ``LossConfig`` (tokenizer/) and ``GPTConfig``
(generator/) are the official reference choices, and the quantizers' options are ``IBQConfig`` / ``VQConfig``.
``register_schemas`` stores them in Hydra's ConfigStore as ``schemas/tokenizer`` and ``schemas/generator`` (not in
the ``tokenizer`` / ``generator`` groups: the ConfigStore is on every search path, and conf/tools/ configs have plain
``tokenizer=`` keys); each conf/tokenizer/*.yaml and conf/generator/*.yaml lists ``/schemas/<group>@_here_`` first in
its defaults and states only what differs,
so ``key=value`` works for every field and OmegaConf refuses an unknown key or a value of the wrong type.
Trainer and tool keys (``train.*``, ``run_dir``, ...) have their one home in their YAML file; ``check_*_run`` below
range-check them before any work starts (with ``pipelines.train.loop.check_train_options``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig

from generator.llama import MANIFEST_KEYS, GPTConfig
from pipelines.errors import ConfigError
from pipelines.generate import CFG_SCHEDULES, NEUTRAL_RECIPE
from pipelines.options import (
    require_bool,
    require_choice,
    require_int,
    require_number,
    require_number_list,
    require_text,
)
from pipelines.train.init_from import check_init_from
from tokenizer.losses import LossConfig
from tokenizer.model import TokenizerConfig
from tokenizer.quantizer import IBQConfig


def _without(cls: type, drop: tuple[str, ...], name: str) -> type:
    """``cls``'s fields (types and defaults) less ``drop``: the YAML schema of a config whose other keys are set by
    the code, so the defaults stay in ``cls`` alone."""
    hints = typing.get_type_hints(cls)
    kept = [(f.name, hints[f.name], field(default=f.default) if f.default is not dataclasses.MISSING
             else field(default_factory=f.default_factory)) for f in dataclasses.fields(cls) if f.name not in drop]
    return dataclasses.make_dataclass(name, kept)


# conf/generator/*.yaml: the architecture less vocab_size / num_classes / grid (the token shards set them).
GeneratorModel = _without(GPTConfig, MANIFEST_KEYS, "GeneratorModel")


@dataclass
class SampleRecipe:
    """``generator.sample``: the sampling settings saved with a run (tools/sample.py and tools/fid.py defaults);
    defaults = no guidance, temperature 1, no filtering (``pipelines.generate.NEUTRAL_RECIPE``)."""

    cfg_scale: float = NEUTRAL_RECIPE["cfg"]
    cfg_schedule: str = NEUTRAL_RECIPE["cfg_schedule"]
    temperature: float = NEUTRAL_RECIPE["temperature"]
    top_k: int = NEUTRAL_RECIPE["top_k"]
    top_p: float = NEUTRAL_RECIPE["top_p"]


@dataclass
class GeneratorSection:
    name: str = MISSING
    model: GeneratorModel = field(default_factory=GeneratorModel)  # type: ignore[valid-type]
    sample: SampleRecipe = field(default_factory=SampleRecipe)


def _ibq_options() -> dict[str, Any]:
    return dataclasses.asdict(IBQConfig())


# conf/tokenizer/*.yaml: the architecture with the default quantizer's options (IBQConfig's) spelled out under
# quantizer_args, so ``tokenizer.model.quantizer_args.<option>=`` works for each. Untyped, so the VQ baseline can
# replace it (``tokenizer.model.quantizer=vq tokenizer.model.quantizer_args=null 'tokenizer.model.quantizer_args=
# {beta: 0.25}'``: a schema field cannot be deleted); the options are checked when TokenizerConfig is built.
TokenizerModel = dataclasses.make_dataclass(
    "TokenizerModel", [(f.name, Any if f.name == "quantizer_args" else typing.get_type_hints(TokenizerConfig)[f.name],
                        field(default_factory=_ibq_options) if f.name == "quantizer_args" else
                        field(default=f.default) if f.default is not dataclasses.MISSING else
                        field(default_factory=f.default_factory)) for f in dataclasses.fields(TokenizerConfig)])


@dataclass
class TokenizerSection:
    name: str = MISSING
    model: TokenizerModel = field(default_factory=TokenizerModel)  # type: ignore[valid-type]
    loss: LossConfig = field(default_factory=LossConfig)


def register_schemas() -> None:
    """``schemas/tokenizer`` and ``schemas/generator`` in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="schemas", name="tokenizer", node=TokenizerSection)
    cs.store(group="schemas", name="generator", node=GeneratorSection)


# ------------------------------------------------------------------------------------ checks before work

def check_data(cfg: DictConfig, key: str = "data") -> None:
    """A conf/data/*.yaml section (ImageFolder dataset)."""
    for name in ("name", "root", "train_split", "val_split"):
        require_text(cfg, f"{key}.{name}")
    require_int(cfg, f"{key}.resolution", 8)
    require_choice(cfg, f"{key}.on_corrupt", ("skip", "error"))
    require_int(cfg, f"{key}.num_workers", 0)


def check_generator_section(cfg: DictConfig) -> GPTConfig:
    """``generator.*``: the architecture as ``GPTConfig`` builds it (manifest keys at their defaults) and the
    sampling recipe's ranges."""
    require_text(cfg, "generator.name")
    model = GPTConfig.from_dict(cfg.generator.model)
    require_number(cfg, "generator.sample.cfg_scale", 0)
    require_choice(cfg, "generator.sample.cfg_schedule", CFG_SCHEDULES)
    require_number(cfg, "generator.sample.temperature", 0, low_open=True)
    require_int(cfg, "generator.sample.top_k", 0)
    require_number(cfg, "generator.sample.top_p", 0, 1, low_open=True)
    return model


def _check_train_common(cfg: DictConfig, precisions: tuple[str, ...]) -> None:
    require_number(cfg, "train.weight_decay", 0)
    require_number_list(cfg, "train.betas", 0, 1, 2)
    require_choice(cfg, "train.mixed_precision", precisions)
    require_bool(cfg, "train.cpu")
    require_int(cfg, "seed", 0)
    require_text(cfg, "run_dir")
    require_bool(cfg, "tensorboard")


def check_tokenizer_run(cfg: DictConfig) -> None:
    """Every key of conf/train_tokenizer.yaml that ``check_train_options`` and the trainer's ``check_options`` leave
    out: the model and loss built as the trainer builds them, the data section, the optimizer's settings."""
    require_text(cfg, "tokenizer.name")
    check_data(cfg)  # first: the model's resolution interpolates data.resolution
    TokenizerConfig.from_dict(cfg.tokenizer.model)
    LossConfig.from_dict(cfg.tokenizer.loss)
    _check_train_common(cfg, ("no", "fp16", "bf16"))
    require_bool(cfg, "train.compile")
    require_number(cfg, "train.disc_lr", 0, low_open=True)
    require_number(cfg, "train.codebook_lr_mult", 0)
    require_number(cfg, "train.lr_decay", 0, low_open=True)
    milestones = cfg.train.lr_milestones
    if not (hasattr(milestones, "__iter__") and not isinstance(milestones, str)) or any(
            isinstance(m, bool) or not isinstance(m, int | float) or m < 0 for m in milestones):
        raise ConfigError(f"train.lr_milestones must be a list of epochs (numbers >= 0), got {milestones!r}")
    require_bool(cfg, "eval_at_end")
    check_init_from(cfg)


def check_ar_run(cfg: DictConfig) -> None:
    """Every key of conf/train_ar.yaml that ``check_train_options`` leaves out (the trainer's own checks)."""
    check_generator_section(cfg)
    require_text(cfg, "shards")
    require_text(cfg, "val_shards", optional=True)
    require_int(cfg, "val_max_items", 1)
    require_text(cfg, "data.variant")
    require_bool(cfg, "data.verify")
    require_int(cfg, "data.num_workers", 0)
    _check_train_common(cfg, ("auto", "no", "bf16", "fp16"))
    require_number(cfg, "train.final_lr_ratio", 0, 1)
    require_bool(cfg, "train.compile")
    require_bool(cfg, "train.activation_checkpointing")
    check_init_from(cfg)


def config_keys(cfg: Any) -> dict[str, Any]:
    """Every leaf key of a composed config (dotted) with its value; lists are leaves."""
    from omegaconf import OmegaConf

    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for k in node:
            key = f"{prefix}{k}"
            child = node._get_node(k) if OmegaConf.is_config(node) else None
            if child is not None and OmegaConf.is_dict(child):
                walk(child, key + ".")
            else:
                out[key] = OmegaConf.select(node, str(k), throw_on_missing=False)

    walk(cfg, "")
    return out
