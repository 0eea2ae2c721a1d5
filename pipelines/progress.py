"""The one progress display of the project: a tqdm bar on a terminal, a few plain lines in a log.

A bar repainted on every step fills a log file or a CI log with carriage returns (a 2,000-step demo log was
mostly repaints). So when stdout is not a terminal, progress is one line every ~30 s or 10% of the total,
whichever comes first (at most one per 2 s): done/total, rate, ETA and the last ``loss`` set on it.

    with progress_bar(len(files), "check samples", unit="img") as bar:
        for f in bar.iter(files):
            ...

Leaving the ``with`` block closes the bar (its line ended) even when an error propagates, so an entry point's
``error: ...`` line starts on a line of its own.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
LINE_SECONDS = 30.0  # quiet mode: at most this long between two lines
LINE_FRACTION = 0.1  # ... and a line each time this fraction of the total is done,
LINE_MIN_SECONDS = 2.0  # ... but not more often than this (a pass of a few seconds prints its summary only)


def interactive() -> bool:
    """Whether stdout is a terminal (bars are repainted in place there)."""
    return sys.stdout.isatty()


def write(message: str) -> None:
    """Print a line without breaking an open bar (``tqdm.write`` puts it above the bar)."""
    tqdm.write(message)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineProgress:
    """Quiet mode: the same calls as the tqdm bar (``update``, ``set_postfix``, ``close``), printed as lines."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, leave: bool = True) -> None:
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.n = self.start_n = self.shown_n = initial
        self.t0 = self.shown_t = time.monotonic()
        self.postfix: dict[str, Any] = {}

    def set_postfix(self, **values: Any) -> None:
        self.postfix |= values

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        step = self.total * LINE_FRACTION if self.total else float("inf")
        since = now - self.shown_t
        if since >= LINE_SECONDS or (self.n - self.shown_n >= step and since >= LINE_MIN_SECONDS):
            self._show(now)

    def _show(self, now: float) -> None:
        self.shown_n, self.shown_t = self.n, now
        elapsed = now - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}/{self.total if self.total else '?'} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n // self.total}%)"  # 299/300 is not 100% yet
        parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/{self.unit}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        else:
            parts.append(f"took {_duration(elapsed)}")
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.postfix.items()]
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        """A last line for a kept bar whose final count was not shown yet."""
        if self.leave and self.n != self.shown_n:
            self._show(time.monotonic())


class Bar:
    """What ``progress_bar`` yields: ``update(n)``, ``set(loss=...)``, and ``iter(iterable)`` to count items."""

    def __init__(self, impl: Any) -> None:
        self._impl = impl

    def update(self, n: int = 1) -> None:
        self._impl.update(n)

    def set(self, **values: Any) -> None:
        """Values shown after the counts (e.g. the latest loss)."""
        self._impl.set_postfix(**values)

    def iter(self, iterable: Iterable[T]) -> Iterator[T]:
        for item in iterable:
            yield item
            self._impl.update(1)


@contextmanager
def progress_bar(total: int | None, desc: str, *, unit: str = "it", initial: int = 0, enabled: bool = True,
                 leave: bool = True) -> Iterator[Bar]:
    """A progress display for ``total`` units, closed on leaving the block (also on an error).

    ``enabled=False`` (other processes than the main one) shows nothing; ``leave=False`` is for passes inside a
    larger job: the bar is cleared when done, and in quiet mode no final line is printed.
    """
    if not enabled:
        impl: Any = tqdm(total=total, disable=True)
    elif interactive():
        impl = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)
    else:
        impl = LineProgress(total, desc, unit, initial, leave)
    try:
        yield Bar(impl)
    finally:
        impl.close()
