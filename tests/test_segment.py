"""Semantic segmentation, data and task side (issue #20): the demo masks and segmentation folders, the mmseg training
pipeline (nearest-neighbour label resize, RandomCrop with cat_max_ratio, PhotoMetricDistortion, pad values) against
verbatim transcriptions of mmseg 0.11 on replayed random streams, mIoU / mAcc / aAcc against a direct numpy
computation, whole-image and sliding-window inference against a torch re-creation of mmseg's
``whole_inference`` / ``slide_inference`` (and equal to each other where they must be), the poly schedule against
mmcv's formula, and a tiny ``segment`` run that resumes bit for bit after SIGKILL."""
import colorsys
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from beitv2_jax.data import segmentation as seg
from beitv2_jax.data import sources
from beitv2_jax.train import optim, seg_eval

from conftest import REPO_ROOT


# ----------------------------------------------------------------------------------------------- data
def test_demo_masks_mark_exactly_the_shape_pixels():
    labels = sources.demo_labels("test")[:40]
    images, fg = sources.render_demo_images(2, np.arange(40), labels, return_masks=True)
    np.testing.assert_array_equal(images, sources.render_demo_images(2, np.arange(40), labels))
    maps = sources.demo_segmentation_maps(fg, labels)
    for i, label in enumerate(labels):
        assert set(np.unique(maps[i])) == {0, label + 1}  # background and the one shape
        assert (maps[i] > 0).sum() == fg[i].sum() > 0
    assert sources.DEMO_SEG_CLASSES[0] == "background" and len(sources.DEMO_SEG_CLASSES) == 11


def test_demo_seg_dataset_pairs_the_demo_images_with_their_masks(demo_data_dir):
    sources.ensure_demo_seg_dataset(demo_data_dir)
    seg_source = sources.open_source(sources.DEMO_SEG_NAME, "test", demo_data_dir)
    cls_source = sources.open_source(sources.DEMO_NAME, "test", demo_data_dir)
    assert len(seg_source) == sources.DEMO_SPLIT_SIZES["test"]
    for i in (0, 7, 999):
        a, b = seg_source[i], cls_source[i]
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["label"] == b["label"] and a["segmentation"].shape == (64, 64)
        assert set(np.unique(a["segmentation"])) == {0, b["label"] + 1}


def test_segmentation_folder_round_trip(tmp_path):
    src = tmp_path / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    expected = {}
    for folder, split in (("training", "train"), ("validation", "validation")):
        os.makedirs(src / "images" / folder)
        os.makedirs(src / "annotations" / folder)
        for i in range(2):
            image = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
            label = rng.integers(0, 151, (10 + i, 12), dtype=np.uint8)
            Image.fromarray(image).save(src / "images" / folder / f"im_{i}.png")
            Image.fromarray(label).save(src / "annotations" / folder / f"im_{i}.png")
            expected[(split, f"images/{folder}/im_{i}.png")] = (image, label)
    sources.prepare_image_folder(str(src), str(tmp_path / "tfds"), name="ade_tiny")
    for split in ("train", "validation"):
        source = seg.DecodedSegmentationSource(sources.open_source("ade_tiny", split, str(tmp_path / "tfds")))
        assert len(source) == 2
        for i in range(2):
            record = source[i]
            image, label = expected[(split, record["file_name"].decode() if isinstance(record["file_name"], bytes)
                                     else str(record["file_name"]))]
            np.testing.assert_array_equal(record["image"], image)
            np.testing.assert_array_equal(record["segmentation"], label)
    os.remove(src / "annotations" / "validation" / "im_1.png")
    with pytest.raises(ValueError, match="have no label map"):
        sources.scan_segmentation_folder(str(src))


def test_label_decoding_and_reduce_zero_label():
    np.testing.assert_array_equal(seg.reduce_zero_label(np.array([[0, 1, 150, 255]], np.uint8)), [[255, 0, 149, 255]])
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 0] = 7  # a 3-channel map (tfds scene_parse150 stores RGB PNGs): the first channel
    buffer = __import__("io").BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    np.testing.assert_array_equal(seg.decode_label_map(buffer.getvalue()), np.full((3, 4), 7))


# ----------------------------------------------------------------------------------------------- mmseg replay
class NumpyRandomReplay:
    """``numpy.random``'s legacy functions (as mmseg calls them) drawing from a ``Generator`` the way ours do."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def randint(self, low, high=None):
        return int(self.rng.integers(0, low) if high is None else self.rng.integers(low, high))

    def uniform(self, low, high):
        return self.rng.uniform(low, high)

    def rand(self):
        return self.rng.random()

    def random_sample(self):
        return self.rng.random()


def mmseg_random_crop(img, seg_map, crop_size, cat_max_ratio, random, ignore_index=255):
    """mmseg 0.11 ``RandomCrop.__call__`` (get_crop_bbox / crop), verbatim apart from the random module."""
    def get_crop_bbox(img):
        margin_h = max(img.shape[0] - crop_size[0], 0)
        margin_w = max(img.shape[1] - crop_size[1], 0)
        offset_h = random.randint(0, margin_h + 1)
        offset_w = random.randint(0, margin_w + 1)
        crop_y1, crop_y2 = offset_h, offset_h + crop_size[0]
        crop_x1, crop_x2 = offset_w, offset_w + crop_size[1]
        return crop_y1, crop_y2, crop_x1, crop_x2

    def crop(img, crop_bbox):
        crop_y1, crop_y2, crop_x1, crop_x2 = crop_bbox
        return img[crop_y1:crop_y2, crop_x1:crop_x2, ...]

    crop_bbox = get_crop_bbox(img)
    if cat_max_ratio < 1.:
        for _ in range(10):
            seg_temp = crop(seg_map, crop_bbox)
            labels, cnt = np.unique(seg_temp, return_counts=True)
            cnt = cnt[labels != ignore_index]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
                break
            crop_bbox = get_crop_bbox(img)
    return crop(img, crop_bbox), crop(seg_map, crop_bbox)


def mmseg_photometric(img, random, bgr2hsv, hsv2bgr, brightness_delta=32, contrast_range=(0.5, 1.5),
                      saturation_range=(0.5, 1.5), hue_delta=18):
    """mmseg 0.11 ``PhotoMetricDistortion.__call__``, verbatim apart from the random module and the HSV functions."""
    contrast_lower, contrast_upper = contrast_range
    saturation_lower, saturation_upper = saturation_range

    def convert(img, alpha=1, beta=0):
        img = img.astype(np.float32) * alpha + beta
        img = np.clip(img, 0, 255)
        return img.astype(np.uint8)

    def brightness(img):
        if random.randint(2):
            return convert(img, beta=random.uniform(-brightness_delta, brightness_delta))
        return img

    def contrast(img):
        if random.randint(2):
            return convert(img, alpha=random.uniform(contrast_lower, contrast_upper))
        return img

    def saturation(img):
        if random.randint(2):
            img = bgr2hsv(img)
            img[:, :, 1] = convert(img[:, :, 1], alpha=random.uniform(saturation_lower, saturation_upper))
            img = hsv2bgr(img)
        return img

    def hue(img):
        if random.randint(2):
            img = bgr2hsv(img)
            img[:, :, 0] = (img[:, :, 0].astype(int) + random.randint(-hue_delta, hue_delta)) % 180
            img = hsv2bgr(img)
        return img

    img = brightness(img)
    mode = random.randint(2)
    if mode == 1:
        img = contrast(img)
    img = saturation(img)
    img = hue(img)
    if mode == 0:
        img = contrast(img)
    return img


def _blobs(height, width, seed):
    """A label map with a dominant class and a few rectangles of others."""
    rng = np.random.default_rng(seed)
    label = np.zeros((height, width), np.uint8)
    for c in range(1, 5):
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        label[y:y + rng.integers(4, 16), x:x + rng.integers(4, 16)] = c
    label[:2] = 255
    return label


def test_random_crop_with_cat_max_ratio_matches_mmseg():
    accepted = 0
    for seed in range(60):
        label = _blobs(40, 56, seed)
        image = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
        ref_img, ref_seg = mmseg_random_crop(image, label, (24, 24), 0.75, NumpyRandomReplay(seed))
        y1, y2, x1, x2 = seg.cat_max_crop_box(np.random.default_rng(seed), label, (24, 24), 0.75)
        np.testing.assert_array_equal(label[y1:y2, x1:x2], ref_seg)
        np.testing.assert_array_equal(image[y1:y2, x1:x2], ref_img)
        labels, counts = np.unique(ref_seg, return_counts=True)
        counts = counts[labels != 255]
        accepted += len(counts) > 1 and counts.max() / counts.sum() < 0.75
    assert 10 < accepted < 60  # both outcomes occur: accepted crops and the last of 11 draws


def test_photometric_distortion_matches_mmseg_draw_for_draw():
    image = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    changed = 0
    for seed in range(40):
        ref = mmseg_photometric(image.copy(), NumpyRandomReplay(seed), seg.rgb_to_hsv, seg.hsv_to_rgb)
        ours = seg.photometric_distortion(image.copy(), np.random.default_rng(seed))
        np.testing.assert_array_equal(ours, ref)
        changed += not np.array_equal(ours, image)
    assert changed > 30


def test_hsv_conversion_follows_opencv_ranges():
    rgb = np.random.default_rng(1).integers(0, 256, (500, 3), dtype=np.uint8)
    hsv = seg.rgb_to_hsv(rgb).astype(np.int64)
    for (r, g, b), (h, s, v) in zip(rgb / 255.0, hsv):
        fh, fs, fv = colorsys.rgb_to_hsv(r, g, b)
        assert min(abs(h - fh * 180), 180 - abs(h - fh * 180)) <= 0.7  # 12-bit fixed-point tables: round() ± 0.2
        assert abs(s - fs * 255) <= 0.52 and v == round(fv * 255)
    back = seg.hsv_to_rgb(hsv.astype(np.uint8)).astype(np.int64)
    assert np.abs(back - rgb).max() <= 5  # hue in 2° steps: up to 255 · 1°/60° off


def test_resizes_nearest_labels_and_bilinear_images():
    label = np.arange(4 * 5, dtype=np.uint8).reshape(4, 5)
    up = seg.resize_label(label, (6, 7))  # cv2 INTER_NEAREST: source floor(i · in / out)
    np.testing.assert_array_equal(up, label[np.floor(np.arange(6) * 4 / 6).astype(int)][:, np.floor(
        np.arange(7) * 5 / 7).astype(int)])
    assert set(np.unique(seg.resize_label(_blobs(40, 56, 3), (17, 90)))) <= set(np.unique(_blobs(40, 56, 3)))
    image = np.random.default_rng(2).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    for size in ((26, 40), (7, 9)):
        ref = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].double(), size=size, mode="bilinear",
                            align_corners=False)[0].permute(1, 2, 0).numpy()
        assert np.abs(seg.resize_image(image, size).astype(np.float64) - ref).max() <= 0.5 + 1e-4
    assert seg.rescale_size(480, 640, (2048, 512)) == (512, 683)  # mmcv rescale: short side → 512
    assert seg.rescale_size(300, 3000, (2048, 512)) == (205, 2048)  # long side capped


def test_train_transform_pads_with_zero_and_ignore_and_keeps_labels():
    image = np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    label = _blobs(20, 30, 4)
    transform = seg.SegTrainTransform(crop_size=48, img_scale=(60, 20), ratio_range=(0.5, 1.0),
                                      reduce_zero_label=False)
    for seed in range(8):
        out = transform.random_map({"image": image, "segmentation": label}, np.random.default_rng(seed))
        assert out["image"].shape == (48, 48, 3) and out["label"].shape == (48, 48)
        rows = np.where((out["label"] != 255).any(1))[0]
        cols = np.where((out["label"] != 255).any(0))[0]
        h, w = rows.max() + 1, cols.max() + 1  # the resized image fills the top-left corner (≤ 20 × 30)
        assert h < 48 and w < 48
        assert (out["label"][h:] == 255).all() and (out["label"][:, w:] == 255).all()
        assert (out["image"][h:] == 0).all() and (out["image"][:, w:] == 0).all()
        assert set(np.unique(out["label"])) <= set(np.unique(label))
    again = transform.random_map({"image": image, "segmentation": label}, np.random.default_rng(7))
    np.testing.assert_array_equal(again["image"], out["image"])


# ----------------------------------------------------------------------------------------------- metrics
def mmseg_total_intersect_and_union(results, gt_maps, num_classes, ignore_index=255):
    """mmseg 0.11 ``intersect_and_union`` summed over images, then ``mean_iou``'s ratios (numpy, direct)."""
    total = np.zeros((4, num_classes))
    for pred_label, label in zip(results, gt_maps):
        mask = label != ignore_index
        pred_label, label = pred_label[mask], label[mask]
        intersect = pred_label[pred_label == label]
        area_intersect, _ = np.histogram(intersect, bins=np.arange(num_classes + 1))
        area_pred, _ = np.histogram(pred_label, bins=np.arange(num_classes + 1))
        area_label, _ = np.histogram(label, bins=np.arange(num_classes + 1))
        total += [area_intersect, area_pred + area_label - area_intersect, area_pred, area_label]
    intersect, union, _, label_area = total
    with np.errstate(divide="ignore", invalid="ignore"):
        return intersect.sum() / label_area.sum(), intersect / label_area, intersect / union


def test_metrics_equal_a_direct_numpy_computation():
    rng = np.random.default_rng(5)
    num_classes = 6
    preds, labels = [], []
    for shape in ((7, 9), (12, 5), (4, 4)):
        label = rng.integers(0, 4, shape)  # classes 4, 5 never in the ground truth
        label[rng.random(shape) < 0.2] = 255
        pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, 5, shape)) % 5  # never predicts 5
        preds.append(pred)
        labels.append(label)
    confusion = sum(np.asarray(seg_eval.confusion_matrix(jnp.asarray(p), jnp.asarray(l), num_classes))
                    for p, l in zip(preds, labels))
    ours = seg_eval.metrics_from_confusion(confusion)
    all_acc, acc, iou = mmseg_total_intersect_and_union(preds, labels, num_classes)
    assert ours["aAcc"] == pytest.approx(all_acc * 100, rel=1e-12)
    assert ours["mIoU"] == pytest.approx(np.nanmean(iou) * 100, rel=1e-12)
    assert ours["mAcc"] == pytest.approx(np.nanmean(acc) * 100, rel=1e-12)
    assert ours["IoU"][4] == 0.0 and np.isnan(ours["IoU"][5]) and np.isnan(ours["Acc"][4])
    assert ours["num_pixels"] == sum(int((l != 255).sum()) for l in labels)


# ----------------------------------------------------------------------------------------------- inference
def toy_forward(weights, stride):
    """A stand-in decode head: average-pool ``stride``×``stride`` → per-pixel linear map → bilinear back up (as
    mmseg resizes the head's output to the input); numpy in, jax out."""
    w = jnp.asarray(weights)

    def forward(images):
        b, h, wd, c = images.shape
        pooled = images.reshape(b, h // stride, stride, wd // stride, stride, c).mean((2, 4))
        return seg_eval.resize_bilinear(pooled @ w, (h, wd))

    return forward


def torch_toy_forward(weights, stride):
    w = torch.from_numpy(np.asarray(weights, np.float64))

    def forward(img):  # [B, C, H, W]
        pooled = F.avg_pool2d(img, stride)
        logits = torch.einsum("bchw,ck->bkhw", pooled, w)
        return F.interpolate(logits, size=img.shape[2:], mode="bilinear", align_corners=False)

    return forward


def mmseg_inference(img, ori_shape, encode_decode, mode, crop, stride, num_classes):
    """mmseg 0.11 ``whole_inference`` / ``slide_inference`` with ``rescale=True`` (torch, verbatim in substance)."""
    if mode == "whole":
        seg_logit = encode_decode(img)
    else:
        h_stride, w_stride = stride
        h_crop, w_crop = crop
        batch_size, _, h_img, w_img = img.size()
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        preds = img.new_zeros((batch_size, num_classes, h_img, w_img))
        count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y1 = h_idx * h_stride
                x1 = w_idx * w_stride
                y2 = min(y1 + h_crop, h_img)
                x2 = min(x1 + w_crop, w_img)
                y1 = max(y2 - h_crop, 0)
                x1 = max(x2 - w_crop, 0)
                crop_img = img[:, :, y1:y2, x1:x2]
                crop_seg_logit = encode_decode(crop_img)
                preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
                count_mat[:, :, y1:y2, x1:x2] += 1
        assert (count_mat == 0).sum() == 0
        seg_logit = preds / count_mat
    return F.interpolate(seg_logit, size=ori_shape, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_inference_matches_mmseg_slide_and_whole(mode):
    rng = np.random.default_rng(6)
    num_classes, crop, stride = 5, (16, 16), (11, 11)
    weights = rng.standard_normal((3, num_classes))
    evaluator = seg_eval.SegmentationEvaluator(toy_forward(weights, 4), num_classes, mode=mode, crop=crop,
                                               stride=stride, batch_size=3, bucket=8)
    shapes = [((16, 40), (20, 50)), ((36, 16), (30, 13)), ((28, 24), (28, 24)), ((16, 16), (40, 40))]
    records = [{"image": rng.standard_normal(s + (3,)).astype(np.float32), "label": np.zeros(o, np.uint8)}
               for s, o in shapes]
    ours = evaluator.predict(records)
    for record, (_, ori), logits in zip(records, shapes, ours):
        img = torch.from_numpy(record["image"].astype(np.float64)).permute(2, 0, 1)[None]
        ref = mmseg_inference(img, ori, torch_toy_forward(weights, 4), mode, crop, stride, num_classes)
        np.testing.assert_allclose(logits, ref[0].permute(1, 2, 0).numpy(), rtol=1e-5, atol=1e-5)
    # the confusion path agrees with the logits path
    labels = [np.argmax(l, -1).astype(np.uint8) for l in ours]
    result = evaluator.run([{**r, "label": l} for r, l in zip(records, labels)])
    assert result["aAcc"] == 100.0 and result["num_images"] == 4


def test_slide_equals_whole_where_they_must():
    """(a) Image size = crop: one window, the same forward → identical. (b) A per-pixel model (stride 1): every
    window gives the whole image's values, so their average does too, for any image size."""
    rng = np.random.default_rng(7)
    weights = rng.standard_normal((3, 4))
    records = [{"image": rng.standard_normal((16, 16, 3)).astype(np.float32), "label": np.zeros((23, 19), np.uint8)}]
    kw = dict(crop=(16, 16), stride=(5, 5), batch_size=2, bucket=8)
    whole = seg_eval.SegmentationEvaluator(toy_forward(weights, 4), 4, mode="whole", **kw).predict(records)[0]
    slide = seg_eval.SegmentationEvaluator(toy_forward(weights, 4), 4, mode="slide", **kw).predict(records)[0]
    np.testing.assert_array_equal(slide, whole)
    records = [{"image": rng.standard_normal((27, 41, 3)).astype(np.float32), "label": np.zeros((30, 40), np.uint8)}]
    whole = seg_eval.SegmentationEvaluator(toy_forward(weights, 1), 4, mode="whole", **kw).predict(records)[0]
    slide = seg_eval.SegmentationEvaluator(toy_forward(weights, 1), 4, mode="slide", **kw).predict(records)[0]
    assert len(seg_eval.slide_windows(27, 41, (16, 16), (5, 5))) == 4 * 6
    np.testing.assert_allclose(slide, whole, rtol=1e-5, atol=1e-6)


def test_poly_schedule_matches_mmcv():
    base, total, warmup, ratio = 5e-5, 1000, 150, 1e-6
    schedule = optim.poly_schedule(base, total, 1.0, 0.0, warmup, ratio)
    for it in (0, 1, 75, 149, 150, 151, 500, 999):
        regular = (base - 0.0) * (1 - it / total) ** 1.0 + 0.0  # PolyLrUpdaterHook.get_lr
        if it < warmup:  # LrUpdaterHook.get_warmup_lr('linear')
            k = (1 - it / warmup) * (1 - ratio)
            regular = regular * (1 - k)
        assert float(schedule(it)) == pytest.approx(regular, rel=1e-5, abs=1e-12)


# ----------------------------------------------------------------------------------------------- kill and resume
SEG_TOTAL_STEPS = 8
SEG_CURVE_KEYS = ("loss", "loss_decode", "loss_aux", "grad_norm", "lr")
SEG_CONFIG = '''
from beitv2_jax import recipes


def get_config():
    c = recipes.demo_segment()
    c.data.data_dir = {data_dir!r}
    c.data.read_threads = 1
    c.data.prefetch_batches = 1
    c.pretrained.checkpoint = {encoder!r}
    c.batch_size = 4
    c.eval_batch_size = 10
    c.num_steps = 8
    c.eval_every_steps = 4
    c.log_every_steps = 1
    c.checkpoint_every_steps = 1
    c.model.update(channels=8, aux_channels=8, drop_path_rate=0.1)
    c.eval.num_images = 10
    return c
'''


@pytest.fixture(scope="module")
def seg_setup(tmp_path_factory, demo_data_dir):
    """``(root, env, config)``: a tiny random BEiT encoder (32 px, 4-px patches, 4 blocks), the config file and a
    subprocess environment with a shared compilation cache and cheap XLA settings (as test_reliability)."""
    from beitv2_jax.convert import store
    from test_finetune import random_variables

    sources.ensure_demo_seg_dataset(demo_data_dir)
    root = tmp_path_factory.mktemp("segment")
    pt_cfg = dict(backbone=dict(image_size=32, patch_size=4, width=16, depth=4, num_heads=2, layer_scale_init=0.1),
                  vocab_size=16, num_masked_patches=4, early_layers=3, head_layers=0)
    store.save_variables(str(root / "encoder"), random_variables("beit_pretrain", pt_cfg), "beit_pretrain", pt_cfg)
    config = root / "tiny_segment.py"
    config.write_text(SEG_CONFIG.format(data_dir=demo_data_dir, encoder=str(root / "encoder")))
    (root / "no_torch" / "torch").mkdir(parents=True)
    (root / "no_torch" / "torch" / "__init__.py").write_text("raise ImportError('torch is hidden in these runs')\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
               PYTHONPATH=os.pathsep.join([str(root / "no_torch"), REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    return root, env, str(config), demo_data_dir


def _main(setup, workdir):
    return [sys.executable, "-m", "beitv2_jax.main", "--config", setup[2], "--workdir", workdir]


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _curve(workdir):
    """``{step: values}`` of the train metrics; rows logged twice for a step (after the restart) must agree."""
    curve = {}
    for row in _rows(workdir):
        if "loss" in row:
            values = tuple(row[k] for k in SEG_CURVE_KEYS)
            assert curve.setdefault(row["step"], values) == values, f"step {row['step']} logged differently"
    return curve


def test_segment_run_resumes_bit_exact_after_sigkill(seg_setup):
    root, env = seg_setup[0], seg_setup[1]
    reference = str(root / "reference")
    done = subprocess.run(_main(seg_setup, reference), cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    workdir = str(root / "killed")
    metrics = os.path.join(workdir, "metrics.jsonl")
    proc = subprocess.Popen(_main(seg_setup, workdir), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.exists(metrics) and any(r.get("step", 0) >= 5 and "loss" in r for r in _rows(workdir)):
            proc.send_signal(signal.SIGKILL)  # after the step-4 evaluation, before the end
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    done = subprocess.run(_main(seg_setup, workdir), cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = _curve(reference)
    assert sorted(expected) == list(range(1, SEG_TOTAL_STEPS + 1)) and _curve(workdir) == expected
    evals = lambda w: {r["step"]: (r["eval/mIoU"], r["eval/mAcc"], r["eval/aAcc"]) for r in _rows(w)
                       if "eval/mIoU" in r}
    assert evals(workdir) == evals(reference) and sorted(evals(reference)) == [4, 8]
    from beitv2_jax.convert import store

    ref, kind, cfg = store.load_variables(os.path.join(reference, "model"))
    got, _, _ = store.load_variables(os.path.join(workdir, "model"))
    assert kind == "segmentation" and cfg["num_classes"] == 11 and set(ref) == {"params", "batch_stats"}
    assert jax.tree.structure(ref) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["last"]["step"] == 8 and results["last"]["num_images"] == 10


def test_demo_stage_five_trains_both_twins_and_reports_them(seg_setup, capsys):
    """The demo's segmentation stage at toy size: the pretrained encoder and its random-init twin (same heads'
    init, different backbones), both evaluated, both in the summary; a second call skips the finished runs."""
    from beitv2_jax.convert import store
    from beitv2_jax.train.tasks import demo

    from conftest import load_config_file

    root = seg_setup[0]
    c = load_config_file("demo")
    c.data.data_dir = seg_setup[3]
    s = c.segment
    s.batch_size, s.eval_batch_size, s.num_steps, s.log_every_steps = 4, 10, 2, 1
    s.model.update(channels=8, aux_channels=8)
    s.eval.num_images = 10
    results = demo.segment_stage(c, str(root / "demo"), str(root / "encoder"))
    assert set(results) == {"pretrained", "random_init"}
    assert all(r["num_images"] == 10 and 0 <= r["mIoU"] <= 100 for r in results.values())
    pre = store.load_variables(str(root / "demo" / "segment" / "pretrained" / "model"))[0]["params"]
    rnd = store.load_variables(str(root / "demo" / "segment" / "random_init" / "model"))[0]["params"]
    assert jax.tree.structure(pre) == jax.tree.structure(rnd)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pre["backbone"]),
                                                        jax.tree.leaves(rnd["backbone"])))
    demo.print_summary({"segment": results}, {"segment": 1.0}, str(root / "demo"))
    assert "segmentation (10 test images" in capsys.readouterr().out
    start = time.perf_counter()
    assert demo.segment_stage(c, str(root / "demo"), str(root / "encoder")) == results
    assert time.perf_counter() - start < 5.0
