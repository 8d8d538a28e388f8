"""The checkpoint layouts we read and write, registered by name (the CLI's ``--format``).

===================  ===================================================================  =====================
format               what                                                                  our model kind
===================  ===================================================================  =====================
official_beitv2      unilm beit2 pretraining (``VisionTransformerForMaskedImageModelingCLS``) beit_pretrain (or vit
                     or a backbone-only subset of it                                       for the subset)
official_finetune    unilm beit2 ``modeling_finetune.VisionTransformer``                   vit
official_vqkd        unilm beit2 VQ-KD tokenizer (teacher/scaling/loss keys ignored)       vqkd
official_beitv2_seg  unilm beit2 ``semantic_segmentation`` UperNet (mmseg ``EncoderDecoder``:  segmentation
                     ``backbone.`` BEiT + fpn1..4, ``decode_head.``, ``auxiliary_head.``)
timm                 timm ``Beit`` (``beit_*``, ``beitv2_*``) and ``VisionTransformer``    vit
dino                 DINO ViT (= timm ViT names)                                           vit
hf_beit              transformers ``Beit{Model,ForMaskedImageModeling,ForImage...}``       vit / beit_pretrain
hf_vit               transformers ``ViTModel`` / ``ViTForImageClassification``             vit
hf_clip              transformers ``CLIPVisionModel[WithProjection]`` / ``CLIPModel``      vit
openai_clip          OpenAI CLIP ``visual.*`` (text tower ignored)                         vit
===================  ===================================================================  =====================

Hugging Face layouts read both the Hub/``save_pretrained`` names and the transformers ≥ 5 module names (option
``naming``: ``hub`` | ``transformers5``, detected on import, ``hub`` on export) and the ``beit.``/``vit.``/
``vision_model.`` prefixes (option ``prefix``).
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np

from beitv2_jax.convert import schemes as S
from beitv2_jax.convert import transforms as T
from beitv2_jax.convert.engine import Layout, Rule, register

_INDEX_BUFFERS = r"relative_position_index$"


def _check_kind(layout: str, kind: str, allowed: tuple):
    if kind not in allowed:
        raise ValueError(f"the {layout} format holds {' or '.join(allowed)} models, not {kind!r}")


def default_num_masked(image_size: int, patch_size: int) -> int:
    """75 of 196 patches (the official ratio), scaled to other grids."""
    patches = (image_size // patch_size) ** 2
    return max(1, int(round(75 * patches / 196)))


# ----------------------------------------------------------------------------------------------- official
def _beit_pretrain_extra_rules(names: S.ViTNames, cfg: Mapping, tp: str, lm_head: str, norm: str) -> list:
    rules = S.rows_to_rules(S.layer_norm_rows("norm", norm) + S.linear_rows("lm_head", lm_head), "params/", tp)
    for j in range(cfg["head_layers"]):
        rules += S.block_rules(names, cfg["backbone"], f"params/cls_pt_layers_{j}/", f"cls_pt_layers.{j}.")
    return rules


def _official_beitv2_rules(kind: str, cfg: Mapping, opts: Mapping) -> list:
    _check_kind("official_beitv2", kind, ("beit_pretrain", "vit"))
    if kind == "vit":
        return S.vit_rules(S.OFFICIAL, cfg)
    rules = S.vit_rules(S.OFFICIAL, cfg["backbone"], fp="params/backbone/")
    return rules + _beit_pretrain_extra_rules(S.OFFICIAL, cfg, "", "lm_head", "norm")


def _official_beitv2_infer(sd: Mapping, opts: Mapping, hf_config: Optional[Mapping], notes: list) -> tuple:
    vit = S.finish_vit(S.infer_vit(S.OFFICIAL, sd), eps=1e-6, notes=notes)
    if "lm_head.weight" not in sd:  # a backbone-only subset
        return "vit", vit
    vit.update(use_final_norm=False, use_fc_norm=False, pooling="none")
    head_layers = len(S.block_indices(sd, "cls_pt_layers.{i}."))
    return "beit_pretrain", dict(
        backbone=vit, vocab_size=int(sd["lm_head.weight"].shape[0]),
        num_masked_patches=default_num_masked(vit["image_size"], vit["patch_size"]),
        early_layers=_official_early_layers(vit["depth"], head_layers, opts, notes), head_layers=head_layers)


# The official recipes: base (12 blocks) --early_layers 9, large (24) 21 (reference §2.1).
OFFICIAL_EARLY_LAYERS = {12: 9, 24: 21}


def _official_early_layers(depth: int, head_layers: int, opts: Mapping, notes: list) -> Optional[int]:
    """The block whose patch tokens feed the aggregation layers: the checkpoint's ``args.early_layers`` (option
    ``early_layers``, see ``torch_io.layout_options``), else the official recipe for depth 12/24, else None (the
    caller must give it: no guess for other depths). Without aggregation layers the value is unused."""
    if "early_layers" in opts:
        return int(opts["early_layers"])
    if not head_layers:
        return max(1, depth - 3)
    if depth in OFFICIAL_EARLY_LAYERS:
        notes.append(f"early_layers is not stored in the checkpoint: assumed {OFFICIAL_EARLY_LAYERS[depth]} "
                     f"(the official recipe for depth {depth})")
        return OFFICIAL_EARLY_LAYERS[depth]
    notes.append(f"early_layers is not stored in the checkpoint (no args.early_layers) and depth {depth} has no "
                 f"official recipe: give it (--set early_layers=N)")
    return None


register(Layout(
    "official_beitv2", "unilm beit2 pretraining checkpoint (cls_pt_layers, lm_head) or its backbone",
    _official_beitv2_rules, _official_beitv2_infer))


def _official_finetune_rules(kind: str, cfg: Mapping, opts: Mapping) -> list:
    _check_kind("official_finetune", kind, ("vit",))
    return S.vit_rules(S.OFFICIAL, cfg)


register(Layout(
    "official_finetune", "unilm beit2 modeling_finetune.VisionTransformer", _official_finetune_rules,
    lambda sd, opts, hf, notes: ("vit", S.finish_vit(S.infer_vit(S.OFFICIAL, sd), eps=1e-6, notes=notes))))


# ----------------------------------------------------------------------------------------------- segmentation
# The official ADE20K configs (upernet_beit_{base,large}_*): out_indices per depth; pool scales and the auxiliary
# head's input level are not stored in a checkpoint.
SEG_OUT_INDICES = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}
DECONV = T.Transform("deconv", lambda w: (w.transpose(2, 3, 0, 1),), lambda k: (k.transpose(2, 3, 0, 1),))


def _seg_bn_rules(fp: str, tp: str) -> list:
    """BatchNorm / SyncBatchNorm ``tp`` ⇄ ``params/{fp}/{scale,bias}`` + ``batch_stats/{fp}/{mean,var}``."""
    return [Rule((f"{tp}.{t}",), (f"{c}/{fp}/{f}",), T.IDENTITY)
            for t, c, f in (("weight", "params", "scale"), ("bias", "params", "bias"),
                            ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))]


def _seg_conv_module_rules(fp: str, tp: str) -> list:
    """mmcv ``ConvModule`` (conv without bias + ``bn``)."""
    return [Rule((f"{tp}.conv.weight",), (f"params/{fp}/conv/kernel",), T.CONV)] + _seg_bn_rules(f"{fp}/bn",
                                                                                                  f"{tp}.bn")


def _seg_deconv_rules(fp: str, tp: str) -> list:
    return [Rule((f"{tp}.weight",), (f"params/{fp}/kernel",), DECONV),
            Rule((f"{tp}.bias",), (f"params/{fp}/bias",), T.IDENTITY)]


def _seg_conv_seg_rules(fp: str, tp: str) -> list:
    return [Rule((f"{tp}.conv_seg.weight",), (f"params/{fp}/conv_seg/kernel",), T.CONV),
            Rule((f"{tp}.conv_seg.bias",), (f"params/{fp}/conv_seg/bias",), T.IDENTITY)]


def official_seg_rules(kind: str, cfg: Mapping, opts: Mapping) -> list:
    """``official_beitv2_seg``: mmseg names of the official UperNet model ⇄ :class:`SegmentationModel` paths."""
    _check_kind("official_beitv2_seg", kind, ("segmentation",))
    bb = cfg["backbone"]
    rules = S.vit_rules(S.OFFICIAL, bb, fp="params/backbone/", tp="backbone.")
    if bb["patch_size"] == 16:
        rules += _seg_deconv_rules("backbone/fpn1/deconv_0", "backbone.fpn1.0")
        rules += _seg_bn_rules("backbone/fpn1/bn", "backbone.fpn1.1")
        rules += _seg_deconv_rules("backbone/fpn1/deconv_1", "backbone.fpn1.3")
        rules += _seg_deconv_rules("backbone/fpn2/deconv_0", "backbone.fpn2.0")
    else:
        rules += _seg_deconv_rules("backbone/fpn1/deconv_0", "backbone.fpn1.0")
    for j in range(len(cfg["pool_scales"])):
        rules += _seg_conv_module_rules(f"decode_head/psp_modules_{j}", f"decode_head.psp_modules.{j}.1")
    rules += _seg_conv_module_rules("decode_head/bottleneck", "decode_head.bottleneck")
    for i in range(3):
        rules += _seg_conv_module_rules(f"decode_head/lateral_convs_{i}", f"decode_head.lateral_convs.{i}")
        rules += _seg_conv_module_rules(f"decode_head/fpn_convs_{i}", f"decode_head.fpn_convs.{i}")
    rules += _seg_conv_module_rules("decode_head/fpn_bottleneck", "decode_head.fpn_bottleneck")
    rules += _seg_conv_seg_rules("decode_head", "decode_head")
    for n in range(cfg["aux_num_convs"]):
        rules += _seg_conv_module_rules(f"auxiliary_head/convs_{n}", f"auxiliary_head.convs.{n}")
    return rules + _seg_conv_seg_rules("auxiliary_head", "auxiliary_head")


def _official_seg_infer(sd: Mapping, opts: Mapping, hf_config: Optional[Mapping], notes: list) -> tuple:
    bb = S.finish_vit(S.infer_vit(S.OFFICIAL, sd, tp="backbone."), eps=1e-6, notes=notes)
    bb.update(use_final_norm=False, use_fc_norm=False, pooling="none", num_classes=0)
    out_indices = opts.get("out_indices") or SEG_OUT_INDICES.get(bb["depth"])
    if out_indices is None:
        notes.append(f"out_indices is not stored in the checkpoint and depth {bb['depth']} has no official "
                     f"config: give it (--set out_indices=[a,b,c,d])")
    elif "out_indices" not in opts:
        notes.append(f"out_indices is not stored in the checkpoint: assumed {out_indices} (the official "
                     f"config for depth {bb['depth']})")
    bb["out_indices"] = out_indices
    if "decode_head.conv_seg.weight" not in sd or "auxiliary_head.conv_seg.weight" not in sd:
        raise ValueError("decode_head.conv_seg / auxiliary_head.conv_seg not found: not an official UperNet "
                         f"segmentation state dict (first keys: {list(sd)[:5]})")
    num_classes, channels = (int(d) for d in sd["decode_head.conv_seg.weight"].shape[:2])
    levels = len(S.block_indices(sd, "decode_head.psp_modules.{i}."))
    pool_scales = opts.get("pool_scales") or ([1, 2, 3, 6] if levels == 4 else None)
    if "pool_scales" not in opts:
        notes.append("pool_scales is not stored in the checkpoint: " + (
            "assumed [1, 2, 3, 6] (the official UperNet)" if levels == 4 else
            f"give the {levels} scales (--set pool_scales=[...])"))
    aux_in_index = int(opts.get("aux_in_index", 2))
    return "segmentation", dict(
        backbone=bb, num_classes=num_classes, channels=channels, pool_scales=pool_scales,
        aux_channels=int(sd["auxiliary_head.conv_seg.weight"].shape[1]),
        aux_num_convs=len(S.block_indices(sd, "auxiliary_head.convs.{i}.")), aux_in_index=aux_in_index)


register(Layout(
    "official_beitv2_seg", "unilm beit2 semantic_segmentation UperNet (mmseg backbone./decode_head./aux head)",
    official_seg_rules, _official_seg_infer, ignore=(r"num_batches_tracked$",)))


# ----------------------------------------------------------------------------------------------- VQ-KD
def vqkd_vit_configs(cfg: Mapping) -> tuple:
    """The encoder and decoder ViT configs of a VQ-KD config (the official architecture)."""
    common = dict(mlp_ratio=4.0, qkv_bias="qv", patch_embed_bias=True, use_abs_pos=True, rel_pos="none",
                  layer_scale_init=0.0, layer_norm_eps=1e-6, activation="gelu", ln_pre=False, use_cls_token=True,
                  use_mask_token=False, use_final_norm=False, use_fc_norm=True, pooling="none", num_classes=0,
                  head_bias=True)
    encoder = dict(common, image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=cfg["width"],
                   depth=cfg["depth"], num_heads=cfg["num_heads"])
    decoder = dict(common, image_size=cfg["image_size"] // cfg["patch_size"], patch_size=1,
                   width=cfg["decoder_width"], depth=cfg["decoder_depth"], num_heads=cfg["decoder_heads"])
    return encoder, decoder


def _vqkd_rules(kind: str, cfg: Mapping, opts: Mapping) -> list:
    _check_kind("official_vqkd", kind, ("vqkd",))
    encoder, decoder = vqkd_vit_configs(cfg)
    rules = S.vit_rules(S.OFFICIAL, encoder, "params/encoder/", "encoder.")
    rules += S.vit_rules(S.OFFICIAL, decoder, "params/decoder/", "decoder.")
    q = "codebook/quantize/"
    rules += [
        Rule(("quantize.cluster_size",), (q + "cluster_size",), T.IDENTITY),
        Rule(("quantize.embedding.weight",), (q + "weight",), T.IDENTITY),
        Rule(("quantize.embedding.cluster_size", "quantize.embedding.embed_avg"), (q + "weight",),
             T.unused_codebook_stats(), derived=True),
        Rule(("quantize.embedding.initted",), (q + "initted",), T.FLAG),
    ]
    rows = []
    for name in ("encode_task_layer", "decode_task_layer"):
        rows += S.linear_rows(f"{name}/fc1", f"{name}.0") + S.linear_rows(f"{name}/fc2", f"{name}.2")
    return rules + S.rows_to_rules(rows, "params/", "")


def _vqkd_infer(sd: Mapping, opts: Mapping, hf_config: Optional[Mapping], notes: list) -> tuple:
    enc = S.infer_vit(S.OFFICIAL, sd, "encoder.")
    dec = S.infer_vit(S.OFFICIAL, sd, "decoder.")
    if "quantize.embedding.weight" not in sd:
        raise ValueError("quantize.embedding.weight not found: this is not a VQ-KD state dict")
    num_codes, code_dim = (int(x) for x in sd["quantize.embedding.weight"].shape)
    teacher = sd.get("decode_task_layer.2.weight")
    return "vqkd", dict(
        image_size=enc["image_size"] or 224, patch_size=enc["patch_size"], width=enc["width"], depth=enc["depth"],
        num_heads=S.guess_heads(enc["width"], "num_heads", notes), decoder_depth=dec["depth"],
        decoder_width=dec["width"], decoder_heads=S.guess_heads(dec["width"], "decoder_heads", notes),
        num_codes=num_codes, code_dim=code_dim, decay=0.99,
        teacher_dim=int(teacher.shape[0]) if teacher is not None else 512, kmeans_init=True)


register(Layout(
    "official_vqkd", "unilm beit2 VQ-KD tokenizer (modeling_vqkd.VQKD)", _vqkd_rules, _vqkd_infer,
    ignore=(r"^teacher", r"^scaling", r"^loss", _INDEX_BUFFERS)))


# ----------------------------------------------------------------------------------------------- timm / DINO
def _timm_rules(kind: str, cfg: Mapping, opts: Mapping) -> list:
    _check_kind("timm", kind, ("vit",))
    return S.vit_rules(S.TIMM, cfg)


def _timm_infer(sd: Mapping, opts: Mapping, hf_config: Optional[Mapping], notes: list) -> tuple:
    return "vit", S.finish_vit(S.infer_vit(S.TIMM, sd), eps=1e-6, notes=notes)


_TIMM_IGNORE = (_INDEX_BUFFERS, r"attn\.k_bias$")  # non-persistent buffers in timm
register(Layout("timm", "timm Beit (beit_*/beitv2_*) and VisionTransformer names", _timm_rules, _timm_infer,
                ignore=_TIMM_IGNORE))
register(Layout("dino", "DINO ViT (timm VisionTransformer names)", _timm_rules, _timm_infer, ignore=_TIMM_IGNORE))


# ----------------------------------------------------------------------------------------------- Hugging Face
_HF5 = re.compile(r"(^|\.)layers\.\d+\.(attention|self_attn)\.q_proj\.")


def _hf_detect(prefix: str):
    def detect(sd: Mapping) -> dict:
        naming = "transformers5" if any(_HF5.search(k) for k in sd) else "hub"
        return {"naming": naming, "prefix": prefix if any(k.startswith(prefix) for k in sd) else ""}

    return detect


def _hf_family_rules(layout: str, names: dict, mim: bool):
    def rules(kind: str, cfg: Mapping, opts: Mapping) -> list:
        _check_kind(layout, kind, ("vit", "beit_pretrain") if mim else ("vit",))
        n = names[opts.get("naming", "hub")]
        prefix = opts.get("prefix", "")
        if kind == "vit":
            return S.vit_rules(n, cfg, tp=prefix)
        if cfg["head_layers"]:
            raise ValueError(f"{layout} cannot hold the patch-aggregation layers (head_layers="
                             f"{cfg['head_layers']}); export the model without them (head_layers=0)")
        if not prefix:
            raise ValueError(f"{layout}: a masked-image-modeling model needs the 'beit.' prefix")
        return S.vit_rules(n, cfg["backbone"], "params/backbone/", prefix) + _beit_pretrain_extra_rules(
            n, cfg, "", "lm_head", "layernorm")

    return rules


def _hf_family_infer(names: dict, eps: float):
    def infer(sd: Mapping, opts: Mapping, hf_config: Optional[Mapping], notes: list) -> tuple:
        n, prefix = names[opts.get("naming", "hub")], opts.get("prefix", "")
        vit = S.finish_vit(S.infer_vit(n, sd, prefix), eps=eps, hf_config=hf_config, notes=notes)
        if "lm_head.weight" not in sd:
            return "vit", vit
        if vit["use_final_norm"]:
            raise ValueError("masked-image-modeling checkpoint with use_mean_pooling=False (two final norms) "
                             "is not supported")
        vit.update(use_fc_norm=False, pooling="none")
        return "beit_pretrain", dict(
            backbone=vit, vocab_size=int(sd["lm_head.weight"].shape[0]),
            num_masked_patches=default_num_masked(vit["image_size"], vit["patch_size"]),
            early_layers=max(1, vit["depth"] - 3), head_layers=0)

    return infer


def _hf_default_options(prefix: str):
    def options(kind: str, cfg: Mapping) -> dict:
        needs_prefix = kind == "beit_pretrain" or cfg.get("num_classes", 0) > 0
        return {"naming": "hub", "prefix": prefix if needs_prefix else ""}

    return options


register(Layout(
    "hf_beit", "transformers BEiT (BeitModel, BeitForMaskedImageModeling, BeitForImageClassification)",
    _hf_family_rules("hf_beit", S.HF_BEIT, mim=True), _hf_family_infer(S.HF_BEIT, eps=1e-12),
    ignore=(_INDEX_BUFFERS,), detect_options=_hf_detect("beit."), default_options=_hf_default_options("beit.")))
register(Layout(
    "hf_vit", "transformers ViT (ViTModel, ViTForImageClassification); the tanh pooler is ignored",
    _hf_family_rules("hf_vit", S.HF_VIT, mim=False), _hf_family_infer(S.HF_VIT, eps=1e-12),
    ignore=(r"(^|\.)pooler\.dense\.",), detect_options=_hf_detect("vit."),
    default_options=_hf_default_options("vit.")))


def _clip_rules(layout: str, names: S.ViTNames, default_prefix: str):
    def rules(kind: str, cfg: Mapping, opts: Mapping) -> list:
        _check_kind(layout, kind, ("vit",))
        return S.vit_rules(names, cfg, tp=opts.get("prefix", default_prefix))

    return rules


def _clip_infer(names: S.ViTNames, default_prefix: str):
    def infer(sd: Mapping, opts: Mapping, hf_config: Optional[Mapping], notes: list) -> tuple:
        vit = S.infer_vit(names, sd, opts.get("prefix", default_prefix))
        return "vit", S.finish_vit(vit, eps=1e-5, activation="quick_gelu", hf_config=hf_config, notes=notes)

    return infer


register(Layout(
    "hf_clip", "transformers CLIP vision tower (CLIPVisionModel[WithProjection], CLIPModel; text ignored)",
    _clip_rules("hf_clip", S.HF_CLIP, ""), _clip_infer(S.HF_CLIP, ""),
    ignore=(r"^text_model\.", r"^text_projection\.", r"^logit_scale$", r"position_ids$"),
    detect_options=lambda sd: {"prefix": "vision_model." if any(k.startswith("vision_model.") for k in sd)
                               else ""},
    default_options=lambda kind, cfg: {"prefix": "vision_model."}))
register(Layout(
    "openai_clip", "OpenAI CLIP visual tower (visual.*; every other key is ignored)",
    _clip_rules("openai_clip", S.OPENAI_CLIP, "visual."), _clip_infer(S.OPENAI_CLIP, "visual."),
    ignore=(r"^(?!visual\.)",)))


# ----------------------------------------------------------------------------------------------- helpers
def pretrain_as_backbone(variables: Mapping, config: Mapping) -> tuple:
    """A ``beit_pretrain`` model's backbone + final norm as a ``vit`` (what timm loads from a pt1k checkpoint).

    Returns ``(variables, vit_config, dropped)``: ``dropped`` lists the parameters left out (mask token,
    LM head, patch-aggregation layers).
    """
    from beitv2_jax.convert.model_shapes import normalize_config

    config = normalize_config("beit_pretrain", config)
    params = dict(variables["params"])
    backbone = dict(params.pop("backbone"))
    backbone["norm"] = params.pop("norm")
    dropped = [f"params/{k}" for k in params]
    if "mask_token" in backbone:
        backbone.pop("mask_token")
        dropped.append("params/backbone/mask_token")
    cfg = dict(config["backbone"], use_final_norm=True, use_fc_norm=False, pooling="cls", use_mask_token=False)
    return {"params": backbone}, cfg, dropped


def without_aggregation_head(variables: Mapping, config: Mapping) -> tuple:
    """A ``beit_pretrain`` model without its patch-aggregation layers (``head_layers=0``, e.g. for hf_beit)."""
    from beitv2_jax.convert.model_shapes import normalize_config

    config = normalize_config("beit_pretrain", config)
    params = {k: v for k, v in variables["params"].items() if not k.startswith("cls_pt_layers_")}
    dropped = [f"params/{k}" for k in variables["params"] if k.startswith("cls_pt_layers_")]
    return dict(variables, params=params), dict(config, head_layers=0), dropped


def timm_model_args(cfg: Mapping) -> tuple:
    """``(class name, kwargs)`` of the timm model that loads a ``timm`` export of a ViT config ``cfg``."""
    from beitv2_jax.convert.model_shapes import normalize_config

    cfg = normalize_config("vit", cfg)
    beit = cfg["qkv_bias"] == "qv" or cfg["rel_pos"] != "none" or cfg["layer_scale_init"] > 0
    if cfg["activation"] != "gelu" or (cfg["ln_pre"] and beit) or (cfg["use_fc_norm"] and cfg["use_final_norm"]):
        raise ValueError("timm Beit/VisionTransformer cannot express this model (activation, ln_pre or both "
                         "final norms)")
    pool = "avg" if cfg["use_fc_norm"] else "token"
    common = dict(img_size=cfg["image_size"], patch_size=cfg["patch_size"], num_classes=cfg["num_classes"],
                  global_pool=pool, embed_dim=cfg["width"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                  mlp_ratio=cfg["mlp_ratio"])
    if beit:
        if cfg["qkv_bias"] == "full" or not cfg["patch_embed_bias"] or not cfg["use_cls_token"]:
            raise ValueError("timm Beit needs q/v (or no) qkv bias, a patch-embed bias and a class token")
        return "Beit", dict(common, qkv_bias=cfg["qkv_bias"] == "qv", use_abs_pos_emb=cfg["use_abs_pos"],
                            use_rel_pos_bias=cfg["rel_pos"] == "per_layer",
                            use_shared_rel_pos_bias=cfg["rel_pos"] == "shared",
                            init_values=cfg["layer_scale_init"] or None)
    if not cfg["use_abs_pos"] or not cfg["use_cls_token"]:
        raise ValueError("timm VisionTransformer export needs absolute positions and a class token")
    return "VisionTransformer", dict(common, qkv_bias=cfg["qkv_bias"] == "full", pre_norm=cfg["ln_pre"],
                                     fc_norm=cfg["use_fc_norm"], final_norm=cfg["use_final_norm"] or
                                     cfg["use_fc_norm"])


def hf_beit_config(kind: str, cfg: Mapping, labels=None) -> dict:
    """A ``BeitConfig`` dict (``config.json``) for an ``hf_beit`` export."""
    mim = kind == "beit_pretrain"
    vit = cfg["backbone"] if mim else cfg
    if vit["qkv_bias"] != "qv" or not vit["patch_embed_bias"] or vit["ln_pre"] or not vit["use_cls_token"]:
        raise ValueError("transformers BEiT needs q/v bias, a patch-embed bias, a class token and no ln_pre")
    out = dict(
        model_type="beit", hidden_size=vit["width"], num_hidden_layers=vit["depth"],
        num_attention_heads=vit["num_heads"], intermediate_size=int(vit["width"] * vit["mlp_ratio"]),
        hidden_act=vit["activation"], image_size=vit["image_size"], patch_size=vit["patch_size"], num_channels=3,
        layer_norm_eps=vit["layer_norm_eps"], use_mask_token=vit["use_mask_token"],
        use_absolute_position_embeddings=vit["use_abs_pos"],
        use_relative_position_bias=vit["rel_pos"] == "per_layer",
        use_shared_relative_position_bias=vit["rel_pos"] == "shared",
        layer_scale_init_value=vit["layer_scale_init"], use_mean_pooling=not vit["use_final_norm"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    if mim:
        out.update(vocab_size=cfg["vocab_size"], architectures=["BeitForMaskedImageModeling"])
    elif vit["num_classes"]:
        out.update(architectures=["BeitForImageClassification"], **_labels(vit["num_classes"], labels))
    else:
        out.update(architectures=["BeitModel"])
    return out


def _labels(num_classes: int, labels=None) -> dict:
    names = list(labels) if labels else [f"LABEL_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a {num_classes}-class head")
    return dict(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})


def hf_vit_config(cfg: Mapping, labels=None) -> dict:
    """A ``ViTConfig`` dict (``config.json``) for an ``hf_vit`` export (no pooler: load with
    ``add_pooling_layer=False``; a classifier reads the final-normed class token as ours does)."""
    if (cfg["qkv_bias"] == "qv" or cfg["rel_pos"] != "none" or cfg["layer_scale_init"] > 0 or cfg["ln_pre"]
            or not cfg["use_abs_pos"] or not cfg["use_cls_token"] or not cfg["use_final_norm"] or cfg["use_fc_norm"]
            or not cfg["patch_embed_bias"] or cfg["activation"] != "gelu"):
        raise ValueError("transformers ViT needs absolute positions, a class token, a final norm, GELU, no "
                         "relative positions, layer scale, fc_norm, ln_pre or q/v-only bias")
    out = dict(model_type="vit", hidden_size=cfg["width"], num_hidden_layers=cfg["depth"],
               num_attention_heads=cfg["num_heads"], intermediate_size=int(cfg["width"] * cfg["mlp_ratio"]),
               hidden_act="gelu", layer_norm_eps=cfg["layer_norm_eps"], image_size=cfg["image_size"],
               patch_size=cfg["patch_size"], num_channels=3, qkv_bias=cfg["qkv_bias"] == "full",
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if cfg["num_classes"]:
        return dict(out, architectures=["ViTForImageClassification"], **_labels(cfg["num_classes"], labels))
    return dict(out, architectures=["ViTModel"])


def hf_clip_config(cfg: Mapping) -> dict:
    """A ``CLIPVisionConfig`` dict (``config.json``) for an ``hf_clip`` export (``CLIPVisionModel``, or
    ``CLIPVisionModelWithProjection`` when the model has the projection as its bias-free head)."""
    if (cfg["qkv_bias"] != "full" or cfg["rel_pos"] != "none" or cfg["layer_scale_init"] > 0 or not cfg["ln_pre"]
            or not cfg["use_abs_pos"] or not cfg["use_cls_token"] or cfg["patch_embed_bias"]
            or (cfg["num_classes"] and cfg["head_bias"])):
        raise ValueError("transformers CLIP needs ln_pre, absolute positions, a class token, full qkv bias, no "
                         "patch-embed bias and a bias-free projection head")
    out = dict(model_type="clip_vision_model", hidden_size=cfg["width"], num_hidden_layers=cfg["depth"],
               num_attention_heads=cfg["num_heads"], intermediate_size=int(cfg["width"] * cfg["mlp_ratio"]),
               hidden_act=cfg["activation"], layer_norm_eps=cfg["layer_norm_eps"], image_size=cfg["image_size"],
               patch_size=cfg["patch_size"], num_channels=3, attention_dropout=0.0)
    if cfg["num_classes"]:
        return dict(out, projection_dim=cfg["num_classes"], architectures=["CLIPVisionModelWithProjection"])
    return dict(out, architectures=["CLIPVisionModel"])


# PIL resampling codes, as transformers' image processors store them.
_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def hf_preprocessor_config(preprocessing: Mapping) -> dict:
    """``preprocessor_config.json`` for our preprocessing: shorter side to ``int(size / crop_pct)``, centre crop,
    ``/ 255``, mean/std — the steps of transformers' ``CLIPImageProcessor`` (BEiT's and ViT's processors resize to
    a square instead, which is not what our models were evaluated with)."""
    size = int(preprocessing["image_size"])
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": int(size / preprocessing["crop_pct"])},
            "resample": _PIL_RESAMPLE[preprocessing["interpolation"]], "do_center_crop": True,
            "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(preprocessing["mean"]), "image_std": list(preprocessing["std"]),
            "do_convert_rgb": True}


def describe_state_dict(sd: Mapping[str, np.ndarray]) -> str:
    return f"{len(sd)} tensors, {sum(int(np.prod(v.shape)) for v in sd.values()):,} values"
