"""Optimisers: AdamW with the official no-weight-decay sets, warmup + cosine per step, gradient clipping.

The schedule is the official ``utils.cosine_scheduler``: ``linspace(0, base, warmup_steps)`` (it reaches ``base``
at step ``warmup_steps − 1``) followed by ``min + ½(base − min)(1 + cos(π·i / (total − warmup)))``.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


def cosine_schedule(base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> optax.Schedule:
    """Per-step warmup + cosine exactly as the official ``cosine_scheduler`` (value at step ≥ total = final)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)
    cosine = optax.cosine_decay_schedule(
        base_value, decay_steps, alpha=final_value / base_value if base_value else 0.0)
    if warmup_steps == 0:
        return cosine
    if warmup_steps == 1:
        warm = optax.constant_schedule(base_value)
    else:
        warm = optax.linear_schedule(warmup_start, base_value, warmup_steps - 1)
    return optax.join_schedules([warm, cosine], [warmup_steps])


def poly_schedule(base_value: float, total_steps: int, power: float = 1.0, min_value: float = 0.0,
                  warmup_steps: int = 0, warmup_ratio: float = 1e-6) -> optax.Schedule:
    """mmcv ``PolyLrUpdaterHook`` (by iteration) with ``warmup='linear'``: ``poly(i) = (base − min)(1 − i/total)^power
    + min`` for the 0-based step ``i``; during the first ``warmup_steps`` it is multiplied by ``1 − (1 − i/warmup)(1 −
    warmup_ratio)`` (mmcv multiplies the regular lr of that step). Used by the segmentation recipe."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def schedule(step):
        i = jnp.asarray(step, jnp.float32)
        poly = (base_value - min_value) * (1.0 - jnp.minimum(i, total_steps) / total_steps) ** power + min_value
        if warmup_steps <= 0:
            return poly
        factor = 1.0 - (1.0 - i / warmup_steps) * (1.0 - warmup_ratio)
        return jnp.where(i < warmup_steps, poly * factor, poly)

    return schedule


def param_paths(params) -> dict:
    """Flat ``{'a/b/c': leaf}`` view of a parameter tree."""
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(flax.linen.meta.unbox(params)).items()}


def weight_decay_mask(params, no_decay_patterns: Sequence[str] = ()) -> dict:
    """True where a parameter is decayed: not 1-D, not a bias, and not matching any ``no_decay_patterns`` regex.

    Mirrors the official ``get_parameter_groups``: ``ndim <= 1`` or ``.bias`` → no decay, plus the model's
    ``no_weight_decay()`` names (e.g. ``cls_token``). Our q/v biases are ``[heads, head_dim]`` (2-D) and our
    position-bias-free names differ, so biases are recognised by name: ``bias``, ``q_bias``, ``v_bias``,
    ``qkv_bias``, ``proj_bias``.
    """
    patterns = [re.compile(p) for p in no_decay_patterns]
    flat = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(params))

    def decayed(path, leaf) -> bool:
        name = "/".join(path)
        if leaf.ndim <= 1 or path[-1] in ("bias", "q_bias", "v_bias", "qkv_bias", "proj_bias", "scale"):
            return False
        return not any(p.search(name) for p in patterns)

    return flax.traverse_util.unflatten_dict({k: decayed(k, v) for k, v in flat.items()})


def make_optimizer(optim: ml_collections.ConfigDict, params, total_steps: int, steps_per_epoch: int,
                   lr_scale_fn: Callable | None = None,
                   schedule: optax.Schedule | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW + clipping + schedule from ``config.optim`` (``schedule`` replaces the warmup + cosine one).

    Keys: ``lr``, ``min_lr``, ``warmup_epochs`` (or ``warmup_steps``), ``b1``, ``b2``, ``eps``, ``weight_decay``,
    ``clip_grad`` (global norm; 0/None = off), ``no_decay`` (regexes on parameter paths).
    """
    warmup = optim.get("warmup_steps") or int(optim.get("warmup_epochs", 0) * steps_per_epoch)
    schedule = schedule or cosine_schedule(optim.lr, optim.min_lr, total_steps, warmup)
    mask = weight_decay_mask(params, tuple(optim.get("no_decay", ())))
    chain = []
    if optim.get("clip_grad"):
        chain.append(optax.clip_by_global_norm(optim.clip_grad))
    chain.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps))
    if optim.weight_decay:
        chain.append(optax.add_decayed_weights(optim.weight_decay, mask=mask))
    if lr_scale_fn is not None:
        chain.append(lr_scale_fn)
    chain.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*chain), schedule


def no_decay_names(params) -> list[str]:
    """Sorted paths of the parameters that get no weight decay (for logs and tests)."""
    mask = flax.traverse_util.flatten_dict(weight_decay_mask(params))
    return sorted("/".join(k) for k, v in mask.items() if not v)


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def is_finite_tree(tree: Iterable) -> jax.Array:
    """Scalar bool: every leaf of ``tree`` is finite."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)
