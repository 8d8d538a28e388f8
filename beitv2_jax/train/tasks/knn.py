"""Task ``knn``: k-NN evaluation of a frozen encoder (the DINO/iBOT protocol), cosine-similarity weighted vote.

Features are l2-normalised; each test image takes its ``k`` most similar training images (k = 20), weights each
neighbour's class by ``exp(similarity / temperature)`` (T = 0.07) and predicts the class with the largest sum.
Similarities are computed on device, ``chunk`` test images at a time against all training features.
Features: ``config.knn.feature`` = ``auto`` (CLS after the final norm for patch-aggregation models, else the mean
of the patch tokens), ``cls`` or ``mean`` (see ``linear_probe.feature_fn``).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from beitv2_jax import storage
from beitv2_jax.data import on_device, pipeline
from beitv2_jax.train import sharding
from beitv2_jax.train.metrics import MetricsWriter
from beitv2_jax.train.tasks import common


def knn_predict(train_features: jax.Array, train_labels: jax.Array, test_features: jax.Array, num_classes: int,
                k: int = 20, temperature: float = 0.07) -> jax.Array:
    """Class scores ``[n_test, num_classes]`` from l2-normalised features ``[n, D]`` (batched by the caller)."""
    sim = test_features @ train_features.T  # [n_test, n_train]
    top_sim, top_idx = jax.lax.top_k(sim, k)
    weights = jnp.exp(top_sim / temperature)
    onehot = jax.nn.one_hot(train_labels[top_idx], num_classes)  # [n_test, k, C]
    return jnp.einsum("nk,nkc->nc", weights, onehot)


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def eval_batches(data_config, split: str, batch_size: int) -> list:
    """The padded evaluation pass of ``split`` (``pipeline.make_eval_iterator``) held in memory, for feature
    extractions that read the same images more than once (the demo's evaluation: uint8, 15 MB for its 5,000 32²
    training images)."""
    return list(pipeline.make_eval_iterator(data_config, batch_size, split=split))


def extract_features(feature_fn: Callable, data_config, split: str, batch_size: int, mesh, params=None,
                     desc: str = "", batches=None):
    """``(features [n, D] float32, labels [n])`` of a whole split through the eval transform (progress named
    ``desc``, default "features (<split>)").

    ``feature_fn(images)``, or ``feature_fn(params, images)`` when ``params`` is given (passed to the jitted
    function as an argument, so large encoders are not baked into the program as constants). ``batches``: the
    split's batches from ``eval_batches`` instead of a fresh pass of the input pipeline.
    """
    if params is None:
        fn = jax.jit(lambda p, b: {"f": feature_fn(on_device.normalized(b["image"])), "y": b["label"]})
    else:
        fn = jax.jit(lambda p, b: {"f": feature_fn(p, on_device.normalized(b["image"])), "y": b["label"]})
    iterator = pipeline.make_eval_iterator(data_config, batch_size, split=split) if batches is None else batches
    outs = common.eval_pass(lambda b: fn(params, b), iterator, mesh, desc or f"features ({split})")
    return np.concatenate([o["f"] for o in outs]).astype(np.float32), np.concatenate([o["y"] for o in outs])


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> dict:
    """Top-1 / top-5 accuracy (in %) of the weighted k-NN classifier."""
    train_f = jnp.asarray(l2n(train_features))
    train_y = jnp.asarray(train_labels)
    predict = jax.jit(lambda f: knn_predict(train_f, train_y, f, num_classes, min(k, len(train_labels)),
                                            temperature))
    scores = np.concatenate([np.asarray(predict(jnp.asarray(l2n(test_features[i:i + chunk]))))
                             for i in range(0, len(test_features), chunk)])
    ranked = np.argsort(-scores, axis=1)
    top1 = float((ranked[:, 0] == test_labels).mean() * 100)
    top5 = float((ranked[:, :min(5, num_classes)] == test_labels[:, None]).any(1).mean() * 100)
    return {"knn_top1": top1, "knn_top5": top5}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """k-NN top-1/top-5 of ``config.pretrained.checkpoint`` on ``config.data`` (train split → eval split)."""
    from beitv2_jax.train.tasks import finetune, linear_probe

    common.log_header("knn", config, workdir)
    common.prepare_workdir(config, workdir)
    mesh = sharding.make_mesh(config.get("mesh"))
    pretrained = finetune.load_pretrained(config.pretrained.checkpoint, config.pretrained.get("format", ""))
    pretrained = linear_probe.at_resolution(pretrained, config.data.input_size)
    feature = linear_probe.resolve_feature(config.knn.feature, pretrained)
    if feature == "per_layer":
        raise ValueError("config.knn.feature must be auto, cls or mean (per_layer is a linear-probe protocol)")
    model = linear_probe.encoder_model(pretrained, config.get("dtype", "float32"))
    params = jax.device_put(pretrained.params, sharding.replicated(mesh))
    features = linear_probe.feature_fn(model, feature)
    batch = config.get("eval_batch_size") or config.batch_size
    logging.info("knn: %d train images → %d eval images, batch %d",
                 common.num_examples(config.data, config.data.train_split),
                 common.num_examples(config.data, config.data.eval_split), batch)
    train = extract_features(features, config.data, config.data.train_split, batch, mesh, params)
    test = extract_features(features, config.data, config.data.eval_split, batch, mesh, params)
    num_classes = int(config.get("num_classes") or max(train[1].max(), test[1].max()) + 1)
    result = knn_accuracy(*train, *test, num_classes, config.knn.k, config.knn.temperature,
                          config.knn.get("chunk", 1024))
    result.update(feature=feature, k=config.knn.k, temperature=config.knn.temperature,
                  num_train=int(len(train[1])), num_test=int(len(test[1])), checkpoint=config.pretrained.checkpoint)
    writer = MetricsWriter(workdir)
    writer.write_scalars(0, {"eval/knn_top1": result["knn_top1"], "eval/knn_top5": result["knn_top5"]})
    writer.close()
    if jax.process_index() == 0:
        storage.write_json(storage.join(workdir, "results.json"), result, indent=2)
    logging.info("k-NN (k=%d, T=%g, %s features): top-1 %.2f top-5 %.2f", config.knn.k, config.knn.temperature,
                 feature, result["knn_top1"], result["knn_top5"])
    return result
