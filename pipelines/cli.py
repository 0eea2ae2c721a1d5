"""Entry-point plumbing: a ``UserError`` becomes one ``error: ...`` line and exit code 2, not a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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
