"""The shared step loop: input → jitted step → metrics → checkpoints, with resume, preemption and a NaN guard.

Reliability contract (issue #8):

* **Preemption.** SIGTERM or Ctrl-C (or, in a multi-process run with JAX's preemption service, the preemption
  notice through ``multihost_utils.reached_preemption_sync_point`` / orbax) stops the loop at the next step
  boundary: a checkpoint of that step is written and waited for, then ``Preempted`` is raised (``main`` exits 0).
* **Exact resume.** The checkpoint holds the whole ``TrainState`` (params, optimizer state, codebook / EMA state,
  counters, step, RNG) and the data iterator's state; every random draw is keyed by (seed, step) or (seed, record),
  so a resumed run repeats the uninterrupted one bit for bit.
* **Non-finite guard.** The steps skip an update whose loss, gradient or updated parameters are not finite (state
  unchanged apart from the step and the ``bad_steps`` counter) and report ``nonfinite``; the loop fetches these
  flags once per logging window and before every checkpoint save (no host sync per step), counts them and
  after ``max_bad_steps`` consecutive ones raises ``NonFiniteError`` without writing another checkpoint. While a
  streak of skipped steps is open, periodic checkpoints are not written (only a preemption or final one), so the
  kept checkpoints are never pushed out by suspect ones.
* **Divergence.** A finite loss above ``divergence_factor`` × the running median of the last ``DIVERGENCE_WINDOW``
  step losses stops the run with ``DivergenceError`` before anything later is saved; the message names the newest
  checkpoint, written before the divergence.
* **Bad data.** Batches carry ``bad_records`` (records replaced because their image could not be decoded, see
  ``transforms.DecodedSource``); the loop counts them. Both counts are logged and survive restarts.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from beitv2_jax import progress, runtime
from beitv2_jax.train import checkpoint as ckpt_lib
from beitv2_jax.train import prefetch as prefetch_lib
from beitv2_jax.train import sharding
from beitv2_jax.train.metrics import MetricsWriter


class NonFiniteError(RuntimeError):
    """Raised after too many consecutive non-finite steps; the last good checkpoint is left intact."""


class DivergenceError(NonFiniteError):
    """Raised when the loss runs away (far above its running median); checkpoints before it are left intact."""


DIVERGENCE_WINDOW = 100  # step losses in the running median
DIVERGENCE_MIN_STEPS = 2  # finite step losses needed before the detector judges


class Preempted(Exception):
    """The run stopped on SIGTERM, Ctrl-C or a preemption notice after saving a checkpoint of ``step`` in
    ``directory``; ``reason`` starts the message ("preempted", "interrupted (Ctrl-C)")."""

    def __init__(self, step: int, directory: Optional[str], reason: str = "preempted"):
        saved = f"after saving its checkpoint in {directory}" if directory else "(no checkpoint manager: nothing saved)"
        super().__init__(f"{reason}: stopped at step {step} {saved}; run the same command again to resume")
        self.step = step


def resume(manager, state, iterator):
    """Restore the newest readable checkpoint into ``state`` and ``iterator``; returns the (restored) state."""
    restored = ckpt_lib.restore_latest(manager, state)
    if restored is None:
        return state
    state, data_state, step = restored
    iterator_state = data_state.get("iterator", data_state) if data_state else None
    if iterator_state:
        try:
            iterator.set_state(iterator_state)
        except (ValueError, KeyError) as e:
            raise ckpt_lib.CheckpointError(f"checkpoint step {step} in {manager.directory}: its data iterator "
                                           f"state cannot be restored ({e})") from e
    logging.info("resuming at step %d", step)
    return state


def poison_batch(batch: dict) -> dict:
    """The NaN injection hook (``config.inject_nan_steps``): every floating-point input becomes NaN, and so does
    every uint8 image (as float32 NaN, which ``data.on_device`` passes through)."""
    def poison(v):
        v = np.asarray(v)
        if v.dtype == np.uint8:
            return np.full(v.shape, np.nan, np.float32)
        return v * np.nan if np.issubdtype(v.dtype, np.floating) else v

    return {k: poison(v) for k, v in batch.items()}


class StopRequest:
    """SIGTERM or Ctrl-C (SIGINT) → stop at the next step boundary, at the same step on every process.

    With JAX's preemption service (``jax.distributed`` initialised), JAX's own SIGTERM notifier marks a common sync
    step that ``manager.reached_preemption`` (orbax → ``multihost_utils.reached_preemption_sync_point``) reports
    (SIGINT keeps Python's default there). Otherwise Python handlers for SIGTERM and SIGINT set a flag (OR-ed over
    processes when there are several); a second Ctrl-C raises ``KeyboardInterrupt`` at once (nothing saved).
    """

    SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}

    def __init__(self, manager=None):
        self._manager = manager
        self.received = False
        self.reason = "preempted"
        self._sync_point = jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
        self._previous = {}
        if not self._sync_point and threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGINT and self.received:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        self.received = True
        if signum == signal.SIGINT:
            self.reason = "interrupted (Ctrl-C)"
        logging.warning("%s received: a checkpoint is saved at the next step boundary, then the run stops%s",
                        self.SIGNALS[signum], " (Ctrl-C again: stop at once, nothing saved)"
                        if signum == signal.SIGINT else "")

    def at(self, step: int) -> bool:
        """Whether to stop after ``step``; every process must call this at every step."""
        if self._sync_point:
            if self._manager is not None:
                return self._manager.reached_preemption(step)
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() > 1:
            return bool(multihost_utils.process_allgather(np.int32(self.received)).max())
        return self.received

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class NonFiniteGuard:
    """Counts the steps whose update was skipped (``metrics['nonfinite']``) and watches the loss for divergence
    without a host sync per step: ``push`` keeps each step's device scalars and ``flush`` fetches all pending ones in
    one ``device_get``, every ``check_every`` steps (the loop's logging window) and before each checkpoint save; the
    update of a bad step is skipped on the device whatever the host knows. ``check`` raises ``NonFiniteError`` when
    ``max_bad_steps`` consecutive steps were bad and ``DivergenceError`` when a loss ran away (the first such step
    of the fetched ones, so a later good step cannot hide it)."""

    def __init__(self, max_bad_steps: int, streak: int = 0, total: int = 0, manager=None,
                 divergence_factor: float = 0.0, check_every: int = 1):
        self.max_bad_steps = max_bad_steps
        self.streak = streak
        self.total = total
        self.divergence_factor = divergence_factor
        self.check_every = max(1, int(check_every))
        self._manager = manager
        self._pending: list = []  # (step, nonfinite, loss) device scalars not fetched yet, in step order
        self._last_bad = None  # only a bad step seen by this process stops it (a resumed streak may go on)
        self._limit = None  # (streak, last bad step) when a streak first reached max_bad_steps
        self._losses: list = []  # the last DIVERGENCE_WINDOW finite step losses
        self._diverged = None  # (step, loss, median)

    def push(self, step: int, nonfinite, loss=None) -> None:
        """Record ``step``'s flag and loss (device scalars; ``nonfinite`` None when the task reports none); fetch and
        count the pending steps once ``check_every`` of them are waiting. A limit reached stays recorded until
        ``check`` (the loop calls it after writing each window's metrics and before each save)."""
        if nonfinite is not None:
            self._pending.append((step, nonfinite, loss))
        if len(self._pending) >= self.check_every:
            self.flush()

    def flush(self) -> None:
        """Count the pending steps now, one ``device_get`` for all (``check`` raises if one reached the limit or
        diverged)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        fetched = jax.device_get([(flag, loss) for _, flag, loss in pending])
        for (step, _, _), (flag, loss) in zip(pending, fetched):
            self._count(step, flag, loss)

    def _count(self, step: int, flag, loss) -> None:
        if float(flag) == 0.0:
            self.streak = 0
            self._watch_loss(step, loss)
            return
        self.streak += 1
        self.total += 1
        self._last_bad = step
        if self.streak >= self.max_bad_steps and self._limit is None:
            self._limit = (self.streak, step)
        logging.warning("step %d: non-finite loss, gradient or updated parameters, update skipped (%d in a row, "
                        "limit max_bad_steps=%d)", step, self.streak, self.max_bad_steps)

    def _watch_loss(self, step: int, loss) -> None:
        if loss is None or not self.divergence_factor or self._diverged is not None:
            return
        loss = float(loss)
        if len(self._losses) >= DIVERGENCE_MIN_STEPS:
            median = float(np.median(self._losses))
            if median > 0 and loss > self.divergence_factor * median:
                self._diverged = (step, loss, median)
                return
        self._losses = (self._losses + [loss])[-DIVERGENCE_WINDOW:]

    @property
    def suspect(self) -> bool:
        """Whether the newest state should not replace kept checkpoints (a streak of skipped steps is open)."""
        return self.streak > 0

    def check(self) -> None:
        """Raise ``DivergenceError`` after a runaway loss, ``NonFiniteError`` once the counted steps had
        ``max_bad_steps`` bad ones in a row."""
        latest = self._manager.latest_step() if self._manager is not None else None
        kept = (f"the newest checkpoint, step {latest} in {self._manager.directory}, was written before it" if latest
                is not None else "no checkpoint was written")
        if self._diverged is not None:
            step, loss, median = self._diverged
            raise DivergenceError(
                f"the loss diverged at step {step}: {loss:.4g} is more than config.divergence_factor="
                f"{self.divergence_factor:g} × the running median {median:.4g} of the previous step losses; the run "
                f"stopped and {kept} (lower config.optim.lr or raise config.divergence_factor)")
        if self._limit is None:
            return
        streak, last_bad = self._limit
        raise NonFiniteError(
            f"{streak} consecutive steps (up to step {last_bad}) had a non-finite loss, gradient or "
            f"updated parameters, reaching config.max_bad_steps={self.max_bad_steps}; the run stopped. Those updates "
            f"were skipped and no checkpoint was written during them: {kept} and holds the last good parameters")


class RunCounters:
    """The run's cumulative ``bad_records`` (over all processes) and ``nonfinite_steps``, saved with each
    checkpoint (``data['counters']``) so that they continue across restarts."""

    def __init__(self, saved: dict, guard: NonFiniteGuard):
        self._bad_records_before = int(saved.get("bad_records", 0))
        self._bad_records_here = 0
        self._guard = guard

    def add_batch(self, batch: dict) -> dict:
        """Count and drop the batch's ``bad_records`` flags; returns the batch for the step."""
        flags = batch.pop("bad_records", None)
        self._bad_records_here += 0 if flags is None else int(np.sum(flags))
        return batch

    def as_dict(self) -> dict:
        here = self._bad_records_here
        if jax.process_count() > 1:
            here = int(multihost_utils.process_allgather(np.int64(here)).sum())
        return {"bad_records": self._bad_records_before + here, "nonfinite_steps": self._guard.total}


def run(*, workdir: str, state, train_step: Callable, iterator: Iterator, mesh, total_steps: int,
        steps_per_epoch: int, batch_size: int, log_every: int = 50, checkpoint_every: int = 1000,
        max_bad_steps: int = 10, divergence_factor: float = 0.0, manager=None, writer: Optional[MetricsWriter] = None,
        epoch_end: Optional[Callable] = None, desc: str = "train", inject_nan_steps: Sequence[int] = (),
        profile: Sequence[int] = (), device_prefetch: int = 2):
    """Run ``train_step(state, batch) -> (state, metrics)`` from ``state.step`` to ``total_steps``.

    Metrics are averaged over each logging window and written with the cumulative ``bad_records`` and
    ``nonfinite_steps``. ``epoch_end(state, epoch)`` may return an updated state and writes its own metrics.
    Saves every ``checkpoint_every`` steps, at the end and on SIGTERM / Ctrl-C (then raises ``Preempted``); raises
    ``NonFiniteError`` after ``max_bad_steps`` consecutive non-finite steps and ``DivergenceError`` when a step loss
    exceeds ``divergence_factor`` × the running median (0 disables). The batches of the steps in
    ``inject_nan_steps`` (1-based, as logged) are poisoned with NaN to exercise the guard. ``profile`` =
    (first, last) traces those steps with ``jax.profiler`` into ``runtime.profile_dir(workdir)``.
    Each metrics row also has ``data_wait_s``, ``step_s``, ``goodput`` (and ``compile_s`` once), see ``_MetricsLog``.
    ``device_prefetch`` batches are read and placed on the mesh ahead of the step (``prefetch.DevicePrefetch``; the
    checkpointed iterator state is that of the consumed batches).
    """
    own_writer = writer is None
    writer = writer or MetricsWriter(workdir)
    start = int(jax.device_get(state.step))
    streak = int(jax.device_get(state.extra["bad_steps"])) if "bad_steps" in state.extra else 0
    saved = ckpt_lib.restore_data(manager, start).get("counters", {}) if manager is not None else {}
    guard = NonFiniteGuard(max_bad_steps, streak, int(saved.get("nonfinite_steps", 0)), manager, divergence_factor,
                           check_every=log_every)
    counters = RunCounters(saved, guard)
    stop = StopRequest(manager)
    log = _MetricsLog(writer, start, total_steps, batch_size, desc)
    profiler = runtime.ProfileWindow(profile, runtime.profile_dir(workdir))

    def place(batch: dict, index: int) -> dict:  # host batch of step start+index+1 → global arrays (+ host flags)
        flags = batch.pop("bad_records", None)
        batch = sharding.to_global_batch(poison_batch(batch) if start + index + 1 in inject_nan_steps else batch, mesh)
        return batch if flags is None else {**batch, "bad_records": flags}

    feed = prefetch_lib.DevicePrefetch(iterator, place, device_prefetch, limit=total_steps - start)
    try:
        for step in range(start, total_steps):
            done = step + 1
            profiler.before(done)
            with log.timed("data"):
                batch = counters.add_batch(next(feed))
            with log.timed("compile" if step == start else None):  # the first call traces and compiles
                state, metrics = train_step(state, batch)
            with log.timed("other"):
                profiler.after(done, (state, metrics))
            guard.push(done, metrics.get("nonfinite"), metrics.get("loss"))
            log.add(metrics)
            if done % log_every == 0 or done == total_steps:
                guard.flush()
                log.write(done, counters.as_dict())
                guard.check()
            if epoch_end is not None and done % steps_per_epoch == 0:
                with log.timed("other"):
                    state = epoch_end(state, done // steps_per_epoch) or state
            stopping = stop.at(done)
            required = stopping or done == total_steps
            if manager is not None and (required or done % checkpoint_every == 0):
                guard.flush()
                guard.check()  # a step that reaches max_bad_steps or diverged is not saved
            if manager is not None and (required or (done % checkpoint_every == 0 and not guard.suspect)):
                data = {"iterator": feed.get_state(), "counters": counters.as_dict()}  # consumed, not queued
                with log.timed("other"):
                    ckpt_lib.save(manager, done, state, data, required=required)
            if stopping:
                raise Preempted(done, str(manager.directory) if manager is not None else None, stop.reason)
        guard.flush()
        guard.check()
    finally:
        feed.close()
        stop.close()
        profiler.close()
        log.close()
        if manager is not None:
            ckpt_lib.wait(manager)
        if own_writer:
            writer.close()
    return state


def window_line(desc: str, step: int, total_steps: int, row: dict) -> str:
    """The plain log line of one logging window: ``HH:MM:SS desc step n/total loss=… lr=… key=value ...`` (the
    metrics row: ``loss`` and ``lr`` first, then its order; whole numbers without decimals)."""
    keys = [k for k in ("loss", "lr") if k in row] + [k for k in row if k not in ("loss", "lr")]
    values = " ".join(f"{k}={int(row[k])}" if float(row[k]).is_integer() and abs(row[k]) < 1e15
                      else f"{k}={row[k]:.4g}" for k in keys)
    return f"{progress.stamp()} {desc} step {step}/{total_steps} {values}"


class _MetricsLog:
    """Window means of the step metrics → ``writer``, with throughput, the step-time breakdown and progress: a tqdm
    bar when stderr is a terminal, one plain line per window (:func:`window_line`, stdout) when stdout or stderr is
    not (``progress``).

    The loop runs ahead of the device within a logging window (``NonFiniteGuard`` fetches its flags once per window)
    and each row is written after fetching the window's metrics, so a window's wall time covers its steps' device
    work.
    Per row (seconds are means per step of the window):

    * ``data_wait_s`` — host time blocked on input: ``next(iterator)`` plus placing the batch on the devices. The
      device keeps working on the previous step meanwhile, so this bounds from above the device's idle time caused
      by input; near 0 means the input keeps ahead, close to ``step_s + data_wait_s`` means the run is input-bound.
    * ``step_s`` — the rest of the window: dispatch, device compute, metric fetches; without the first step's
      compilation, checkpoint saves, ``epoch_end`` evaluations and profiler output (reported in neither field).
    * ``compile_s`` — (first row of a ``loop.run`` only) the first step's call: tracing, lowering, XLA compilation
      or a persistent-cache load.
    * ``goodput`` — ``runtime.CLOCK``: all training-step seconds so far / wall seconds since the run started.
    """

    def __init__(self, writer: MetricsWriter, start: int, total_steps: int, batch_size: int, desc: str):
        self._writer, self._batch_size = writer, batch_size
        self._window: list = []
        runtime.CLOCK.begin()
        self._tick, self._tick_step = time.perf_counter(), start
        self._spent = {"data": 0.0, "compile": 0.0, "other": 0.0}
        self._compile_s: Optional[float] = None
        self._desc, self._total = desc, total_steps
        self._pbar = progress.bar(total_steps, desc, unit="step", initial=start, plain=False)
        self._plain = progress.plain_lines()  # one line per window instead of the bar's redraws

    @contextlib.contextmanager
    def timed(self, kind: Optional[str]):
        """Count the block's wall time as ``kind`` ("data", "compile", "other"; None: part of the step)."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            if kind is not None:
                self._spent[kind] += time.perf_counter() - begin
                if kind == "compile":
                    self._compile_s = self._spent["compile"]

    def add(self, metrics: dict) -> None:
        self._window.append(metrics)
        self._pbar.update(1)

    def write(self, step: int, extra: dict) -> None:
        host = jax.device_get(self._window)
        mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        now = time.perf_counter()
        steps = max(step - self._tick_step, 1)
        train_s = (now - self._tick) - sum(self._spent.values())
        runtime.CLOCK.add_training(train_s)
        mean.update(extra, img_per_sec=(step - self._tick_step) * self._batch_size / max(now - self._tick, 1e-9),
                    data_wait_s=self._spent["data"] / steps, step_s=max(train_s, 0.0) / steps,
                    goodput=runtime.CLOCK.goodput())
        if self._compile_s is not None:
            mean["compile_s"], self._compile_s = self._compile_s, None
        self._writer.write_scalars(step, mean)
        self._pbar.set_postfix({k: f"{mean[k]:.4g}" for k in ("loss", "img_per_sec") if k in mean})
        if self._plain:
            print(window_line(self._desc, step, self._total, mean), flush=True)
        self._window, self._tick, self._tick_step = [], now, step
        self._spent = dict.fromkeys(self._spent, 0.0)

    def close(self) -> None:
        self._pbar.close()
