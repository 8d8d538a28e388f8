"""Semantic segmentation: the BEiT backbone with multi-level features, UperNet and the auxiliary FCN head.

The official BEiT v2 ADE20K model (``beit2/semantic_segmentation``: ``backbone/beit.py`` + mmseg ``UPerHead`` /
``FCNHead``, reference §3.3), in Flax linen with NHWC tensors:

* :class:`SegmentationBackbone`: the :class:`~beitv2_jax.models.vit.VisionTransformer` (per-layer relative position
  tables, no final norm) whose block outputs at ``out_indices`` (patch tokens, CLS dropped) become a pyramid of
  strides 4/8/16/32 through ``fpn1..fpn4`` (patch 16: 2×(2×2 transposed conv) with BatchNorm + GELU between,
  one transposed conv, identity, 2×2 max-pool; patch 8: transposed conv, identity, max-pool 2, max-pool 4).
* :class:`UPerHead`: pyramid pooling (adaptive average pools ``pool_scales`` → 1×1 ConvModule → bilinear up) on the
  top level, lateral 1×1 ConvModules + top-down bilinear addition, 3×3 ``fpn_convs``, concat → 3×3
  ``fpn_bottleneck`` → channel dropout → 1×1 ``conv_seg``. Logits at stride 4.
* :class:`FCNHead`: the auxiliary head on level ``in_index`` (3×3 ConvModules → dropout → ``conv_seg``).
* :class:`SegmentationModel`: all three; ``__call__`` returns the logits of both heads at their own resolution
  (:func:`resize_bilinear` brings them to the label size, as mmseg does before the loss and at inference).

A ConvModule is conv (no bias) → :class:`BatchNorm` → ReLU. :class:`BatchNorm` has PyTorch semantics (batch
statistics in training — global over the batch under ``jit`` with a sharded global batch, as SyncBN —, running
statistics with momentum 0.1 and the *unbiased* batch variance, eps 1e-5) in the ``batch_stats`` collection.

Parameter layout (``[kh, kw, in, out]`` kernels)::

  backbone/{<ViT parameters: patch_embed, cls_token, blocks_{i}/attn/relative_position_bias_table, ...>,
            fpn1/{deconv_0, bn, deconv_1}, fpn2/deconv_0}            (deconv_*: {kernel [2, 2, D, D], bias [D]})
  decode_head/{psp_modules_{j}, bottleneck, lateral_convs_{l}, fpn_convs_{l}, fpn_bottleneck}/{conv/kernel, bn}
  decode_head/conv_seg/{kernel [1, 1, C, K], bias [K]}
  auxiliary_head/{convs_{n}/{conv/kernel, bn}, conv_seg/{kernel, bias}}
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.models import vit

Dtype = Any

# The backbone fields a segmentation model takes over from a pretrained encoder's model_config.
ENCODER_FIELDS = ("patch_size", "width", "depth", "num_heads", "mlp_ratio", "qkv_bias", "patch_embed_bias",
                  "use_abs_pos", "layer_scale_init", "layer_norm_eps", "activation", "ln_pre", "use_cls_token")
HEAD_FIELDS = ("num_classes", "channels", "pool_scales", "dropout_ratio", "aux_channels", "aux_num_convs",
               "aux_in_index", "align_corners")


# ----------------------------------------------------------------------------------------------- resampling
def bilinear_matrix(src: int, dst: int, align_corners: bool = False) -> np.ndarray:
    """``[dst, src]`` weights of PyTorch ``F.interpolate(mode='bilinear')`` along one axis (no antialiasing)."""
    out = np.zeros((dst, src), np.float64)
    for i in range(dst):
        if align_corners:
            x = i * (src - 1) / (dst - 1) if dst > 1 else 0.0
        else:
            x = max((i + 0.5) * src / dst - 0.5, 0.0)
        x0 = min(int(np.floor(x)), src - 1)
        x1 = min(x0 + 1, src - 1)
        t = x - x0
        out[i, x0] += 1.0 - t
        out[i, x1] += t
    return out


def resize_bilinear(x: jax.Array, size: Sequence[int], align_corners: bool = False) -> jax.Array:
    """``[B, h, w, C]`` → ``[B, H, W, C]`` exactly as mmseg ``resize(mode='bilinear')`` (torch semantics)."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    wy = jnp.asarray(bilinear_matrix(h, size[0], align_corners), x.dtype)
    wx = jnp.asarray(bilinear_matrix(w, size[1], align_corners), x.dtype)
    return jnp.einsum("yh,xw,bhwc->byxc", wy, wx, x)


def adaptive_pool_matrix(src: int, dst: int) -> np.ndarray:
    """``[dst, src]`` averaging weights of ``nn.AdaptiveAvgPool2d`` along one axis (bins floor(i·s/d)..ceil)."""
    out = np.zeros((dst, src), np.float64)
    for i in range(dst):
        start, end = (i * src) // dst, -((-(i + 1) * src) // dst)
        out[i, start:end] = 1.0 / (end - start)
    return out


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """``[B, H, W, C]`` → ``[B, size, size, C]`` (``nn.AdaptiveAvgPool2d(size)``)."""
    wy = jnp.asarray(adaptive_pool_matrix(x.shape[1], size), x.dtype)
    wx = jnp.asarray(adaptive_pool_matrix(x.shape[2], size), x.dtype)
    return jnp.einsum("yh,xw,bhwc->byxc", wy, wx, x)


def max_pool(x: jax.Array, k: int) -> jax.Array:
    """``nn.MaxPool2d(k, k)`` on NHWC."""
    return nn.max_pool(x, (k, k), strides=(k, k), padding="VALID")


# ----------------------------------------------------------------------------------------------- layers
class BatchNorm(nn.Module):
    """``nn.BatchNorm2d`` / ``SyncBatchNorm`` over all axes but the last, with PyTorch semantics.

    Training: normalise with the biased batch variance; running mean/var ← (1 − momentum)·running + momentum·batch
    with the unbiased batch variance (n/(n−1)). Eval: the running statistics. Params ``scale``/``bias`` ``[C]``,
    state ``batch_stats/{mean, var}`` ``[C]`` (float32).
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if train:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = xf.mean(axes)
            var = jnp.square(xf - mean).mean(axes)
            if not self.is_initializing():
                n = math.prod(x.shape[:-1])
                unbiased = var * (n / (n - 1)) if n > 1 else var
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = jax.lax.rsqrt(var + self.epsilon) * scale
        return (x.astype(jnp.float32) * mul + (bias - mean * mul)).astype(self.dtype)


def _kaiming_fan_out() -> vit.Initializer:
    """mmcv ``kaiming_init`` (normal, mode fan_out, ReLU gain), as ``ConvModule`` initialises its conv."""
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
    """``k×k`` convolution, stride 1, 'same' zero padding (``padding = k // 2``); kernel ``[k, k, in, out]``."""

    features: int
    kernel_size: int = 1
    use_bias: bool = False
    kernel_init: vit.Initializer = _kaiming_fan_out()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, (None, None, "embed", None)),
                            (k, k, x.shape[-1], self.features), jnp.float32)
        pad = k // 2
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (1, 1),
                                         ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                              (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class ConvModule(nn.Module):
    """mmcv ``ConvModule`` with a norm: conv (no bias) → BatchNorm → ReLU."""

    features: int
    kernel_size: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(self.features, self.kernel_size, dtype=self.dtype, name="conv")(x)
        return jax.nn.relu(BatchNorm(dtype=self.dtype, name="bn")(x, train))


class ConvTranspose2x2(nn.Module):
    """``nn.ConvTranspose2d(in, out, kernel_size=2, stride=2)``: ``[B, h, w, in]`` → ``[B, 2h, 2w, out]``.

    Kernel ``[2, 2, in, out]`` (= torch ``weight [in, out, 2, 2]`` transposed (2, 3, 0, 1)), PyTorch's default init
    (U(±1/√fan_in) with fan_in = out·4, as the official fpn keeps it).
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = self.features * 4
        kernel = self.param("kernel", nn.with_logical_partitioning(vit.torch_uniform(fan_in), (None, None, "embed",
                                                                                              None)),
                            (2, 2, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(vit.torch_uniform(fan_in), (None,)),
                          (self.features,), jnp.float32)
        b, h, w, _ = x.shape
        y = jnp.einsum("bhwc,ijco->bhiwjo", x.astype(self.dtype), kernel.astype(self.dtype))
        return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


# ----------------------------------------------------------------------------------------------- backbone
class SegmentationBackbone(vit.VisionTransformer):
    """The ViT as a 4-level feature pyramid (official ``BEiT`` backbone of ``semantic_segmentation``).

    Takes every :class:`~beitv2_jax.models.vit.VisionTransformer` field (set ``rel_pos='per_layer'`` for the
    official model; the pooling/norm/head fields are unused) plus ``out_indices`` (four 0-based block indices).
    ``__call__(images [B, H, W, 3], train)`` → tuple of four ``[B, H/s, W/s, D]`` for strides s = 4, 8, 16, 32.
    Images must be ``image_size`` (the relative position tables are built for that window).
    """

    out_indices: tuple = (3, 5, 7, 11)

    def _check_segmentation(self):
        self._check_config()
        if len(self.out_indices) != 4:
            raise ValueError(f"out_indices must name 4 blocks (fpn1..fpn4), got {self.out_indices}")
        if any(not 0 <= i < self.depth for i in self.out_indices) or list(self.out_indices) != sorted(
                set(self.out_indices)):
            raise ValueError(f"out_indices {self.out_indices} must be 4 increasing block indices in "
                             f"[0, {self.depth - 1}] (the official forward collects them in block order)")
        if self.patch_size not in (4, 8, 16):
            raise ValueError(f"fpn1..fpn4 exist for patch sizes 16 and 8 (official) and 4 (the demo's encoder), got "
                             f"{self.patch_size}")
        if not self.use_cls_token:
            raise ValueError("the segmentation backbone expects a class token (dropped from the features)")

    def pyramid(self, features: Sequence[jax.Array], train: bool) -> tuple:
        """fpn1..fpn4 on the four ``[B, h, w, D]`` maps."""
        d = self.width
        if self.patch_size == 16:
            f1 = _Fpn4x(d, self.dtype, name="fpn1")(features[0], train)
            f2 = _FpnUp2x(d, self.dtype, name="fpn2")(features[1])
            f3 = features[2]
            f4 = max_pool(features[3], 2)
        elif self.patch_size == 8:
            f1 = _FpnUp2x(d, self.dtype, name="fpn1")(features[0])
            f2 = features[1]
            f3 = max_pool(features[2], 2)
            f4 = max_pool(features[3], 4)
        else:  # patch 4 (the demo's encoder; not in the official code): the same strides without parameters
            f1 = features[0]
            f2 = max_pool(features[1], 2)
            f3 = max_pool(features[2], 4)
            f4 = max_pool(features[3], 8)
        return f1, f2, f3, f4

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> tuple:
        self._check_segmentation()
        x = self.embed(images)
        bias = self.shared_bias()
        rates = vit.drop_path_rates(self.drop_path_rate, self.depth)
        hp, wp = self.window
        first = 1 if self.use_cls_token else 0
        features = []
        for i in range(self.depth):
            x = self.block(i, rates[i], train)(x, bias)
            if i in self.out_indices:
                features.append(x[:, first:].reshape(x.shape[0], hp, wp, self.width))
        return self.pyramid(features, train)


class _Fpn4x(nn.Module):
    """Official ``fpn1`` for patch 16: ConvTranspose 2×2 → BatchNorm → GELU (exact) → ConvTranspose 2×2."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ConvTranspose2x2(self.features, self.dtype, name="deconv_0")(x)
        x = jax.nn.gelu(BatchNorm(dtype=self.dtype, name="bn")(x, train), approximate=False)
        return ConvTranspose2x2(self.features, self.dtype, name="deconv_1")(x)


class _FpnUp2x(nn.Module):
    """Official ``fpn2`` (patch 16) / ``fpn1`` (patch 8): one ConvTranspose 2×2."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return ConvTranspose2x2(self.features, self.dtype, name="deconv_0")(x)


# ----------------------------------------------------------------------------------------------- heads
def cls_seg(x: jax.Array, num_classes: int, dropout_ratio: float, train: bool, dtype: Dtype) -> jax.Array:
    """mmseg ``BaseDecodeHead.cls_seg``: ``Dropout2d`` (whole channels) → 1×1 ``conv_seg`` (init N(0, 0.01²), 0).

    Call inside a head's compact ``__call__`` (the layers become that head's ``dropout`` / ``conv_seg``)."""
    if dropout_ratio > 0:
        x = nn.Dropout(dropout_ratio, broadcast_dims=(1, 2), deterministic=not train)(x)
    return Conv(num_classes, 1, use_bias=True, kernel_init=nn.initializers.normal(0.01), dtype=dtype,
                name="conv_seg")(x)


class UPerHead(nn.Module):
    """mmseg ``UPerHead`` (PPM + FPN) on four levels ``[B, h_l, w_l, C_l]`` → logits ``[B, h_0, w_0, K]``."""

    num_classes: int
    channels: int = 768
    pool_scales: tuple = (1, 2, 3, 6)
    dropout_ratio: float = 0.1
    align_corners: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: Sequence[jax.Array], train: bool) -> jax.Array:
        c, ac = self.channels, self.align_corners
        top = inputs[-1]
        psp = [top] + [resize_bilinear(ConvModule(c, 1, self.dtype, name=f"psp_modules_{j}")(
            adaptive_avg_pool(top, s), train), top.shape[1:3], ac) for j, s in enumerate(self.pool_scales)]
        laterals = [ConvModule(c, 1, self.dtype, name=f"lateral_convs_{i}")(x, train)
                    for i, x in enumerate(inputs[:-1])]
        laterals.append(ConvModule(c, 3, self.dtype, name="bottleneck")(jnp.concatenate(psp, -1), train))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3], ac)
        outs = [ConvModule(c, 3, self.dtype, name=f"fpn_convs_{i}")(laterals[i], train)
                for i in range(len(laterals) - 1)] + [laterals[-1]]
        outs = [outs[0]] + [resize_bilinear(o, outs[0].shape[1:3], ac) for o in outs[1:]]
        x = ConvModule(c, 3, self.dtype, name="fpn_bottleneck")(jnp.concatenate(outs, -1), train)
        return cls_seg(x, self.num_classes, self.dropout_ratio, train, self.dtype)


class FCNHead(nn.Module):
    """mmseg ``FCNHead`` (``concat_input=False``): ``num_convs`` 3×3 ConvModules → logits ``[B, h, w, K]``."""

    num_classes: int
    channels: int = 256
    num_convs: int = 1
    dropout_ratio: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for n in range(self.num_convs):
            x = ConvModule(self.channels, 3, self.dtype, name=f"convs_{n}")(x, train)
        return cls_seg(x, self.num_classes, self.dropout_ratio, train, self.dtype)


# ----------------------------------------------------------------------------------------------- the model
class SegmentationModel(nn.Module):
    """Backbone + UperNet + auxiliary FCN (mmseg ``EncoderDecoder`` with an auxiliary head).

    ``apply({'params', 'batch_stats'}, images [B, H, W, 3], train=...)`` (``mutable=['batch_stats']`` and a
    ``'dropout'`` rng when ``train``) → ``{'logits': [B, H/4, W/4, K], 'aux_logits': [B, H/16, W/16, K]}`` (strides
    for patch 16). Resize with :func:`resize_bilinear` to the label size for the loss / the image for inference.
    """

    backbone: SegmentationBackbone
    num_classes: int
    channels: int = 768
    pool_scales: tuple = (1, 2, 3, 6)
    dropout_ratio: float = 0.1
    aux_channels: int = 256
    aux_num_convs: int = 1
    aux_in_index: int = 2
    align_corners: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> dict:
        features = self.backbone(images, train=train)
        logits = UPerHead(self.num_classes, self.channels, tuple(self.pool_scales), self.dropout_ratio,
                          self.align_corners, self.dtype, name="decode_head")(features, train)
        aux = FCNHead(self.num_classes, self.aux_channels, self.aux_num_convs, self.dropout_ratio, self.dtype,
                      name="auxiliary_head")(features[self.aux_in_index], train)
        return {"logits": logits, "aux_logits": aux}


# ----------------------------------------------------------------------------------------------- configs
def segmentation_config(encoder: dict, image_size: int, num_classes: int, *, out_indices: Sequence[int],
                        drop_path_rate: float = 0.0, channels: int = 768, pool_scales: Sequence[int] = (1, 2, 3, 6),
                        dropout_ratio: float = 0.1, aux_channels: int = 256, aux_num_convs: int = 1,
                        aux_in_index: int = 2, rel_pos: str = "per_layer", attention_impl: str = "auto",
                        remat_policy: str = "none") -> dict:
    """JSON-able config of the segmentation model on a pretrained ``encoder`` (a ViT model_config, e.g.
    ``finetune.load_pretrained(...).config``): ``{'backbone': {ViT fields + out_indices}, <head fields>}``.

    The backbone is the official one: per-layer relative position tables (``rel_pos='per_layer'``, or ``'shared'``
    / none when the encoder has none), no absolute positions unless the encoder has them, no final norm,
    the encoder's layer scale (its γ are loaded), ``init_truncation=100`` (timm's trunc_normal(.02) as mmseg's
    ``_init_weights`` uses for anything not loaded)."""
    if rel_pos not in ("per_layer", "shared"):
        raise ValueError(f"rel_pos must be 'per_layer' or 'shared', got {rel_pos!r}")
    backbone = {k: encoder[k] for k in ENCODER_FIELDS}
    backbone.update(image_size=int(image_size), rel_pos=rel_pos if encoder.get("rel_pos", "none") != "none" else
                    "none", use_mask_token=False, use_final_norm=False, use_fc_norm=False, pooling="none",
                    num_classes=0, drop_path_rate=float(drop_path_rate), init_truncation=100.0,
                    attention_impl=attention_impl, remat_policy=remat_policy,
                    out_indices=[int(i) for i in out_indices])
    return {"backbone": backbone, "num_classes": int(num_classes), "channels": int(channels),
            "pool_scales": [int(s) for s in pool_scales], "dropout_ratio": float(dropout_ratio),
            "aux_channels": int(aux_channels), "aux_num_convs": int(aux_num_convs), "aux_in_index": int(aux_in_index),
            "align_corners": False}


def model_from_config(cfg: dict, dtype: Dtype = jnp.float32) -> SegmentationModel:
    """:class:`SegmentationModel` from :func:`segmentation_config`'s dict (lists become tuples)."""
    bb = dict(cfg["backbone"])
    bb["out_indices"] = tuple(bb["out_indices"])
    heads = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in HEAD_FIELDS}
    unknown = set(cfg) - set(HEAD_FIELDS) - {"backbone"}
    if unknown:
        raise ValueError(f"unknown segmentation model fields {sorted(unknown)}")
    return SegmentationModel(backbone=SegmentationBackbone(**bb, dtype=dtype), **heads, dtype=dtype)
