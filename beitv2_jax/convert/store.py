"""Our on-disk format for converted (or exported) weights.

A directory holding::

  model.json     {"format": "beitv2_jax.variables", "version": 1, "model_kind": "vit" | "beit_pretrain" | "vqkd",
                  "model_config": {...}, "collections": ["params", ...], "info": {...},
                  "preprocessing": {"image_size", "crop_pct", "mean", "std", "interpolation"}}
  variables/     an orbax checkpoint of {"params": ..., ["codebook": ...]} (plain arrays, no partition boxes)

``preprocessing`` is what an image needs before the model sees it (shorter side resized to
``int(image_size / crop_pct)`` with ``interpolation``, centre crop to ``image_size``, ``/ 255``, then
``(x - mean) / std``); every directory written here has it (``default_preprocessing`` when the writer gives none),
and directories written before it existed get the same defaults when read (:func:`read_preprocessing`).

Rebuild the model with ``model_shapes.build_model(model_kind, model_config)`` and apply it to ``variables``.
Writes are atomic: everything goes to a temporary sibling directory that is renamed into place at the end,
so a crashed or interrupted save never leaves a half-written directory under the final name. Object stores
(``gs://``) cannot rename a directory atomically: there the directory is written in place and ``model.json``,
written last, is the commit marker (a directory without it is not read as a model).
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Mapping, Optional

import numpy as np

from beitv2_jax import storage

FORMAT = "beitv2_jax.variables"
VERSION = 1
MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"


def _plain_tree(variables: Mapping[str, Any]) -> dict:
    import flax.linen as nn
    import jax

    return jax.tree.map(np.asarray, nn.meta.unbox(dict(variables)))


# Defaults for directories without a ``preprocessing`` entry: the evaluation transform of the data pipeline
# (``data.pipeline.make_eval_transform``: shorter side to int(size / 0.875), bicubic, centre crop). Encoders take
# ImageNet-normalised images; the VQ-KD tokenizer takes [0, 1] images (it rescales to [-1, 1] itself) and the
# DALL-E encoder of BEiT v1 takes [0, 1] too (its logit-Laplace mapping is inside the model).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875
DEFAULT_INTERPOLATION = "bicubic"
UNIT_RANGE_KINDS = ("vqkd", "dvae")


def _model_image_size(model_kind: str, model_config: Mapping[str, Any]) -> int:
    backbone = model_config.get("backbone")
    size = (backbone or {}).get("image_size") if isinstance(backbone, Mapping) else None
    return int(size or model_config.get("image_size") or 224)


def default_preprocessing(model_kind: str, model_config: Mapping[str, Any]) -> dict:
    """The preprocessing a ``model_kind`` directory without one is read with (see the module docstring)."""
    unit = model_kind in UNIT_RANGE_KINDS
    return {"image_size": _model_image_size(model_kind, model_config), "crop_pct": DEFAULT_CROP_PCT,
            "mean": [0.0, 0.0, 0.0] if unit else list(IMAGENET_MEAN),
            "std": [1.0, 1.0, 1.0] if unit else list(IMAGENET_STD), "interpolation": DEFAULT_INTERPOLATION}


def check_preprocessing(preprocessing: Mapping[str, Any], model_kind: str, model_config: Mapping[str, Any]) -> dict:
    """``preprocessing`` completed with the defaults and checked (sizes positive, 0 < crop_pct <= 1, 3 means and
    3 positive stds, a known interpolation)."""
    out = dict(default_preprocessing(model_kind, model_config), **dict(preprocessing or {}))
    unknown = sorted(set(out) - {"image_size", "crop_pct", "mean", "std", "interpolation"})
    if unknown:
        raise ValueError(f"unknown preprocessing fields {unknown}")
    out["image_size"], out["crop_pct"] = int(out["image_size"]), float(out["crop_pct"])
    out["mean"], out["std"] = [float(v) for v in out["mean"]], [float(v) for v in out["std"]]
    if out["image_size"] < 1 or not 0 < out["crop_pct"] <= 1:
        raise ValueError(f"preprocessing needs image_size >= 1 and 0 < crop_pct <= 1, got {out}")
    if len(out["mean"]) != 3 or len(out["std"]) != 3 or min(out["std"]) <= 0:
        raise ValueError(f"preprocessing needs 3 means and 3 positive stds, got {out}")
    if out["interpolation"] not in ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"):
        raise ValueError(f"unknown preprocessing interpolation {out['interpolation']!r}")
    return out


def read_preprocessing(description: Mapping[str, Any]) -> dict:
    """The preprocessing of a directory's description (``model.json``), defaults for older directories."""
    return check_preprocessing(description.get("preprocessing") or {}, description["model_kind"],
                               description["model_config"])


# Kinds stored in this format that the PyTorch layouts of ``model_shapes`` do not cover (``dvae``: the DALL-E
# encoder of ``models/dvae.py``, converted by ``convert/family.py``).
EXTRA_KINDS = ("dvae",)


def save_variables(directory: str, variables: Mapping[str, Any], model_kind: str, model_config: Mapping[str, Any],
                   *, info: Optional[Mapping[str, Any]] = None, overwrite: bool = True,
                   preprocessing: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``variables`` (``{'params': ..., ['codebook': ...]}``) and the model description to ``directory``.

    ``info`` is free-form provenance (source file, format, ...); ``preprocessing`` the input transform (missing
    fields take :func:`default_preprocessing`). An existing ``directory`` is replaced
    (the new one is complete before the old one is moved aside); ``overwrite=False`` refuses instead.
    """
    import jax

    from beitv2_jax.convert.model_shapes import MODEL_KINDS

    kinds = MODEL_KINDS + EXTRA_KINDS
    if model_kind not in kinds:
        raise ValueError(f"model_kind must be one of {kinds}, got {model_kind!r}")
    if "params" not in variables:
        raise ValueError(f"variables need a 'params' collection, got {sorted(variables)}")
    directory = storage.abspath(directory)
    if storage.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists (refusing to replace it: overwrite=False)")
    tree = _plain_tree(variables)
    preprocessing = check_preprocessing(preprocessing or {}, model_kind, model_config)
    if jax.process_count() == 1:
        return _write_directory(directory, tree, model_kind, model_config, info, preprocessing)
    # Several processes (multi-host): the arrays are host-local copies on every process; process 0 writes and
    # the others wait for it, so no two processes race on the same rename.
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        _write_directory(directory, tree, model_kind, model_config, info, preprocessing)
    multihost_utils.sync_global_devices(f"beitv2_jax.store.save_variables:{directory}")
    return directory


def _write_directory(directory: str, tree: dict, model_kind: str, model_config: Mapping[str, Any],
                     info: Optional[Mapping[str, Any]], preprocessing: Mapping[str, Any]) -> str:
    """Write this process's copy of ``tree`` and the description (atomic rename; only this process takes part)."""
    import jax
    import orbax.checkpoint as ocp

    description = {"format": FORMAT, "version": VERSION, "model_kind": model_kind,
                   "model_config": json.loads(json.dumps(dict(model_config))), "collections": sorted(tree),
                   "info": dict(info or {}), "preprocessing": dict(preprocessing)}

    def write_into(target: str) -> None:
        me = jax.process_index()  # orbax must not wait for processes that do not write
        options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        with ocp.StandardCheckpointer(multiprocessing_options=options) as checkpointer:
            checkpointer.save(storage.join(target, VARIABLES_DIR), tree)
        storage.write_json(storage.join(target, MODEL_JSON), description, indent=2, sort_keys=True)  # the commit

    if storage.is_remote(directory):  # no atomic rename: replace in place, model.json (written last) commits it
        if storage.exists(directory):
            storage.rmtree(directory)
        write_into(directory)
        return directory
    parent = storage.dirname(directory)
    storage.makedirs(parent)
    tag = uuid.uuid4().hex[:8]
    tmp = storage.join(parent, f".{storage.basename(directory)}.tmp-{tag}")
    try:
        storage.makedirs(tmp)
        write_into(tmp)
        if storage.exists(directory):
            old = storage.join(parent, f".{storage.basename(directory)}.old-{tag}")
            storage.rename(directory, old)
            storage.rename(tmp, directory)
            storage.rmtree(old, ignore_errors=True)
        else:
            storage.rename(tmp, directory)
    finally:
        if storage.exists(tmp):
            storage.rmtree(tmp, ignore_errors=True)
    return directory


def read_description(directory: str) -> dict:
    path = storage.join(directory, MODEL_JSON)
    if not storage.isfile(path):
        raise FileNotFoundError(f"{directory} is not a converted-weights directory (no {MODEL_JSON})")
    description = storage.read_json(path)
    if description.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {description.get('format')!r}")
    if description.get("version", 0) > VERSION:
        raise ValueError(f"{path}: version {description['version']} is newer than this code ({VERSION})")
    return description


def load_variables(directory: str) -> tuple:
    """``(variables, model_kind, model_config)``; variables are numpy arrays (``{'params': ..., ...}``)."""
    import jax
    import orbax.checkpoint as ocp

    directory = storage.abspath(directory)
    description = read_description(directory)
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(storage.join(directory, VARIABLES_DIR))
    variables = jax.tree.map(np.asarray, tree)
    return variables, description["model_kind"], description["model_config"]
