"""BEiT v2 masked-image-modeling model: ViT backbone + LM head + patch-aggregation ("cls_pt") head.

Parameters::

  backbone/...            the VisionTransformer (mask token, shared relative position bias, layer scale)
  norm/{scale, bias}      final LayerNorm, shared by both branches (shared_lm_head=True, as released)
  lm_head/{kernel [D, V], bias [V]}
  cls_pt_layers_{j}/...   the 2 patch-aggregation blocks (PyTorch default Linear init, as the official code)
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.models import vit


def masked_positions(mask: jax.Array, num_masked: int) -> jax.Array:
    """Indices ``[B, num_masked]`` (ascending, row-major like ``x[bool_masked_pos]``) of the masked patches.

    Every row of ``mask [B, N]`` must have exactly ``num_masked`` True entries (the block-wise generator
    guarantees it); this keeps shapes static under ``jax.jit``.
    """
    order = jnp.argsort(jnp.logical_not(mask), axis=1, stable=True)
    return order[:, :num_masked]


def gather_tokens(x: jax.Array, positions: jax.Array) -> jax.Array:
    """``x [B, N, ...]`` at ``positions [B, K]`` → ``[B, K, ...]``."""
    return jnp.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)), axis=1)


class BEiTPretrainModel(nn.Module):
    """Predicts tokenizer codes at masked patches from the final layer and from the aggregation branch.

    ``__call__(images [B, H, W, 3], mask [B, N] bool)`` returns a dict with ``logits_1`` ``[B, K, vocab]``
    (final layer), ``logits_2`` (patch-aggregation branch; absent when ``head_layers == 0``, i.e. BEiT v1),
    ``positions`` ``[B, K]`` and ``features`` (final normed tokens ``[B, T, D]``). K = ``num_masked_patches``.
    """

    backbone: vit.VisionTransformer
    vocab_size: int = 8192
    num_masked_patches: int = 75
    early_layers: int = 9
    head_layers: int = 2

    def setup_check(self):
        if self.backbone.use_final_norm:
            raise ValueError("the BEiT pretraining model owns the final norm: build the backbone with "
                             "use_final_norm=False")
        if self.head_layers and not 1 <= self.early_layers < self.backbone.depth:
            raise ValueError(f"model.early_layers must be in [1, depth-1] = [1, {self.backbone.depth - 1}], "
                             f"got {self.early_layers}")

    @nn.compact
    def __call__(self, images: jax.Array, mask: jax.Array, *, train: bool = False) -> dict:
        self.setup_check()
        bb = self.backbone
        out = bb(images, mask, train=train, return_blocks=self.head_layers > 0)
        norm = vit._layer_norm(bb.layer_norm_eps, bb.dtype, "norm")
        lm_head = vit.Dense(self.vocab_size, names=("embed", "vocab"), init_std=bb.init_std,
                            init_truncation=bb.init_truncation, dtype=bb.dtype, name="lm_head")
        positions = masked_positions(mask, self.num_masked_patches)

        # LayerNorm is per token, so the loss branches gather the K masked tokens first and normalise only those
        # (identical values). ``features`` (every token normed) is for mc-BEiT's targets; unused, jit drops it.
        result = {"positions": positions, "features": norm(out["pre_norm"]),
                  "logits_1": lm_head(norm(gather_tokens(out["pre_norm"][:, 1:], positions))).astype(jnp.float32)}
        if self.head_layers > 0:
            early = out["blocks"][self.early_layers - 1][:, 1:]
            x = jnp.concatenate([out["pre_norm"][:, :1], early], axis=1)
            result["aggregation_input"] = x  # [B, 1 + N, D]: final-layer CLS (pre-norm) + early patch tokens
            total = max(bb.depth, self.early_layers + self.head_layers)
            rates = vit.drop_path_rates(bb.drop_path_rate, total)
            bias = out.get("shared_bias")  # the cls_pt blocks use the same shared table
            for j in range(self.head_layers):
                layer_id = self.early_layers + j + 1
                x = vit.block_class(bb.remat_policy)(
                    num_heads=bb.num_heads, mlp_dim=int(bb.width * bb.mlp_ratio), layer_id=layer_id,
                    qkv_bias=bb.qkv_bias, layer_scale_init=bb.layer_scale_init,
                    drop_path_rate=float(rates[self.early_layers + j]), layer_norm_eps=bb.layer_norm_eps,
                    activation=bb.activation, init_style="torch_default", attention_impl=bb.attention_impl,
                    deterministic=not train, dtype=bb.dtype, name=f"cls_pt_layers_{j}")(x, bias)
            result["logits_2"] = lm_head(norm(gather_tokens(x[:, 1:], positions))).astype(jnp.float32)
        return result


def beit_backbone(**overrides) -> vit.VisionTransformer:
    """ViT-B/16 BEiT v2 pretraining backbone (override any field, e.g. ``width=1024, depth=24``)."""
    cfg = dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, qkv_bias="qv", rel_pos="shared",
               layer_scale_init=0.1, use_mask_token=True, use_final_norm=False, pooling="none",
               init_truncation=1.0)
    cfg.update(overrides)
    return vit.VisionTransformer(**cfg)


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
