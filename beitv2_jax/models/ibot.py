"""iBOT: student / EMA-teacher ViTs with a shared projection head (reference §3, ``bytedance/ibot``).

* :class:`IBOTHead` = ``iBOTHead`` of ``models/head.py``: MLP ``D → hidden → hidden → bottleneck`` (GELU between,
  no norm), l2-normalise, weight-normalised ``last_layer`` (bottleneck → out_dim, no bias) shared by the CLS and
  patch tokens (``shared_head=True``, the README recipes) or a second ``last_layer2`` for the patches.
* :class:`IBOT` ties a :class:`~beitv2_jax.models.vit.VisionTransformer` backbone (absolute positions, full qkv bias,
  no layer scale, ``mask_token`` = iBOT's ``masked_embed`` replacing masked patch embeddings before the positions
  are added) to the head, runs crops of any size (positions resized like ``interpolate_pos_encoding``) and
  initialises the parameters as the official code does.

Parameters ``{'backbone': ViT params, 'head': {mlp_0, mlp_1, mlp_2: {kernel, bias}, last_layer: {weight_g [1, K],
weight_v [bottleneck, K]}, [last_layer2]}}``. The weight-normalised kernel is ``weight_g · weight_v / ‖weight_v‖``
with the norm over the input axis per output unit (PyTorch ``weight_norm(dim=0)`` on ``[K, bottleneck]``); ``weight_g``
is stored ``[1, K]`` (2-D, like PyTorch's ``[K, 1]``), so a trainable ``weight_g`` is weight-decayed as officially.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.models import vit
from beitv2_jax.models.quantizer import l2_normalize

HEAD_FIELDS = ("out_dim", "patch_out_dim", "hidden_dim", "bottleneck_dim", "num_layers", "shared_head")


def weight_norm_kernel(weight_g: jax.Array, weight_v: jax.Array) -> jax.Array:
    """``g · v / ‖v‖`` with ``v [in, out]`` normalised over ``in`` per output unit and ``g [1, out]`` → ``[in, out]``."""
    v = weight_v.astype(jnp.float32)
    return weight_g.astype(jnp.float32) * v / jnp.linalg.norm(v, axis=0, keepdims=True)


class WeightNormDense(nn.Module):
    """``nn.utils.weight_norm(nn.Linear(in, features, bias=False))`` with ``weight_g`` filled with 1 and ``weight_v``
    at PyTorch's default Linear init (U(±1/√in)), as ``DINOHead`` builds its ``last_layer``."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[..., in]`` → ``[..., features]`` float32."""
        fan_in = x.shape[-1]
        weight_g = self.param("weight_g", nn.with_logical_partitioning(nn.initializers.ones, (None, "vocab")),
                              (1, self.features), jnp.float32)
        weight_v = self.param("weight_v", nn.with_logical_partitioning(vit.torch_uniform(fan_in), (None, "vocab")),
                              (fan_in, self.features), jnp.float32)
        return jnp.dot(x.astype(jnp.float32), weight_norm_kernel(weight_g, weight_v))


class IBOTHead(nn.Module):
    """The projection head. ``__call__(tokens [B, T, D])`` → ``(cls [B, out_dim], patches [B, T−1, patch_out_dim])``;
    ``__call__(cls [B, D])`` → ``[B, out_dim]`` (DINOHead on the class token only, as for the local crops)."""

    out_dim: int = 8192
    patch_out_dim: int = 8192  # used only with shared_head=False
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    shared_head: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array):
        if self.num_layers < 2:
            raise ValueError(f"head.num_layers must be >= 2 (Linear-GELU-...-Linear), got {self.num_layers}")
        widths = [self.hidden_dim] * (self.num_layers - 1) + [self.bottleneck_dim]
        for i, width in enumerate(widths):
            names = ("embed" if i == 0 else None, "mlp" if i < len(widths) - 1 else None)
            x = vit.Dense(width, names=names, init_truncation=100.0, dtype=self.dtype, name=f"mlp_{i}")(x)
            if i < len(widths) - 1:
                x = jax.nn.gelu(x, approximate=False)
        x = l2_normalize(x)
        last_layer = WeightNormDense(self.out_dim, name="last_layer")
        if x.ndim == 2:
            return last_layer(x)
        last_layer2 = last_layer if self.shared_head else WeightNormDense(self.patch_out_dim, name="last_layer2")
        return last_layer(x[:, 0]), last_layer2(x[:, 1:])


# ----------------------------------------------------------------------------------------------- positions
def bicubic_matrix(src: int, dst: int, scale: float) -> np.ndarray:
    """``[dst, src]`` weights of PyTorch ``interpolate(mode='bicubic', align_corners=False, scale_factor=scale)``
    (A = −0.75, source coordinate ``(i + 0.5) / scale − 0.5``, borders clamped)."""
    a = -0.75
    out = np.zeros((dst, src), np.float64)
    for i in range(dst):
        x = (i + 0.5) / scale - 0.5
        x0 = math.floor(x)
        t = x - x0
        coeffs = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                  ((a + 2) * t - (a + 3)) * t * t + 1,
                  ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
                  ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
        for k, c in enumerate(coeffs):
            out[i, min(max(x0 - 1 + k, 0), src - 1)] += c
    return out


def interpolate_pos_embed(pos_embed: jax.Array, grid: int) -> jax.Array:
    """iBOT/DINO ``interpolate_pos_encoding``: ``[1, 1 + n², D]`` → ``[1, 1 + grid², D]`` for a ``grid × grid``
    crop (bicubic with ``scale_factor = (grid + 0.1) / n``, class position kept). Differentiable."""
    n = int(round(math.sqrt(pos_embed.shape[1] - 1)))
    if n * n != pos_embed.shape[1] - 1:
        raise ValueError(f"pos_embed {pos_embed.shape}: the patch positions do not form a square grid")
    if grid == n:
        return pos_embed
    m = jnp.asarray(bicubic_matrix(n, grid, (grid + 0.1) / n), jnp.float32)
    patches = pos_embed[0, 1:].reshape(n, n, -1).astype(jnp.float32)
    resized = jnp.einsum("ys,xt,sth->yxh", m, m, patches, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([pos_embed[:, :1], resized.reshape(1, grid * grid, -1).astype(pos_embed.dtype)], 1)


# ----------------------------------------------------------------------------------------------- the model
def ibot_backbone(**overrides) -> vit.VisionTransformer:
    """iBOT's ViT (``vit_small``/``vit_base`` of ``models/vision_transformer.py``): absolute positions, full qkv
    bias, LN eps 1e-6, final norm on all tokens, ``mask_token`` for masked image modeling. ViT-S/16 by default."""
    cfg = dict(image_size=224, patch_size=16, width=384, depth=12, num_heads=6, qkv_bias="full", use_abs_pos=True,
               rel_pos="none", layer_scale_init=0.0, use_mask_token=True, use_final_norm=True, pooling="cls",
               init_truncation=100.0, patch_embed_init="torch_default")
    cfg.update(overrides)
    return vit.VisionTransformer(**cfg)


def backbone_export_config(backbone: vit.VisionTransformer) -> dict:
    """The ``vit`` model config of the exported teacher backbone (no mask token, no drop path)."""
    from beitv2_jax.convert.model_shapes import VIT_FIELDS

    cfg = {f: getattr(backbone, f) for f in VIT_FIELDS}
    cfg.update(use_mask_token=False)
    return cfg


def official_init(params: dict, depth: int, zero_init_cls: bool = False) -> dict:
    """Undo ``Block``'s BEiT ``fix_init_weight`` rescale (iBOT has none: attn.proj and mlp.fc2 keep std 0.02) and
    zero the mask token (iBOT's ``masked_embed`` starts at zeros). ``params`` = backbone params, returns a copy.

    ``zero_init_cls``: also start the class token and its position embedding at zero (timm's ViT draws the class
    token with std 1e-6; the official iBOT uses 0.02). In a shallow ViT the class token then carries the attention
    average of the patches instead of a constant shared by all images (see ``recipes.ibot_demo``)."""
    params = jax.tree.map(lambda x: x, params)
    if zero_init_cls:
        params["cls_token"] = jnp.zeros_like(params["cls_token"])
        params["pos_embed"] = params["pos_embed"].at[:, 0].set(0.0)
    for i in range(depth):
        block = params[f"blocks_{i}"]
        scale = math.sqrt(2.0 * (i + 1))
        block["attn"]["proj"] = block["attn"]["proj"] * scale
        block["mlp"]["fc2"]["kernel"] = block["mlp"]["fc2"]["kernel"] * scale
    if "mask_token" in params:
        params["mask_token"] = jnp.zeros_like(params["mask_token"])
    return params


@dataclasses.dataclass(frozen=True)
class IBOT:
    """Student/teacher network = ``backbone`` + ``head`` (the same structure for both; the teacher is run with
    ``train=False`` and without a mask). Pure functions over the parameter dict ``{'backbone', 'head'}``."""

    backbone: vit.VisionTransformer
    head: IBOTHead
    zero_init_cls: bool = False  # config.model.zero_init_cls: class token + its position embedding start at 0

    def init(self, key: jax.Array) -> dict:
        """Parameters as the official code initialises them (unboxed)."""
        k1, k2 = jax.random.split(key)
        size, n = self.backbone.image_size, self.backbone.num_patches
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        backbone = nn.meta.unbox(self.backbone.init(k1, images, jnp.zeros((1, n), bool))["params"])
        head = nn.meta.unbox(self.head.init(k2, jnp.zeros((1, 1 + n, self.backbone.width), jnp.float32))["params"])
        return {"backbone": official_init(backbone, self.backbone.depth, self.zero_init_cls), "head": head}

    def abstract_boxed(self) -> dict:
        """Parameter shapes with their logical axis names (for sharding), without computing anything."""
        size, n = self.backbone.image_size, self.backbone.num_patches

        def init(key):
            images = jnp.zeros((1, size, size, 3), jnp.float32)
            return {"backbone": self.backbone.init(key, images, jnp.zeros((1, n), bool))["params"],
                    "head": self.head.init(key, jnp.zeros((1, 1 + n, self.backbone.width), jnp.float32))["params"]}

        return jax.eval_shape(init, jax.random.PRNGKey(0))

    def encode(self, backbone_params: dict, images: jax.Array, mask: Optional[jax.Array] = None, *,
               train: bool = False, rng: Optional[jax.Array] = None) -> jax.Array:
        """Final-norm tokens ``[B, 1 + N, D]`` of square crops of any size (multiple of the patch size): positions
        are resized (differentiably) when the crop grid differs from the backbone's."""
        size = images.shape[1]
        grid = size // self.backbone.patch_size
        model, params = self.backbone, backbone_params
        if size != self.backbone.image_size:
            model = self.backbone.clone(image_size=size)
            params = dict(params, pos_embed=interpolate_pos_embed(params["pos_embed"], grid))
        rngs = {"dropout": rng} if rng is not None else {}
        return model.apply({"params": params}, images, mask, train=train, rngs=rngs)["encoded"]

    def __call__(self, params: dict, images: jax.Array, mask: Optional[jax.Array] = None, *, train: bool = False,
                 rng: Optional[jax.Array] = None, cls_only: bool = False):
        """Head outputs of crops ``[B, S, S, 3]``: ``(cls [B, out_dim], patches [B, N, patch_out_dim])``, or only
        ``cls`` with ``cls_only`` (the local crops; the head then runs on the class token alone)."""
        tokens = self.encode(params["backbone"], images, mask, train=train, rng=rng)
        if cls_only:
            return self.head.apply({"params": params["head"]}, tokens[:, 0])
        return self.head.apply({"params": params["head"]}, tokens)


def build_ibot(model_cfg: dict, head_cfg: dict, image_size: int, dtype=jnp.float32,
               drop_path_rate: float = 0.0) -> IBOT:
    """An :class:`IBOT` from ``config.model`` (ViT fields: patch_size, width, depth, num_heads, mlp_ratio, ...) and
    ``config.head`` (``HEAD_FIELDS``)."""
    vit_fields = {k: v for k, v in model_cfg.items() if k in vit.VisionTransformer.__dataclass_fields__}
    vit_fields.update(image_size=image_size, drop_path_rate=drop_path_rate, dtype=dtype)
    head = IBOTHead(**{k: head_cfg[k] for k in HEAD_FIELDS if k in head_cfg}, dtype=dtype)
    return IBOT(backbone=ibot_backbone(**vit_fields), head=head, zero_init_cls=bool(model_cfg.get("zero_init_cls")))
