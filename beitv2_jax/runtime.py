"""Operations around a run: the persistent XLA compilation cache, compile-time accounting, the profiler window of
``config.profile`` and the goodput clock that ``train/loop.py`` reports from.

Definitions (what ``metrics.jsonl`` calls them, see docs/scaling.md "Operations"):

* ``compile_s`` — seconds this process spent in XLA compilation or in loading a compiled program from the persistent
  cache (``jax.monitoring``'s backend-compile event; tracing and lowering to StableHLO are not included).
* ``goodput`` — training-step seconds (the loop's windows minus their input waits, compilation, checkpoints,
  evaluations and profiler output) divided by the wall seconds since the run started (``beitv2_jax.main`` began,
  or the first ``loop.run`` of the process): start-up, restore, compilation, data waits and checkpoints lower it.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Optional, Sequence

import jax
from absl import logging

from beitv2_jax import storage

CACHE_DIRNAME = "jax_compilation_cache"
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # compile, or load from the persistent cache
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"


def _parent(workdir: str) -> str:
    """The folder that holds ``workdir`` (a local path or a ``scheme://bucket/...`` URI; a bucket is its own)."""
    if storage.is_remote(workdir):
        scheme, rest = workdir.split("://", 1)
        parts = rest.rstrip("/").split("/")
        return f"{scheme}://{'/'.join(parts[:-1]) if len(parts) > 1 else parts[0]}"
    return os.path.dirname(os.path.abspath(workdir.rstrip("/") or "/"))


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def compilation_cache_dir(setting: str, workdir: str, home: Optional[str] = None) -> Optional[str]:
    """Where ``config.compilation_cache_dir`` puts the cache: None for ""; the directory itself unless "auto";
    for "auto" ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``<workdir's parent>/jax_compilation_cache`` (a gs:// parent
    too, so a recreated Spot slice finds it), else ``$HOME/.cache/beitv2_jax/jax_compilation_cache`` when the parent
    folder is not writable."""
    if not setting:
        return None
    if setting != "auto":
        return setting
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    candidate = f"{_parent(workdir).rstrip('/')}/{CACHE_DIRNAME}"
    if storage.is_remote(candidate) or _writable_dir(candidate):
        return candidate
    return os.path.join(home or os.path.expanduser("~"), ".cache", "beitv2_jax", CACHE_DIRNAME)


def setup_compilation_cache(setting: str, workdir: str) -> Optional[str]:
    """Turn on JAX's persistent compilation cache (before the first compilation) for every program, however fast
    its compilation or small its executable (the defaults skip programs compiled in under 1 s: all of a small CPU
    run). Returns the directory (None: off); an unusable local directory raises ``OSError``."""
    directory = compilation_cache_dir(setting, workdir)
    if directory is None:
        return None
    if not storage.is_remote(directory):
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise OSError(f"compilation cache directory {directory} is not writable")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)  # any size (0 keeps filesystem overrides)
    logging.info("persistent compilation cache: %s", directory)
    return directory


class CompileStats:
    """Seconds in XLA compilation or persistent-cache loads and the cache's hits and misses, from ``jax.monitoring``
    (listeners registered once per process by ``track()``)."""

    def __init__(self):
        self.compile_s = 0.0
        self.programs = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self._lock = threading.Lock()
        self._registered = False

    def track(self) -> "CompileStats":
        if not self._registered:
            jax.monitoring.register_event_duration_secs_listener(self._on_duration)
            jax.monitoring.register_event_listener(self._on_event)
            self._registered = True
        return self

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.compile_s += duration
                self.programs += 1

    def _on_event(self, event: str, **kwargs) -> None:
        with self._lock:
            if event == CACHE_HIT_EVENT:
                self.cache_hits += 1
            elif event == CACHE_MISS_EVENT:
                self.cache_misses += 1

    def summary(self) -> str:
        return (f"{self.compile_s:.1f} s in XLA compilation or compilation-cache loads for {self.programs} programs "
                f"({self.cache_hits} cache hits, {self.cache_misses} misses)")


COMPILE_STATS = CompileStats()


class RunClock:
    """Wall time since the run started and the training-step seconds of all ``loop.run`` calls of the process."""

    def __init__(self):
        self.start: Optional[float] = None
        self.train_s = 0.0

    def begin(self) -> None:
        """Start the clock (only the first call counts)."""
        if self.start is None:
            self.start = time.perf_counter()

    def add_training(self, seconds: float) -> None:
        self.train_s += max(seconds, 0.0)

    def goodput(self) -> float:
        """Training-step seconds / wall seconds since ``begin`` (0 before any)."""
        if self.start is None:
            return 0.0
        return self.train_s / max(time.perf_counter() - self.start, 1e-9)


CLOCK = RunClock()


def profile_dir(workdir: str) -> str:
    """``<workdir>/profile``, with a ``process_<i>`` folder per process when there are several (several processes on
    one host would otherwise write the same ``<host>.xplane.pb``); TensorBoard shows each as a run."""
    base = os.path.join(workdir, "profile")
    return os.path.join(base, f"process_{jax.process_index()}") if jax.process_count() > 1 else base


class ProfileWindow:
    """``jax.profiler`` trace of the steps ``first..last`` (1-based, as logged) into ``directory``.

    ``before(step)`` starts the trace before the step's input is fetched (so input waits are in it); ``after(step,
    outputs)`` waits for the step's outputs and stops it after ``last``; ``close()`` stops an unfinished trace (a
    preempted run, or fewer steps than ``last``). A resumed run that starts inside the window traces the rest.
    The trace is ``directory/plugins/profile/<time>/<host>.xplane.pb`` (TensorBoard's profile plugin / XProf) and
    ``<host>.trace.json.gz`` (Perfetto). Every process traces its own devices (see ``profile_dir``).
    """

    def __init__(self, steps: Sequence[int], directory: str):
        steps = tuple(steps or ())
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.directory = directory
        self.active = False
        self.traced: list[int] = []

    def before(self, step: int) -> None:
        if not self.active and not self.traced and self.first <= step <= self.last:
            if not storage.is_remote(self.directory):
                os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory)
            self.active = True
        if self.active:
            self.traced.append(step)

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            self._stop()

    def close(self) -> None:
        if self.active:
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.active = False
        logging.info("profiler trace of steps %d-%d written to %s", self.traced[0], self.traced[-1], self.directory)
