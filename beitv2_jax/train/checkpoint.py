"""Orbax checkpoints of the train state together with the data iterator's state.

Layout: ``<workdir>/checkpoints/<step>/{state, data}``. Orbax writes each step to a temporary directory and
renames it when complete, so a half-written step is never taken as the latest.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging


def make_manager(workdir: str, max_to_keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Optional[dict] = None,
         force: bool = False) -> bool:
    """Save ``state`` (any pytree of arrays) and the iterator state (a JSON-able dict) as ``step``."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
    return manager.save(step, args=args, force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any):
    """``(state, data_state, step)`` from the newest checkpoint, or ``None`` when there is none.

    ``abstract_state`` gives the tree structure, shapes, dtypes and shardings to restore into
    (``jax.eval_shape`` output or the freshly initialised state).
    """
    step = manager.latest_step()
    if step is None:
        return None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             data=ocp.args.JsonRestore()))
    logging.info("restored checkpoint step %d from %s", step, manager.directory)
    return restored["state"], restored["data"], step
