"""One place for paths: local files or cloud URIs (``gs://bucket/...``; any scheme ``etils.epath`` knows).

Every file the project reads or writes goes through these helpers. Local paths behave exactly as with ``os`` /
``open`` / ``shutil`` (atomic ``os.replace`` for JSON files and directories); URIs go through ``etils.epath``,
which without TensorFlow uses fsspec (``gcsfs`` for ``gs://``). Orbax writes its arrays to the same URIs with
tensorstore's own GCS driver and tfds/array_record read ``gs://`` array_record shards with array_record's GCS
reader; tensorboardX's event files go through here too (``train/metrics.py``), so one ``gs://`` workdir holds
everything.

Object stores have no atomic rename and no append. For URIs: a single object (a JSON file, a PNG) is written in
one upload, which is atomic on GCS; :class:`AppendLog` rewrites its object on each flush; directories are
"committed" by a marker file written last (orbax's ``commit_success.txt``, the model directory's ``model.json``).
"""
from __future__ import annotations

import builtins
import contextlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from typing import Any, Iterator

import fsspec
from etils import epath

# gcsfs caches directory listings for the life of the process, but tensorstore (orbax's array writer) and other
# processes write to the same prefixes behind its back: list afresh every time (unless configured otherwise).
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def is_remote(path: str | os.PathLike) -> bool:
    """``True`` for a URI such as ``gs://bucket/dir`` (anything with a ``scheme://``)."""
    return "://" in os.fspath(path)


def abspath(path: str | os.PathLike) -> str:
    """``os.path.abspath`` for a local path; a URI unchanged."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def dirname(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def basename(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def exists(path: str | os.PathLike) -> bool:
    return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
    return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str | os.PathLike) -> bool:
    return epath.Path(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path: str | os.PathLike) -> list:
    """Entry names (not paths) in ``path``."""
    if is_remote(path):
        return [p.name for p in epath.Path(path).iterdir()]
    return os.listdir(path)


def makedirs(path: str | os.PathLike) -> None:
    """Create ``path`` and its parents (existing is fine; object stores have no real directories)."""
    if is_remote(path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def open(path: str | os.PathLike, mode: str = "r", encoding: str | None = None):  # noqa: A001 - the file API
    """``open`` for local paths, ``epath.Path(path).open`` for URIs (modes r/w/rb/wb; no append on URIs)."""
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    if is_remote(path):
        return epath.Path(path).open(mode, encoding=encoding) if "b" not in mode else epath.Path(path).open(mode)
    return builtins.open(path, mode, encoding=encoding)


def read_text(path: str | os.PathLike) -> str:
    with open(path, "r") as f:
        return f.read()


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "r") as f:
        return json.load(f)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` so that readers see the old or the new content, never a part: a temporary sibling and
    ``os.replace`` locally, one upload (atomic per object) for URIs."""
    if is_remote(path):
        with open(path, "w") as f:
            f.write(text)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, value: Any, **dump_kwargs) -> None:
    """``json.dump(value, **dump_kwargs)`` to ``path`` atomically (see :func:`write_text`)."""
    write_text(path, json.dumps(value, **dump_kwargs))


def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move ``src`` (a file or a directory) to ``dst``: ``os.rename`` locally (atomic); for URIs a copy then a
    delete of every object (not atomic: callers commit with a marker file instead)."""
    if is_remote(src):
        epath.Path(src).rename(dst)
    else:
        os.rename(src, dst)


def rmtree(path: str | os.PathLike, ignore_errors: bool = False) -> None:
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)
        return
    try:
        epath.Path(path).rmtree()
    except OSError:
        if not ignore_errors:
            raise


def save_image(image, path: str | os.PathLike) -> None:
    """A PIL image as PNG at ``path`` (local or URI)."""
    if is_remote(path):
        with open(path, "wb") as f:
            image.save(f, format="PNG")
    else:
        image.save(path)


def upload_tree(local_dir: str, uri: str) -> None:
    """Copy the files under ``local_dir`` to ``uri`` (same relative names). Files named ``dataset_info.json``,
    ``model.json`` or ``commit_success.txt`` (the "complete" markers of tfds, model directories and orbax) go last,
    so an interrupted upload is never taken for a complete one."""
    files = sorted(os.path.relpath(os.path.join(root, f), local_dir)
                   for root, _, names in os.walk(local_dir) for f in names)
    markers = {"dataset_info.json", "model.json", "commit_success.txt"}
    for rel in sorted(files, key=lambda r: os.path.basename(r) in markers):
        target = epath.Path(uri) / rel.replace(os.sep, "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with builtins.open(os.path.join(local_dir, rel), "rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)


@contextlib.contextmanager
def local_file(path: str | os.PathLike) -> Iterator[str]:
    """A local path holding the file ``path``: itself, or a temporary download of a URI (for libraries that
    only read local files, such as ``torch.load`` / ``safetensors``)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="beitv2_jax_") as tmp:
        local = os.path.join(tmp, basename(path))
        with open(path, "rb") as src, builtins.open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
        yield local


@contextlib.contextmanager
def local_output(path: str | os.PathLike) -> Iterator[str]:
    """A local path to write the file ``path`` to: itself, or a temporary file uploaded to the URI on success."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="beitv2_jax_") as tmp:
        local = os.path.join(tmp, basename(path))
        yield local
        with builtins.open(local, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)


def _cut_torn_tail(path: str) -> int:
    """Cut a torn last line (no final newline) from the local file ``path``; returns the bytes removed."""
    if not os.path.exists(path):
        return 0
    with builtins.open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        end, keep = size, 0
        while end > 0:  # the last newline, reading backwards in blocks
            start = max(0, end - (1 << 16))
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        f.truncate(keep)
    return size - keep


class AppendLog:
    """A text file that grows by whole lines (``metrics.jsonl``): :meth:`append` adds one line and makes it durable.

    Locally an ``open(path, 'a')``: a torn last line left by a killed process is cut when the log is opened
    (``repaired`` = the bytes removed), and a line whose write fails (disk full) is cut back before the error is
    raised, so no later line is ever glued to a partial one. Object stores cannot append, so for a URI the existing
    object is read once and the whole text is uploaded again on each :meth:`append` (one object write: never torn;
    a failed upload keeps the lines in memory for the next one).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._remote = is_remote(self.path)
        self.repaired = 0
        if self._remote:
            self._lines = [read_text(self.path)] if exists(self.path) else []
        else:
            self.repaired = _cut_torn_tail(self.path)
            self._file = builtins.open(self.path, "a", encoding="utf-8")

    def append(self, line: str) -> None:
        """Add ``line`` (ending in a newline) and flush it; raises ``OSError`` with nothing partial left behind."""
        if self._remote:
            self._lines.append(line)
            with open(self.path, "w") as f:
                f.write("".join(self._lines))
            return
        good = self._file.tell()
        try:
            self._file.write(line)
            self._file.flush()
        except OSError:
            self._cut_back(good)
            raise

    def _cut_back(self, size: int) -> None:
        """Drop everything after ``size`` bytes (buffered or written) and reopen for appending."""
        try:
            self._file.close()
        except OSError:
            pass  # the buffered partial line could not be written either
        try:
            with builtins.open(self.path, "rb+") as f:
                f.truncate(size)
        except OSError:
            pass  # cut when the log is opened next (_cut_torn_tail)
        self._file = builtins.open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if not self._remote:
            self._file.close()


def emulator_environment(url: str) -> dict:
    """Environment variables that point every GCS client used here at an emulator at ``url`` (e.g.
    ``http://127.0.0.1:4443``, a fake-gcs-server): gcsfs and google-cloud-storage (``STORAGE_EMULATOR_HOST``),
    tensorstore / orbax (``TENSORSTORE_GCS_HTTP_URL``, with a dummy bearer token instead of Google credentials),
    array_record's reader (google-cloud-cpp: ``CLOUD_STORAGE_EMULATOR_ENDPOINT``); gcsfs' bucket-layout lookup over
    gRPC (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT``) is turned off, emulators do not serve it."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
