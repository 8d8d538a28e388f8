"""Checkpoint layouts of the MIM family: the DALL-E dVAE encoder (BEiT v1 / mc-BEiT tokenizer) and official iBOT.

===============  =======================================================================  =======================
format           what                                                                     our model
===============  =======================================================================  =======================
dalle_encoder    ``dall_e.Encoder`` state dict (``blocks.input.w``, ``blocks.group_1.``   ``dvae``
                 ``block_1.res_path.conv_1.w``, ..., ``blocks.output.conv.{w,b}``)      (``models/dvae.py``)
official_ibot    iBOT ``teacher``/``student`` dict (``backbone.*``; ``head.*`` and         ``vit``
                 ``masked_embed`` ignored) or an extracted backbone (no prefix)
===============  =======================================================================  =======================

Both are tables of :class:`~beitv2_jax.convert.engine.Rule` s registered with the engine (``register``).
``official_ibot`` runs through ``engine.import_state_dict`` like every ``vit`` layout. The engine builds models
through ``convert.model_shapes``, which does not know the ``dvae`` kind, so the dVAE (and the iBOT head, which is
no model kind of its own) are imported by :func:`import_with_rules`: the same rules, the same all-problems-at-once
``ConversionError``, shapes checked against the Flax module's ``jax.eval_shape``.

Command line (files from the official releases)::

  python -m beitv2_jax.convert.family dalle_encoder --input encoder.pkl --output DVAE_DIR
  python -m beitv2_jax.convert.family official_ibot --input checkpoint.pth --key teacher --output VIT_DIR
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Mapping, Optional, Sequence

import numpy as np

from beitv2_jax import storage
from beitv2_jax.convert import engine
from beitv2_jax.convert import schemes as S
from beitv2_jax.convert import transforms as T
from beitv2_jax.convert.engine import Layout, Rule, register


# ----------------------------------------------------------------------------------------------- rule runner
def _flax_shapes(module, *inputs) -> dict:
    """``{'params/a/b': shape}`` of ``module.init`` without computing anything."""
    import flax.linen as nn
    import jax
    from flax import traverse_util

    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.meta.unbox(dict(shapes)), sep="/").items()}


def import_with_rules(state_dict: Mapping, rules: Sequence[Rule], expected: Mapping[str, tuple], what: str) -> dict:
    """Run ``rules`` PyTorch → Flax on ``state_dict``; every missing/unexpected key, failing transform, shape
    mismatch (against ``expected`` flat shapes) and uncovered parameter is reported in one ``ConversionError``.
    Derived rules are optional and produce nothing. Returns nested numpy variables."""
    arrays = {k: engine._to_numpy(v) for k, v in state_dict.items()}
    wanted = [k for r in rules if not r.derived for k in r.torch]
    optional = {k for r in rules if r.derived for k in r.torch}
    missing = [k for k in wanted if k not in arrays]
    unexpected = [k for k in arrays if k not in set(wanted) and k not in optional]
    flat, problems = {}, []
    for rule in rules:
        if rule.derived or any(k not in arrays for k in rule.torch):
            continue
        try:
            outputs = rule.transform.to_flax(*[engine._as_float32(arrays[k]) for k in rule.torch])
        except Exception as e:  # noqa: BLE001 - reported with the keys involved
            problems.append(f"{', '.join(rule.torch)}: {rule.transform.name} failed: {e}")
            continue
        for path, value in zip(rule.flax, outputs):
            value = np.asarray(value, np.float32)
            if path not in expected:
                problems.append(f"{path} (from {', '.join(rule.torch)}) is not a parameter of the model")
            elif value.shape != tuple(expected[path]):
                problems.append(f"shape mismatch: {', '.join(rule.torch)} → {path} {value.shape}, the model "
                                f"expects {tuple(expected[path])}")
            flat[path] = value
    covered = {p for r in rules if not r.derived for p in r.flax}
    left = [p for p in expected if p not in covered]
    if left:
        problems.append("model parameters with no source in the state dict: " + ", ".join(engine.summarize_keys(left)))
    if missing or unexpected or problems:
        raise engine.ConversionError(what, missing, unexpected, problems)
    return engine.unflatten_variables(flat)


def export_with_rules(variables: Mapping, rules: Sequence[Rule]) -> dict:
    """Flax variables → PyTorch state dict (``{key: np.ndarray}`` in rule order); derived tensors re-created."""
    flat = engine.flatten_variables(variables)
    owned = [p for r in rules if not r.derived for p in r.flax]
    missing = [p for r in rules for p in r.flax if p not in flat]
    unexpected = [p for p in flat if p not in set(owned)]
    if missing or unexpected:
        raise engine.ConversionError("cannot export the variables", missing, unexpected)
    out = {}
    for rule in rules:
        for key, value in zip(rule.torch, rule.transform.to_torch(*[flat[p] for p in rule.flax])):
            out[key] = np.ascontiguousarray(value)
    return out


# ----------------------------------------------------------------------------------------------- dVAE encoder
def _conv_rows(fpath: str, tname: str) -> list:
    return [(f"{fpath}/kernel", f"{tname}.w", T.CONV), (f"{fpath}/bias", f"{tname}.b", T.IDENTITY)]


def dalle_encoder_rules(config: Mapping, fp: str = "params/", tp: str = "blocks.") -> list:
    """Rules of a ``dall_e.Encoder`` with ``config`` (``models/dvae.py`` CONFIG_FIELDS)."""
    n_hid, groups, blocks = config["n_hid"], config["group_count"], config["n_blk_per_group"]
    rows = _conv_rows("input", "input")
    width = n_hid
    for g in range(1, groups + 1):
        out = n_hid * 2 ** (g - 1)
        for b in range(1, blocks + 1):
            n_in = width if b == 1 else out
            prefix = f"group_{g}/block_{b}", f"group_{g}.block_{b}"
            if n_in != out:
                rows += _conv_rows(f"{prefix[0]}/id_path", f"{prefix[1]}.id_path")
            for k in range(1, 5):
                rows += _conv_rows(f"{prefix[0]}/res_path/conv_{k}", f"{prefix[1]}.res_path.conv_{k}")
        width = out
    rows += _conv_rows("output/conv", "output.conv")
    return S.rows_to_rules(rows, fp, tp)


def infer_dalle_encoder(state_dict: Mapping, image_size: int = 112) -> dict:
    """The ``dvae`` config a ``dall_e.Encoder`` state dict holds."""
    if "blocks.input.w" not in state_dict or "blocks.output.conv.w" not in state_dict:
        raise ValueError(f"blocks.input.w / blocks.output.conv.w not found: this is not a dall_e.Encoder state dict "
                         f"(first keys: {list(state_dict)[:5]})")
    first = np.shape(state_dict["blocks.input.w"])
    groups = S.block_indices(state_dict, "blocks.group_{i}.")
    blocks = S.block_indices(state_dict, "blocks.group_1.block_{i}.")
    return dict(group_count=len(groups), n_hid=int(first[0]), n_blk_per_group=len(blocks),
                vocab_size=int(np.shape(state_dict["blocks.output.conv.w"])[0]), input_channels=int(first[1]),
                image_size=image_size)


def dvae_shapes(config: Mapping) -> dict:
    import jax.numpy as jnp

    from beitv2_jax.models import dvae

    model = dvae.build_dvae(config)
    size = model.downsample * 2
    return _flax_shapes(model, jnp.zeros((1, size, size, model.input_channels), jnp.float32))


def import_dalle_encoder(state_dict: Mapping, image_size: int = 112) -> tuple:
    """``dall_e.Encoder`` state dict → ``({'params': ...}, dvae config)``."""
    config = infer_dalle_encoder(state_dict, image_size)
    variables = import_with_rules(state_dict, dalle_encoder_rules(config), dvae_shapes(config),
                                  "cannot import the dall_e.Encoder state dict")
    return variables, config


def export_dalle_encoder(variables: Mapping, config: Mapping) -> dict:
    """Our dVAE variables → a state dict that ``dall_e.Encoder(...).load_state_dict`` accepts."""
    return export_with_rules({"params": variables["params"]}, dalle_encoder_rules(config))


def read_dalle_encoder(path: str) -> dict:
    """State dict (numpy) of ``encoder.pkl`` (a pickled ``dall_e.Encoder``: needs the ``dall-e`` package and trust
    in the file) or of a file holding its plain ``state_dict()``."""
    import torch

    with storage.open(path, "rb") as f:
        obj = torch.load(f, map_location="cpu", weights_only=False)
    state = obj.state_dict() if hasattr(obj, "state_dict") else obj
    return {k: engine._to_numpy(v) for k, v in state.items()}


def _dvae_layout_infer(sd: Mapping, opts: Mapping, hf_config: Optional[Mapping], notes: list) -> tuple:
    notes.append("image_size is not stored in the checkpoint: assumed 112 (the BEiT v1 tokenizer view)")
    return "dvae", infer_dalle_encoder(sd)


register(Layout("dalle_encoder", "DALL-E dVAE encoder (dall_e.Encoder state dict, BEiT v1 tokenizer)",
                lambda kind, cfg, opts: dalle_encoder_rules(cfg), _dvae_layout_infer))


# ----------------------------------------------------------------------------------------------- iBOT
IBOT_HEAD_IGNORE = (r"^head\.", r"(^|\.)masked_embed$")
# ``last_layer2`` is ``last_layer`` itself with shared_head=True: PyTorch serialises it under both names.
SHARED_LAST_LAYER = T.Transform("shared_last_layer", lambda g, v: (), lambda g, v: (g.T, v.T))


def _ibot_detect(sd: Mapping) -> dict:
    return {"prefix": "backbone." if any(k.startswith("backbone.") for k in sd) else ""}


def _ibot_rules(kind: str, cfg: Mapping, opts: Mapping) -> list:
    if kind != "vit":
        raise ValueError(f"the official_ibot format holds vit models, not {kind!r}")
    return S.vit_rules(S.TIMM, cfg, tp=opts.get("prefix", "backbone."))


def _ibot_infer(sd: Mapping, opts: Mapping, hf_config: Optional[Mapping], notes: list) -> tuple:
    return "vit", S.finish_vit(S.infer_vit(S.TIMM, sd, opts.get("prefix", "")), eps=1e-6, notes=notes)


register(Layout(
    "official_ibot", "official iBOT teacher/student (backbone.* → vit; head.* and masked_embed ignored) or an "
    "extracted backbone", _ibot_rules, _ibot_infer, ignore=IBOT_HEAD_IGNORE, detect_options=_ibot_detect,
    default_options=lambda kind, cfg: {"prefix": "backbone."}))


def ibot_head_rules(head_cfg: Mapping, tp: str = "head.", fp: str = "") -> list:
    """Rules of ``iBOTHead`` (``mlp.{0,2,4}`` Linear layers, weight-normed ``last_layer``; with ``shared_head`` the
    ``last_layer2`` alias that PyTorch also serialises is derived; without it ``last_layer2`` is its own layer)."""
    rows = []
    for i in range(head_cfg["num_layers"]):
        rows += S.linear_rows(f"mlp_{i}", f"mlp.{2 * i}")
    rows += [("last_layer/weight_g", "last_layer.weight_g", T.LINEAR),
             ("last_layer/weight_v", "last_layer.weight_v", T.LINEAR)]
    if head_cfg["shared_head"]:
        rows.append((("last_layer/weight_g", "last_layer/weight_v"), ("last_layer2.weight_g", "last_layer2.weight_v"),
                     SHARED_LAST_LAYER, True))
    else:
        rows += [("last_layer2/weight_g", "last_layer2.weight_g", T.LINEAR),
                 ("last_layer2/weight_v", "last_layer2.weight_v", T.LINEAR)]
    return S.rows_to_rules(rows, fp, tp)


def import_ibot_head(state_dict: Mapping, head_cfg: Mapping, embed_dim: int) -> dict:
    """``head.*`` of an iBOT teacher/student dict → our ``IBOTHead`` params (nested numpy)."""
    import jax.numpy as jnp

    from beitv2_jax.models import ibot

    head = ibot.IBOTHead(**{k: head_cfg[k] for k in ibot.HEAD_FIELDS})
    expected = _flax_shapes(head, jnp.zeros((1, 2, embed_dim), jnp.float32))
    expected = {k[len("params/"):]: v for k, v in expected.items()}
    heads = {k: v for k, v in state_dict.items() if k.startswith("head.")}
    return import_with_rules(heads, ibot_head_rules(head_cfg), expected, "cannot import the iBOT head")


def infer_ibot_head(state_dict: Mapping) -> dict:
    """``HEAD_FIELDS`` read from an iBOT teacher/student dict."""
    layers = S.block_indices(state_dict, "head.mlp.{i}.")
    linear = [i for i in layers if f"head.mlp.{i}.weight" in state_dict]
    if not linear or "head.last_layer.weight_v" not in state_dict:
        raise ValueError("head.mlp.*.weight / head.last_layer.weight_v not found: no iBOT head in this state dict")
    out_dim, bottleneck = np.shape(state_dict["head.last_layer.weight_v"])
    v2 = state_dict.get("head.last_layer2.weight_v")
    shared = v2 is None or (np.shape(v2) == (out_dim, bottleneck)
                            and np.array_equal(engine._to_numpy(v2), engine._to_numpy(state_dict["head.last_layer.weight_v"])))
    return dict(out_dim=int(out_dim), patch_out_dim=int(np.shape(v2)[0]) if v2 is not None else int(out_dim),
                hidden_dim=int(np.shape(state_dict[f"head.mlp.{linear[0]}.weight"])[0]),
                bottleneck_dim=int(bottleneck), num_layers=len(linear), shared_head=bool(shared))


def read_ibot_checkpoint(path: str, key: str = "teacher") -> dict:
    """The ``teacher`` (or ``student``, ``module.`` stripped) state dict of a full iBOT checkpoint as numpy; a file
    holding a plain (backbone-only) state dict is read as is."""
    import argparse as _argparse

    import torch

    torch.serialization.add_safe_globals([_argparse.Namespace])
    with storage.open(path, "rb") as f:
        checkpoint = torch.load(f, map_location="cpu", weights_only=True)
    if key in checkpoint and isinstance(checkpoint[key], Mapping):
        state = checkpoint[key]
    elif key != "teacher" and key not in checkpoint:
        raise ValueError(f"{path} has no {key!r} entry (top-level keys: {sorted(checkpoint)})")
    else:
        state = checkpoint.get("state_dict", checkpoint)
    state = {re.sub(r"^module\.", "", k): engine._to_numpy(v) for k, v in state.items() if hasattr(v, "shape")}
    return state


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beitv2_jax.convert.family",
                                     description="Convert a DALL-E dVAE encoder or an official iBOT checkpoint.")
    parser.add_argument("format", choices=("dalle_encoder", "official_ibot"))
    parser.add_argument("--input", required=True, help="encoder.pkl (dall-e) or an iBOT checkpoint .pth")
    parser.add_argument("--output", required=True, help="output directory (our converted-weights format)")
    parser.add_argument("--key", default="teacher", help="official_ibot: teacher | student (default teacher)")
    parser.add_argument("--image_size", "--image-size", type=int, default=112,
                        help="dalle_encoder: tokenizer view size (112)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if storage.exists(args.output) and not args.overwrite:
        print(f"error: output exists: {args.output} (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    try:
        if args.format == "dalle_encoder":
            from beitv2_jax.models import dvae

            variables, config = import_dalle_encoder(read_dalle_encoder(args.input), args.image_size)
            dvae.save_dvae(args.output, variables, config, info={"source": storage.abspath(args.input),
                                                                 "format": args.format})
            print(f"dalle_encoder → dvae {config} → {args.output}")
        else:
            from beitv2_jax.convert import store

            converted = engine.import_state_dict(read_ibot_checkpoint(args.input, args.key), "official_ibot")
            store.save_variables(args.output, converted.variables, "vit", converted.model_config,
                                 info={"source": storage.abspath(args.input), "format": args.format, "key": args.key})
            print(f"official_ibot ({args.key}) → vit → {args.output}; ignored {len(converted.ignored)} keys "
                  f"({', '.join(engine.summarize_keys(converted.ignored)[:6])})")
            for note in converted.notes:
                print(f"note: {note}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
