"""Frozen-encoder evaluation: weighted k-NN against a brute-force reference, linear heads on cached features
(single and per-layer), the feature definitions, and tiny linear_probe / knn task runs on the demo data."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from beitv2_jax.convert import store
from beitv2_jax.convert.model_shapes import build_model
from beitv2_jax.train.tasks import finetune, knn, linear_probe

from conftest import load_config_file
from test_finetune import random_variables

TINY_PRETRAIN = dict(backbone=dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=2,
                                   layer_scale_init=0.1), vocab_size=16, num_masked_patches=4, early_layers=1,
                     head_layers=1)


def reference_knn(train_f, train_y, test_f, num_classes, k, temperature):
    """DINO's weighted k-NN, one test example at a time, in float64 numpy."""
    train_f = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
    scores = []
    for f in test_f / np.linalg.norm(test_f, axis=1, keepdims=True):
        sim = train_f @ f
        top = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, train_y[top], np.exp(sim[top] / temperature))
        scores.append(votes)
    return np.array(scores)


def test_knn_matches_a_bruteforce_reference():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 16))
    train_y, test_y = rng.integers(0, 5, 300), rng.integers(0, 5, 70)
    train_f = centres[train_y] + 1.5 * rng.standard_normal((300, 16))
    test_f = centres[test_y] + 1.5 * rng.standard_normal((70, 16))
    ref = reference_knn(train_f, train_y, test_f, 5, 20, 0.07)
    ranked = np.argsort(-ref, axis=1, kind="stable")
    expected_top1 = (ranked[:, 0] == test_y).mean() * 100
    expected_top5 = 100.0  # 5 classes
    got = knn.knn_accuracy(train_f.astype(np.float32), train_y, test_f.astype(np.float32), test_y, 5, k=20,
                           temperature=0.07, chunk=32)
    assert got["knn_top1"] == pytest.approx(expected_top1) and got["knn_top5"] == pytest.approx(expected_top5)
    scores = np.asarray(knn.knn_predict(jnp.asarray(knn.l2n(train_f.astype(np.float32))), jnp.asarray(train_y),
                                        jnp.asarray(knn.l2n(test_f.astype(np.float32))), 5, 20, 0.07))
    np.testing.assert_allclose(scores, ref, rtol=2e-4)


SETTINGS = linear_probe.ProbeSettings(epochs=15, batch_size=64, optim={
    "name": "adamw", "lr": 1e-2, "min_lr": 0.0, "warmup_epochs": 0, "weight_decay": 1e-4})


def test_linear_heads_learn_and_pick_the_informative_layer():
    rng = np.random.default_rng(1)
    centres = 3 * rng.standard_normal((4, 8))
    y_train, y_test = rng.integers(0, 4, 400), rng.integers(0, 4, 200)
    single = linear_probe.train_on_features(centres[y_train] + rng.standard_normal((400, 8)), y_train,
                                            centres[y_test] + rng.standard_normal((200, 8)), y_test, 4, SETTINGS)
    assert single["top1"] > 95 and single["best_layer"] == 1 and "per_layer_top1" not in single
    scales = 10.0 ** rng.uniform(-3, 3, 8)  # badly scaled features: standardising with train statistics fixes them
    scaled = linear_probe.train_on_features((centres[y_train] + rng.standard_normal((400, 8))) * scales, y_train,
                                            (centres[y_test] + rng.standard_normal((200, 8))) * scales, y_test, 4,
                                            dataclasses.replace(SETTINGS, standardize=True))
    assert scaled["top1"] > 95

    def layered(y):  # layer 2 (1-based) carries the class, layers 1 and 3 are noise
        noise = rng.standard_normal((len(y), 3, 8))
        noise[:, 1] += centres[y]
        return noise

    per_layer = linear_probe.train_on_features(layered(y_train), y_train, layered(y_test), y_test, 4, SETTINGS)
    assert per_layer["best_layer"] == 2 and per_layer["top1"] > 95
    assert len(per_layer["per_layer_top1"]) == 3 and max(per_layer["per_layer_top1"][::2]) < 60
    sgd = dict(SETTINGS.optim, name="sgd", lr=0.5, weight_decay=0.0)
    again = linear_probe.train_on_features(layered(y_train), y_train, layered(y_test), y_test, 4,
                                           linear_probe.ProbeSettings(15, 64, sgd))
    assert again["best_layer"] == 2 and again["top1"] > 90


def test_feature_definitions():
    model = build_model("beit_pretrain", TINY_PRETRAIN)
    params = random_variables("beit_pretrain", TINY_PRETRAIN, seed=3)["params"]
    pretrained = finetune.as_encoder({"params": params}, "beit_pretrain", TINY_PRETRAIN)
    assert pretrained.patch_aggregation and "backbone/mask_token" in pretrained.dropped
    assert linear_probe.resolve_feature("auto", pretrained) == "cls"
    assert linear_probe.resolve_feature("auto", dataclasses.replace(pretrained, patch_aggregation=False)) == "mean"
    encoder = linear_probe.encoder_model(pretrained)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 3))

    @jax.jit
    def everything(params, encoder_params, x):
        backbone = model.backbone.apply({"params": params["backbone"]}, x, return_blocks=True)
        features = [linear_probe.feature_fn(encoder, f)(encoder_params, x) for f in ("cls", "mean", "per_layer")]
        return backbone, encoder.apply({"params": encoder_params}, x)["encoded"], features

    backbone, normed, (cls, mean, per_layer) = everything(params, pretrained.params, x)
    norm = params["norm"]
    mu = backbone["pre_norm"].mean(-1, keepdims=True)
    var = ((backbone["pre_norm"] - mu) ** 2).mean(-1, keepdims=True)
    manual = (backbone["pre_norm"] - mu) / jnp.sqrt(var + 1e-6) * norm["scale"] + norm["bias"]
    np.testing.assert_allclose(normed, manual, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cls, manual[:, 0], rtol=1e-5, atol=1e-5)  # final-layer CLS after the final norm
    np.testing.assert_allclose(mean, manual[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
    assert per_layer.shape == (3, 2, 64)
    for i, block in enumerate(backbone["blocks"]):  # raw block outputs: [CLS, mean of patches]
        np.testing.assert_allclose(per_layer[:, i], jnp.concatenate([block[:, 0], block[:, 1:].mean(1)], -1),
                                   rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("encoder") / "model")
    store.save_variables(path, random_variables("beit_pretrain", TINY_PRETRAIN, seed=4), "beit_pretrain",
                         TINY_PRETRAIN)
    return path


def _task_config(name, encoder_dir, demo_data_dir):
    c = load_config_file(name)
    with c.unlocked():
        c.pretrained.checkpoint = encoder_dir
        c.data.dataset, c.data.data_dir, c.data.eval_split = "beitv2_demo", demo_data_dir, "test"
        c.data.input_size, c.data.patch_size, c.data.num_workers, c.data.read_threads = 16, 4, 0, 2
        c.data.train_split = "test"  # plumbing only: 1,000 images to read instead of 5,000
        c.num_classes = 10
        c.batch_size = 250
    return c


def test_linear_probe_task_cached_and_streamed(tiny_encoder_dir, demo_data_dir, tmp_path):
    c = _task_config("linear_probe", tiny_encoder_dir, demo_data_dir)
    with c.unlocked():
        c.probe.cache_features = True
        c.probe.feature = "mean"
        c.num_epochs = 3
    result = linear_probe.run(c, str(tmp_path / "cached"))
    # a random-init encoder: the demo classes differ in shape, not colour, so accuracy stays near chance (10%)
    assert result["feature"] == "mean" and 0 <= result["top1"] <= result["top5"] <= 100
    saved = json.load(open(tmp_path / "cached" / "results.json"))
    assert saved["top1"] == result["top1"] and saved["best_epoch"] >= 1
    rows = [json.loads(line) for line in open(tmp_path / "cached" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]

    with c.unlocked():  # per-layer protocol on fresh augmented views, through the checkpointed loop
        c.probe.cache_features = False
        c.probe.feature = "per_layer"
        c.batch_size, c.eval_batch_size, c.steps_per_epoch, c.num_epochs = 32, 500, 3, 1
    streamed = linear_probe.run(c, str(tmp_path / "streamed"))
    assert streamed["feature"] == "per_layer" and len(streamed["per_layer_top1"]) == 2
    assert streamed["best_layer"] in (1, 2)
    assert os.path.isdir(tmp_path / "streamed" / "checkpoints" / "3")


def test_knn_task(tiny_encoder_dir, demo_data_dir, tmp_path):
    c = _task_config("knn", tiny_encoder_dir, demo_data_dir)
    with c.unlocked():
        c.knn.feature = "mean"
    result = knn.run(c, str(tmp_path / "knn"))
    assert result["feature"] == "mean" and result["num_train"] == result["num_test"] == 1000
    assert 0 <= result["knn_top1"] <= result["knn_top5"] <= 100
    assert json.load(open(tmp_path / "knn" / "results.json"))["knn_top1"] == result["knn_top1"]
    with c.unlocked():
        c.knn.feature = "per_layer"
    with pytest.raises(ValueError, match="per_layer"):
        knn.run(c, str(tmp_path / "knn_bad"))


def test_configs_carry_the_official_numbers():
    base = load_config_file("finetune_base")
    base300 = load_config_file("finetune_base", "300")
    large = load_config_file("finetune_large")
    assert (base.optim.lr, base.optim.layer_decay, base.model.drop_path_rate, base.num_epochs, base.batch_size) == (
        5e-4, 0.6, 0.2, 100, 1024)
    assert (base300.optim.layer_decay, base300.model.drop_path_rate) == (0.65, 0.1)
    assert (large.optim.lr, large.optim.layer_decay, large.model.drop_path_rate, large.num_epochs) == (
        2e-4, 0.8, 0.2, 50)
    for c in (base, large):
        assert (c.optim.weight_decay, c.optim.b1, c.optim.b2, c.optim.min_lr) == (0.05, 0.9, 0.999, 1e-6)
        assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.mixup.switch_prob, c.label_smoothing) == (
            0.8, 1.0, 0.5, 0.1)
        assert (c.augment.auto_augment, c.augment.re_prob, c.augment.re_mode) == ("rand-m9-mstd0.5-inc1", 0.25,
                                                                                 "pixel")
        assert (c.model.head_init_scale, c.model.pooling, c.model.rel_pos) == (0.001, "mean", "per_layer")
        assert int(c.data.input_size / c.data.eval_crop_pct) == 256 and c.data.interpolation == "bicubic"
    probe, nn = load_config_file("linear_probe"), load_config_file("knn")
    assert probe.probe.feature == "auto" and (nn.knn.k, nn.knn.temperature) == (20, 0.07)
    assert isinstance(probe.optim, ml_collections.ConfigDict)
