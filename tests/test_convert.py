"""Tests for beitv2_jax.convert: exact PyTorch → Flax → PyTorch round trips for every layout, the official
checkpoint layouts at base size against the reference key list, clear errors, the store and the CLI."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from beitv2_jax.convert import (ConversionError, export_variables, import_state_dict, infer_config, store,
                                summarize_keys, torch_io)
from beitv2_jax.convert.engine import flatten_variables, unflatten_variables
from beitv2_jax.convert.model_shapes import build_model, count_params, param_shapes
from beitv2_jax.models import relpos

transformers.utils.logging.disable_progress_bar()
REPO = Path(__file__).resolve().parents[1]
KEYS_FILE = Path(__file__).parent / "data" / "beitv2_state_dict_keys.txt"
HF_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                patch_size=8)


# ----------------------------------------------------------------------------------------------- helpers
def reference_keys(section: str) -> list:
    """Rows ``(key, shape, note)`` of section a (pretraining), b (vqkd) or c (fine-tuned) of the key list."""
    rows, current = [], None
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("## ("):
            current = line[4]
            continue
        if current != section or not line.strip() or line.startswith("#"):
            continue
        m = re.match(r"^(\S+) \(([\d, ]*)\)\s*(.*)$", line)
        shape = tuple(int(x) for x in m.group(2).replace(" ", "").split(",") if x)
        rows.append((m.group(1), shape, m.group(3).strip()))
    return rows


def random_state_dict(rows, seed=0) -> dict:
    """Random float32 tensors for the listed keys; index buffers and ``initted`` get their real values."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape, _ in rows:
        if key.endswith("relative_position_index"):
            side = int(round((shape[0] - 1) ** 0.5))
            out[key] = relpos.relative_position_index((side, side)).astype(np.int64)
        elif key.endswith("initted"):
            out[key] = np.ones(shape, np.float32)
        else:
            out[key] = rng.standard_normal(shape, dtype=np.float32)
    return out


def random_variables(kind, config, seed=0) -> dict:
    """Random variables with exactly the model's init shapes (no real init)."""
    rng = np.random.default_rng(seed)
    flat = {p: (np.ones(s.shape, s.dtype) if np.issubdtype(s.dtype, np.integer)
                else rng.standard_normal(s.shape).astype(s.dtype)) for p, s in param_shapes(kind, config).items()}
    return unflatten_variables(flat)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def torch_sd(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def hub_sd(model, tmp_path) -> dict:
    model.save_pretrained(tmp_path)
    return load_file(os.path.join(tmp_path, "model.safetensors"))


def assert_same_tensors(exported: dict, original: dict, keys=None):
    keys = list(original) if keys is None else keys
    assert sorted(exported) == sorted(keys)
    for k in keys:
        assert exported[k].shape == original[k].shape and exported[k].dtype == original[k].dtype, k
        assert np.array_equal(exported[k], original[k]), k


def assert_same_variables(a, b):
    fa, fb = flatten_variables(a), flatten_variables(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def pattern_set(keys) -> set:
    return {re.sub(r"(?<=\.)\d+(?=\.)", "{}", k) for k in keys}


def expected_shapes_match(result):
    shapes = param_shapes(result.model_kind, result.model_config)
    flat = flatten_variables(result.variables)
    assert flat.keys() == shapes.keys()
    for p, s in shapes.items():
        assert flat[p].shape == s.shape and flat[p].dtype == s.dtype, p


# ----------------------------------------------------------------------------------------------- official, base size
def test_reference_key_list_counts():
    """Reference §4: 220 / 220 / 211 keys; parameter totals without buffers (and without frozen codebook)."""
    a, b, c = (reference_keys(s) for s in "abc")
    assert (len(a), len(b), len(c)) == (220, 220, 211)
    size = lambda rows, skip=("buffer",): sum(int(np.prod(s)) for _, s, n in rows  # noqa: E731
                                              if not any(x in n for x in skip))
    assert size(a) == 106_143_056
    assert size(b, ("buffer", "requires_grad=False")) == 108_829_216
    assert size(b, ("buffer",)) - size(b, ("buffer", "requires_grad=False")) == 532_480
    assert size(c) == 86_530_984


def test_official_beitv2_base_pretraining_checkpoint():
    rows = reference_keys("a")
    sd = random_state_dict(rows, seed=1)
    result = import_state_dict(sd, "official_beitv2")
    cfg = result.model_config
    assert result.model_kind == "beit_pretrain" and result.ignored == []
    bb = cfg["backbone"]
    assert (bb["width"], bb["depth"], bb["num_heads"], bb["image_size"], bb["patch_size"]) == (768, 12, 12, 224, 16)
    assert (bb["qkv_bias"], bb["rel_pos"], bb["use_mask_token"], bb["use_abs_pos"], bb["use_final_norm"]) == (
        "qv", "shared", True, False, False)
    assert bb["layer_scale_init"] > 0
    assert (cfg["vocab_size"], cfg["head_layers"], cfg["early_layers"], cfg["num_masked_patches"]) == (8192, 2, 9, 75)
    # our BEiTPretrainModel: 219 params (+ the index buffer = 220 keys), 106,143,056 values
    assert len(param_shapes("beit_pretrain", cfg)) == 219
    assert count_params("beit_pretrain", cfg) == 106_143_056
    expected_shapes_match(result)
    exported = export_variables(result.variables, "official_beitv2", result.model_kind, cfg)
    assert list(exported) == [k for k, _, _ in rows]  # same keys, same (registration) order
    assert_same_tensors(exported, sd)


def test_official_vqkd_base_tokenizer_checkpoint():
    rows = reference_keys("b")
    sd = random_state_dict(rows, seed=2)
    extras = {"teacher_model.visual.conv1.weight": np.zeros((4, 3, 2, 2), np.float32),
              "teacher_model.logit_scale": np.zeros((), np.float32),
              "scaling_layer.shift": np.zeros((1, 3, 1, 1), np.float32),
              "loss_fn.dummy": np.zeros((1,), np.float32)}
    result = import_state_dict({**sd, **extras}, "official_vqkd")
    assert sorted(result.ignored) == sorted(extras)
    cfg = result.model_config
    assert result.model_kind == "vqkd"
    assert {k: cfg[k] for k in ("image_size", "patch_size", "width", "depth", "num_heads", "decoder_depth",
                                "decoder_width", "decoder_heads", "num_codes", "code_dim", "teacher_dim")} == dict(
        image_size=224, patch_size=16, width=768, depth=12, num_heads=12, decoder_depth=3, decoder_width=768,
        decoder_heads=12, num_codes=8192, code_dim=32, teacher_dim=512)
    assert count_params("vqkd", cfg) == 108_829_216
    assert [n.split()[0] for n in result.notes] == ["num_heads", "decoder_heads"]  # not in the file: 768/64
    codebook = flatten_variables(result.variables)
    assert {k: v.shape for k, v in codebook.items() if k.startswith("codebook/")} == {
        "codebook/quantize/weight": (8192, 32), "codebook/quantize/cluster_size": (8192,),
        "codebook/quantize/initted": ()}
    assert codebook["codebook/quantize/initted"].dtype == np.int32
    expected_shapes_match(result)  # against the VQKD model's own init shapes
    exported = export_variables(result.variables, "official_vqkd", "vqkd", cfg)
    assert list(exported) == [k for k, _, _ in rows]
    unused = ["quantize.embedding.cluster_size", "quantize.embedding.embed_avg"]
    assert_same_tensors({k: v for k, v in exported.items() if k not in unused},
                        {k: v for k, v in sd.items() if k not in unused})
    # the unused EmbeddingEMA statistics map nowhere and are re-created on export
    assert np.array_equal(exported["quantize.embedding.cluster_size"], np.zeros(8192, np.float32))
    assert np.array_equal(exported["quantize.embedding.embed_avg"], sd["quantize.embedding.weight"])


def test_official_finetune_base_checkpoint():
    rows = reference_keys("c")
    sd = random_state_dict(rows, seed=3)
    result = import_state_dict(sd, "official_finetune")
    cfg = result.model_config
    assert result.model_kind == "vit"
    assert (cfg["rel_pos"], cfg["use_fc_norm"], cfg["use_final_norm"], cfg["pooling"], cfg["num_classes"]) == (
        "per_layer", True, False, "mean", 1000)
    assert count_params("vit", cfg) == 86_530_984
    assert infer_config(sd, "official_finetune") == ("vit", cfg, [])  # heads come from the tables
    expected_shapes_match(result)
    exported = export_variables(result.variables, "official_finetune", "vit", cfg)
    assert list(exported) == [k for k, _, _ in rows]
    assert_same_tensors(exported, sd)


# ----------------------------------------------------------------------------------------------- official, small
SMALL_BACKBONE = dict(image_size=32, patch_size=8, width=64, depth=4, num_heads=4, qkv_bias="qv", rel_pos="shared",
                      layer_scale_init=0.1, use_mask_token=True, use_final_norm=False, pooling="none")
SMALL_PRETRAIN = dict(backbone=SMALL_BACKBONE, vocab_size=50, num_masked_patches=6, early_layers=2, head_layers=2)


def test_official_beitv2_small_both_directions():
    variables = random_variables("beit_pretrain", SMALL_PRETRAIN, seed=4)
    sd = export_variables(variables, "official_beitv2", "beit_pretrain", SMALL_PRETRAIN)
    base = [k for k, _, _ in reference_keys("a")]
    assert pattern_set(sd) == pattern_set(base)  # the same names, fewer blocks
    result = import_state_dict(sd, "official_beitv2", overrides={"early_layers": 2, "num_masked_patches": 6})
    assert_same_variables(result.variables, variables)
    assert_same_tensors(export_variables(result.variables, "official_beitv2", "beit_pretrain", result.model_config),
                        sd)


def test_official_beitv2_early_layers_from_args_or_required(tmp_path):
    """early_layers (the block feeding the aggregation layers) is not in the weights: read the official checkpoint's
    ``args.early_layers``; without it a non-standard depth is an error asking for it (it used to be depth − 3 = 1
    here, which changes the aggregation output); given as an override it is taken as is."""
    import argparse

    variables = random_variables("beit_pretrain", SMALL_PRETRAIN, seed=7)
    sd = export_variables(variables, "official_beitv2", "beit_pretrain", SMALL_PRETRAIN)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 1,
                "args": argparse.Namespace(early_layers=2, head_layers=2, lr=1.5e-3, model="tiny")},
               tmp_path / "with_args.pth")
    loaded, dropped, args = torch_io.load_checkpoint(str(tmp_path / "with_args.pth"))
    assert args["early_layers"] == 2 and torch_io.layout_options(args) == {"early_layers": 2} and not dropped
    result = import_state_dict(loaded, "official_beitv2", options=torch_io.layout_options(args))
    assert result.model_config["early_layers"] == 2 and not any("early_layers" in n for n in result.notes)
    assert_same_variables(result.variables, variables)
    with pytest.raises(ConversionError, match=r"early_layers is not stored .* depth 4 has no official recipe"):
        import_state_dict(sd, "official_beitv2")
    assert import_state_dict(sd, "official_beitv2", overrides={"early_layers": 3}).model_config["early_layers"] == 3
    from beitv2_jax.convert import cli as convert_cli

    assert convert_cli.main(["--format", "official_beitv2", "--input", str(tmp_path / "with_args.pth"),
                             "--output", str(tmp_path / "o")]) == 0
    assert store.load_variables(str(tmp_path / "o"))[2]["early_layers"] == 2


def test_official_beitv2_backbone_only_subset():
    variables = random_variables("beit_pretrain", SMALL_PRETRAIN, seed=5)
    sd = export_variables(variables, "official_beitv2", "beit_pretrain", SMALL_PRETRAIN)
    subset = {k: v for k, v in sd.items() if not k.startswith(("lm_head", "cls_pt_layers"))}
    result = import_state_dict(subset, "official_beitv2")
    cfg = result.model_config
    assert result.model_kind == "vit"
    assert (cfg["rel_pos"], cfg["use_mask_token"], cfg["use_final_norm"], cfg["pooling"]) == (
        "shared", True, True, "cls")
    assert_same_variables(result.variables["params"]["blocks_3"], variables["params"]["backbone"]["blocks_3"])
    assert_same_tensors(export_variables(result.variables, "official_beitv2", "vit", cfg), subset)


def test_official_vqkd_small_matches_model_layout():
    cfg = dict(image_size=32, patch_size=8, width=64, depth=2, num_heads=4, decoder_depth=1, decoder_width=64,
               decoder_heads=4, num_codes=16, code_dim=8, teacher_dim=24)
    variables = random_variables("vqkd", cfg, seed=6)
    sd = export_variables(variables, "official_vqkd", "vqkd", cfg)
    assert pattern_set(sd) == pattern_set(k for k, _, _ in reference_keys("b"))
    assert sd["decoder.patch_embed.proj.weight"].shape == (64, 8, 1, 1)
    assert sd["quantize.embedding.initted"].shape == (1,)
    result = import_state_dict(sd, "official_vqkd")
    assert result.model_config["num_heads"] == 1 and len(result.notes) == 2  # width 64 / 64: a guess, noted
    result = import_state_dict(sd, "official_vqkd", overrides={"num_heads": 4, "decoder_heads": 4})
    assert result.notes == []
    assert all(result.model_config[k] == v for k, v in cfg.items())
    assert_same_variables(result.variables, variables)
    # and the VQKD model runs on the imported variables
    model = build_model("vqkd", result.model_config)
    out = model.apply(result.variables, np.zeros((1, 32, 32, 3), np.float32))
    assert out["features"].shape == (1, 16, 24)


# ----------------------------------------------------------------------------------------------- other layouts
def _timm_beit(shared: bool):
    from timm.models.beit import Beit

    kw = dict(use_shared_rel_pos_bias=True, global_pool="token", num_classes=0, init_values=None) if shared else \
        dict(use_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1, num_classes=5)
    return Beit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, **kw)


def _case(name, tmp_path):
    """(format, state dict, hf_config, overrides, expected ignored keys)."""
    from timm.models.vision_transformer import VisionTransformer

    beit = lambda **kw: transformers.BeitConfig(**HF_SMALL, **kw)  # noqa: E731
    clip_cfg = transformers.CLIPVisionConfig(**HF_SMALL, projection_dim=24)
    if name == "timm_beit_per_layer":
        return "timm", torch_sd(randomize_(_timm_beit(False), 1)), None, None, []
    if name == "timm_beit_shared":
        return "timm", torch_sd(randomize_(_timm_beit(True), 2)), None, None, []
    if name == "dino":
        vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0)
        return "dino", torch_sd(randomize_(vit, 3)), None, {"num_heads": 4}, []
    if name == "hf_beit_model_hub":
        config = beit(use_relative_position_bias=True, layer_scale_init_value=0.1, use_mean_pooling=True)
        return "hf_beit", hub_sd(randomize_(transformers.BeitModel(config), 4), tmp_path), config.to_dict(), None, []
    if name == "hf_beit_model_transformers5":
        config = beit(use_shared_relative_position_bias=True, use_mean_pooling=False)
        return "hf_beit", torch_sd(randomize_(transformers.BeitModel(config), 5)), config.to_dict(), None, []
    if name == "hf_beit_mim":
        config = beit(use_shared_relative_position_bias=True, use_mask_token=True, vocab_size=40,
                      layer_scale_init_value=0.1)
        model = randomize_(transformers.BeitForMaskedImageModeling(config), 6)
        return "hf_beit", hub_sd(model, tmp_path), config.to_dict(), None, []
    if name == "hf_beit_classifier":
        config = beit(use_relative_position_bias=True, num_labels=3, use_absolute_position_embeddings=True)
        model = randomize_(transformers.BeitForImageClassification(config), 7)
        return "hf_beit", hub_sd(model, tmp_path), config.to_dict(), None, []
    if name == "hf_vit_with_pooler":
        config = transformers.ViTConfig(**HF_SMALL)
        sd = hub_sd(randomize_(transformers.ViTModel(config), 8), tmp_path)
        return "hf_vit", sd, config.to_dict(), None, ["pooler.dense.bias", "pooler.dense.weight"]
    if name == "hf_vit_classifier":
        config = transformers.ViTConfig(**HF_SMALL, num_labels=4)
        sd = torch_sd(randomize_(transformers.ViTForImageClassification(config), 9))
        return "hf_vit", sd, config.to_dict(), None, []
    if name == "hf_clip_with_projection":
        sd = hub_sd(randomize_(transformers.CLIPVisionModelWithProjection(clip_cfg), 10), tmp_path)
        return "hf_clip", sd, clip_cfg.to_dict(), None, []
    if name == "hf_clip_vision_model":
        sd = torch_sd(randomize_(transformers.CLIPVisionModel(clip_cfg), 11))
        return "hf_clip", sd, clip_cfg.to_dict(), None, []
    if name == "openai_clip":
        from test_parity import openai_names

        sd = openai_names(hub_sd(randomize_(transformers.CLIPVisionModelWithProjection(clip_cfg), 12), tmp_path))
        return "openai_clip", sd, None, {"num_heads": 4}, ["logit_scale", "transformer.resblocks.0.ln_1.weight"]
    raise KeyError(name)


ROUND_TRIP_CASES = ["timm_beit_per_layer", "timm_beit_shared", "dino", "hf_beit_model_hub",
                    "hf_beit_model_transformers5", "hf_beit_mim", "hf_beit_classifier", "hf_vit_with_pooler",
                    "hf_vit_classifier", "hf_clip_with_projection", "hf_clip_vision_model", "openai_clip"]


@pytest.mark.parametrize("name", ROUND_TRIP_CASES)
def test_round_trip_is_exact(name, tmp_path):
    fmt, sd, hf_config, overrides, ignored = _case(name, tmp_path)
    result = import_state_dict(sd, fmt, hf_config=hf_config, overrides=overrides)
    assert sorted(result.ignored) == sorted(ignored)
    expected_shapes_match(result)
    exported = export_variables(result.variables, fmt, result.model_kind, result.model_config,
                                options=result.options)
    assert_same_tensors(exported, sd, keys=[k for k in sd if k not in ignored])
    if fmt in ("timm", "dino"):  # the timm model our export helper describes loads it strictly
        import timm.models.beit
        import timm.models.vision_transformer

        from beitv2_jax.convert.layouts import timm_model_args

        cls_name, kwargs = timm_model_args(result.model_config)
        module = timm.models.beit if cls_name == "Beit" else timm.models.vision_transformer
        getattr(module, cls_name)(**kwargs).load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()},
                                                            strict=True)


# ----------------------------------------------------------------------------------------------- errors
def _small_timm_sd():
    return torch_sd(randomize_(_timm_beit(False), 13))


def test_missing_and_unexpected_keys_are_reported_together():
    sd = _small_timm_sd()
    del sd["blocks.1.attn.q_bias"], sd["blocks.1.mlp.fc2.bias"], sd["blocks.0.norm2.weight"]
    sd["blocks.7.attn.extra"] = np.zeros(3, np.float32)
    sd["pos_embed_typo"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as info:
        import_state_dict(sd, "timm")
    err = info.value
    assert isinstance(err, ValueError)
    assert sorted(err.missing) == ["blocks.0.norm2.weight", "blocks.1.attn.q_bias", "blocks.1.mlp.fc2.bias"]
    assert sorted(err.unexpected) == ["blocks.7.attn.extra", "pos_embed_typo"]
    for key in err.missing + err.unexpected:
        assert key in str(err)


def test_shape_mismatch_names_the_key():
    sd = _small_timm_sd()
    sd["blocks.1.mlp.fc1.weight"] = np.zeros((100, 64), np.float32)
    sd["blocks.1.attn.relative_position_bias_table"] = np.zeros((40, 4), np.float32)
    with pytest.raises(ConversionError) as info:
        import_state_dict(sd, "timm")
    message = str(info.value)
    assert "shape mismatch: blocks.1.mlp.fc1.weight (100, 64)" in message
    assert "blocks.1.attn.relative_position_bias_table (40, 4)" in message
    # a tensor the architecture is read from: the error names it too
    sd["blocks.0.attn.relative_position_bias_table"] = np.zeros((40, 4), np.float32)
    with pytest.raises(ValueError, match=re.escape("blocks.0.attn.relative_position_bias_table (40, 4)")):
        import_state_dict(sd, "timm")


def test_wrong_format_is_an_error():
    sd = _small_timm_sd()
    with pytest.raises(ValueError, match="not a hf_beit/hub state dict"):
        import_state_dict(sd, "hf_beit")
    with pytest.raises(ConversionError, match="unexpected"):
        import_state_dict({**sd, "rel_pos_bias.relative_position_index": np.zeros((17, 17), np.int64)},
                          "official_finetune")


def test_wrong_relative_position_index_is_an_error():
    sd = export_variables(random_variables("beit_pretrain", SMALL_PRETRAIN), "official_beitv2", "beit_pretrain",
                          SMALL_PRETRAIN)
    sd["rel_pos_bias.relative_position_index"] = sd["rel_pos_bias.relative_position_index"][::-1].copy()
    with pytest.raises(ConversionError, match="is not the BEiT index"):
        import_state_dict(sd, "official_beitv2", overrides={"early_layers": 2})


def test_export_reports_missing_and_unexpected_variables():
    cfg = dict(SMALL_BACKBONE, use_mask_token=False, use_final_norm=True, pooling="cls")
    variables = random_variables("vit", cfg)
    params = variables["params"]
    del params["blocks_2"]["mlp"]["fc1"]["bias"]
    params["extra"] = np.zeros(2, np.float32)
    with pytest.raises(ConversionError) as info:
        export_variables(variables, "timm", "vit", cfg)
    assert info.value.missing == ["params/blocks_2/mlp/fc1/bias"]
    assert info.value.unexpected == ["params/extra"]


def test_unsupported_feature_for_a_format_is_an_error():
    cfg = dict(SMALL_BACKBONE, qkv_bias="full", use_mask_token=False, use_final_norm=True, pooling="cls")
    with pytest.raises(ValueError, match="cannot hold qkv_bias='full'"):
        export_variables(random_variables("vit", cfg), "hf_beit", "vit", cfg)


def test_summarize_keys_is_compact_and_lossless():
    keys = [f"blocks.{i}.attn.q_bias" for i in range(12)] + ["blocks.3.norm1.weight", "blocks.5.norm1.weight",
                                                             "head.weight"]
    assert summarize_keys(keys) == ["blocks.{0-11}.attn.q_bias", "blocks.{3,5}.norm1.weight", "head.weight"]
    assert summarize_keys(["a.1.b.2", "a.2.b.1"]) == ["a.1.b.2", "a.2.b.1"]


def test_boxed_flax_variables_export():
    """Variables straight from ``model.init`` (nn.Partitioned boxes) export like plain arrays."""
    cfg = dict(SMALL_BACKBONE, use_mask_token=False, use_final_norm=True, pooling="cls")
    model = build_model("vit", cfg)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
    assert any(isinstance(x, nn.Partitioned) for x in jax.tree.leaves(
        variables, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
    sd = export_variables(variables, "timm", "vit", cfg)
    back = import_state_dict(sd, "timm")
    assert_same_variables(back.variables, nn.meta.unbox(variables))


# ----------------------------------------------------------------------------------------------- store
def test_store_round_trip(tmp_path):
    cfg = dict(image_size=32, patch_size=8, width=64, depth=1, num_heads=4, decoder_depth=1, decoder_width=64,
               decoder_heads=4, num_codes=16, code_dim=8, teacher_dim=24)
    variables = random_variables("vqkd", cfg, seed=7)
    directory = tmp_path / "tok"
    store.save_variables(str(directory), variables, "vqkd", cfg, info={"source": "test"})
    assert sorted(os.listdir(tmp_path)) == ["tok"]  # no temporary directories left behind
    assert sorted(os.listdir(directory)) == ["model.json", "variables"]
    description = json.loads((directory / "model.json").read_text())
    assert description["model_kind"] == "vqkd" and description["collections"] == ["codebook", "params"]
    loaded, kind, loaded_cfg = store.load_variables(str(directory))
    assert kind == "vqkd" and loaded_cfg == cfg
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
    assert_same_variables(loaded, variables)
    # replacing is atomic and complete; refusing is explicit
    other = random_variables("vqkd", cfg, seed=8)
    store.save_variables(str(directory), other, "vqkd", cfg)
    assert_same_variables(store.load_variables(str(directory))[0], other)
    assert sorted(os.listdir(tmp_path)) == ["tok"]
    with pytest.raises(FileExistsError):
        store.save_variables(str(directory), other, "vqkd", cfg, overwrite=False)
    with pytest.raises(FileNotFoundError):
        store.load_variables(str(tmp_path / "nothing"))


def test_store_unboxes_and_rejects_bad_input(tmp_path):
    cfg = dict(SMALL_BACKBONE, depth=1, use_mask_token=False, use_final_norm=True, pooling="cls")
    variables = build_model("vit", cfg).init(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 3), np.float32))
    store.save_variables(str(tmp_path / "vit"), variables, "vit", cfg)
    loaded, _, _ = store.load_variables(str(tmp_path / "vit"))
    assert_same_variables(loaded, nn.meta.unbox(variables))
    with pytest.raises(ValueError, match="model_kind"):
        store.save_variables(str(tmp_path / "x"), variables, "resnet", cfg)
    assert not (tmp_path / "x").exists()


def test_torch_io_unwraps_and_strips(tmp_path):
    sd = {"module.a.weight": torch.ones(2, 2), "module.b": torch.zeros(3, dtype=torch.bfloat16)}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ck.pth")
    loaded, dropped = torch_io.load_state_dict(str(tmp_path / "ck.pth"))
    assert sorted(loaded) == ["a.weight", "b"] and loaded["b"].dtype == np.float32 and dropped == []
    save_file({"teacher.x": np.ones(2, np.float32), "student.x": np.zeros(2, np.float32)},
              str(tmp_path / "t.safetensors"))
    loaded, dropped = torch_io.load_state_dict(str(tmp_path / "t.safetensors"), prefix="teacher.")
    assert list(loaded) == ["x"] and dropped == ["student.x"]
    with pytest.raises(FileNotFoundError):
        torch_io.load_state_dict(str(tmp_path / "missing.pth"))
    torch.save({"model": {"w": torch.ones(2)}, "extra": Opaque()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="trust_pickle"):
        torch_io.load_state_dict(str(tmp_path / "pickled.pth"))
    assert list(torch_io.load_state_dict(str(tmp_path / "pickled.pth"), trust_pickle=True)[0]) == ["w"]


class Opaque:
    """An arbitrary pickled object, which weights_only loading refuses."""


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torch_io_reads_torchscript_archives(tmp_path):
    """OpenAI distributes CLIP as TorchScript (.pt); its state dict is read with torch.jit.load."""

    class Visual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(2, 3)

        def forward(self, x):
            return self.visual(x)

    module = Visual()
    torch.jit.save(torch.jit.script(module), str(tmp_path / "clip.pt"))
    loaded, _ = torch_io.load_state_dict(str(tmp_path / "clip.pt"))
    assert sorted(loaded) == ["visual.bias", "visual.weight"]
    assert np.array_equal(loaded["visual.weight"], module.visual.weight.detach().numpy())


# ----------------------------------------------------------------------------------------------- CLI
def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "beitv2_jax.convert", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_cli_import_pth_and_export_timm(tmp_path):
    from timm.models.beit import Beit

    ref = randomize_(_timm_beit(False), 14)
    torch.save({"model": ref.state_dict(), "epoch": 1}, tmp_path / "beit.pth")
    out = cli("--format", "timm", "--input", tmp_path / "beit.pth", "--output", tmp_path / "conv")
    assert "timm → vit" in out.stdout
    variables, kind, cfg = store.load_variables(str(tmp_path / "conv"))
    assert kind == "vit" and cfg["rel_pos"] == "per_layer"
    out = cli("--export", "--checkpoint", tmp_path / "conv", "--format", "timm", "--output",
              tmp_path / "timm.safetensors")
    from beitv2_jax.convert.layouts import timm_model_args

    name, kwargs = timm_model_args(cfg)
    assert name == "Beit" and "timm: timm.models.beit.Beit(" in out.stdout
    model = Beit(**kwargs)
    exported = load_file(str(tmp_path / "timm.safetensors"))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    assert_same_tensors(torch_sd(model), torch_sd(ref))


def test_cli_import_safetensors_and_export_hf_beit(tmp_path):
    config = transformers.BeitConfig(**HF_SMALL, use_relative_position_bias=True, layer_scale_init_value=0.1,
                                     num_labels=3)
    ref = randomize_(transformers.BeitForImageClassification(config), 15)
    ref.save_pretrained(tmp_path / "hf")  # model.safetensors + config.json (read for heads/eps)
    cli("--format", "hf_beit", "--input", tmp_path / "hf" / "model.safetensors", "--output", tmp_path / "conv")
    _, kind, cfg = store.load_variables(str(tmp_path / "conv"))
    assert kind == "vit" and cfg["num_classes"] == 3 and cfg["layer_norm_eps"] == config.layer_norm_eps
    # Hub names + config.json → from_pretrained with no missing / unexpected keys
    cli("--export", "--checkpoint", tmp_path / "conv", "--format", "hf_beit", "--output",
        tmp_path / "exp" / "model.safetensors")
    model, info = transformers.BeitForImageClassification.from_pretrained(tmp_path / "exp", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert_same_tensors(torch_sd(model), torch_sd(ref))
    # transformers ≥ 5 module names → load_state_dict(strict=True)
    cli("--export", "--checkpoint", tmp_path / "conv", "--format", "hf_beit", "--naming", "transformers5",
        "--output", tmp_path / "exp5" / "weights.pth")
    fresh = transformers.BeitForImageClassification(config)
    fresh.load_state_dict(torch.load(tmp_path / "exp5" / "weights.pth"), strict=True)
    assert_same_tensors(torch_sd(fresh), torch_sd(ref))


def test_torch_is_not_imported_by_the_converter_modules():
    code = ("import sys; import beitv2_jax.convert.cli, beitv2_jax.convert.layouts, beitv2_jax.convert.store; "
            "import beitv2_jax.convert.torch_io; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_cli_errors(tmp_path):
    proc = cli("--format", "timm", "--input", tmp_path / "nope.pth", "--output", tmp_path / "o", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: input file not found: {tmp_path / 'nope.pth'}"
    proc = cli("--format", "caffe", "--input", "x.pth", "--output", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "invalid choice: 'caffe'" in proc.stderr
    proc = cli("--format", "timm", "--output", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "--input is required" in proc.stderr
    proc = cli("--export", "--format", "timm", "--output", tmp_path / "o.pth", check=False)
    assert proc.returncode == 2 and "--checkpoint" in proc.stderr
    proc = cli("--format", "timm", "--input", tmp_path / "x.onnx", "--output", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "input file not found" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_cli_exports_a_pretraining_directory(tmp_path, capsys):
    """A beit_pretrain directory as the pretrain task writes it (partial backbone config): timm gets the
    backbone + final norm, hf_beit the masked-image-modeling model; the left-out parts are listed."""
    from timm.models.beit import Beit

    from beitv2_jax.convert import cli as cli_lib
    from beitv2_jax.convert.layouts import pretrain_as_backbone, timm_model_args

    partial = {"backbone": {"patch_size": 8, "width": 64, "depth": 3, "num_heads": 4, "image_size": 32},
               "vocab_size": 40, "num_masked_patches": 5, "early_layers": 2, "head_layers": 1, "dtype": "float32"}
    variables = random_variables("beit_pretrain", partial, seed=9)
    store.save_variables(str(tmp_path / "pt"), variables, "beit_pretrain", partial)
    assert cli_lib.main(["--export", "--checkpoint", str(tmp_path / "pt"), "--format", "timm", "--output",
                         str(tmp_path / "timm.pth")]) == 0
    out = capsys.readouterr().out
    assert "left out" in out and "cls_pt_layers_0" in out and "lm_head" in out and "mask_token" in out
    name, kwargs = timm_model_args(pretrain_as_backbone(variables, partial)[1])
    assert name == "Beit" and kwargs["use_shared_rel_pos_bias"] and kwargs["global_pool"] == "token"
    model = Beit(**kwargs)
    model.load_state_dict(torch.load(tmp_path / "timm.pth"), strict=True)
    assert np.array_equal(model.state_dict()["norm.weight"].numpy(), variables["params"]["norm"]["scale"])
    assert cli_lib.main(["--export", "--checkpoint", str(tmp_path / "pt"), "--format", "hf_beit", "--output",
                         str(tmp_path / "hf" / "model.safetensors")]) == 0
    mim, info = transformers.BeitForMaskedImageModeling.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert np.array_equal(mim.lm_head.weight.detach().numpy().T, variables["params"]["lm_head"]["kernel"])
