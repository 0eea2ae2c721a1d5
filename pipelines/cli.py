"""Entry-point plumbing: Hydra configs from ``conf/``, and a ``UserError`` becomes one ``error: ...`` line with exit
code 2 instead of a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hydra
from omegaconf import DictConfig

from pipelines.errors import UserError

F = TypeVar("F", bound=Callable)


def user_errors_exit(fn: F) -> F:
    """Decorator for ``main`` functions: known input problems print ``error: ...`` and exit with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # pipeline configs; per-tool configs in conf/tools/
TOOLS_CONF_DIR = str(CONF_DIR / "tools")  # absolute: Hydra resolves a relative path against the package otherwise


def entry_point(config_name: str, run: Callable[[DictConfig], Any], tool: bool = False) -> Callable[[], None]:
    """The ``main`` of a command: compose ``conf/<config_name>.yaml`` (``conf/tools/`` for a tool) with the
    command line's ``key=value`` overrides, then ``run(cfg)``, user errors as one line."""

    @hydra.main(config_path=TOOLS_CONF_DIR if tool else str(CONF_DIR), config_name=config_name, version_base=None)
    @user_errors_exit
    def main(cfg: DictConfig) -> None:
        run(cfg)

    return main
