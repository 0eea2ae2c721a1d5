"""Entry-point plumbing: turn known bad-input errors into one clear line instead of a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from pipelines.checkpoint import MissingCheckpointError
from pipelines.data import CorruptImageError, DatasetNotFoundError, ShardIntegrityError, ShardMismatchError
from pipelines.generate import TokenizerMismatchError, UnknownClassError
from pipelines.inception import InceptionConversionError, InceptionWeightsMissing
from pipelines.metrics import ImageArrayError
from tokenizer.perceptual import PerceptualWeightsMissing

USER_ERRORS: tuple[type[BaseException], ...] = (
    MissingCheckpointError,
    DatasetNotFoundError,
    CorruptImageError,
    PerceptualWeightsMissing,
    ShardMismatchError,
    ShardIntegrityError,
    UnknownClassError,
    TokenizerMismatchError,
    InceptionWeightsMissing,
    InceptionConversionError,
    ImageArrayError,
)

F = TypeVar("F", bound=Callable)


def user_errors_exit(fn: F) -> F:
    """Decorator for ``main`` functions: known input problems print ``error: ...`` and exit with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
