"""Progress of loops longer than a few seconds: a tqdm bar on a terminal, plain lines in a log file.

Process 0 only. When stderr is a terminal, a tqdm bar (on stderr). When it is not (SLURM / nohup log files, where
tqdm's carriage-return redraws become one unreadable line), no bar: :class:`PlainProgress` prints one plain line
on stdout when the loop ends and one every ``PLAIN_INTERVAL_S`` seconds while it runs. The training loop prints
its own line per logging window instead (``loop._MetricsLog``) whenever stdout is not a terminal.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional

import jax
from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0  # seconds between the plain lines of a running loop


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # replaced by an object without isatty, or closed
        return False


def interactive() -> bool:
    """Whether progress bars are drawn: stderr (where tqdm writes) is a terminal."""
    return _isatty(sys.stderr)


def plain_lines() -> bool:
    """Whether plain progress lines are printed on stdout: stdout or stderr is not a terminal (process 0)."""
    return jax.process_index() == 0 and not (_isatty(sys.stdout) and interactive())


def stamp() -> str:
    """The wall-clock prefix of a plain line (``HH:MM:SS``)."""
    return time.strftime("%H:%M:%S")


class PlainProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` as plain lines on stdout: ``HH:MM:SS desc: n/total unit
    (t s, r unit/s)``, at most every ``interval`` seconds and once at ``close``."""

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it", initial: int = 0,
                 interval: Optional[float] = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self._initial = initial
        self._interval = PLAIN_INTERVAL_S if interval is None else interval
        self._start = self._last = time.perf_counter()
        self._postfix = ""
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self._interval:
            self._last = now
            self._print(now)

    def set_postfix(self, values: dict) -> None:
        self._postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print(time.perf_counter(), done=True)

    def _print(self, now: float, done: bool = False) -> None:
        seconds = now - self._start
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        rate = (self.n - self._initial) / seconds if seconds > 0 else 0.0
        tail = f", {self._postfix}" if self._postfix else ""
        word = "done" if done else "running"
        print(f"{stamp()} {self.desc}: {count} {self.unit} {word} ({seconds:.1f} s, {rate:.3g} {self.unit}/s{tail})",
              file=sys.stdout, flush=True)


def bar(total: Optional[int] = None, desc: str = "", unit: str = "it", initial: int = 0, plain: bool = True):
    """A progress object with tqdm's ``update(n)``, ``set_postfix(dict)`` and ``close()``: a tqdm bar when
    :func:`interactive`, else a :class:`PlainProgress` (``plain=False``: nothing; the caller prints its own
    lines), and a disabled one off process 0."""
    if jax.process_index() != 0 or not (interactive() or plain):
        return tqdm(total=total, disable=True)
    if interactive():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0)
    return PlainProgress(total, desc, unit, initial)


def track(iterable: Iterable, desc: str, total: Optional[int] = None, unit: str = "it") -> Iterator:
    """Yield the items of ``iterable`` while showing progress (``total`` defaults to ``len(iterable)`` if any)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    progress = bar(total, desc, unit)
    try:
        for item in iterable:
            yield item
            progress.update(1)
    finally:
        progress.close()
