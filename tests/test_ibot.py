"""iBOT: EMA teacher, centering, temperature schedule, masking statistics, the loss against numpy, the weight-normed
head and the official layout against PyTorch, the optimizer against torch.optim.AdamW, and a tiny end-to-end run."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from beitv2_jax import recipes
from beitv2_jax.convert import engine, family, store
from beitv2_jax.data import multicrop
from beitv2_jax.models import ibot as ibot_lib
from beitv2_jax.train.tasks import ibot

from conftest import load_config_file


# ----------------------------------------------------------------------------------------------- tiny end-to-end run
@pytest.fixture(scope="module")
def tiny_run(demo_data_dir, tmp_path_factory):
    """4 steps (2 per epoch), a checkpoint after every step."""
    c = load_config_file("ibot_tiny")
    with c.unlocked():
        c.data.data_dir = demo_data_dir
        c.steps_per_epoch = 2
        c.num_epochs = 2
        c.checkpoint_every_steps = 1
        c.keep_checkpoints = 10
        c.model.update(width=16, depth=1, num_heads=2)
        c.head.update(out_dim=32, patch_out_dim=32, hidden_dim=16, bottleneck_dim=8)
        c.optim.update(warmup_epochs=0, lr=0.05)
    workdir = str(tmp_path_factory.mktemp("ibot") / "run")
    state = ibot.run(c, workdir)
    return c, workdir, state


def _restore(workdir, step):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return jax.tree.map(np.asarray, state)


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_teacher_is_ema_of_student_over_three_steps(tiny_run):
    c, workdir, _ = tiny_run
    init = _flat(ibot.build_model(c).init(jax.random.PRNGKey(c.seed)))
    states = {k: _restore(workdir, k) for k in (1, 2, 3)}
    total = c.steps_per_epoch * c.num_epochs
    momentum = [float(ibot.optim.cosine_schedule(c.teacher.momentum, 1.0, total)(k)) for k in range(3)]
    # official cosine_scheduler(0.996, 1, epochs, niter) at iterations 0, 1, 2
    iters = np.arange(total)
    official = 1 + 0.5 * (c.teacher.momentum - 1) * (1 + np.cos(np.pi * iters / total))
    np.testing.assert_allclose(momentum, official[:3], rtol=1e-6)
    teacher = {k: v.astype(np.float64) for k, v in init.items()}  # teacher = student at init
    for step in (1, 2, 3):
        student = _flat(states[step]["params"])
        assert set(student) == set(teacher)
        m = momentum[step - 1]
        teacher = {k: m * teacher[k] + (1 - m) * student[k].astype(np.float64) for k in teacher}
        ours = _flat(states[step]["model_state"]["teacher"])
        changed = 0
        for k in teacher:
            np.testing.assert_allclose(ours[k], teacher[k], rtol=2e-6, atol=1e-7, err_msg=f"step {step} {k}")
            changed += not np.array_equal(student[k], init[k])
        assert changed > 10  # the student moved, so the EMA is not trivially the init
    # centers: updated every step from zero, finite
    assert np.abs(states[1]["model_state"]["center"]).max() > 0
    assert np.isfinite(states[3]["model_state"]["center2"]).all()


def test_last_layer_frozen_for_the_first_epoch(tiny_run):
    c, workdir, _ = tiny_run
    init = ibot.build_model(c).init(jax.random.PRNGKey(c.seed))["head"]["last_layer"]
    for step in (1, 2, 3, 4):
        last = _restore(workdir, step)["params"]["head"]["last_layer"]
        frozen = np.array_equal(last["weight_v"], np.asarray(init["weight_v"]))
        assert frozen == (step <= c.steps_per_epoch), step
        g_fixed = np.array_equal(last["weight_g"], np.asarray(init["weight_g"]))
        # norm_last_layer: g fixed at 1 for good; otherwise g trains too, after the first epoch (the demo setting)
        assert g_fixed == (c.head.norm_last_layer or step <= c.steps_per_epoch), step


def test_exported_teacher_is_a_vit_for_knn_and_linear_probe(tiny_run):
    from beitv2_jax.train.tasks import finetune, linear_probe

    c, workdir, state = tiny_run
    directory = os.path.join(workdir, ibot.TEACHER_DIR)
    _, kind, config = store.load_variables(directory)
    assert kind == "vit" and config["image_size"] == c.data.input_size and not config["use_mask_token"]
    pretrained = finetune.load_pretrained(directory)
    features = linear_probe.feature_fn(linear_probe.encoder_model(pretrained), "cls")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, c.data.input_size, c.data.input_size, 3))
    model = ibot.build_model(c)
    expected = model.encode(jax.device_get(state.model_state["teacher"]["backbone"]), x)[:, 0]
    np.testing.assert_allclose(np.asarray(features(pretrained.params, x)), np.asarray(expected), atol=1e-5)


# ----------------------------------------------------------------------------------------------- loss and centers
def numpy_ibot_loss(s_cls, s_patch, t_cls, t_patch, masks, center, center2, temp, temp2, student_temp=0.1):
    """The official iBOTLoss.forward, loop for loop, in float64 (inputs crop-major lists)."""
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    t_cls_c = [softmax((t - center) / temp) for t in t_cls]
    t_patch_c = [softmax((t - center2) / temp2) for t in t_patch]
    total1 = n1 = total2 = n2 = 0
    for q in range(len(t_cls_c)):
        for v in range(len(s_cls)):
            if v == q:
                loss2 = np.sum(-t_patch_c[q] * log_softmax(s_patch[v] / student_temp), axis=-1)
                mask = masks[v].astype(np.float64)
                loss2 = np.sum(loss2 * mask, axis=-1) / np.clip(mask.sum(-1), 1.0, None)
                total2 += loss2.mean()
                n2 += 1
            else:
                total1 += np.sum(-t_cls_c[q] * log_softmax(s_cls[v] / student_temp), axis=-1).mean()
                n1 += 1
    return total1 / n1 + total2 / n2, total1 / n1, total2 / n2


def test_loss_matches_numpy_on_a_hand_made_example():
    rng = np.random.default_rng(0)
    g, crops, b, n, k = 2, 3, 2, 3, 4  # 2 global + 1 local crop, 2 images, 3 patches, 4 prototypes
    s_cls, t_cls = rng.normal(size=(crops, b, k)), rng.normal(size=(g, b, k))
    s_patch, t_patch = rng.normal(size=(g, b, n, k)), rng.normal(size=(g, b, n, k))
    masks = np.array([[[1, 0, 1], [0, 0, 0]], [[0, 1, 0], [1, 1, 1]]], bool)  # image 1 of crop 0 unmasked
    center, center2 = rng.normal(size=(1, k)) * 0.1, rng.normal(size=(1, 1, k)) * 0.1
    ours = ibot.ibot_loss(*(jnp.asarray(x, jnp.float32) for x in (s_cls, s_patch, t_cls, t_patch)),
                          jnp.asarray(masks), jnp.asarray(center, jnp.float32), jnp.asarray(center2, jnp.float32),
                          0.05, 0.06)
    ref = numpy_ibot_loss(list(s_cls), list(s_patch), list(t_cls), list(t_patch), list(masks), center, center2,
                          0.05, 0.06)
    np.testing.assert_allclose([float(ours.total), float(ours.cls), float(ours.patch)], ref, rtol=1e-5)


def test_center_update_is_an_ema_of_batch_means():
    rng = np.random.default_rng(1)
    t_cls, t_patch = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 4, 5))
    center, center2 = rng.normal(size=(1, 5)), rng.normal(size=(1, 1, 5))
    new, new2 = ibot.update_centers(*(jnp.asarray(x, jnp.float32) for x in (center, center2, t_cls, t_patch)))
    # official: sum over the (crop-major) batch / len, then EMA with momentum 0.9
    np.testing.assert_allclose(new, 0.9 * center + 0.1 * t_cls.reshape(6, 5).sum(0, keepdims=True) / 6, rtol=1e-5)
    patch = t_patch.reshape(6, 4, 5).mean(1)
    np.testing.assert_allclose(new2, 0.9 * center2 + 0.1 * (patch.sum(0) / 6)[None, None], rtol=1e-5)


def test_teacher_temperature_schedule():
    sched = ibot.teacher_temperature_schedule(0.04, 0.07, 30, 800)
    official = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(800 - 30) * 0.07))
    np.testing.assert_allclose(sched, official, rtol=1e-6)
    assert sched[0] == pytest.approx(0.04)
    assert sched[10] == pytest.approx(0.04 + 10 * 0.03 / 29, rel=1e-6)
    assert sched[29] == pytest.approx(0.07) and sched[30] == pytest.approx(0.07) and sched[799] == pytest.approx(0.07)
    short = ibot.teacher_temperature_schedule(0.04, 0.07, 30, 5)
    np.testing.assert_allclose(short, official[:5], rtol=1e-6)


# ----------------------------------------------------------------------------------------------- masking and crops
def test_masking_probability_and_ratio_statistics():
    t = multicrop.MultiCropTransform(global_size=224, patch_size=16)  # README: ratio 0 or U(0.1, 0.5), blocks
    rng = np.random.default_rng(0)
    ratios = np.array([multicrop.pred_ratio(rng, (0.0, 0.3), (0.0, 0.2)) for _ in range(4000)])
    assert abs((ratios == 0).mean() - 0.5) < 0.03
    drawn = ratios[ratios > 0]
    assert drawn.min() >= 0.1 and drawn.max() <= 0.5 and abs(drawn.mean() - 0.3) < 0.01
    masks = np.stack([t.mask(rng) for _ in range(1000)]).reshape(1000, -1)
    fractions = masks.mean(1)
    assert abs((fractions == 0).mean() - 0.5) < 0.05  # half of the global crops are not masked
    masked = fractions[fractions > 0]
    assert masked.max() <= 0.5 and masked.min() > 0.03
    assert 0.2 < masked.mean() < 0.3  # blocks stop below the drawn ratio · 196 (at most one block short)
    rand = multicrop.MultiCropTransform(global_size=224, patch_size=16, pred_shape="rand", pred_ratio=(0.3,),
                                        pred_ratio_var=(0.0,))
    assert all(rand.mask(rng).sum() == int(0.3 * 196) for _ in range(20))


def test_multicrop_views_and_hue_match_torchvision():
    from PIL import Image
    from torchvision.transforms import functional as TF

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    for hue in (-0.1, -0.03, 0.0, 0.07):
        np.testing.assert_array_equal(np.asarray(multicrop.adjust_hue(image, hue)),
                                      np.asarray(TF.adjust_hue(image, hue)))
    np.testing.assert_array_equal(np.asarray(multicrop.to_grayscale_rgb(image)),
                                  np.asarray(TF.rgb_to_grayscale(image, num_output_channels=3)))
    t = multicrop.MultiCropTransform(global_size=32, local_size=16, num_local=3, patch_size=4)
    out = t.random_map({"image": np.asarray(image), "label": 3}, rng)
    assert out["global_crops"].shape == (2, 32, 32, 3) and out["local_crops"].shape == (3, 16, 16, 3)
    assert out["global_crops"].dtype == out["local_crops"].dtype == np.uint8
    assert out["masks"].shape == (2, 64) and out["masks"].dtype == bool and out["label"] == 3


# ----------------------------------------------------------------------------------------------- head and layout
def test_weight_normed_last_layer_matches_pytorch():
    rng = np.random.default_rng(0)
    linear = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 5, bias=False))
    g, v = rng.uniform(0.5, 2, size=(5, 1)), rng.normal(size=(5, 8))
    with torch.no_grad():
        linear.parametrizations.weight.original0.copy_(torch.tensor(g))
        linear.parametrizations.weight.original1.copy_(torch.tensor(v))
    x = rng.normal(size=(3, 8)).astype(np.float32)
    ref = linear(torch.tensor(x)).detach().numpy()
    layer = ibot_lib.WeightNormDense(5)
    ours = layer.apply({"params": {"weight_g": jnp.asarray(g.T), "weight_v": jnp.asarray(v.T)}}, jnp.asarray(x))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


class TorchIBOTHead(torch.nn.Module):
    """models/head.py iBOTHead (shared_head, nlayers 3, GELU, no norm), rebuilt for the test."""

    def __init__(self, dim, out, hidden, bottleneck):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.GELU(), torch.nn.Linear(hidden, bottleneck))
        self.last_layer = torch.nn.utils.weight_norm(torch.nn.Linear(bottleneck, out, bias=False))
        self.last_layer2 = self.last_layer

    def forward(self, x):
        x = torch.nn.functional.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])


def test_head_and_official_layout_against_pytorch():
    import timm

    torch.manual_seed(0)
    backbone = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, qkv_bias=True, num_classes=0).eval()
    head = TorchIBOTHead(32, 24, 16, 8).eval()
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    teacher = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
               **{f"head.{k}": v for k, v in head.state_dict().items()}}
    assert "head.last_layer2.weight_v" in teacher  # the shared module is serialised under both names
    converted = engine.import_state_dict(teacher, "official_ibot", overrides={"num_heads": 2})
    assert converted.model_kind == "vit" and all(k.startswith("head.") for k in converted.ignored)
    head_cfg = family.infer_ibot_head(teacher)
    assert head_cfg == dict(out_dim=24, patch_out_dim=24, hidden_dim=16, bottleneck_dim=8, num_layers=3,
                            shared_head=True)
    head_params = family.import_ibot_head(teacher, head_cfg, embed_dim=32)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        tokens = backbone.forward_features(torch.tensor(x).permute(0, 3, 1, 2))
        ref_cls, ref_patch = head(tokens)
    model = ibot_lib.IBOT(ibot_lib.ibot_backbone(**dict(converted.model_config, use_mask_token=False)),
                          ibot_lib.IBOTHead(**{k: head_cfg[k] for k in ibot_lib.HEAD_FIELDS}))
    params = {"backbone": converted.variables["params"], "head": head_params}
    cls, patch = model(params, jnp.asarray(x))
    np.testing.assert_allclose(cls, ref_cls.numpy(), atol=2e-5)
    np.testing.assert_allclose(patch, ref_patch.numpy(), atol=2e-5)
    back = family.export_with_rules({"params": head_params}, family.ibot_head_rules(head_cfg, fp="params/"))
    for key, value in back.items():
        np.testing.assert_array_equal(value, teacher[key].numpy(), err_msg=key)


def test_local_crop_positions_match_pytorch_interpolation():
    rng = np.random.default_rng(0)
    for n, grid in ((14, 6), (8, 4), (4, 2)):
        pos = rng.normal(size=(1, 1 + n * n, 5)).astype(np.float32)
        patch = torch.tensor(pos[:, 1:]).reshape(1, n, n, 5).permute(0, 3, 1, 2)
        w0 = grid + 0.1
        ref = torch.nn.functional.interpolate(patch, scale_factor=(w0 / math.sqrt(n * n), w0 / math.sqrt(n * n)),
                                              mode="bicubic")
        ref = np.concatenate([pos[:, :1], ref.permute(0, 2, 3, 1).reshape(1, -1, 5).numpy()], 1)
        np.testing.assert_allclose(ibot_lib.interpolate_pos_embed(jnp.asarray(pos), grid), ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------- optimizer
def test_optimizer_matches_torch_adamw_with_per_tensor_clip_and_frozen_last_layer():
    import ml_collections

    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,)),
              "head": {"last_layer": {"weight_v": rng.normal(size=(2, 3))}}}
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    cfg = ml_collections.ConfigDict(dict(lr=0.1, lr_batch_base=256, min_lr=0.01, warmup_epochs=1, b1=0.9, b2=0.999,
                                         eps=1e-8, weight_decay=0.04, weight_decay_end=0.4, clip_grad=0.5,
                                         clip_mode="per_tensor", freeze_last_layer_epochs=1, no_decay=[]))
    steps, per_epoch = 5, 2
    tx, lr, wd = ibot.make_optimizer(cfg, params, batch_size=256, total_steps=steps, steps_per_epoch=per_epoch,
                                     norm_last_layer=True)
    grads = [jax.tree.map(lambda x: (3 * rng.normal(size=x.shape)).astype(np.float32), params) for _ in range(steps)]
    state, p = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in (("w", params["w"]), ("b", params["b"]),
                                                               ("v", params["head"]["last_layer"]["weight_v"]))}
    opt = torch.optim.AdamW([{"params": [tp["w"], tp["v"]]}, {"params": [tp["b"]], "weight_decay": 0.0}])
    for it, g in enumerate(grads):
        opt.param_groups[0].update(lr=float(lr(it)), weight_decay=float(wd(it)))
        opt.param_groups[1].update(lr=float(lr(it)))
        for name, grad in (("w", g["w"]), ("b", g["b"]), ("v", g["head"]["last_layer"]["weight_v"])):
            grad = torch.tensor(grad)
            coef = 0.5 / (grad.norm(2) + 1e-6)  # utils.clip_gradients
            tp[name].grad = grad * coef if coef < 1 else grad
        if it < per_epoch:  # utils.cancel_gradients_last_layer
            tp["v"].grad = None
        opt.step()
    np.testing.assert_allclose(p["w"], tp["w"].detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p["b"], tp["b"].detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p["head"]["last_layer"]["weight_v"], tp["v"].detach().numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- one step vs PyTorch
def torch_ibot_loss(s_cls, s_patch, t_cls, t_patch, masks, center, center2, temp, temp2, ngcrops, ncrops):
    """main_ibot.py iBOTLoss.forward (student_temp 0.1, lambdas 1)."""
    import torch.nn.functional as F

    s_cls_c, s_patch_c = (s_cls / 0.1).chunk(ncrops), (s_patch / 0.1).chunk(ngcrops)
    t_cls_c = F.softmax((t_cls - center) / temp, dim=-1).detach().chunk(ngcrops)
    t_patch_c = F.softmax((t_patch - center2) / temp2, dim=-1).detach().chunk(ngcrops)
    total1 = n1 = total2 = n2 = 0
    for q in range(len(t_cls_c)):
        for v in range(len(s_cls_c)):
            if v == q:
                loss2 = torch.sum(-t_patch_c[q] * F.log_softmax(s_patch_c[v], dim=-1), dim=-1)
                mask = masks[v].flatten(-2, -1)
                total2 += (torch.sum(loss2 * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)).mean()
                n2 += 1
            else:
                total1 += torch.sum(-t_cls_c[q] * F.log_softmax(s_cls_c[v], dim=-1), dim=-1).mean()
                n1 += 1
    return total1 / n1 + total2 / n2


def torch_tokens(backbone, x, mask=None, masked_embed=None):
    """iBOT prepare_tokens + blocks + norm on a timm ViT (positions interpolated like interpolate_pos_encoding)."""
    b, n = x.shape[0], backbone.pos_embed.shape[1] - 1
    t = backbone.patch_embed.proj(x)
    if mask is not None:  # mask_model: masked patch embeddings replaced before the positions
        t.permute(0, 2, 3, 1)[mask.reshape(b, *t.shape[2:])] = masked_embed.to(t.dtype)
    grid = t.shape[-1]
    t = t.flatten(2).transpose(1, 2)
    pos = backbone.pos_embed
    if grid * grid != n:
        side, w0 = int(math.sqrt(n)), grid + 0.1
        patch = torch.nn.functional.interpolate(pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2),
                                                scale_factor=(w0 / side, w0 / side), mode="bicubic")
        pos = torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)
    t = torch.cat([backbone.cls_token.expand(b, -1, -1), t], 1) + pos
    return backbone.norm(backbone.blocks(t))


def test_two_training_steps_match_the_official_pytorch_step():
    import ml_collections
    import timm

    def network():
        return torch.nn.ModuleDict({"backbone": timm.models.vision_transformer.VisionTransformer(
            img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, qkv_bias=True, num_classes=0),
            "head": TorchIBOTHead(16, 32, 16, 8)})

    torch.manual_seed(0)
    student, teacher = network(), network()
    teacher.load_state_dict(student.state_dict())  # teacher and student start with the same weights
    backbone, head = student["backbone"], student["head"]
    head.last_layer.weight_g.requires_grad = False  # norm_last_layer
    masked_embed = torch.nn.Parameter(0.1 * torch.randn(1, 16))
    sd = {k: v.detach().numpy().copy() for k, v in student.state_dict().items()}
    converted = engine.import_state_dict(sd, "official_ibot", overrides={"num_heads": 2})
    head_cfg = family.infer_ibot_head(sd)
    params = {"backbone": dict(converted.variables["params"], mask_token=masked_embed.detach().numpy()[None]),
              "head": family.import_ibot_head(sd, head_cfg, embed_dim=16)}
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    model = ibot_lib.IBOT(ibot_lib.ibot_backbone(**dict(converted.model_config, use_mask_token=True)),
                          ibot_lib.IBOTHead(**{k: head_cfg[k] for k in ibot_lib.HEAD_FIELDS}))

    cfg = ml_collections.ConfigDict(dict(lr=0.02, lr_batch_base=256, min_lr=0.002, warmup_epochs=0, b1=0.9,
                                         b2=0.999, eps=1e-8, weight_decay=0.04, weight_decay_end=0.4, clip_grad=0.5,
                                         clip_mode="per_tensor", freeze_last_layer_epochs=1, no_decay=[]))
    tx, lr, wd = ibot.make_optimizer(cfg, params, batch_size=256, total_steps=2, steps_per_epoch=1,
                                     norm_last_layer=True)
    momentum = ibot.optim.cosine_schedule(0.9, 1.0, 2)
    settings = ibot.StepSettings(steps_per_epoch=1, teacher_temps=(0.04, 0.05), teacher_patch_temps=(0.05, 0.06))
    step = jax.jit(ibot.make_train_step(model, tx, lr, wd, momentum, settings))
    state = ibot.state_lib.create(params, tx, model_state={
        "teacher": jax.tree.map(jnp.copy, params), "center": jnp.zeros((1, 32)), "center2": jnp.zeros((1, 1, 32))},
        extra={"bad_steps": jnp.zeros((), jnp.int32)})

    rng = np.random.default_rng(0)
    batches = [{"global_crops": rng.normal(size=(3, 2, 16, 16, 3)).astype(np.float32),
                "local_crops": rng.normal(size=(3, 2, 8, 8, 3)).astype(np.float32),
                "masks": rng.random((3, 2, 16)) < 0.4} for _ in range(2)]
    for batch in batches:
        state, metrics = step(state, batch, {})

    decay = [p for n, p in student.named_parameters() if p.requires_grad and not (n.endswith(".bias") or p.ndim == 1)]
    plain = [p for n, p in student.named_parameters() if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)]
    opt = torch.optim.AdamW([{"params": decay + [masked_embed]}, {"params": plain, "weight_decay": 0.0}])
    center, center2 = torch.zeros(1, 32), torch.zeros(1, 1, 32)
    for it, batch in enumerate(batches):
        opt.param_groups[0].update(lr=float(lr(it)), weight_decay=float(wd(it)))
        opt.param_groups[1].update(lr=float(lr(it)))
        crops = [torch.tensor(batch["global_crops"][:, i]).permute(0, 3, 1, 2) for i in range(2)]
        local = [torch.tensor(batch["local_crops"][:, i]).permute(0, 3, 1, 2) for i in range(2)]
        masks = [torch.tensor(batch["masks"][:, i]).reshape(3, 4, 4) for i in range(2)]
        with torch.no_grad():
            t_cls, t_patch = teacher["head"](torch_tokens(teacher["backbone"], torch.cat(crops)))
        s_cls, s_patch = head(torch_tokens(backbone, torch.cat(crops), torch.cat(masks), masked_embed))
        s_local = head(torch_tokens(backbone, torch.cat(local)))[0]
        temps = settings.teacher_temps[it], settings.teacher_patch_temps[it]
        loss = torch_ibot_loss(torch.cat([s_cls, s_local]), s_patch, t_cls, t_patch, masks, center, center2, *temps,
                               2, 4)
        t_probs = torch.softmax((t_cls - center) / temps[0], dim=-1).reshape(2, 3, -1)  # the collapse monitors
        entropy = lambda p: -(p * torch.log(p)).sum(-1).mean()
        t_entropy, t_batch_entropy = float(entropy(t_probs)), float(entropy(t_probs.mean(1)))
        opt.zero_grad()
        loss.backward()
        for p in list(student.parameters()) + [masked_embed]:  # utils.clip_gradients
            if p.grad is not None:
                coef = 0.5 / (p.grad.norm(2) + 1e-6)
                if coef < 1:
                    p.grad.mul_(coef)
        if it < 1:  # utils.cancel_gradients_last_layer(epoch=0, freeze_last_layer=1)
            for n, p in student.named_parameters():
                if "last_layer" in n:
                    p.grad = None
        opt.step()
        m = float(momentum(it))
        with torch.no_grad():
            for (_, ps), (_, pt) in zip(student.named_parameters(), teacher.named_parameters()):
                pt.mul_(m).add_((1 - m) * ps.detach())
            center = center * 0.9 + t_cls.mean(0, keepdim=True) * 0.1
            center2 = center2 * 0.9 + t_patch.mean(1).mean(0, keepdim=True)[None] * 0.1
        if it == 1:
            assert float(metrics["loss"]) == pytest.approx(float(loss.detach()), rel=1e-4)
            assert float(metrics["teacher_entropy"]) == pytest.approx(t_entropy, rel=1e-4)
            assert float(metrics["teacher_batch_entropy"]) == pytest.approx(t_batch_entropy, rel=1e-4)

    for name, module in (("params", student), ("teacher", teacher)):
        ours = jax.device_get(state.params if name == "params" else state.model_state["teacher"])
        ref = {k: v.detach().numpy() for k, v in module.state_dict().items()}
        back = engine.export_variables({"params": {k: v for k, v in ours["backbone"].items() if k != "mask_token"}},
                                       "official_ibot", "vit", converted.model_config)
        back.update(family.export_with_rules({"params": ours["head"]}, family.ibot_head_rules(head_cfg, fp="params/")))
        for key, value in back.items():
            expected = ref[key]
            if key.endswith("attn.qkv.bias"):  # the key bias has an exactly-zero gradient: Adam scales pure noise
                value, expected = np.delete(value, np.s_[16:32]), np.delete(expected, np.s_[16:32])
            # Adam's first steps are ±lr-sized per element: float32 noise in tiny gradients shows at ~1e-6
            np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-5, err_msg=f"{name} {key}")
    np.testing.assert_allclose(state.params["backbone"]["mask_token"][0], masked_embed.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(state.model_state["center"], center.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.model_state["center2"], center2.numpy(), rtol=1e-4, atol=1e-6)


def test_zero_init_cls_zeroes_only_the_class_token_and_its_position():
    c = load_config_file("ibot_tiny")
    assert c.model.zero_init_cls  # the demo setting, inherited by the tiny config
    with c.unlocked():
        c.model.zero_init_cls = False
    official = ibot.build_model(c).init(jax.random.PRNGKey(3))
    with c.unlocked():
        c.model.zero_init_cls = True
    zeroed = ibot.build_model(c).init(jax.random.PRNGKey(3))
    bb, ref = zeroed["backbone"], official["backbone"]
    assert float(jnp.abs(ref["cls_token"]).max()) > 0 and float(jnp.abs(ref["pos_embed"][:, 0]).max()) > 0
    assert not np.any(bb["cls_token"]) and not np.any(bb["pos_embed"][:, 0])
    np.testing.assert_array_equal(bb["pos_embed"][:, 1:], ref["pos_embed"][:, 1:])
    changed = {k for k, a in _flat(zeroed).items() if not np.array_equal(a, _flat(official)[k])}
    assert changed == {k for k in _flat(zeroed) if k.endswith(("cls_token", "pos_embed"))}, changed
    assert not recipes.ibot("small").model.zero_init_cls and not recipes.ibot("base").model.zero_init_cls
