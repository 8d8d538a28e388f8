"""One owner per workdir: an exclusive ``flock`` on ``<workdir>/.lock`` held for the life of the process.

A second run started on the same workdir (the same command twice, a job re-queued while the first still runs) is
refused with one line naming the owner, before it touches anything. The kernel releases the lock when its process
dies, however it dies, so a run killed with SIGKILL leaves no stale lock: the next run takes it over. In a
multi-process run only process 0 takes the lock (the other processes of the same job share the workdir).
Workdirs on object storage (``gs://``) are not locked: object stores have no such lock; use one job per workdir.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

from beitv2_jax import storage

LOCK_NAME = ".lock"
_held: dict = {}  # real path of the workdir → open lock file (kept open: the lock lives as long as the process)


class WorkdirBusyError(RuntimeError):
    """Another process holds the workdir's lock."""


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def acquire(workdir: str) -> bool:
    """Take ``workdir``'s lock for this process (again: no-op); ``False`` for object-storage workdirs.

    Raises ``WorkdirBusyError`` naming the owner when another process holds it.
    """
    if storage.is_remote(workdir):
        return False
    os.makedirs(workdir, exist_ok=True)
    key = os.path.realpath(workdir)
    if key in _held:
        return True
    f = open(os.path.join(key, LOCK_NAME), "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        try:
            owner = json.loads(f.read() or "{}")
        except ValueError:
            owner = {}
        f.close()
        who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('since', '?')}"
        raise WorkdirBusyError(f"--workdir {workdir} is in use by another run ({who}); wait for it to finish or "
                               f"use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps(_owner()))
    f.flush()
    _held[key] = f
    return True


def release(workdir: str) -> None:
    """Give the lock back before the process ends (tests; the kernel does it at exit anyway)."""
    f = _held.pop(os.path.realpath(workdir), None)
    if f is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()
