"""Orbax checkpoints of the train state together with the data iterator's state.

Layout: ``<workdir>/checkpoints/<step>/{state, data}``. Orbax writes each step into a temporary directory and
renames it when complete, so a half-written step (process killed, disk full) is never listed; the leftovers are
removed when the next manager starts (``cleanup_tmp_directories``). A failed write keeps the previous checkpoints
(orbax deletes old steps only after the new one is finalised) and is reported as an error. A listed step that
cannot be read is moved to ``<workdir>/checkpoints_unreadable/`` with a warning and the previous step is used.

Integrity: every save also stores a digest of each array of the state (``state_digest``, computed on the devices) in
the step's ``data`` item; a restore recomputes it and treats a mismatch (bits changed on disk after the write, which
the array store may not detect) like any other unreadable step. A checkpoint whose arrays do not fit the model
(another config) is refused with the first parameter whose shape differs; nothing is moved then.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from beitv2_jax import storage

UNREADABLE_DIR = "checkpoints_unreadable"


class CheckpointError(RuntimeError):
    """A checkpoint that had to be written (final, preemption) or read (resume) could not be."""


class IncompatibleCheckpointError(CheckpointError):
    """A readable checkpoint whose arrays do not fit the model being trained (another config)."""


DIGEST_KEY = "digest"
_GOLDEN = 0x9E3779B1  # odd: every position gets an odd weight, so any single flipped bit changes the sum


def _leaf_digest(x: jax.Array) -> jax.Array:
    """uint32 position-weighted sum (mod 2**32) of ``x``'s bits; any one flipped bit changes it."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).reshape(-1)  # 8-byte types: [..., 2]
    weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(_GOLDEN) | jnp.uint32(1)
    return jnp.sum(words * weights, dtype=jnp.uint32)


@functools.lru_cache(maxsize=None)
def _digest_fn(treedef):
    del treedef  # one compiled function per tree structure (jit also keys on shapes, dtypes and shardings)
    return jax.jit(lambda leaves: [_leaf_digest(x) for x in leaves])


def _path_name(path) -> str:
    """``params/blocks_0/kernel`` for a tree path (dict keys, dataclass fields and indices alike)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_digest(state: Any) -> dict:
    """``{path: uint32}`` for every array of ``state`` (a pytree), computed where the arrays live."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = [_path_name(path) for path, _ in leaves]
    values = jax.device_get(_digest_fn(treedef)([x for _, x in leaves]))
    return {p: int(v) for p, v in zip(paths, values)}


def _digest_mismatch(saved: dict, state: Any) -> Optional[str]:
    """The first array whose digest differs from the saved one (``None`` when all agree)."""
    current = state_digest(state)
    for path, value in saved.items():
        if current.get(path) != value:
            return path
    return None


def make_manager(workdir: str, max_to_keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    directory = storage.join(storage.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def wait(manager: ocp.CheckpointManager) -> bool:
    """Block until the pending (asynchronous) write is finished; ``False`` if it failed (reported)."""
    return _wait_error(manager) is None


def _wait_error(manager: ocp.CheckpointManager) -> Optional[Exception]:
    """``wait``, returning the failure of the pending write (reported) or ``None``."""
    started = manager.latest_step()
    try:
        manager.wait_until_finished()
        return None
    except Exception as e:  # noqa: BLE001 - any failure of the background write is reported the same way
        _report_failure(manager, started, e)
        return e


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
        data_state = {**(data_state or {}), DIGEST_KEY: state_digest(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        try:
            manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - disk full, permissions, ... all keep the previous checkpoint
            _report_failure(manager, step, e)
            if required:
                raise CheckpointError(_failure_message(manager, step, e)) from e
            return False
    if required:
        error = _wait_error(manager)
        if error is not None:
            raise CheckpointError(_failure_message(manager, step, error))
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
        _check_shapes(manager, step, target)
        restored, error = _try_restore(manager, step, args)
        if restored is not None:
            _move_aside(manager, unreadable)
            logging.info("restored checkpoint step %d from %s (array digests verified)", step, manager.directory)
            data = dict(restored["data"] or {})
            data.pop(DIGEST_KEY, None)
            return restored["state"], data, step
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
        changed = _digest_mismatch((restored["data"] or {}).get(DIGEST_KEY, {}), restored["state"])
        if changed is not None:
            restored, error = None, CheckpointError(f"the data of array {changed} does not match the digest saved "
                                                    f"with it (changed on disk after it was written)")
    except Exception as e:  # noqa: BLE001 - truncated files, missing items, bad JSON, ... all mean unreadable
        restored, error = None, e
    if jax.process_count() > 1:
        everywhere = multihost_utils.process_allgather(np.int32(restored is not None)).min()
        if not everywhere and restored is not None:
            restored, error = None, CheckpointError("another process could not read it")
    return restored, error


def _check_shapes(manager, step: int, target: Any) -> None:
    """Raise ``IncompatibleCheckpointError`` naming the first array whose stored shape differs from the model's
    (a readable checkpoint of another config); unreadable metadata is left to the restore to report."""
    try:
        stored = manager.item_metadata(step)["state"]
        stored_leaves = {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
    except Exception:  # noqa: BLE001 - missing or torn metadata: the restore attempt reports it
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = _path_name(path)
        shape = getattr(stored_leaves.get(name), "shape", None)
        if name in stored_leaves and shape is not None and tuple(shape) != tuple(leaf.shape):
            raise IncompatibleCheckpointError(
                f"checkpoint step {step} in {manager.directory} does not fit this config: {name} has shape "
                f"{tuple(shape)} there and {tuple(leaf.shape)} in the model; use the config it was written with or "
                f"another --workdir")


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
