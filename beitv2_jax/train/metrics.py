"""Metrics to TensorBoard (tensorboardX) and ``metrics.jsonl`` in the workdir, on process 0 only.

``metrics.jsonl`` holds whole lines only: a row is written with one call and flushed, a write that fails (disk
full, ...) is reported as one error line and cut back to the last whole row, and a torn last line left by a killed
process is removed when the file is opened again. Metrics are never a reason to stop training.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import numpy as np
from absl import logging


def repair_jsonl_tail(path: str) -> int:
    """Cut a torn last line (no final newline) from ``path``; returns the number of bytes removed."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        block = 1 << 16
        end = size
        while end > 0:  # find the last newline, reading backwards
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        f.truncate(keep)
    return size - keep


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


class MetricsWriter:
    """``write_scalars(step, {name: value})``, ``write_image(step, name, uint8 [H, W, 3])``; no-op off process 0."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl = None
        self._failed = False
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._tb_failed = False
            _guard_event_file(self._tb, self._report_tensorboard_failure)
            path = os.path.join(workdir, "metrics.jsonl")
            removed = repair_jsonl_tail(path)
            if removed:
                logging.warning("removed a torn last line (%d bytes) from %s (an earlier run was interrupted while "
                                "writing it)", removed, path)
            self._jsonl = open(path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        line = json.dumps({"step": int(step), **clean}) + "\n"
        good = self._jsonl.tell()
        try:
            self._jsonl.write(line)
            self._jsonl.flush()
        except OSError as e:
            self._drop_partial_row(good, step, e)
        else:
            self._failed = False

    def _drop_partial_row(self, good: int, step: int, error: OSError) -> None:
        """Cut the file back to ``good`` bytes (the last whole row); report the failure once per streak."""
        if not self._failed:
            logging.error("metrics row of step %d not written to %s (%s); training goes on, rows are written again "
                          "once the disk accepts them", step, self._jsonl.name, error)
        self._failed = True
        path = self._jsonl.name
        try:
            self._jsonl.close()
        except OSError:
            pass  # the buffered partial row could not be flushed either: it is cut below
        try:
            with open(path, "rb+") as f:
                f.truncate(good)
        except OSError:
            pass  # repaired when the file is opened next (repair_jsonl_tail)
        self._jsonl = open(path, "a", encoding="utf-8")

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
                logging.error("closing %s failed (%s)", self._jsonl.name, e)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
