"""Option checks: a bad value is a ``ConfigError`` naming the key as the user types it and the values it takes.

A leaf module like ``pipelines.errors`` (it imports nothing else from the project but the leaf ``pipelines.hub``,
which checks ``hf://`` specs), so the config dataclasses in ``tokenizer/`` and ``generator/`` validate themselves
with the same checks and messages as the entry points.
``cfg`` is an OmegaConf config, a plain dict, or ``fields_of(obj, prefix)`` for a dataclass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from pipelines.errors import ConfigError
from pipelines.hub import check_spec

T = TypeVar("T")


def _value(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg):
        return cfg.get(key)
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if OmegaConf.is_dict(parent) and leaf in parent.keys() and OmegaConf.is_missing(parent, leaf):
        raise ConfigError(f"{key} is required (??? in the config): set {key}=...")
    return OmegaConf.select(cfg, key)


def _or_null(optional: bool) -> str:
    return " or null" if optional else ""


def require_int(cfg: Any, key: str, minimum: int | None = None, optional: bool = False) -> None:
    """``key`` is an integer >= ``minimum`` (or null when ``optional``)."""
    v = _value(cfg, key)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
        rng = f" >= {minimum}" if minimum is not None else ""
        raise ConfigError(f"{key} must be an integer{rng}{_or_null(optional)}, got {v!r}")


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
        raise ConfigError(f"{key} must be a number in {lo}, {hi}{_or_null(optional)}, got {v!r}")


def require_choice(cfg: Any, key: str, choices: tuple, optional: bool = False) -> None:
    """``key`` is one of ``choices`` (or null when ``optional``)."""
    v = _value(cfg, key)
    if (v is None and optional) or (not isinstance(v, bool | float) and v in choices):  # 1 == True == 1.0
        return
    if isinstance(v, bool) and any(c is v for c in choices):
        return
    raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}{_or_null(optional)}, got {v!r}")


def require_bool(cfg: Any, key: str, optional: bool = False) -> None:
    """``key`` is true or false (or null when ``optional``)."""
    v = _value(cfg, key)
    if not (isinstance(v, bool) or (v is None and optional)):
        raise ConfigError(f"{key} must be true or false{_or_null(optional)}, got {v!r}")


def require_text(cfg: Any, key: str, optional: bool = False) -> None:
    """``key`` is a non-empty string (a path, a name), or null when ``optional``."""
    v = _value(cfg, key)
    if not ((isinstance(v, str) and v.strip()) or (v is None and optional)):
        raise ConfigError(f"{key} must be a non-empty string{_or_null(optional)}, got {v!r}")


def require_checkpoint(cfg: Any, key: str, optional: bool = False, file: bool = False) -> None:
    """``key`` is a local path or an ``hf://owner/name[@revision][/subfolder]`` spec (``file``: a file in the repository
    after the name), or null when ``optional``; a malformed spec is refused here, before any work."""
    require_text(cfg, key, optional)
    try:
        check_spec(_value(cfg, key), file)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None


def require_int_list(cfg: Any, key: str, minimum: int | None = None, length: int | None = None) -> None:
    """``key`` is a list of integers >= ``minimum`` (exactly ``length`` of them when given)."""
    v = _value(cfg, key)
    items = list(v) if isinstance(v, list | tuple) or type(v).__name__ == "ListConfig" else None
    ok = items is not None and (length is None or len(items) == length) and all(
        isinstance(x, int) and not isinstance(x, bool) and (minimum is None or x >= minimum) for x in items)
    if not ok:
        what = f"a list of {length} integers" if length else "a list of integers"
        raise ConfigError(f"{key} must be {what}{f' >= {minimum}' if minimum is not None else ''}, got {v!r}")


def require_number_list(cfg: Any, key: str, low: float, high: float, length: int) -> None:
    """``key`` is a list of ``length`` numbers in [low, high)."""
    v = _value(cfg, key)
    items = list(v) if isinstance(v, list | tuple) or type(v).__name__ == "ListConfig" else None
    ok = items is not None and len(items) == length and all(
        isinstance(x, int | float) and not isinstance(x, bool) and low <= x < high for x in items)
    if not ok:
        raise ConfigError(f"{key} must be a list of {length} numbers in [{low}, {high}), got {v!r}")


def fields_of(obj: Any, prefix: str) -> dict[str, Any]:
    """A dataclass's values under their full keys (``prefix.name``), for the checks above."""
    return {f"{prefix}.{f.name}": getattr(obj, f.name) for f in dataclasses.fields(obj)}


def build_strict(cls: type[T], values: Any, prefix: str) -> T:
    """``cls(**values)`` refusing a key the dataclass does not have (named as ``prefix.key``) instead of a
    TypeError; ``values`` may be an OmegaConf node."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(values, resolve=True) if OmegaConf.is_config(values) else dict(values or {})
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix} must be a mapping of options, got {values!r}")
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; "
                          f"{prefix} takes: {', '.join(known)}")
    return cls(**d)
