"""Entry-point plumbing: Hydra configs from ``conf/``, and user errors as one ``error: ...`` line.

A ``UserError`` (every error a user can fix from its message) or an ``OSError`` (a file the system refuses:
missing, unreadable, disk full) prints ``error: <message>`` and exits with code 2. ``IBQ_DEBUG=1`` in the
environment re-raises instead, so the full traceback is printed.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hydra
from omegaconf import DictConfig

from pipelines.errors import ConfigError, UserError

F = TypeVar("F", bound=Callable)
DEBUG_ENV = "IBQ_DEBUG"


def user_errors_exit(fn: F) -> F:
    """Decorator for ``main`` functions: known input problems print ``error: ...`` and exit with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, OSError) as err:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"error: {message}", file=sys.stderr)
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


# ------------------------------------------------------------------------------------ option checks
# Every command checks its options before any work starts; a bad one is a ConfigError naming the key and range.


def _value(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key) if OmegaConf.is_config(cfg) else cfg.get(key)


def require_int(cfg: Any, key: str, minimum: int | None = None, optional: bool = False) -> None:
    """``key`` is an integer >= ``minimum`` (or null when ``optional``)."""
    v = _value(cfg, key)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
        rng = f" >= {minimum}" if minimum is not None else ""
        raise ConfigError(f"{key} must be an integer{rng}{' or null' if optional else ''}, got {v!r}")


def require_number(cfg: Any, key: str, low: float | None = None, high: float | None = None,
                   low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """``key`` is a number in the interval [low, high] (``*_open``: the end excluded), or null when ``optional``."""
    v = _value(cfg, key)
    if v is None and optional:
        return
    ok = isinstance(v, int | float) and not isinstance(v, bool) and v == v
    ok = ok and (low is None or (v > low if low_open else v >= low)) and (high is None or (v < high if high_open
                                                                                          else v <= high))
    if not ok:
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
        raise ConfigError(f"{key} must be a number in {lo}, {hi}{' or null' if optional else ''}, got {v!r}")


def require_choice(cfg: Any, key: str, choices: tuple, optional: bool = False) -> None:
    v = _value(cfg, key)
    if (v is None and optional) or v in choices:
        return
    raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}{' or null' if optional else ''}, "
                      f"got {v!r}")
