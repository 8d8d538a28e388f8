"""VQ-KD tokenizer: ViT encoder → 32-d l2-normalised codes → cosine EMA codebook → ViT decoder → teacher features.

Parameters (``params`` collection)::

  encoder/...                      ViT-B/16: absolute positions, q/v bias, no layer scale, fc_norm on patch tokens
  encode_task_layer/{fc1, fc2}     Linear(D, D) → tanh → Linear(D, code_dim), run in float32
  decoder/...                      ViT on the code map: image 14, patch 1 (1×1 embed from code_dim channels)
  decode_task_layer/{fc1, fc2}     Linear(D, D) → tanh → Linear(D, teacher_dim)

The codebook lives in the ``codebook`` collection (``quantize/{weight, cluster_size, initted}``), never in
``params``. Images come in ``[0, 1]`` (NHWC) and are mapped to ``[−1, 1]`` before the encoder.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from beitv2_jax.models import quantizer as quant
from beitv2_jax.models import vit
from beitv2_jax.models.beit import gather_tokens


def vqkd_encoder(**overrides) -> vit.VisionTransformer:
    """The official tokenizer encoder (ViT-B/16 defaults; override any field)."""
    cfg = dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, qkv_bias="qv", use_abs_pos=True,
               rel_pos="none", layer_scale_init=0.0, use_final_norm=False, use_fc_norm=True, pooling="none",
               init_truncation=100.0, patch_embed_init="torch_default")
    cfg.update(overrides)
    return vit.VisionTransformer(**cfg)


def vqkd_decoder(window: int = 14, code_dim: int = 32, **overrides) -> vit.VisionTransformer:
    """The official decoder: same block type on the ``window × window`` code map (patch size 1)."""
    del code_dim  # the 1×1 patch embedding reads the channel count from its input
    cfg = dict(image_size=window, patch_size=1, width=768, depth=3, num_heads=12, qkv_bias="qv", use_abs_pos=True,
               rel_pos="none", layer_scale_init=0.0, use_final_norm=False, use_fc_norm=True, pooling="none",
               init_truncation=100.0, patch_embed_init="torch_default")
    cfg.update(overrides)
    return vit.VisionTransformer(**cfg)


class TaskLayer(nn.Module):
    """Linear → tanh → Linear, computed in float32 (``fc1``/``fc2`` = official ``.0``/``.2``)."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = dict(init_truncation=100.0, dtype=jnp.float32)
        x = vit.Dense(self.hidden, names=("embed", "mlp"), name="fc1", **dense)(x.astype(jnp.float32))
        return vit.Dense(self.out, names=("mlp", None), name="fc2", **dense)(jnp.tanh(x))


def cosine_rec_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over tokens of ``1 − cos(pred, target)`` (both ``[..., dim]``), float32."""
    pred = quant.l2_normalize(pred)
    target = quant.l2_normalize(target)
    return jnp.mean(1.0 - jnp.sum(pred * target, axis=-1))


class VQKD(nn.Module):
    """The tokenizer. ``__call__(images [B, H, W, 3] in [0, 1], train)`` → dict with

    ``features`` ``[B, N, teacher_dim]`` (decoder output), ``indices`` ``[B, N]`` int32, ``quant_loss`` scalar,
    ``bins`` ``[K]`` code counts of the batch, ``perplexity``.
    """

    encoder: vit.VisionTransformer
    decoder: vit.VisionTransformer
    num_codes: int = 8192
    code_dim: int = 32
    decay: float = 0.99
    beta: float = 1.0
    kmeans_init: bool = True
    teacher_dim: int = 512

    def setup(self):
        self.encode_task_layer = TaskLayer(self.encoder.width, self.code_dim)
        self.quantize = quant.NormEMAQuantizer(num_codes=self.num_codes, code_dim=self.code_dim, decay=self.decay,
                                               beta=self.beta, kmeans_init=self.kmeans_init)
        self.decode_task_layer = TaskLayer(self.decoder.width, self.teacher_dim)

    @staticmethod
    def preprocess(images: jax.Array) -> jax.Array:
        """[0, 1] → [−1, 1] (the official ``process_type='default'``)."""
        return images * 2.0 - 1.0

    def encode(self, images: jax.Array, train: bool = False):
        """→ ``(z_q [B, h, w, code_dim] straight-through, indices [B, h, w], quant_loss, aux)``."""
        tokens = self.encoder(self.preprocess(images), train=train)["patch_tokens"]  # fc_norm(patches)
        z = self.encode_task_layer(tokens)
        h, w = self.encoder.window
        z = z.reshape(z.shape[0], h, w, self.code_dim)
        return self.quantize(z, train=train)

    def decode(self, z_q: jax.Array, train: bool = False) -> jax.Array:
        """Code map ``[B, h, w, code_dim]`` → teacher-space features ``[B, h·w, teacher_dim]``."""
        tokens = self.decoder(z_q.astype(self.decoder.dtype), train=train)["patch_tokens"]
        return self.decode_task_layer(tokens)

    def get_codebook_indices(self, images: jax.Array) -> jax.Array:
        """The MIM labels: ``[B, N]`` int32 code ids of ``images`` ``[B, H, W, 3]`` in [0, 1]."""
        _, indices, _, _ = self.encode(images, train=False)
        return indices.reshape(indices.shape[0], -1)

    def get_codebook_indices_at(self, images: jax.Array, positions: jax.Array) -> jax.Array:
        """The code ids ``[B, K]`` of the patches at ``positions [B, K]`` only (= ``get_codebook_indices(images)``
        gathered at ``positions``, the same per-token arithmetic): the task layer and the ``[·, num_codes]`` code
        distances run on the K masked patches instead of all N (75 of 196 in BEiT v2). Codebook state unchanged."""
        tokens = self.encoder(self.preprocess(images), train=False)["patch_tokens"]  # [B, N, D]
        z = quant.l2_normalize(self.encode_task_layer(gather_tokens(tokens, positions)))
        codebook = self.get_variable("codebook", "quantize")["weight"]
        return quant.nearest_codes(z, jax.lax.stop_gradient(jnp.asarray(codebook, jnp.float32)))

    def __call__(self, images: jax.Array, train: bool = False) -> dict:
        z_q, indices, quant_loss, aux = self.encode(images, train=train)
        features = self.decode(z_q, train=train)
        return {"features": features, "indices": indices.reshape(indices.shape[0], -1), "quant_loss": quant_loss,
                "bins": aux["bins"], "perplexity": aux["perplexity"]}


def build_vqkd(cfg) -> VQKD:
    """A VQKD from a config section (``ml_collections`` or dict) with keys ``image_size, patch_size, width,
    depth, num_heads, decoder_depth, decoder_width, decoder_heads, num_codes, code_dim, decay, teacher_dim,
    kmeans_init`` (all optional, ViT-B/16 + 3-layer decoder + 8192×32 codebook + 512-d CLIP target by default).
    """
    get = (lambda k, d: cfg.get(k, d))
    width = get("width", 768)
    encoder = vqkd_encoder(image_size=get("image_size", 224), patch_size=get("patch_size", 16), width=width,
                           depth=get("depth", 12), num_heads=get("num_heads", 12),
                           drop_path_rate=get("drop_path_rate", 0.0), dtype=_dtype(get("dtype", "float32")))
    window = encoder.window[0]
    decoder = vqkd_decoder(window=window, width=get("decoder_width", width), depth=get("decoder_depth", 3),
                           num_heads=get("decoder_heads", get("num_heads", 12)), dtype=_dtype(get("dtype", "float32")))
    return VQKD(encoder=encoder, decoder=decoder, num_codes=get("num_codes", 8192), code_dim=get("code_dim", 32),
                decay=get("decay", 0.99), teacher_dim=get("teacher_dim", 512), kmeans_init=get("kmeans_init", True))


def _dtype(name: Optional[str]):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: jnp.float32}[name]
