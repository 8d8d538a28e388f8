"""Build our models from ``(model_kind, model_config)`` and get their parameter shapes without initialising.

Model kinds and their configs (what ``model.json`` stores):

* ``vit``: the fields of :class:`beitv2_jax.models.vit.VisionTransformer` (``VIT_FIELDS``).
* ``beit_pretrain``: ``{"backbone": {ViT fields}, "vocab_size", "num_masked_patches", "early_layers",
  "head_layers"}`` → :class:`beitv2_jax.models.beit.BEiTPretrainModel`; the backbone is built with
  ``beit.beit_backbone(**backbone)`` so partial backbone dicts (as the pretrain task writes) work too.
* ``vqkd``: the keys read by :func:`beitv2_jax.models.vqkd.build_vqkd` (``VQKD_FIELDS``).
* ``segmentation``: ``{"backbone": {ViT fields, "out_indices"}, "num_classes", "channels", "pool_scales", ...}``
  (``segmentation.segmentation_config``) → :class:`beitv2_jax.models.segmentation.SegmentationModel`; its
  variables hold ``params`` and ``batch_stats``.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Mapping

MODEL_KINDS = ("vit", "beit_pretrain", "vqkd", "segmentation")

# The architecture fields of VisionTransformer a converted checkpoint pins down (training options such as
# drop_path_rate, dtype, attention_impl or remat_policy keep their defaults and belong to the training config).
VIT_FIELDS = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_ratio", "qkv_bias",
              "patch_embed_bias", "use_abs_pos", "rel_pos", "layer_scale_init", "layer_norm_eps", "activation",
              "ln_pre", "use_cls_token", "use_mask_token", "use_final_norm", "use_fc_norm", "pooling",
              "num_classes", "head_bias")
BEIT_PRETRAIN_FIELDS = ("backbone", "vocab_size", "num_masked_patches", "early_layers", "head_layers")
VQKD_FIELDS = ("image_size", "patch_size", "width", "depth", "num_heads", "decoder_depth", "decoder_width",
               "decoder_heads", "num_codes", "code_dim", "decay", "teacher_dim", "kmeans_init")


def build_model(kind: str, config: Mapping[str, Any]):
    """The linen module for ``kind`` built from ``config`` (see the module docstring)."""
    from beitv2_jax.models import vit

    if kind == "vit":
        return vit.VisionTransformer(**config)
    if kind == "beit_pretrain":
        from beitv2_jax.models import beit

        rest = {k: config[k] for k in BEIT_PRETRAIN_FIELDS[1:] if k in config}
        return beit.BEiTPretrainModel(backbone=beit.beit_backbone(**config["backbone"]), **rest)
    if kind == "vqkd":
        from beitv2_jax.models import vqkd

        return vqkd.build_vqkd(dict(config))
    if kind == "segmentation":
        from beitv2_jax.models import segmentation

        return segmentation.model_from_config(dict(config))
    raise ValueError(f"unknown model kind {kind!r}; choose one of {MODEL_KINDS}")


VQKD_DEFAULTS = dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, decoder_depth=3,
                     num_codes=8192, code_dim=32, decay=0.99, teacher_dim=512, kmeans_init=True)


def normalize_config(kind: str, config: Mapping[str, Any]) -> dict:
    """``config`` with every architecture field spelled out (defaults filled in as the model builder does);
    other keys (``dtype``, ``drop_path_rate``, ...) are kept."""
    config = dict(config)
    if kind == "vit":
        model = build_model(kind, config)
        return dict(config, **{f: getattr(model, f) for f in VIT_FIELDS})
    if kind == "beit_pretrain":
        model = build_model(kind, config)
        backbone = dict(config["backbone"], **{f: getattr(model.backbone, f) for f in VIT_FIELDS})
        return dict(config, backbone=backbone, **{f: getattr(model, f) for f in BEIT_PRETRAIN_FIELDS[1:]})
    if kind == "vqkd":
        out = dict(VQKD_DEFAULTS, **config)
        out.setdefault("decoder_width", out["width"])
        out.setdefault("decoder_heads", out["num_heads"])
        return out
    if kind == "segmentation":
        from beitv2_jax.models import segmentation

        model = build_model(kind, config)
        backbone = dict(config["backbone"], **{f: getattr(model.backbone, f) for f in VIT_FIELDS},
                        out_indices=[int(i) for i in model.backbone.out_indices])
        heads = {f: (list(getattr(model, f)) if isinstance(getattr(model, f), tuple) else getattr(model, f))
                 for f in segmentation.HEAD_FIELDS}
        return dict(config, backbone=backbone, **heads)
    raise ValueError(f"unknown model kind {kind!r}; choose one of {MODEL_KINDS}")


def example_inputs(kind: str, config: Mapping[str, Any]) -> tuple:
    """Zero inputs of batch 1 that ``init`` accepts (NHWC images, and a mask for ``beit_pretrain``)."""
    import jax.numpy as jnp

    vit_cfg = config["backbone"] if kind in ("beit_pretrain", "segmentation") else config
    size = vit_cfg.get("image_size", 224)
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    if kind != "beit_pretrain":
        return (images,)
    patches = (size // vit_cfg.get("patch_size", 16)) ** 2
    return images, jnp.zeros((1, patches), bool)


@functools.lru_cache(maxsize=64)
def _param_shapes(kind: str, config_json: str) -> dict:
    import flax.linen as nn
    import jax
    from flax import traverse_util

    config = json.loads(config_json)
    model = build_model(kind, config)
    inputs = example_inputs(kind, config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
    return traverse_util.flatten_dict(nn.meta.unbox(dict(shapes)), sep="/")


def param_shapes(kind: str, config: Mapping[str, Any]) -> dict:
    """``{"params/blocks_0/attn/qkv": ShapeDtypeStruct, ...}`` for every variable ``init`` creates."""
    return dict(_param_shapes(kind, json.dumps(config, sort_keys=True)))


def count_params(kind: str, config: Mapping[str, Any], collection: str = "params") -> int:
    import numpy as np

    return int(sum(int(np.prod(s.shape)) for p, s in param_shapes(kind, config).items()
                   if p.split("/", 1)[0] == collection))
