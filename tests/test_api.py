"""The public API (``beitv2_jax.from_pretrained`` / ``load_tokenizer``), the README snippets, official weights by name
(served from 127.0.0.1), HF exports that load everywhere (pipeline, ViT, CLIP) and converter input detection."""
import dataclasses
import functools
import hashlib
import http.server
import json
import os
import re
import sys
import threading
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import beitv2_jax
from beitv2_jax import api, registry
from beitv2_jax.convert import cli, export_variables, inputs, store, torch_io
from beitv2_jax.data import transforms
from beitv2_jax.train.tasks import linear_probe

from test_convert import random_variables

transformers.utils.logging.disable_progress_bar()
README = Path(__file__).resolve().parents[1] / "README.md"
FINETUNED = dict(image_size=32, patch_size=8, width=48, depth=2, num_heads=12, qkv_bias="qv", rel_pos="per_layer",
                 layer_scale_init=0.1, use_final_norm=False, use_fc_norm=True, pooling="mean", num_classes=5)
TOKENIZER = dict(image_size=32, patch_size=8, width=48, depth=1, num_heads=12, decoder_depth=1, decoder_width=48,
                 decoder_heads=12, num_codes=16, code_dim=8, teacher_dim=24)


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api") / "finetuned")
    store.save_variables(path, random_variables("vit", FINETUNED, seed=21), "vit", FINETUNED)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api") / "tokenizer")
    store.save_variables(path, random_variables("vqkd", TOKENIZER, seed=22), "vqkd", TOKENIZER)
    return path


def eval_view(image_u8: np.ndarray, size=32, normalize=True) -> np.ndarray:
    """The data pipeline's evaluation transform of one uint8 image (what the tasks feed the models)."""
    view = transforms.to_unit_float(transforms.center_crop(
        transforms.resize_shorter(Image.fromarray(image_u8), int(size / 0.875), "bicubic"), size))
    return transforms.normalize(view) if normalize else view


def readme_snippet(call: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if call in b]
    assert len(found) == 1 and len(found[0].strip().splitlines()) <= 5, found
    return found[0]


# ----------------------------------------------------------------------------------------------- README snippets
def test_readme_features_snippet(finetuned_dir):
    """The README's ≤ 5-line snippet, run as written (only the directory substituted): the features are the model's
    pooled output (fc_norm of the mean patch token = linear_probe's ``mean`` feature of a mean-pooling classifier)
    on the data pipeline's evaluation view."""
    scope = {}
    exec(readme_snippet("from_pretrained").replace("path/to/model_dir", finetuned_dir), scope)
    features, images = scope["features"], scope["images"]
    model = beitv2_jax.from_pretrained(finetuned_dir)
    weights = api.load_weights(finetuned_dir)
    encoder = linear_probe.finetune.as_encoder(weights.variables, weights.kind, weights.config)
    assert model.resolve_pool("default") == linear_probe.resolve_feature("auto", encoder) == "mean"
    expected = model.apply(np.stack([eval_view(x) for x in images]))["pooled"]
    chex.assert_trees_all_close(features, np.asarray(expected), atol=1e-5, rtol=1e-5)
    assert features.shape == (2, 48)


def test_readme_tokenize_snippet(tokenizer_dir):
    scope = {}
    exec(readme_snippet("load_tokenizer").replace("path/to/tokenizer_dir", tokenizer_dir), scope)
    ids, images = scope["ids"], scope["images"]
    from beitv2_jax import tokenize

    model, variables = tokenize.load_tokenizer(tokenizer_dir)
    pre = api.Preprocessing.from_dict(store.default_preprocessing("vqkd", TOKENIZER))
    expected = tokenize.tokenize(model, variables, pre(images), batch_size=2)
    assert ids.dtype == np.int32 and ids.shape == (2, 4, 4)
    np.testing.assert_array_equal(ids, expected)


# ----------------------------------------------------------------------------------------------- the API
def test_features_classify_and_inputs(finetuned_dir, tmp_path):
    model = beitv2_jax.from_pretrained(finetuned_dir)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 40, 52, 3), dtype=np.uint8)  # batch 2: the forwards compiled for the snippet
    out = jax.device_get(model.apply(np.stack([eval_view(x) for x in batch]), return_blocks=True))
    np.testing.assert_allclose(model.classify(batch), out["logits"], atol=1e-5)
    np.testing.assert_allclose(model.features(batch, pool="tokens"), out["encoded"][:, 1:], atol=1e-5)
    np.testing.assert_allclose(model.features(batch, pool="all", layer=0), out["blocks"][0], atol=1e-5)
    np.testing.assert_allclose(model.features(batch, pool="cls", layer=-1), out["blocks"][1][:, 0], atol=1e-5)
    # an array, a PIL image and a file path (a list of any sizes) give the rows of the batch
    Image.fromarray(batch[1]).save(tmp_path / "one.png")
    mixed = model.features([Image.fromarray(batch[0]), str(tmp_path / "one.png")], pool="tokens")
    np.testing.assert_allclose(mixed, out["encoded"][:, 1:], atol=1e-5)
    assert model.preprocess(batch[0]).shape == (1, 32, 32, 3)  # one HWC image
    # float images are resized without 8-bit rounding (PIL rounds and clips 8-bit images after each resize pass:
    # equal up to that rounding on a smooth image)
    smooth = np.stack(list(np.meshgrid(np.linspace(0, 1, 52), np.linspace(0, 1, 40))) + [np.full((40, 52), 0.5)], -1)
    floats = model.preprocess(smooth.astype(np.float32))
    assert np.abs(floats - model.preprocess(np.round(smooth * 255).astype(np.uint8))).max() < 1.5 / 255 / 0.224
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\]"):
        model.features(batch.astype(np.float32))
    with pytest.raises(ValueError, match="layer must be in"):
        model.features(batch, layer=2)


def test_preprocessing_stored_and_defaulted(finetuned_dir, tmp_path):
    description = json.loads((Path(finetuned_dir) / "model.json").read_text())
    assert description["preprocessing"] == {"image_size": 32, "crop_pct": 0.875, "interpolation": "bicubic",
                                            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    path = tmp_path / "custom"
    store.save_variables(str(path), random_variables("vit", FINETUNED, seed=21), "vit", FINETUNED,
                         preprocessing={"crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3})
    model = beitv2_jax.from_pretrained(str(path))
    assert model.preprocessing.crop_pct == 1.0 and model.preprocessing.mean == (0.5, 0.5, 0.5)
    old = json.loads((path / "model.json").read_text())
    del old["preprocessing"]  # a directory written before preprocessing was stored
    (path / "model.json").write_text(json.dumps(old))
    assert beitv2_jax.from_pretrained(str(path)).preprocessing.crop_pct == 0.875
    with pytest.raises(ValueError, match="crop_pct"):
        store.save_variables(str(tmp_path / "bad"), random_variables("vit", FINETUNED), "vit", FINETUNED,
                             preprocessing={"crop_pct": 1.5})


# ----------------------------------------------------------------------------------------------- by name
@pytest.fixture()
def loopback(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/www`` as the release host, and an empty cache."""
    www = tmp_path / "www"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(registry.URL_BASE_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    yield www
    server.shutdown()
    server.server_close()


def serve_official(www: Path, name: str, kind: str, config: dict, fmt: str, seed: int) -> Path:
    """A small random-weight checkpoint in the official layout and file name of ``name`` (``{'model': sd}``)."""
    entry = registry.REGISTRY[name]
    sd = export_variables(random_variables(kind, config, seed=seed), fmt, kind, config)
    path = www / entry.release / entry.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
    return path


def test_official_name_matches_the_converter_path(loopback, tmp_path, monkeypatch):
    name = "beitv2_base_patch16_224_pt1k_ft21kto1k"
    path = serve_official(loopback, name, "vit", FINETUNED, "official_finetune", seed=23)
    assert cli.main(["--input", str(path), "--output", str(tmp_path / "converted")]) == 0  # format detected
    images = np.random.default_rng(1).integers(0, 256, (2, 36, 36, 3), dtype=np.uint8)
    by_name = beitv2_jax.from_pretrained(name)
    by_converter = beitv2_jax.from_pretrained(str(tmp_path / "converted"))
    chex.assert_trees_all_equal(by_name.params, by_converter.params)
    assert by_name.preprocessing.crop_pct == 0.9  # the registry's (timm beitv2 base) preprocessing is stored
    np.testing.assert_allclose(by_name.features(images),
                               by_converter.apply(by_name.preprocess(images))["pooled"], atol=1e-6)
    cached = registry.model_dir(name)
    assert os.path.isfile(os.path.join(cached, "model.json")) and not os.listdir(tmp_path / "cache" / "downloads")
    os.remove(path)  # later loads read the cache only
    np.testing.assert_array_equal(beitv2_jax.from_pretrained(name).features(images), by_name.features(images))


def test_official_tokenizer_hash_is_checked(loopback, tmp_path, monkeypatch):
    name = "vqkd_encoder_base_decoder_3x768x12_clip"
    path = serve_official(loopback, name, "vqkd", TOKENIZER, "official_vqkd", seed=24)
    with pytest.raises(registry.DownloadError, match="does not match the published d5036aa7"):
        beitv2_jax.load_tokenizer(name)  # the random file is not the released one
    assert not os.path.exists(registry.model_dir(name)) and not os.listdir(tmp_path / "cache" / "downloads")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    entry = registry.REGISTRY[name]
    monkeypatch.setitem(registry.REGISTRY, name, registry.Entry(
        entry.release, entry.filename, entry.format, entry.description, entry.preprocessing, entry.overrides,
        sha256=digest))
    images = np.random.default_rng(2).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    ids = beitv2_jax.load_tokenizer(name).tokenize(images)
    assert cli.main(["--input", str(path), "--output", str(tmp_path / "tok"), "--set", "num_heads=12",
                     "--set", "decoder_heads=12"]) == 0
    np.testing.assert_array_equal(ids, beitv2_jax.load_tokenizer(str(tmp_path / "tok")).tokenize(images))


def test_pth_without_torch_is_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "model.pth"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert cli.main(["--input", str(path), "--output", str(tmp_path / "out"), "--format", "timm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'beitv2_jax[torch]'" in err
    with pytest.raises(torch_io.MissingTorchError, match=r"beitv2_jax\[torch\]"):
        beitv2_jax.from_pretrained(str(path))


# ----------------------------------------------------------------------------------------------- HF exports
def test_hf_export_runs_in_the_image_classification_pipeline(finetuned_dir, tmp_path):
    out = tmp_path / "hf"
    assert cli.main(["--export", "--checkpoint", finetuned_dir, "--format", "hf_beit", "--output",
                     str(out / "model.safetensors")]) == 0
    assert {"config.json", "preprocessor_config.json", "model.safetensors"} <= set(os.listdir(out))
    classifier = transformers.pipeline("image-classification", model=str(out), top_k=None)
    rng = np.random.default_rng(3)
    pil = [Image.fromarray(rng.integers(0, 256, (44 + 4 * i, 36, 3), dtype=np.uint8)) for i in range(2)]
    theirs = classifier(pil)
    ours = beitv2_jax.from_pretrained(finetuned_dir).classify(pil)
    probs = np.exp(ours - ours.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for row, result in zip(probs, theirs):
        scores = {r["label"]: r["score"] for r in result}
        assert result[0]["label"] == f"LABEL_{int(row.argmax())}"
        np.testing.assert_allclose([scores[f"LABEL_{i}"] for i in range(5)], row, atol=1e-4)
    # and the folder converts back (a save_pretrained folder as --input, format from config.json)
    assert cli.main(["--input", str(out), "--output", str(tmp_path / "back")]) == 0
    back = beitv2_jax.from_pretrained(str(tmp_path / "back"))
    chex.assert_trees_all_close(back.params, beitv2_jax.from_pretrained(finetuned_dir).params, atol=0)
    ours = beitv2_jax.from_pretrained(finetuned_dir).preprocessing  # crop_pct 0.875 → shortest_edge 36 → 32/36
    assert dataclasses.replace(back.preprocessing, crop_pct=ours.crop_pct) == ours
    assert int(32 / back.preprocessing.crop_pct) == int(32 / ours.crop_pct) == 36


VIT = dict(image_size=32, patch_size=8, width=48, depth=2, num_heads=4, qkv_bias="full", use_abs_pos=True,
           layer_norm_eps=1e-12)
CLIP = dict(image_size=32, patch_size=8, width=48, depth=2, num_heads=4, qkv_bias="full", use_abs_pos=True,
            ln_pre=True, patch_embed_bias=False, activation="quick_gelu", layer_norm_eps=1e-5, num_classes=24,
            head_bias=False)


@pytest.mark.parametrize("name", ["hf_vit", "hf_clip"])
def test_hf_vit_and_clip_exports_load_with_from_pretrained(name, tmp_path):
    config = VIT if name == "hf_vit" else CLIP
    ours_dir = tmp_path / "ours"
    store.save_variables(str(ours_dir), random_variables("vit", config, seed=25), "vit", config)
    out = tmp_path / "hf"
    assert cli.main(["--export", "--checkpoint", str(ours_dir), "--format", name, "--output",
                     str(out / "model.safetensors")]) == 0
    x = np.random.default_rng(4).standard_normal((2, 32, 32, 3)).astype(np.float32)
    ours = jax.device_get(beitv2_jax.from_pretrained(str(ours_dir)).apply(x))
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2)
    if name == "hf_vit":
        model, info = transformers.ViTModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
        with torch.no_grad():
            theirs = {"encoded": model.eval()(pixel_values=pixels).last_hidden_state.numpy()}
    else:
        model, info = transformers.CLIPVisionModelWithProjection.from_pretrained(out, output_loading_info=True)
        with torch.no_grad():
            result = model.eval()(pixel_values=pixels)
        theirs = {"pre_norm": result.last_hidden_state.numpy(), "logits": result.image_embeds.numpy()}
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, atol=1e-5 * max(1.0, np.abs(value).max()))
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert processor.crop_size == {"height": 32, "width": 32} and processor.size == {"shortest_edge": 36}


# ----------------------------------------------------------------------------------------------- detection
SMALL_BEIT = dict(image_size=32, patch_size=8, width=48, depth=2, num_heads=4)
DETECT_CASES = {
    "official_beitv2": ("beit_pretrain", dict(backbone=dict(SMALL_BEIT, rel_pos="shared", layer_scale_init=0.1),
                                              vocab_size=20, num_masked_patches=5, early_layers=1, head_layers=1)),
    "official_finetune": ("vit", FINETUNED),
    "official_vqkd": ("vqkd", TOKENIZER),
    "timm": ("vit", FINETUNED),
    "hf_beit": ("vit", dict(SMALL_BEIT, rel_pos="per_layer", layer_scale_init=0.1)),
    "hf_vit": ("vit", VIT),
    "hf_clip": ("vit", CLIP),
    "openai_clip": ("vit", CLIP),
}


@pytest.mark.parametrize("fmt", sorted(DETECT_CASES))
def test_format_is_detected_from_the_keys(fmt):
    kind, config = DETECT_CASES[fmt]
    sd = export_variables(random_variables(kind, config), fmt, kind, config)
    assert inputs.detect_format(sd) == fmt


def test_ambiguous_format_is_one_line(tmp_path, capsys):
    sd = export_variables(random_variables("vit", VIT), "timm", "vit", dict(VIT, layer_norm_eps=1e-6))
    from safetensors.numpy import save_file

    save_file(sd, str(tmp_path / "vit.safetensors"))
    assert cli.main(["--input", str(tmp_path / "vit.safetensors"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--format timm or --format dino" in err


def test_training_run_without_torch_ends_with_one_line(monkeypatch, capsys):
    """A task handed a .pth without torch installed (e.g. config.pretrained.checkpoint) stops with the same line."""
    from beitv2_jax import main

    def run_task(config, workdir):
        raise torch_io.MissingTorchError("x.pth: reading ... needs PyTorch: pip install 'beitv2_jax[torch]'")

    monkeypatch.setattr(main, "run_task", run_task)
    with pytest.raises(SystemExit) as stop:
        main.run_reporting_outcome(None, "unused")
    assert stop.value.code == 2 and capsys.readouterr().err.strip().endswith("pip install 'beitv2_jax[torch]'")


def test_save_pretrained_folder_is_a_converter_input(tmp_path):
    """A (sharded) folder written by transformers' ``save_pretrained`` (was: 'not found'), format from config.json."""
    config = transformers.ViTConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96,
                                    image_size=32, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    reference = transformers.ViTForImageClassification(config).eval()
    reference.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # sharded: model.safetensors.index.json
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert cli.main(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")]) == 0
    model = beitv2_jax.from_pretrained(str(tmp_path / "ours"))
    assert model.config["num_classes"] == 3 and model.config["num_heads"] == 4  # heads from config.json
    x = np.random.default_rng(5).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        logits = reference(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).logits.numpy()
    np.testing.assert_allclose(model.apply(x)["logits"], logits, atol=1e-5 * max(1.0, np.abs(logits).max()))
