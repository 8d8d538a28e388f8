"""Numerical parity of converted weights: PyTorch reference models (transformers, timm) with random weights vs
our Flax models after ``beitv2_jax.convert``, in float32.

Criterion everywhere: max |ours − theirs| ≤ 1e-5 · max(1, max |theirs|). Reference weights are re-drawn with
non-trivial values (LayerNorm scales ≠ 1, biases, layer-scale and relative position tables ≠ 0), otherwise
zero-initialised parts would hide mapping bugs. PyTorch takes NCHW pixels, ours NHWC.
"""
import os
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from beitv2_jax.convert import import_state_dict
from beitv2_jax.convert.model_shapes import build_model

transformers.utils.logging.disable_progress_bar()
RTOL = 1e-5
SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=32,
             patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter with non-trivial values (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "relative_position_bias_table" in name:
                p.copy_(noise)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):  # LayerNorm scales
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:  # biases, layer scale, class embedding
                p.copy_(0.2 * noise)
            elif p.ndim == 3 or "position_embedding" in name or "class_embedding" in name:
                p.copy_(0.5 * noise)  # cls / mask tokens, position embeddings
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
    return model.eval()


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def assert_close(name: str, ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs.detach().numpy() if hasattr(theirs, "detach")
                                                             else theirs, np.float64)
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    err = float(np.abs(ours - theirs).max())
    bound = RTOL * max(1.0, float(np.abs(theirs).max()))
    print(f"{name}: max abs err {err:.3g} (bound {bound:.3g})")
    assert err <= bound, f"{name}: max |ours - theirs| = {err:.3g} > {bound:.3g}"
    return err


def hub_state_dict(model) -> dict:
    """The model as a Hub checkpoint (save_pretrained names), read back with safetensors.numpy."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return load_file(os.path.join(d, "model.safetensors"))


def convert(state_dict, fmt, hf_config=None, **kw):
    result = import_state_dict(state_dict, fmt, hf_config=hf_config, **kw)
    return build_model(result.model_kind, result.model_config), result


# ----------------------------------------------------------------------------------------------- HF BEiT
def test_hf_beit_shared_relative_position_bias():
    """Shared table, absolute positions too, no layer scale, final layernorm + CLS pooler."""
    torch.manual_seed(0)
    config = transformers.BeitConfig(**SMALL, use_shared_relative_position_bias=True,
                                     use_relative_position_bias=False, use_absolute_position_embeddings=True,
                                     layer_scale_init_value=0.0, use_mean_pooling=False)
    ref = randomize_(transformers.BeitModel(config), 1)
    x = images(2, 32)
    with torch.no_grad():
        out = ref(x)
    model, result = convert(hub_state_dict(ref), "hf_beit", hf_config=config.to_dict())
    cfg = result.model_config
    assert (cfg["rel_pos"], cfg["layer_scale_init"], cfg["use_final_norm"], cfg["pooling"]) == (
        "shared", 0.0, True, "cls")
    ours = model.apply(result.variables, nhwc(x))
    assert_close("hf_beit_shared/last_hidden_state", ours["encoded"], out.last_hidden_state)
    assert_close("hf_beit_shared/pooler_output", ours["pooled"], out.pooler_output)


def test_hf_beit_per_layer_bias_layer_scale_mean_pooling_classifier():
    torch.manual_seed(0)
    config = transformers.BeitConfig(**SMALL, use_relative_position_bias=True, layer_scale_init_value=0.1,
                                     use_mean_pooling=True, num_labels=7)
    ref = randomize_(transformers.BeitForImageClassification(config), 2)
    x = images(2, 32, seed=1)
    with torch.no_grad():
        base = ref.beit(x)
        logits = ref(x).logits
    model, result = convert(hub_state_dict(ref), "hf_beit", hf_config=config.to_dict())
    cfg = result.model_config
    assert (cfg["rel_pos"], cfg["use_fc_norm"], cfg["pooling"], cfg["num_classes"]) == ("per_layer", True,
                                                                                       "mean", 7)
    assert cfg["layer_scale_init"] == 0.1 and cfg["layer_norm_eps"] == config.layer_norm_eps
    ours = model.apply(result.variables, nhwc(x))
    assert_close("hf_beit_per_layer/last_hidden_state", ours["encoded"], base.last_hidden_state)
    assert_close("hf_beit_per_layer/pooler_output", ours["pooled"], base.pooler_output)
    assert_close("hf_beit_per_layer/logits", ours["logits"], logits)


def test_hf_beit_transformers5_names_give_the_same_weights():
    """transformers ≥ 5 module names (model.state_dict()) and Hub names convert to identical variables."""
    config = transformers.BeitConfig(**SMALL, use_relative_position_bias=True, layer_scale_init_value=0.1)
    ref = randomize_(transformers.BeitModel(config), 3)
    live = {k: v.numpy() for k, v in ref.state_dict().items()}
    a = import_state_dict(live, "hf_beit", hf_config=config.to_dict())
    b = import_state_dict(hub_state_dict(ref), "hf_beit", hf_config=config.to_dict())
    assert a.options["naming"] == "transformers5" and b.options["naming"] == "hub"
    from beitv2_jax.convert.engine import flatten_variables

    fa, fb = flatten_variables(a.variables), flatten_variables(b.variables)
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_hf_beit_masked_image_modeling():
    """BeitForMaskedImageModeling: LM head on masked tokens vs BEiTPretrainModel(head_layers=0).logits_1."""
    torch.manual_seed(0)
    num_masked = 6
    config = transformers.BeitConfig(**SMALL, use_mask_token=True, use_shared_relative_position_bias=True,
                                     layer_scale_init_value=0.1, vocab_size=96)
    ref = randomize_(transformers.BeitForMaskedImageModeling(config), 4)
    x = images(3, 32, seed=2)
    rng = np.random.default_rng(0)
    mask = np.zeros((3, 16), bool)
    for row in mask:
        row[rng.permutation(16)[:num_masked]] = True
    with torch.no_grad():
        theirs = ref(x, bool_masked_pos=torch.from_numpy(mask)).logits  # [B, N, V]
    model, result = convert(hub_state_dict(ref), "hf_beit", hf_config=config.to_dict(),
                            overrides={"num_masked_patches": num_masked})
    assert result.model_kind == "beit_pretrain" and result.model_config["head_layers"] == 0
    ours = model.apply(result.variables, nhwc(x), jnp.asarray(mask))
    positions = np.asarray(ours["positions"])
    assert (np.take_along_axis(mask, positions, 1)).all()
    expected = np.take_along_axis(theirs.numpy(), positions[..., None], axis=1)
    assert_close("hf_beit_mim/masked_logits", ours["logits_1"], expected)


# ----------------------------------------------------------------------------------------------- HF ViT / CLIP
def test_hf_vit_model():
    torch.manual_seed(0)
    config = transformers.ViTConfig(**SMALL, layer_norm_eps=1e-12, qkv_bias=True)
    ref = randomize_(transformers.ViTModel(config, add_pooling_layer=False), 5)
    x = images(2, 32, seed=3)
    with torch.no_grad():
        out = ref(x)
    model, result = convert(hub_state_dict(ref), "hf_vit", hf_config=config.to_dict())
    cfg = result.model_config
    assert (cfg["qkv_bias"], cfg["use_abs_pos"], cfg["layer_norm_eps"]) == ("full", True, 1e-12)
    ours = model.apply(result.variables, nhwc(x))
    assert_close("hf_vit/last_hidden_state", ours["encoded"], out.last_hidden_state)


def _clip(seed: int):
    config = transformers.CLIPVisionConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                           intermediate_size=128, image_size=32, patch_size=8, projection_dim=24,
                                           attn_implementation="eager")
    return config, randomize_(transformers.CLIPVisionModelWithProjection(config), seed)


def _check_clip(tag, model, result, ref, x):
    with torch.no_grad():
        out = ref(x)
        pooled = ref.vision_model(x).pooler_output
    cfg = result.model_config
    assert (cfg["activation"], cfg["ln_pre"], cfg["layer_norm_eps"], cfg["patch_embed_bias"]) == (
        "quick_gelu", True, 1e-5, False)
    ours = model.apply(result.variables, nhwc(x))
    assert_close(f"{tag}/last_hidden_state", ours["pre_norm"], out.last_hidden_state)
    assert_close(f"{tag}/pooled", ours["pooled"], pooled)
    assert_close(f"{tag}/image_embeds", ours["logits"], out.image_embeds)


def test_hf_clip_vision_with_projection():
    torch.manual_seed(0)
    config, ref = _clip(6)
    model, result = convert(hub_state_dict(ref), "hf_clip", hf_config=config.to_dict())
    _check_clip("hf_clip", model, result, ref, images(2, 32, seed=4))


def openai_names(hf_state_dict: dict) -> dict:
    """HF CLIPVisionModelWithProjection weights under OpenAI CLIP names (in_proj = cat(q, k, v))."""
    sd = {k.replace("vision_model.", ""): v for k, v in hf_state_dict.items()}
    out = {"visual.class_embedding": sd["embeddings.class_embedding"],
           "visual.positional_embedding": sd["embeddings.position_embedding.weight"],
           "visual.proj": sd["visual_projection.weight"].T.copy(),
           "visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
           "visual.ln_pre.weight": sd["pre_layrnorm.weight"], "visual.ln_pre.bias": sd["pre_layrnorm.bias"],
           "visual.ln_post.weight": sd["post_layernorm.weight"], "visual.ln_post.bias": sd["post_layernorm.bias"],
           "transformer.resblocks.0.ln_1.weight": np.ones(3, np.float32),  # text tower keys are ignored
           "logit_scale": np.ones((), np.float32)}
    i = 0
    while f"encoder.layers.{i}.layer_norm1.weight" in sd:
        h, o = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{o}{ours}.weight"], out[f"{o}{ours}.bias"] = sd[f"{h}{theirs}.weight"], sd[f"{h}{theirs}.bias"]
        for part in ("weight", "bias"):
            out[f"{o}attn.in_proj_{part}"] = np.concatenate(
                [sd[f"{h}self_attn.{n}_proj.{part}"] for n in "qkv"], axis=0)
        i += 1
    return out


def test_openai_clip_visual():
    torch.manual_seed(0)
    _, ref = _clip(7)
    model, result = convert(openai_names(hub_state_dict(ref)), "openai_clip", overrides={"num_heads": 4})
    assert sorted(result.ignored) == ["logit_scale", "transformer.resblocks.0.ln_1.weight"]
    _check_clip("openai_clip", model, result, ref, images(2, 32, seed=5))


# ----------------------------------------------------------------------------------------------- timm / official
@pytest.mark.parametrize("variant", ["per_layer", "shared"])
def test_timm_beit(variant):
    """timm Beit = the official fine-tune names (minus index buffers): validates timm/official layouts."""
    from timm.models.beit import Beit

    torch.manual_seed(0)
    kw = dict(use_rel_pos_bias=True, init_values=0.1, num_classes=5, use_abs_pos_emb=False) if variant == "per_layer" \
        else dict(use_shared_rel_pos_bias=True, global_pool="token", init_values=0.1, num_classes=0)
    ref = randomize_(Beit(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, **kw), 8)
    x = images(2, 32, seed=6)
    with torch.no_grad():
        feats = ref.forward_features(x)
        head = ref.forward_head(feats)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    model, result = convert(sd, "timm")
    ours = model.apply(result.variables, nhwc(x))
    assert_close(f"timm_beit_{variant}/features", ours["encoded"], feats)
    assert_close(f"timm_beit_{variant}/head", ours["logits" if variant == "per_layer" else "pooled"], head)


def test_dino_timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    ref = randomize_(VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=0), 9)
    x = images(2, 32, seed=7)
    with torch.no_grad():
        feats = ref.forward_features(x)
    model, result = convert({k: v.numpy() for k, v in ref.state_dict().items()}, "dino",
                            overrides={"num_heads": 4})
    ours = model.apply(result.variables, nhwc(x))
    assert_close("dino/features", ours["encoded"], feats)


# ----------------------------------------------------------------------------------------------- base size
def test_hf_beit_base_224():
    """BeitModel at the real ViT-B/16 224² size (per-layer tables, layer scale, mean pooling), batch 1."""
    torch.manual_seed(0)
    config = transformers.BeitConfig(use_relative_position_bias=True, layer_scale_init_value=0.1,
                                     use_mean_pooling=True, attn_implementation="eager")
    assert (config.hidden_size, config.num_hidden_layers, config.image_size) == (768, 12, 224)
    ref = randomize_(transformers.BeitModel(config), 10)
    x = images(1, 224, seed=8)
    with torch.no_grad():
        out = ref(x)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    model, result = convert(sd, "hf_beit", hf_config=config.to_dict())
    assert result.model_config["num_heads"] == 12
    ours = model.apply(result.variables, nhwc(x))
    assert_close("hf_beit_base/last_hidden_state", ours["encoded"], out.last_hidden_state)
    assert_close("hf_beit_base/pooler_output", ours["pooled"], out.pooler_output)
