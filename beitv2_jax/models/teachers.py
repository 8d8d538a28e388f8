"""Frozen teachers whose features the VQ-KD decoder regresses, each with its own input normalisation.

* ``clip``: OpenAI CLIP ViT-B/16 visual tower (converted with ``--format openai_clip`` or ``hf_clip``); target =
  ``ln_post`` on all tokens → drop CLS → ``@ proj`` → ``[B, N, 512]``; CLIP mean/std on [0, 1] pixels.
* ``dino``: DINO ViT-B/16 (``--format dino``); target = final-norm patch tokens ``[B, N, 768]``; ImageNet mean/std.
* ``vit_checkpoint``: any ViT checkpoint written by this project (a ``vit`` or the backbone of a ``beit_pretrain``
  model): patch tokens after block ``layer`` (default: last), optionally through the model's final norm.

Teachers take tokenizer-view images in ``[0, 1]`` (NHWC), never receive gradients and are not in the optimizer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.models import vit

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                  "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}
KINDS = ("clip", "dino", "vit_checkpoint")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen feature extractor: ``model`` + how to read its features. Params are passed separately."""

    model: vit.VisionTransformer
    normalisation: str = "imagenet"
    layer: Optional[int] = None  # 1-based block whose patch tokens are the target; None = last block
    use_norm: bool = True  # apply the model's final norm (`norm`) to those tokens
    project: bool = False  # multiply by the head kernel (CLIP's visual projection)
    name: str = "teacher"

    @property
    def feature_dim(self) -> int:
        return self.model.num_classes if self.project else self.model.width

    def features(self, params, images: jax.Array) -> jax.Array:
        """Target features ``[B, N, feature_dim]`` (float32, gradient stopped) for images ``[B, H, W, 3]`` in [0, 1]."""
        mean, std = (jnp.asarray(v, jnp.float32) for v in NORMALISATIONS[self.normalisation])
        x = (jnp.clip(images.astype(jnp.float32), 0.0, 1.0) - mean) / std
        params = jax.lax.stop_gradient(params)
        want_blocks = self.layer is not None and self.layer != self.model.depth
        out = self.model.apply({"params": params}, x, return_blocks=want_blocks)
        if want_blocks:
            tokens = out["blocks"][self.layer - 1]
            if self.use_norm and self.model.use_final_norm:
                norm = params["norm"]
                tokens = _layer_norm(tokens, norm["scale"], norm["bias"], self.model.layer_norm_eps)
        else:
            tokens = out["encoded"] if self.use_norm else out["pre_norm"]
        first = 1 if self.model.use_cls_token else 0
        tokens = tokens[:, first:].astype(jnp.float32)
        if self.project:
            tokens = tokens @ params["head"]["kernel"].astype(jnp.float32)
        return jax.lax.stop_gradient(tokens)


def _layer_norm(x, scale, bias, eps):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def clip_vit_b16(**overrides) -> vit.VisionTransformer:
    """OpenAI CLIP ViT-B/16 visual tower as our ViT (head = the 768×512 projection, no bias)."""
    cfg = dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, qkv_bias="full",
               patch_embed_bias=False, use_abs_pos=True, layer_norm_eps=1e-5, activation="quick_gelu", ln_pre=True,
               use_final_norm=True, pooling="cls", num_classes=512, head_bias=False)
    cfg.update(overrides)
    return vit.VisionTransformer(**cfg)


def dino_vit_b16(**overrides) -> vit.VisionTransformer:
    """DINO ViT-B/16 (timm ViT names; LN eps 1e-6, full qkv bias, absolute positions)."""
    cfg = dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, qkv_bias="full", use_abs_pos=True,
               layer_norm_eps=1e-6, use_final_norm=True, pooling="cls")
    cfg.update(overrides)
    return vit.VisionTransformer(**cfg)


def teacher_from_checkpoint(kind: str, directory: str, layer: Optional[int] = None, use_norm: bool = True,
                            normalisation: Optional[str] = None, image_size: Optional[int] = None,
                            dtype: Any = "float32"):
    """Load a teacher from a directory written by ``beitv2_jax.convert`` or by a training task.

    Returns ``(Teacher, params)``. For ``beit_pretrain`` checkpoints the backbone is used with its final norm.
    ``dtype`` (``'float32'`` | ``'bfloat16'`` or a jnp dtype; e.g. the run's ``config.dtype``) is the teacher's
    compute dtype; its params stay float32 and :meth:`Teacher.features` still returns float32 targets.
    """
    from beitv2_jax.convert import store  # keeps orbax off the import path of the model code

    if kind not in KINDS:
        raise ValueError(f"teacher.kind must be one of {KINDS}, got {kind!r}")
    variables, model_kind, model_config = store.load_variables(directory)
    params = variables["params"]
    if model_kind == "beit_pretrain":
        backbone_cfg = dict(model_config["backbone"])
        backbone_cfg["use_final_norm"] = True
        params = dict(params["backbone"], norm=params["norm"])
        model_config = backbone_cfg
    elif model_kind != "vit":
        raise ValueError(f"{directory} holds a {model_kind!r} model; a teacher must be a ViT or a BEiT backbone")
    model_config = dict(model_config)
    if image_size is not None and image_size != model_config.get("image_size"):
        raise ValueError(f"teacher {directory} was built for {model_config.get('image_size')}px images, "
                         f"the tokenizer view is {image_size}px")
    model_config["dtype"] = compute_dtype(dtype)
    model = vit.VisionTransformer(**model_config)
    default_norm = {"clip": "clip", "dino": "imagenet", "vit_checkpoint": "imagenet"}[kind]
    teacher = Teacher(model=model, normalisation=normalisation or default_norm, layer=layer, use_norm=use_norm,
                      project=(kind == "clip"), name=f"{kind}:{directory}")
    return teacher, jax.tree.map(jnp.asarray, params)


def compute_dtype(dtype: Any):
    """``'float32'`` | ``'bfloat16'`` (or a jnp dtype; None = float32) → the jnp dtype."""
    names = {None: jnp.float32, "float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if dtype is None or isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"teacher dtype must be one of ('float32', 'bfloat16'), got {dtype!r}")
        return names[dtype]
    return dtype


def param_count(params) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
