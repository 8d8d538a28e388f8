"""Task ``pretrain``: masked image modeling against a frozen tokenizer (BEiT v2, BEiT v1, mc-BEiT).

Per step: labels = tokenizer codes of the tokenizer view (inside the jitted step); the backbone sees the
ImageNet-normalised view with the block-wise mask; loss = CE(final layer) + CE(patch-aggregation branch) over
the ``num_masked_patches`` masked positions. ``config.tokenizer.kind`` picks the tokenizer (``vqkd``: BEiT v2,
``dvae``: the DALL-E encoder of BEiT v1) and ``config.targets`` the targets (``hard`` code ids, or mc-BEiT's
``multi_choice`` soft targets, see ``train/targets.py``). The pretrained model is written to ``<workdir>/model``.
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from beitv2_jax import storage
from beitv2_jax.data import on_device, pipeline
from beitv2_jax.models import beit as beit_lib
from beitv2_jax.train import checkpoint as ckpt_lib
from beitv2_jax.train import loop, optim, sharding
from beitv2_jax.train import state as state_lib
from beitv2_jax.train import targets as targets_lib
from beitv2_jax.train.tasks import common

BACKBONE_KEYS = ("patch_size", "width", "depth", "num_heads", "mlp_ratio", "layer_scale_init", "drop_path_rate",
                 "init_std", "init_truncation", "attention_impl", "remat_policy")


def model_config(config: ml_collections.ConfigDict) -> dict:
    """The dict that rebuilds the model with ``build_model`` (stored next to its weights)."""
    m = config.model
    if m.get("patch_size", config.data.patch_size) != config.data.patch_size:
        raise ValueError(f"config.model.patch_size={m.patch_size} differs from config.data.patch_size="
                         f"{config.data.patch_size} (the mask generator's grid); set both to the same value")
    backbone = {k: m[k] for k in BACKBONE_KEYS if k in m}
    backbone.update(image_size=config.data.input_size)
    return {"backbone": backbone, "vocab_size": m.vocab_size, "num_masked_patches": config.data.num_masked_patches,
            "early_layers": m.early_layers, "head_layers": m.head_layers, "dtype": config.get("dtype", "float32")}


def build_model(cfg: dict) -> beit_lib.BEiTPretrainModel:
    backbone = dict(cfg["backbone"])
    backbone["dtype"] = common.compute_dtype(cfg.get("dtype", "float32"))
    return beit_lib.BEiTPretrainModel(backbone=beit_lib.beit_backbone(**backbone), vocab_size=cfg["vocab_size"],
                                      num_masked_patches=cfg["num_masked_patches"],
                                      early_layers=cfg["early_layers"], head_layers=cfg["head_layers"])


def mim_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy of ``logits [B, K, V]`` against ``labels [B, K]``."""
    return targets_lib.hard_cross_entropy(logits, labels), targets_lib.accuracy(logits, labels)


def make_train_step(model: beit_lib.BEiTPretrainModel, tokenizer, tx, schedule,
                    settings: targets_lib.TargetSettings = targets_lib.TargetSettings()):
    """``tokenizer``: a ``targets.FrozenTokenizer`` or a bare VQ-KD / dVAE module; ``settings``: hard or mc-BEiT
    targets."""
    tokenizer = targets_lib.as_frozen(tokenizer)

    def loss_fn(params, image, mask, tokens, rng):
        out = model.apply({"params": params}, image, mask, train=True, rngs={"dropout": rng})
        return targets_lib.labels_and_loss(out, tokens, settings)

    def train_step(state: state_lib.TrainState, batch: dict, tokenizer_variables):
        image, tokenizer_image = on_device.pretrain_views(batch)  # uint8 on the wire → float32 here
        positions = beit_lib.masked_positions(batch["mask"], model.num_masked_patches)  # = the model's positions
        tokens = tokenizer.outputs(tokenizer_variables, tokenizer_image, settings.soft, positions)
        rng = state_lib.step_rng(state, "dropout")
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, image, batch["mask"],
                                                                           tokens, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & optim.is_finite_tree(grads) & optim.is_finite_tree(params)
        bad_steps = jnp.where(finite, 0, state.extra["bad_steps"] + 1)
        updated = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                extra={**state.extra, "bad_steps": bad_steps})
        skipped = state.replace(step=state.step + 1, extra={**state.extra, "bad_steps": bad_steps})
        metrics.update(loss=loss, lr=schedule(state.step), grad_norm=optim.global_norm(grads),
                       nonfinite=1.0 - finite.astype(jnp.float32))
        return state_lib.select_tree(finite, updated, skipped), metrics

    return train_step


def run(config: ml_collections.ConfigDict, workdir: str):
    common.log_header("pretrain", config, workdir)
    common.prepare_workdir(config, workdir, save_config=False)  # config.json once the restore worked
    mesh = sharding.make_mesh(config.get("mesh"))
    tokenizer, tokenizer_variables = targets_lib.load_tokenizer(config)
    if tokenizer.num_codes != config.model.vocab_size:
        raise ValueError(f"config.model.vocab_size={config.model.vocab_size} but the tokenizer has "
                         f"{tokenizer.num_codes} codes")
    settings = targets_lib.settings_from_config(config)
    cfg = model_config(config)
    model = build_model(cfg)
    targets_lib.check_tokenizer_grid(tokenizer, config.data.second_input_size, model.backbone.num_patches)

    steps_per_epoch = common.steps_per_epoch(config)
    total_steps = steps_per_epoch * config.num_epochs
    size, n = config.data.input_size, model.backbone.num_patches
    dummy_mask = jnp.zeros((1, n), bool).at[:, :config.data.num_masked_patches].set(True)
    params = flax.linen.meta.unbox(
        jax.jit(model.init)(jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 3)), dummy_mask)["params"])
    logging.info("BEiT pretraining model: %d parameters", beit_lib.count_params(params))
    tx, schedule = optim.make_optimizer(config.optim, params, total_steps, steps_per_epoch)
    state = state_lib.create(params, tx, extra={"bad_steps": jnp.zeros((), jnp.int32)}, seed=config.seed)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), dummy_mask)
    state, state_sh = common.shard_state(state, boxed["params"], tx, mesh, config)
    tokenizer_variables = jax.device_put(tokenizer_variables, sharding.replicated(mesh))

    iterator = pipeline.make_pretrain_iterator(config.data, config.batch_size, seed=config.seed)
    manager = ckpt_lib.make_manager(workdir, config.get("keep_checkpoints", 3))
    state = loop.resume(manager, state, iterator)
    common.write_config(config, workdir)
    step_fn = common.jit_train_step(make_train_step(model, tokenizer, tx, schedule, settings), state_sh, mesh)
    train_step = functools.partial(_with_tokenizer, step_fn, tokenizer_variables)
    state = loop.run(workdir=workdir, state=state, train_step=train_step, iterator=iterator, mesh=mesh,
                     total_steps=total_steps, steps_per_epoch=steps_per_epoch, batch_size=config.batch_size,
                     log_every=config.get("log_every_steps", 50),
                     checkpoint_every=config.get("checkpoint_every_steps", 1000),
                     max_bad_steps=config.get("max_bad_steps", 10),
                     divergence_factor=config.get("divergence_factor", 0.0), manager=manager, desc="pretrain",
                     inject_nan_steps=config.get("inject_nan_steps", ()),
                     profile=config.get("profile", ()))
    export_model(storage.join(workdir, "model"), state, cfg)
    return state


def export_model(directory: str, state, cfg: dict) -> None:
    from beitv2_jax.convert import store

    store.save_variables(directory, {"params": sharding.host_copy(state.params)}, "beit_pretrain", cfg)
    logging.info("pretrained model written to %s", directory)


def _with_tokenizer(step_fn, tokenizer_variables, state, batch):
    return step_fn(state, batch, tokenizer_variables)
