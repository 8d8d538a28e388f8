"""The DALL-E dVAE encoder (BEiT v1 tokenizer) as a Flax module, and its frozen-tokenizer interface.

Re-implements ``dall_e/encoder.py`` of the ``dall-e`` package (reference §1 "Tokenizer"): a 7×7 input convolution,
``group_count`` groups of ``n_blk_per_group`` residual blocks at widths ``n_hid · 2^g`` (2×2 max-pool after every
group but the last), then ReLU + a 1×1 convolution to ``vocab_size`` logits. Every convolution pads
``(k − 1) // 2`` on each side (``'SAME'`` for the odd kernels used). Images are NHWC.

Parameters (names mirror the PyTorch module path ``blocks.<name>``, so the converter stays a table)::

  input/{kernel [7, 7, 3, n_hid], bias}
  group_{g}/block_{b}/id_path/{kernel [1, 1, in, out], bias}          only when in != out
  group_{g}/block_{b}/res_path/conv_{1..4}/{kernel, bias}            3×3, 3×3, 3×3, 1×1 (hidden = out / 4)
  output/conv/{kernel [1, 1, 8·n_hid, vocab], bias}

Tokenizer use: images ``[B, H, W, 3]`` in [0, 1] → ``map_pixels`` (``(1 − 2ε)x + ε``, ε = 0.1) → logits
``[B, H/8, W/8, vocab]`` → labels = argmax, flattened row-major to ``[B, N]`` (official ``get_codebook_indices``).
"""
from __future__ import annotations

import math
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

LOGIT_LAPLACE_EPS = 0.1
MODEL_KIND = "dvae"
CONFIG_FIELDS = ("group_count", "n_hid", "n_blk_per_group", "vocab_size", "input_channels", "image_size")


def map_pixels(x: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
    """``dall_e.map_pixels``: [0, 1] → [ε, 1 − ε]."""
    return (1.0 - 2.0 * eps) * x + eps


def _conv(features: int, kernel: int, fan_in: int, name: str) -> nn.Conv:
    """The package's ``Conv2d``: weight N(0, 1/(fan_in·k²)), bias 0, padding (k − 1)/2."""
    std = 1.0 / math.sqrt(fan_in * kernel * kernel)
    return nn.Conv(features, (kernel, kernel), padding="SAME", kernel_init=nn.initializers.normal(std),
                   bias_init=nn.initializers.zeros, param_dtype=jnp.float32, name=name)


class ResPath(nn.Module):
    """The residual branch of an ``EncoderBlock``: (ReLU, conv) × 4 with kernels 3, 3, 3, 1 (``conv_1`` … ``conv_4``)."""

    n_in: int
    n_out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.n_out // 4
        for i, (n_in, n_out, k) in enumerate(((self.n_in, hidden, 3), (hidden, hidden, 3), (hidden, hidden, 3),
                                              (hidden, self.n_out, 1)), start=1):
            x = _conv(n_out, k, n_in, f"conv_{i}")(jax.nn.relu(x))
        return x


class EncoderBlock(nn.Module):
    """``id_path(x) + post_gain · res_path(x)`` with ``post_gain = 1 / n_layers²``; ``id_path`` is a 1×1 conv when
    the width changes, else the identity."""

    n_in: int
    n_out: int
    n_layers: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, n_in]`` → ``[B, H, W, n_out]``."""
        identity = _conv(self.n_out, 1, self.n_in, "id_path")(x) if self.n_in != self.n_out else x
        return identity + (1.0 / self.n_layers ** 2) * ResPath(self.n_in, self.n_out, name="res_path")(x)


class EncoderGroup(nn.Module):
    """``n_blocks`` blocks (``block_1`` …) at width ``n_out``, then a 2×2 max-pool when ``pool``."""

    n_in: int
    n_out: int
    n_blocks: int
    n_layers: int
    pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for b in range(self.n_blocks):
            x = EncoderBlock(self.n_in if b == 0 else self.n_out, self.n_out, self.n_layers, name=f"block_{b + 1}")(x)
        return nn.max_pool(x, (2, 2), strides=(2, 2)) if self.pool else x


class OutputLayer(nn.Module):
    """ReLU then the 1×1 ``conv`` to the vocabulary (the package keeps this one in float32 on GPU too)."""

    n_in: int
    vocab_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(self.vocab_size, 1, self.n_in, "conv")(jax.nn.relu(x))


class DVAEEncoder(nn.Module):
    """DALL-E dVAE encoder. ``__call__(x [B, H, W, C])`` → logits ``[B, H/2^(G−1), W/2^(G−1), vocab]`` on the raw
    network input (already ``map_pixels``-ed); :meth:`logits` / :meth:`get_codebook_indices` take [0, 1] images."""

    group_count: int = 4
    n_hid: int = 256
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    input_channels: int = 3
    image_size: int = 112  # the tokenizer view it is used at (any multiple of the stride works)

    @property
    def num_codes(self) -> int:
        return self.vocab_size

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.input_channels:
            raise ValueError(f"input has {x.shape[-1]} channels, the encoder was built for {self.input_channels}")
        n_layers = self.group_count * self.n_blk_per_group
        x = _conv(self.n_hid, 7, self.input_channels, "input")(x.astype(jnp.float32))
        width = self.n_hid
        for g in range(self.group_count):
            out = self.n_hid * 2 ** g
            x = EncoderGroup(width, out, self.n_blk_per_group, n_layers, pool=g < self.group_count - 1,
                             name=f"group_{g + 1}")(x)
            width = out
        return OutputLayer(width, self.vocab_size, name="output")(x)

    def logits(self, images: jax.Array) -> jax.Array:
        """Images ``[B, H, W, 3]`` in [0, 1] → token logits ``[B, N, vocab]`` float32 (N = (H/8)·(W/8), row-major)."""
        out = self(map_pixels(images.astype(jnp.float32)))
        return out.reshape(out.shape[0], -1, out.shape[-1])

    def get_codebook_indices(self, images: jax.Array) -> jax.Array:
        """The BEiT v1 labels: ``[B, N]`` int32 argmax of :meth:`logits`."""
        return jnp.argmax(self.logits(images), axis=-1).astype(jnp.int32)


def build_dvae(config: Mapping) -> DVAEEncoder:
    """A ``DVAEEncoder`` from a config dict (keys ``CONFIG_FIELDS``; missing ones take the DALL-E defaults)."""
    unknown = set(config) - set(CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown dVAE config keys {sorted(unknown)}; known: {CONFIG_FIELDS}")
    return DVAEEncoder(**dict(config))


def model_config(model: DVAEEncoder) -> dict:
    return {f: getattr(model, f) for f in CONFIG_FIELDS}


def init_variables(model: DVAEEncoder, seed: int = 0) -> dict:
    """Random ``{'params': ...}`` with the package's init (tests and tiny runs)."""
    size = model.downsample * 2
    return jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, model.input_channels)))


def save_dvae(directory: str, variables: Mapping, config: Mapping, info: Mapping | None = None) -> str:
    """Write the encoder in the converted-weights directory format (``model.json`` + orbax ``variables/``) with
    ``model_kind='dvae'``, atomically (``convert.store.save_variables``)."""
    from beitv2_jax.convert import store

    if "params" not in variables:
        raise ValueError(f"variables need a 'params' collection, got {sorted(variables)}")
    return store.save_variables(directory, {"params": nn.meta.unbox(variables["params"])}, MODEL_KIND, dict(config),
                                info=info)


def load_dvae(directory: str) -> tuple:
    """``(DVAEEncoder, variables)`` from a directory written by :func:`save_dvae` (or the converter)."""
    from beitv2_jax.convert import store

    variables, kind, config = store.load_variables(directory)
    if kind != MODEL_KIND:
        raise ValueError(f"{directory} holds a {kind!r} model, not a dVAE encoder")
    return build_dvae(config), {"params": variables["params"]}
