"""``python -m beitv2_jax.convert``: PyTorch checkpoints ⇄ our converted-weights directories.

Import (PyTorch file or Hugging Face ``save_pretrained`` folder → directory with ``model.json`` + orbax
``variables/``)::

  python -m beitv2_jax.convert --input vqkd.pth --output TOKENIZER_DIR [--format official_vqkd]
  python -m beitv2_jax.convert --input HF_FOLDER --output CLIP_DIR \\
      [--hf_config config.json] [--set num_heads=12] [--prefix teacher_model.] [--overwrite]

``--format`` is detected from the key names (and a folder's ``config.json`` ``model_type``) when omitted; when the
files cannot tell (timm ViT vs DINO) the run ends with one line asking for it.

Export (directory → PyTorch file; the one export command, ``python -m beitv2_jax.export`` is an alias)::

  python -m beitv2_jax.convert --export --checkpoint DIR --format timm --output model.safetensors
  python -m beitv2_jax.convert --export --checkpoint DIR --format hf_beit --output out/model.safetensors

Hugging Face exports (``hf_beit``, ``hf_vit``, ``hf_clip``) also write ``config.json`` and
``preprocessor_config.json`` next to the file, so ``AutoModel`` / ``AutoImageProcessor`` / ``pipeline(...,
model=dir)`` load the folder; ``timm`` exports print the ``timm`` constructor arguments. A ``beit_pretrain`` model
exports its backbone + final norm to ``timm``/``hf_vit``/``official_finetune`` and its backbone + norm + LM head to
``hf_beit`` (``BeitForMaskedImageModeling``); the parts left out are listed. ``--rel_pos per_layer`` copies a
shared relative position table into every block (the timm ``beitv2_*`` layout).

Flags use underscores (``--hf_config``); the older dashed spellings (``--hf-config``, ``--trust-pickle``) still
work.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from beitv2_jax import storage

FORMATS = ("official_beitv2", "official_finetune", "official_vqkd", "official_beitv2_seg", "timm", "hf_beit",
           "openai_clip", "hf_clip", "dino", "hf_vit")
_OFFICIAL_WRAP = {"official_beitv2": "model", "official_finetune": "model", "official_vqkd": "model",
                  "official_beitv2_seg": "state_dict"}  # mmcv save_checkpoint: {'meta', 'state_dict', ...}


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(items: Sequence[str]) -> dict:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m beitv2_jax.convert",
        description="Convert PyTorch checkpoints (official BEiT v2, timm, Hugging Face, OpenAI CLIP, DINO) to "
                    "beitv2_jax weight directories, and back (--export).")
    p.add_argument("--format", choices=FORMATS,
                   help="checkpoint layout (import: detected from the files when omitted; export: required)")
    p.add_argument("--input", help="import: .pth/.pt/.bin/.safetensors file or a Hugging Face save_pretrained folder")
    p.add_argument("--output", required=True, help="import: output directory; export: output file")
    p.add_argument("--export", action="store_true", help="export a converted directory to a PyTorch file")
    p.add_argument("--checkpoint", help="export: directory written by this tool or a training task")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an inferred model config field (repeatable), e.g. --set num_heads=16")
    p.add_argument("--prefix", help="import only keys under this prefix (stripped), e.g. teacher_model.")
    p.add_argument("--hf_config", "--hf-config", help="Hugging Face config.json (default: config.json next to "
                   "--input or inside the --input folder)")
    p.add_argument("--naming", choices=("hub", "transformers5"),
                   help="export: Hugging Face key names (default hub, as save_pretrained writes)")
    p.add_argument("--rel_pos", "--rel-pos", default="keep", choices=("keep", "per_layer"),
                   help="export: per_layer copies a shared relative position table into every block (timm beitv2_*)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--trust_pickle", "--trust-pickle", action="store_true",
                   help="load .pth files with arbitrary pickled objects (torch.load weights_only=False)")
    return p


def run_import(args) -> int:
    from beitv2_jax.convert import engine, inputs, store

    if not args.input:
        raise _UsageError("--input is required (or pass --export --checkpoint DIR)")
    if storage.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"output exists: {args.output} (pass --overwrite to replace it)")
    read = inputs.read_input(args.input, args.format, prefix=args.prefix, trust_pickle=args.trust_pickle,
                             hf_config_path=args.hf_config)
    from beitv2_jax.convert import torch_io

    result = engine.import_state_dict(read.state_dict, read.format, overrides=_overrides(args.set),
                                      hf_config=read.hf_config, options=torch_io.layout_options(read.training_args))
    info = {"source": storage.abspath(args.input), "format": read.format, "options": result.options,
            "ignored_keys": len(result.ignored) + len(read.dropped)}
    store.save_variables(args.output, result.variables, result.model_kind, result.model_config, info=info,
                         overwrite=True, preprocessing=_hf_preprocessing(args.input))
    from beitv2_jax.convert.model_shapes import count_params

    detected = "" if args.format else " (detected)"
    print(f"{read.format}{detected} → {result.model_kind}: {len(read.state_dict)} tensors, "
          f"{count_params(result.model_kind, result.model_config):,} params → {args.output}")
    for note in result.notes:
        print(f"note: {note}")
    ignored = read.dropped + result.ignored
    if ignored:
        summary = engine.summarize_keys(ignored)
        shown = ", ".join(summary[:8]) + (f", … ({len(summary) - 8} more groups)" if len(summary) > 8 else "")
        print(f"ignored {len(ignored)} keys not part of the model: {shown}")
    return 0


def _hf_preprocessing(path: str) -> dict:
    """The preprocessing a Hugging Face folder's ``preprocessor_config.json`` describes (shortest-edge resize +
    centre crop + mean/std, as our exports write it), {} when there is none or it says something else."""
    from beitv2_jax.convert import layouts

    folder = path if storage.isdir(path) else storage.dirname(storage.abspath(path))
    config_path = storage.join(folder, "preprocessor_config.json")
    if not storage.isfile(config_path):
        return {}
    cfg = storage.read_json(config_path)
    crop, size = cfg.get("crop_size") or {}, cfg.get("size") or {}
    if not (cfg.get("do_center_crop") and "height" in crop and "shortest_edge" in size):
        return {}
    resample = {v: k for k, v in layouts._PIL_RESAMPLE.items()}.get(cfg.get("resample"), "bicubic")
    return {"image_size": int(crop["height"]), "crop_pct": int(crop["height"]) / int(size["shortest_edge"]),
            "mean": list(cfg.get("image_mean", (0.485, 0.456, 0.406))),
            "std": list(cfg.get("image_std", (0.229, 0.224, 0.225))), "interpolation": resample}


HF_FORMATS = ("hf_beit", "hf_vit", "hf_clip")
BACKBONE_FORMATS = ("timm", "dino", "official_finetune", "hf_vit", "hf_clip", "openai_clip")


def export_checkpoint(checkpoint: str, fmt: str, output: str, *, rel_pos: str = "keep", naming: Optional[str] = None,
                      overwrite: bool = False) -> dict:
    """Write our weight directory ``checkpoint`` as ``fmt`` to ``output`` (``.safetensors``/``.pth``/``.bin``).

    Returns ``{'kind', 'config', 'left_out', 'num_tensors', 'description', 'written'}`` (``written``: the files,
    including ``config.json`` + ``preprocessor_config.json`` for Hugging Face formats) plus ``hf_config`` (Hugging
    Face formats) or ``timm`` (``(class name, kwargs)``; ``timm_note`` when timm cannot express the model)."""
    from beitv2_jax.convert import engine, layouts, store, torch_io
    from beitv2_jax.convert.model_shapes import normalize_config

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if rel_pos not in ("keep", "per_layer"):
        raise ValueError(f"rel_pos must be 'keep' or 'per_layer', got {rel_pos!r}")
    if not storage.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    if storage.exists(output) and not overwrite:
        raise FileExistsError(f"output exists: {output} (pass --overwrite to replace it)")
    variables, kind, config = store.load_variables(checkpoint)
    preprocessing = store.read_preprocessing(store.read_description(checkpoint))
    left_out = []
    if kind == "beit_pretrain" and fmt in BACKBONE_FORMATS:
        variables, config, left_out = layouts.pretrain_as_backbone(variables, config)
        kind = "vit"
    elif kind == "beit_pretrain" and fmt == "hf_beit" and normalize_config(kind, config).get("head_layers", 0):
        variables, config, left_out = layouts.without_aggregation_head(variables, config)
    config = normalize_config(kind, config)
    if kind == "vit":
        params = dict(variables["params"])
        if config["use_mask_token"] and fmt in BACKBONE_FORMATS:  # no place for it in classifiers / timm
            params.pop("mask_token", None)
            left_out.append("params/mask_token")
            config = dict(config, use_mask_token=False)
        if rel_pos == "per_layer" and config["rel_pos"] == "shared":
            from beitv2_jax.train.tasks import finetune

            params = finetune.expand_shared_rel_pos(params, config["depth"])
            config = dict(config, rel_pos="per_layer")
        variables = dict(variables, params=params)
    options = {"naming": naming} if naming else None
    state_dict = engine.export_variables(variables, fmt, kind, config, options=options)
    torch_io.save_state_dict(output, state_dict, wrap=_OFFICIAL_WRAP.get(fmt))
    written, extra = [output], {}
    if fmt in ("timm", "dino"):
        try:
            extra["timm"] = layouts.timm_model_args(config)
        except ValueError as e:
            extra["timm_note"] = str(e)
    if fmt in HF_FORMATS:
        folder = storage.dirname(storage.abspath(output))
        hf = {"hf_beit": lambda: layouts.hf_beit_config(kind, config), "hf_vit": lambda: layouts.hf_vit_config(config),
              "hf_clip": lambda: layouts.hf_clip_config(config)}[fmt]()
        extra["hf_config"] = hf
        for name, content in (("config.json", hf), ("preprocessor_config.json",
                                                    layouts.hf_preprocessor_config(preprocessing))):
            storage.write_json(storage.join(folder, name), content, indent=2)
            written.append(storage.join(folder, name))
    return {"kind": kind, "config": config, "left_out": left_out, "num_tensors": len(state_dict),
            "description": layouts.describe_state_dict(state_dict), "written": written, **extra}


TIMM_NAMES = {(768, 12, 12): "beitv2_base_patch16_224", (1024, 24, 16): "beitv2_large_patch16_224"}


def timm_hint(config: dict) -> Optional[str]:
    """``timm.create_model(...)`` call that builds the exported architecture, for the registered beitv2 sizes."""
    name = TIMM_NAMES.get((config["width"], config["depth"], config["num_heads"]))
    if (name is None or config["image_size"] != 224 or config["patch_size"] != 16 or config["rel_pos"] != "per_layer"
            or not config["layer_scale_init"]):
        return None
    pool = "avg" if config["use_fc_norm"] else "token"
    return f"timm.create_model({name!r}, num_classes={config['num_classes']}, global_pool={pool!r})"


def run_export(args) -> int:
    from beitv2_jax.convert import engine

    if not args.checkpoint:
        raise _UsageError("--export needs --checkpoint DIR")
    if not args.format:
        raise _UsageError("--export needs --format (the layout to write)")
    info = export_checkpoint(args.checkpoint, args.format, args.output, rel_pos=args.rel_pos, naming=args.naming,
                             overwrite=args.overwrite)
    print(f"{info['kind']} → {args.format}: {info['description']} → {args.output}")
    if info["left_out"]:
        print(f"left out (no place in {args.format}): {', '.join(engine.summarize_keys(info['left_out']))}")
    for path in info["written"][1:]:
        print(f"wrote {path}")
    if "timm" in info:
        name, kwargs = info["timm"]
        module = "timm.models.beit" if name == "Beit" else "timm.models.vision_transformer"
        print(f"timm: {module}.{name}(**{kwargs})")
        hint = timm_hint(info["config"])
        if hint:
            print(f"or: {hint}")
    elif "timm_note" in info:
        print(f"note: {info['timm_note']}")
    return 0


class _UsageError(Exception):
    pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    from beitv2_jax.convert import inputs, torch_io

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_export(args) if args.export else run_import(args)
    except _UsageError as e:
        parser.error(str(e))
    except (FileNotFoundError, FileExistsError, torch_io.MissingTorchError, inputs.FormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # conversion problems: the message lists every key involved
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
