"""Every YAML under conf/ composes through its schema, and every option is checked before any work starts.

The walk sets each leaf key of each composed config to a bad value (wrong type; out of range for numbers) and runs
the checks the entry point runs before work: each must be refused with a one-line ``ConfigError``. A key nothing
reads is refused by nothing, so it fails the walk (``test_a_stray_key_is_caught``); the few keys that accept any
value are listed in ``ANY_VALUE`` with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipelines import app, convert, curves, push_to_hub, reconstruct, sample
from pipelines.cli import CONF_DIR, hydra_error_line, load_config
from pipelines.errors import ConfigError, UserError
from pipelines.eval import demo_classifier, fid
from pipelines.schemas import check_ar_run, config_keys
from pipelines.tokens import extract
from pipelines.train import tokenizer as train_tokenizer
from pipelines.train.loop import check_train_options

ROOT = Path(__file__).resolve().parents[1]
GENERATORS = sorted(p.stem for p in (CONF_DIR / "generator").glob("*.yaml"))
TOKENIZERS = sorted(p.stem for p in (CONF_DIR / "tokenizer").glob("*.yaml"))
TOOLS = {"sample": sample.check_options, "reconstruct": reconstruct.check_options, "fid": fid.check_options,
         "convert": convert.check_options, "demo_classifier": demo_classifier.check_options,
         "plot": curves.check_options, "app": app.check_options, "push_to_hub": push_to_hub.check_options}
REQUIRED = {"reconstruct": ["input=x.png"], "push_to_hub": ["run=runs/x", "repo=me/model"]}  # ??? in the YAML


def _check_tokenizer(cfg):
    check_train_options(cfg)
    train_tokenizer.check_options(cfg)


def _check_ar(cfg):
    check_train_options(cfg)
    check_ar_run(cfg)


# (config, overrides, tool, the checks its entry point runs before work)
CASES = ([("train_tokenizer", [f"tokenizer={t}"], False, _check_tokenizer) for t in TOKENIZERS]
         + [("train_tokenizer", ["+experiment=imagenet_256", "data.root=/data/imagenet"], False, _check_tokenizer)]
         + [("train_ar", [f"generator={g}"], False, _check_ar) for g in GENERATORS]
         + [("extract_tokens", [], False, extract.check_options)]
         + [(name, REQUIRED.get(name, []), True, check) for name, check in TOOLS.items()])
IDS = [f"{name}{'[' + ','.join(o) + ']' if o else ''}" for name, o, _, _ in CASES]

# Keys that accept any value of any type, and why.
ANY_VALUE = {
    "tokenizer.name": "free text (names the run directory)",
    "generator.name": "free text (names the size)",
    "tokenizer.loss.vgg_weights": "a path (a missing file is reported when the loss is built)",
    "class": "a class id, a name, a list or all: resolved against the run's classes (UnknownClassError)",
    "classes": "class ids or names, resolved against the run's classes (UnknownClassError)",
    "tag": "free text kept in the results line",
    "metrics": "checked by tools/fid.py's metric list (another module's option)",
    "input": "an image, a folder or a list of them (DatasetNotFoundError when none is there)",
}


def _refused(cfg, key: str, value, check) -> str | None:
    """The one-line message the entry point prints for ``key=value``, or None when it is accepted."""
    cfg = cfg.copy()
    try:
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as err:  # as load_config reports a schema's refusal
            raise ConfigError(hydra_error_line(err)) from err
        check(cfg)
    except UserError as err:
        return str(err)
    return None


def _bad_values(value) -> list:
    """Values of the wrong type for ``value``'s key (and out of range for a number: every number here has a floor)."""
    if isinstance(value, bool):
        return ["not-a-value"]
    if isinstance(value, int | float):
        return ["not-a-value", -1]
    return [[1, "x"]] if value is None or isinstance(value, str) else ["not-a-value"]  # text and null: a list


def unchecked_keys(cfg, check) -> list[str]:
    """Leaf keys for which some bad value passes the checks (a key nothing reads is one)."""
    missed = []
    for key, value in config_keys(cfg).items():
        if key in ANY_VALUE or key.startswith("hydra."):
            continue
        for bad in _bad_values(value):
            message = _refused(cfg, key, bad, check)
            if message is None:
                missed.append(f"{key}={bad!r}")
            else:
                assert len(message.strip().splitlines()) == 1, message
    return missed


@pytest.mark.parametrize("name, overrides, tool, check", CASES, ids=IDS)
def test_every_option_is_checked_before_work(name, overrides, tool, check):
    cfg = load_config(name, overrides, tool=tool)
    check(cfg)  # the shipped values pass
    assert unchecked_keys(cfg, check) == []


def test_a_stray_key_is_caught():
    cfg = load_config("train_ar", ["+train.bogus=1"])
    assert unchecked_keys(cfg, _check_ar) == ["train.bogus='not-a-value'", "train.bogus=-1"]
    with pytest.raises(ConfigError, match=r"unknown option\(s\) tokenizer.loss.bogus_weight"):
        _check_tokenizer(load_config("train_tokenizer", ["+tokenizer.loss.bogus_weight=1"]))
    with pytest.raises(ConfigError, match="unknown option tokenizer.loss.bogus_weight; tokenizer.loss takes: "):
        load_config("train_tokenizer", ["tokenizer.loss.bogus_weight=1"])


def test_every_group_option_composes_through_its_schema():
    for group in ("data", "experiment", "generator", "tokenizer"):
        for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
            name = "train_ar" if group == "generator" else "train_tokenizer"
            prefix = "+" if group == "experiment" else ""
            extra = [] if name == "train_ar" else ["data.root=/data"]
            cfg = load_config(name, [f"{prefix}{group}={option}", *extra])
            (_check_ar if name == "train_ar" else _check_tokenizer)(cfg)
    assert not list(CONF_DIR.glob("*/_*.yaml")), "shared keys belong in the schemas (pipelines/schemas.py)"


def test_yaml_states_only_what_differs_from_the_dataclass_defaults():
    """One home per setting: a value a YAML file repeats from its schema's defaults is a second home."""
    from pipelines.schemas import GeneratorSection, TokenizerSection

    for group, schema in (("tokenizer", TokenizerSection), ("generator", GeneratorSection)):
        defaults = OmegaConf.structured(schema)
        for path in (CONF_DIR / group).glob("*.yaml"):
            own = OmegaConf.load(path)
            for section in ("model", "loss"):
                node = own.get(section) or {}
                for key in node:
                    if key in ("dim", "n_layer", "n_head", "quantizer_args") or OmegaConf.is_interpolation(node, key):
                        continue  # a size file names its size; interpolations tie keys together
                    assert node[key] != defaults[section][key], f"{path.name}: {section}.{key} repeats the default"
            args = (own.get("model") or {}).get("quantizer_args") or {}
            for key in args:
                assert args[key] != defaults.model.quantizer_args[key], f"{path.name}: quantizer_args.{key} repeats"


SUBPROCESS_CASES = [
    ("pipelines.train.ar", "generator.model.head_norm=layer", "generator.model.head_norm must be one of"),
    ("pipelines.train.tokenizer", "tokenizer.model.quantizer_args.init_std=-1",
     "tokenizer.model.quantizer_args.init_std must be a number in (0, inf)"),
    ("pipelines.train.tokenizer", "+tokenizer.loss.bogus_weight=1", "unknown option(s) tokenizer.loss.bogus_weight"),
    ("pipelines.train.tokenizer", "tokenizer.loss.bogus_weight=1", "unknown option tokenizer.loss.bogus_weight"),
    ("pipelines.train.ar", "generator=Q", "generator=Q: no such option; generator is one of B, L"),
    ("pipelines.train.tokenizer", "tokenizer.model.num_codes=many", "tokenizer.model.num_codes: Value 'many'"),
]


@pytest.mark.parametrize("module, override, expected", SUBPROCESS_CASES, ids=[c[1] for c in SUBPROCESS_CASES])
def test_entry_point_prints_one_error_line(module, override, expected, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("IBQ_DEBUG", None)
    run = subprocess.run([sys.executable, "-m", module, override, f"run_dir={tmp_path / 'run'}"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert expected in lines[0] and "Traceback" not in run.stderr + run.stdout
    assert not (tmp_path / "run").exists()  # refused before any work


def test_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IBQ_DEBUG": "1"}
    run = subprocess.run([sys.executable, "-m", "pipelines.train.ar", "generator=Q"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0 and "Traceback" in run.stderr
