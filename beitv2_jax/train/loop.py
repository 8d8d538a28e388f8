"""The shared step loop: input → jitted step → metrics → checkpoints, with resume and a non-finite guard."""
from __future__ import annotations

import time
from typing import Callable, Iterator, Optional

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from beitv2_jax.train import checkpoint as ckpt_lib
from beitv2_jax.train import sharding
from beitv2_jax.train.metrics import MetricsWriter


class NonFiniteError(RuntimeError):
    """Raised after too many consecutive non-finite steps; the last good checkpoint is left intact."""


def resume(manager, state, iterator):
    """Restore the newest checkpoint into ``state`` and ``iterator``; returns the (possibly restored) state."""
    restored = ckpt_lib.restore_latest(manager, state)
    if restored is None:
        return state
    state, data_state, step = restored
    if data_state:
        iterator.set_state(data_state)
    logging.info("resuming at step %d", step)
    return state


def run(*, workdir: str, state, train_step: Callable, iterator: Iterator, mesh, total_steps: int,
        steps_per_epoch: int, batch_size: int, log_every: int = 50, checkpoint_every: int = 1000,
        max_bad_steps: int = 10, manager=None, writer: Optional[MetricsWriter] = None,
        epoch_end: Optional[Callable] = None, desc: str = "train"):
    """Run ``train_step(state, batch) -> (state, metrics)`` from ``state.step`` to ``total_steps``.

    Metrics are averaged over each logging window and written with the learning rate etc. as the step
    returns them. ``state.extra['bad_steps']`` (consecutive non-finite steps, maintained by the step) is checked
    at every log; at ``max_bad_steps`` the run stops with ``NonFiniteError``. ``epoch_end(state, epoch)`` may
    return an updated state and writes its own metrics. Saves every ``checkpoint_every`` steps and at the end.
    """
    own_writer = writer is None
    writer = writer or MetricsWriter(workdir)
    start = int(jax.device_get(state.step))
    window: list = []
    pbar = tqdm(total=total_steps, initial=start, desc=desc, disable=jax.process_index() != 0,
                dynamic_ncols=True, mininterval=1.0)
    tick, tick_step = time.perf_counter(), start
    try:
        for step in range(start, total_steps):
            batch = sharding.to_global_batch(next(iterator), mesh)
            state, metrics = train_step(state, batch)
            window.append(metrics)
            done = step + 1
            if done % log_every == 0 or done == total_steps:
                host = jax.device_get(window)
                mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                now = time.perf_counter()
                mean["img_per_sec"] = (done - tick_step) * batch_size / max(now - tick, 1e-9)
                tick, tick_step = now, done
                writer.write_scalars(done, mean)
                pbar.set_postfix({k: f"{mean[k]:.4g}" for k in ("loss", "img_per_sec") if k in mean})
                window = []
                bad = int(jax.device_get(state.extra["bad_steps"])) if "bad_steps" in state.extra else 0
                if bad >= max_bad_steps:
                    raise NonFiniteError(
                        f"{bad} consecutive steps had a non-finite loss or gradient (limit max_bad_steps="
                        f"{max_bad_steps}); stopped at step {done}, the last checkpoint is intact")
            pbar.update(1)
            if epoch_end is not None and done % steps_per_epoch == 0:
                state = epoch_end(state, done // steps_per_epoch) or state
            if manager is not None and (done % checkpoint_every == 0 or done == total_steps):
                ckpt_lib.save(manager, done, state, iterator.get_state())
    finally:
        pbar.close()
        if manager is not None:
            manager.wait_until_finished()
        if own_writer:
            writer.close()
    return state
