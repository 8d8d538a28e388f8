"""Config validation before any compute: one clear line naming the key and what is allowed."""
from __future__ import annotations

import os

import ml_collections


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _positive_int(config, key: str) -> None:
    value = config.get(key)
    _require(isinstance(value, int) and value > 0, f"config.{key} must be a positive integer, got {value!r}")


def validate_data(data: ml_collections.ConfigDict) -> None:
    for key in ("input_size", "patch_size"):
        _positive_int(data, key)
    _require(data.input_size % data.patch_size == 0,
             f"config.data.input_size={data.input_size} must be a multiple of config.data.patch_size="
             f"{data.patch_size}")
    num_patches = (data.input_size // data.patch_size) ** 2
    _require(0 < data.num_masked_patches <= num_patches,
             f"config.data.num_masked_patches={data.num_masked_patches} must be in [1, {num_patches}] "
             f"(the number of patches)")


def validate_batch(config: ml_collections.ConfigDict) -> None:
    import jax

    from beitv2_jax.train import sharding

    _positive_int(config, "batch_size")
    try:
        mesh_shape = sharding.mesh_shape(config.get("mesh"), jax.device_count())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp = mesh_shape[0] * mesh_shape[1]
    _require(config.batch_size % dp == 0,
             f"config.batch_size={config.batch_size} is not divisible by the data-parallel size {dp} "
             f"(mesh data×fsdp)")
    _require(config.batch_size % jax.process_count() == 0,
             f"config.batch_size={config.batch_size} is not divisible by the {jax.process_count()} processes")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ``ConfigError`` for impossible values of the chosen task's config."""
    task = config.get("task")
    if task == "demo":
        for stage in ("vqkd", "pretrain"):
            validate_config_stage(config[stage], stage, parent=config)
        validate_data(config.data)
        validate_batch(config)
        return
    validate_config_stage(config, task)


def validate_config_stage(config, task: str, parent=None) -> None:
    data = (parent or config).data
    validate_data(data)
    validate_batch(parent or config)
    _positive_int(config, "num_epochs")
    if task == "pretrain":
        m = config.model
        if m.head_layers > 0:
            _require(1 <= m.early_layers < m.depth,
                     f"config.model.early_layers={m.early_layers} must be in [1, depth-1] = [1, {m.depth - 1}]")
        _require(m.width % m.num_heads == 0,
                 f"config.model.width={m.width} must be divisible by config.model.num_heads={m.num_heads}")
        if parent is None:
            ckpt = config.tokenizer.checkpoint
            _require(bool(ckpt) and os.path.isdir(ckpt),
                     f"config.tokenizer.checkpoint={ckpt!r} is not a directory: give the tokenizer written by the "
                     f"vqkd task (<workdir>/tokenizer) or by `python -m beitv2_jax.convert --format official_vqkd`")
    elif task == "vqkd":
        _require(config.teacher.kind in ("clip", "dino", "vit_checkpoint"),
                 f"config.teacher.kind must be one of ('clip', 'dino', 'vit_checkpoint'), got "
                 f"{config.teacher.kind!r}")
        if parent is None:
            ckpt = config.teacher.checkpoint
            _require(bool(ckpt) and os.path.isdir(ckpt),
                     f"config.teacher.checkpoint={ckpt!r} is not a directory: convert a teacher with "
                     f"`python -m beitv2_jax.convert` or point to a ViT checkpoint written by this project")
