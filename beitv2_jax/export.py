"""``python -m beitv2_jax.export``: a fine-tuned or pretrained encoder → timm ``beitv2_*`` / HF BEiT weights.

  python -m beitv2_jax.export --checkpoint FINETUNE_WORKDIR/best_model --format timm --output model.safetensors
  python -m beitv2_jax.export --checkpoint PRETRAIN_WORKDIR/model --format hf --output out/model.safetensors

``--checkpoint`` is one of our weight directories: the fine-tune task's ``best_model``/``model`` (a classifier:
per-layer tables, mean pooling + ``fc_norm`` + head) or a pretrained encoder (``beit_pretrain`` from the pretrain
task, or a ``vit``). A pretrained encoder is exported as its backbone + final norm (the mask token, LM head and
patch-aggregation layers have no place in timm/HF classifiers and are listed as left out) with the shared
relative position table copied into every block (``--rel-pos per_layer``, the ``beitv2_*`` layout; ``keep``
keeps one shared table). The converter (``beitv2_jax.convert``) writes the tensors:

* ``timm``: ``timm.models.beit.Beit`` names; the constructor arguments are printed (for ViT-B/L at 224 the file
  loads into ``timm.create_model('beitv2_base_patch16_224', num_classes=N)`` or, for an encoder,
  ``global_pool='token', num_classes=0``);
* ``hf``: ``transformers`` Hub names plus ``config.json`` next to the file, so ``BeitForImageClassification``
  (a fine-tuned model) or ``BeitModel`` (an encoder) ``.from_pretrained(directory)`` loads it with no missing key.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from beitv2_jax import storage

FORMATS = {"timm": "timm", "hf": "hf_beit"}
TIMM_NAMES = {(768, 12, 12): "beitv2_base_patch16_224", (1024, 24, 16): "beitv2_large_patch16_224"}


def encoder_variables(variables: dict, kind: str, config: dict, rel_pos: str = "per_layer") -> tuple:
    """Our variables of any image model → ``(variables, vit_config, left_out)`` ready for timm/HF BEiT."""
    import flax

    from beitv2_jax.convert import layouts, model_shapes
    from beitv2_jax.train.tasks import finetune

    left_out = []
    if kind == "beit_pretrain":
        variables, config, left_out = layouts.pretrain_as_backbone(variables, config)
    elif kind != "vit":
        raise ValueError(f"cannot export a {kind!r} model as an image classifier/encoder (beit_pretrain or vit)")
    config = model_shapes.normalize_config("vit", config)
    params = dict(variables["params"])
    if config["use_mask_token"]:
        params.pop("mask_token", None)
        left_out.append("params/mask_token")
        config = dict(config, use_mask_token=False)
    if rel_pos not in ("per_layer", "keep"):
        raise ValueError(f"rel_pos must be 'per_layer' or 'keep', got {rel_pos!r}")
    if rel_pos == "per_layer" and config["rel_pos"] == "shared":
        params = finetune.expand_shared_rel_pos(params, config["depth"])
        config = dict(config, rel_pos="per_layer")
    params = flax.traverse_util.unflatten_dict(flax.traverse_util.flatten_dict(params))
    return {"params": params}, config, left_out


def export_checkpoint(checkpoint: str, fmt: str, output: str, rel_pos: str = "per_layer",
                      overwrite: bool = False) -> dict:
    """Write ``checkpoint`` (our weight directory) as ``fmt`` (``timm`` | ``hf``) to ``output`` (``.safetensors``,
    or ``.pth``/``.bin``). Returns ``{'config', 'left_out', 'num_tensors', 'timm' | 'hf_config'}``."""
    from beitv2_jax.convert import engine, layouts, store, torch_io

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if not storage.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    if storage.exists(output) and not overwrite:
        raise FileExistsError(f"output exists: {output} (pass --overwrite to replace it)")
    variables, kind, config = store.load_variables(checkpoint)
    variables, config, left_out = encoder_variables(variables, kind, config, rel_pos)
    state_dict = engine.export_variables(variables, FORMATS[fmt], "vit", config)
    torch_io.save_state_dict(output, state_dict)
    info = {"config": config, "left_out": left_out, "num_tensors": len(state_dict)}
    if fmt == "hf":
        hf_config = layouts.hf_beit_config("vit", config)
        storage.write_json(storage.join(storage.dirname(storage.abspath(output)), "config.json"), hf_config, indent=2)
        info["hf_config"] = hf_config
    else:
        info["timm"] = layouts.timm_model_args(config)
    return info


def timm_hint(config: dict) -> Optional[str]:
    """``timm.create_model(...)`` call that builds the exported architecture, for the registered beitv2 sizes."""
    name = TIMM_NAMES.get((config["width"], config["depth"], config["num_heads"]))
    if (name is None or config["image_size"] != 224 or config["patch_size"] != 16 or config["rel_pos"] != "per_layer"
            or not config["layer_scale_init"]):
        return None
    pool = "avg" if config["use_fc_norm"] else "token"
    return f"timm.create_model({name!r}, num_classes={config['num_classes']}, global_pool={pool!r})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m beitv2_jax.export",
                                description="Export a fine-tuned or pretrained encoder to timm or HF BEiT weights.")
    p.add_argument("--checkpoint", required=True, help="weight directory (fine-tune best_model/model, pretrain model)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="timm (Beit) or hf (transformers BEiT)")
    p.add_argument("--output", required=True, help="output file: .safetensors (or .pth/.bin)")
    p.add_argument("--rel-pos", default="per_layer", choices=("per_layer", "keep"),
                   help="per_layer: copy a shared relative position table into every block (beitv2_* layout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = export_checkpoint(args.checkpoint, args.format, args.output, args.rel_pos, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint} → {args.format}: {info['num_tensors']} tensors → {args.output}")
    if info["left_out"]:
        print(f"left out (no place in the classifier layout): {', '.join(info['left_out'])}")
    if args.format == "hf":
        print(f"wrote config.json ({info['hf_config']['architectures'][0]}) next to {args.output}")
    else:
        name, kwargs = info["timm"]
        print(f"timm: timm.models.beit.{name}(**{kwargs})")
        hint = timm_hint(info["config"])
        if hint:
            print(f"or: {hint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
