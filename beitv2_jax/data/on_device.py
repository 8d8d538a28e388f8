"""uint8 images → float inputs inside the jitted step (the host ships uint8, 1/4 of the bytes of float32).

The pipelines emit images as uint8 ``[B, H, W, 3]``; each task's step converts them with these pure functions, the
same float32 arithmetic as the host's ``transforms.to_unit_float`` / ``transforms.normalize`` (equal to float32
rounding, tests/test_data.py). A floating-point input is taken as already converted and only cast to float32: the
loop's NaN injection (``loop.poison_batch``) and hand-built float batches (benchmarks, tests) pass through.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from beitv2_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def unit_float(images: jax.Array) -> jax.Array:
    """uint8 ``[..., 3]`` → float32 in [0, 1] (``ToTensor``); float input → float32 unchanged."""
    if images.dtype != jnp.uint8:
        return images.astype(jnp.float32)
    return images.astype(jnp.float32) / jnp.float32(255.0)


def normalized(images: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """uint8 ``[..., 3]`` → float32 ``(x / 255 - mean) / std`` per channel; float input (already normalised) →
    float32 unchanged."""
    if images.dtype != jnp.uint8:
        return images.astype(jnp.float32)
    return (unit_float(images) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def pretrain_views(batch: dict, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[jax.Array, jax.Array]:
    """A ``PretrainTransform`` batch → ``(model view float32 [B, s, s, 3] normalised, tokenizer view float32
    [B, s2, s2, 3] in [0, 1])``; both come from ``batch['image']`` when the batch has no ``'tokenizer_image'``
    (one view shipped for both)."""
    image = batch["image"]
    second = batch.get("tokenizer_image", image)
    if image.dtype != jnp.uint8:  # a float batch built on the host: model view normalised, tokenizer view in [0, 1]
        return image.astype(jnp.float32), second.astype(jnp.float32)
    return normalized(image, mean, std), unit_float(second)
