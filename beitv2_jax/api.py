"""The public API: load a model by directory, file or official name, and run it on images.

::

  import beitv2_jax
  model = beitv2_jax.from_pretrained("path/to/model_dir")        # or "beitv2_base_patch16_224_pt1k", a .pth, ...
  features = model.features(images)                              # [B, D]; pool="cls"|"mean"|"tokens"|"all"
  tokenizer = beitv2_jax.load_tokenizer("path/to/tokenizer_dir")
  ids = tokenizer.tokenize(images)                               # int32 [B, h, w]

``images``: one image or a batch — numpy/JAX arrays ``[H, W, 3]`` / ``[B, H, W, 3]`` (uint8 0-255, or float in
[0, 1]), PIL images, file paths, or a list of these of any sizes. The models preprocess themselves with the
``preprocessing`` stored next to the weights (``convert.store``: shorter side resized to ``int(size / crop_pct)``,
centre crop, mean/std; documented defaults for older directories).

One loader for every model source (:func:`load_weights`): our weight directories (``model.json``), Hugging Face
``save_pretrained`` folders, PyTorch/safetensors files (format detected or given) and the official checkpoints by
name (``beitv2_jax.registry``: downloaded, verified, converted and cached). The training tasks load their
pretrained encoders and tokenizers through it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Optional

import numpy as np

from beitv2_jax import storage

POOLS = ("default", "cls", "mean", "tokens", "all")


# ----------------------------------------------------------------------------------------------- loading
@dataclasses.dataclass
class Weights:
    """A loaded model: ``variables`` (numpy), ``kind`` (``vit`` | ``beit_pretrain`` | ``vqkd`` | ...), ``config``
    (``model.json`` ``model_config``), ``preprocessing`` (:func:`convert.store.check_preprocessing` fields),
    ``source`` (where it came from), ``left_out`` (checkpoint keys not converted: patch-aggregation layers whose
    input block the file does not say)."""

    variables: dict
    kind: str
    config: dict
    preprocessing: dict
    source: str
    left_out: list = dataclasses.field(default_factory=list)


def load_weights(name_or_path: str, format: Optional[str] = None) -> Weights:  # noqa: A002 - the CLI's word
    """Our weight directory, a Hugging Face folder, a checkpoint file (``format``: a ``convert`` layout, detected
    when None) or an official name (``registry.names()``) → :class:`Weights`."""
    from beitv2_jax import registry
    from beitv2_jax.convert import inputs, store

    path = str(name_or_path)
    if not storage.exists(path) and path in registry.REGISTRY:
        path = registry.fetch(path)
    if storage.isdir(path) and storage.isfile(storage.join(path, store.MODEL_JSON)):
        description = store.read_description(path)
        variables, kind, config = store.load_variables(path)
        return Weights(variables, kind, config, store.read_preprocessing(description), storage.abspath(path))
    if storage.isdir(path) and inputs.hf_folder(path) is None:
        raise FileNotFoundError(f"{path} is neither one of our weight directories (no model.json) nor a Hugging "
                                f"Face save_pretrained folder (config.json + model.safetensors)")
    if not storage.exists(path):
        raise FileNotFoundError(f"{name_or_path!r} is not a model directory, a checkpoint file or a known name "
                                f"(beitv2_jax.registry.names(): {', '.join(registry.names()[:4])}, ...)")
    return _convert(path, format)


def _convert(path: str, fmt: Optional[str]) -> Weights:
    """A checkpoint file / Hugging Face folder converted in memory (as ``python -m beitv2_jax.convert`` would)."""
    from beitv2_jax.convert import cli, engine, inputs, store, torch_io

    read = inputs.read_input(path, fmt or None)
    state_dict, options = read.state_dict, torch_io.layout_options(read.training_args)
    _, inferred, _ = engine.infer_config(state_dict, read.format, hf_config=read.hf_config, options=options)
    left_out = []
    if engine.unknown_fields(inferred) == ["early_layers"]:
        # The aggregation layers' input block is not in the file (no args.early_layers, non-standard depth): the
        # encoder is converted without them (only the backbone is used by the API and the tasks).
        left_out = sorted(k for k in state_dict if k.startswith("cls_pt_layers."))
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("cls_pt_layers.")}
    converted = engine.import_state_dict(state_dict, read.format, hf_config=read.hf_config, options=options)
    preprocessing = store.check_preprocessing(cli._hf_preprocessing(path), converted.model_kind,
                                              converted.model_config)
    return Weights(converted.variables, converted.model_kind, converted.model_config, preprocessing,
                   storage.abspath(path), left_out)


# ----------------------------------------------------------------------------------------------- images
@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Shorter side → ``int(image_size / crop_pct)`` (``interpolation``), centre crop to ``image_size``, [0, 1],
    then ``(x - mean) / std`` — the data pipeline's evaluation transform."""

    image_size: int
    crop_pct: float
    mean: tuple
    std: tuple
    interpolation: str

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["image_size"]), float(d["crop_pct"]), tuple(d["mean"]), tuple(d["std"]), d["interpolation"])

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "crop_pct": self.crop_pct, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    def one(self, image: Any) -> np.ndarray:
        """One image (see :func:`as_image_list`) → float32 ``[S, S, 3]``."""
        from PIL import Image

        from beitv2_jax.data import transforms

        resize = int(self.image_size / self.crop_pct)
        if isinstance(image, Image.Image):
            image = transforms.decode_image(image)
            view = transforms.center_crop(transforms.resize_shorter(image, resize, self.interpolation),
                                          self.image_size)
            x = transforms.to_unit_float(view)
        elif image.dtype == np.uint8:
            view = transforms.resize_shorter(Image.fromarray(image), resize, self.interpolation)
            x = transforms.to_unit_float(transforms.center_crop(view, self.image_size))
        else:  # float in [0, 1]: each channel resized as a 32-bit float image (no rounding to 8 bits)
            channels = []
            for c in range(3):
                plane = Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), mode="F")
                plane = transforms.center_crop(transforms.resize_shorter(plane, resize, self.interpolation),
                                               self.image_size)
                channels.append(np.asarray(plane, np.float32))
            x = np.clip(np.stack(channels, axis=-1), 0.0, 1.0)  # bicubic overshoot, clipped as PIL does for 8 bits
        return ((x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(np.float32)

    def __call__(self, images: Any) -> np.ndarray:
        """Images (any form :func:`as_image_list` takes) → float32 ``[B, S, S, 3]``."""
        import chex

        batch = np.stack([self.one(image) for image in as_image_list(images)])
        chex.assert_shape(batch, (None, self.image_size, self.image_size, 3))
        chex.assert_type(batch, np.float32)
        return batch


def _as_array_image(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"an image must be [H, W, 3] (channels last) or [H, W], got shape {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"images must be uint8 (0-255) or float in [0, 1], got dtype {image.dtype}")
    lo, hi = float(np.min(image)), float(np.max(image))
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"float images must be in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); pass uint8 for "
                         f"0-255 images — the model normalises them itself")
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def as_image_list(images: Any) -> list:
    """One image or a batch → a list of PIL images / ``[H, W, 3]`` arrays (uint8, or float32 in [0, 1]).

    Accepted: a path, a PIL image, an array ``[H, W, 3]``/``[H, W]`` or ``[B, H, W, 3]`` (numpy or JAX), or a list
    of any of these."""
    from PIL import Image

    from beitv2_jax.data import transforms

    if isinstance(images, (str, Image.Image)) or hasattr(images, "shape"):
        images = [images] if not (hasattr(images, "shape") and np.ndim(images) == 4) else list(np.asarray(images))
    out = []
    for image in images:
        if isinstance(image, str):
            with storage.open(image, "rb") as f:
                image = transforms.decode_image(f.read())
        out.append(image if isinstance(image, Image.Image) else _as_array_image(np.asarray(image)))
    if not out:
        raise ValueError("no images given")
    return out


# ----------------------------------------------------------------------------------------------- encoders
class Encoder:
    """An image encoder (``vit`` or the backbone of a ``beit_pretrain`` model) with its preprocessing.

    ``features(images, pool, layer)`` and ``classify(images)`` take raw images (see :func:`as_image_list`);
    ``apply(batch)`` runs the network on an already preprocessed ``[B, S, S, 3]`` batch and returns the ViT's
    output dict. ``config`` holds the ViT fields, ``params`` the weights (numpy), ``num_classes`` the head size
    (0: no head)."""

    def __init__(self, params: dict, config: dict, preprocessing: dict, *, patch_aggregation: bool = False,
                 source: str = ""):
        from beitv2_jax.models import vit

        self.params, self.config, self.source = params, dict(config), source
        self.patch_aggregation = patch_aggregation
        self.preprocessing = Preprocessing.from_dict(preprocessing)
        self.module = vit.VisionTransformer(**dict(self.config, drop_path_rate=0.0))
        self.num_classes = int(self.config.get("num_classes", 0))

    def __repr__(self) -> str:
        c = self.config
        return (f"Encoder(width={c['width']}, depth={c['depth']}, image_size={c['image_size']}, "
                f"num_classes={self.num_classes}, source={self.source!r})")

    def preprocess(self, images: Any) -> np.ndarray:
        return self.preprocessing(images)

    def apply(self, batch: np.ndarray, return_blocks: bool = False) -> dict:
        return _jitted_apply(json.dumps(self.config, sort_keys=True), return_blocks)(self.params, batch)

    def resolve_pool(self, pool: str) -> str:
        """``default``: the class token for models pretrained with patch aggregation (paper §3.2), the mean of the
        patch tokens otherwise (as ``linear_probe``'s ``feature='auto'``)."""
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if pool == "default":
            return "cls" if self.patch_aggregation else "mean"
        return pool

    def features(self, images: Any, pool: str = "default", layer: Optional[int] = None) -> np.ndarray:
        """float32 features of ``images``: ``[B, D]`` for ``pool`` ``cls`` (class token after the final norm) or
        ``mean`` (mean of the patch tokens after the final norm; a mean-pooling classifier's ``fc_norm`` feature),
        ``[B, N, D]`` for ``tokens`` (patch tokens), ``[B, T, D]`` for ``all``. ``layer=k`` reads block ``k``'s raw
        output instead (0-based, negative from the end; no final norm)."""
        import chex

        pool = self.resolve_pool(pool)
        first = 1 if self.config["use_cls_token"] else 0
        if pool == "cls" and not first:
            raise ValueError("pool='cls' needs a model with a class token")
        batch = self.preprocess(images)
        out = self.apply(batch, return_blocks=layer is not None)
        if layer is not None:
            depth = len(out["blocks"])
            if not -depth <= layer < depth:
                raise ValueError(f"layer must be in [{-depth}, {depth - 1}] for this {depth}-block model, got {layer}")
            tokens = out["blocks"][layer]
        else:
            tokens = out["encoded"]
        if pool == "cls":
            result = tokens[:, 0]
        elif pool == "mean":
            pooled_by_model = (layer is None and not self.config["use_final_norm"] and self.config["use_fc_norm"]
                               and self.config["pooling"] == "mean")
            result = out["pooled"] if pooled_by_model else tokens[:, first:].mean(axis=1)
        elif pool == "tokens":
            result = tokens[:, first:]
        else:
            result = tokens
        result = np.asarray(result, np.float32)
        chex.assert_axis_dimension(result, 0, batch.shape[0])
        chex.assert_axis_dimension(result, -1, self.config["width"])
        return result

    def classify(self, images: Any) -> np.ndarray:
        """float32 logits ``[B, num_classes]`` (models with a classification head, e.g. fine-tuned ones)."""
        import chex

        if not self.num_classes:
            raise ValueError(f"this model has no classification head (num_classes=0; source {self.source}); "
                             f"use .features(images)")
        batch = self.preprocess(images)
        logits = np.asarray(self.apply(batch)["logits"], np.float32)
        chex.assert_shape(logits, (batch.shape[0], self.num_classes))
        return logits


@functools.lru_cache(maxsize=16)
def _jitted_apply(config_json: str, return_blocks: bool):
    """One compiled forward per architecture (encoders of the same config share it)."""
    import jax

    from beitv2_jax.models import vit

    module = vit.VisionTransformer(**dict(json.loads(config_json), drop_path_rate=0.0))
    return jax.jit(lambda params, x: module.apply({"params": params}, x, return_blocks=return_blocks))


def encoder_from_weights(weights: Weights) -> Encoder:
    from beitv2_jax.train.tasks import finetune

    pretrained = finetune.as_encoder(weights.variables, weights.kind, weights.config)
    aggregation = pretrained.patch_aggregation or bool(weights.left_out)
    return Encoder(pretrained.params, pretrained.config, weights.preprocessing, patch_aggregation=aggregation,
                   source=weights.source)


def from_pretrained(name_or_path: str, format: Optional[str] = None) -> Encoder:  # noqa: A002
    """An image encoder from our weight directory, a Hugging Face folder, a checkpoint file (``format`` detected
    when None) or an official name (``beitv2_jax.registry.names()``)."""
    weights = load_weights(name_or_path, format)
    if weights.kind == "vqkd":
        raise ValueError(f"{name_or_path} is a VQ-KD tokenizer: load it with beitv2_jax.load_tokenizer")
    if weights.kind not in ("vit", "beit_pretrain"):
        raise ValueError(f"{name_or_path} holds a {weights.kind!r} model, not an image encoder (vit, beit_pretrain)")
    return encoder_from_weights(weights)


# ----------------------------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """A VQ-KD tokenizer with its preprocessing (images to [0, 1]; the model rescales to [-1, 1] itself)."""

    def __init__(self, variables: dict, config: dict, preprocessing: dict, source: str = "",
                 dtype: Optional[str] = None):
        from beitv2_jax.models import vqkd

        self.variables, self.config, self.source = variables, dict(config), source
        self.module = vqkd.build_vqkd(dict(self.config, **({"dtype": dtype} if dtype else {})))
        self.preprocessing = Preprocessing.from_dict(preprocessing)
        self.num_codes = int(self.module.num_codes)
        self.grid = tuple(self.module.encoder.window)

    def __repr__(self) -> str:
        return f"Tokenizer(num_codes={self.num_codes}, grid={self.grid}, source={self.source!r})"

    @functools.cached_property
    def _codes(self):
        import jax

        return jax.jit(lambda v, x: self.module.apply(v, x, method="get_codebook_indices"))

    def tokenize(self, images: Any) -> np.ndarray:
        """Code ids ``int32 [B, h, w]`` of ``images`` (see :func:`as_image_list`)."""
        import chex

        batch = self.preprocessing(images)
        ids = np.asarray(self._codes(self.variables, batch)).reshape((batch.shape[0],) + self.grid).astype(np.int32)
        chex.assert_type(ids, np.int32)
        return ids


def tokenizer_from_weights(weights: Weights, dtype: Optional[str] = None) -> Tokenizer:
    if weights.kind != "vqkd":
        raise ValueError(f"{weights.source} holds a {weights.kind!r} model, not a VQ-KD tokenizer")
    return Tokenizer(weights.variables, weights.config, weights.preprocessing, weights.source, dtype)


def load_tokenizer(name_or_path: str, format: Optional[str] = None,  # noqa: A002 - the CLI's word
                   dtype: Optional[str] = None) -> Tokenizer:
    """A VQ-KD tokenizer from our weight directory, an official ``.pth`` (``format`` detected when None) or an
    official name (e.g. ``vqkd_encoder_base_decoder_3x768x12_clip``). ``dtype`` overrides the compute dtype."""
    return tokenizer_from_weights(load_weights(name_or_path, format), dtype)

