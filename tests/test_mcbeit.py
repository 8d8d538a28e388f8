"""mc-BEiT soft targets and loss against numpy, the gradient switch, VQ-KD logits, and a tiny multi-choice run."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from beitv2_jax import recipes
from beitv2_jax.train import targets
from beitv2_jax.train.tasks import pretrain

from conftest import load_config_file, make_random_tokenizer


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def np_targets(logits, features, omega, t_tok=4.0, t_sim=1.0):
    """engine_for_pretraining.py, in float64: p = softmax(z / T); W = softmax(f̂ f̂ᵀ / T_sim); ω W p + (1 − ω) p."""
    p = np_softmax(logits / t_tok)
    f = features / np.linalg.norm(features, axis=-1, keepdims=True)
    w = np_softmax(np.einsum("bnd,bmd->bnm", f, f) / t_sim)
    return omega * np.einsum("bnm,bmv->bnv", w, p) + (1 - omega) * p, p, w


@pytest.fixture
def example():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2, 5, 7)) * 3, rng.normal(size=(2, 5, 3))


def test_targets_sum_to_one_and_their_limits(example):
    logits, features = example
    t = np.asarray(targets.multi_choice_targets(jnp.asarray(logits, jnp.float32), jnp.asarray(features, jnp.float32)))
    np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-6)
    assert (t >= 0).all()
    ref, p, w = np_targets(logits, features, 0.2)
    np.testing.assert_allclose(t, ref, atol=1e-6)
    at = lambda omega: np.asarray(targets.multi_choice_targets(jnp.asarray(logits, jnp.float32),
                                                               jnp.asarray(features, jnp.float32), omega=omega))
    np.testing.assert_allclose(at(0.0), p, atol=1e-6)  # ω = 0: the tokenizer's own soft codes
    np.testing.assert_allclose(at(1.0), np.einsum("bnm,bmv->bnv", w, p), atol=1e-6)  # ω = 1: W @ p


def test_loss_matches_numpy(example):
    logits, features = example
    rng = np.random.default_rng(1)
    positions = np.array([[0, 3], [1, 4]])
    predictions = rng.normal(size=(2, 2, 7))
    cls = rng.normal(size=(2, 1, 3))
    out = {"positions": jnp.asarray(positions), "logits_1": jnp.asarray(predictions, jnp.float32),
           "features": jnp.asarray(np.concatenate([cls, features], 1), jnp.float32)}
    tokens = {"labels": jnp.asarray(logits.argmax(-1), jnp.int32), "logits": jnp.asarray(logits, jnp.float32)}
    settings = targets.TargetSettings(kind="multi_choice", omega=0.2, tokenizer_temperature=4.0)
    loss, metrics = targets.labels_and_loss(out, tokens, settings)
    full, _, _ = np_targets(logits, features, 0.2)
    t = np.take_along_axis(full, positions[..., None], 1)
    logp = predictions - np.log(np.exp(predictions).sum(-1, keepdims=True))
    ref = np.mean(np.sum(-t * logp, -1))  # soft CE, mean over masked tokens
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_1"]), ref, rtol=1e-5)
    labels = np.take_along_axis(logits.argmax(-1), positions, 1)
    assert float(metrics["mlm_acc_1"]) == pytest.approx((predictions.argmax(-1) == labels).mean())
    # hard targets: the BEiT loss, unchanged
    hard, _ = targets.labels_and_loss(out, tokens, targets.TargetSettings())
    ref_hard, _ = pretrain.mim_loss(out["logits_1"], jnp.asarray(labels))
    np.testing.assert_allclose(float(hard), float(ref_hard), rtol=1e-6)


def test_gradient_through_the_similarity_matrix_is_a_switch(example):
    logits, features = example
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 7)), jnp.float32)

    def grad(stop):
        f = lambda x: jnp.sum(weights * targets.multi_choice_targets(
            jnp.asarray(logits, jnp.float32), x, stop_gradient_similarity=stop))
        return np.asarray(jax.grad(f)(jnp.asarray(features, jnp.float32)))

    assert np.abs(grad(False)).max() > 1e-4  # official: W is not detached
    assert np.abs(grad(True)).max() == 0.0
    default = recipes.mcbeit_pretrain().multi_choice
    assert default.stop_gradient_similarity is False and default.omega == 0.2
    assert default.tokenizer_temperature == 4.0 and default.similarity_temperature == 1.0


def test_vqkd_logits_are_negative_cosine_distances(tmp_path):
    directory = make_random_tokenizer(tmp_path / "tok")
    config = ml_collections.ConfigDict({"tokenizer": {"kind": "vqkd", "checkpoint": directory}})
    tokenizer, variables = targets.load_tokenizer(config)
    images = jax.random.uniform(jax.random.PRNGKey(3), (4, 16, 16, 3))
    logits = np.asarray(tokenizer.logits(variables, images))
    ids = np.asarray(tokenizer.ids(variables, images))
    assert logits.shape == (4, 16, 64) and logits.max() <= 1e-5 and logits.min() >= -2 - 1e-5  # cos − 1
    np.testing.assert_array_equal(logits.argmax(-1), ids)
    out = tokenizer.outputs(variables, images, soft=True)
    np.testing.assert_array_equal(np.asarray(out["labels"]), ids)


def test_tiny_multi_choice_pretraining_runs_and_learns(demo_data_dir, tmp_path):
    directory = make_random_tokenizer(tmp_path / "tok")
    c = load_config_file("beit_v1_tiny")
    with c.unlocked():
        c.data.data_dir = demo_data_dir
        c.data.second_input_size = 16
        c.tokenizer.kind = "vqkd"
        c.tokenizer.checkpoint = directory
        c.targets = "multi_choice"
        c.multi_choice = recipes.mcbeit_pretrain().multi_choice
        c.multi_choice.tokenizer_temperature = 0.05  # cosine logits live in [−2, 0]: sharpen them
        c.optim.lr = 3e-3
    workdir = str(tmp_path / "mc")
    pretrain.run(c, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows]
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.2, losses
    assert "loss_2" not in rows[-1] and "mlm_acc_1" in rows[-1]
