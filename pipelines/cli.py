"""Entry-point plumbing: Hydra configs from ``conf/``, and user errors as one ``error: ...`` line.

A ``UserError`` (every error a user can fix from its message) or an ``OSError`` (a file the system refuses:
missing, unreadable, disk full) prints ``error: <message>`` and exits with code 2. ``IBQ_DEBUG=1`` in the
environment re-raises instead, so the full traceback is printed.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hydra
from omegaconf import DictConfig

from pipelines.errors import ConfigError, UserError
from pipelines.options import (  # noqa: F401  (re-exported: the entry points' option checks)
    require_bool,
    require_checkpoint,
    require_choice,
    require_int,
    require_int_list,
    require_number,
    require_number_list,
    require_text,
)

F = TypeVar("F", bound=Callable)
DEBUG_ENV = "IBQ_DEBUG"


def error_line(err: BaseException) -> str:
    """An error's message on one line (the ``error:`` line, the web page's message)."""
    return " ".join(str(err).split()) or type(err).__name__


def user_errors_exit(fn: F) -> F:
    """Decorator for ``main`` functions: known input problems print ``error: ...`` and exit with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, OSError) as err:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            print(f"error: {error_line(err)}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # pipeline configs; per-tool configs in conf/tools/
TOOLS_CONF_DIR = str(CONF_DIR / "tools")  # absolute: Hydra resolves a relative path against the package otherwise

# What every command shares: run in the current directory (no Hydra output folder) and log to stdout. The one
# home of these settings: a node in Hydra's ConfigStore, reachable from conf/ and conf/tools/ alike (a YAML file
# is on one search path only); each primary config lists ``_hydra`` first in its defaults.
HYDRA_RUN_HERE = {
    "defaults": [{"override hydra/job_logging": "stdout"}],
    "hydra": {"run": {"dir": "."}, "output_subdir": None, "job": {"chdir": False}},
}


def register_configs() -> None:
    """Put ``_hydra`` and the config dataclasses' schemas (``pipelines.schemas``) in Hydra's ConfigStore, and the
    ``${demo_classifier_dir:}`` resolver (the demo classifier's cache, named once in Python) in OmegaConf."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from pipelines.eval.demo_classifier import DEMO_CLASSIFIER_DIR
    from pipelines.schemas import register_schemas

    ConfigStore.instance().store(name="_hydra", node=HYDRA_RUN_HERE, package="_global_")
    register_schemas()
    if not OmegaConf.has_resolver("demo_classifier_dir"):
        OmegaConf.register_new_resolver("demo_classifier_dir", lambda: DEMO_CLASSIFIER_DIR)


def hydra_error_line(err: BaseException) -> str:
    """Hydra's / OmegaConf's multi-line composition error as one line that names the option."""
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    chain, e = [], err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            reason = (e.msg or str(e)).splitlines()[0]
            if isinstance(e, ConfigKeyError | AttributeError) or "not in" in reason:  # unknown key
                parent = e.full_key.rpartition(".")[0]
                known = _known_keys(e)
                takes = f"; {parent or 'the config'} takes: {', '.join(known)}" if known else ""
                return f"unknown option {e.full_key}{takes}"
            return f"{e.full_key}: {reason}"  # e.g. a schema field given a value of the wrong type
    text = str(err).split("Config search path")[0]  # Hydra appends its search path to a missing option
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = [line.strip() for line in text.split("Available options in", 1)[-1].splitlines()[1:]]
        options = [o for o in options if o]
        return f"{group}={option}: no such option; {group} is one of {', '.join(options)}"
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("Set the environment variable HYDRA_FULL_ERROR",
                                                                     "full_key:", "object_type", "To append"))]
    return " ".join(lines)


def _known_keys(e: Any) -> list[str]:
    node = getattr(e, "parent_node", None)
    try:
        return [str(k) for k in node.keys() if k != "hydra"] if node is not None else []
    except Exception:  # a node Hydra left half-built: no list rather than a second error
        return []


def load_config(config_name: str, overrides: list[str], tool: bool = False) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` as the command line would; a bad override (unknown
    key, wrong type, missing group option) is a one-line ``ConfigError`` instead of Hydra's report."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    with initialize_config_dir(config_dir=TOOLS_CONF_DIR if tool else str(CONF_DIR), version_base=None):
        try:
            return compose(config_name=config_name, overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(hydra_error_line(err)) from err


def entry_point(config_name: str, run: Callable[[DictConfig], Any], tool: bool = False) -> Callable[[], None]:
    """The ``main`` of a command: compose ``conf/<config_name>.yaml`` (``conf/tools/`` for a tool) with the
    command line's ``key=value`` overrides, then ``run(cfg)``, user errors as one line.

    Hydra reports its own composition errors (unknown key, wrong type, missing option) in several lines and exit
    code 1, so plain ``key=value`` command lines are composed once first (``load_config``) to report them as one
    ``error:`` line; flags (``--help``, ``--cfg job``, ``-m``) go to Hydra as they are."""

    @hydra.main(config_path=TOOLS_CONF_DIR if tool else str(CONF_DIR), config_name=config_name, version_base=None)
    @user_errors_exit
    def hydra_main(cfg: DictConfig) -> None:
        run(cfg)

    def main() -> None:
        register_configs()
        args = sys.argv[1:]
        if not any(a.startswith("-") for a in args):
            user_errors_exit(load_config)(config_name, args, tool)
        hydra_main()

    return main


# ------------------------------------------------------------------------------------ option checks
# Every command checks its options before any work starts; a bad one is a ConfigError naming the key and range.
# The checks live in pipelines/options.py (a leaf module the config dataclasses use too); re-exported here.
