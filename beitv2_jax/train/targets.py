"""Masked-image-modeling targets from a frozen tokenizer: hard code ids (BEiT v1/v2) or mc-BEiT soft targets.

* ``config.targets = 'hard'``: CE of the predictions against the tokenizer's code ids (BEiT v1 with the dVAE,
  BEiT v2 with VQ-KD).
* ``config.targets = 'multi_choice'`` (mc-BEiT, reference §2, ``engine_for_pretraining.py``)::

      p      = softmax(tokenizer logits / tokenizer_temperature)                 [B, N, V]   (no gradient)
      f      = l2_normalize(final-norm patch features of the online model)       [B, N, D]
      W      = softmax(f fᵀ / similarity_temperature, axis=-1)                  [B, N, N]
      target = ω · W p + (1 − ω) · p                                             ω = omega = 0.2
      loss   = mean over masked tokens of Σ_V −target · log_softmax(prediction)

  The official code builds ``W`` from the student's features without ``detach``, so gradients flow through the
  target; ``stop_gradient_similarity=False`` (the default) keeps that, ``True`` stops them.

Tokenizers (``config.tokenizer.kind``): ``vqkd`` (logits = negative cosine distances to the codes, ``−(1 − cos)``;
their argmax is the code id) and ``dvae`` (the DALL-E encoder's logits). Both are frozen and replicated.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from beitv2_jax.models import quantizer
from beitv2_jax.models.beit import gather_tokens

TARGETS = ("hard", "multi_choice")
TOKENIZER_KINDS = ("vqkd", "dvae")


# ----------------------------------------------------------------------------------------------- pure functions
def multi_choice_targets(tokenizer_logits: jax.Array, features: jax.Array, omega: float = 0.2,
                         tokenizer_temperature: float = 4.0, similarity_temperature: float = 1.0,
                         stop_gradient_similarity: bool = False) -> jax.Array:
    """mc-BEiT soft targets ``[B, N, V]`` (rows sum to 1) from tokenizer logits ``[B, N, V]`` and the online model's
    patch features ``[B, N, D]`` (all positions, masked ones included)."""
    p = jax.nn.softmax(jax.lax.stop_gradient(tokenizer_logits.astype(jnp.float32)) / tokenizer_temperature, -1)
    f = quantizer.l2_normalize(features)
    sim = jnp.einsum("bnd,bmd->bnm", f, f, precision=jax.lax.Precision.HIGHEST) / similarity_temperature
    w = jax.nn.softmax(sim, axis=-1)
    if stop_gradient_similarity:
        w = jax.lax.stop_gradient(w)
    propagated = jnp.einsum("bnm,bmv->bnv", w, p, precision=jax.lax.Precision.HIGHEST)
    return omega * propagated + (1.0 - omega) * p


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over tokens of ``Σ_V −targets · log_softmax(logits)``; both ``[..., V]``, float32 scalar."""
    return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1))


def hard_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean CE of ``logits [..., V]`` against integer ``labels [...]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return (quantizer.first_argmax(logits, -1) == labels).astype(jnp.float32).mean()


# ----------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class TargetSettings:
    """How the MIM targets are built (from ``config.targets`` and ``config.multi_choice``)."""

    kind: str = "hard"
    omega: float = 0.2
    tokenizer_temperature: float = 4.0
    similarity_temperature: float = 1.0
    stop_gradient_similarity: bool = False

    @property
    def soft(self) -> bool:
        return self.kind == "multi_choice"


def settings_from_config(config: ml_collections.ConfigDict) -> TargetSettings:
    kind = config.get("targets", "hard")
    if kind not in TARGETS:
        raise ValueError(f"config.targets must be one of {TARGETS}, got {kind!r}")
    mc = config.get("multi_choice") or {}
    return TargetSettings(kind=kind, omega=float(mc.get("omega", 0.2)),
                          tokenizer_temperature=float(mc.get("tokenizer_temperature", 4.0)),
                          similarity_temperature=float(mc.get("similarity_temperature", 1.0)),
                          stop_gradient_similarity=bool(mc.get("stop_gradient_similarity", False)))


# ----------------------------------------------------------------------------------------------- tokenizers
@dataclasses.dataclass(frozen=True)
class FrozenTokenizer:
    """A frozen tokenizer model with a uniform interface: ``ids`` ``[B, N]`` and ``logits`` ``[B, N, V]`` of
    tokenizer-view images ``[B, H, W, 3]`` in [0, 1]. ``variables`` are passed in (replicated, not in the state)."""

    model: Any
    kind: str

    @property
    def num_codes(self) -> int:
        return int(self.model.num_codes)

    def ids(self, variables, images: jax.Array) -> jax.Array:
        return self.model.apply(variables, images, method="get_codebook_indices")

    def logits(self, variables, images: jax.Array) -> jax.Array:
        if self.kind == "dvae":
            return self.model.apply(variables, images, method="logits").astype(jnp.float32)
        codebook = variables["codebook"]["quantize"]["weight"]
        return self.model.apply(variables, images, codebook, method=_vqkd_logits)

    def outputs(self, variables, images: jax.Array, soft: bool, positions: jax.Array | None = None) -> dict:
        """``{'labels': [B, N] int32}`` plus ``'logits'`` ``[B, N, V]`` when ``soft`` (labels = their argmax, which is
        the tokenizer's own code id); no gradient. With ``positions [B, K]`` (hard VQ-KD targets only) the labels are
        ``{'masked_labels': [B, K]}``, the code ids at those patches, computed for them alone (identical ids)."""
        if not soft and positions is not None and self.kind == "vqkd":
            ids = self.model.apply(variables, images, positions, method="get_codebook_indices_at")
            return {"masked_labels": jax.lax.stop_gradient(ids)}
        if not soft:
            return {"labels": jax.lax.stop_gradient(self.ids(variables, images))}
        logits = jax.lax.stop_gradient(self.logits(variables, images))
        return {"labels": jnp.argmax(logits, -1).astype(jnp.int32), "logits": logits}


def _vqkd_logits(module, images: jax.Array, codebook: jax.Array) -> jax.Array:
    """VQ-KD code logits ``−(1 − cos(z, e_k))`` ``[B, N, K]`` for the codebook ``[K, d]``: half the negative squared
    distance of the unit vectors, computed with the quantizer's own distance function so that the argmax is exactly
    its code id."""
    tokens = module.encoder(module.preprocess(images), train=False)["patch_tokens"]
    z = quantizer.l2_normalize(module.encode_task_layer(tokens))
    return -0.5 * quantizer.code_distances(z.reshape(z.shape[0], -1, z.shape[-1]), codebook)


def load_tokenizer(config: ml_collections.ConfigDict) -> tuple:
    """``(FrozenTokenizer, variables)`` for ``config.tokenizer`` (``kind``: vqkd | dvae, ``checkpoint``: directory
    from the vqkd task / the converters)."""
    kind = config.tokenizer.get("kind", "vqkd")
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"config.tokenizer.kind must be one of {TOKENIZER_KINDS}, got {kind!r}")
    if kind == "dvae":
        from beitv2_jax.models import dvae

        model, variables = dvae.load_dvae(config.tokenizer.checkpoint)
    else:
        from beitv2_jax.train.tasks import vqkd

        model, variables = vqkd.load_tokenizer(config.tokenizer.checkpoint, dtype=config.get("dtype", "float32"))
    return FrozenTokenizer(model, kind), jax.tree.map(jnp.asarray, variables)


# ----------------------------------------------------------------------------------------------- the loss
def labels_and_loss(out: dict, tokens: dict, settings: TargetSettings) -> tuple:
    """The MIM loss of a ``BEiTPretrainModel`` output ``out`` against ``tokens`` (from
    :meth:`FrozenTokenizer.outputs`). Returns ``(loss, metrics)`` with ``loss_1``/``mlm_acc_1`` (final layer) and,
    when the model has the patch-aggregation branch, ``loss_2``/``mlm_acc_2``; loss = their sum. Accuracy is the
    argmax against the tokenizer's code ids (the official ``mlm_acc``) for both target kinds."""
    positions = out["positions"]
    labels = tokens["masked_labels"] if "masked_labels" in tokens else gather_tokens(tokens["labels"], positions)
    if settings.soft:
        targets = multi_choice_targets(tokens["logits"], out["features"][:, 1:], settings.omega,
                                       settings.tokenizer_temperature, settings.similarity_temperature,
                                       settings.stop_gradient_similarity)
        targets = gather_tokens(targets, positions)
        loss_of = lambda logits: soft_cross_entropy(logits, targets)
    else:
        loss_of = lambda logits: hard_cross_entropy(logits, labels)
    metrics, loss = {}, 0.0
    for branch in ("1", "2"):
        if f"logits_{branch}" in out:
            value = loss_of(out[f"logits_{branch}"])
            metrics.update({f"loss_{branch}": value, f"mlm_acc_{branch}": accuracy(out[f"logits_{branch}"], labels)})
            loss = loss + value
    return loss, metrics


def as_frozen(tokenizer) -> FrozenTokenizer:
    """A ``FrozenTokenizer`` from one, or from a bare VQ-KD / dVAE module."""
    if isinstance(tokenizer, FrozenTokenizer):
        return tokenizer
    from beitv2_jax.models import dvae

    return FrozenTokenizer(tokenizer, "dvae" if isinstance(tokenizer, dvae.DVAEEncoder) else "vqkd")


def tokens_per_image(tokenizer: FrozenTokenizer, image_size: int) -> int:
    """How many code ids the tokenizer gives for a ``image_size`` tokenizer view."""
    if tokenizer.kind == "dvae":
        stride = tokenizer.model.downsample
        if image_size % stride:
            raise ValueError(f"the dVAE tokenizer view ({image_size}px) must be a multiple of its stride {stride}")
        return (image_size // stride) ** 2
    return tokenizer.model.encoder.num_patches


def check_tokenizer_grid(tokenizer: FrozenTokenizer, image_size: int, num_patches: int) -> None:
    """The tokenizer gives one code per backbone patch (e.g. dVAE: 112 px / 8 = 14 = 224 px / 16)."""
    n = tokens_per_image(tokenizer, image_size)
    if n != num_patches:
        raise ValueError(f"the {tokenizer.kind} tokenizer gives {n} tokens for config.data.second_input_size="
                         f"{image_size}, the backbone has {num_patches} patches; they must match")
