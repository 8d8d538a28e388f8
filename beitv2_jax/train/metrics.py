"""Metrics to TensorBoard (tensorboardX) and ``metrics.jsonl`` in the workdir, on process 0 only."""
from __future__ import annotations

import io
import json
from typing import Mapping

import jax
import numpy as np

from beitv2_jax import storage


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
        if self.enabled:
            storage.makedirs(workdir)
            from tensorboardX import SummaryWriter, record_writer

            if storage.is_remote(workdir):
                record_writer.register_writer_factory(workdir.split("://")[0], _ObjectEventFiles())

            self._tb = SummaryWriter(storage.join(workdir, "tensorboard"))
            self._jsonl = storage.AppendLog(storage.join(workdir, "metrics.jsonl"))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.enabled:
            self._tb.add_image(name, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
