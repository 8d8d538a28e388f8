"""Orbax checkpoints of the train state together with the data iterator's state.

Layout: ``<workdir>/checkpoints/<step>/{state, data}``. Orbax writes each step into a temporary directory and
renames it when complete, so a half-written step (process killed, disk full) is never listed; the leftovers are
removed when the next manager starts (``cleanup_tmp_directories``). A failed write keeps the previous checkpoints
(orbax deletes old steps only after the new one is finalised) and is reported as an error. A listed step that
cannot be read is moved to ``<workdir>/checkpoints_unreadable/`` with a warning and the previous step is used.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from beitv2_jax import storage

UNREADABLE_DIR = "checkpoints_unreadable"


class CheckpointError(RuntimeError):
    """A checkpoint that had to be written (final, preemption) or read (resume) could not be."""


def make_manager(workdir: str, max_to_keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    directory = storage.join(storage.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def wait(manager: ocp.CheckpointManager) -> bool:
    """Block until the pending (asynchronous) write is finished; ``False`` if it failed (reported)."""
    started = manager.latest_step()
    try:
        manager.wait_until_finished()
        return True
    except Exception as e:  # noqa: BLE001 - any failure of the background write is reported the same way
        _report_failure(manager, started, e)
        return False


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Optional[dict] = None,
         required: bool = False) -> bool:
    """Start writing ``state`` (any pytree of arrays) and ``data_state`` (a JSON-able dict) as ``step``.

    Returns ``True`` when the write started (or ``step`` is already saved). A failure — of this save, or of the
    previous asynchronous write surfacing now — is logged as an error naming the newest complete checkpoint,
    which is kept; training carries on and the next save tries again. With ``required`` (final and preemption
    checkpoints) the write is waited for and a failure raises ``CheckpointError``.
    """
    wait(manager)  # an earlier background failure is reported as that step's, not as this one's
    if step not in manager.all_steps():
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
        try:
            manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - disk full, permissions, ... all keep the previous checkpoint
            _report_failure(manager, step, e)
            if required:
                raise CheckpointError(_failure_message(manager, step, e)) from e
            return False
    if required and not wait(manager):
        raise CheckpointError(f"checkpoint step {step} could not be written (see the error above); the newest "
                              f"complete checkpoint is step {manager.latest_step()}")
    return True


def _failure_message(manager, step, error) -> str:
    return (f"saving checkpoint step {step} in {manager.directory} failed ({type(error).__name__}: {error}); the "
            f"newest complete checkpoint, step {manager.latest_step()}, is kept")


def _report_failure(manager, step, error) -> None:
    manager.reload()  # forget the failed step (and keep old steps orbax had planned to delete after it)
    logging.error("%s", _failure_message(manager, step, error))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any):
    """``(state, data_state, step)`` from the newest readable checkpoint, or ``None`` when there is none.

    ``abstract_state`` gives the tree structure, shapes, dtypes and shardings to restore into (``jax.eval_shape``
    output or the freshly initialised state). Newer steps that cannot be read are moved to
    ``<workdir>/checkpoints_unreadable/`` with a warning naming them (so that orbax saves those steps again);
    when checkpoints exist but none can be read, ``CheckpointError`` is raised and nothing is moved.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    unreadable = []
    for step in sorted(manager.all_steps(), reverse=True):
        restored, error = _try_restore(manager, step, args)
        if restored is not None:
            _move_aside(manager, unreadable)
            logging.info("restored checkpoint step %d from %s", step, manager.directory)
            return restored["state"], restored["data"], step
        logging.warning("checkpoint step %d in %s cannot be read (%s: %s); trying the previous one", step,
                        manager.directory, type(error).__name__, error)
        unreadable.append(step)
    if unreadable:
        raise CheckpointError(f"none of the checkpoints {sorted(unreadable)} in {manager.directory} can be read "
                              f"(see the warnings above); move them away to start from scratch")
    return None


def restore_data(manager: ocp.CheckpointManager, step: int) -> dict:
    """The ``data`` item (JSON) of checkpoint ``step``, or ``{}`` when that step is not saved."""
    if step not in manager.all_steps():
        return {}
    return manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"] or {}


def _try_restore(manager, step: int, args):
    """``(restored, None)`` or ``(None, error)``; with several processes a step counts only if all read it."""
    try:
        restored, error = manager.restore(step, args=args), None
    except Exception as e:  # noqa: BLE001 - truncated files, missing items, bad JSON, ... all mean unreadable
        restored, error = None, e
    if jax.process_count() > 1:
        everywhere = multihost_utils.process_allgather(np.int32(restored is not None)).min()
        if not everywhere and restored is not None:
            restored, error = None, CheckpointError("another process could not read it")
    return restored, error


def _move_aside(manager, steps: list) -> None:
    """Move unreadable step directories out of the manager's directory (kept for inspection)."""
    if not steps:
        return
    target_root = epath.Path(manager.directory).parent / UNREADABLE_DIR
    if jax.process_index() == 0:
        target_root.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target = target_root / str(step)
            suffix = 0
            while target.exists():
                suffix += 1
                target = target_root / f"{step}-{suffix}"
            (epath.Path(manager.directory) / str(step)).rename(target)
            logging.warning("skipped unreadable checkpoint step %d: moved it to %s", step, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("beitv2_jax.checkpoint.move_aside")
    manager.reload()
