"""Task ``vqkd``: train the VQ-KD tokenizer to regress a frozen teacher's features.

loss = (1 − cos(decoder output, teacher target)) + commitment; the codebook follows by EMA inside the step.
At the end the tokenizer is written to ``<workdir>/tokenizer`` (loadable by ``pretrain`` as
``config.tokenizer.checkpoint`` and by ``python -m beitv2_jax.tokenize``).
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from beitv2_jax import storage
from beitv2_jax.data import on_device, pipeline
from beitv2_jax.models import quantizer as quant
from beitv2_jax.models import teachers as teachers_lib
from beitv2_jax.models import vqkd as vqkd_lib
from beitv2_jax.train import checkpoint as ckpt_lib
from beitv2_jax.train import loop, optim, sharding
from beitv2_jax.train import state as state_lib
from beitv2_jax.train.metrics import MetricsWriter
from beitv2_jax.train.tasks import common


def load_teacher(config: ml_collections.ConfigDict):
    """``(Teacher, params)`` for ``config.teacher``; the teacher computes in ``config.dtype`` (float32 params,
    float32 targets for the cosine loss)."""
    t = config.teacher
    return teachers_lib.teacher_from_checkpoint(
        t.kind, t.checkpoint, layer=t.get("layer"), use_norm=t.get("use_norm", True),
        normalisation=t.get("normalisation"), image_size=config.data.input_size,
        dtype=config.get("dtype", "float32"))


def model_config(config: ml_collections.ConfigDict, teacher_dim: int) -> dict:
    """The dict that rebuilds the tokenizer with ``vqkd.build_vqkd`` (stored next to its weights)."""
    cfg = config.model.to_dict()
    cfg.update(image_size=config.data.input_size, teacher_dim=teacher_dim, dtype=config.get("dtype", "float32"))
    return cfg


def make_train_step(model: vqkd_lib.VQKD, teacher: teachers_lib.Teacher, tx, schedule):
    def loss_fn(params, model_state, images, teacher_params, rng):
        target = teacher.features(teacher_params, images)
        out, new_model_state = model.apply({"params": params, **model_state}, images, train=True,
                                           mutable=["codebook"], rngs={"dropout": rng})
        rec_loss = vqkd_lib.cosine_rec_loss(out["features"], target)
        loss = rec_loss + out["quant_loss"]
        return loss, (new_model_state, out, rec_loss)

    def train_step(state: state_lib.TrainState, batch: dict, teacher_params):
        rng = state_lib.step_rng(state, "dropout")
        (loss, (new_model_state, out, rec_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state, on_device.unit_float(batch["image"]), teacher_params, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & optim.is_finite_tree(grads) & optim.is_finite_tree(params)
        extra = {"epoch_counts": state.extra["epoch_counts"] + out["bins"],
                 "bad_steps": jnp.where(finite, 0, state.extra["bad_steps"] + 1)}
        updated = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                model_state=dict(new_model_state), extra=extra)
        skipped = state.replace(step=state.step + 1, extra={**state.extra, "bad_steps": extra["bad_steps"]})
        new_state = state_lib.select_tree(finite, updated, skipped)
        metrics = {"loss": loss, "rec_loss": rec_loss, "quant_loss": out["quant_loss"],
                   "perplexity": out["perplexity"], "lr": schedule(state.step), "grad_norm": optim.global_norm(grads),
                   "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return new_state, metrics

    return train_step


def evaluate(model, variables, teacher, teacher_params, config, mesh):
    """Reconstruction loss and code counts over the eval split → ``(mean rec_loss, counts [K])``."""

    @jax.jit
    def eval_fn(batch):
        images = on_device.unit_float(batch["image"])
        out = model.apply(variables, images, train=False)
        target = teacher.features(teacher_params, images)
        cos = jnp.sum(quant.l2_normalize(out["features"]) * quant.l2_normalize(target), -1)
        return {"rec_loss": 1.0 - cos.mean(-1), "indices": out["indices"]}

    batch = config.get("eval_batch_size") or config.batch_size
    iterator = pipeline.make_eval_iterator(config.data, batch)
    outs = common.eval_pass(eval_fn, iterator, mesh, "vqkd eval")
    rec = np.concatenate([o["rec_loss"] for o in outs])
    indices = np.concatenate([o["indices"] for o in outs]).reshape(-1)
    return float(rec.mean()), np.bincount(indices, minlength=model.num_codes)


def run(config: ml_collections.ConfigDict, workdir: str):
    common.log_header("vqkd", config, workdir)
    common.prepare_workdir(config, workdir, save_config=False)  # config.json once the restore worked
    mesh = sharding.make_mesh(config.get("mesh"))
    teacher, teacher_params = load_teacher(config)
    cfg = model_config(config, teacher.feature_dim)
    model = vqkd_lib.build_vqkd(cfg)

    steps_per_epoch = common.steps_per_epoch(config)
    total_steps = steps_per_epoch * config.num_epochs
    size = config.data.input_size
    variables = jax.jit(model.init)(jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 3), jnp.float32))
    variables = flax.linen.meta.unbox(variables)  # logical names are read from the model when sharding
    params = variables["params"]
    optim_cfg = config.optim.copy_and_resolve_references()
    with optim_cfg.unlocked():
        optim_cfg.lr = config.optim.lr * config.batch_size / config.optim.get("lr_batch_base", 128)
    tx, schedule = optim.make_optimizer(optim_cfg, params, total_steps, steps_per_epoch)
    extra = {"epoch_counts": jnp.zeros((model.num_codes,), jnp.float32), "bad_steps": jnp.zeros((), jnp.int32)}
    state = state_lib.create(params, tx, model_state={"codebook": variables["codebook"]}, extra=extra,
                             seed=config.seed)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))
    state, state_sh = common.shard_state(state, boxed["params"], tx, mesh, config)
    teacher_params = jax.device_put(teacher_params, sharding.replicated(mesh))

    iterator = pipeline.make_tokenizer_iterator(config.data, config.batch_size, seed=config.seed)
    manager = ckpt_lib.make_manager(workdir, config.get("keep_checkpoints", 3))
    state = loop.resume(manager, state, iterator)
    common.write_config(config, workdir)
    step_fn = common.jit_train_step(make_train_step(model, teacher, tx, schedule), state_sh, mesh)
    train_step = functools.partial(_with_teacher, step_fn, teacher_params)
    writer = MetricsWriter(workdir)

    def epoch_end(state, epoch):
        counts = np.asarray(jax.device_get(state.extra["epoch_counts"]))
        scalars = {"train/codebook_usage": float((counts > 0).mean()),
                   "train/unused_codes": float((counts == 0).sum())}
        if config.get("eval_every_epochs", 1) and (epoch % config.get("eval_every_epochs", 1) == 0
                                                   or epoch == config.num_epochs):
            rec, eval_counts = evaluate(model, {"params": state.params, **state.model_state}, teacher,
                                        teacher_params, config, mesh)
            scalars.update({"eval/rec_loss": rec, "eval/codebook_usage": float((eval_counts > 0).mean()),
                            "eval/unused_codes": float((eval_counts == 0).sum()),
                            "eval/perplexity": common.code_perplexity(eval_counts)})
            if jax.process_index() == 0:
                img = common.usage_histogram_png(eval_counts, storage.join(workdir, "codebook_usage.png"),
                                                 f"eval code usage, epoch {epoch}")
                writer.write_image(epoch * steps_per_epoch, "codebook_usage", img)
        writer.write_scalars(epoch * steps_per_epoch, scalars)
        logging.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in scalars.items()})
        return state.replace(extra={**state.extra, "epoch_counts": jnp.zeros_like(state.extra["epoch_counts"])})

    state = loop.run(workdir=workdir, state=state, train_step=train_step, iterator=iterator, mesh=mesh,
                     total_steps=total_steps, steps_per_epoch=steps_per_epoch, batch_size=config.batch_size,
                     log_every=config.get("log_every_steps", 50), checkpoint_every=config.get(
                         "checkpoint_every_steps", 1000), max_bad_steps=config.get("max_bad_steps", 10),
                         divergence_factor=config.get("divergence_factor", 0.0),
                         manager=manager, writer=writer, epoch_end=epoch_end, desc="vqkd",
                     inject_nan_steps=config.get("inject_nan_steps", ()),
                     profile=config.get("profile", ()))
    writer.close()
    export_tokenizer(storage.join(workdir, "tokenizer"), state, cfg)
    return state


def export_tokenizer(directory: str, state, cfg: dict) -> None:
    """Write the trained tokenizer (params + codebook + its config) in the converter's store format."""
    from beitv2_jax.convert import store

    variables = sharding.host_copy({"params": state.params, **state.model_state})
    store.save_variables(directory, variables, "vqkd", cfg)
    logging.info("tokenizer written to %s", directory)


def load_tokenizer(directory: str, dtype: str | None = None):
    """``(VQKD model, variables)`` from a directory written by ``export_tokenizer`` or the converter; ``dtype``
    (e.g. the run's ``config.dtype``) overrides the stored compute dtype (the quantizer stays float32)."""
    from beitv2_jax import api

    tokenizer = api.tokenizer_from_weights(api.load_weights(directory), dtype)
    return tokenizer.module, tokenizer.variables


def _with_teacher(step_fn, teacher_params, state, batch):
    return step_fn(state, batch, teacher_params)

