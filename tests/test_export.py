"""Export: a fine-tuned classifier and a pretrained encoder written as timm Beit / transformers BEiT weights load
with no missing or unexpected key and give our model's outputs (max |Δ| ≤ 1e-5 · max(1, |ref|))."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from beitv2_jax import export
from beitv2_jax.convert import store
from beitv2_jax.train.tasks import finetune, linear_probe

from test_finetune import SMALL_PRETRAIN, random_variables

transformers.utils.logging.disable_progress_bar()
FINETUNED = dict(image_size=32, patch_size=8, width=64, depth=2, num_heads=4, qkv_bias="qv", rel_pos="per_layer",
                 layer_scale_init=0.1, use_final_norm=False, use_fc_norm=True, pooling="mean", num_classes=7,
                 head_init_scale=0.001)


def assert_close(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    err = np.abs(ours - theirs).max()
    assert err <= 1e-5 * max(1.0, np.abs(theirs).max()), err


def images(seed=0, size=32):
    x = np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)
    return x, torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("finetuned") / "best_model")
    finetune.save_model(path, random_variables("vit", FINETUNED, seed=11)["params"], FINETUNED)
    return path


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pretrained") / "model")
    store.save_variables(path, random_variables("beit_pretrain", SMALL_PRETRAIN, seed=12), "beit_pretrain",
                         SMALL_PRETRAIN)
    return path


def our_outputs(directory, x):
    variables, kind, config = store.load_variables(directory)
    encoder = finetune.as_encoder(variables, kind, config)
    model = linear_probe.encoder_model(encoder) if kind == "beit_pretrain" else finetune.model_from_config(config)
    return jax.jit(model.apply)({"params": encoder.params}, jnp.asarray(x))


def test_finetuned_classifier_to_hf(finetuned_dir, tmp_path):
    out = tmp_path / "hf" / "model.safetensors"
    info = export.export_checkpoint(finetuned_dir, "hf", str(out))
    assert info["hf_config"]["architectures"] == ["BeitForImageClassification"] and not info["left_out"]
    ref, loading = transformers.BeitForImageClassification.from_pretrained(
        str(out.parent), output_loading_info=True, attn_implementation="eager")
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    x, x_torch = images(1)
    with torch.no_grad():
        logits = ref.eval()(pixel_values=x_torch).logits.numpy()
    assert_close(our_outputs(finetuned_dir, x)["logits"], logits)


def test_finetuned_classifier_to_timm(finetuned_dir, tmp_path):
    from timm.models.beit import Beit

    out = tmp_path / "timm.safetensors"
    info = export.export_checkpoint(finetuned_dir, "timm", str(out))
    name, kwargs = info["timm"]
    assert name == "Beit" and kwargs["use_rel_pos_bias"] and kwargs["global_pool"] == "avg"
    ref = Beit(**kwargs).eval()
    ref.load_state_dict(load_file(str(out)), strict=True)
    x, x_torch = images(2)
    with torch.no_grad():
        logits = ref(x_torch).numpy()
    assert_close(our_outputs(finetuned_dir, x)["logits"], logits)


@pytest.mark.parametrize("rel_pos", ["per_layer", "keep"])
def test_pretrained_encoder_to_timm(pretrained_dir, tmp_path, rel_pos):
    from timm.models.beit import Beit

    out = tmp_path / "encoder.safetensors"
    info = export.export_checkpoint(pretrained_dir, "timm", str(out), rel_pos=rel_pos)
    assert {"params/lm_head", "params/cls_pt_layers_0", "params/cls_pt_layers_1",
            "params/backbone/mask_token"} <= set(info["left_out"])
    name, kwargs = info["timm"]
    assert kwargs["use_rel_pos_bias"] == (rel_pos == "per_layer") and kwargs["global_pool"] == "token"
    ref = Beit(**kwargs).eval()
    ref.load_state_dict(load_file(str(out)), strict=True)
    x, x_torch = images(3)
    with torch.no_grad():
        features = ref.forward_features(x_torch).numpy()
    assert_close(our_outputs(pretrained_dir, x)["encoded"], features)


def test_pretrained_encoder_to_hf(pretrained_dir, tmp_path):
    """The one export command gives a pretrained encoder the masked-image-modeling head (as convert --export did);
    its final norm is the MIM model's ``layernorm``."""
    out = tmp_path / "hf" / "model.safetensors"
    info = export.export_checkpoint(pretrained_dir, "hf", str(out))
    assert info["hf_config"]["architectures"] == ["BeitForMaskedImageModeling"]
    assert {"params/cls_pt_layers_0", "params/cls_pt_layers_1"} == set(info["left_out"])
    ref, loading = transformers.BeitForMaskedImageModeling.from_pretrained(
        str(out.parent), output_loading_info=True, attn_implementation="eager")
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    x, x_torch = images(4)
    with torch.no_grad():
        hidden = ref.eval().layernorm(ref.beit(pixel_values=x_torch).last_hidden_state).numpy()
    assert_close(our_outputs(pretrained_dir, x)["encoded"], hidden)


def test_cli(finetuned_dir, tmp_path, capsys):
    out = str(tmp_path / "model.safetensors")
    assert export.main(["--checkpoint", finetuned_dir, "--format", "timm", "--output", out]) == 0
    printed = capsys.readouterr().out
    assert "timm: timm.models.beit.Beit(" in printed and os.path.isfile(out)
    assert export.main(["--checkpoint", finetuned_dir, "--format", "timm", "--output", out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(tmp_path / "missing"), "--format", "hf", "--output", out,
                        "--overwrite"]) == 2
    base = dict(FINETUNED, image_size=224, patch_size=16, width=768, depth=12, num_heads=12, num_classes=1000)
    assert export.timm_hint(base) == ("timm.create_model('beitv2_base_patch16_224', num_classes=1000, "
                                      "global_pool='avg')")
