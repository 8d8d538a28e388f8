"""PyTorch naming schemes of ViT-family models, as tables, and the one rule builder that reads them.

A :class:`ViTNames` says where each part of our :class:`~beitv2_jax.models.vit.VisionTransformer` lives in a
PyTorch state dict (``None``: the scheme has no such part). :func:`vit_rules` turns a scheme plus a model config
into conversion rules; :func:`infer_vit` reads the architecture back from a state dict.

Our side (flat paths, see ``models/vit.py``)::

  cls_token mask_token pos_embed patch_embed/{kernel,bias} ln_pre/{scale,bias}
  rel_pos_bias/relative_position_bias_table
  blocks_{i}/{norm1,norm2}/{scale,bias} blocks_{i}/gamma_{1,2}
  blocks_{i}/attn/{qkv, q_bias, v_bias | qkv_bias, relative_position_bias_table, proj, proj_bias}
  blocks_{i}/mlp/{fc1,fc2}/{kernel,bias}  norm/{scale,bias}  fc_norm/{scale,bias}  head/{kernel,bias}
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping, Optional

import numpy as np

from beitv2_jax.convert import transforms as T
from beitv2_jax.convert.engine import Rule
from beitv2_jax.models import relpos


@dataclasses.dataclass(frozen=True)
class ViTNames:
    """Torch names of one scheme. Module names get ``.weight``/``.bias`` appended; ``*_key`` are full keys.

    ``block`` is the block prefix template (``"blocks.{i}."``); names under "block" are relative to it.
    """

    scheme: str
    patch_embed: str
    block: str
    norm1: str
    norm2: str
    proj: str
    fc1: str
    fc2: str
    cls_token: Optional[str] = None
    cls_token_transform: T.Transform = T.IDENTITY
    mask_token: Optional[str] = None
    pos_embed: Optional[str] = None
    pos_embed_transform: T.Transform = T.IDENTITY
    ln_pre: Optional[str] = None
    shared_table: Optional[str] = None
    shared_index: Optional[str] = None  # persistent relative_position_index buffer (official code only)
    # block
    gamma_1: Optional[str] = None
    gamma_2: Optional[str] = None
    qkv_key: Optional[str] = None  # fused qkv weight key [3D, D]
    qkv_bias_key: Optional[str] = None  # fused full qkv bias key [3D]
    q_bias_key: Optional[str] = None  # BEiT q/v bias keys [D]
    v_bias_key: Optional[str] = None
    split_qkv: Optional[tuple] = None  # (q, k, v) module names: separate Linear layers
    table: Optional[str] = None
    index: Optional[str] = None
    qkv_bias_modes: tuple = ("none", "qv", "full")
    # top
    final_norm: Optional[str] = None
    fc_norm: Optional[str] = None
    head_key: Optional[str] = None
    head_transform: T.Transform = T.LINEAR
    head_bias_key: Optional[str] = None
    head_at_root: bool = False  # head outside the backbone prefix (HF `classifier`, `visual_projection`)


# ----------------------------------------------------------------------------------------------- the tables
TIMM = ViTNames(
    scheme="timm", cls_token="cls_token", mask_token="mask_token", pos_embed="pos_embed",
    patch_embed="patch_embed.proj", ln_pre="norm_pre", shared_table="rel_pos_bias.relative_position_bias_table",
    block="blocks.{i}.", norm1="norm1", norm2="norm2", gamma_1="gamma_1", gamma_2="gamma_2",
    qkv_key="attn.qkv.weight", qkv_bias_key="attn.qkv.bias", q_bias_key="attn.q_bias", v_bias_key="attn.v_bias",
    table="attn.relative_position_bias_table", proj="attn.proj", fc1="mlp.fc1", fc2="mlp.fc2",
    final_norm="norm", fc_norm="fc_norm", head_key="head.weight", head_bias_key="head.bias")

# unilm beit2 modeling_finetune / modeling_pretrain / modeling_vqkd: timm names + persistent index buffers.
OFFICIAL = dataclasses.replace(
    TIMM, scheme="official", ln_pre=None, shared_index="rel_pos_bias.relative_position_index",
    index="attn.relative_position_index", qkv_bias_modes=("none", "qv"))

_HF_HUB = dict(block="encoder.layer.{i}.", proj="attention.output.dense", fc1="intermediate.dense",
               fc2="output.dense",
               split_qkv=("attention.attention.query", "attention.attention.key", "attention.attention.value"))
_HF_V5 = dict(block="layers.{i}.", proj="attention.o_proj", fc1="mlp.fc1", fc2="mlp.fc2",
              split_qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"))
_HF_COMMON = dict(cls_token="embeddings.cls_token", mask_token="embeddings.mask_token",
                  pos_embed="embeddings.position_embeddings", patch_embed="embeddings.patch_embeddings.projection",
                  norm1="layernorm_before", norm2="layernorm_after", final_norm="layernorm",
                  head_key="classifier.weight", head_bias_key="classifier.bias", head_at_root=True)

# Hugging Face names: "hub" = checkpoint files on the Hub / save_pretrained; "transformers5" = the module
# names of transformers ≥ 5 (what `model.state_dict()` returns there).
HF_BEIT = {
    "hub": ViTNames(scheme="hf_beit/hub", **_HF_COMMON, **_HF_HUB, gamma_1="lambda_1", gamma_2="lambda_2",
                    shared_table="encoder.relative_position_bias.relative_position_bias_table",
                    table="attention.attention.relative_position_bias.relative_position_bias_table",
                    fc_norm="pooler.layernorm", qkv_bias_modes=("qv",)),
    "transformers5": ViTNames(scheme="hf_beit/transformers5", **_HF_COMMON, **_HF_V5, gamma_1="lambda_1",
                              gamma_2="lambda_2", shared_table="shared_position_bias.relative_position_bias_table",
                              table="relative_position_bias.relative_position_bias_table",
                              fc_norm="pooler.layernorm", qkv_bias_modes=("qv",)),
}
HF_VIT = {
    "hub": ViTNames(scheme="hf_vit/hub", **_HF_COMMON, **_HF_HUB, qkv_bias_modes=("none", "full")),
    "transformers5": ViTNames(scheme="hf_vit/transformers5", **_HF_COMMON, **_HF_V5,
                              qkv_bias_modes=("none", "full")),
}
HF_CLIP = ViTNames(
    scheme="hf_clip", cls_token="embeddings.class_embedding", cls_token_transform=T.TOKEN,
    pos_embed="embeddings.position_embedding.weight", pos_embed_transform=T.POSITIONS,
    patch_embed="embeddings.patch_embedding", ln_pre="pre_layrnorm", block="encoder.layers.{i}.",
    norm1="layer_norm1", norm2="layer_norm2",
    split_qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), proj="self_attn.out_proj",
    fc1="mlp.fc1", fc2="mlp.fc2", final_norm="post_layernorm", head_key="visual_projection.weight",
    head_at_root=True, qkv_bias_modes=("full",))
OPENAI_CLIP = ViTNames(
    scheme="openai_clip", cls_token="class_embedding", cls_token_transform=T.TOKEN,
    pos_embed="positional_embedding", pos_embed_transform=T.POSITIONS, patch_embed="conv1", ln_pre="ln_pre",
    block="transformer.resblocks.{i}.", norm1="ln_1", norm2="ln_2", qkv_key="attn.in_proj_weight",
    qkv_bias_key="attn.in_proj_bias", proj="attn.out_proj", fc1="mlp.c_fc", fc2="mlp.c_proj",
    final_norm="ln_post", head_key="proj", head_transform=T.IDENTITY, qkv_bias_modes=("full",))


# ----------------------------------------------------------------------------------------------- rules
def _need(name: Optional[str], n: ViTNames, what: str) -> str:
    if name is None:
        raise ValueError(f"the {n.scheme} naming scheme has no place for {what}")
    return name


def layer_norm_rows(fpath: str, tname: str) -> list:
    return [(f"{fpath}/scale", f"{tname}.weight", T.IDENTITY), (f"{fpath}/bias", f"{tname}.bias", T.IDENTITY)]


def linear_rows(fpath: str, tname: str, bias: bool = True) -> list:
    rows = [(f"{fpath}/kernel", f"{tname}.weight", T.LINEAR)]
    return rows + ([(f"{fpath}/bias", f"{tname}.bias", T.IDENTITY)] if bias else [])


def rows_to_rules(rows: list, fp: str, tp: str) -> list:
    """Rows ``(flax suffix(es), torch suffix(es), transform[, derived])`` → rules with prefixes applied."""
    rules = []
    for row in rows:
        flax, torch, transform = row[:3]
        flax = (flax,) if isinstance(flax, str) else tuple(flax)
        torch = (torch,) if isinstance(torch, str) else tuple(torch)
        rules.append(Rule(tuple(tp + t for t in torch), tuple(fp + f for f in flax), transform,
                          derived=len(row) > 3 and row[3]))
    return rules


def window(cfg: Mapping) -> tuple:
    return relpos.window_for_image(cfg["image_size"], cfg["patch_size"])


def block_rules(n: ViTNames, cfg: Mapping, fp: str, tp: str) -> list:
    """Rules of one transformer block: ``fp`` e.g. ``params/blocks_3/``, ``tp`` e.g. ``blocks.3.``."""
    heads, mode = cfg["num_heads"], cfg["qkv_bias"]
    if mode not in n.qkv_bias_modes:
        raise ValueError(f"the {n.scheme} naming scheme cannot hold qkv_bias={mode!r} "
                         f"(supported: {n.qkv_bias_modes})")
    rows = []
    if cfg["layer_scale_init"] > 0:
        rows += [("gamma_1", _need(n.gamma_1, n, "layer scale"), T.IDENTITY), ("gamma_2", n.gamma_2, T.IDENTITY)]
    rows += layer_norm_rows("norm1", n.norm1)
    if n.split_qkv is None:
        if mode == "qv":
            rows += [("attn/q_bias", n.q_bias_key, T.heads_vector(heads)),
                     ("attn/v_bias", n.v_bias_key, T.heads_vector(heads))]
        if cfg["rel_pos"] == "per_layer":
            rows.append(("attn/relative_position_bias_table", _need(n.table, n, "per-layer tables"), T.IDENTITY))
            if n.index:
                rows.append(((), n.index, T.relative_position_index(window(cfg)), True))
        rows.append(("attn/qkv", _need(n.qkv_key, n, "a fused qkv"), T.qkv_fused(heads)))
        if mode == "full":
            rows.append(("attn/qkv_bias", n.qkv_bias_key, T.qkv_bias_fused(heads)))
    else:
        q, k, v = n.split_qkv
        rows.append(("attn/qkv", (f"{q}.weight", f"{k}.weight", f"{v}.weight"), T.qkv_split(heads)))
        if mode == "qv":
            rows += [("attn/q_bias", f"{q}.bias", T.heads_vector(heads)),
                     ("attn/v_bias", f"{v}.bias", T.heads_vector(heads))]
        elif mode == "full":
            rows.append(("attn/qkv_bias", (f"{q}.bias", f"{k}.bias", f"{v}.bias"), T.qkv_bias_split(heads)))
        if cfg["rel_pos"] == "per_layer":
            rows.append(("attn/relative_position_bias_table", _need(n.table, n, "per-layer tables"), T.IDENTITY))
    rows += [("attn/proj", f"{n.proj}.weight", T.out_proj(heads)), ("attn/proj_bias", f"{n.proj}.bias", T.IDENTITY)]
    rows += layer_norm_rows("norm2", n.norm2) + linear_rows("mlp/fc1", n.fc1) + linear_rows("mlp/fc2", n.fc2)
    return rows_to_rules(rows, fp, tp)


def vit_rules(n: ViTNames, cfg: Mapping, fp: str = "params/", tp: str = "", root_tp: str = "") -> list:
    """All rules of a VisionTransformer with config ``cfg`` under Flax prefix ``fp`` and torch prefix ``tp``.

    ``root_tp`` is the torch prefix of a head that lives outside the backbone (``head_at_root``).
    """
    rows = []
    if cfg["use_cls_token"]:
        rows.append(("cls_token", _need(n.cls_token, n, "a class token"), n.cls_token_transform))
    if cfg["use_mask_token"]:
        rows.append(("mask_token", _need(n.mask_token, n, "a mask token"), T.IDENTITY))
    if cfg["use_abs_pos"]:
        rows.append(("pos_embed", _need(n.pos_embed, n, "absolute positions"), n.pos_embed_transform))
    rows.append(("patch_embed/kernel", f"{n.patch_embed}.weight", T.CONV))
    if cfg["patch_embed_bias"]:
        rows.append(("patch_embed/bias", f"{n.patch_embed}.bias", T.IDENTITY))
    if cfg["ln_pre"]:
        rows += layer_norm_rows("ln_pre", _need(n.ln_pre, n, "a pre-LayerNorm (ln_pre)"))
    if cfg["rel_pos"] == "shared":
        rows.append(("rel_pos_bias/relative_position_bias_table", _need(n.shared_table, n, "a shared table"),
                     T.IDENTITY))
        if n.shared_index:
            rows.append(((), n.shared_index, T.relative_position_index(window(cfg)), True))
    rules = rows_to_rules(rows, fp, tp)
    for i in range(cfg["depth"]):
        rules += block_rules(n, cfg, f"{fp}blocks_{i}/", tp + n.block.format(i=i))
    rows = []
    if cfg["use_final_norm"]:
        rows += layer_norm_rows("norm", _need(n.final_norm, n, "a final norm"))
    if cfg["use_fc_norm"]:
        rows += layer_norm_rows("fc_norm", _need(n.fc_norm, n, "fc_norm (mean-pooling norm)"))
    rules += rows_to_rules(rows, fp, tp)
    if cfg["num_classes"] > 0:
        rows = [("head/kernel", _need(n.head_key, n, "a head"), n.head_transform)]
        if cfg["head_bias"]:
            rows.append(("head/bias", _need(n.head_bias_key, n, "a head bias"), T.IDENTITY))
        rules += rows_to_rules(rows, fp, root_tp if n.head_at_root else tp)
    return rules


# ----------------------------------------------------------------------------------------------- inference
def block_indices(state_dict: Mapping, template: str) -> list:
    """Sorted indices ``i`` for which some key starts with ``template.format(i=i)``."""
    pattern = re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)"))
    return sorted({int(m.group(1)) for k in state_dict for m in [pattern.match(k)] if m})


def _side(count: int, what: str) -> int:
    side = int(round(math.sqrt(count)))
    if side * side != count:
        raise ValueError(f"cannot infer a square patch grid from {what} ({count} positions)")
    return side


def infer_vit(n: ViTNames, sd: Mapping[str, np.ndarray], tp: str = "", root_tp: str = "") -> dict:
    """Architecture fields read from the state dict. ``num_heads``/``image_size`` are None when the state
    dict cannot tell (no relative position table / no absolute positions); callers fill them in."""
    def has(name: Optional[str], under: str = "") -> bool:
        return name is not None and (tp + under + name) in sd

    def has_module(name: Optional[str]) -> bool:
        return name is not None and f"{tp}{name}.weight" in sd

    patch = sd.get(f"{tp}{n.patch_embed}.weight")
    if patch is None:
        raise ValueError(f"{tp}{n.patch_embed}.weight not found: this is not a {n.scheme} state dict "
                         f"(first keys: {list(sd)[:5]})")
    width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    # depth from the blocks' core keys only, so one stray key cannot change the architecture we infer
    core = [f"{name}.weight" for name in (n.norm1, n.norm2, n.proj, n.fc1, n.fc2)]
    blocks = [i for i in block_indices(sd, tp + n.block)
              if any(tp + n.block.format(i=i) + c in sd for c in core)]
    depth = blocks[-1] + 1 if blocks else 0
    b0 = n.block.format(i=0)
    fc1 = sd.get(f"{tp}{b0}{n.fc1}.weight")
    mlp_ratio = float(fc1.shape[0]) / width if fc1 is not None else 4.0
    if n.split_qkv is None:
        mode = "qv" if has(n.q_bias_key, b0) else "full" if has(n.qkv_bias_key, b0) else "none"
    else:
        q, k, _ = n.split_qkv
        mode = ("full" if has(f"{k}.bias", b0) else "qv") if has(f"{q}.bias", b0) else "none"
    shared, per_layer = has(n.shared_table), has(n.table, b0)
    if shared and per_layer:
        raise ValueError("the state dict has a shared and per-layer relative position tables; our ViT has one")
    table_key = tp + n.shared_table if shared else tp + b0 + n.table if per_layer else None
    num_heads, image_size = None, None
    if table_key is not None:
        table = sd[table_key]
        num_heads = int(table.shape[-1])
        side = _side(int(table.shape[0]) - relpos.NUM_CLS_ENTRIES, f"{table_key} {tuple(table.shape)}")
        image_size = (side + 1) // 2 * patch_size
    use_cls = has(n.cls_token)
    if has(n.pos_embed):
        pos = sd[tp + n.pos_embed]
        image_size = _side(pos.size // width - int(use_cls), f"{tp}{n.pos_embed} {tuple(pos.shape)}") * patch_size
    fc_norm, final_norm = has_module(n.fc_norm), has_module(n.final_norm)
    head_tp = root_tp if n.head_at_root else tp
    num_classes, head_bias = 0, True
    if n.head_key is not None and head_tp + n.head_key in sd:
        weight = sd[head_tp + n.head_key]
        (kernel,) = n.head_transform.to_flax(np.broadcast_to(np.zeros((), np.float32), weight.shape))
        num_classes = int(kernel.shape[-1])
        head_bias = n.head_bias_key is not None and head_tp + n.head_bias_key in sd
    return dict(
        image_size=image_size, patch_size=patch_size, width=width, depth=depth, num_heads=num_heads,
        mlp_ratio=mlp_ratio, qkv_bias=mode, patch_embed_bias=has(f"{n.patch_embed}.bias"),
        use_abs_pos=has(n.pos_embed), rel_pos="shared" if shared else "per_layer" if per_layer else "none",
        layer_scale_init=0.1 if has(n.gamma_1, b0) else 0.0, layer_norm_eps=1e-6,
        activation="gelu", ln_pre=has_module(n.ln_pre), use_cls_token=use_cls, use_mask_token=has(n.mask_token),
        use_final_norm=final_norm, use_fc_norm=fc_norm,
        pooling="mean" if fc_norm or not use_cls else "cls", num_classes=num_classes, head_bias=head_bias)


_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu"}


def guess_heads(width: int, what: str, notes: Optional[list]) -> int:
    """Heads are not stored in checkpoints without relative position tables: assume 64-wide heads."""
    heads = max(1, width // 64)
    if notes is not None:
        notes.append(f"{what} is not stored in the checkpoint: assumed {heads} (width {width} / 64); "
                     f"override it (--set {what}=N) if the model differs")
    return heads


def finish_vit(cfg: dict, *, eps: float, activation: str = "gelu", hf_config: Optional[Mapping] = None,
               notes: Optional[list] = None) -> dict:
    """Fill what a state dict cannot tell from ``hf_config`` (a HF ``config.json``) or the scheme defaults.

    Guesses (heads, image size) are described in ``notes``."""
    hf = dict(hf_config or {})
    for ours, theirs in (("width", "hidden_size"), ("depth", "num_hidden_layers")):
        if theirs in hf and hf[theirs] != cfg[ours]:
            raise ValueError(f"config.json says {theirs}={hf[theirs]} but the weights have {ours}={cfg[ours]}")
    cfg = dict(cfg)
    if cfg["num_heads"] is None:
        cfg["num_heads"] = int(hf["num_attention_heads"]) if "num_attention_heads" in hf else guess_heads(
            cfg["width"], "num_heads", notes)
    if cfg["image_size"] is None:
        if "image_size" not in hf and notes is not None:
            notes.append("image_size is not stored in the checkpoint: assumed 224 (--set image_size=N)")
        size = hf.get("image_size", 224)
        cfg["image_size"] = int(size[0] if isinstance(size, (list, tuple)) else size)
    cfg["layer_norm_eps"] = float(hf.get("layer_norm_eps", eps))
    act = hf.get("hidden_act", activation)
    if act not in _ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not supported (ours: {sorted(_ACTIVATIONS)})")
    cfg["activation"] = _ACTIVATIONS[act]
    if cfg["layer_scale_init"] > 0:
        cfg["layer_scale_init"] = float(hf.get("layer_scale_init_value") or (0.1 if cfg["width"] <= 768 else 1e-5))
    if cfg["width"] % cfg["num_heads"]:
        raise ValueError(f"width {cfg['width']} is not divisible by num_heads {cfg['num_heads']}")
    return cfg
