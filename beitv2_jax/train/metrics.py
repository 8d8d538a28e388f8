"""Metrics to TensorBoard (tensorboardX) and ``metrics.jsonl`` in the workdir, on process 0 only.

TensorBoard tags sit in five namespaces: ``train/`` (step metrics, throughput), ``eval/`` (evaluations),
``data/`` (input pipeline: ``data/wait_s``, ``data/bad_records``), ``images/`` and ``text/`` (``text/config``: the
run's ``config.json``, also as hparams). ``metrics.jsonl`` keeps the keys as the tasks name them (``loss``,
``data_wait_s``, ``eval/top1``); :func:`scalar_tag` maps them to tags.

``metrics.jsonl`` holds whole lines only (``storage.AppendLog``): a row that cannot be written (disk full, ...) is
cut back and reported in one error line, a torn last line left by a killed process is removed when the file is
opened again. TensorBoard's writer thread survives the same failures. Metrics are never a reason to stop training.
"""
from __future__ import annotations

import io
import json
import struct
from typing import Iterator, Mapping

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


SCALAR_NAMESPACES = ("train", "eval", "data")


def scalar_tag(name: str) -> str:
    """The TensorBoard tag of a metrics key: ``train/…``, ``eval/…``, ``data/…`` as they are; the input
    pipeline's bare keys ``data_<x>`` → ``data/<x>`` and ``bad_records`` → ``data/bad_records``; any other key →
    ``train/<key>``."""
    if name.split("/", 1)[0] in SCALAR_NAMESPACES and "/" in name:
        return name
    if name.startswith("data_"):
        return "data/" + name[len("data_"):]
    if name == "bad_records":
        return "data/bad_records"
    return f"train/{name}"


def _namespaced(namespace: str, name: str) -> str:
    return name if name.startswith(namespace + "/") else f"{namespace}/{name}"


def flat_config(config: Mapping, prefix: str = "") -> dict:
    """A nested config (``config.json``) as ``{"a.b.c": number | str | bool}`` (lists and None as JSON text)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def preformatted(text: str) -> str:
    """``text`` as a Markdown code block (TensorBoard's text tab renders Markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


class MetricsWriter:
    """``write_scalars(step, {name: value})``, ``write_image(step, name, uint8 [H, W, 3])``, ``write_text(step,
    name, markdown)``; no-op off process 0. With its first record the writer also puts the workdir's
    ``config.json`` (written by the task before training) into TensorBoard: ``text/config`` and hparams."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl = None
        self._failed = False
        self._workdir = workdir
        self._config_written = False
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
        self._write_config(step)
        for k, v in clean.items():
            self._tb.add_scalar(scalar_tag(k), v, step)
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
        """``image`` uint8 ``[H, W, 3]`` under ``images/<name>``."""
        if self.enabled:
            self._write_config(step)
            self._tb.add_image(_namespaced("images", name), np.asarray(image), step, dataformats="HWC")

    def write_text(self, step: int, name: str, markdown: str) -> None:
        """Markdown (see :func:`preformatted`) under ``text/<name>``."""
        if self.enabled:
            self._write_config(step)
            self._tb.add_text(_namespaced("text", name), markdown, step)

    def _write_config(self, step: int) -> None:
        """``<workdir>/config.json`` → ``text/config`` and the hparams of this run, once per writer."""
        if self._config_written:
            return
        self._config_written = True
        path = storage.join(self._workdir, "config.json")
        try:
            config = json.loads(storage.read_text(path)) if storage.exists(path) else None
        except (OSError, ValueError) as e:
            logging.warning("config.json not put into TensorBoard (%s)", e)
            return
        if not isinstance(config, dict):
            return
        from tensorboardX.summary import hparams

        self._tb.add_text("text/config", preformatted(json.dumps(config, indent=2, sort_keys=True)), step)
        experiment, session_start, _ = hparams(flat_config(config), {})
        writer = self._tb._get_file_writer()
        writer.add_summary(experiment, step)
        writer.add_summary(session_start, step)

    def close(self) -> None:
        if self.enabled:
            self._tb.close()  # write failures are reported by _guard_event_file
            try:
                self._jsonl.close()
            except OSError as e:
                logging.error("closing %s failed (%s)", self._jsonl.path, e)


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def _records(data: bytes) -> Iterator[bytes]:
    """The records of a TFRecord (event) file: length u64, its crc u32, data, data crc u32 (crcs not checked)."""
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        start = offset + 12
        if start + length + 4 > len(data):  # a torn last record
            return
        yield data[start:start + length]
        offset = start + length + 4


def read_events(logdir: str) -> list:
    """Every summary value in the event files under ``logdir`` (sorted by file name), as ``(step, tag, kind,
    value)``: kind ``scalar`` (float), ``image`` (PNG bytes), ``text`` (str) or the plugin's name (its serialized
    content). Reads tensorboardX's protos: no TensorBoard needed (e.g. to list the tags of a run)."""
    from tensorboardX.proto import event_pb2

    out = []
    for name in sorted(n for n in storage.listdir(logdir) if ".tfevents." in n):
        with storage.open(storage.join(logdir, name), "rb") as f:
            data = f.read()
        for record in _records(data):
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                plugin = v.metadata.plugin_data.plugin_name
                if v.HasField("simple_value"):
                    out.append((event.step, v.tag, "scalar", float(v.simple_value)))
                elif v.HasField("image"):
                    out.append((event.step, v.tag, "image", v.image.encoded_image_string))
                elif plugin == "text":
                    out.append((event.step, v.tag, "text", v.tensor.string_val[0].decode("utf-8")))
                else:
                    out.append((event.step, v.tag, plugin, v.metadata.plugin_data.content))
    return out
