"""What the converter reads: a checkpoint file or a Hugging Face ``save_pretrained`` folder, its format detected.

* :func:`hf_folder` — the weights file(s) and ``config.json`` of a ``save_pretrained`` folder (``model.safetensors``,
  sharded ``model.safetensors.index.json``, ``pytorch_model.bin``);
* :func:`detect_format` — the layout of a state dict from its key names (and the folder's ``model_type``); an
  ambiguous or unknown one is a one-line :class:`FormatError` naming the candidates;
* :func:`read_input` — file or folder → ``Input(state_dict, dropped, training_args, format, hf_config)``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional

from beitv2_jax import storage

# config.json ``model_type`` → our layout.
HF_MODEL_TYPES = {"beit": "hf_beit", "vit": "hf_vit", "clip": "hf_clip", "clip_vision_model": "hf_clip"}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


class FormatError(ValueError):
    """The checkpoint format cannot be told from the files (one line)."""


@dataclasses.dataclass
class Input:
    """A checkpoint read for conversion: ``state_dict`` (numpy), ``dropped`` keys (outside ``prefix``),
    ``training_args`` (scalar ``args`` of an official training checkpoint), ``format``, ``hf_config``."""

    state_dict: dict
    dropped: list
    training_args: dict
    format: str
    hf_config: Optional[dict]


def hf_folder(directory: str) -> Optional[tuple]:
    """``(weight files, config.json path)`` of a Hugging Face ``save_pretrained`` folder, None for other folders."""
    config = storage.join(directory, "config.json")
    if not storage.isfile(config):
        return None
    for name in HF_WEIGHT_FILES:
        path = storage.join(directory, name)
        if not storage.isfile(path):
            continue
        if name.endswith(".index.json"):  # sharded: {"weight_map": {key: shard file}}
            shards = sorted(set(storage.read_json(path)["weight_map"].values()))
            return [storage.join(directory, s) for s in shards], config
        return [path], config
    return None


def hf_vision_config(config: Mapping, fmt: str) -> dict:
    """The part of a ``config.json`` that describes the image tower (a ``CLIPModel`` nests it)."""
    return dict(config.get("vision_config", config)) if fmt == "hf_clip" else dict(config)


def detect_format(state_dict: Mapping, hf_config: Optional[Mapping] = None, where: str = "the checkpoint") -> str:
    """The layout of ``state_dict`` from its key names (``hf_config['model_type']`` first when given)."""
    model_type = (hf_config or {}).get("model_type")
    if model_type in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[model_type]
    keys = list(state_dict)

    def has(*parts):
        return any(any(p in k for p in parts) for k in keys)

    if has("quantize.embedding.weight", "encode_task_layer."):
        return "official_vqkd"
    if has("decode_head."):
        return "official_beitv2_seg"
    if has("visual.transformer.resblocks.", "visual.conv1."):
        return "openai_clip"
    if has("vision_model.", "embeddings.class_embedding"):
        return "hf_clip"
    hf_blocks = any(re.search(r"(^|\.)(encoder\.layer|layers)\.\d+\.attention\.", k) for k in keys)
    if has("lambda_1", "beit.embeddings.") or (hf_blocks and has("relative_position_bias")):
        return "hf_beit"
    if has("embeddings.cls_token", "embeddings.patch_embeddings."):
        return "hf_vit"
    if has("lm_head.weight", "cls_pt_layers.") or (has("mask_token") and has("rel_pos_bias.")):
        return "official_beitv2"
    if has("blocks.0.attn.qkv.weight"):
        if has("attn.q_bias", "relative_position_bias_table", "gamma_1"):  # BEiT blocks
            # the official fine-tuning code saves the relative_position_index buffers, timm does not
            return "official_finetune" if has("relative_position_index") else "timm"
        raise FormatError(f"cannot tell the format of {where}: timm ViT and DINO use the same key names; pass "
                          f"--format timm or --format dino")
    raise FormatError(f"cannot detect the format of {where} (first keys: {', '.join(keys[:3])}); pass --format")


def read_input(path: str, fmt: Optional[str] = None, *, prefix: Optional[str] = None, trust_pickle: bool = False,
               hf_config_path: Optional[str] = None) -> Input:
    """A checkpoint file or a ``save_pretrained`` folder → :class:`Input` (``fmt`` detected when None)."""
    from beitv2_jax.convert import torch_io

    files, config_path = [path], hf_config_path
    if storage.isdir(path):
        found = hf_folder(path)
        if found is None:
            raise FileNotFoundError(f"{path} is a directory without config.json + model.safetensors / "
                                    f"pytorch_model.bin (a Hugging Face save_pretrained folder)")
        files, config_path = found[0], hf_config_path or found[1]
    elif not storage.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    elif config_path is None:
        candidate = storage.join(storage.dirname(storage.abspath(path)), "config.json")
        if storage.isfile(candidate) and (fmt is None or fmt.startswith("hf_")):
            config_path = candidate
    if config_path is not None and not storage.isfile(config_path):
        raise FileNotFoundError(f"--hf_config file not found: {config_path}")
    raw_config = storage.read_json(config_path) if config_path else None
    state_dict, dropped, training_args = {}, [], {}
    for file in files:
        sd, drop, args = torch_io.load_checkpoint(file, prefix=prefix, trust_pickle=trust_pickle)
        state_dict.update(sd)
        dropped += drop
        training_args = training_args or args
    if fmt is None:
        fmt = detect_format(state_dict, raw_config, where=path)
    hf_config = hf_vision_config(raw_config, fmt) if raw_config is not None and fmt.startswith("hf_") else None
    return Input(state_dict, dropped, training_args, fmt, hf_config)
