"""Task ``linear_probe``: linear classifiers on a frozen encoder (reference §3.2).

Features (``config.probe.feature``):

* ``auto``: the paper's choice — the final-layer CLS token after the final norm for models pretrained with patch
  aggregation (the cls_pt head), the mean of the (normed) patch tokens otherwise;
* ``cls`` / ``mean``: either of those explicitly;
* ``per_layer``: the BEiT v1 protocol — one linear head per block on ``concat(CLS, mean of patch tokens)`` of that
  block's raw output ``[L, 2D]``; the best layer is reported.

Two ways to feed the heads (``config.probe.cache_features``):

* cached: features of the train split (eval transform, no augmentation) and the eval split are computed once;
  the heads train on device on the cached arrays (seconds for the demo's 5,000/1,000 images);
* streamed: every step runs the frozen encoder on a fresh augmented view (RandomResizedCrop + flip, BEiT v1
  linear-eval transform), so features are computed once per epoch view; checkpointed and resumable.

Heads are initialised N(0, 0.01²), bias 0; AdamW or SGD (momentum 0.9) with warmup + cosine per step.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from beitv2_jax import progress, storage
from beitv2_jax.data import augment, on_device, pipeline, sources, transforms
from beitv2_jax.models import relpos, vit
from beitv2_jax.train import checkpoint as ckpt_lib
from beitv2_jax.train import loop, optim, sharding
from beitv2_jax.train import state as state_lib
from beitv2_jax.train.metrics import MetricsWriter
from beitv2_jax.train.tasks import common, finetune, knn

FEATURES = ("auto", "cls", "mean", "per_layer")


# ----------------------------------------------------------------------------------------------- the encoder
def resolve_feature(feature: str, pretrained: finetune.Pretrained) -> str:
    """``auto`` → ``cls`` for patch-aggregation models, ``mean`` otherwise (paper §3.2)."""
    if feature not in FEATURES:
        raise ValueError(f"config.probe.feature must be one of {FEATURES}, got {feature!r}")
    if feature == "auto":
        return "cls" if pretrained.patch_aggregation else "mean"
    return feature


def at_resolution(pretrained: finetune.Pretrained, image_size: int) -> finetune.Pretrained:
    """The encoder for ``image_size`` inputs: relative position tables and absolute positions resized."""
    cfg = pretrained.config
    old = relpos.window_for_image(cfg["image_size"], cfg["patch_size"])
    new = relpos.window_for_image(image_size, cfg["patch_size"])
    if old == new:
        return pretrained
    flat = finetune._flat(pretrained.params)
    for path in list(flat):
        if path.endswith("relative_position_bias_table"):
            flat[path] = relpos.resize_rel_pos_bias_table(flat[path], new, old)
        elif path == "pos_embed":
            flat[path] = finetune.resize_pos_embed(flat[path], new, int(cfg["use_cls_token"]))
    return dataclasses.replace(pretrained, params=finetune._unflat(flat), config=dict(cfg, image_size=image_size))


def encoder_model(pretrained: finetune.Pretrained, dtype: str = "float32") -> vit.VisionTransformer:
    """The frozen encoder (no head, no drop path)."""
    cfg = dict(pretrained.config, num_classes=0, drop_path_rate=0.0)
    return vit.VisionTransformer(**cfg, dtype=common.compute_dtype(dtype))


def feature_fn(model: vit.VisionTransformer, feature: str) -> Callable[[Any, jax.Array], jax.Array]:
    """``(params, images [B, H, W, 3])`` → features ``[B, D]`` (``cls``/``mean``) or ``[B, L, 2D]``
    (``per_layer``).

    ``cls``: first token of the final output (after the final norm when the model has one); ``mean``: mean of
    the final patch tokens (after the final norm; for a mean-pooling classifier, its ``fc_norm`` pooled feature);
    ``per_layer``: ``concat(CLS, mean of patch tokens)`` of every block's raw output.
    """
    if feature not in FEATURES[1:]:
        raise ValueError(f"unknown feature {feature!r}; one of {FEATURES[1:]}")
    if feature in ("cls", "per_layer") and not model.use_cls_token:
        raise ValueError(f"feature {feature!r} needs a model with a class token")
    first = 1 if model.use_cls_token else 0

    def features(params, images):
        out = model.apply({"params": params}, images, return_blocks=feature == "per_layer")
        if feature == "cls":
            return out["encoded"][:, 0].astype(jnp.float32)
        if feature == "mean":
            if not model.use_final_norm and model.use_fc_norm:
                return out["pooled"].astype(jnp.float32)
            return out["encoded"][:, first:].mean(axis=1).astype(jnp.float32)
        per = [jnp.concatenate([b[:, 0], b[:, 1:].mean(axis=1)], axis=-1) for b in out["blocks"]]
        return jnp.stack(per, axis=1).astype(jnp.float32)

    return features


# ----------------------------------------------------------------------------------------------- heads
def init_heads(key: jax.Array, num_heads: int, dim: int, num_classes: int) -> dict:
    """``{'kernel': [L, F, C] ~ N(0, 0.01²), 'bias': [L, C] = 0}`` (BEiT v1 ``LinearClassifier`` init)."""
    return {"kernel": 0.01 * jax.random.normal(key, (num_heads, dim, num_classes), jnp.float32),
            "bias": jnp.zeros((num_heads, num_classes), jnp.float32)}


def as_layers(features: jax.Array) -> jax.Array:
    """``[B, F]`` → ``[B, 1, F]``; ``[B, L, F]`` unchanged."""
    return features[:, None] if features.ndim == 2 else features


def head_logits(heads: dict, features: jax.Array) -> jax.Array:
    """``features [B, L, F]`` → logits ``[B, L, C]`` (one head per layer)."""
    return jnp.einsum("blf,lfc->blc", features, heads["kernel"]) + heads["bias"]


def heads_loss(heads: dict, features: jax.Array, labels: jax.Array) -> jax.Array:
    """Sum over heads of each head's mean cross-entropy (the heads train independently)."""
    logits = head_logits(heads, features)
    labels = jnp.broadcast_to(labels[:, None], logits.shape[:2])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(axis=0).sum()


def heads_hits(heads: dict, features: jax.Array, labels: jax.Array) -> dict:
    """Per-example, per-head hits ``{'top1': bool [B, L], 'top5': ...}``."""
    logits = head_logits(heads, features)
    ranked = jnp.argsort(-logits, axis=-1)
    k5 = min(5, logits.shape[-1])
    return {"top1": ranked[..., 0] == labels[:, None],
            "top5": jnp.any(ranked[..., :k5] == labels[:, None, None], axis=-1)}


def make_optimizer(optim_cfg, total_steps: int, steps_per_epoch: int) -> tuple:
    """AdamW (weight decay on kernel and bias, like PyTorch AdamW over the classifier) or SGD + momentum."""
    warmup = optim_cfg.get("warmup_steps") or int(optim_cfg.get("warmup_epochs", 0) * steps_per_epoch)
    schedule = optim.cosine_schedule(optim_cfg.lr, optim_cfg.get("min_lr", 0.0), total_steps, warmup)
    name = optim_cfg.get("name", "adamw")
    if name == "adamw":
        tx = optax.adamw(schedule, b1=optim_cfg.get("b1", 0.9), b2=optim_cfg.get("b2", 0.999),
                         eps=optim_cfg.get("eps", 1e-8), weight_decay=optim_cfg.weight_decay)
    elif name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(optim_cfg.weight_decay),
                         optax.sgd(schedule, momentum=optim_cfg.get("momentum", 0.9)))
    else:
        raise ValueError(f"config.optim.name must be 'adamw' or 'sgd', got {name!r}")
    return tx, schedule


def summarize(hits: dict) -> dict:
    """Per-head accuracies (%) from concatenated hits ``[N, L]``: the best head and its top-1/top-5."""
    top1 = hits["top1"].mean(axis=0) * 100
    top5 = hits["top5"].mean(axis=0) * 100
    best = int(np.argmax(top1))
    out = {"top1": float(top1[best]), "top5": float(top5[best]), "best_layer": best + 1}
    if len(top1) > 1:
        out["per_layer_top1"] = [float(x) for x in top1]
    return out


# ----------------------------------------------------------------------------------------------- cached
@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """Head training on cached features: ``epochs``, ``batch_size``, ``optim`` (``config.optim``-like mapping: lr,
    min_lr, warmup_epochs, weight_decay, name adamw|sgd, ...), the ``seed`` of init and shuffling, and
    ``standardize``."""

    epochs: int
    batch_size: int
    optim: Any
    seed: int = 0
    standardize: bool = False  # scale each feature by the train split's mean/std (MAE's affine-free BatchNorm)


@functools.lru_cache(maxsize=16)
def _epoch_fn(optim_json: str, epochs: int, batch: int, steps_per_epoch: int) -> tuple:
    """``(tx, jitted epoch)`` for one optimiser setting (cached: the demo trains several probes alike)."""
    optim_cfg = ml_collections.ConfigDict(json.loads(optim_json))
    tx, _ = make_optimizer(optim_cfg, steps_per_epoch * epochs, steps_per_epoch)

    @jax.jit
    def run_epoch(heads, opt_state, train_f, train_y, key, epoch):
        order = jax.random.permutation(jax.random.fold_in(key, epoch), train_f.shape[0])

        def step(carry, i):
            heads, opt_state = carry
            idx = jax.lax.dynamic_slice_in_dim(order, i * batch, batch)
            loss, grads = jax.value_and_grad(heads_loss)(heads, train_f[idx], train_y[idx])
            updates, opt_state = tx.update(grads, opt_state, heads)
            return (optax.apply_updates(heads, updates), opt_state), loss

        (heads, opt_state), losses = jax.lax.scan(step, (heads, opt_state), jnp.arange(steps_per_epoch))
        return heads, opt_state, losses.mean()

    return tx, run_epoch


_hits = jax.jit(heads_hits)


def train_on_features(train_features: np.ndarray, train_labels: np.ndarray, eval_features: np.ndarray,
                      eval_labels: np.ndarray, num_classes: int, settings: ProbeSettings,
                      on_epoch: Optional[Callable[[int, dict], None]] = None, desc: str = "linear heads") -> dict:
    """Train linear heads on cached features ``[n, F]`` or ``[n, L, F]`` on device (one ``lax.scan`` per epoch
    over shuffled mini-batches; the last partial batch is dropped) and evaluate after every epoch (progress named
    ``desc``). Returns the last epoch's :func:`summarize` plus ``best_epoch``/``best_top1`` over epochs."""
    train_f = as_layers(np.asarray(train_features, np.float32))
    eval_f = as_layers(np.asarray(eval_features, np.float32))
    if settings.standardize:
        mean, std = train_f.mean(axis=0), train_f.std(axis=0) + 1e-6
        train_f, eval_f = (train_f - mean) / std, (eval_f - mean) / std
    train_f, eval_f = jnp.asarray(train_f), jnp.asarray(eval_f)
    train_y, eval_y = jnp.asarray(train_labels, jnp.int32), jnp.asarray(eval_labels, jnp.int32)
    n, layers, dim = train_f.shape
    batch = min(settings.batch_size, n)
    optim_json = json.dumps(dict(settings.optim), sort_keys=True)
    tx, run_epoch = _epoch_fn(optim_json, settings.epochs, batch, n // batch)
    key = jax.random.PRNGKey(settings.seed)
    heads = init_heads(jax.random.fold_in(key, 0), layers, dim, num_classes)
    opt_state = tx.init(heads)
    shuffle_key = jax.random.fold_in(key, 1)
    best = {"best_top1": -1.0, "best_epoch": 0}
    result = {}
    for epoch in progress.track(range(settings.epochs), desc, unit="epoch"):
        heads, opt_state, loss = run_epoch(heads, opt_state, train_f, train_y, shuffle_key, epoch)
        hits = [jax.device_get(_hits(heads, eval_f[i:i + 4096], eval_y[i:i + 4096]))
                for i in range(0, len(eval_y), 4096)]
        result = summarize({k: np.concatenate([h[k] for h in hits]) for k in hits[0]})
        result["loss"] = float(loss)
        if result["top1"] > best["best_top1"]:
            best = {"best_top1": result["top1"], "best_epoch": epoch + 1}
        if on_epoch is not None:
            on_epoch(epoch + 1, result)
    return {**result, **best}


# ----------------------------------------------------------------------------------------------- streamed
def make_stream_step(features: Callable, tx, schedule):
    """``(state, batch, encoder_params) → (state, metrics)``: frozen features of the batch, one head update."""
    def train_step(state: state_lib.TrainState, batch: dict, encoder_params):
        feats = as_layers(jax.lax.stop_gradient(features(encoder_params, on_device.normalized(batch["image"]))))
        loss, grads = jax.value_and_grad(heads_loss)(state.params, feats, batch["label"])
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
        return state, {"loss": loss, "lr": schedule(state.step - 1)}

    return train_step


def probe_iterator(config: ml_collections.ConfigDict, seed: int):
    """Augmented train views for the streamed probe: RandomResizedCrop(0.08–1) + flip, normalised."""
    data = config.data
    transform = augment.FinetuneTrainTransform(
        input_size=data.input_size, min_crop_scale=config.probe.get("min_crop_scale", 0.08), auto_augment="",
        color_jitter=0.0, interpolation=data.interpolation, re_prob=0.0)
    source = transforms.DecodedSource(sources.open_source(data.dataset, data.train_split, data.data_dir))
    ds = pipeline.make_dataset(source, transform=transforms.count_bad_records(transform),
                               global_batch_size=config.batch_size,
                               process_index=jax.process_index(), process_count=jax.process_count(), seed=seed,
                               num_workers=data.num_workers, read_threads=data.read_threads,
                               prefetch_batches=data.prefetch_batches)
    return iter(ds)


def _num_classes(config, *label_arrays) -> int:
    if config.get("num_classes"):
        return int(config.num_classes)
    return int(max(int(np.max(y)) for y in label_arrays)) + 1


def run(config: ml_collections.ConfigDict, workdir: str):
    common.log_header("linear_probe", config, workdir)
    common.prepare_workdir(config, workdir, save_config=False)  # config.json once the restore worked
    mesh = sharding.make_mesh(config.get("mesh"))
    pretrained = finetune.load_pretrained(config.pretrained.checkpoint, config.pretrained.get("format", ""))
    pretrained = at_resolution(pretrained, config.data.input_size)
    feature = resolve_feature(config.probe.feature, pretrained)
    model = encoder_model(pretrained, config.get("dtype", "float32"))
    params = jax.device_put(pretrained.params, sharding.replicated(mesh))
    features = feature_fn(model, feature)
    eval_batch = config.get("eval_batch_size") or config.batch_size
    writer = MetricsWriter(workdir)
    logging.info("linear probe on %s features of a %s encoder", feature, pretrained.source_kind)
    try:
        if config.probe.cache_features:
            result = _run_cached(config, features, params, eval_batch, mesh, writer)
        else:
            result = _run_streamed(config, workdir, features, params, eval_batch, mesh, writer)
    finally:
        writer.close()
    result.update(feature=feature, checkpoint=config.pretrained.checkpoint)
    if jax.process_index() == 0:
        storage.write_json(storage.join(workdir, "results.json"), result, indent=2)
    logging.info("linear probe: top-1 %.2f (layer %d)", result["top1"], result["best_layer"])
    return result


def _run_cached(config, features, params, eval_batch, mesh, writer) -> dict:
    train = knn.extract_features(features, config.data, config.data.train_split, eval_batch, mesh, params)
    test = knn.extract_features(features, config.data, config.data.eval_split, eval_batch, mesh, params)
    num_classes = _num_classes(config, train[1], test[1])
    batch = min(config.batch_size, len(train[1]))
    logging.info("%s", common.budget_line("linear_probe (cached features)", len(train[1]), batch, config.num_epochs,
                                          len(train[1]) // batch, len(train[1]) // batch * config.num_epochs))
    settings = ProbeSettings(config.num_epochs, config.batch_size, config.optim.to_dict(), config.seed,
                             config.probe.get("standardize", False))

    def on_epoch(epoch, result):
        writer.write_scalars(epoch, {"train/loss": result["loss"], "eval/top1": result["top1"],
                                     "eval/top5": result["top5"], "eval/best_layer": result["best_layer"]})

    return train_on_features(*train, *test, num_classes, settings, on_epoch)


def _run_streamed(config, workdir, features, encoder_params, eval_batch, mesh, writer) -> dict:
    if config.probe.get("standardize", False):
        raise ValueError("config.probe.standardize needs cached features (config.probe.cache_features=True)")
    if not config.get("num_classes"):
        raise ValueError("config.num_classes is required for the streamed linear probe (cache_features=False)")
    num_classes = int(config.num_classes)
    size = config.data.input_size
    probe = jax.eval_shape(features, encoder_params, jnp.zeros((1, size, size, 3), jnp.float32))
    layers, dim = (1, probe.shape[-1]) if len(probe.shape) == 2 else probe.shape[1:]
    steps_per_epoch = common.steps_per_epoch(config)
    total_steps = steps_per_epoch * config.num_epochs
    tx, schedule = make_optimizer(config.optim, total_steps, steps_per_epoch)
    heads = init_heads(jax.random.PRNGKey(config.seed), layers, dim, num_classes)
    state = jax.device_put(state_lib.create(heads, tx, seed=config.seed), sharding.replicated(mesh))
    iterator = probe_iterator(config, config.seed)
    manager = ckpt_lib.make_manager(workdir, config.get("keep_checkpoints", 3))
    state = loop.resume(manager, state, iterator)
    common.write_config(config, workdir)
    step_fn = jax.jit(make_stream_step(features, tx, schedule), donate_argnums=0)
    train_step = functools.partial(_with_encoder, step_fn, encoder_params)
    hits_fn = jax.jit(lambda heads, p, b: heads_hits(heads, as_layers(features(p, on_device.normalized(b["image"]))),
                                                     b["label"]))
    results = {}

    def epoch_end(state, epoch):
        iterator = pipeline.make_eval_iterator(config.data, eval_batch)
        outs = common.eval_pass(lambda b: hits_fn(state.params, encoder_params, b), iterator, mesh)
        result = summarize({k: np.concatenate([o[k] for o in outs]) for k in outs[0]})
        writer.write_scalars(int(state.step), {"eval/top1": result["top1"], "eval/top5": result["top5"],
                                               "eval/best_layer": result["best_layer"], "epoch": epoch})
        if result["top1"] > results.get("best_top1", -1.0):
            results.update(best_top1=result["top1"], best_epoch=epoch)
        results.update(result)
        return state

    state = loop.run(workdir=workdir, state=state, train_step=train_step, iterator=iterator, mesh=mesh,
                     total_steps=total_steps, steps_per_epoch=steps_per_epoch, batch_size=config.batch_size,
                     log_every=config.get("log_every_steps", 50),
                     checkpoint_every=config.get("checkpoint_every_steps", 1000), manager=manager, writer=writer,
                     epoch_end=epoch_end, desc="linear_probe", profile=config.get("profile", ()))
    if not results:  # resumed a finished run: evaluate the restored heads once
        epoch_end(state, config.num_epochs)
    return results


def _with_encoder(step_fn, encoder_params, state, batch):
    return step_fn(state, batch, encoder_params)
