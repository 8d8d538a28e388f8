"""Task ``finetune``: image classification from a pretrained encoder, the official BEiT v2 recipe (reference §3.1).

* The encoder comes from one of our weight directories (``beit_pretrain`` from the pretrain task's
  ``<workdir>/model``, or ``vit``, e.g. converted with ``python -m beitv2_jax.convert``) or from a PyTorch file
  plus its ``--format``. It becomes a ViT with per-layer relative position tables (the shared table copied into
  every block, as the official loader does), resized for another resolution (``model.rel_pos_interpolation``:
  the official cubic spline by default, timm's linear resize as an option), mean pooling → ``fc_norm`` → head
  (init × ``head_init_scale``); the pretrained ``norm``, ``mask_token``, LM head and aggregation layers are unused.
* AdamW (no decay for 1-D params, biases, ``cls_token``, ``pos_embed``; per-layer tables are decayed), layer-wise
  lr decay, warmup + cosine per step, drop path, mixup/cutmix with label smoothing, RandAugment, random erasing.
* Top-1/top-5 on the eval split every ``eval_every_epochs``; ``<workdir>/best_model`` (best top-1) and
  ``<workdir>/model`` (last) are weight directories (kind ``vit``) for ``beitv2_jax.export``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from beitv2_jax import storage
from beitv2_jax.data import augment, on_device, pipeline, sources, transforms
from beitv2_jax.models import relpos, vit
from beitv2_jax.train import checkpoint as ckpt_lib
from beitv2_jax.train import layer_decay, loop, optim, sharding
from beitv2_jax.train import state as state_lib
from beitv2_jax.train.metrics import MetricsWriter
from beitv2_jax.train.tasks import common

# Architecture fields the fine-tune model takes over from the pretrained encoder.
ENCODER_FIELDS = ("patch_size", "width", "depth", "num_heads", "mlp_ratio", "qkv_bias", "patch_embed_bias",
                  "use_abs_pos", "layer_scale_init", "layer_norm_eps", "activation", "ln_pre", "use_cls_token")
# Parameters a pretrained encoder may lack: they start from the fine-tune model's init.
FRESH_PATTERNS = (r"^fc_norm/", r"^head/", r"^norm/")
_BLOCK_TABLE = re.compile(r"^blocks_\d+/attn/relative_position_bias_table$")
SHARED_TABLE = "rel_pos_bias/relative_position_bias_table"


# ----------------------------------------------------------------------------------------------- loading
@dataclasses.dataclass
class Pretrained:
    """A pretrained encoder as a plain ViT: ``params`` (nested numpy), ``config`` (ViT fields),
    ``source_kind`` (``beit_pretrain`` | ``vit``), ``patch_aggregation`` (pretrained with the cls_pt head),
    ``dropped`` (parameters of the source not part of the encoder: LM head, aggregation layers, ...)."""

    params: dict
    config: dict
    source_kind: str
    patch_aggregation: bool
    dropped: list


def load_pretrained(path: str, fmt: str = "") -> Pretrained:
    """Our weight directory, a Hugging Face folder, a PyTorch file (layout ``fmt``: ``official_beitv2``, ``timm``,
    ``hf_beit``, ...; detected when empty) or an official checkpoint name → the encoder (see :func:`as_encoder`).
    Read by ``beitv2_jax.api.load_weights``, the one loader of every model source."""
    from beitv2_jax import api

    weights = api.load_weights(path, fmt or None)
    encoder = as_encoder(weights.variables, weights.kind, weights.config)
    if weights.left_out:  # patch-aggregation layers the file could not place: the encoder had them
        encoder = dataclasses.replace(encoder, patch_aggregation=True, dropped=encoder.dropped + weights.left_out)
    return encoder


def as_encoder(variables: dict, kind: str, config: dict) -> Pretrained:
    """Variables of a ``beit_pretrain`` model (→ its backbone + final norm) or a ``vit`` → :class:`Pretrained`."""
    from beitv2_jax.convert import layouts, model_shapes

    dropped, aggregation = [], False
    if kind == "beit_pretrain":
        aggregation = model_shapes.normalize_config(kind, config).get("head_layers", 0) > 0
        variables, config, dropped = layouts.pretrain_as_backbone(variables, config)
        dropped = [d[len("params/"):] if d.startswith("params/") else d for d in dropped]
    elif kind != "vit":
        raise ValueError(f"a {kind!r} model is not an image encoder (beit_pretrain or vit)")
    fields = set(vit.VisionTransformer.__dataclass_fields__) - {"parent", "name", "dtype"}
    config = {k: v for k, v in model_shapes.normalize_config("vit", config).items() if k in fields}
    params = jax.tree.map(np.asarray, flax.linen.meta.unbox(variables["params"]))
    return Pretrained(params, config, kind, aggregation, dropped)


def finetune_vit_config(encoder: dict, image_size: int, num_classes: int, *, pooling: str = "mean",
                        rel_pos: str = "per_layer", drop_path_rate: float = 0.0, head_init_scale: float = 0.001,
                        init_truncation: float = 100.0, attention_impl: str = "auto",
                        remat_policy: str = "none") -> dict:
    """ViT fields of the classifier built on ``encoder`` (its config): mean pooling + ``fc_norm`` (official) or
    CLS + final ``norm`` (``pooling='cls'``); per-layer (official) or shared tables when the encoder has any.
    ``init_truncation=100`` ≈ timm's trunc_normal(std=.02, a=−2, b=2) used for the official head init."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"config.model.pooling must be 'mean' or 'cls', got {pooling!r}")
    if rel_pos not in ("per_layer", "shared"):
        raise ValueError(f"config.model.rel_pos must be 'per_layer' or 'shared', got {rel_pos!r}")
    cfg = {k: encoder[k] for k in ENCODER_FIELDS}
    cfg.update(image_size=int(image_size), rel_pos=rel_pos if encoder["rel_pos"] != "none" else "none",
               use_mask_token=False, use_final_norm=pooling == "cls", use_fc_norm=pooling == "mean",
               pooling=pooling, num_classes=int(num_classes), head_bias=True, head_init_scale=float(head_init_scale),
               drop_path_rate=float(drop_path_rate), init_truncation=float(init_truncation),
               attention_impl=attention_impl, remat_policy=remat_policy)
    return cfg


def _flat(tree) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(flax.linen.meta.unbox(tree)).items()}


def _unflat(flat: dict) -> dict:
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _bicubic_matrix(src: int, dst: int) -> np.ndarray:
    """``[dst, src]`` weights of PyTorch ``interpolate(mode='bicubic', align_corners=False)`` (A = −0.75)."""
    a = -0.75
    out = np.zeros((dst, src), np.float64)
    for i in range(dst):
        x = (i + 0.5) * src / dst - 0.5
        x0 = int(np.floor(x))
        t = x - x0
        coeffs = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                  ((a + 2) * t - (a + 3)) * t * t + 1,
                  ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
                  ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
        for k, c in enumerate(coeffs):
            out[i, min(max(x0 - 1 + k, 0), src - 1)] += c
    return out


def resize_pos_embed(pos: np.ndarray, new_grid: tuple, num_prefix_tokens: int = 1) -> np.ndarray:
    """Absolute positions ``[1, prefix + h·w, D]`` → ``[1, prefix + H·W, D]``: the patch grid resized bicubically
    like the official fine-tuning loader (``F.interpolate(bicubic, align_corners=False)``), prefix tokens kept."""
    prefix, grid = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    side = int(round(grid.shape[1] ** 0.5))
    if side * side != grid.shape[1]:
        raise ValueError(f"pos_embed {pos.shape}: the patch positions do not form a square grid")
    if (side, side) == tuple(new_grid):
        return pos
    grid = grid.reshape(side, side, -1).astype(np.float64)
    resized = np.einsum("ys,xt,sth->yxh", _bicubic_matrix(side, new_grid[0]), _bicubic_matrix(side, new_grid[1]),
                        grid).reshape(1, new_grid[0] * new_grid[1], -1)
    return np.concatenate([prefix, resized.astype(pos.dtype)], axis=1)


def expand_shared_rel_pos(params: dict, depth: int) -> dict:
    """Copy ``rel_pos_bias/relative_position_bias_table`` into every block's ``attn`` (official fine-tune loader);
    the shared table is removed. ``params`` nested, returns a new nested dict."""
    flat = _flat(params)
    if SHARED_TABLE not in flat:
        raise ValueError(f"no shared relative position table ({SHARED_TABLE}) to expand")
    table = flat.pop(SHARED_TABLE)
    for i in range(depth):
        flat[f"blocks_{i}/attn/relative_position_bias_table"] = table.copy()
    return _unflat(flat)


def adapt_pretrained(pretrained: Pretrained, target_cfg: dict, init_params,
                     rel_pos_interpolation: str = "official_cubic") -> tuple:
    """The fine-tune model's params from the pretrained encoder: tables copied per layer and resized
    (``rel_pos_interpolation``: ``official_cubic`` | ``timm_linear``, see ``relpos.resize_rel_pos_bias_table``),
    positions resized, the head kept only when its shape matches; ``fc_norm``/``head`` (and ``norm`` for CLS pooling
    from a mean-pooling encoder) start from ``init_params``. Returns ``(params, report)`` with report keys ``loaded``,
    ``initialised`` and ``unused`` (paths). Any other missing parameter or shape mismatch raises ``ValueError``."""
    src = _flat(pretrained.params)
    init = _flat(init_params)
    old_window = relpos.window_for_image(pretrained.config["image_size"], pretrained.config["patch_size"])
    new_window = relpos.window_for_image(target_cfg["image_size"], target_cfg["patch_size"])
    used, out, fresh, problems = set(), {}, [], []
    for path, init_value in init.items():
        if _BLOCK_TABLE.match(path) or path == SHARED_TABLE:
            key = path if path in src else SHARED_TABLE
            value = None if key not in src else relpos.resize_rel_pos_bias_table(
                src[key], new_window, old_window, method=rel_pos_interpolation)
        elif path == "pos_embed" and path in src:
            key, value = path, resize_pos_embed(src[path], new_window, int(target_cfg["use_cls_token"]))
        else:
            key, value = path, src.get(path)
        if value is None:
            if any(re.match(p, path) for p in FRESH_PATTERNS):
                out[path] = init_value
                fresh.append(path)
            else:
                problems.append(f"{path}: not in the pretrained encoder")
            continue
        used.add(key)
        if value.shape != init_value.shape:
            if path.startswith("head/"):  # official: a head of another size is dropped
                out[path] = init_value
                fresh.append(path)
                continue
            problems.append(f"{path}: pretrained {value.shape} vs model {init_value.shape}")
            continue
        out[path] = value.astype(init_value.dtype)
    if problems:
        raise ValueError("the pretrained encoder does not fit the fine-tune model:\n  " + "\n  ".join(problems))
    unused = sorted(set(src) - used) + sorted(pretrained.dropped)
    report = {"loaded": sorted(set(out) - set(fresh)), "initialised": sorted(fresh), "unused": unused}
    return _unflat(out), report


def adapt_pretrained_segmentation(pretrained: Pretrained, seg_cfg: dict, init_params,
                                  rel_pos_interpolation: str = "official_cubic") -> tuple:
    """A :class:`~beitv2_jax.models.segmentation.SegmentationModel`'s params (``seg_cfg`` from
    ``segmentation.segmentation_config``) from a pretrained encoder: ``backbone/<ViT>`` loaded as in
    :func:`adapt_pretrained` (the shared table copied into every block and resized to the new window; the official
    segmentation loader, ``mmcv_custom/checkpoint.py``, uses the cubic resize), ``backbone/fpn*``, ``decode_head``
    and ``auxiliary_head`` from ``init_params``. Returns ``(params, report)`` like :func:`adapt_pretrained`."""
    init = _flat(init_params)
    backbone = {k[len("backbone/"):]: v for k, v in init.items()
                if k.startswith("backbone/") and not re.match(r"^backbone/fpn\d", k)}
    loaded, report = adapt_pretrained(pretrained, seg_cfg["backbone"], _unflat(backbone), rel_pos_interpolation)
    out = dict(init)
    out.update({f"backbone/{k}": v for k, v in _flat(loaded).items()})
    fresh = sorted(set(init) - {f"backbone/{k}" for k in backbone})
    report = {"loaded": [f"backbone/{k}" for k in report["loaded"]],
              "initialised": [f"backbone/{k}" for k in report["initialised"]] + fresh, "unused": report["unused"]}
    return _unflat(out), report


# ----------------------------------------------------------------------------------------------- steps
def classification_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean soft-target cross-entropy (timm ``SoftTargetCrossEntropy``; label smoothing lives in the targets)."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def make_train_step(model: vit.VisionTransformer, tx, schedule, mixup: augment.Mixup):
    def loss_fn(params, images, targets, rng):
        out = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
        return classification_loss(out["logits"], targets)

    def train_step(state: state_lib.TrainState, batch: dict):
        images, targets = mixup(state_lib.step_rng(state, "mixup"), on_device.normalized(batch["image"]),
                                batch["label"])
        loss, grads = jax.value_and_grad(loss_fn)(state.params, images, targets,
                                                  state_lib.step_rng(state, "dropout"))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & optim.is_finite_tree(grads) & optim.is_finite_tree(params)
        bad_steps = jnp.where(finite, 0, state.extra["bad_steps"] + 1)
        extra = {**state.extra, "bad_steps": bad_steps}
        updated = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
        skipped = state.replace(step=state.step + 1, extra=extra)
        metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optim.global_norm(grads),
                   "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return state_lib.select_tree(finite, updated, skipped), metrics

    return train_step


def topk_correct(logits: jax.Array, labels: jax.Array, ks=(1, 5)) -> dict:
    """Per-example hits ``{'top1': bool [B], 'top5': ...}`` (k capped at the number of classes)."""
    ranked = jnp.argsort(-logits, axis=-1)
    return {f"top{k}": jnp.any(ranked[:, :min(k, logits.shape[-1])] == labels[:, None], axis=-1) for k in ks}


def make_eval_step(model: vit.VisionTransformer):
    """Jitted ``(params, batch) → {'top1', 'top5': bool [B], 'loss': [B]}`` (params: an argument, not constants)."""
    def eval_step(params, batch):
        logits = model.apply({"params": params}, on_device.normalized(batch["image"]))["logits"].astype(jnp.float32)
        hits = topk_correct(logits, batch["label"])
        hits["loss"] = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return hits

    return jax.jit(eval_step)


def evaluate(eval_step, params, data_config, batch_size: int, mesh) -> dict:
    """Top-1/top-5 accuracy (%) and mean loss on the eval split (resize 256/224 · crop, no augmentation)."""
    iterator = pipeline.make_eval_iterator(data_config, batch_size)
    outs = common.eval_pass(lambda batch: eval_step(params, batch), iterator, mesh)
    merged = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return {"top1": float(merged["top1"].mean() * 100), "top5": float(merged["top5"].mean() * 100),
            "loss": float(merged["loss"].mean()), "num_examples": int(len(merged["top1"]))}


# ----------------------------------------------------------------------------------------------- run
def make_train_iterator(config: ml_collections.ConfigDict, seed: int):
    """Endless augmented training batches ``{'image': f32 [b, s, s, 3], 'label': i32 [b], 'bad_records': i32 [b]}``
    (undecodable records replaced and flagged by ``transforms.DecodedSource``, counted by the loop)."""
    a, data = config.augment, config.data
    transform = augment.FinetuneTrainTransform(
        input_size=data.input_size, min_crop_scale=a.min_crop_scale, hflip=a.hflip, auto_augment=a.auto_augment,
        color_jitter=a.color_jitter, interpolation=data.interpolation, re_prob=a.re_prob, re_mode=a.re_mode,
        re_count=a.re_count)
    source = transforms.DecodedSource(sources.open_source(data.dataset, data.train_split, data.data_dir))
    ds = pipeline.make_dataset(source, transform=transforms.count_bad_records(transform),
                               global_batch_size=config.batch_size,
                               process_index=jax.process_index(), process_count=jax.process_count(), seed=seed,
                               num_workers=data.num_workers, read_threads=data.read_threads,
                               prefetch_batches=data.prefetch_batches)
    return iter(ds)


def model_from_config(cfg: dict, dtype: str = "float32") -> vit.VisionTransformer:
    return vit.VisionTransformer(**cfg, dtype=common.compute_dtype(dtype))


def init_params(model: vit.VisionTransformer, seed: int) -> tuple:
    """``(params, boxed_shapes)``: unboxed initial parameters and their logically named shapes (for sharding)."""
    size = model.image_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), images)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(seed), images)
    return flax.linen.meta.unbox(variables["params"]), boxed["params"]


def save_model(directory: str, params, cfg: dict, info: Optional[dict] = None) -> None:
    from beitv2_jax.convert import store

    store.save_variables(directory, {"params": sharding.host_copy(params)}, "vit", cfg, info=info)


def run(config: ml_collections.ConfigDict, workdir: str):
    common.log_header("finetune", config, workdir)
    common.prepare_workdir(config, workdir, save_config=False)  # config.json once the restore worked
    mesh = sharding.make_mesh(config.get("mesh"))
    m = config.model
    pretrained = load_pretrained(config.pretrained.checkpoint, config.pretrained.get("format", ""))
    cfg = finetune_vit_config(pretrained.config, config.data.input_size, m.num_classes, pooling=m.pooling,
                              rel_pos=m.rel_pos, drop_path_rate=m.drop_path_rate,
                              head_init_scale=m.head_init_scale, init_truncation=m.init_truncation,
                              attention_impl=m.attention_impl, remat_policy=m.remat_policy)
    model = model_from_config(cfg, config.get("dtype", "float32"))
    initial, boxed = init_params(model, config.seed)
    params, report = adapt_pretrained(pretrained, cfg, initial,
                                      m.get("rel_pos_interpolation", "official_cubic"))
    logging.info("fine-tune model: %d parameters; %d loaded, fresh: %s; unused from the checkpoint: %s",
                 sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params)), len(report["loaded"]),
                 report["initialised"], report["unused"])

    steps_per_epoch = common.steps_per_epoch(config)
    total_steps = steps_per_epoch * config.num_epochs
    lr_scale = layer_decay.scale_by_layer_decay(params, cfg["depth"], config.optim.layer_decay)
    tx, schedule = optim.make_optimizer(config.optim, params, total_steps, steps_per_epoch, lr_scale_fn=lr_scale)
    extra = {"bad_steps": jnp.zeros((), jnp.int32), "best_top1": jnp.full((), -1.0, jnp.float32)}
    state = state_lib.create(params, tx, extra=extra, seed=config.seed)
    state, state_sh = common.shard_state(state, boxed, tx, mesh, config)

    mix = config.mixup
    mixup = augment.Mixup(num_classes=m.num_classes, mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha,
                          prob=mix.prob, switch_prob=mix.switch_prob, label_smoothing=config.label_smoothing)
    iterator = make_train_iterator(config, config.seed)
    manager = ckpt_lib.make_manager(workdir, config.get("keep_checkpoints", 3))
    state = loop.resume(manager, state, iterator)
    common.write_config(config, workdir)
    train_step = jax.jit(make_train_step(model, tx, schedule, mixup), donate_argnums=0,
                         in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                         out_shardings=(state_sh, sharding.replicated(mesh)))
    eval_step = make_eval_step(model)
    eval_batch = config.get("eval_batch_size") or config.batch_size
    writer = MetricsWriter(workdir)
    results_path = storage.join(workdir, "results.json")

    def epoch_end(state, epoch):
        every = config.get("eval_every_epochs", 1)
        if every <= 0 or (epoch % every and epoch != config.num_epochs):
            return state
        result = evaluate(eval_step, state.params, config.data, eval_batch, mesh)
        writer.write_scalars(int(state.step), {"eval/top1": result["top1"], "eval/top5": result["top5"],
                                               "eval/loss": result["loss"], "epoch": epoch})
        logging.info("epoch %d: eval top-1 %.2f top-5 %.2f", epoch, result["top1"], result["top5"])
        best = float(jax.device_get(state.extra["best_top1"]))
        if result["top1"] > best and config.get("save_best", True):
            save_model(storage.join(workdir, "best_model"), state.params, cfg,
                       info={"epoch": epoch, "step": int(state.step), **result})
            best = result["top1"]
            common.update_json(results_path, {"best": {"epoch": epoch, **result}})
        common.update_json(results_path, {"last": {"epoch": epoch, **result}})
        best_top1 = jax.device_put(jnp.float32(max(best, result["top1"])), sharding.replicated(mesh))
        return state.replace(extra={**state.extra, "best_top1": best_top1})

    try:
        state = loop.run(workdir=workdir, state=state, train_step=train_step, iterator=iterator, mesh=mesh,
                         total_steps=total_steps, steps_per_epoch=steps_per_epoch, batch_size=config.batch_size,
                         log_every=config.get("log_every_steps", 50),
                         checkpoint_every=config.get("checkpoint_every_steps", 1000),
                         max_bad_steps=config.get("max_bad_steps", 10),
                         divergence_factor=config.get("divergence_factor", 0.0), manager=manager, writer=writer,
                         epoch_end=epoch_end, desc="finetune", inject_nan_steps=config.get("inject_nan_steps", ()),
                         profile=config.get("profile", ()))
    finally:
        writer.close()
    save_model(storage.join(workdir, "model"), state.params, cfg, info={"step": int(state.step)})
    logging.info("fine-tuned model written to %s", storage.join(workdir, "model"))
    return state
