"""Relative position index/tables, resizing against timm, and ViT building blocks."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from beitv2_jax.models import relpos, vit


def test_index_matches_official_layout_14x14():
    index = relpos.relative_position_index((14, 14))
    assert index.shape == (197, 197)
    assert relpos.num_relative_distance((14, 14)) == 732
    assert index[0, 1:].tolist() == [729] * 196  # CLS -> patch
    assert index[1:, 0].tolist() == [730] * 196  # patch -> CLS
    assert index[0, 0] == 731
    # patch i=(y0,x0) to patch j=(y1,x1): (dy+13)*27 + (dx+13)
    for (y0, x0), (y1, x1) in [((0, 0), (13, 13)), ((5, 7), (2, 1)), ((13, 0), (0, 13)), ((3, 3), (3, 3))]:
        i, j = 1 + y0 * 14 + x0, 1 + y1 * 14 + x1
        assert index[i, j] == (y0 - y1 + 13) * 27 + (x0 - x1 + 13)
    assert index[1:, 1:].max() == 728 and index.min() == 0


def test_index_equals_timm_and_hf():
    timm_rel = pytest.importorskip("timm.layers.pos_embed_rel")
    ours = relpos.relative_position_index((6, 5))
    theirs = timm_rel.gen_relative_position_index((6, 5), class_token=True).numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("old,new", [((14, 14), (24, 24)), ((14, 14), (7, 7)), ((4, 4), (6, 6))])
def test_resize_matches_timm(old, new):
    torch = pytest.importorskip("torch")
    timm_rel = pytest.importorskip("timm.layers.pos_embed_rel")
    rng = np.random.default_rng(0)
    table = rng.normal(size=(relpos.num_relative_distance(old), 3)).astype(np.float32)
    ours = relpos.resize_rel_pos_bias_table(table, new)
    new_shape = (relpos.num_relative_distance(new), 3)
    theirs = timm_rel.resize_rel_pos_bias_table(torch.from_numpy(table), new, new_shape).numpy()
    assert ours.shape == new_shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(ours[-3:], table[-3:])


def test_resize_same_window_is_identity():
    table = np.arange(732 * 2, dtype=np.float32).reshape(732, 2)
    assert relpos.resize_rel_pos_bias_table(table, (14, 14)) is table


def _tiny(**kw):
    cfg = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, qkv_bias="qv", rel_pos="shared",
               layer_scale_init=0.1, use_mask_token=True)
    cfg.update(kw)
    return vit.VisionTransformer(**cfg)


def _randomize(params, seed=0):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) * 0.2 for k, x in zip(keys, leaves)])


def test_attention_impls_and_remat_agree_with_einsum():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    base = _tiny()
    params = _randomize(jax.tree.map(jnp.asarray, base.init(jax.random.PRNGKey(0), x)["params"]))
    ref = base.apply({"params": params}, x)["encoded"]
    for kw in ({"attention_impl": "xla"}, {"remat_policy": "nothing_saveable"}):
        out = _tiny(**kw).apply({"params": params}, x)["encoded"]
        np.testing.assert_allclose(out, ref, atol=1e-5 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("rows", [1, 2, 5, 32, 37])
def test_pairwise_leading_sum_equals_sum(rows):
    x = jax.random.normal(jax.random.PRNGKey(rows), (rows, 3, 5, 5))
    np.testing.assert_allclose(vit.sum_leading_axis_pairwise(x), x.sum(0), rtol=1e-6, atol=1e-6)


def _reduces_over_batch_of_logits(jaxpr, batch, tokens):
    """reduce_sum eqns (any nesting) whose operand is a ``[batch, heads, tokens, tokens]`` array reduced over axis 0."""
    found = []
    for eqn in jaxpr.eqns:
        for sub in jaxprs_in_params(eqn.params):
            found += _reduces_over_batch_of_logits(sub, batch, tokens)
        shape = eqn.invars[0].aval.shape if eqn.invars else ()
        if eqn.primitive.name == "reduce_sum" and 0 in eqn.params["axes"] and len(shape) == 4 \
                and shape[0] == batch and shape[2:] == (tokens, tokens):
            found.append(eqn)
    return found


def test_shared_bias_gradient_matches_autodiff_without_a_batch_reduce():
    # XLA:CPU runs a leading-axis reduce of [B, H, T, T] at 1–2 GB/s (9 ms of a 100 ms demo step on 2 cores), so the
    # einsum path takes the bias gradient as pairwise adds; the gradients must equal the XLA path's autodiff.
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 32, 32, 3))
    model = _tiny()
    params = _randomize(jax.tree.map(jnp.asarray, model.init(jax.random.PRNGKey(0), x)["params"]))

    def loss(p, m):
        return jnp.sum(jnp.sin(m.apply({"params": p}, x)["encoded"]))

    grads = jax.grad(loss)(params, model)
    ref = jax.grad(loss)(params, _tiny(attention_impl="xla"))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, atol=1e-5 * float(jnp.abs(r).max()))
    table = nn.meta.unbox(grads)["rel_pos_bias"]["relative_position_bias_table"]
    assert float(jnp.abs(table).max()) > 0
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(p, model)))(params).jaxpr
    assert not _reduces_over_batch_of_logits(jaxpr, batch=6, tokens=17)


def test_mask_token_replaces_only_masked_patches():
    model = _tiny(depth=0 + 1)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 32, 32, 3))
    params = _randomize(model.init(jax.random.PRNGKey(0), x)["params"])
    mask = jnp.zeros((1, 16), bool).at[0, 3].set(True)
    a = model.apply({"params": params}, x, mask)
    b = model.apply({"params": params}, x.at[:, 0:8, 24:32].set(5.0), mask)  # patch 3 = row 0, col 3
    np.testing.assert_allclose(a["encoded"], b["encoded"], atol=1e-6)  # masked patch content is invisible
    c = model.apply({"params": params}, x.at[:, 8:16, 0:8].set(5.0), mask)  # an unmasked patch
    assert float(jnp.abs(a["encoded"] - c["encoded"]).max()) > 1e-3


def test_drop_path_is_per_sample_and_off_at_eval():
    model = _tiny(drop_path_rate=0.5, depth=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 32, 32, 3))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    eval_out = model.apply({"params": params}, x)["encoded"]
    np.testing.assert_allclose(eval_out, model.apply({"params": params}, x)["encoded"])
    run = lambda seed: model.apply({"params": params}, x, train=True,  # noqa: E731
                                   rngs={"dropout": jax.random.PRNGKey(seed)})["encoded"]
    a, b = run(3), run(4)
    assert float(jnp.abs(a - eval_out).max()) > 1e-3
    # Each sample draws its own keep/drop bits: between two keys some samples agree and some do not.
    changed = np.asarray(jnp.abs(a - b).max(axis=(1, 2)) > 1e-6)
    assert 0 < changed.sum() < 16
    np.testing.assert_allclose(vit.drop_path_rates(0.1, 12)[[0, 11]], [0.0, 0.1])


def test_official_init_statistics():
    model = vit.VisionTransformer(image_size=32, patch_size=8, width=128, depth=4, num_heads=4, qkv_bias="qv",
                                  rel_pos="shared", layer_scale_init=0.1, use_mask_token=True, init_truncation=1.0)
    p = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    p = jax.tree.map(lambda v: np.asarray(v), __import__("flax").linen.meta.unbox(p))
    fc1 = p["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert np.abs(fc1).max() <= 0.02 + 1e-7  # truncated at ±1σ
    # truncated N(0, 0.02²) at ±1σ has std 0.02·0.5396
    assert abs(fc1.std() / 0.02 - 0.5396) < 0.02
    # fix_init_weight: block 4's fc2 is scaled by 1/sqrt(8) relative to an unscaled draw
    assert np.abs(p["blocks_3"]["mlp"]["fc2"]["kernel"]).max() <= 0.02 / np.sqrt(8) + 1e-7
    np.testing.assert_allclose(p["blocks_1"]["gamma_1"], 0.1)
    np.testing.assert_array_equal(p["rel_pos_bias"]["relative_position_bias_table"], 0.0)
    np.testing.assert_array_equal(p["blocks_0"]["attn"]["q_bias"], 0.0)
