"""The train state: everything a step reads and writes, and everything a checkpoint holds (besides data)."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """``step`` int32 scalar; ``params`` (trainable); ``opt_state``; ``model_state``: non-trainable collections
    updated inside the step (e.g. ``{'codebook': ...}``); ``extra``: task bookkeeping such as per-epoch code
    counts; ``rng``: raw uint32 key data (checkpointable). Frozen models (teacher, tokenizer) are not here.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any
    extra: Any
    rng: jax.Array


def create(params, tx, model_state=None, extra=None, seed: int = 0) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=model_state or {}, extra=extra or {},
                      rng=jax.random.key_data(jax.random.PRNGKey(seed)))


def step_rng(state: TrainState, name: str) -> jax.Array:
    """A key for this step and purpose, derived from (seed, step, name) — identical after a resume."""
    key = jax.random.wrap_key_data(state.rng)
    key = jax.random.fold_in(key, state.step)
    return jax.random.fold_in(key, RNG_STREAMS.index(name) + 1)


RNG_STREAMS = ("dropout", "kmeans", "mixup", "noise", "masking")


def select_tree(pred: jax.Array, on_true, on_false):
    """``pred ? on_true : on_false`` leaf by leaf (used to skip non-finite updates)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
