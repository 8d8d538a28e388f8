"""Task ``segment``: semantic segmentation (UperNet + auxiliary FCN) from a pretrained encoder, the official BEiT v2
ADE20K recipe (reference §3.3; ``beit2/semantic_segmentation`` on mmseg 0.11).

* Encoder: one of our weight directories or a PyTorch file + ``format`` (as ``finetune``); the shared relative
  position table is copied into every block and resized to the crop's window. ``pretrained.random_init`` keeps the
  checkpoint's architecture but starts the backbone from its random initialisation (the baseline twin).
* Loss: cross-entropy of the decode head's logits, resized bilinearly to the label map, plus ``aux_weight`` × the
  auxiliary head's; pixels labelled ``ignore_index`` contribute 0 and — as mmseg 0.11 — the mean is over all
  pixels (``loss.avg_non_ignore=True``: over the labelled ones).
* AdamW, layer-wise lr decay over the backbone by block id (fpn and heads at full lr), poly schedule (power 1) with
  a linear warmup from ``warmup_ratio`` × lr, per step; BatchNorm statistics in ``state.model_state``.
* Every ``eval_every_steps`` and at the end: mIoU / mAcc / aAcc on the eval split (``eval.mode`` slide or whole,
  ``beitv2_jax.train.seg_eval``) → ``metrics.jsonl``, ``results.json``; ``<workdir>/model`` (kind ``segmentation``).
"""
from __future__ import annotations

import json
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from beitv2_jax import progress, storage
from beitv2_jax.data import pipeline, segmentation as seg_data, sources, transforms
from beitv2_jax.models import segmentation as seg_model
from beitv2_jax.train import checkpoint as ckpt_lib
from beitv2_jax.train import layer_decay, loop, optim, seg_eval, sharding
from beitv2_jax.train import state as state_lib
from beitv2_jax.train.metrics import MetricsWriter
from beitv2_jax.train.tasks import common, finetune


# Jitted functions by what they close over (model config, optimiser, loss): a second run of the same architecture in
# this process — the demo's random-init twin — reuses the compiled code instead of compiling it again.
_JITTED: dict = {}


def _memo(kind: str, key: dict, make):
    name = kind + json.dumps(key, sort_keys=True, default=str)
    if name not in _JITTED:
        _JITTED[name] = make()
    return _JITTED[name]


# ----------------------------------------------------------------------------------------------- model
def model_config(config: ml_collections.ConfigDict, encoder: dict) -> dict:
    """The segmentation model's config (``segmentation.segmentation_config``) for ``config.model`` on ``encoder``."""
    m = config.model
    return seg_model.segmentation_config(
        encoder, config.data.input_size, m.num_classes, out_indices=tuple(m.out_indices),
        drop_path_rate=m.drop_path_rate, channels=m.channels, pool_scales=tuple(m.pool_scales),
        dropout_ratio=m.dropout_ratio, aux_channels=m.aux_channels, aux_num_convs=m.aux_num_convs,
        aux_in_index=m.aux_in_index, rel_pos=m.rel_pos, attention_impl=m.attention_impl,
        remat_policy=m.remat_policy)


def init_variables(model, image_size: int, seed: int, cache_key: Optional[dict] = None) -> tuple:
    """``(variables, boxed_params)``: unboxed ``{'params', 'batch_stats'}`` and the logically named param shapes."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    init = lambda key: model.init(key, images, train=False)
    jitted = _memo("init", cache_key, lambda: jax.jit(init)) if cache_key is not None else jax.jit(init)
    variables = jitted(jax.random.PRNGKey(seed))
    boxed = jax.eval_shape(jitted, jax.random.PRNGKey(seed))
    return flax.linen.meta.unbox(variables), boxed["params"]


def build(config: ml_collections.ConfigDict) -> tuple:
    """``(model, cfg, variables, boxed_params, report)``: the model on the configured encoder, its initial
    variables with the pretrained backbone loaded (unless ``pretrained.random_init``) and the load report."""
    p = config.pretrained
    pretrained = finetune.load_pretrained(p.checkpoint, p.get("format", ""))
    cfg = model_config(config, pretrained.config)
    model = seg_model.model_from_config(cfg, common.compute_dtype(config.get("dtype", "float32")))
    key = {"model": cfg, "dtype": config.get("dtype", "float32"), "size": config.data.input_size}
    variables, boxed = init_variables(model, config.data.input_size, config.seed, cache_key=key)
    if p.get("random_init", False):
        report = {"loaded": [], "initialised": ["<all: pretrained.random_init>"], "unused": []}
        return model, cfg, variables, boxed, report
    params, report = finetune.adapt_pretrained_segmentation(pretrained, cfg, variables["params"],
                                                            config.model.rel_pos_interpolation)
    return model, cfg, {**variables, "params": params}, boxed, report


# ----------------------------------------------------------------------------------------------- loss and steps
def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = seg_data.IGNORE_INDEX,
                        avg_non_ignore: bool = False) -> jax.Array:
    """mmseg ``CrossEntropyLoss`` on ``logits [B, h, w, K]`` resized bilinearly to ``labels [B, H, W]``: per-pixel
    cross-entropy, 0 where the label is ``ignore_index``, mean over all pixels (or the labelled ones)."""
    logits = seg_model.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
    valid = labels != ignore_index
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    ce = jnp.where(valid, ce, 0.0)
    denominator = jnp.maximum(valid.sum(), 1) if avg_non_ignore else labels.size
    return ce.sum() / denominator


def make_train_step(model, tx, schedule, loss_config: ml_collections.ConfigDict, ignore_index: int):
    aux_weight = float(loss_config.aux_weight)
    avg_non_ignore = bool(loss_config.get("avg_non_ignore", False))

    def loss_fn(params, batch_stats, images, labels, rng):
        out, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": rng})
        decode = pixel_cross_entropy(out["logits"], labels, ignore_index, avg_non_ignore)
        aux = pixel_cross_entropy(out["aux_logits"], labels, ignore_index, avg_non_ignore)
        return decode + aux_weight * aux, (decode, aux, updates["batch_stats"])

    def train_step(state: state_lib.TrainState, batch: dict):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (decode, aux, batch_stats)), grads = grad_fn(
            state.params, state.model_state["batch_stats"], batch["image"], batch["label"],
            state_lib.step_rng(state, "dropout"))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & optim.is_finite_tree(grads) & optim.is_finite_tree(params)
        extra = {**state.extra, "bad_steps": jnp.where(finite, 0, state.extra["bad_steps"] + 1)}
        updated = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                model_state={"batch_stats": batch_stats}, extra=extra)
        skipped = state.replace(step=state.step + 1, extra=extra)
        metrics = {"loss": loss, "loss_decode": decode, "loss_aux": aux, "lr": schedule(state.step),
                   "grad_norm": optim.global_norm(grads), "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return state_lib.select_tree(finite, updated, skipped), metrics

    return train_step


def make_forward(model):
    """Jitted ``(params, batch_stats, images [B, h, w, 3]) → logits [B, h, w, K]`` (decode head, float32, resized
    bilinearly to the input as mmseg's ``encode_decode``)."""

    def forward(params, batch_stats, images):
        out = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
        return seg_model.resize_bilinear(out["logits"].astype(jnp.float32), images.shape[1:3])

    return jax.jit(forward)


# ----------------------------------------------------------------------------------------------- data
def train_transform(config: ml_collections.ConfigDict) -> seg_data.SegTrainTransform:
    s = config.segmentation
    return seg_data.SegTrainTransform(
        crop_size=config.data.input_size, img_scale=tuple(s.img_scale), ratio_range=tuple(s.ratio_range),
        cat_max_ratio=s.cat_max_ratio, hflip=s.hflip, photometric=s.photometric,
        reduce_zero_label=s.reduce_zero_label, ignore_index=s.ignore_index)


def open_split(data: ml_collections.ConfigDict, split: str) -> seg_data.DecodedSegmentationSource:
    return seg_data.DecodedSegmentationSource(sources.open_source(data.dataset, split, data.data_dir))


def make_train_iterator(config: ml_collections.ConfigDict, seed: int):
    """Endless augmented batches ``{'image': f32 [b, c, c, 3], 'label': i32 [b, c, c], 'bad_records': i32 [b]}``."""
    data = config.data
    ds = pipeline.make_dataset(open_split(data, data.train_split),
                               transform=transforms.count_bad_records(train_transform(config)),
                               global_batch_size=config.batch_size, process_index=jax.process_index(),
                               process_count=jax.process_count(), seed=seed, num_workers=data.num_workers,
                               read_threads=data.read_threads, prefetch_batches=data.prefetch_batches)
    return iter(ds)


def evaluate(forward, variables: dict, config: ml_collections.ConfigDict, mesh) -> dict:
    """mIoU / mAcc / aAcc (%) on the eval split with ``config.eval`` (mode, stride, num_images)."""
    e, s, data = config.eval, config.segmentation, config.data
    transform = seg_data.SegEvalTransform(img_scale=tuple(e.img_scale), reduce_zero_label=s.reduce_zero_label)
    source = open_split(data, data.eval_split)
    crop = data.input_size
    batch = config.get("eval_batch_size") or config.batch_size
    put = _put_fn(mesh, batch)
    evaluator = seg_eval.SegmentationEvaluator(
        lambda images: forward(variables["params"], variables["batch_stats"], images), config.model.num_classes,
        mode=e.mode, crop=(crop, crop), stride=(e.stride, e.stride), batch_size=batch, ignore_index=s.ignore_index,
        put=put)
    num_images = min(e.get("num_images") or len(source), len(source))
    records = progress.track(seg_data.eval_records(source, transform, num_images), "segmentation eval",
                             total=num_images, unit="img")
    return evaluator.run(records)


def _put_fn(mesh, batch: int):
    """Host batch → device array: split over the mesh's batch axes (every process passes the same whole batch)."""
    dp = sharding.data_parallel_size(mesh)
    target = sharding.batch_sharding(mesh) if batch % dp == 0 else sharding.replicated(mesh)
    if jax.process_count() == 1:
        return lambda x: jax.device_put(x, target)
    rep = sharding.replicated(mesh)
    return lambda x: jax.make_array_from_process_local_data(rep, x)


def summarize(result: dict) -> dict:
    """The scalar part of an evaluation result (for logs and results.json)."""
    return {k: result[k] for k in ("mIoU", "mAcc", "aAcc", "num_images", "num_pixels")}


# ----------------------------------------------------------------------------------------------- run
def save_model(directory: str, variables: dict, cfg: dict, info: Optional[dict] = None) -> None:
    from beitv2_jax.convert import store

    store.save_variables(directory, sharding.host_copy(variables), "segmentation", cfg, info=info)


def run(config: ml_collections.ConfigDict, workdir: str):
    common.log_header("segment", config, workdir)
    common.prepare_workdir(config, workdir, save_config=False)  # config.json once the restore worked
    mesh = sharding.make_mesh(config.get("mesh"))
    model, cfg, variables, boxed, report = build(config)
    logging.info("segmentation model: %d parameters; %d loaded, fresh: %d; unused from the checkpoint: %s",
                 sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"])), len(report["loaded"]),
                 len(report["initialised"]), report["unused"])
    params = variables["params"]
    o = config.optim
    total_steps = int(config.num_steps)
    n = common.num_examples(config.data, config.data.train_split)
    logging.info("segment: %d train images, batch %d, num_steps %d (%.1f epochs)", n, config.batch_size,
                 total_steps, total_steps * config.batch_size / max(n, 1))
    schedule = optim.poly_schedule(o.lr, total_steps, o.power, o.min_lr, o.warmup_steps, o.warmup_ratio)
    lr_scale = layer_decay.scale_by_layer_decay(params, cfg["backbone"]["depth"], o.layer_decay,
                                                layer_id_fn=layer_decay.segmentation_layer_id)
    tx, schedule = optim.make_optimizer(o, params, total_steps, total_steps, lr_scale_fn=lr_scale, schedule=schedule)
    extra = {"bad_steps": jnp.zeros((), jnp.int32), "best_miou": jnp.full((), -1.0, jnp.float32)}
    state = state_lib.create(params, tx, model_state={"batch_stats": variables["batch_stats"]}, extra=extra,
                             seed=config.seed)
    state, state_sh = common.shard_state(state, boxed, tx, mesh, config)

    iterator = make_train_iterator(config, config.seed)
    manager = ckpt_lib.make_manager(workdir, config.get("keep_checkpoints", 3))
    state = loop.resume(manager, state, iterator)
    common.write_config(config, workdir)
    key = {"model": cfg, "dtype": config.get("dtype", "float32"), "optim": config.optim.to_dict(),
           "steps": total_steps, "loss": config.loss.to_dict(), "ignore": config.segmentation.ignore_index,
           "mesh": str(mesh), "rules": str(sharding.logical_axis_rules(config))}
    train_step = _memo("train_step", key, lambda: jax.jit(
        make_train_step(model, tx, schedule, config.loss, config.segmentation.ignore_index), donate_argnums=0,
        in_shardings=(state_sh, sharding.batch_sharding(mesh)), out_shardings=(state_sh, sharding.replicated(mesh))))
    forward = _memo("forward", {k: key[k] for k in ("model", "dtype")}, lambda: make_forward(model))
    writer = MetricsWriter(workdir)
    results_path = storage.join(workdir, "results.json")
    every = int(config.eval_every_steps) or total_steps

    def eval_hook(state, index):
        step = int(state.step)
        if step % every and step != total_steps:
            return state
        current = {"params": state.params, "batch_stats": state.model_state["batch_stats"]}
        result = summarize(evaluate(forward, current, config, mesh))
        writer.write_scalars(step, {f"eval/{k}": result[k] for k in ("mIoU", "mAcc", "aAcc")})
        logging.info("step %d: eval mIoU %.2f mAcc %.2f aAcc %.2f (%d images)", step, result["mIoU"],
                     result["mAcc"], result["aAcc"], result["num_images"])
        best = float(jax.device_get(state.extra["best_miou"]))
        if result["mIoU"] > best:
            best = result["mIoU"]
            if config.get("save_best", True):
                save_model(storage.join(workdir, "best_model"), current, cfg, info={"step": step, **result})
            common.update_json(results_path, {"best": {"step": step, **result}})
        common.update_json(results_path, {"last": {"step": step, **result}})
        best_miou = jax.device_put(jnp.float32(best), sharding.replicated(mesh))
        return state.replace(extra={**state.extra, "best_miou": best_miou})

    try:
        state = loop.run(workdir=workdir, state=state, train_step=train_step, iterator=iterator, mesh=mesh,
                         total_steps=total_steps, steps_per_epoch=min(every, total_steps),
                         batch_size=config.batch_size, log_every=config.get("log_every_steps", 50),
                         checkpoint_every=config.get("checkpoint_every_steps", 1000),
                         max_bad_steps=config.get("max_bad_steps", 10),
                         divergence_factor=config.get("divergence_factor", 0.0), manager=manager, writer=writer,
                         epoch_end=eval_hook, desc="segment", inject_nan_steps=config.get("inject_nan_steps", ()),
                         profile=config.get("profile", ()))
        if total_steps % every:  # the last evaluation when the run does not end on an evaluation step
            state = eval_hook(state, 0)
    finally:
        writer.close()
    final = {"params": state.params, "batch_stats": state.model_state["batch_stats"]}
    save_model(storage.join(workdir, "model"), final, cfg, info={"step": int(state.step)})
    logging.info("segmentation model written to %s", storage.join(workdir, "model"))
    return state
