"""Metrics to TensorBoard (tensorboardX) and ``metrics.jsonl`` in the workdir, on process 0 only.

``metrics.jsonl`` holds whole lines only (``storage.AppendLog``): a row that cannot be written (disk full, ...) is
cut back and reported in one error line, a torn last line left by a killed process is removed when the file is
opened again. TensorBoard's writer thread survives the same failures. Metrics are never a reason to stop training.
"""
from __future__ import annotations

import io
import json
from typing import Mapping

import jax
import numpy as np
from absl import logging

from beitv2_jax import storage


def _guard_event_file(summary_writer, report) -> None:
    """Make tensorboardX's background writer survive ``OSError`` (disk full): the event is dropped and ``report``
    called, instead of the writer thread dying and later ``add_scalar`` calls blocking on its full queue forever."""
    events = getattr(getattr(summary_writer._get_file_writer(), "event_writer", None), "_ev_writer", None)
    if events is None:  # another tensorboardX layout: leave it as it is
        return

    def guarded(method):
        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except (OSError, ValueError) as e:  # ValueError: the file was closed by an earlier failed close
                report(e)
                return None
        return call

    for name in ("write_event", "flush", "close"):
        setattr(events, name, guarded(getattr(events, name)))



class _ObjectEventFile:
    """A tensorboardX event file at a URI: object stores cannot append, so the whole file is kept and uploaded
    again (through :mod:`beitv2_jax.storage`) on each flush that has something new, and once more on close."""

    def __init__(self, path: str):
        self.path, self._buffer, self._dirty = path, io.BytesIO(), False

    def write(self, data: bytes) -> None:
        self._buffer.write(data)
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            with storage.open(self.path, "wb") as f:
                f.write(self._buffer.getvalue())
            self._dirty = False

    def close(self) -> None:
        self.flush()


class _ObjectEventFiles:
    """tensorboardX record-writer factory for a URI scheme (replaces its own ``gs`` writer, which talks to
    google-cloud-storage directly and uploads again from ``__del__`` after ``close``)."""

    def open(self, path: str) -> _ObjectEventFile:
        return _ObjectEventFile(path)

    def directory_check(self, path: str) -> None:
        del path  # object stores have no directories to create


class MetricsWriter:
    """``write_scalars(step, {name: value})``, ``write_image(step, name, uint8 [H, W, 3])``; no-op off process 0."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl = None
        self._failed = False
        if self.enabled:
            storage.makedirs(workdir)
            from tensorboardX import SummaryWriter, record_writer

            if storage.is_remote(workdir):
                record_writer.register_writer_factory(workdir.split("://")[0], _ObjectEventFiles())

            self._tb = SummaryWriter(storage.join(workdir, "tensorboard"))
            self._jsonl = storage.AppendLog(storage.join(workdir, "metrics.jsonl"))
            self._tb_failed = False
            _guard_event_file(self._tb, self._report_tensorboard_failure)
            if self._jsonl.repaired:
                logging.warning("removed a torn last line (%d bytes) from %s (an earlier run was interrupted while "
                                "writing it)", self._jsonl.repaired, self._jsonl.path)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        try:
            self._jsonl.append(json.dumps({"step": int(step), **clean}) + "\n")
        except OSError as e:  # nothing partial is left (storage.AppendLog); reported once per streak of failures
            if not self._failed:
                logging.error("metrics row of step %d not written to %s (%s); training goes on, rows are written "
                              "again once the disk accepts them", step, self._jsonl.path, e)
            self._failed = True
        else:
            self._failed = False

    def _report_tensorboard_failure(self, error: OSError) -> None:
        if not self._tb_failed:
            logging.error("TensorBoard events not written (%s); training goes on", error)
        self._tb_failed = True

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.enabled:
            self._tb.add_image(name, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._tb.close()  # write failures are reported by _guard_event_file
            try:
                self._jsonl.close()
            except OSError as e:
                logging.error("closing %s failed (%s)", self._jsonl.path, e)


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
