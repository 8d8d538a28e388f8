"""k-NN evaluation of a frozen encoder (the DINO/iBOT protocol): cosine-similarity weighted vote.

Features are l2-normalised; each test image takes its ``k`` most similar training images, weights each
neighbour's class by ``exp(similarity / temperature)`` and predicts the class with the largest sum.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.data import pipeline
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


def extract_features(feature_fn: Callable, data_config, split: str, batch_size: int, mesh):
    """``(features [n, D] float32, labels [n])`` of a whole split through the eval transform."""
    iterator = pipeline.make_eval_iterator(data_config, batch_size, split=split)
    outs = common.eval_pass(jax.jit(lambda b: {"f": feature_fn(b["image"]), "y": b["label"]}), iterator, mesh)
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
