"""Layer-wise learning-rate decay for ViT fine-tuning (the official ``LayerDecayValueAssigner``).

Layer ids follow the official ``get_num_layer_for_vit`` on our parameter names (paths relative to the ViT):
``cls_token``, ``mask_token``, ``pos_embed`` and ``patch_embed/*`` → 0; ``blocks_{k}/*`` → k + 1; everything
else (``fc_norm``, ``head``, ``norm``, a shared ``rel_pos_bias``) → L + 1. ``ln_pre`` (CLIP-style models only; the
official code has none) is grouped with the embeddings, as timm's ``group_matcher`` stem does.
The learning rate of layer ``i`` is scaled by ``decay ** (L + 1 − i)``; weight decay, applied before the scale in
our optax chain, is scaled with it (PyTorch AdamW multiplies the decay by the group's learning rate).
"""
from __future__ import annotations

import re

import flax
import numpy as np
import optax

EMBEDDING_NAMES = ("cls_token", "mask_token", "pos_embed", "patch_embed", "ln_pre")
_BLOCK = re.compile(r"^blocks_(\d+)$")


def layer_id(path: str, depth: int) -> int:
    """Official layer id of the parameter at ``path`` (``'blocks_3/attn/qkv'``) in a ViT of ``depth`` blocks."""
    head = path.split("/", 1)[0]
    if head in EMBEDDING_NAMES:
        return 0
    match = _BLOCK.match(head)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def segmentation_layer_id(path: str, depth: int) -> int:
    """Layer id in a :class:`~beitv2_jax.models.segmentation.SegmentationModel` (the official segmentation
    ``LayerDecayOptimizerConstructor``): ``backbone/<ViT path>`` as :func:`layer_id` (``backbone/fpn*`` → L + 1);
    ``decode_head``, ``auxiliary_head`` → L + 1 (full learning rate)."""
    head, _, rest = path.partition("/")
    return layer_id(rest, depth) if head == "backbone" else depth + 1


def layer_scales(depth: int, decay: float) -> np.ndarray:
    """``[depth + 2]`` learning-rate scales: ``decay ** (depth + 1 − i)`` for layer id ``i``."""
    return np.asarray([decay ** (depth + 1 - i) for i in range(depth + 2)], np.float64)


def layer_id_tree(params, depth: int, layer_id_fn=layer_id):
    """A tree like ``params`` holding each parameter's layer id (``layer_id_fn(path, depth)``)."""
    flat = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(params))
    return flax.traverse_util.unflatten_dict({k: layer_id_fn("/".join(k), depth) for k in flat})


def scale_tree(params, depth: int, decay: float, layer_id_fn=layer_id):
    """A tree like ``params`` holding each parameter's learning-rate scale (for logs and tests)."""
    scales = layer_scales(depth, decay)
    return flax.traverse_util.unflatten_dict({
        k: float(scales[v])
        for k, v in flax.traverse_util.flatten_dict(layer_id_tree(params, depth, layer_id_fn)).items()})


def scale_by_layer_decay(params, depth: int, decay: float, layer_id_fn=layer_id) -> optax.GradientTransformation:
    """``optax.multi_transform`` that multiplies each update by its layer's scale (identity for ``decay == 1``).

    ``params`` gives the tree structure (the labels are a tree, not a function of the params, so
    ``optax.tree_map_params`` can shard the state). Put it after the weight-decay term and before
    ``scale_by_learning_rate`` (``optim.make_optimizer``'s ``lr_scale_fn`` slot) so that, as in the official AdamW
    parameter groups, lr × scale multiplies both. ``layer_id_fn``: :func:`layer_id` (a ViT) or
    :func:`segmentation_layer_id` (a segmentation model).
    """
    if decay == 1.0:
        return optax.identity()
    scales = layer_scales(depth, decay)
    transforms = {f"layer_{i}": optax.scale(float(s)) for i, s in enumerate(scales)}
    labels = flax.traverse_util.unflatten_dict({
        k: f"layer_{v}" for k, v in flax.traverse_util.flatten_dict(layer_id_tree(params, depth, layer_id_fn)).items()})
    return optax.multi_transform(transforms, labels)
