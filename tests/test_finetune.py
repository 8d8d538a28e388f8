"""Fine-tuning: the official layer-decay assigner at base size, the official checkpoint → fine-tune model path
against timm's Beit (same forward, resized tables), mixup/cutmix vs timm.data.Mixup, RandAugment and random
erasing vs timm on replayed random streams, and a tiny end-to-end fine-tuning run on the demo data."""
import dataclasses
import json
import math
import os
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from beitv2_jax.convert import export_variables, store, torch_io
from beitv2_jax.convert.engine import get_layout, unflatten_variables
from beitv2_jax.convert.model_shapes import normalize_config, param_shapes
from beitv2_jax.data import augment, transforms
from beitv2_jax.train import layer_decay, optim
from beitv2_jax.train.tasks import finetune

from conftest import load_config_file

SMALL_BACKBONE = dict(image_size=32, patch_size=8, width=64, depth=3, num_heads=4, layer_scale_init=0.1)
SMALL_PRETRAIN = dict(backbone=SMALL_BACKBONE, vocab_size=50, num_masked_patches=6, early_layers=2, head_layers=2)


def random_variables(kind, config, seed=0) -> dict:
    """Non-trivial random values with the model's shapes (LN scales around 1, tables and biases ≠ 0)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, s in param_shapes(kind, config).items():
        noise = rng.standard_normal(s.shape)
        if path.endswith("/scale"):
            value = 1.0 + 0.2 * noise
        elif "relative_position_bias_table" in path:
            value = noise
        elif len(s.shape) <= 1 or path.endswith(("_bias", "/bias")):
            value = 0.2 * noise
        else:  # weights scaled by 1/sqrt(fan-in): qkv [D, 3, H, Dh], proj [H, Dh, D], others [..., in, out]
            fan_in = s.shape[0] if path.endswith("attn/qkv") else np.prod(
                s.shape[:2] if path.endswith("attn/proj") else s.shape[:-1])
            value = noise / np.sqrt(fan_in)
        flat[path] = value.astype(s.dtype)
    return unflatten_variables(flat)


def fresh_params(cfg: dict, seed: int = 0) -> dict:
    """Stand-in for the fine-tune model's init (no compile): random params of the ViT config ``cfg``."""
    return random_variables("vit", cfg, seed)["params"]


# ----------------------------------------------------------------------------------------------- layer decay
def official_layer_id(var_name: str, num_max_layer: int) -> int:
    """unilm beit2 optim_factory.get_num_layer_for_vit, verbatim."""
    if var_name in ("cls_token", "mask_token", "pos_embed"):
        return 0
    elif var_name.startswith("patch_embed"):
        return 0
    elif var_name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    elif var_name.startswith("blocks"):
        layer_id = int(var_name.split('.')[1])
        return layer_id + 1
    else:
        return num_max_layer - 1


class OfficialLayerDecayValueAssigner:
    """unilm beit2 optim_factory.LayerDecayValueAssigner, verbatim."""

    def __init__(self, values):
        self.values = values

    def get_scale(self, layer_id):
        return self.values[layer_id]

    def get_layer_id(self, var_name):
        return official_layer_id(var_name, len(self.values))


def official_decayed(name: str, shape: tuple, skip_list=("pos_embed", "cls_token")) -> bool:
    """unilm get_parameter_groups: no decay for 1-D params, '.bias' and the model's no_weight_decay()."""
    return not (len(shape) == 1 or name.endswith(".bias") or name in skip_list)


BASE_FINETUNE = dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, qkv_bias="qv",
                     rel_pos="per_layer", layer_scale_init=0.1, use_final_norm=False, use_fc_norm=True,
                     pooling="mean", num_classes=1000)
BASE_BACKBONE = dict(BASE_FINETUNE, rel_pos="shared", use_mask_token=True, use_final_norm=True, use_fc_norm=False,
                     pooling="cls", num_classes=0)


@pytest.mark.parametrize("fmt,config", [("official_finetune", BASE_FINETUNE), ("official_beitv2", BASE_BACKBONE)],
                         ids=["finetune_model", "pretrain_backbone"])
def test_layer_decay_and_weight_decay_match_official_assigner_base(fmt, config):
    """Every parameter of ViT-B/16 (12 layers, decay 0.65): our scale = the official assigner's scale for the
    official name (mapped through the converter's rules), and our weight-decay mask = official parameter groups."""
    depth, decay = 12, 0.65
    assigner = OfficialLayerDecayValueAssigner([decay ** (depth + 1 - i) for i in range(depth + 2)])
    shapes = param_shapes("vit", config)
    # zero-stride views: the shapes of ViT-B without allocating its 86M values
    params = unflatten_variables({p: np.broadcast_to(np.float32(0), s.shape) for p, s in shapes.items()})["params"]
    ours = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(
        layer_decay.scale_tree(params, depth, decay)).items()}
    ours_decay = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(
        optim.weight_decay_mask(params, ["cls_token$", "pos_embed$"])).items()}
    rules = get_layout(fmt).rules("vit", normalize_config("vit", config), {})
    checked = set()
    for rule in rules:
        if rule.derived:
            continue
        (torch_key,), (flax_path,) = rule.torch, rule.flax
        path = flax_path[len("params/"):]
        official = assigner.get_scale(assigner.get_layer_id(torch_key))
        assert ours[path] == pytest.approx(official, rel=1e-12), (torch_key, path)
        torch_shape = rule.transform.to_torch(np.zeros(shapes[flax_path].shape, np.float32))[0].shape
        assert ours_decay[path] == official_decayed(torch_key, torch_shape), (torch_key, path)
        checked.add(path)
    assert checked == set(ours) and len(checked) == len(shapes)  # every parameter has an official name
    if fmt == "official_finetune":
        assert ours["blocks_5/attn/relative_position_bias_table"] == pytest.approx(decay ** 7)
        assert ours_decay["blocks_5/attn/relative_position_bias_table"]  # per-layer tables ARE decayed
        assert ours["head/kernel"] == 1.0 and ours["cls_token"] == pytest.approx(decay ** 13)
    else:
        assert ours["rel_pos_bias/relative_position_bias_table"] == 1.0 and ours["mask_token"] == pytest.approx(
            decay ** 13)


def test_layer_decay_in_the_optimizer_scales_lr_and_weight_decay():
    """One AdamW step: update = −lr · scale(layer) · (adam + wd · p) (PyTorch AdamW per parameter group)."""
    cfg = finetune.finetune_vit_config(dict(SMALL_BACKBONE, mlp_ratio=4.0, qkv_bias="qv", patch_embed_bias=True,
                                            use_abs_pos=False, rel_pos="shared", layer_norm_eps=1e-6,
                                            activation="gelu", ln_pre=False, use_cls_token=True), 32, 5)
    params = jax.tree.map(jnp.asarray, fresh_params(cfg))
    oc = load_config_file("finetune_base").optim
    with oc.unlocked():
        oc.warmup_epochs = 0
    tx, schedule = optim.make_optimizer(oc, params, 100, 10,
                                        lr_scale_fn=layer_decay.scale_by_layer_decay(params, 3, 0.6))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    lr = float(schedule(0))
    adam = 0.1 / (0.1 + 1e-8)  # first Adam step: m̂/(√v̂ + ε) with bias correction = g/(|g| + ε)
    mask = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(
        optim.weight_decay_mask(params, oc.no_decay)).items()}
    flat_p = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}
    for k, u in flax.traverse_util.flatten_dict(updates).items():
        name = "/".join(k)
        scale = 0.6 ** (3 + 1 - layer_decay.layer_id(name, 3))
        expected = -lr * scale * (adam + (0.05 * flat_p[name] if mask[name] else 0.0))
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------------------------- official → timm
def official_finetune_state_dict(pretrain_sd: dict, depth: int) -> dict:
    """The official run_class_finetuning loader: drop the pretraining-only keys, copy the shared table into
    every block, drop relative_position_index buffers (timm keeps them non-persistent)."""
    skip = ("lm_head.", "cls_pt_layers.", "norm.", "mask_token", "rel_pos_bias.")
    out = {k: v for k, v in pretrain_sd.items() if not k.startswith(skip) and "relative_position_index" not in k}
    for i in range(depth):
        out[f"blocks.{i}.attn.relative_position_bias_table"] = pretrain_sd["rel_pos_bias.relative_position_bias_table"]
    return out


PRETRAIN_224 = dict(SMALL_PRETRAIN, backbone=dict(SMALL_BACKBONE, image_size=224, patch_size=16))


@pytest.mark.parametrize("image_size", [224, 288], ids=["224", "resized_tables_288"])
def test_official_pretraining_checkpoint_finetunes_like_timm_beit(tmp_path, image_size):
    """A (small, random) official pretraining checkpoint at 224², fine-tuned at 224² or 288² (window 14 → 18):
    our fine-tune model = timm Beit loaded the way the official fine-tuning script loads the checkpoint."""
    from timm.models.beit import Beit, checkpoint_filter_fn

    import argparse

    sd = export_variables(random_variables("beit_pretrain", PRETRAIN_224, seed=1), "official_beitv2",
                          "beit_pretrain", PRETRAIN_224)
    path = str(tmp_path / "beitv2_small_pt.pth")  # as the official script saves it: weights + its args
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()},
                "args": argparse.Namespace(early_layers=2, head_layers=2)}, path)
    pretrained = finetune.load_pretrained(path, "official_beitv2")
    assert pretrained.patch_aggregation and pretrained.config["rel_pos"] == "shared"
    cfg = finetune.finetune_vit_config(pretrained.config, image_size, num_classes=5, drop_path_rate=0.1)
    model = finetune.model_from_config(cfg)
    init = fresh_params(cfg, 3)  # a head / fc_norm that is not (near) zero
    params, report = finetune.adapt_pretrained(pretrained, cfg, init, rel_pos_interpolation="timm_linear")
    assert report["initialised"] == ["fc_norm/bias", "fc_norm/scale", "head/bias", "head/kernel"]
    assert {"norm/scale", "lm_head", "cls_pt_layers_0", "backbone/mask_token"} <= set(
        report["unused"])
    x = np.random.default_rng(5).standard_normal((2, image_size, image_size, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x))["logits"])

    ref = Beit(img_size=image_size, patch_size=16, embed_dim=64, depth=3, num_heads=4, use_abs_pos_emb=False,
               use_rel_pos_bias=True, init_values=0.1, num_classes=5, global_pool="avg", drop_path_rate=0.1).eval()
    ft_sd = official_finetune_state_dict(sd, depth=3)
    ft_sd.update({"fc_norm.weight": init["fc_norm"]["scale"], "fc_norm.bias": init["fc_norm"]["bias"],
                  "head.weight": init["head"]["kernel"].T, "head.bias": init["head"]["bias"]})
    ft_sd = checkpoint_filter_fn({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ft_sd.items()}, ref)
    ref.load_state_dict(ft_sd, strict=True)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    err = np.abs(ours - theirs).max()
    print(f"fine-tune at {image_size}: max |ours - timm| = {err:.2e} (|logits| ≤ {np.abs(theirs).max():.2f})")
    assert err <= 1e-5 * max(1.0, np.abs(theirs).max()), err
    for i in range(3):  # the tables: copied from the shared one and resized exactly as timm resizes
        np.testing.assert_allclose(params[f"blocks_{i}"]["attn"]["relative_position_bias_table"],
                                   ft_sd[f"blocks.{i}.attn.relative_position_bias_table"].numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_official_checkpoint_finetuned_at_384_matches_official_cubic_tables(tmp_path):
    """The default (official) 384² path: tables = the official run_class_finetuning loop (shared table copied per
    block, cubic spline on the geometric grid, 14 → 24) and the logits = timm Beit at 384² holding those tables."""
    from timm.models.beit import Beit

    from test_segmentation import official_cubic_resize

    sd = export_variables(random_variables("beit_pretrain", PRETRAIN_224, seed=4), "official_beitv2",
                          "beit_pretrain", PRETRAIN_224)
    path = str(tmp_path / "beitv2_small_pt.pth")
    torch_io.save_state_dict(path, sd, wrap="model")
    pretrained = finetune.load_pretrained(path, "official_beitv2")
    # no args.early_layers and depth 3: the aggregation layers are left out (only the backbone is fine-tuned)
    assert pretrained.patch_aggregation and "cls_pt_layers.0.norm1.weight" in pretrained.dropped
    cfg = finetune.finetune_vit_config(pretrained.config, 384, num_classes=5)
    init = fresh_params(cfg, 3)
    params, _ = finetune.adapt_pretrained(pretrained, cfg, init)  # default: official_cubic
    expected = official_cubic_resize(sd["rel_pos_bias.relative_position_bias_table"], (24, 24))
    for i in range(3):
        table = params[f"blocks_{i}"]["attn"]["relative_position_bias_table"]
        np.testing.assert_allclose(table, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    linear, _ = finetune.adapt_pretrained(pretrained, cfg, init, rel_pos_interpolation="timm_linear")
    gap = np.abs(linear["blocks_0"]["attn"]["relative_position_bias_table"] - expected).max()
    assert gap > 1e-3  # the two resizes do differ (random tables: by far more than the tolerance)
    x = np.random.default_rng(6).standard_normal((1, 384, 384, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(finetune.model_from_config(cfg).apply)({"params": params}, jnp.asarray(x))["logits"])
    ref = Beit(img_size=384, patch_size=16, embed_dim=64, depth=3, num_heads=4, use_abs_pos_emb=False,
               use_rel_pos_bias=True, init_values=0.1, num_classes=5, global_pool="avg").eval()
    ft_sd = official_finetune_state_dict(sd, depth=3)
    ft_sd.update({f"blocks.{i}.attn.relative_position_bias_table": expected for i in range(3)})
    ft_sd.update({"fc_norm.weight": init["fc_norm"]["scale"], "fc_norm.bias": init["fc_norm"]["bias"],
                  "head.weight": init["head"]["kernel"].T, "head.bias": init["head"]["bias"]})
    ref.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ft_sd.items()}, strict=True)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    err = np.abs(ours - theirs).max()
    print(f"fine-tune at 384 (official cubic tables): max |ours - official| = {err:.2e} "
          f"(|logits| ≤ {np.abs(theirs).max():.2f}; table gap to timm_linear {gap:.2f})")
    assert err <= 1e-5 * max(1.0, np.abs(theirs).max()), err


def test_rel_pos_interpolation_key_is_validated(tmp_path):
    from beitv2_jax import validate

    from conftest import load_config_file

    config = load_config_file("finetune_base")
    config.pretrained.checkpoint = str(tmp_path)
    config.model.rel_pos_interpolation = "bicubic"
    with pytest.raises(validate.ConfigError, match="config.model.rel_pos_interpolation='bicubic' must be one of"):
        validate.validate_stage(config, "finetune")
    config.model.rel_pos_interpolation = "timm_linear"
    validate.validate_stage(config, "finetune")


def test_pretrain_directory_and_wrong_head_size(tmp_path):
    """Our beit_pretrain directory loads the same; a fine-tuned source keeps fc_norm, drops a head of another
    size (official loader), and an encoder of another architecture is an error naming the parameters."""
    variables = random_variables("beit_pretrain", SMALL_PRETRAIN, seed=2)
    store.save_variables(str(tmp_path / "pt"), variables, "beit_pretrain", SMALL_PRETRAIN)
    pretrained = finetune.load_pretrained(str(tmp_path / "pt"))
    cfg = finetune.finetune_vit_config(pretrained.config, 32, num_classes=5)
    params, _ = finetune.adapt_pretrained(pretrained, cfg, fresh_params(cfg))
    np.testing.assert_array_equal(params["blocks_2"]["attn"]["relative_position_bias_table"],
                                  variables["params"]["backbone"]["rel_pos_bias"]["relative_position_bias_table"])
    finetune.save_model(str(tmp_path / "ft"), params, cfg)
    ft = finetune.load_pretrained(str(tmp_path / "ft"))
    cfg10 = finetune.finetune_vit_config(ft.config, 32, num_classes=10)
    again, report = finetune.adapt_pretrained(ft, cfg10, fresh_params(cfg10))
    assert report["initialised"] == ["head/bias", "head/kernel"]
    np.testing.assert_array_equal(again["fc_norm"]["scale"], params["fc_norm"]["scale"])
    wider = finetune.finetune_vit_config(dict(pretrained.config, width=32, num_heads=4), 32, num_classes=5)
    with pytest.raises(ValueError, match="patch_embed/kernel"):
        finetune.adapt_pretrained(pretrained, wider, fresh_params(wider))


def test_pos_embed_resize_matches_torch_bicubic():
    pos = np.random.default_rng(0).standard_normal((1, 1 + 16, 8)).astype(np.float32)
    for new in ((6, 6), (3, 3), (4, 7)):
        ours = finetune.resize_pos_embed(pos, new)
        grid = torch.from_numpy(pos[:, 1:]).reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
        ref = torch.nn.functional.interpolate(grid, size=new, mode="bicubic", align_corners=False)
        ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
        np.testing.assert_allclose(ours[:, 1:], ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ours[:, :1], pos[:, :1])


# ----------------------------------------------------------------------------------------------- mixup / cutmix
@pytest.mark.parametrize("use_cutmix,lam,cy,cx", [(False, 0.3, 0, 0), (True, 0.55, 3, 9), (True, 0.8, 0, 11)])
def test_mixup_cutmix_match_timm_for_the_same_lambda_and_box(monkeypatch, use_cutmix, lam, cy, cx):
    import timm.data.mixup as timm_mixup

    images = np.random.default_rng(0).standard_normal((6, 12, 14, 3)).astype(np.float32)
    labels = np.array([0, 3, 1, 4, 2, 3])
    ref = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)
    monkeypatch.setattr(ref, "_params_per_batch", lambda: (lam, use_cutmix))
    centres = iter([cy, cx])
    monkeypatch.setattr(timm_mixup.np.random, "randint", lambda low, high, size=None: next(centres))
    x_ref, y_ref = ref(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))

    box, cut_lam = augment.cutmix_box(jnp.float32(lam), cy, cx, 12, 14)
    params = augment.MixParams(cut_lam if use_cutmix else jnp.float32(lam), jnp.bool_(use_cutmix), box)
    mixed = augment.mix_images(jnp.asarray(images), params)
    targets = augment.mixup_target(jnp.asarray(labels), 5, params.lam, 0.1)
    np.testing.assert_allclose(np.asarray(mixed), x_ref.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets), y_ref.numpy(), rtol=1e-6, atol=1e-7)


def test_mixup_targets_sum_to_one_and_mix_reversed_pairs():
    mixup = augment.Mixup(num_classes=4, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    images = jax.random.normal(jax.random.PRNGKey(0), (8, 10, 10, 3))
    labels = jnp.arange(8) % 4
    onehot = augment.smooth_one_hot(labels, 4, 0.1)
    kinds = []
    sample_and_mix = jax.jit(lambda key: (mixup.sample(key, 10, 10), *mixup(key, images, labels)))
    for seed in range(40):
        params, mixed, targets = sample_and_mix(jax.random.PRNGKey(seed))
        lam = float(params.lam)
        np.testing.assert_allclose(np.asarray(targets.sum(-1)), 1.0, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(targets), np.asarray(lam * onehot + (1 - lam) * onehot[::-1]),
                                   rtol=1e-5, atol=1e-6)
        if bool(params.use_cutmix):
            y0, y1, x0, x1 = (int(v) for v in params.box)
            inside = np.zeros((10, 10), bool)
            inside[y0:y1, x0:x1] = True
            np.testing.assert_array_equal(np.asarray(mixed)[:, inside], np.asarray(images)[::-1][:, inside])
            np.testing.assert_array_equal(np.asarray(mixed)[:, ~inside], np.asarray(images)[:, ~inside])
            assert lam == pytest.approx(1 - inside.sum() / 100)
        else:
            np.testing.assert_allclose(np.asarray(mixed), np.asarray(lam * images + (1 - lam) * images[::-1]),
                                       rtol=1e-5, atol=1e-6)
        kinds.append(bool(params.use_cutmix))
    assert 8 <= sum(kinds) <= 32  # switch probability 0.5
    off = augment.Mixup(num_classes=4, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)
    same, smooth = off(jax.random.PRNGKey(0), images, labels)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(images))
    np.testing.assert_allclose(np.asarray(smooth), np.asarray(onehot))


# ----------------------------------------------------------------------------------------------- RandAugment
class Replay:
    """Python ``random`` / ``np.random`` stand-ins drawing from a numpy Generator with the meaning our code gives
    each draw, so timm and our implementation consume one stream identically."""

    def __init__(self, seed):
        self.g = np.random.default_rng(seed)
        self.random = types.SimpleNamespace(choice=lambda a, size, replace=True, p=None: [
            a[i] for i in self.g.choice(len(a), size, replace=replace, p=p)])

    def random_(self):
        return self.g.random()

    def uniform(self, a, b):
        return a + (b - a) * self.g.random()

    def gauss(self, mu, sigma):
        return mu + sigma * self.g.standard_normal()

    def randint(self, a, b):
        return int(self.g.integers(a, b + 1))

    def as_random_module(self):
        return types.SimpleNamespace(random=self.random_, uniform=self.uniform, gauss=self.gauss,
                                     randint=self.randint)


def _test_image(seed=0, size=32):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    base = np.stack([yy * 7 % 256, xx * 5 % 256, (xx + yy) * 3 % 256], -1)
    from PIL import Image

    return Image.fromarray((0.7 * base + 0.3 * rng.integers(0, 256, (size, size, 3))).astype(np.uint8))


def test_rand_augment_matches_timm_on_a_replayed_stream(monkeypatch):
    import timm.data.auto_augment as aa
    from PIL import Image

    hparams = dict(translate_const=int(32 * 0.45), img_mean=augment.fill_color(),
                   interpolation=Image.Resampling.BICUBIC)
    theirs = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", hparams)
    ours = augment.RandAugment.from_string("rand-m9-mstd0.5-inc1")
    assert (ours.magnitude, ours.num_layers, ours.prob, ours.magnitude_std, ours.increasing) == (9, 2, 0.5, 0.5, True)
    assert [op.name for op in theirs.ops] == list(ours.op_names)
    image = _test_image()
    seen = set()
    for seed in range(60):
        replay = Replay(seed)
        monkeypatch.setattr(aa, "random", replay.as_random_module())
        monkeypatch.setattr(aa, "np", types.SimpleNamespace(random=replay.random))
        expected = np.asarray(theirs(image.copy()))
        got = np.asarray(ours(image.copy(), np.random.default_rng(seed)))
        np.testing.assert_array_equal(got, expected, err_msg=f"seed {seed}")
        seen |= {ours.op_names[i] for i in np.random.default_rng(seed).choice(15, 2)}
    assert len(seen) == 15  # every op was drawn at least once


@pytest.mark.parametrize("increasing", [True, False])
def test_every_rand_augment_op_matches_timm(monkeypatch, increasing):
    import timm.data.auto_augment as aa
    from PIL import Image

    hparams = dict(translate_const=14, img_mean=augment.fill_color(), interpolation=Image.Resampling.BICUBIC)
    ours = augment.RandAugment(magnitude=7, prob=1.0, magnitude_std=0.0, increasing=increasing)
    image = _test_image(1)
    for name in ours.op_names:
        for seed in range(2):  # both signs of the signed ops
            replay = Replay(seed)
            monkeypatch.setattr(aa, "random", replay.as_random_module())
            expected = np.asarray(aa.AugmentOp(name, prob=1.0, magnitude=7, hparams=hparams)(image.copy()))
            got = np.asarray(ours.apply_op(image.copy(), name, np.random.default_rng(seed)))
            np.testing.assert_array_equal(got, expected, err_msg=name)


def test_posterize_at_full_magnitude_keeps_no_bit():
    """PosterizeIncreasing at magnitude 10 keeps 0 bits: black (older Pillow; recent Pillow raises in timm)."""
    image = _test_image(4)
    ra = augment.RandAugment(magnitude=10, prob=1.0, magnitude_std=0.0)
    assert not np.asarray(ra.apply_op(image, "PosterizeIncreasing", np.random.default_rng(0))).any()
    from PIL import ImageOps

    for bits in range(1, 8):
        np.testing.assert_array_equal(np.asarray(augment.op_function("Posterize")(image, bits, None, None)),
                                      np.asarray(ImageOps.posterize(image, bits)))


def test_rand_augment_and_train_transform_are_deterministic_for_a_seed():
    ra = augment.RandAugment.from_string("rand-m9-mstd0.5-inc1")
    image = _test_image(2)
    a = [np.asarray(ra(image, np.random.default_rng(s))) for s in range(6)]
    b = [np.asarray(ra(image, np.random.default_rng(s))) for s in range(6)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(a[0], x) for x in a[1:])
    transform = augment.FinetuneTrainTransform(input_size=24)
    record = {"image": np.asarray(_test_image(3, 48)), "label": 3}
    one = transform.random_map(record, np.random.default_rng(7))
    two = transform.random_map(record, np.random.default_rng(7))
    assert one["image"].shape == (24, 24, 3) and one["image"].dtype == np.float32 and one["label"] == 3
    np.testing.assert_array_equal(one["image"], two["image"])
    # Without random erasing the view goes out as uint8; normalised it is the float view outside any erased box.
    wire = dataclasses.replace(transform, re_prob=0.0).random_map(record, np.random.default_rng(7))
    assert wire["image"].dtype == np.uint8
    host = transforms.normalize(transforms.to_unit_float(wire["image"]))
    assert np.isclose(host, one["image"], atol=1e-6).all(-1).mean() > 0.5


def test_random_erasing_matches_timm_on_a_replayed_stream(monkeypatch):
    import timm.data.random_erasing as re_mod

    applied = 0
    for seed in range(40):
        prob = 1.0 if seed < 20 else 0.25
        replay = Replay(seed)
        monkeypatch.setattr(re_mod, "random", replay.as_random_module())
        x = torch.rand(3, 20, 24) + 5.0  # noise N(0, 1) never equals these values
        out = re_mod.RandomErasing(prob, mode="pixel", max_count=1, device="cpu")(x.clone())
        erased_ref = (out != x).any(0).numpy()
        boxes = augment.random_erasing_box(20, 24, np.random.default_rng(seed), prob=prob)
        mask = np.zeros((20, 24), bool)
        for top, left, h, w in boxes:
            mask[top:top + h, left:left + w] = True
        np.testing.assert_array_equal(mask, erased_ref, err_msg=f"seed {seed}")
        erased = augment.erase(x.permute(1, 2, 0).numpy(), boxes, np.random.default_rng(0))
        assert (erased != x.permute(1, 2, 0).numpy()).any(-1).sum() == mask.sum()
        applied += bool(boxes)
    assert 20 < applied < 40


# ----------------------------------------------------------------------------------------------- tiny run
def test_tiny_finetune_run_evaluates_and_writes_best_and_last(demo_data_dir, tmp_path):
    pt_cfg = dict(backbone=dict(image_size=16, patch_size=4, width=32, depth=1, num_heads=2, layer_scale_init=0.1),
                  vocab_size=16, num_masked_patches=4, early_layers=1, head_layers=0)
    store.save_variables(str(tmp_path / "pt"), random_variables("beit_pretrain", pt_cfg), "beit_pretrain", pt_cfg)

    c = load_config_file("finetune_base")
    with c.unlocked():
        c.pretrained.checkpoint = str(tmp_path / "pt")
        c.data.dataset, c.data.data_dir, c.data.eval_split = "beitv2_demo", demo_data_dir, "test"
        c.data.input_size, c.data.patch_size, c.data.num_workers, c.data.read_threads = 16, 4, 0, 2
        c.model.num_classes = 10
        c.batch_size, c.eval_batch_size, c.steps_per_epoch, c.num_epochs = 16, 250, 4, 2
        c.optim.warmup_epochs = 1
        c.log_every_steps = 2
    workdir = str(tmp_path / "ft")
    state = finetune.run(c, workdir)
    assert int(state.step) == 8
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/top1" in r]
    assert [r["epoch"] for r in evals] == [1, 2] and all(0 <= r["eval/top1"] <= 100 for r in evals)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["best"]["top1"] == max(r["eval/top1"] for r in evals)
    assert results["best"]["num_examples"] == 1000
    for name in ("best_model", "model"):
        variables, kind, cfg = store.load_variables(os.path.join(workdir, name))
        assert kind == "vit" and cfg["num_classes"] == 10 and cfg["rel_pos"] == "per_layer"
        assert "relative_position_bias_table" in variables["params"]["blocks_0"]["attn"]
    last, _, _ = store.load_variables(os.path.join(workdir, "model"))
    for a, b in zip(jax.tree.leaves(last["params"]), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)
