"""Task ``ibot``: iBOT self-distillation (reference §3, ``bytedance/ibot`` ``main_ibot.py``).

Per step (all inside one jitted function):

* teacher (EMA network, no drop path, no mask) on the ``G`` global crops → CLS and patch outputs;
* student on the masked global crops (``mask_token`` replaces masked patch embeddings) and, CLS only, on the ``L``
  local crops (positions resized);
* loss = λ₁ · CLS distillation over every (teacher global q, student crop v ≠ q) pair + λ₂ · patch distillation
  on the masked tokens of the same global crop (per image: sum over masked tokens / max(#masked, 1); mean over
  images and crops), teacher targets ``softmax((t − center) / T_t)``, student ``log_softmax(s / 0.1)``;
* AdamW with per-tensor gradient clipping (each gradient's own L2 norm ≤ ``clip_grad``, as the official
  ``utils.clip_gradients``), weight decay cosine ``weight_decay → weight_decay_end``, the head's ``last_layer``
  frozen for ``freeze_last_layer_epochs`` (its gradients dropped: no Adam step, no decay, as PyTorch with
  ``grad = None``) and ``weight_g`` frozen throughout with ``norm_last_layer``;
* teacher ← m · teacher + (1 − m) · student (m cosine 0.996 → 1 per step); centers ← 0.9 · center + 0.1 · batch
  mean of the teacher's CLS / mean-patch outputs (computed before the update, used from the next step).

Schedules: lr and weight decay and momentum per step (official ``cosine_scheduler``); teacher temperatures per epoch
(``linspace(warmup, final, warmup_epochs)`` then constant). The teacher backbone (a ``vit`` without the mask token)
is written to ``<workdir>/teacher``, loadable by the ``knn``/``linear_probe``/``finetune`` tasks and as a VQ-KD
teacher (``teacher.kind = 'vit_checkpoint'``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from beitv2_jax import storage
from beitv2_jax.data import multicrop, on_device
from beitv2_jax.models import ibot as ibot_lib
from beitv2_jax.train import checkpoint as ckpt_lib
from beitv2_jax.train import loop, optim, sharding
from beitv2_jax.train import state as state_lib
from beitv2_jax.train.tasks import common

TEACHER_DIR = "teacher"


# ----------------------------------------------------------------------------------------------- schedules
def teacher_temperature_schedule(warmup_value: float, final_value: float, warmup_epochs: int,
                                 num_epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature ``[num_epochs]``: ``linspace(warmup, final, warmup_epochs)`` then ``final``
    (official ``iBOTLoss``; a run shorter than the warm-up stops inside it)."""
    warm = np.linspace(warmup_value, final_value, warmup_epochs)
    rest = np.full(max(num_epochs - warmup_epochs, 0), final_value)
    return np.concatenate([warm, rest])[:num_epochs].astype(np.float32)


# ----------------------------------------------------------------------------------------------- the loss
class IBOTLoss(NamedTuple):
    total: jax.Array
    cls: jax.Array
    patch: jax.Array


def teacher_probs(outputs: jax.Array, center: jax.Array, temperature) -> jax.Array:
    """``softmax((outputs − center) / temperature)`` in float32, gradient stopped."""
    return jax.lax.stop_gradient(jax.nn.softmax((outputs.astype(jnp.float32) - center) / temperature, axis=-1))


def ibot_loss(student_cls: jax.Array, student_patch: jax.Array, teacher_cls: jax.Array, teacher_patch: jax.Array,
              masks: jax.Array, center: jax.Array, center2: jax.Array, teacher_temp, teacher_patch_temp,
              student_temp: float = 0.1, lambda1: float = 1.0, lambda2: float = 1.0) -> IBOTLoss:
    """The official ``iBOTLoss.forward``, crop-major.

    student_cls ``[V, B, K]`` (the G global crops first, then the local ones); student_patch ``[G, B, N, K]``;
    teacher_cls ``[G, B, K]``; teacher_patch ``[G, B, N, K]`` (raw, before centering); masks ``[G, B, N]`` bool;
    center ``[1, K]``; center2 ``[1, 1, K]``.
    """
    num_global, num_crops = teacher_cls.shape[0], student_cls.shape[0]
    t_cls = teacher_probs(teacher_cls, center, teacher_temp)
    s_cls = jax.nn.log_softmax(student_cls.astype(jnp.float32) / student_temp, axis=-1)
    # ce[q, v] = mean over the batch of Σ_K −t_q · log s_v
    ce = -jnp.einsum("qbk,vbk->qv", t_cls, s_cls, precision=jax.lax.Precision.HIGHEST) / teacher_cls.shape[1]
    pairs = 1.0 - jnp.eye(num_global, num_crops, dtype=jnp.float32)
    loss_cls = jnp.sum(ce * pairs) / jnp.sum(pairs)

    t_patch = teacher_probs(teacher_patch, center2, teacher_patch_temp)
    s_patch = jax.nn.log_softmax(student_patch.astype(jnp.float32) / student_temp, axis=-1)
    token_ce = jnp.sum(-t_patch * s_patch, axis=-1)  # [G, B, N]
    m = masks.astype(jnp.float32)
    per_image = jnp.sum(token_ce * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)  # [G, B]
    loss_patch = jnp.mean(per_image)
    loss_cls, loss_patch = lambda1 * loss_cls, lambda2 * loss_patch
    return IBOTLoss(loss_cls + loss_patch, loss_cls, loss_patch)


def update_centers(center: jax.Array, center2: jax.Array, teacher_cls: jax.Array, teacher_patch: jax.Array,
                   momentum: float = 0.9, momentum2: float = 0.9) -> tuple:
    """EMA of the batch means: ``center`` ``[1, K]`` of the teacher CLS outputs ``[G, B, K]``, ``center2``
    ``[1, 1, K]`` of the per-image mean patch outputs ``[G, B, N, K]`` (global batch: the official all-reduce)."""
    k = teacher_cls.shape[-1]
    cls_mean = jnp.mean(teacher_cls.astype(jnp.float32).reshape(-1, k), axis=0)
    patch_mean = jnp.mean(jnp.mean(teacher_patch.astype(jnp.float32), axis=2).reshape(-1, k), axis=0)
    return (center * momentum + cls_mean[None] * (1 - momentum),
            center2 * momentum2 + patch_mean[None, None] * (1 - momentum2))


def ema(teacher, student, momentum):
    """``teacher · m + (1 − m) · student`` leaf by leaf."""
    return jax.tree.map(lambda t, s: t * momentum + (1.0 - momentum) * s.astype(t.dtype), teacher, student)


# ----------------------------------------------------------------------------------------------- optimizer
def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """Official ``utils.clip_gradients``: each gradient tensor scaled by ``max_norm / (‖g‖ + 1e-6)`` when that is
    below 1 (per tensor, not a global norm)."""

    def update(updates, state, params=None):
        del params

        def clip(g):
            coef = max_norm / (jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))) + 1e-6)
            return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class IBOTAdamWState(NamedTuple):
    step: jax.Array  # global step (schedules, the first-epoch freeze)
    count_train: jax.Array  # Adam steps taken by the always-trained parameters
    count_last: jax.Array  # Adam steps taken by the last layer (0 while it is frozen)
    mu: Any
    nu: Any


def param_labels(params, norm_last_layer: bool) -> dict:
    """``'frozen'`` (``weight_g`` of the last layers with ``norm_last_layer``), ``'last_layer'`` (other parameters
    whose path contains ``last_layer``, frozen during the first epochs) or ``'train'``."""
    import flax

    flat = flax.traverse_util.flatten_dict(params)

    def label(path):
        if not any("last_layer" in p for p in path):
            return "train"
        return "frozen" if norm_last_layer and path[-1] == "weight_g" else "last_layer"

    return flax.traverse_util.unflatten_dict({k: label(k) for k in flat})


def ibot_adamw(labels, lr_schedule, wd_schedule, decay_mask, freeze_steps: int, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8) -> optax.GradientTransformation:
    """PyTorch AdamW as iBOT drives it: per-step lr and weight decay (decay only where ``decay_mask``); parameters
    labelled ``'last_layer'`` get no update, no decay and no Adam step (they keep their own bias-correction count)
    before ``freeze_steps`` (their gradient is ``None`` in the official first epoch); ``'frozen'`` ones never change.
    The state holds ``mu``/``nu`` shaped like the parameters and three scalar counters (so it shards like them)."""

    def init(params):
        counters = [jnp.zeros([], jnp.int32) for _ in range(3)]  # distinct buffers: the state is donated
        return IBOTAdamWState(*counters, jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params),
                              jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("ibot_adamw needs the params")
        last_on = state.step >= freeze_steps
        count_train = state.count_train + 1
        count_last = state.count_last + last_on.astype(jnp.int32)
        lr, wd = lr_schedule(state.step), wd_schedule(state.step)

        def leaf(label, decay, g, p, mu, nu):
            active = {"train": jnp.bool_(True), "last_layer": last_on, "frozen": jnp.bool_(False)}[label]
            count = jnp.maximum(count_last if label == "last_layer" else count_train, 1).astype(jnp.float32)
            g = g.astype(jnp.float32)
            new_mu = jnp.where(active, b1 * mu + (1 - b1) * g, mu)
            new_nu = jnp.where(active, b2 * nu + (1 - b2) * g * g, nu)
            step = (new_mu / (1 - b1 ** count)) / (jnp.sqrt(new_nu / (1 - b2 ** count)) + eps)
            if decay:
                step = step + wd * p.astype(jnp.float32)
            return jnp.where(active, -lr * step, 0.0).astype(p.dtype), new_mu, new_nu

        out = jax.tree.map(leaf, labels, decay_mask, grads, params, state.mu, state.nu)
        is_triple = lambda x: isinstance(x, tuple)
        updates, mu, nu = (jax.tree.map(lambda o, i=i: o[i], out, is_leaf=is_triple) for i in range(3))
        return updates, IBOTAdamWState(optax.safe_int32_increment(state.step), count_train, count_last, mu, nu)

    return optax.GradientTransformation(init, update)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, params, *, batch_size: int, total_steps: int,
                   steps_per_epoch: int, norm_last_layer: bool) -> tuple:
    """iBOT's optimizer: per-tensor clipping + :func:`ibot_adamw`. Returns ``(tx, lr_schedule, wd_schedule)``;
    lr = ``lr · batch / lr_batch_base`` with warm-up + cosine to ``min_lr``; wd cosine ``weight_decay →
    weight_decay_end``; no decay for biases and 1-D tensors (``optim.weight_decay_mask``) nor ``no_decay``."""
    lr = optim_cfg.lr * batch_size / optim_cfg.get("lr_batch_base", 256)
    warmup = optim_cfg.get("warmup_steps") or int(optim_cfg.get("warmup_epochs", 0) * steps_per_epoch)
    lr_schedule = optim.cosine_schedule(lr, optim_cfg.min_lr, total_steps, warmup)
    wd_schedule = optim.cosine_schedule(optim_cfg.weight_decay, optim_cfg.get("weight_decay_end",
                                                                              optim_cfg.weight_decay), total_steps)
    labels = param_labels(params, norm_last_layer)
    decay_mask = optim.weight_decay_mask(params, tuple(optim_cfg.get("no_decay", ())))
    freeze_steps = int(optim_cfg.get("freeze_last_layer_epochs", 1) * steps_per_epoch)
    chain = []
    if optim_cfg.get("clip_grad"):
        if optim_cfg.get("clip_mode", "per_tensor") != "per_tensor":
            raise ValueError("iBOT clips each gradient tensor on its own: config.optim.clip_mode must be 'per_tensor'")
        chain.append(clip_per_tensor(optim_cfg.clip_grad))
    chain.append(ibot_adamw(labels, lr_schedule, wd_schedule, decay_mask, freeze_steps, optim_cfg.b1, optim_cfg.b2,
                            optim_cfg.eps))
    return optax.chain(*chain), lr_schedule, wd_schedule


# ----------------------------------------------------------------------------------------------- the step
@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Everything a step needs besides the state and the batch (static under jit)."""

    steps_per_epoch: int
    teacher_temps: tuple  # per epoch
    teacher_patch_temps: tuple
    student_temp: float = 0.1
    lambda1: float = 1.0
    lambda2: float = 1.0
    center_momentum: float = 0.9
    center_momentum2: float = 0.9


def crop_major(x: jax.Array) -> jax.Array:
    """``[B, C, ...]`` (crops per image) → ``[C·B, ...]`` crop-major (the official list-of-crops order)."""
    return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def forward_teacher(model: ibot_lib.IBOT, teacher_params, global_crops: jax.Array) -> tuple:
    """Teacher outputs ``(cls [G, B, K], patch [G, B, N, K])`` of ``global_crops [B, G, s, s, 3]``, no gradient."""
    b, g = global_crops.shape[:2]
    cls, patch = model(jax.lax.stop_gradient(teacher_params), crop_major(global_crops))
    return (jax.lax.stop_gradient(cls.reshape(g, b, -1)),
            jax.lax.stop_gradient(patch.reshape((g, b) + patch.shape[1:])))


def forward_student(model: ibot_lib.IBOT, params, batch: dict, rng: jax.Array) -> tuple:
    """Student outputs ``(cls [G + L, B, K], patch [G, B, N, K])``: masked global crops, then CLS of local crops."""
    b, g = batch["global_crops"].shape[:2]
    key_global, key_local = jax.random.split(rng)
    cls, patch = model(params, crop_major(batch["global_crops"]), crop_major(batch["masks"]), train=True,
                       rng=key_global)
    cls = cls.reshape(g, b, -1)
    if "local_crops" in batch:
        local = model(params, crop_major(batch["local_crops"]), train=True, rng=key_local, cls_only=True)
        cls = jnp.concatenate([cls, local.reshape(-1, b, local.shape[-1])], axis=0)
    return cls, patch.reshape((g, b) + patch.shape[1:])


def make_train_step(model: ibot_lib.IBOT, tx, lr_schedule, wd_schedule, momentum_schedule, settings: StepSettings):
    teacher_temps = jnp.asarray(settings.teacher_temps, jnp.float32)
    patch_temps = jnp.asarray(settings.teacher_patch_temps, jnp.float32)

    def loss_fn(params, batch, teacher_out, centers, temps, rng):
        student_cls, student_patch = forward_student(model, params, batch, rng)
        masks = jnp.swapaxes(batch["masks"], 0, 1)  # [G, B, N]
        losses = ibot_loss(student_cls, student_patch, *teacher_out, masks, *centers, *temps,
                           settings.student_temp, settings.lambda1, settings.lambda2)
        return losses.total, (losses, student_cls)

    def train_step(state: state_lib.TrainState, batch: dict, frozen):
        del frozen
        batch = {**batch, **{k: on_device.normalized(batch[k]) for k in ("global_crops", "local_crops") if k in batch}}
        ms = state.model_state
        epoch = jnp.minimum(state.step // settings.steps_per_epoch, teacher_temps.shape[0] - 1)
        temps = (teacher_temps[epoch], patch_temps[epoch])
        teacher_out = forward_teacher(model, ms["teacher"], batch["global_crops"])
        rng = state_lib.step_rng(state, "dropout")
        (loss, (losses, student_cls)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, teacher_out, (ms["center"], ms["center2"]), temps, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        momentum = momentum_schedule(state.step)
        center, center2 = update_centers(ms["center"], ms["center2"], *teacher_out, settings.center_momentum,
                                         settings.center_momentum2)
        model_state = {"teacher": ema(ms["teacher"], params, momentum), "center": center, "center2": center2}
        finite = jnp.isfinite(loss) & optim.is_finite_tree(grads) & optim.is_finite_tree(params)
        bad_steps = jnp.where(finite, 0, state.extra["bad_steps"] + 1)
        updated = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state,
                                extra={**state.extra, "bad_steps": bad_steps})
        skipped = state.replace(step=state.step + 1, extra={**state.extra, "bad_steps": bad_steps})
        agreement = jnp.mean((jnp.argmax(teacher_out[0][0], -1) == jnp.argmax(student_cls[1 % student_cls.shape[0]],
                                                                              -1)).astype(jnp.float32))
        # Collapse monitors: the teacher CLS distribution's mean entropy (→ ln K: collapse to uniform) and the
        # entropy of its batch mean (→ 0: every image on one prototype), both in nats.
        t_cls = teacher_probs(teacher_out[0], ms["center"], temps[0])
        entropy = lambda p: -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)), axis=-1)
        metrics = {"loss": loss, "cls": losses.cls, "patch": losses.patch, "acc": agreement,
                   "teacher_entropy": jnp.mean(entropy(t_cls)),
                   "teacher_batch_entropy": jnp.mean(entropy(jnp.mean(t_cls, axis=1))),
                   "lr": lr_schedule(state.step), "wd": wd_schedule(state.step), "momentum": momentum,
                   "teacher_temp": temps[0], "masked_ratio": jnp.mean(batch["masks"].astype(jnp.float32)),
                   "grad_norm": optim.global_norm(grads), "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return state_lib.select_tree(finite, updated, skipped), metrics

    return train_step


# ----------------------------------------------------------------------------------------------- the run
def build_model(config: ml_collections.ConfigDict) -> ibot_lib.IBOT:
    """The network of ``config`` (student drop path ``config.model.drop_path_rate``; the teacher runs it with
    ``train=False``, i.e. without drop path)."""
    m = config.model
    if m.get("patch_size", config.data.patch_size) != config.data.patch_size:
        raise ValueError(f"config.model.patch_size={m.patch_size} differs from config.data.patch_size="
                         f"{config.data.patch_size}; set both to the same value")
    return ibot_lib.build_ibot(m.to_dict(), config.head.to_dict(), config.data.input_size,
                               dtype=common.compute_dtype(config.get("dtype", "float32")),
                               drop_path_rate=m.get("drop_path_rate", 0.0))


def step_settings(config: ml_collections.ConfigDict, steps_per_epoch: int) -> StepSettings:
    loss = config.loss
    temps = teacher_temperature_schedule(loss.warmup_teacher_temp, loss.teacher_temp,
                                         loss.warmup_teacher_temp_epochs, config.num_epochs)
    patch_temps = teacher_temperature_schedule(loss.warmup_teacher_patch_temp, loss.teacher_patch_temp,
                                               loss.warmup_teacher_temp_epochs, config.num_epochs)
    return StepSettings(steps_per_epoch=steps_per_epoch, teacher_temps=tuple(float(t) for t in temps),
                        teacher_patch_temps=tuple(float(t) for t in patch_temps), student_temp=loss.student_temp,
                        lambda1=loss.lambda1, lambda2=loss.lambda2, center_momentum=loss.center_momentum,
                        center_momentum2=loss.center_momentum2)


def init_state(config: ml_collections.ConfigDict, model: ibot_lib.IBOT, tx) -> state_lib.TrainState:
    """Student = teacher at init (official ``load_state_dict(student.state_dict())``); centers zero."""
    params = model.init(jax.random.PRNGKey(config.seed))
    out_dim = config.head.out_dim
    patch_dim = out_dim if config.head.shared_head else config.head.patch_out_dim
    model_state = {"teacher": jax.tree.map(jnp.array, params), "center": jnp.zeros((1, out_dim), jnp.float32),
                   "center2": jnp.zeros((1, 1, patch_dim), jnp.float32)}
    return state_lib.create(params, tx, model_state=model_state, extra={"bad_steps": jnp.zeros((), jnp.int32)},
                            seed=config.seed)


def export_teacher(directory: str, teacher_params: dict, model: ibot_lib.IBOT) -> None:
    """The teacher backbone (without the mask token) as a ``vit`` in the converter's store format."""
    from beitv2_jax.convert import store

    params = {k: v for k, v in sharding.host_copy(teacher_params["backbone"]).items() if k != "mask_token"}
    store.save_variables(directory, {"params": params}, "vit", ibot_lib.backbone_export_config(model.backbone),
                         info={"source": "ibot teacher"})
    logging.info("iBOT teacher backbone written to %s", directory)


def teacher_knn(config: ml_collections.ConfigDict, directory: str, mesh) -> dict:
    """k-NN (k, T from ``config.knn``) of the exported teacher's CLS feature, train split → eval split."""
    from beitv2_jax.train.tasks import finetune, knn, linear_probe

    pretrained = finetune.load_pretrained(directory)
    encoder = linear_probe.encoder_model(pretrained, config.get("dtype", "float32"))
    features = linear_probe.feature_fn(encoder, "cls")
    params = jax.device_put(pretrained.params, sharding.replicated(mesh))
    batch = config.get("eval_batch_size") or config.batch_size
    train = knn.extract_features(features, config.data, config.data.train_split, batch, mesh, params)
    test = knn.extract_features(features, config.data, config.data.eval_split, batch, mesh, params)
    classes = int(max(train[1].max(), test[1].max()) + 1)
    return knn.knn_accuracy(*train, *test, classes, config.knn.k, config.knn.temperature)


def run(config: ml_collections.ConfigDict, workdir: str):
    common.log_header("ibot", config, workdir)
    common.prepare_workdir(config, workdir, save_config=False)  # config.json once the restore worked
    mesh = sharding.make_mesh(config.get("mesh"))
    model = build_model(config)  # drop path acts only with train=True: the same object runs the teacher
    steps_per_epoch = common.steps_per_epoch(config)
    total_steps = steps_per_epoch * config.num_epochs

    params_shape = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
    tx, lr_schedule, wd_schedule = make_optimizer(config.optim, params_shape, batch_size=config.batch_size,
                                                  total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                                  norm_last_layer=config.head.norm_last_layer)
    momentum_schedule = optim.cosine_schedule(config.teacher.momentum, 1.0, total_steps)
    state = init_state(config, model, tx)
    logging.info("iBOT student: %d parameters", sum(x.size for x in jax.tree.leaves(state.params)))
    state, state_sh = common.shard_state(state, model.abstract_boxed(), tx, mesh, config)
    state_sh = state_sh.replace(model_state=dict(state_sh.model_state, teacher=state_sh.params))
    state = jax.device_put(state, state_sh)

    iterator = multicrop.make_ibot_iterator(config, config.batch_size, seed=config.seed)
    manager = ckpt_lib.make_manager(workdir, config.get("keep_checkpoints", 3))
    state = loop.resume(manager, state, iterator)
    common.write_config(config, workdir)
    settings = step_settings(config, steps_per_epoch)
    step_fn = common.jit_train_step(make_train_step(model, tx, lr_schedule, wd_schedule, momentum_schedule, settings),
                                    state_sh, mesh)
    state = loop.run(workdir=workdir, state=state, train_step=functools.partial(_no_frozen, step_fn),
                     iterator=iterator, mesh=mesh, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                     batch_size=config.batch_size, log_every=config.get("log_every_steps", 50),
                     checkpoint_every=config.get("checkpoint_every_steps", 1000),
                     max_bad_steps=config.get("max_bad_steps", 10),
                     divergence_factor=config.get("divergence_factor", 0.0), manager=manager, desc="ibot",
                     inject_nan_steps=config.get("inject_nan_steps", ()),
                     profile=config.get("profile", ()))
    directory = storage.join(workdir, TEACHER_DIR)
    export_teacher(directory, state.model_state["teacher"], model)
    if config.get("knn_at_end"):
        result = teacher_knn(config, directory, mesh)
        logging.info("iBOT teacher k-NN (k=%d, T=%g, CLS): top-1 %.2f top-5 %.2f", config.knn.k,
                     config.knn.temperature, result["knn_top1"], result["knn_top5"])
        if jax.process_index() == 0:
            storage.write_json(storage.join(workdir, "knn.json"), result, indent=2)
    return state


def _no_frozen(step_fn, state, batch):
    return step_fn(state, batch, {})
