"""Segmentation model parity: a PyTorch re-creation of the official BEiT v2 UperNet model (``semantic_segmentation/
backbone/beit.py`` with fpn1..fpn4 and per-layer tables; mmseg ``UPerHead`` / ``FCNHead`` / ``ConvModule`` written
with torch only) with random weights vs ours after ``convert`` (layout ``official_beitv2_seg``), in float32;
the official ``LayerDecayOptimizerConstructor`` vs our layer ids / weight-decay mask; the backbone initialised
from a pretrained encoder (shared table copied per layer, cubic resize) vs the official loader.

Criterion: max |ours − theirs| ≤ 1e-5 · max(1, max |theirs|).
"""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from beitv2_jax.convert import export_variables, import_state_dict
from beitv2_jax.convert.model_shapes import build_model
from beitv2_jax.models import relpos, segmentation as seg
from beitv2_jax.train import layer_decay, optim
from beitv2_jax.train.tasks import finetune

RTOL = 1e-5


# ----------------------------------------------------------------------------------------------- torch reference
class OfficialBEiT(nn.Module):
    """``semantic_segmentation/backbone/beit.py`` ``BEiT`` (use_rel_pos_bias, no abs positions), blocks = timm's
    Beit ``Block`` (the official Block: q/v bias, per-layer table, layer scale), ``forward`` = ``forward_features``."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, init_values, out_indices):
        super().__init__()
        from timm.models.beit import Block

        self.patch_size, self.out_indices = patch_size, out_indices
        window = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, qkv_bias=True, mlp_ratio=4.0, init_values=init_values,
                                           norm_layer=norm, window_size=window) for _ in range(depth)])
        d = embed_dim
        if patch_size == 16:
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.BatchNorm2d(d), nn.GELU(),
                                      nn.ConvTranspose2d(d, d, 2, 2))
            self.fpn2 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2))
            self.fpn3 = nn.Identity()
            self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        else:
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2))
            self.fpn2 = nn.Identity()
            self.fpn3 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))
            self.fpn4 = nn.Sequential(nn.MaxPool2d(kernel_size=4, stride=4))

    def forward(self, x):
        b = x.shape[0]
        x = self.patch_embed.proj(x)
        hp, wp = x.shape[2], x.shape[3]
        x = torch.cat((self.cls_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)), dim=1)
        features = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.out_indices:
                features.append(x[:, 1:, :].permute(0, 2, 1).reshape(b, -1, hp, wp).contiguous())
        ops = [self.fpn1, self.fpn2, self.fpn3, self.fpn4]
        return tuple(op(f) for op, f in zip(ops, features))


class ConvModule(nn.Module):
    """mmcv ConvModule(norm_cfg=BN, act_cfg=ReLU): conv (bias="auto" → none with a norm) → bn → relu."""

    def __init__(self, cin, cout, k, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


def resize(x, size, align_corners=False):
    """mmseg.ops.resize (bilinear)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class PPM(nn.ModuleList):
    def __init__(self, pool_scales, in_channels, channels, align_corners):
        super().__init__()
        self.align_corners = align_corners
        for s in pool_scales:
            self.append(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1)))

    def forward(self, x):
        return [resize(ppm(x), x.shape[2:], self.align_corners) for ppm in self]


class UPerHead(nn.Module):
    """mmseg UPerHead (input_transform='multiple_select', in_index [0, 1, 2, 3]) + BaseDecodeHead.cls_seg."""

    def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6), dropout_ratio=0.1,
                 align_corners=False):
        super().__init__()
        self.align_corners = align_corners
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels, align_corners)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio)

    def psp_forward(self, inputs):
        x = inputs[-1]
        return self.bottleneck(torch.cat([x] + self.psp_modules(x), dim=1))

    def forward(self, inputs):
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs))
        levels = len(laterals)
        for i in range(levels - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(levels - 1)]
        outs.append(laterals[-1])
        for i in range(levels - 1, 0, -1):
            outs[i] = resize(outs[i], outs[0].shape[2:], self.align_corners)
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """mmseg FCNHead(num_convs, kernel_size=3, concat_input=False, dilation=1) + cls_seg."""

    def __init__(self, in_channels, channels, num_classes, num_convs=1, dropout_ratio=0.1):
        super().__init__()
        self.convs = nn.Sequential(*[ConvModule(in_channels if n == 0 else channels, channels, 3, padding=1)
                                     for n in range(num_convs)])
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.convs(x)))


class OfficialUperNet(nn.Module):
    """mmseg EncoderDecoder: backbone → decode_head (all levels) / auxiliary_head (level ``aux_in_index``)."""

    def __init__(self, img_size, patch_size, d, depth, heads, out_indices, num_classes, channels, aux_channels,
                 dropout_ratio=0.1, aux_in_index=2):
        super().__init__()
        self.aux_in_index = aux_in_index
        self.backbone = OfficialBEiT(img_size, patch_size, d, depth, heads, 0.1, out_indices)
        self.decode_head = UPerHead([d] * 4, channels, num_classes, dropout_ratio=dropout_ratio)
        self.auxiliary_head = FCNHead(d, aux_channels, num_classes, dropout_ratio=dropout_ratio)

    def forward(self, x):
        feats = self.backbone(x)
        logits = self.decode_head(feats)
        return {"features": feats, "logits": logits, "aux_logits": self.auxiliary_head(feats[self.aux_in_index]),
                "encode_decode": resize(logits, x.shape[2:])}  # EncoderDecoder.encode_decode


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial values: norm scales ≈ 1, biases, tables and layer scale ≠ 0, BN running stats ≠ (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "relative_position_bias_table" in name:
                p.copy_(noise)
            elif p.ndim == 1 and name.endswith("weight"):  # LayerNorm / BatchNorm scales
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim <= 1 or p.ndim == 3:  # biases, layer scale, q/v bias, cls token
                p.copy_(0.2 * noise)
            else:
                fan_in = p.shape[0] * 4 if "fpn" in name else np.prod(p.shape[1:])  # ConvTranspose: [in, out, k, k]
                p.copy_(noise / np.sqrt(fan_in))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model.eval()


def state_dict_numpy(model: nn.Module) -> dict:
    """What ``torch.save(model.state_dict())`` holds, as numpy (timm's index buffers are not persistent; the official
    ones are, and the converter validates them when present)."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_close(name, ours, theirs) -> float:
    ours = np.asarray(ours, np.float64)
    theirs = np.asarray(theirs.detach().numpy() if hasattr(theirs, "detach") else theirs, np.float64)
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    err = float(np.abs(ours - theirs).max())
    bound = RTOL * max(1.0, float(np.abs(theirs).max()))
    print(f"{name}: max abs err {err:.3g} (bound {bound:.3g}, max |theirs| {np.abs(theirs).max():.3g})")
    assert err <= bound, f"{name}: max |ours - theirs| = {err:.3g} > {bound:.3g}"
    return err


def nchw_to_nhwc(t):
    return t.permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("size,patch,batch", [(512, 16, 1), (64, 8, 2)], ids=["512_patch16", "64_patch8"])
def test_upernet_matches_official_recreation_eval(size, patch, batch, tmp_path):
    """Eval mode (BN running stats): the 4 pyramid levels, both heads' logits and the logits resized to the image
    (mmseg encode_decode), after converting the torch state dict with ``official_beitv2_seg``."""
    torch.manual_seed(0)
    depth, out_indices = 4, [0, 1, 2, 3]
    ref = randomize_(OfficialUperNet(size, patch, 32, depth, 2, out_indices, num_classes=5, channels=16,
                                     aux_channels=8), seed=1)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = ref(x)
    result = import_state_dict(state_dict_numpy(ref), "official_beitv2_seg",
                               overrides={"out_indices": out_indices})
    assert result.model_kind == "segmentation" and result.ignored  # num_batches_tracked
    model = build_model(result.model_kind, result.model_config)
    images = jnp.asarray(nchw_to_nhwc(x).numpy())
    feats = jax.jit(lambda v, im: model.apply(v, im, method=lambda m, im: m.backbone(im)))(result.variables, images)
    for level, (ours_f, theirs_f) in enumerate(zip(feats, theirs["features"])):
        assert_close(f"{size}/fpn{level + 1}", ours_f, nchw_to_nhwc(theirs_f))
    out = jax.jit(model.apply)(result.variables, images)
    assert_close(f"{size}/logits", out["logits"], nchw_to_nhwc(theirs["logits"]))
    assert_close(f"{size}/aux_logits", out["aux_logits"], nchw_to_nhwc(theirs["aux_logits"]))
    assert_close(f"{size}/encode_decode", seg.resize_bilinear(out["logits"], (size, size)),
                 nchw_to_nhwc(theirs["encode_decode"]))
    # and back: export = the torch state dict (but the BN step counters) + the official persistent index buffers
    exported = export_variables(result.variables, "official_beitv2_seg", "segmentation", result.model_config)
    sd = state_dict_numpy(ref)
    index = {k for k in exported if k.endswith("attn.relative_position_index")}
    assert len(index) == depth and set(exported) - index == {k for k in sd if not k.endswith("num_batches_tracked")}
    for k in set(exported) - index:
        np.testing.assert_array_equal(exported[k], sd[k], err_msg=k)
    if size == 64:  # the CLI on an mmcv checkpoint file ({'meta', 'state_dict'}) → a directory with both collections
        from beitv2_jax.convert import cli, store

        torch.save({"meta": {"iter": 160000}, "state_dict": ref.state_dict()}, tmp_path / "upernet.pth")
        assert cli.main(["--format", "official_beitv2_seg", "--input", str(tmp_path / "upernet.pth"), "--output",
                         str(tmp_path / "seg"), "--set", "out_indices=[0,1,2,3]"]) == 0
        variables, kind, config = store.load_variables(str(tmp_path / "seg"))
        assert kind == "segmentation" and sorted(variables) == ["batch_stats", "params"]
        again = jax.jit(build_model(kind, config).apply)(variables, images)
        np.testing.assert_array_equal(again["logits"], out["logits"])


def test_upernet_training_mode_batch_statistics_match_official_recreation():
    """Training mode without dropout: BatchNorm normalises with the batch statistics (SyncBN over the global batch)
    and updates the running statistics with momentum 0.1 and the unbiased variance, as torch does."""
    torch.manual_seed(0)
    ref = randomize_(OfficialUperNet(64, 8, 32, 4, 2, [0, 1, 2, 3], num_classes=4, channels=8, aux_channels=8,
                                     dropout_ratio=0.0), seed=3)
    result = import_state_dict(state_dict_numpy(ref), "official_beitv2_seg",
                               overrides={"out_indices": [0, 1, 2, 3]})
    config = dict(result.model_config, dropout_ratio=0.0)
    model = build_model("segmentation", config)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    ref.train()
    with torch.no_grad():
        theirs = ref(x)
    out, new_state = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        result.variables, jnp.asarray(nchw_to_nhwc(x).numpy()))
    assert_close("train/logits", out["logits"], nchw_to_nhwc(theirs["logits"]))
    assert_close("train/aux_logits", out["aux_logits"], nchw_to_nhwc(theirs["aux_logits"]))
    updated = import_state_dict(state_dict_numpy(ref), "official_beitv2_seg", model_kind="segmentation",
                                model_config=config).variables["batch_stats"]
    flat_ours = flax.traverse_util.flatten_dict(jax.device_get(new_state["batch_stats"]), sep="/")
    flat_theirs = flax.traverse_util.flatten_dict(updated, sep="/")
    assert set(flat_ours) == set(flat_theirs) and len(flat_ours) == 2 * (4 + 1 + 3 + 3 + 1 + 1)  # no BN in fpn1
    for k in flat_theirs:  # incl. the PPM 1×1 level, where n = batch = 2 makes the unbiased factor 2
        np.testing.assert_allclose(flat_ours[k], flat_theirs[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_bilinear_and_adaptive_pool_match_torch():
    x = torch.randn(2, 3, 7, 10, generator=torch.Generator().manual_seed(0))
    xj = jnp.asarray(nchw_to_nhwc(x).numpy())
    for size in ((16, 20), (3, 4), (7, 10), (5, 13)):
        for ac in (False, True):
            assert_close(f"resize{size}{ac}", seg.resize_bilinear(xj, size, ac), nchw_to_nhwc(resize(x, size, ac)))
    for s in (1, 2, 3, 6):
        pooled = F.adaptive_avg_pool2d(x[..., :7], s)
        assert_close(f"pool{s}", seg.adaptive_avg_pool(xj[:, :, :7], s), nchw_to_nhwc(pooled))


# ----------------------------------------------------------------------------------------------- layer decay
def official_seg_layer_id(var_name: str, num_max_layer: int) -> int:
    """beit2 semantic_segmentation/mmcv_custom/layer_decay_optimizer_constructor.get_num_layer_for_vit, verbatim."""
    if var_name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
        return 0
    elif var_name.startswith("backbone.patch_embed"):
        return 0
    elif var_name.startswith("backbone.blocks"):
        layer_id = int(var_name.split('.')[2])
        return layer_id + 1
    else:
        return num_max_layer - 1


def official_seg_groups(model: nn.Module, num_layers: int, layer_decay_rate: float, weight_decay: float) -> dict:
    """``LayerDecayOptimizerConstructor.add_params``: name → (lr_scale, weight_decay)."""
    num_layers = num_layers + 2
    out = {}
    for name, param in model.named_parameters():
        if len(param.shape) == 1 or name.endswith(".bias") or name in ('pos_embed', 'cls_token'):
            this_weight_decay = 0.
        else:
            this_weight_decay = weight_decay
        layer_id = official_seg_layer_id(name, num_layers)
        out[name] = (layer_decay_rate ** (num_layers - layer_id - 1), this_weight_decay)
    return out


def test_layer_decay_and_weight_decay_match_official_constructor():
    """Every parameter: our lr scale (segmentation_layer_id) and weight-decay mask (optim.weight_decay_mask, no
    extra patterns) = the official constructor's group for the torch name (mapped through the converter rules)."""
    from beitv2_jax.convert.engine import get_layout
    from beitv2_jax.convert.model_shapes import normalize_config, param_shapes

    depth, decay = 4, 0.65
    ref = OfficialUperNet(64, 16, 32, depth, 2, [0, 1, 2, 3], num_classes=3, channels=8, aux_channels=8)
    official = official_seg_groups(ref, depth, decay, 0.05)
    config = normalize_config("segmentation", import_state_dict(
        state_dict_numpy(ref), "official_beitv2_seg", overrides={"out_indices": [0, 1, 2, 3]}).model_config)
    shapes = param_shapes("segmentation", config)
    params = flax.traverse_util.unflatten_dict({tuple(p.split("/")[1:]): np.zeros(s.shape, np.float32)
                                                for p, s in shapes.items() if p.startswith("params/")})
    scales = flax.traverse_util.flatten_dict(
        layer_decay.scale_tree(params, depth, decay, layer_decay.segmentation_layer_id), sep="/")
    decayed = flax.traverse_util.flatten_dict(optim.weight_decay_mask(params), sep="/")
    checked = set()
    for rule in get_layout("official_beitv2_seg").rules("segmentation", config, {}):
        if rule.derived or not rule.flax[0].startswith("params/"):
            continue
        (torch_name,), (path,) = rule.torch, rule.flax
        path = path[len("params/"):]
        scale, wd = official[torch_name]
        assert scales[path] == pytest.approx(scale, rel=1e-12), (torch_name, path)
        assert decayed[path] == (wd > 0), (torch_name, path)
        checked.add(torch_name)
    assert checked == set(official) and len(checked) == len(scales)
    assert scales["backbone/cls_token"] == pytest.approx(decay ** 5) and decayed["backbone/cls_token"]  # quirk
    assert decayed["backbone/blocks_2/attn/relative_position_bias_table"]
    assert scales["backbone/fpn1/deconv_0/kernel"] == 1.0 and scales["decode_head/conv_seg/kernel"] == 1.0
    assert scales["backbone/blocks_0/attn/qkv"] == pytest.approx(decay ** 4)


# ----------------------------------------------------------------------------------------------- from pretrained
def official_mmseg_checkpoint_tables(pretrain_table: np.ndarray, depth: int, dst_window) -> np.ndarray:
    """``mmcv_custom/checkpoint.load_checkpoint``: the shared table copied to every block, then each resized with
    the official loop (see ``official_cubic_resize``)."""
    return [official_cubic_resize(pretrain_table.copy(), dst_window) for _ in range(depth)]


def interp2d_cubic(x, y, z):
    """SciPy < 1.14 ``interp2d(x, y, z, kind='cubic')`` on a rectilinear grid, as its code did it: FITPACK
    ``regrid_smth(x, y, z.T, kx=3, ky=3, s=0)`` (= ``RectBivariateSpline(x, y, z.T, 3, 3, s=0)``) and
    ``__call__(xn, yn)`` = ``bisplev(xn, yn).T`` → ``[len(yn), len(xn)]``."""
    from scipy import interpolate

    spline = interpolate.RectBivariateSpline(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                             np.asarray(z, np.float64).T, kx=3, ky=3, s=0)
    return lambda xn, yn: spline(np.sort(xn), np.sort(yn)).T


def official_cubic_resize(rel_pos_bias: np.ndarray, dst_patch_shape) -> np.ndarray:
    """The official resize loop (run_class_finetuning.py / mmcv_custom/checkpoint.py), line by line, with
    :func:`interp2d_cubic` for the removed ``interp2d``."""
    src_num_pos, num_attn_heads = rel_pos_bias.shape
    dst_num_pos = (2 * dst_patch_shape[0] - 1) * (2 * dst_patch_shape[1] - 1) + 3
    num_extra_tokens = dst_num_pos - (dst_patch_shape[0] * 2 - 1) * (dst_patch_shape[1] * 2 - 1)
    src_size = int((src_num_pos - num_extra_tokens) ** 0.5)
    dst_size = int((dst_num_pos - num_extra_tokens) ** 0.5)
    extra_tokens = rel_pos_bias[-num_extra_tokens:, :]
    rel_pos_bias = rel_pos_bias[:-num_extra_tokens, :]

    def geometric_progression(a, r, n):
        return a * (1.0 - r ** n) / (1.0 - r)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = geometric_progression(1, q, src_size // 2)
        if gp > dst_size // 2:
            right = q
        else:
            left = q
    dis = []
    cur = 1
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    r_ids = [-_ for _ in reversed(dis)]
    x = r_ids + [0] + dis
    y = r_ids + [0] + dis
    t = dst_size // 2.0
    dx = np.arange(-t, t + 0.1, 1.0)
    dy = np.arange(-t, t + 0.1, 1.0)
    all_rel_pos_bias = []
    for i in range(num_attn_heads):
        z = rel_pos_bias[:, i].reshape(src_size, src_size).astype(np.float32)
        f = interp2d_cubic(x, y, z)
        all_rel_pos_bias.append(np.asarray(f(dx, dy), np.float32).reshape(-1, 1))
    return np.concatenate([np.concatenate(all_rel_pos_bias, axis=-1), extra_tokens], axis=0)


def test_backbone_from_pretrained_encoder_matches_official_loader():
    """A 224² pretraining encoder (shared table) → the 512² segmentation backbone: every block's table = the
    official loader's (copy + cubic resize 14 → 32), the rest copied, fpn/heads from init."""
    rng = np.random.default_rng(0)
    enc = dict(image_size=224, patch_size=16, width=32, depth=4, num_heads=2, mlp_ratio=4.0, qkv_bias="qv",
               patch_embed_bias=True, use_abs_pos=False, rel_pos="shared", layer_scale_init=0.1, layer_norm_eps=1e-6,
               activation="gelu", ln_pre=False, use_cls_token=True, use_mask_token=True, pooling="cls")
    from beitv2_jax.convert.model_shapes import param_shapes

    params = flax.traverse_util.unflatten_dict({
        tuple(p.split("/")[1:]): rng.standard_normal(s.shape).astype(np.float32)
        for p, s in param_shapes("vit", enc).items()})
    pretrained = finetune.Pretrained(params, enc, "vit", False, [])
    cfg = seg.segmentation_config(enc, 512, 3, out_indices=(0, 1, 2, 3), channels=8, aux_channels=8)
    init = {tuple(p.split("/")[1:]): np.full(s.shape, 0.5, np.float32)
            for p, s in param_shapes("segmentation", cfg).items() if p.startswith("params/")}
    out, report = finetune.adapt_pretrained_segmentation(pretrained, cfg, flax.traverse_util.unflatten_dict(init))
    expected = official_mmseg_checkpoint_tables(params["rel_pos_bias"]["relative_position_bias_table"], 4, (32, 32))
    for i in range(4):
        table = out["backbone"][f"blocks_{i}"]["attn"]["relative_position_bias_table"]
        assert table.shape == (63 * 63 + 3, 2)
        np.testing.assert_allclose(table, expected[i], rtol=1e-5, atol=1e-5 * np.abs(expected[i]).max())
    np.testing.assert_array_equal(out["backbone"]["blocks_1"]["mlp"]["fc1"]["kernel"],
                                  params["blocks_1"]["mlp"]["fc1"]["kernel"])
    assert (out["backbone"]["fpn1"]["deconv_0"]["kernel"] == 0.5).all()
    assert "backbone/fpn2/deconv_0/kernel" in report["initialised"] and "mask_token" in report["unused"]
    assert "backbone/blocks_0/attn/relative_position_bias_table" in report["loaded"]


def test_relpos_cubic_resize_matches_official_loop():
    """relpos.resize_rel_pos_bias_table(method='official_cubic') = the official loop, 14 → 24 (384²), 14 → 32
    (512²), 14 → 7, on trained-looking (smooth) and random tables; differs from timm's linear resize."""
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.arange(27) - 13, np.arange(27) - 13, indexing="ij")
    smooth = np.stack([np.exp(-(yy ** 2 + xx ** 2) / 40.0) * 3 - 0.1 * np.abs(yy), np.cos(xx / 3.0) + 0.05 * yy], -1)
    smooth = np.concatenate([smooth.reshape(-1, 2), rng.standard_normal((3, 2))]).astype(np.float32)
    noisy = rng.standard_normal((732, 3)).astype(np.float32)
    for table in (smooth, noisy):
        for new in ((24, 24), (32, 32), (7, 7)):
            ours = relpos.resize_rel_pos_bias_table(table, new, method="official_cubic")
            theirs = official_cubic_resize(table, new)
            assert ours.shape == theirs.shape == (relpos.num_relative_distance(new), table.shape[1])
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
            np.testing.assert_array_equal(ours[-3:], table[-3:])
    linear = relpos.resize_rel_pos_bias_table(smooth, (24, 24), method="timm_linear")
    cubic = relpos.resize_rel_pos_bias_table(smooth, (24, 24), method="official_cubic")
    assert np.abs(linear - cubic).max() > 1e-3
    with pytest.raises(ValueError, match="official_cubic"):
        relpos.resize_rel_pos_bias_table(smooth, (24, 24), method="bicubic")
