"""``python -m beitv2_jax.convert``: PyTorch checkpoints ⇄ our converted-weights directories.

Import (PyTorch file → directory with ``model.json`` + orbax ``variables/``)::

  python -m beitv2_jax.convert --format official_vqkd --input vqkd.pth --output TOKENIZER_DIR
  python -m beitv2_jax.convert --format hf_clip --input model.safetensors --output CLIP_DIR \\
      [--hf-config config.json] [--set num_heads=12] [--prefix teacher_model.] [--overwrite]

Export (directory → PyTorch file)::

  python -m beitv2_jax.convert --export --checkpoint DIR --format timm --output model.safetensors
  python -m beitv2_jax.convert --export --checkpoint DIR --format hf_beit --output out/model.safetensors

``hf_beit`` exports also write ``config.json`` next to the file (so ``BeitModel.from_pretrained(dir)`` works);
``timm`` exports print the ``timm`` constructor arguments. A ``beit_pretrain`` model exports its backbone + final
norm to ``timm`` and its backbone + norm + LM head to ``hf_beit``; the parts left out are listed.
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
    p.add_argument("--format", required=True, choices=FORMATS, help="checkpoint layout")
    p.add_argument("--input", help="import: .pth/.pt/.bin/.safetensors file")
    p.add_argument("--output", required=True, help="import: output directory; export: output file")
    p.add_argument("--export", action="store_true", help="export a converted directory to a PyTorch file")
    p.add_argument("--checkpoint", help="export: directory written by this tool or a training task")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an inferred model config field (repeatable), e.g. --set num_heads=16")
    p.add_argument("--prefix", help="import only keys under this prefix (stripped), e.g. teacher_model.")
    p.add_argument("--hf-config", help="Hugging Face config.json (default: config.json next to --input)")
    p.add_argument("--naming", choices=("hub", "transformers5"),
                   help="export: Hugging Face key names (default hub, as save_pretrained writes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load .pth files with arbitrary pickled objects (torch.load weights_only=False)")
    return p


def _hf_config(args) -> Optional[dict]:
    path = args.hf_config
    if path is None and args.format.startswith("hf_"):
        candidate = storage.join(storage.dirname(storage.abspath(args.input)), "config.json")
        path = candidate if storage.isfile(candidate) else None
    if path is None:
        return None
    if not storage.isfile(path):
        raise FileNotFoundError(f"--hf-config file not found: {path}")
    config = storage.read_json(path)
    return config.get("vision_config", config) if args.format == "hf_clip" else config


def run_import(args) -> int:
    from beitv2_jax.convert import engine, store, torch_io

    if not args.input:
        raise _UsageError("--input is required (or pass --export --checkpoint DIR)")
    if storage.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"output exists: {args.output} (pass --overwrite to replace it)")
    state_dict, dropped, training_args = torch_io.load_checkpoint(args.input, prefix=args.prefix,
                                                                 trust_pickle=args.trust_pickle)
    result = engine.import_state_dict(state_dict, args.format, overrides=_overrides(args.set),
                                      hf_config=_hf_config(args), options=torch_io.layout_options(training_args))
    info = {"source": storage.abspath(args.input), "format": args.format, "options": result.options,
            "ignored_keys": len(result.ignored) + len(dropped)}
    store.save_variables(args.output, result.variables, result.model_kind, result.model_config, info=info,
                         overwrite=True)
    from beitv2_jax.convert.model_shapes import count_params

    print(f"{args.format} → {result.model_kind}: {len(state_dict)} tensors, "
          f"{count_params(result.model_kind, result.model_config):,} params → {args.output}")
    for note in result.notes:
        print(f"note: {note}")
    ignored = dropped + result.ignored
    if ignored:
        summary = engine.summarize_keys(ignored)
        shown = ", ".join(summary[:8]) + (f", … ({len(summary) - 8} more groups)" if len(summary) > 8 else "")
        print(f"ignored {len(ignored)} keys not part of the model: {shown}")
    return 0


def run_export(args) -> int:
    from beitv2_jax.convert import engine, layouts, store, torch_io

    if not args.checkpoint:
        raise _UsageError("--export needs --checkpoint DIR")
    if not storage.isdir(args.checkpoint):
        raise FileNotFoundError(f"checkpoint directory not found: {args.checkpoint}")
    if storage.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"output exists: {args.output} (pass --overwrite to replace it)")
    variables, kind, config = store.load_variables(args.checkpoint)
    dropped = []
    if kind == "beit_pretrain" and args.format in ("timm", "dino", "official_finetune", "hf_vit"):
        variables, config, dropped = layouts.pretrain_as_backbone(variables, config)
        kind = "vit"
    elif kind == "beit_pretrain" and args.format == "hf_beit" and config.get("head_layers", 0):
        variables, config, dropped = layouts.without_aggregation_head(variables, config)
    options = {"naming": args.naming} if args.naming else None
    state_dict = engine.export_variables(variables, args.format, kind, config, options=options)
    torch_io.save_state_dict(args.output, state_dict, wrap=_OFFICIAL_WRAP.get(args.format))
    print(f"{kind} → {args.format}: {layouts.describe_state_dict(state_dict)} → {args.output}")
    if dropped:
        print(f"left out (no place in {args.format}): {', '.join(engine.summarize_keys(dropped))}")
    from beitv2_jax.convert.model_shapes import normalize_config

    config = normalize_config(kind, config)
    if args.format == "hf_beit":
        config_path = storage.join(storage.dirname(storage.abspath(args.output)), "config.json")
        hf = layouts.hf_beit_config(kind, config)
        storage.write_json(config_path, hf, indent=2)
        print(f"wrote {config_path} ({hf['architectures'][0]})")
    elif args.format in ("timm", "dino"):
        try:
            name, kwargs = layouts.timm_model_args(config)
            print(f"timm: {name}(**{kwargs})")
        except ValueError as e:
            print(f"note: {e}")
    return 0


class _UsageError(Exception):
    pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_export(args) if args.export else run_import(args)
    except _UsageError as e:
        parser.error(str(e))
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # conversion problems: the message lists every key involved
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
