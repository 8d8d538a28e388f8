"""Array transforms between PyTorch tensor layouts and our Flax parameter layouts, each with its inverse.

A :class:`Transform` maps the PyTorch arrays of one rule (``to_flax(*torch_arrays) -> tuple``) and back
(``to_torch(*flax_arrays) -> tuple``). Everything is numpy; the pairs are exact inverses (only transposes,
reshapes, stacks and splits), so PyTorch → Flax → PyTorch reproduces every tensor bit for bit.

Shapes (D = width, H = heads, Dh = head dim, D' = H·Dh, C = input channels, p = patch size)::

  linear          weight [out, in]          ↔ kernel [in, out]
  conv            weight [D, C, p, p] OIHW  ↔ kernel [p, p, C, D] HWIO
  qkv_fused       weight [3D', D]           ↔ qkv [D, 3, H, Dh]
  qkv_split       q, k, v weights [D', D]   ↔ qkv [D, 3, H, Dh]
  qkv_bias_fused  bias [3D']                ↔ qkv_bias [3, H, Dh]
  qkv_bias_split  q, k, v biases [D']       ↔ qkv_bias [3, H, Dh]
  heads_vector    bias [D']                 ↔ [H, Dh]                (BEiT q_bias / v_bias)
  out_proj        weight [D, D']            ↔ proj [H, Dh, D]
  token           [D]                       ↔ [1, 1, D]              (CLIP class embedding)
  positions       [T, D]                    ↔ [1, T, D]              (CLIP position embedding)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from beitv2_jax.models import relpos


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named pair of functions ``to_flax(*torch_arrays)`` and ``to_torch(*flax_arrays)``, both → tuple."""

    name: str
    to_flax: Callable[..., tuple]
    to_torch: Callable[..., tuple]


IDENTITY = Transform("identity", lambda x: (x,), lambda x: (x,))
LINEAR = Transform("linear", lambda w: (w.T,), lambda k: (k.T,))
CONV = Transform("conv", lambda w: (w.transpose(2, 3, 1, 0),), lambda k: (k.transpose(3, 2, 0, 1),))
TOKEN = Transform("token", lambda x: (x.reshape(1, 1, -1),), lambda x: (x.reshape(-1),))
POSITIONS = Transform("positions", lambda x: (x[None],), lambda x: (x[0],))


def heads_vector(num_heads: int) -> Transform:
    return Transform(f"heads_vector(H={num_heads})", lambda b: (b.reshape(num_heads, -1),),
                     lambda b: (b.reshape(-1),))


def qkv_fused(num_heads: int) -> Transform:
    def to_flax(w):
        dim = w.shape[-1]
        return (w.reshape(3, num_heads, -1, dim).transpose(3, 0, 1, 2),)

    def to_torch(k):
        return (k.transpose(1, 2, 3, 0).reshape(-1, k.shape[0]),)

    return Transform(f"qkv_fused(H={num_heads})", to_flax, to_torch)


def qkv_split(num_heads: int) -> Transform:
    fused = qkv_fused(num_heads)

    def to_flax(q, k, v):
        return fused.to_flax(np.concatenate([q, k, v], axis=0))

    def to_torch(kernel):
        (w,) = fused.to_torch(kernel)
        return tuple(np.split(w, 3, axis=0))

    return Transform(f"qkv_split(H={num_heads})", to_flax, to_torch)


def qkv_bias_fused(num_heads: int) -> Transform:
    return Transform(f"qkv_bias_fused(H={num_heads})", lambda b: (b.reshape(3, num_heads, -1),),
                     lambda b: (b.reshape(-1),))


def qkv_bias_split(num_heads: int) -> Transform:
    return Transform(f"qkv_bias_split(H={num_heads})",
                     lambda q, k, v: (np.stack([q, k, v]).reshape(3, num_heads, -1),),
                     lambda b: tuple(x.reshape(-1) for x in b))


def out_proj(num_heads: int) -> Transform:
    def to_flax(w):
        return (w.T.reshape(num_heads, -1, w.shape[0]),)

    def to_torch(k):
        return (k.reshape(-1, k.shape[-1]).T,)

    return Transform(f"out_proj(H={num_heads})", to_flax, to_torch)


# Official VQ-KD quantizer: `initted` is a float buffer of shape (1,); ours an int32 scalar.
FLAG = Transform("flag", lambda x: (np.asarray(x.reshape(()), np.int32),),
                 lambda x: (np.asarray(x, np.float32).reshape(1),))


# ----------------------------------------------------------------------------------------------- derived
# Derived transforms belong to rules whose PyTorch tensors hold no information of their own. On import they
# only validate (and return nothing); on export they re-create the tensors from the listed Flax inputs.
def relative_position_index(window: Sequence[int]) -> Transform:
    """The persistent ``relative_position_index`` buffer of the official code (int64 ``[N+1, N+1]``)."""
    window = tuple(window)

    def expected():
        return relpos.relative_position_index(window).astype(np.int64)

    def to_flax(index):
        if index.shape != expected().shape or not np.array_equal(index, expected()):
            raise ValueError(f"relative_position_index {index.shape} is not the BEiT index for window {window}")
        return ()

    return Transform(f"relative_position_index{window}", to_flax, lambda: (expected(),))


def unused_codebook_stats() -> Transform:
    """Official ``quantize.embedding.{cluster_size, embed_avg}``: unused by the model; zeros / the weight."""

    def to_torch(weight):
        return np.zeros((weight.shape[0],), np.float32), np.array(weight, np.float32, copy=True)

    return Transform("unused_codebook_stats", lambda cluster_size, embed_avg: (), to_torch)
