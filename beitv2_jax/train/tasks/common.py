"""Pieces shared by the tasks: run set-up, step counting, padded eval passes, PNG helpers."""
from __future__ import annotations

import json
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from beitv2_jax import progress, storage
from beitv2_jax.data import sources
from beitv2_jax.train import sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"config.dtype must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, save_config: bool = True) -> None:
    """Create ``workdir`` and take its lock (``workdir_lock``: one run per workdir); refuse a workdir that holds a
    run with another config (``validate.ConfigError`` naming the changed keys, see ``validate.check_workdir``);
    write ``config.json`` unless ``save_config=False`` (tasks that resume write it with ``write_config`` once the
    checkpoint has been restored, so a change that cannot be restored leaves the old one in place)."""
    from beitv2_jax import validate
    from beitv2_jax.train import workdir_lock

    storage.makedirs(workdir)
    if jax.process_index() == 0:
        workdir_lock.acquire(workdir)
    validate.check_workdir(config, workdir)
    if save_config:
        write_config(config, workdir)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """``<workdir>/config.json`` (process 0; written atomically)."""
    if jax.process_index() == 0:
        storage.write_json(storage.join(workdir, "config.json"), json.loads(config.to_json_best_effort(sort_keys=True)),
                           indent=2, sort_keys=True)


def update_json(path: str, update: dict) -> None:
    """Merge ``update`` into the JSON object at ``path`` (e.g. ``results.json``; process 0; atomic write)."""
    if jax.process_index() != 0:
        return
    current = storage.read_json(path) if storage.exists(path) else {}
    current.update(update)
    storage.write_json(path, current, indent=2)


def num_examples(data_config, split: str) -> int:
    return len(sources.open_source(data_config.dataset, split, data_config.data_dir))


def resolve_steps(num_records: int, batch_size: int, num_epochs: int, steps_per_epoch: int = 0,
                  min_steps: int = 0) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``: ``steps_per_epoch`` if set (it wins), else ``num_records // batch_size``
    (the official count) raised to ``ceil(min_steps / num_epochs)``, so that a small data set still gets at least
    ``min_steps`` steps (an "epoch" is then that many batches of the endless shuffled stream; warm-ups and other
    schedules given in epochs keep their share of the run)."""
    if steps_per_epoch:
        return int(steps_per_epoch), int(steps_per_epoch) * int(num_epochs)
    per_epoch = num_records // batch_size
    if min_steps:
        per_epoch = max(per_epoch, -(-int(min_steps) // int(num_epochs)))
    return per_epoch, per_epoch * int(num_epochs)


def budget_line(task: str, num_records: int, batch_size: int, num_epochs: int, per_epoch: int, total: int,
                note: str = "") -> str:
    """One line of the resolved training length, e.g. ``pretrain: 1400 train images, batch 128, 16 epochs × 39
    steps → 624 steps (raised to min_steps 624 from 10 steps/epoch)``."""
    return (f"{task}: {num_records} train images, batch {batch_size}, {num_epochs} epochs × {per_epoch} steps → "
            f"{total} steps" + (f" ({note})" if note else ""))


def steps_per_epoch(config: ml_collections.ConfigDict, task: str = "") -> int:
    """Steps per epoch of a training task (:func:`resolve_steps` of ``config.steps_per_epoch``,
    ``config.min_steps`` and the train split's size); logs the resolved budget (:func:`budget_line`)."""
    n = num_examples(config.data, config.data.train_split)
    if not config.get("steps_per_epoch") and n < config.batch_size:
        raise ValueError(f"the train split has {n} images, fewer than config.batch_size={config.batch_size}")
    fixed, min_steps = config.get("steps_per_epoch") or 0, config.get("min_steps") or 0
    per_epoch, total = resolve_steps(n, config.batch_size, config.num_epochs, fixed, min_steps)
    note = ("config.steps_per_epoch" if fixed else
            f"raised to min_steps {min_steps} from {n // config.batch_size} steps/epoch"
            if per_epoch > n // config.batch_size else "")
    logging.info("%s", budget_line(task or config.get("task", "?"), n, config.batch_size, config.num_epochs,
                                   per_epoch, total, note))
    return per_epoch


def eval_pass(fn: Callable, iterator: Iterator[dict], mesh, desc: str = "eval") -> list:
    """Apply jitted ``fn(batch) -> pytree of [batch, ...]`` to every batch of a padded evaluation pass
    (``pipeline.make_eval_iterator``) with progress named ``desc``; returns host arrays without the padding rows,
    one entry per batch."""
    outputs = []
    for batch in progress.track(iterator, desc, unit="batch"):
        batch = dict(batch)  # the caller's batches stay whole (``knn.eval_batches`` are read more than once)
        valid = np.asarray(batch.pop("valid"))
        out = fn(sharding.to_global_batch(batch, mesh))
        if jax.process_count() > 1:  # every process gets the whole global batch
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
            valid = multihost_utils.process_allgather(valid, tiled=True)
        out = jax.device_get(out)
        outputs.append(jax.tree.map(lambda x: np.asarray(x)[valid], out))
    return outputs


def code_perplexity(counts: np.ndarray) -> float:
    """exp(entropy) of the code distribution given by per-code counts: the number of equally used codes with the
    same entropy (1 … number of codes)."""
    counts = np.asarray(counts, np.float64)
    p = counts[counts > 0] / max(counts.sum(), 1.0)
    return float(np.exp(-(p * np.log(p)).sum())) if p.size else 0.0


def _figure(width_in: float, height_in: float):
    """A matplotlib ``Figure`` on the Agg canvas (no pyplot state, no display needed), constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_png(fig, path: str) -> np.ndarray:
    """Render ``fig`` → PNG at ``path`` (local or URI); returns the image, uint8 ``[H, W, 3]``."""
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    storage.save_image(Image.fromarray(image), path)
    return image


def usage_histogram_figure(counts: np.ndarray, title: str = "code usage"):
    """Per-code counts sorted in decreasing order on a log axis; the title gives used / total codes and the
    perplexity (:func:`code_perplexity`). Returns the matplotlib ``Figure``."""
    counts = np.sort(np.asarray(counts, np.float64))[::-1]
    k, used = len(counts), int((counts > 0).sum())
    fig = _figure(8.0, 3.6)
    ax = fig.add_subplot()
    ranks = np.arange(1, k + 1)
    if used:
        ax.fill_between(ranks[:used], counts[:used], step="post", color="#2a5bd7", alpha=0.35, linewidth=0)
        ax.step(ranks[:used], counts[:used], where="post", color="#2a5bd7", linewidth=1.2)
        ax.set_yscale("log")
        ax.set_ylim(0.8, counts[0] * 1.5)
    else:
        ax.set_yscale("log")
        ax.set_ylim(0.8, 10)
    if used < k:
        ax.axvspan(used + 0.5, k + 0.5, color="#d0d0d0", alpha=0.6, linewidth=0,
                   label=f"{k - used} unused codes (count 0)")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlim(0.5, k + 0.5)
    ax.set_xlabel("code rank (codes sorted by count, most used first)")
    ax.set_ylabel("count (log scale)")
    ax.set_title(f"{title}: {used}/{k} codes used ({100.0 * used / max(k, 1):.1f}%), "
                 f"perplexity {code_perplexity(counts):.1f}, {int(counts.sum())} tokens", fontsize=10)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    return fig


def usage_histogram_png(counts: np.ndarray, path: str, title: str = "code usage") -> np.ndarray:
    """:func:`usage_histogram_figure` → PNG at ``path``; returns the image array (uint8 ``[H, W, 3]``)."""
    return figure_to_png(usage_histogram_figure(counts, title), path)


def token_map_figure(images: np.ndarray, tokens: np.ndarray, num_codes: int):
    """Each image (``[n, H, W, 3]`` in [0, 1]) next to its token map (``[n, h, w]`` code ids): one colour per code,
    the id written in each patch, titles with the grid and the number of distinct codes. Returns the ``Figure``."""
    n, grid_h, grid_w = tokens.shape
    palette = np.random.default_rng(0).integers(30, 256, size=(num_codes, 3)).astype(np.uint8)
    panel = max(3.0, 0.3 * max(grid_h, grid_w))  # inches per panel: ids stay legible on larger grids
    fig = _figure(2 * panel + 0.4, n * (panel + 0.45) + 0.45)
    axes = fig.subplots(n, 2, squeeze=False)
    digits = len(str(max(num_codes - 1, 1)))
    cell_pt = panel * 72 / max(grid_h, grid_w)
    fontsize = min(9.0, cell_pt / (0.62 * digits + 0.4))
    for i in range(n):
        left, right = axes[i]
        left.imshow(np.clip(images[i], 0, 1), interpolation="nearest")
        left.set_title(f"image {i}", fontsize=9)
        colours = palette[tokens[i]]
        right.imshow(colours, interpolation="nearest")
        right.set_title(f"token ids ({grid_h}x{grid_w} patches, {len(np.unique(tokens[i]))} distinct codes)",
                        fontsize=9)
        if fontsize >= 3.0:  # ids are written when they fit their patch
            light = colours.astype(np.float32) @ np.array([0.299, 0.587, 0.114]) > 140
            for (y, x), code in np.ndenumerate(tokens[i]):
                right.text(x, y, str(int(code)), ha="center", va="center", fontsize=fontsize,
                           color="black" if light[y, x] else "white")
        for ax in (left, right):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"VQ-KD token maps (codebook of {num_codes} codes; colour = code id)", fontsize=10)
    return fig


def token_map_png(images: np.ndarray, tokens: np.ndarray, path: str, num_codes: int) -> np.ndarray:
    """:func:`token_map_figure` → PNG at ``path``; returns the image array (uint8 ``[H, W, 3]``)."""
    return figure_to_png(token_map_figure(images, tokens, num_codes), path)


def log_header(name: str, config: ml_collections.ConfigDict, workdir: str) -> None:
    logging.info("task %s: workdir=%s devices=%d (%s) processes=%d", name, workdir, jax.device_count(),
                 jax.devices()[0].platform, jax.process_count())


def shard_state(state, boxed_params, tx, mesh, config):
    """Place ``state`` on ``mesh``: parameters and their optimizer moments by the models' logical axis names and
    ``config.logical_axis_rules``, the rest replicated. Returns ``(state, state_shardings)``."""
    param_sh = sharding.param_shardings(boxed_params, mesh, sharding.logical_axis_rules(config))
    sharding.check_divisible(state.params, param_sh)
    state_sh = sharding.state_shardings(jax.eval_shape(lambda: state), param_sh, tx, mesh)
    return jax.device_put(state, state_sh), state_sh


def jit_train_step(step_fn, state_sh, mesh):
    """``jax.jit`` of ``step_fn(state, batch, frozen)`` with the state sharded and donated, the batch split over
    the batch axes and the frozen model (teacher / tokenizer) replicated."""
    rep = sharding.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(state_sh, sharding.batch_sharding(mesh), rep),
                   out_shardings=(state_sh, rep), donate_argnums=0)
