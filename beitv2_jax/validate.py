"""Config validation before any compute: one clear line naming the key and what is allowed.

Checks, in order: unknown keys and wrong types (against the recipe in ``beitv2_jax.recipes`` that defines the
task's config), impossible values (masked patches, batch vs mesh, layers, ...), the files a run needs (tokenizer /
teacher checkpoint, a non-empty dataset) and, with a workdir, that it does not hold a run with another config.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Optional

import ml_collections

from beitv2_jax import storage

ConfigDict = ml_collections.ConfigDict

# Keys the tasks read with ``config.get`` that the recipes do not set: {task: {section: {key: allowed types}}}.
_RUN_OPTIONAL = {"inject_nan_steps": (list, tuple), "logical_axis_rules": (list, tuple)}
OPTIONAL_KEYS = {
    "pretrain": {"": _RUN_OPTIONAL, "model": {"init_std": (int, float)}, "optim": {"warmup_steps": (int,)}},
    "ibot": {"": _RUN_OPTIONAL},
    "segment": {"": _RUN_OPTIONAL},
    "vqkd": {"": _RUN_OPTIONAL, "model": {"decoder_width": (int,), "decoder_heads": (int,),
                                          "drop_path_rate": (int, float)}, "optim": {"warmup_steps": (int,)}},
}
# Keys that may change between the runs of one workdir (they do not change the results; the data iterator's
# checkpointed state is the global batch index, the same for any num_workers and any process count).
OPERATIONAL_KEYS = frozenset({"allow_config_change", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                              "max_bad_steps", "divergence_factor", "inject_nan_steps", "num_workers", "read_threads",
                              "prefetch_batches", "compilation_cache_dir", "profile", "dcn_data"})
DTYPES = ("float32", "bfloat16")
INTERPOLATIONS = ("bicubic", "bilinear", "lanczos", "nearest")
TEACHER_KINDS = ("clip", "dino", "vit_checkpoint")
TOKENIZER_KINDS = ("vqkd", "dvae")
DEMO_STAGES = ("ibot", "vqkd", "pretrain")
# Data keys every demo stage shares with the demo's evaluation (a per-stage value would break the chain).
SHARED_DEMO_DATA_KEYS = ("input_size", "second_input_size", "patch_size")
SEGMENT_MODES = ("slide", "whole")
TARGETS = ("hard", "multi_choice")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _reference(task: str) -> Optional[Callable[[], ConfigDict]]:
    """The recipe that defines ``task``'s config keys and types, if known."""
    from beitv2_jax import recipes

    return {"pretrain": recipes.beitv2_pretrain, "vqkd": recipes.vqkd, "finetune": recipes.beitv2_finetune,
            "linear_probe": recipes.linear_probe, "knn": recipes.knn_eval, "ibot": recipes.ibot,
            "segment": recipes.beitv2_segment}.get(task)


# ---------------------------------------------------------------------------------------------------------------
# Unknown keys and types.
# ---------------------------------------------------------------------------------------------------------------


def _type_name(types: tuple) -> str:
    return " or ".join(t.__name__ for t in types)


def _allowed_types(reference: ConfigDict, key: str) -> tuple:
    """The types a value of ``reference[key]`` may have (ints are accepted for floats, lists for tuples)."""
    expected = reference.get_type(key)
    if expected is type(None):  # an untyped None in the recipe: anything goes
        return (object,)
    if expected is float:
        return (int, float)
    if expected in (list, tuple):
        return (list, tuple)
    return (expected,)


def _type_ok(value: Any, types: tuple) -> bool:
    if value is None:
        return True  # placeholders (e.g. data_dir, max_mask_patches_per_block) are optional
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def check_keys(config: ConfigDict, reference: ConfigDict, path: str = "config", optional: Optional[dict] = None,
               section: str = "") -> None:
    """Every key of ``config`` exists in ``reference`` (or in ``optional[section]``, see ``OPTIONAL_KEYS``) with a
    value of the same type; ``path`` names ``config`` in messages."""
    extra = (optional or {}).get(section, {})
    for key in config.keys():
        name, value = f"{path}.{key}", config[key]
        if key not in reference:
            _require(key in extra, f"unknown config key {name!r}; allowed keys in {path}: "
                                   f"{', '.join(sorted(set(reference.keys()) | set(extra)))}")
            _require(_type_ok(value, extra[key]), f"{name} must be {_type_name(extra[key])}, got {value!r}")
        elif isinstance(reference[key], ConfigDict):
            _require(isinstance(value, ConfigDict), f"{name} must be a section (ConfigDict), got {value!r}")
            check_keys(value, reference[key], name, optional, f"{section}.{key}".lstrip("."))
        else:
            types = _allowed_types(reference, key)
            _require(_type_ok(value, types), f"{name} must be {_type_name(types)}, got {value!r} "
                                             f"({type(value).__name__})")


def check_demo_keys(config: ConfigDict) -> None:
    """Demo: the run-level keys of ``recipes.base_run``, free-form sections, stage sections per their recipe."""
    from beitv2_jax import recipes

    base = recipes.base_run("demo")
    for key in config.keys():
        if key in DEMO_STAGES:
            check_keys(config[key], _reference(key)(), f"config.{key}", OPTIONAL_KEYS[key])
        elif key not in base:
            _require(isinstance(config[key], ConfigDict),
                     f"unknown config key 'config.{key}'; allowed run-level keys: {', '.join(sorted(base.keys()))}")
    scalars = ConfigDict({k: config[k] for k in base.keys() if k in config})
    check_keys(scalars, base)


# ---------------------------------------------------------------------------------------------------------------
# Values.
# ---------------------------------------------------------------------------------------------------------------


def _positive_int(config, key: str, path: str = "config") -> None:
    value = config.get(key)
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             f"{path}.{key} must be a positive integer, got {value!r}")


def _one_of(config, key: str, allowed: tuple, path: str = "config") -> None:
    value = config.get(key)
    _require(value in allowed, f"{path}.{key} must be one of {allowed}, got {value!r}")


def check_finite(config: ConfigDict, path: str = "config") -> None:
    """No float anywhere in ``config`` is NaN or infinite (``--config.optim.lr=nan`` trains into NaN parameters)."""
    import math

    for key in config.keys():
        value = config[key]
        if isinstance(value, ConfigDict):
            check_finite(value, f"{path}.{key}")
        elif isinstance(value, float):
            _require(math.isfinite(value), f"{path}.{key} must be a finite number, got {value!r}")


# (section, key) → (low, high, low_inclusive, high_inclusive); only checked where the key exists.
RANGES = {
    ("optim", "lr"): (0.0, None, False, True), ("optim", "min_lr"): (0.0, None, True, True),
    ("optim", "warmup_epochs"): (0.0, None, True, True), ("optim", "warmup_steps"): (0.0, None, True, True),
    ("optim", "weight_decay"): (0.0, None, True, True), ("optim", "weight_decay_end"): (0.0, None, True, True),
    ("optim", "b1"): (0.0, 1.0, True, False), ("optim", "b2"): (0.0, 1.0, True, False),
    ("optim", "eps"): (0.0, None, False, True), ("optim", "clip_grad"): (0.0, None, True, True),
    ("optim", "layer_decay"): (0.0, 1.0, False, True), ("optim", "momentum"): (0.0, 1.0, True, False),
    ("model", "drop_path_rate"): (0.0, 1.0, True, False), ("model", "layer_scale_init"): (0.0, None, True, True),
    ("data", "num_workers"): (0, None, True, True), ("data", "read_threads"): (1, None, True, True),
    ("data", "prefetch_batches"): (1, None, True, True), ("data", "color_jitter"): (0.0, None, True, True),
    ("", "divergence_factor"): (0.0, None, True, True), ("", "num_epochs"): (0, None, False, True),
}


def check_ranges(config: ConfigDict, path: str = "config") -> None:
    """The numbers of ``RANGES`` lie in their ranges (a negative lr or worker count, drop path >= 1, ...)."""
    for (section, key), (low, high, low_in, high_in) in RANGES.items():
        node = config.get(section) if section else config
        if not isinstance(node, ConfigDict) or node.get(key) is None or isinstance(node.get(key), bool):
            continue
        value, name = node[key], f"{path}.{section + '.' if section else ''}{key}"
        if not isinstance(value, (int, float)):
            continue  # wrong types are reported by check_keys
        ok = (value >= low if low_in else value > low) and (high is None or (value <= high if high_in else value < high))
        span = (f"{'[' if low_in else '('}{low}, {'∞)' if high is None else str(high) + (']' if high_in else ')')}")
        _require(ok, f"{name}={value!r} must be in {span}")
    _require(config.get("divergence_factor") in (None, 0, 0.0) or config.get("divergence_factor") > 1,
             f"{path}.divergence_factor={config.get('divergence_factor')!r} must be 0 (off) or > 1")


def validate_data(data: ConfigDict, masking: bool = True) -> None:
    for key in ("input_size", "patch_size"):
        _positive_int(data, key, "config.data")
    _require(data.input_size % data.patch_size == 0,
             f"config.data.input_size={data.input_size} must be a multiple of config.data.patch_size="
             f"{data.patch_size}")
    num_patches = (data.input_size // data.patch_size) ** 2
    _require(not masking or 0 < data.num_masked_patches <= num_patches,
             f"config.data.num_masked_patches={data.num_masked_patches} must be in [1, {num_patches}] "
             f"(the number of patches)")
    for key in ("interpolation", "second_interpolation"):
        _one_of(data, key, INTERPOLATIONS, "config.data")
    for key in ("min_crop_scale", "tokenizer_min_crop_scale"):
        value = data.get(key, 1.0)
        _require(isinstance(value, (int, float)) and 0 < value <= 1, f"config.data.{key}={value!r} must be in (0, 1]")


def validate_batch(config: ConfigDict) -> None:
    """Batch sizes against the mesh (which must match the device count) and the process count."""
    import jax

    from beitv2_jax.train import sharding

    _positive_int(config, "batch_size")
    try:
        mesh_shape = sharding.mesh_shape(config.get("mesh"), jax.device_count())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp = mesh_shape[0] * mesh_shape[1]
    # Each process feeds its own rows of the batch (sharding.to_global_batch): the batch axes must split over the
    # processes, else rows of different processes land on devices that hold the same replica (silently wrong).
    _require(dp % jax.process_count() == 0,
             f"config.mesh data×fsdp = {mesh_shape[0]}×{mesh_shape[1]} = {dp} must be a multiple of the "
             f"{jax.process_count()} processes (each process feeds its own batch rows); move devices from "
             f"config.mesh.tensor to data or fsdp")
    for key in ("batch_size", "eval_batch_size"):
        value = config.get(key) or 0
        _require(value % dp == 0, f"config.{key}={value} is not divisible by the data-parallel size {dp} "
                                  f"(config.mesh data×fsdp = {mesh_shape[0]}×{mesh_shape[1]})")
        _require(value % jax.process_count() == 0,
                 f"config.{key}={value} is not divisible by the {jax.process_count()} processes")


def validate_run_settings(config: ConfigDict) -> None:
    """Step counts, checkpointing and the guard: positive where a count, known names where a choice."""
    for key in ("num_epochs", "num_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                "max_bad_steps"):
        if key in config:
            _positive_int(config, key)
    for key in ("steps_per_epoch", "min_steps", "eval_batch_size", "eval_every_steps"):
        value = config.get(key) or 0
        _require(isinstance(value, int) and value >= 0, f"config.{key} must be an integer >= 0, got {value!r}")
    if "dtype" in config:
        _one_of(config, "dtype", DTYPES)
    profile = config.get("profile") or ()
    _require(len(profile) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in profile)
             and 1 <= profile[0] <= profile[1] or not profile,
             f"config.profile must be () or (first_step, last_step) with 1 <= first_step <= last_step, got "
             f"{tuple(profile)!r}")
    cache = config.get("compilation_cache_dir", "")
    _require(isinstance(cache, str), f"config.compilation_cache_dir must be 'auto', '' (off) or a directory, "
                                     f"got {cache!r}")
    steps = config.get("inject_nan_steps") or ()
    _require(all(isinstance(s, int) and s > 0 for s in steps),
             f"config.inject_nan_steps must be a list of step numbers >= 1, got {steps!r}")


def validate_pretrain(config: ConfigDict, data: ConfigDict, standalone: bool) -> None:
    m = config.model
    if m.head_layers > 0:
        _require(1 <= m.early_layers < m.depth,
                 f"config.model.early_layers={m.early_layers} must be in [1, depth-1] = [1, {m.depth - 1}] "
                 f"(config.model.depth={m.depth})")
    _require(m.width % m.num_heads == 0,
             f"config.model.width={m.width} must be divisible by config.model.num_heads={m.num_heads}")
    _require(m.get("patch_size", data.patch_size) == data.patch_size,
             f"config.model.patch_size={m.get('patch_size')} must equal config.data.patch_size={data.patch_size} "
             f"(the mask generator's grid)")
    tokenizer = config.get("tokenizer") or ConfigDict()
    if "kind" in tokenizer:
        _one_of(tokenizer, "kind", TOKENIZER_KINDS, "config.tokenizer")
    if "targets" in config:
        _one_of(config, "targets", TARGETS)
    if config.get("targets") == "multi_choice":
        mc = config.multi_choice
        _require(0.0 <= mc.omega <= 1.0, f"config.multi_choice.omega={mc.omega} must be in [0, 1]")
        for key in ("tokenizer_temperature", "similarity_temperature"):
            _require(mc[key] > 0, f"config.multi_choice.{key}={mc[key]} must be > 0")
    if standalone:
        num_patches = (data.input_size // data.patch_size) ** 2
        validate_tokenizer(tokenizer.checkpoint, m.vocab_size, data.second_input_size,
                           tokenizer.get("kind", "vqkd"), num_patches)


def validate_tokenizer(directory: str, vocab_size: int, image_size: int, kind: str = "vqkd",
                       num_patches: Optional[int] = None) -> None:
    """The tokenizer directory exists, holds a tokenizer of ``kind`` (vqkd | dvae), and matches the vocabulary,
    the image size (VQ-KD) or the patch grid (dVAE: second_input_size / 8 per side = the backbone's grid)."""
    from beitv2_jax.convert import store

    made_by = {"vqkd": "the vqkd task (<workdir>/tokenizer) or by `python -m beitv2_jax.convert --format "
                       "official_vqkd`",
               "dvae": "`python -m beitv2_jax.convert.family dalle_encoder --input encoder.pkl --output DIR`"}[kind]
    _require(bool(directory) and storage.isdir(directory),
             f"config.tokenizer.checkpoint={directory!r} is not a directory: give the tokenizer written by {made_by}")
    try:
        description = store.read_description(directory)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.tokenizer.checkpoint={directory!r} is not a tokenizer: {e}") from None
    cfg = description.get("model_config", {})
    _require(description.get("model_kind") == kind,
             f"config.tokenizer.checkpoint={directory!r} holds a {description.get('model_kind')!r} model, "
             f"not a {kind!r} tokenizer (config.tokenizer.kind={kind!r})")
    codes = cfg.get("num_codes", cfg.get("vocab_size"))
    _require(codes in (None, vocab_size), f"config.model.vocab_size={vocab_size} must equal the tokenizer's "
                                          f"{codes} codes (config.tokenizer.checkpoint={directory!r})")
    if kind == "vqkd":
        size = cfg.get("image_size")
        _require(size in (None, image_size), f"config.data.second_input_size={image_size} must equal the "
                                             f"tokenizer's image size {size} (config.tokenizer.checkpoint={directory!r})")
    elif num_patches is not None:
        stride = 2 ** (cfg.get("group_count", 4) - 1)
        tokens = (image_size // stride) ** 2
        _require(image_size % stride == 0 and tokens == num_patches,
                 f"config.data.second_input_size={image_size} gives {tokens} dVAE tokens (stride {stride}) but the "
                 f"backbone has {num_patches} patches; use second_input_size = {stride} × the patch grid side")


def validate_ibot(config: ConfigDict) -> None:
    data, m, crops, masking = config.data, config.model, config.crops, config.masking
    _require(m.width % m.num_heads == 0,
             f"config.model.width={m.width} must be divisible by config.model.num_heads={m.num_heads}")
    _require(m.get("patch_size", data.patch_size) == data.patch_size,
             f"config.model.patch_size={m.get('patch_size')} must equal config.data.patch_size={data.patch_size}")
    _positive_int(crops, "num_global", "config.crops")
    _require(isinstance(crops.num_local, int) and crops.num_local >= 0,
             f"config.crops.num_local must be an integer >= 0, got {crops.num_local!r}")
    _require(crops.num_local == 0 or crops.local_size % data.patch_size == 0,
             f"config.crops.local_size={crops.local_size} must be a multiple of config.data.patch_size="
             f"{data.patch_size}")
    _one_of(masking, "pred_shape", ("block", "rand"), "config.masking")
    _require(len(masking.pred_ratio) == len(masking.pred_ratio_var) > 0,
             f"config.masking.pred_ratio {list(masking.pred_ratio)} and pred_ratio_var "
             f"{list(masking.pred_ratio_var)} must be non-empty lists of the same length")
    for r, v in zip(masking.pred_ratio, masking.pred_ratio_var):
        _require(0 <= r - v and r + v < 1, f"config.masking: pred_ratio {r} ± pred_ratio_var {v} must stay in [0, 1)")
    h = config.head
    _require(h.num_layers >= 2, f"config.head.num_layers={h.num_layers} must be >= 2")


def validate_segment(config: ConfigDict) -> None:
    """Segmentation settings: classes, feature blocks, augmentation ranges, evaluation mode and stride."""
    m, seg, ev, o = config.model, config.segmentation, config.eval, config.optim
    _positive_int(m, "num_classes", "config.model")
    _require(m.num_classes <= seg.ignore_index or seg.ignore_index < 0,
             f"config.model.num_classes={m.num_classes} must not reach config.segmentation.ignore_index="
             f"{seg.ignore_index}")
    _require(len(m.out_indices) == 4, f"config.model.out_indices must name 4 blocks, got {list(m.out_indices)}")
    _require(0 <= m.aux_in_index < 4, f"config.model.aux_in_index={m.aux_in_index} must be in [0, 3]")
    _require(len(seg.img_scale) == 2 and all(isinstance(v, int) and v > 0 for v in seg.img_scale),
             f"config.segmentation.img_scale must be two positive integers, got {list(seg.img_scale)}")
    lo, hi = seg.ratio_range
    _require(0 < lo <= hi, f"config.segmentation.ratio_range={list(seg.ratio_range)} must satisfy 0 < low <= high")
    _require(0 < seg.cat_max_ratio <= 1, f"config.segmentation.cat_max_ratio={seg.cat_max_ratio} must be in (0, 1]")
    _require(0 <= seg.hflip <= 1, f"config.segmentation.hflip={seg.hflip} must be in [0, 1]")
    _one_of(ev, "mode", SEGMENT_MODES, "config.eval")
    _positive_int(ev, "stride", "config.eval")
    _require(ev.stride <= config.data.input_size, f"config.eval.stride={ev.stride} must not exceed the crop "
                                                  f"config.data.input_size={config.data.input_size}")
    _require(len(ev.img_scale) == 2 and all(isinstance(v, int) and v > 0 for v in ev.img_scale),
             f"config.eval.img_scale must be two positive integers, got {list(ev.img_scale)}")
    _require(isinstance(ev.num_images, int) and ev.num_images >= 0,
             f"config.eval.num_images must be an integer >= 0, got {ev.num_images!r}")
    _require(isinstance(o.warmup_steps, int) and o.warmup_steps >= 0,
             f"config.optim.warmup_steps must be an integer >= 0, got {o.warmup_steps!r}")
    _require(0 < o.layer_decay <= 1, f"config.optim.layer_decay={o.layer_decay} must be in (0, 1]")


def validate_vqkd(config: ConfigDict, standalone: bool) -> None:
    _one_of(config.teacher, "kind", TEACHER_KINDS, "config.teacher")
    if standalone:
        ckpt = config.teacher.checkpoint
        _require(bool(ckpt) and storage.isdir(ckpt),
                 f"config.teacher.checkpoint={ckpt!r} is not a directory: convert a teacher with "
                 f"`python -m beitv2_jax.convert` or point to a ViT checkpoint written by this project")


def validate_dataset(config: ConfigDict, splits: tuple, labels: bool = False, whole_batch: bool = True,
                     path: str = "config", task: str = "") -> None:
    """Each split opens (its name resolved: ``sources.resolve_split``) and holds at least one record (and a whole
    batch when ``whole_batch`` and steps_per_epoch is derived); with ``labels`` the dataset has class labels."""
    from beitv2_jax.data import sources

    data = config.data
    if labels:
        try:
            labelled = sources.has_labels(data.dataset, data.data_dir)
        except FileNotFoundError as e:
            raise ConfigError(f"{path}.data.dataset={data.dataset!r}: {' '.join(str(e).split())}") from None
        _require(labelled, f"{path}.data.dataset={data.dataset!r} has no labels (an unlabelled image folder): the "
                           f"{task or config.get('task')} task needs class labels; prepare a folder of class "
                           f"sub-folders (docs/own_data.md)")
    for split_key in splits:
        split = data[split_key]
        where = f"{path}.data.dataset={data.dataset!r}, {path}.data.{split_key}={split!r}"
        try:
            size = len(sources.open_source(data.dataset, split, data.data_dir))
        except FileNotFoundError as e:
            raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None
        _require(size > 0, f"{where}: the split is empty (data_dir={data.data_dir!r})")
        if whole_batch and split_key == "train_split" and not config.get("steps_per_epoch"):
            _require(size >= config.batch_size,
                     f"config.batch_size={config.batch_size} is larger than the {size} records of {where}; lower it "
                     f"or set config.steps_per_epoch")


def validate_stage(config: ConfigDict, task: str, parent: Optional[ConfigDict] = None) -> None:
    """Values of one training task's config (``parent``: the demo config whose data/mesh/batch it uses)."""
    run = parent or config
    path = f"config.{task}" if parent is not None else "config"
    check_finite(config, path)
    check_ranges(config, path)
    if parent is not None:
        check_finite(parent)
        check_ranges(parent)
    validate_data(run.data, masking=task in ("pretrain", "demo"))
    validate_batch(run)
    validate_run_settings(config)
    if task == "ibot":
        validate_ibot(config)
    elif task == "pretrain":
        validate_pretrain(config, run.data, standalone=parent is None)
    elif task == "vqkd":
        validate_vqkd(config, standalone=parent is None)
    elif task in ("finetune", "linear_probe", "knn"):
        validate_pretrained(config)
    elif task == "segment":
        validate_segment(config)
        if parent is None:
            validate_pretrained(config)
    if task in ("finetune", "segment") and "model" in config:
        from beitv2_jax.models import relpos

        method = config.model.get("rel_pos_interpolation", "official_cubic")
        _require(method in relpos.RESIZE_METHODS,
                 f"config.model.rel_pos_interpolation={method!r} must be one of {relpos.RESIZE_METHODS}")


def validate_pretrained(config: ConfigDict) -> None:
    """The encoder to evaluate must exist: a directory of ours, a Hugging Face folder, a PyTorch file (its
    ``format`` detected or given) or an official name (``beitv2_jax.registry``)."""
    from beitv2_jax import registry

    ckpt = config.pretrained.get("checkpoint") or ""
    _require(bool(ckpt) and (storage.exists(ckpt) or ckpt in registry.REGISTRY),
             f"config.pretrained.checkpoint={ckpt!r} does not exist: give a model directory written by a training "
             f"task or `python -m beitv2_jax.convert`, a .pth/.safetensors file (config.pretrained.format is "
             f"detected when empty) or an official name from beitv2_jax.registry.names()")


def validate_config(config: ConfigDict, workdir: Optional[str] = None) -> None:
    """Raise ``ConfigError`` (one line naming the key) for anything that cannot work, before any compute."""
    task = config.get("task")
    if task == "demo":
        check_demo_keys(config)
        validate_run_settings(config)
        _require(not config.get("profile"), f"config.profile={tuple(config.profile)!r} is per stage in the demo: "
                                            f"use --config.pretrain.profile (or ibot / vqkd) instead")
        from beitv2_jax import recipes

        for stage in DEMO_STAGES:  # as the stage will run: the demo's data / batch with the stage's keys on top
            resolved = recipes.demo_stage(config[stage], config)
            for key in SHARED_DEMO_DATA_KEYS:
                _require(resolved.data[key] == config.data[key],
                         f"config.{stage}.data.{key}={resolved.data[key]!r} differs from config.data.{key}="
                         f"{config.data[key]!r}: the stages chain (teacher → tokenizer → encoder) and are "
                         f"evaluated at one size; set config.data.{key} instead")
            validate_stage(resolved, stage, parent=resolved)
        if "segment" in config:  # its own data (the masks) and batch; the encoder comes from the pretrain stage
            check_keys(config.segment, _reference("segment")(), "config.segment", OPTIONAL_KEYS["segment"])
            validate_stage(config.segment, "segment", parent=config.segment)
    else:
        reference = _reference(task)
        if reference is not None:
            check_keys(config, reference(), optional=OPTIONAL_KEYS.get(task))
        validate_stage(config, task)
    check_data(config)
    if workdir:
        check_workdir(config, workdir)


def data_needs(config: ConfigDict, task: str) -> tuple[tuple, bool, bool]:
    """What ``task`` reads: ``(split keys, needs labels, needs a whole train batch)``."""
    if task in ("knn",):
        return ("train_split", "eval_split"), True, False
    if task in ("linear_probe", "finetune"):
        return ("train_split", "eval_split"), True, True
    if task == "segment":
        return ("train_split", "eval_split"), False, True
    if task == "vqkd" and config.get("eval_every_epochs", 1):
        return ("train_split", "eval_split"), False, True
    if task == "ibot" and config.get("knn_at_end"):
        return ("train_split", "eval_split"), True, True
    return ("train_split",), False, True


def check_data(config: ConfigDict) -> None:
    """Every task's data before any compute: the dataset is prepared, its splits resolve and are not empty, it has
    labels where the task needs them (k-NN, probes, fine-tuning, the demo's evaluation). The demo checks its
    evaluation data and each stage's own (``demo.stage_config``: the top-level data with the stage's keys on top);
    its segmentation stage runs (and is checked) on the built-in data only."""
    task = config.get("task")
    if "data" not in config:
        return
    if task != "demo":
        splits, labels, whole = data_needs(config, task)
        validate_dataset(config, splits, labels, whole)
        return
    from beitv2_jax import recipes
    from beitv2_jax.data import sources

    validate_dataset(config, ("train_split", "eval_split"), labels=True, task="demo evaluation")
    for stage in DEMO_STAGES:
        resolved = recipes.demo_stage(config[stage], config)
        splits, labels, whole = data_needs(resolved, stage)
        validate_dataset(resolved, splits, labels, whole, path=f"config.{stage}", task=stage)
    if "segment" in config and config.data.dataset == sources.DEMO_NAME:
        validate_dataset(config.segment, ("train_split", "eval_split"), path="config.segment")



# ---------------------------------------------------------------------------------------------------------------
# The workdir's previous config.
# ---------------------------------------------------------------------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def config_changes(previous: dict, current: dict) -> list[str]:
    """``['optim.lr: 0.001 → 0.002', ...]`` for the keys (dotted) that differ, operational keys excluded. A key that
    a newer version added at its "off" value (``None``, ``0``: e.g. ``min_steps``, the demo's unset stage data) is
    no change to a run written before it existed."""
    old, new = _flatten(previous), _flatten(current)
    added_off = {k for k in set(new) - set(old) if new[k] is None or (new[k] == 0 and not isinstance(new[k], bool))}
    keys = sorted(k for k in set(old) | set(new)
                  if old.get(k) != new.get(k) and k.rsplit(".", 1)[-1] not in OPERATIONAL_KEYS and k not in added_off)
    return [f"{k}: {old.get(k, '<absent>')!r} → {new.get(k, '<absent>')!r}" for k in keys]


def check_workdir(config: ConfigDict, workdir: str) -> None:
    """Refuse a ``workdir`` whose ``config.json`` differs (beyond operational keys) unless
    ``config.allow_config_change``."""
    path = storage.join(workdir, "config.json")
    if not storage.exists(path) or config.get("allow_config_change", False):
        return
    previous = storage.read_json(path)
    changes = config_changes(previous, json.loads(config.to_json_best_effort(sort_keys=True)))
    if changes:
        shown = "; ".join(f"config.{c}" for c in changes[:5]) + ("; ..." if len(changes) > 5 else "")
        raise ConfigError(f"--workdir {workdir} holds a run with a different config ({shown}); use another "
                          f"--workdir or pass --config.allow_config_change=True to continue it anyway")
