"""Tests for the VQ-KD cosine codebook (beitv2_jax.models.quantizer) against numpy and a torch re-creation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from beitv2_jax.models import quantizer as q

K, D, N = 16, 4, 40


def _np_l2norm(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _unit(rng, *shape):
    return _np_l2norm(rng.standard_normal(shape).astype(np.float32))


def _np_nearest(z, codebook):
    d = (z**2).sum(1, keepdims=True) + (codebook**2).sum(1)[None] - 2 * z @ codebook.T
    return d.argmin(1)


def _np_ema(codebook, z, idx, decay):
    bins = np.bincount(idx, minlength=codebook.shape[0]).astype(np.float32)
    embed_sum = np.zeros_like(codebook)
    np.add.at(embed_sum, idx, z)
    new = _np_l2norm(embed_sum / np.maximum(bins, 1)[:, None])
    new = np.where((bins == 0)[:, None], codebook, new)
    return _np_l2norm(decay * codebook + (1 - decay) * new), bins


def _np_kmeans(samples, init_idx, num_iters):
    means = samples[init_idx].copy()
    bins = np.zeros(len(init_idx), np.float32)
    for _ in range(num_iters):
        buckets = (samples @ means.T).argmax(1)
        bins = np.bincount(buckets, minlength=len(init_idx)).astype(np.float32)
        sums = np.zeros_like(means)
        np.add.at(sums, buckets, samples)
        new = _np_l2norm(sums / np.maximum(bins, 1)[:, None])
        means = np.where((bins == 0)[:, None], means, new)
    return means, bins


# ------------------------------------------------------------------------------------------ pure fns


def test_l2_normalize_matches_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    x[2] = 0.0
    ours = np.asarray(q.l2_normalize(jnp.asarray(x)))
    np.testing.assert_allclose(ours, F.normalize(torch.tensor(x), p=2, dim=-1).numpy(), atol=1e-7)
    assert np.all(ours[2] == 0)
    assert q.l2_normalize(jnp.ones((3, 2), jnp.bfloat16)).dtype == jnp.float32


def test_nearest_codes_matches_numpy_and_ties_pick_lowest():
    rng = np.random.default_rng(1)
    z, codebook = _unit(rng, N, D), _unit(rng, K, D)
    idx = q.nearest_codes(jnp.asarray(z), jnp.asarray(codebook))
    assert idx.dtype == jnp.int32 and idx.shape == (N,)
    np.testing.assert_array_equal(np.asarray(idx), _np_nearest(z, codebook))
    np.testing.assert_array_equal(np.asarray(idx), (z @ codebook.T).argmax(1))  # = max cosine
    # Ties: duplicate every code; the first copy must win.
    doubled = np.concatenate([codebook, codebook])
    np.testing.assert_array_equal(np.asarray(q.nearest_codes(jnp.asarray(z), jnp.asarray(doubled))), np.asarray(idx))
    # Batched leading dims.
    idx3 = q.nearest_codes(jnp.asarray(z).reshape(2, 20, D), jnp.asarray(codebook))
    np.testing.assert_array_equal(np.asarray(idx3).reshape(-1), np.asarray(idx))


def test_quantize_values_and_commitment_loss():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 20, D)).astype(np.float32) * 3.0
    codebook = _unit(rng, K, D)
    z_q_st, idx, loss = q.quantize(jnp.asarray(x), jnp.asarray(codebook))
    z = _np_l2norm(x)
    ref_idx = _np_nearest(z.reshape(-1, D), codebook).reshape(2, 20)
    np.testing.assert_array_equal(np.asarray(idx), ref_idx)
    np.testing.assert_allclose(np.asarray(z_q_st), codebook[ref_idx], atol=1e-6)
    np.testing.assert_allclose(float(loss), np.mean((codebook[ref_idx] - z) ** 2), rtol=1e-6)
    _, _, loss2 = q.quantize(jnp.asarray(x), jnp.asarray(codebook), beta=0.25)
    np.testing.assert_allclose(float(loss2), 0.25 * float(loss), rtol=1e-6)
    out_bf16 = q.quantize(jnp.asarray(x, jnp.bfloat16), jnp.asarray(codebook))
    assert out_bf16[0].dtype == jnp.float32 and out_bf16[2].dtype == jnp.float32


def test_straight_through_gradients():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((N, D)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((N, D)).astype(np.float32))
    codebook = jnp.asarray(_unit(rng, K, D))

    g_st, g_cb = jax.grad(lambda x, cb: jnp.sum(w * q.quantize(x, cb)[0]), argnums=(0, 1))(x, codebook)
    g_ref = jax.grad(lambda x: jnp.sum(w * q.l2_normalize(x)))(x)
    np.testing.assert_allclose(np.asarray(g_st), np.asarray(g_ref), atol=1e-6)
    assert np.all(np.asarray(g_cb) == 0)

    # Commitment loss: gradient flows to z only (through the normalisation), never to the codebook.
    g_x, g_cb = jax.grad(lambda x, cb: q.quantize(x, cb)[2], argnums=(0, 1))(x, codebook)
    assert np.all(np.asarray(g_cb) == 0)
    z_q = codebook[q.nearest_codes(q.l2_normalize(x), codebook)]
    g_ref = jax.grad(lambda x: jnp.mean((z_q - q.l2_normalize(x)) ** 2))(x)
    np.testing.assert_allclose(np.asarray(g_x), np.asarray(g_ref), atol=1e-7)


def test_ema_update_matches_numpy_and_keeps_unused_codes():
    rng = np.random.default_rng(4)
    codebook, z = _unit(rng, K, D), _unit(rng, N, D)
    idx = rng.integers(0, K - 4, N)  # codes K-4..K-1 are never chosen
    new, bins = q.ema_update(jnp.asarray(codebook), jnp.asarray(z), jnp.asarray(idx, jnp.int32), decay=0.99)
    ref, ref_bins = _np_ema(codebook, z, idx, 0.99)
    np.testing.assert_array_equal(np.asarray(bins), ref_bins)
    np.testing.assert_allclose(np.asarray(new), ref, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(new), axis=1), 1.0, atol=1e-6)
    unused = ref_bins == 0
    assert unused.sum() >= 4
    np.testing.assert_allclose(np.asarray(new)[unused], codebook[unused], atol=1e-6)
    assert np.abs(np.asarray(new)[~unused] - codebook[~unused]).max() > 1e-4
    # Under jit (static shapes) the result is the same.
    new_jit, _ = jax.jit(q.ema_update)(jnp.asarray(codebook), jnp.asarray(z), jnp.asarray(idx, jnp.int32))
    np.testing.assert_allclose(np.asarray(new_jit), ref, atol=1e-6)


def test_ema_step_matches_torch_recreation():
    """A minimal torch version of the official lookup + `norm_ema_inplace` step (reference 1.2)."""
    rng = np.random.default_rng(5)
    num_codes, dim, decay = 64, 8, 0.99
    x = rng.standard_normal((3, 25, dim)).astype(np.float32)
    codebook = _unit(rng, num_codes, dim)

    # torch: l2norm → distances → argmin → one-hot → bins / embed_sum → normalised mean → norm EMA.
    weight = torch.from_numpy(codebook.copy())
    z = F.normalize(torch.from_numpy(x), p=2, dim=-1)
    zf = z.reshape(-1, dim)
    d = zf.pow(2).sum(dim=1, keepdim=True) + weight.pow(2).sum(dim=1) - 2 * torch.einsum("bd,nd->bn", zf, weight)
    t_idx = torch.argmin(d, dim=1)
    t_zq = F.embedding(t_idx, weight).view(z.shape)
    t_loss = F.mse_loss(t_zq.detach(), z)
    enc = F.one_hot(t_idx, num_codes).type(zf.dtype)
    bins = enc.sum(0)
    t_cluster_size = torch.zeros(num_codes).mul_(decay).add_(bins, alpha=1 - decay)
    zero_mask = bins == 0
    bins = bins.masked_fill(zero_mask, 1.0)
    embed_sum = zf.t() @ enc
    embed_norm = F.normalize((embed_sum / bins.unsqueeze(0)).t(), p=2, dim=-1)
    embed_norm = torch.where(zero_mask[..., None], weight, embed_norm)
    weight.mul_(decay).add_(embed_norm, alpha=1 - decay)
    weight.copy_(F.normalize(weight, p=2, dim=-1))

    z_q_st, idx, loss = q.quantize(jnp.asarray(x), jnp.asarray(codebook))
    np.testing.assert_array_equal(np.asarray(idx).reshape(-1), t_idx.numpy())
    np.testing.assert_allclose(np.asarray(z_q_st), t_zq.numpy(), atol=1e-6)
    np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-5, atol=1e-8)
    z_flat = q.l2_normalize(jnp.asarray(x)).reshape(-1, dim)
    new, ours_bins = q.ema_update(jnp.asarray(codebook), z_flat, idx.reshape(-1), decay)
    np.testing.assert_allclose(np.asarray(new), weight.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(q.update_cluster_size(jnp.zeros(num_codes), ours_bins, decay)),
                               t_cluster_size.numpy(), atol=1e-7)


def test_kmeans_matches_numpy_given_init_indices():
    rng = np.random.default_rng(6)
    z = _unit(rng, N, D)
    init_idx = q.kmeans_init_indices(jax.random.PRNGKey(0), N, K)
    assert init_idx.shape == (K,) and len(np.unique(np.asarray(init_idx))) == K  # distinct when n >= K
    means, bins = q.kmeans_init(jnp.asarray(z), K, num_iters=10, init_indices=init_idx)
    ref_means, ref_bins = _np_kmeans(z, np.asarray(init_idx), 10)
    np.testing.assert_array_equal(np.asarray(bins), ref_bins)
    np.testing.assert_allclose(np.asarray(means), ref_means, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(means), axis=1), 1.0, atol=1e-6)
    assert float(bins.sum()) == N
    # The key path uses exactly these initial indices, and jit gives the same result.
    means_key, _ = jax.jit(q.kmeans_init, static_argnums=(1, 3))(jnp.asarray(z), K, jax.random.PRNGKey(0), 10)
    np.testing.assert_allclose(np.asarray(means_key), ref_means, atol=1e-6)


def test_kmeans_fewer_samples_than_codes_and_empty_clusters():
    rng = np.random.default_rng(7)
    z = _unit(rng, 6, D)
    init_idx = q.kmeans_init_indices(jax.random.PRNGKey(1), 6, K)  # with replacement → duplicate means
    assert init_idx.shape == (K,) and int(init_idx.max()) < 6
    means, bins = q.kmeans_init(jnp.asarray(z), K, num_iters=3, init_indices=init_idx)
    ref_means, ref_bins = _np_kmeans(z, np.asarray(init_idx), 3)
    assert (ref_bins == 0).any()  # duplicates lose the tie → empty clusters keep their previous mean
    np.testing.assert_array_equal(np.asarray(bins), ref_bins)
    np.testing.assert_allclose(np.asarray(means), ref_means, atol=1e-6)
    means0, bins0 = q.kmeans_init(jnp.asarray(z), K, num_iters=0, init_indices=init_idx)
    np.testing.assert_array_equal(np.asarray(means0), z[np.asarray(init_idx)])
    assert np.all(np.asarray(bins0) == 0)


def test_usage_statistics():
    bins = jnp.array([4.0, 0.0, 4.0, 0.0])
    np.testing.assert_allclose(float(q.perplexity(bins)), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(q.perplexity(jnp.ones(K))), K, rtol=1e-5)
    np.testing.assert_allclose(float(q.perplexity(jnp.array([0.0, 7.0, 0.0]))), 1.0)
    np.testing.assert_allclose(float(q.perplexity(jnp.zeros(3))), 1.0)
    assert int(q.num_unused_codes(bins)) == 2
    np.testing.assert_allclose(float(q.codebook_usage(bins)), 0.5)
    cs = q.update_cluster_size(jnp.array([1.0, 0.0, 0.0, 2.0]), bins, 0.99)
    np.testing.assert_allclose(np.asarray(cs), [0.99 + 0.04, 0.0, 0.04, 1.98], rtol=1e-6)
    assert int(q.num_unused_codes(cs)) == 1


# ------------------------------------------------------------------------------------------ module


def _module_inputs(seed, shape=(2, 20, D)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_module_init_state_layout():
    m = q.NormEMAQuantizer(num_codes=K, code_dim=D)
    variables = m.init(jax.random.PRNGKey(0), _module_inputs(0), train=True)
    assert set(variables) == {"codebook"}  # nothing in 'params'
    cb = variables["codebook"]
    assert cb["weight"].shape == (K, D) and cb["weight"].dtype == jnp.float32
    assert np.all(np.asarray(cb["weight"]) == 0)
    assert cb["cluster_size"].shape == (K,) and np.all(np.asarray(cb["cluster_size"]) == 0)
    assert cb["initted"].shape == () and int(cb["initted"]) == 0

    m_rand = q.NormEMAQuantizer(num_codes=K, code_dim=D, kmeans_init=False)
    cb = m_rand.init(jax.random.PRNGKey(0), _module_inputs(0), train=True)["codebook"]
    assert int(cb["initted"]) == 1
    np.testing.assert_allclose(np.linalg.norm(np.asarray(cb["weight"]), axis=1), 1.0, atol=1e-6)


def test_module_kmeans_init_then_ema_then_eval():
    m = q.NormEMAQuantizer(num_codes=K, code_dim=D, decay=0.99)
    x1, x2, x3 = _module_inputs(1), _module_inputs(2), _module_inputs(3)
    variables = m.init(jax.random.PRNGKey(0), x1, train=True)
    apply = jax.jit(lambda v, x, train: m.apply(v, x, train=train, mutable=["codebook"]), static_argnums=2)

    # First train call: k-means on this batch (no 'kmeans' rng → PRNGKey(kmeans_seed=0)), lookup, EMA step.
    (z_q, idx, loss, aux), v1 = apply(variables, x1, True)
    z1 = q.l2_normalize(x1).reshape(-1, D)
    means, _ = q.kmeans_init(z1, K, jax.random.PRNGKey(0), num_iters=10)
    exp_idx = q.nearest_codes(z1, means)
    np.testing.assert_array_equal(np.asarray(idx).reshape(-1), np.asarray(exp_idx))
    np.testing.assert_allclose(np.asarray(z_q).reshape(-1, D), np.asarray(means[exp_idx]), atol=1e-6)
    exp_w, exp_bins = q.ema_update(means, z1, exp_idx, 0.99)
    cb1 = v1["codebook"]
    assert int(cb1["initted"]) == 1
    np.testing.assert_allclose(np.asarray(cb1["weight"]), np.asarray(exp_w), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(cb1["weight"]), axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cb1["cluster_size"]), 0.01 * np.asarray(exp_bins), atol=1e-7)
    np.testing.assert_array_equal(np.asarray(aux["bins"]), np.asarray(exp_bins))
    np.testing.assert_allclose(float(aux["perplexity"]), float(q.perplexity(exp_bins)), rtol=1e-6)
    assert idx.dtype == jnp.int32 and idx.shape == (2, 20) and loss.shape == ()

    # Second train call: no k-means, plain EMA from the stored weight.
    (_, idx2, loss2, _), v2 = apply(v1, x2, True)
    z2 = q.l2_normalize(x2).reshape(-1, D)
    exp_idx2 = q.nearest_codes(z2, cb1["weight"])
    np.testing.assert_array_equal(np.asarray(idx2).reshape(-1), np.asarray(exp_idx2))
    exp_w2, exp_bins2 = q.ema_update(cb1["weight"], z2, exp_idx2, 0.99)
    np.testing.assert_allclose(np.asarray(v2["codebook"]["weight"]), np.asarray(exp_w2), atol=1e-6)
    np.testing.assert_allclose(np.asarray(v2["codebook"]["cluster_size"]),
                               0.99 * np.asarray(cb1["cluster_size"]) + 0.01 * np.asarray(exp_bins2), atol=1e-7)
    _, _, exp_loss2 = q.quantize(x2, cb1["weight"])
    np.testing.assert_allclose(float(loss2), float(exp_loss2), rtol=1e-6)

    # Eval call (mutable): weight and initted unchanged, cluster_size still tracked.
    (_, idx3, _, aux3), v3 = apply(v2, x3, False)
    np.testing.assert_array_equal(np.asarray(v3["codebook"]["weight"]), np.asarray(v2["codebook"]["weight"]))
    assert int(v3["codebook"]["initted"]) == 1
    np.testing.assert_allclose(np.asarray(v3["codebook"]["cluster_size"]),
                               0.99 * np.asarray(v2["codebook"]["cluster_size"]) + 0.01 * np.asarray(aux3["bins"]),
                               atol=1e-7)
    # Eval call without mutability: same outputs, no state returned.
    z_q4, idx4, _, _ = m.apply(v2, x3, train=False)
    np.testing.assert_array_equal(np.asarray(idx4), np.asarray(idx3))


def test_module_kmeans_rng_and_immutable_train():
    m = q.NormEMAQuantizer(num_codes=K, code_dim=D)
    x = _module_inputs(4)
    variables = m.init(jax.random.PRNGKey(0), x, train=True)

    def weight_after(key):
        _, v = m.apply(variables, x, train=True, rngs={"kmeans": key}, mutable=["codebook"])
        return np.asarray(v["codebook"]["weight"])

    np.testing.assert_array_equal(weight_after(jax.random.PRNGKey(1)), weight_after(jax.random.PRNGKey(1)))
    assert not np.allclose(weight_after(jax.random.PRNGKey(1)), weight_after(jax.random.PRNGKey(2)))
    # Train call with an immutable codebook collection: k-means is used for the lookup, nothing stored.
    z_q, idx, _, _ = m.apply(variables, x, train=True)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z_q), axis=-1), 1.0, atol=1e-6)


def test_module_without_kmeans_and_in_a_parent():
    class Parent(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            h = nn.Dense(D)(x)
            return q.NormEMAQuantizer(num_codes=K, code_dim=D, kmeans_init=False, name="quantize")(h, train)

    p = Parent()
    x = _module_inputs(5, (2, 20, 6)).astype(jnp.bfloat16)
    variables = p.init(jax.random.PRNGKey(0), x, train=True)
    assert "quantize" not in variables["params"]
    w0 = variables["codebook"]["quantize"]["weight"]
    (z_q, _, loss, _), v1 = p.apply(variables, x, train=True, mutable=["codebook"])
    assert z_q.dtype == jnp.float32 and np.isfinite(float(loss))
    assert not np.allclose(np.asarray(v1["codebook"]["quantize"]["weight"]), np.asarray(w0))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(v1["codebook"]["quantize"]["weight"]), axis=1), 1.0,
                               atol=1e-6)

    # Gradients reach the Dense params through the straight-through estimator and the commitment loss.
    def loss_fn(params):
        (z_q, _, loss, _), _ = p.apply({"params": params, "codebook": variables["codebook"]}, x, train=True,
                                       mutable=["codebook"])
        return jnp.sum(z_q) + loss

    grads = jax.grad(loss_fn)(variables["params"])
    assert np.abs(np.asarray(grads["Dense_0"]["kernel"], np.float32)).sum() > 0


def test_module_rejects_wrong_dim():
    m = q.NormEMAQuantizer(num_codes=K, code_dim=D)
    with pytest.raises(ValueError):
        m.init(jax.random.PRNGKey(0), jnp.zeros((2, D + 1)), train=True)


def test_first_argmin_and_argmax_are_argmin_and_argmax_with_ties():
    """The two-reduction argmin/argmax (XLA:CPU runs a variadic reduce scalar by scalar) pick the same, first index,
    ties included, along any axis."""
    x = np.round(np.random.default_rng(0).standard_normal((64, 50, 30)), 1).astype(np.float32)  # many exact ties
    for axis in (-1, 0, 1):
        np.testing.assert_array_equal(q.first_argmin(jnp.asarray(x), axis), np.argmin(x, axis))
        np.testing.assert_array_equal(q.first_argmax(jnp.asarray(x), axis), np.argmax(x, axis))
    assert q.first_argmin(jnp.asarray(x)).dtype == jnp.int32
