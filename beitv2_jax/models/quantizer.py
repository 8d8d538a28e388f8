"""VQ-KD cosine codebook: l2-normalised lookup, EMA update with re-normalisation, k-means init.

Re-implements `beit2/norm_ema_quantizer.py` (`NormEMAVectorQuantizer`) of the official BEiT v2 code as
small pure functions plus a thin linen wrapper. Notation: K = number of codes, d = code dimension,
n = number of vectors looked up in one call (batch · patches).

All math runs in float32 whatever the input dtype, and the matmuls ask for full fp32 precision
(`Precision.HIGHEST`), so TPU/GPU do not silently drop to bf16/tf32 passes.

Distributed use: call everything inside `jax.jit` on global (sharded) arrays. The per-code counts and
sums below (`segment_sum`, `bincount`) are then global sums across all devices and hosts, i.e. the
official `all_reduce(SUM)` is implicit; no `psum` is written anywhere. The k-means initialisation
likewise sees the global batch, so every device holds the same codebook (the official code initialises
each rank from its own local batch; see reference notes, 1.2 "Distributed quirk").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """`x / max(||x||_2, eps)` along `axis` in float32 (torch `F.normalize(x, p=2, dim=axis)` semantics).

    Args:
      x: [..., d] any float dtype.
    Returns:
      [..., d] float32; an all-zero row stays all-zero.
    """
    x = jnp.asarray(x, jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def code_distances(z: Array, codebook: Array) -> Array:
    """Squared euclidean distances `||z||² + ||e||² − 2 z·e`, in the official evaluation order.

    Args:
      z: [..., d] vectors (unit-norm in VQ-KD).
      codebook: [K, d] codes (unit-norm rows once initialised).
    Returns:
      [..., K] float32 distances.
    """
    z = jnp.asarray(z, jnp.float32)
    codebook = jnp.asarray(codebook, jnp.float32)
    z_sq = jnp.sum(z * z, axis=-1, keepdims=True)  # [..., 1]
    e_sq = jnp.sum(codebook * codebook, axis=-1)  # [K]
    dots = jnp.einsum("...d,kd->...k", z, codebook, precision=_HIGHEST)
    return (z_sq + e_sq) - 2.0 * dots


def first_argmin(x: Array, axis: int = -1) -> Array:
    """``jnp.argmin(x, axis)`` (the first index of the minimum) as two plain reductions, a min and then a min over
    the indices that reach it, instead of one variadic (value, index) reduction, which XLA:CPU runs scalar by scalar
    (3.7 % of the demo's CPU pretraining step for the codebook argmin and the two accuracy argmaxes). Same index for
    every input without NaN; a row with NaN gives some index in range.

    Args:
      x: [..., n] values.
    Returns:
      [...] int32 indices.
    """
    axis = axis % x.ndim
    n = x.shape[axis]
    smallest = jnp.min(x, axis=axis, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    return jnp.minimum(jnp.min(jnp.where(x == smallest, index, n), axis=axis), n - 1).astype(jnp.int32)


def first_argmax(x: Array, axis: int = -1) -> Array:
    """``jnp.argmax(x, axis)`` as ``first_argmin`` of ``−x``."""
    return first_argmin(-x, axis)


def nearest_codes(z: Array, codebook: Array) -> Array:
    """Index of the nearest code for every vector; for unit-norm inputs this is the max-cosine code.

    Ties resolve to the lowest index (as `torch.argmin`).

    Args:
      z: [n, d] (or [..., d]) vectors.
      codebook: [K, d] codes.
    Returns:
      [n] (or [...]) int32 indices.
    """
    return first_argmin(code_distances(z, codebook), axis=-1)


def code_counts(indices: Array, num_codes: int) -> Array:
    """How many vectors chose each code ("bins").

    Args:
      indices: [...] int code indices.
      num_codes: K.
    Returns:
      [K] float32 counts (exact up to 2**24 per code).
    """
    return jnp.bincount(indices.reshape(-1), length=num_codes).astype(jnp.float32)


def quantize(z: Array, codebook: Array, beta: float = 1.0) -> tuple[Array, Array, Array]:
    """Cosine vector quantisation with straight-through gradients and the commitment loss.

    `z` is l2-normalised first; `z_q = codebook[idx]`; loss = `beta · mean((sg(z_q) − z)²)` over all
    elements; output `z + sg(z_q − z)` (forward value z_q, gradient of the identity w.r.t. the normalised
    z). The codebook never receives a gradient.

    Args:
      z: [..., d] un-normalised features, any float dtype.
      codebook: [K, d] unit-norm codes.
      beta: commitment weight (1.0 in BEiT v2).
    Returns:
      z_q_st: [..., d] float32 straight-through quantised vectors.
      indices: [...] int32 code indices.
      commitment_loss: scalar float32.
    """
    return quantize_normalized(l2_normalize(z), codebook, beta)


def quantize_normalized(z: Array, codebook: Array, beta: float = 1.0) -> tuple[Array, Array, Array]:
    """`quantize` for inputs that are already l2-normalised (no second normalisation).

    Args:
      z: [..., d] unit-norm vectors.
      codebook: [K, d] unit-norm codes.
      beta: commitment weight.
    Returns:
      (z_q_st [..., d] float32, indices [...] int32, commitment_loss scalar float32), as `quantize`.
    """
    codebook = jax.lax.stop_gradient(jnp.asarray(codebook, jnp.float32))
    z = jnp.asarray(z, jnp.float32)
    indices = nearest_codes(z, codebook)
    z_q = jnp.take(codebook, indices, axis=0)  # [..., d]
    commitment_loss = beta * jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
    z_q_st = z + jax.lax.stop_gradient(z_q - z)
    return z_q_st, indices, commitment_loss


def ema_update(codebook: Array, z_flat: Array, indices: Array, decay: float = 0.99) -> tuple[Array, Array]:
    """One VQ-KD codebook EMA step (official `norm_ema_inplace` path).

    bins = counts per code; new = l2norm(embed_sum / max(bins, 1)); codes with bins == 0 use their
    current row as "new"; then every row is `l2norm(decay · weight + (1 − decay) · new)`.

    Args:
      codebook: [K, d] current (unit-norm) codes.
      z_flat: [n, d] the l2-normalised vectors that were looked up (global batch under jit).
      indices: [n] their code indices.
      decay: EMA decay (0.99).
    Returns:
      new_codebook: [K, d] float32, unit-norm rows.
      bins: [K] float32 counts.
    """
    codebook = jnp.asarray(codebook, jnp.float32)
    z_flat = jnp.asarray(z_flat, jnp.float32)
    num_codes = codebook.shape[0]
    bins = code_counts(indices, num_codes)
    embed_sum = jax.ops.segment_sum(z_flat, indices.reshape(-1), num_segments=num_codes)  # [K, d]
    unused = bins == 0
    new = l2_normalize(embed_sum / jnp.maximum(bins, 1.0)[:, None])
    new = jnp.where(unused[:, None], codebook, new)
    new_codebook = l2_normalize(decay * codebook + (1.0 - decay) * new)
    return new_codebook, bins


def kmeans_init_indices(key: Array, num_samples: int, num_codes: int) -> Array:
    """Which samples seed the k-means means (official `sample_vectors`).

    Distinct samples (a random permutation prefix) when `num_samples >= num_codes`, otherwise uniform
    draws with replacement.

    Args:
      key: PRNG key.
      num_samples: n (static).
      num_codes: K (static).
    Returns:
      [K] int32 sample indices.
    """
    if num_samples >= num_codes:
        return jax.random.permutation(key, num_samples)[:num_codes].astype(jnp.int32)
    return jax.random.randint(key, (num_codes,), 0, num_samples, dtype=jnp.int32)


def kmeans_init(
    z_flat: Array,
    num_codes: int,
    key: Array | None = None,
    num_iters: int = 10,
    init_indices: Array | None = None,
) -> tuple[Array, Array]:
    """Cosine (spherical) k-means used to initialise the codebook (official `kmeans(..., use_cosine_sim=True)`).

    Each iteration assigns every sample to the mean with the largest dot product (ties → lowest index),
    then sets each mean to l2norm(sum / count); empty clusters keep their previous mean. Fixed shapes,
    jittable (`lax.fori_loop`).

    Args:
      z_flat: [n, d] l2-normalised samples.
      num_codes: K (static).
      key: PRNG key for the initial means; ignored when `init_indices` is given.
      num_iters: number of assignment/update iterations (static).
      init_indices: optional [K] int sample indices of the initial means (default:
        `kmeans_init_indices(key, n, K)`).
    Returns:
      means: [K, d] float32 codebook (unit-norm rows, provided the samples are unit-norm).
      bins: [K] float32 cluster sizes of the last iteration's assignment (zeros if num_iters == 0).
    """
    z_flat = jnp.asarray(z_flat, jnp.float32)
    if init_indices is None:
        if key is None:
            raise ValueError("kmeans_init needs `key` or `init_indices`.")
        init_indices = kmeans_init_indices(key, z_flat.shape[0], num_codes)
    means = jnp.take(z_flat, init_indices, axis=0)  # [K, d]

    def step(_, carry):
        means, _ = carry
        sims = jnp.einsum("nd,kd->nk", z_flat, means, precision=_HIGHEST)
        buckets = jnp.argmax(sims, axis=-1)
        bins = code_counts(buckets, num_codes)
        sums = jax.ops.segment_sum(z_flat, buckets, num_segments=num_codes)
        new_means = l2_normalize(sums / jnp.maximum(bins, 1.0)[:, None])
        means = jnp.where((bins == 0)[:, None], means, new_means)
        return means, bins

    bins0 = jnp.zeros((num_codes,), jnp.float32)
    return jax.lax.fori_loop(0, num_iters, step, (means, bins0))


def update_cluster_size(cluster_size: Array, bins: Array, decay: float = 0.99) -> Array:
    """Usage-statistics EMA buffer: `decay · cluster_size + (1 − decay) · bins`. Shapes [K] → [K]."""
    return decay * jnp.asarray(cluster_size, jnp.float32) + (1.0 - decay) * jnp.asarray(bins, jnp.float32)


def num_unused_codes(counts: Array) -> Array:
    """Number of codes whose count (bins, or the `cluster_size` EMA) is exactly zero. [K] → int32 scalar.

    This is the official "Unused code in codebook" statistic when applied to `cluster_size`.
    """
    return jnp.sum(counts == 0).astype(jnp.int32)


def codebook_usage(cluster_size: Array) -> Array:
    """Fraction of codes in use (count > 0). [K] → float32 scalar in [0, 1]."""
    return jnp.mean((cluster_size > 0).astype(jnp.float32))


def perplexity(bins: Array) -> Array:
    """exp(entropy) of the code distribution `bins / sum(bins)`: 1 (one code) … K (uniform).

    Args:
      bins: [K] non-negative counts.
    Returns:
      float32 scalar; 1.0 for an all-zero `bins`.
    """
    bins = jnp.asarray(bins, jnp.float32)
    probs = bins / jnp.maximum(jnp.sum(bins), 1e-12)
    entropy = -jnp.sum(jax.scipy.special.xlogy(probs, probs))
    return jnp.exp(entropy)


# --------------------------------------------------------------------------------------------------
# Linen wrapper
# --------------------------------------------------------------------------------------------------


class NormEMAQuantizer(nn.Module):
    """VQ-KD quantizer with its state in the non-trainable `'codebook'` collection.

    Variables (collection `'codebook'`, never in `'params'`, so the optimizer never sees them):
      weight:       [K, d] float32 codebook. Zeros when `kmeans_init` (filled by k-means on the first
                    train call), else l2norm(normal) drawn from the `'params'` rng at `init`.
      cluster_size: [K] float32 usage EMA, `decay · cs + (1 − decay) · bins`, updated on every call
                    (train and eval) while the collection is mutable.
      initted:      int32 scalar, 0 until the k-means init has been stored (1 from the start when
                    `kmeans_init=False`).

    Train call (`train=True`): l2-normalise z; if not initted, k-means on this (global) batch under a
    `lax.cond`; look up; if `'codebook'` is mutable store the EMA-updated weight, `initted = 1` and the
    new `cluster_size`. The returned codes and loss use the codebook *before* the EMA step (as official).
    Eval call: look up with the stored weight; only `cluster_size` changes (when mutable). Unlike the
    official module, an eval call never runs the k-means init.

    K-means rng: `self.make_rng('kmeans')` when a `'kmeans'` rng is passed to `apply`, otherwise the fixed
    key `PRNGKey(kmeans_seed)`. The key only picks *which positions* of the batch seed the means, and the
    batch itself is already a random draw of the data, so a fixed key loses nothing and is exactly
    reproducible. (A key hashed from the data bits was rejected: jit/fusion/mesh changes move the last
    bits of z and hence the whole key.) Nothing is updated during `Module.init`
    (like `nn.BatchNorm`): the freshly initialised state is always zeros / initted=0.

    Returns `(z_q_st [..., d] float32, indices [...] int32, loss scalar, aux)` with
    aux = {'bins': [K] float32 counts of this call, 'perplexity': scalar}.
    """

    num_codes: int = 8192
    code_dim: int = 32
    decay: float = 0.99
    beta: float = 1.0
    kmeans_init: bool = True
    kmeans_iters: int = 10
    kmeans_seed: int = 0

    def _init_weight(self) -> Array:
        shape = (self.num_codes, self.code_dim)
        if self.kmeans_init:
            return jnp.zeros(shape, jnp.float32)
        return l2_normalize(jax.random.normal(self.make_rng("params"), shape, jnp.float32))

    @nn.compact
    def __call__(self, z: Array, train: bool) -> tuple[Array, Array, Array, dict[str, Any]]:
        """Quantise `z` [..., code_dim]; see the class docstring for state updates and outputs."""
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"expected last dim {self.code_dim}, got shape {z.shape}")
        weight_var = self.variable("codebook", "weight", self._init_weight)
        cluster_size_var = self.variable(
            "codebook", "cluster_size", lambda: jnp.zeros((self.num_codes,), jnp.float32)
        )
        initted_var = self.variable(
            "codebook", "initted", lambda: jnp.asarray(0 if self.kmeans_init else 1, jnp.int32)
        )
        update_state = self.is_mutable_collection("codebook") and not self.is_initializing()

        z = l2_normalize(z)
        z_flat = z.reshape(-1, self.code_dim)
        weight = jnp.asarray(weight_var.value, jnp.float32)

        if train and self.kmeans_init:
            if self.has_rng("kmeans"):
                key = self.make_rng("kmeans")
            else:
                key = jax.random.PRNGKey(self.kmeans_seed)

            def run_kmeans(weight):
                means, _ = kmeans_init(z_flat, self.num_codes, key, num_iters=self.kmeans_iters)
                return means

            weight = jax.lax.cond(initted_var.value == 0, run_kmeans, lambda w: w, weight)

        z_q_st, indices, loss = quantize_normalized(z, weight, self.beta)
        bins = code_counts(indices, self.num_codes)

        if update_state:
            if train:
                new_weight, _ = ema_update(weight, z_flat, indices.reshape(-1), self.decay)
                weight_var.value = new_weight
                initted_var.value = jnp.ones_like(initted_var.value)
            cluster_size_var.value = update_cluster_size(cluster_size_var.value, bins, self.decay)

        aux = {"bins": bins, "perplexity": perplexity(bins)}
        return z_q_st, indices, loss, aux
