"""Semantic-segmentation transforms: the official BEiT v2 ADE20K pipeline (mmseg 0.11, reference §3.3).

Train (``configs/_base_/datasets/ade20k.py``): LoadAnnotations(reduce_zero_label) → Resize(img_scale (2048, 512),
ratio_range (0.5, 2.0), keep_ratio) → RandomCrop(512, cat_max_ratio 0.75) → RandomFlip(0.5) →
PhotoMetricDistortion → Normalize(ImageNet mean/std on 0–255) → Pad(512, pad_val 0, seg_pad_val 255).
Test: Resize(img_scale (2048, 512), keep_ratio) → Normalize; the label map stays at its original size.

Every random draw comes from the record's ``numpy.random.Generator`` (grain ``random_map``) in mmseg's order and
with mmseg's meaning (``np.random.random_sample``, ``randint`` with an exclusive upper bound, ``uniform``), so a
batch depends only on (seed, record position). Pixels: images are resized like cv2 ``INTER_LINEAR`` (half-pixel
centres, no antialiasing; computed in float and rounded, where cv2 uses 11-bit fixed point: values may differ by
one grey level), label maps like cv2 ``INTER_NEAREST`` (``floor(x · in / out)``); the HSV round trip of
PhotoMetricDistortion follows OpenCV's 8-bit ``RGB2HSV`` (fixed-point tables, hue in [0, 180)) and ``HSV2RGB``.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Optional

import grain
import numpy as np
from PIL import Image

from beitv2_jax.data import transforms

IGNORE_INDEX = 255
MEAN_255 = tuple(255.0 * m for m in transforms.IMAGENET_MEAN)  # mmseg img_norm_cfg (123.675, 116.28, 103.53)
STD_255 = tuple(255.0 * s for s in transforms.IMAGENET_STD)  # (58.395, 57.12, 57.375)


# ----------------------------------------------------------------------------------------------- decoding
def decode_label_map(value: Any) -> np.ndarray:
    """Encoded PNG bytes or an array → ``uint8 [H, W]`` class ids (palette PNGs give their indices; a 3-channel
    map, e.g. tfds ``scene_parse150``'s ``annotation``, gives its first channel)."""
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        try:
            pil = Image.open(io.BytesIO(bytes(value)))
            pil.load()
        except Exception as e:  # noqa: BLE001 - PIL reports bad data in many ways
            raise transforms.UndecodableImageError(f'cannot decode {len(value)} bytes as a label map '
                                                   f'({type(e).__name__}: {e})') from e
        array = np.asarray(pil)
    else:
        array = np.asarray(value)
        if array.dtype == object:
            return decode_label_map(array.item())
    if array.ndim == 3:
        array = array[..., 0]
    if array.ndim != 2:
        raise transforms.UndecodableImageError(f'a label map must be [H, W] or [H, W, C], got {array.shape}')
    return array.astype(np.uint8, copy=False)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg ``reduce_zero_label``: 0 ("other") → 255 (ignored), every other id − 1 (ADE20K: 1..150 → 0..149)."""
    out = label.astype(np.int32) - 1
    out[label == 0] = IGNORE_INDEX
    out[out == IGNORE_INDEX - 1] = IGNORE_INDEX  # 255 stays 255
    return out.astype(np.uint8)


def label_key(record: dict) -> str:
    """The record's label-map feature: ``segmentation`` (ours) or ``annotation`` (tfds ``scene_parse150``)."""
    for key in ('segmentation', 'annotation'):
        if key in record:
            return key
    raise KeyError(f'a segmentation record needs a "segmentation" or "annotation" feature, has {sorted(record)}')


class DecodedSegmentationSource(transforms.DecodedSource):
    """``transforms.DecodedSource`` whose records also carry the label map decoded to ``uint8 [H, W]`` under
    ``segmentation`` (a record whose image or map cannot be decoded is replaced by the next good one)."""

    def decode(self, record: dict[str, Any]) -> dict[str, Any]:
        image = np.asarray(transforms.decode_image(record['image']))
        label = decode_label_map(record[label_key(record)])
        if label.shape != image.shape[:2]:
            raise transforms.UndecodableImageError(
                f'label map {label.shape} and image {image.shape[:2]} differ in size')
        return {'image': image, 'segmentation': label,
                **({'file_name': record['file_name']} if 'file_name' in record else {})}


# ----------------------------------------------------------------------------------------------- geometry
def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` (keep ratio): the largest ``(h, w)`` with long edge ≤ max(scale) and short edge ≤
    min(scale), each ``int(x · factor + 0.5)``."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2 INTER_LINEAR source taps ``(i0, i1, frac)`` per output index: x = (i + 0.5)·src/dst − 0.5, clamped."""
    x = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    i0 = np.floor(x).astype(np.int64)
    frac = x - i0
    frac[i0 < 0] = 0.0
    i0 = np.clip(i0, 0, src - 1)
    at_end = i0 >= src - 1
    frac[at_end] = 0.0
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, frac


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``uint8 [H, W, 3]`` → ``uint8 [h, w, 3]`` bilinear (cv2 ``INTER_LINEAR`` sampling, float arithmetic)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    y0, y1, fy = _linear_taps(image.shape[0], h)
    x0, x1, fx = _linear_taps(image.shape[1], w)
    x = image.astype(np.float32)
    rows = x[y0] * (1 - fy)[:, None, None].astype(np.float32) + x[y1] * fy[:, None, None].astype(np.float32)
    out = rows[:, x0] * (1 - fx)[None, :, None].astype(np.float32) + rows[:, x1] * fx[None, :, None].astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Label map ``[H, W]`` → ``[h, w]`` by nearest neighbour as cv2 ``INTER_NEAREST``: source ``floor(i·H/h)``."""
    h, w = size
    if label.shape == (h, w):
        return label
    ys = np.minimum(np.floor(np.arange(h) * (label.shape[0] / h)).astype(np.int64), label.shape[0] - 1)
    xs = np.minimum(np.floor(np.arange(w) * (label.shape[1] / w)).astype(np.int64), label.shape[1] - 1)
    return label[ys[:, None], xs[None, :]]


def random_scale(rng: np.random.Generator, img_scale: tuple[int, int], ratio_range: tuple[float, float]):
    """mmseg ``Resize._random_sample_ratio``: ratio ~ U[lo, hi) (one ``random_sample``) → ``int(scale · ratio)``."""
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    return int(img_scale[0] * ratio), int(img_scale[1] * ratio)


def crop_box(rng: np.random.Generator, height: int, width: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """mmseg ``RandomCrop.get_crop_bbox``: ``(y1, y2, x1, x2)`` with offsets ``randint(0, margin + 1)``."""
    margin_h, margin_w = max(height - crop[0], 0), max(width - crop[1], 0)
    offset_h = int(rng.integers(0, margin_h + 1))
    offset_w = int(rng.integers(0, margin_w + 1))
    return offset_h, offset_h + crop[0], offset_w, offset_w + crop[1]


def cat_max_crop_box(rng: np.random.Generator, label: np.ndarray, crop: tuple[int, int], cat_max_ratio: float,
                     ignore_index: int = IGNORE_INDEX) -> tuple[int, int, int, int]:
    """mmseg ``RandomCrop`` with ``cat_max_ratio``: up to 10 re-draws until the crop holds more than one class
    and no class covers ``cat_max_ratio`` or more of its non-ignored pixels; the last box drawn is used."""
    box = crop_box(rng, label.shape[0], label.shape[1], crop)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            labels, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
            counts = counts[labels != ignore_index]
            if len(counts) > 1 and np.max(counts) / np.sum(counts) < cat_max_ratio:
                break
            box = crop_box(rng, label.shape[0], label.shape[1], crop)
    return box


def pad_to(array: np.ndarray, size: tuple[int, int], value) -> np.ndarray:
    """mmcv ``impad(shape=size)``: pad at the bottom and right with ``value``."""
    pad_h, pad_w = size[0] - array.shape[0], size[1] - array.shape[1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f'cannot pad {array.shape[:2]} to the smaller {size}')
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, constant_values=value)


# ----------------------------------------------------------------------------------------------- colour
_HSV_SHIFT = 12
_SDIV = np.array([0] + [int(round((255 << _HSV_SHIFT) / i)) for i in range(1, 256)], np.int64)
_HDIV = np.array([0] + [int(round((180 << _HSV_SHIFT) / (6.0 * i))) for i in range(1, 256)], np.int64)


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """OpenCV 8-bit ``COLOR_RGB2HSV``: ``uint8 [..., 3]`` → H in [0, 180), S and V in [0, 255]."""
    rgb = image.astype(np.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    diff = v - rgb.min(-1)
    s = (diff * _SDIV[v] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], -1).astype(np.uint8)


_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])  # (b, g, r) table rows


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """OpenCV 8-bit ``COLOR_HSV2RGB`` (float conversion with hue scale 6/180, rounded to nearest-even)."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180.0)
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    h = np.mod(h, np.float32(6.0))
    sector = np.floor(h).astype(np.int64)
    frac = h - sector
    bad = (sector < 0) | (sector >= 6)
    sector, frac = np.where(bad, 0, sector), np.where(bad, np.float32(0), frac)
    tab = np.stack([v, v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))], -1)
    idx = _SECTORS[sector]  # [..., 3] indices into tab for (b, g, r)
    bgr = np.take_along_axis(tab, idx, axis=-1)
    bgr = np.where((s == 0)[..., None], v[..., None], bgr)
    rgb = bgr[..., ::-1] * np.float32(255.0)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _convert(channel: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion.convert``: ``uint8(clip(x · alpha + beta, 0, 255))`` (truncating)."""
    return np.clip(channel.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range: tuple = (0.5, 1.5), saturation_range: tuple = (0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on ``uint8 [H, W, 3]``: brightness, then contrast first or last (mode), then
    saturation and hue in HSV; each applied with probability 0.5 (``randint(2)``), draws in mmseg's order."""
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)

    def contrast(img):
        if rng.integers(2):
            return _convert(img, alpha=rng.uniform(*contrast_range))
        return img

    if mode == 1:
        image = contrast(image)
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        image = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-hue_delta, hue_delta))) % 180
        image = hsv_to_rgb(hsv)
    if mode == 0:
        image = contrast(image)
    return image


def normalize_255(image: np.ndarray, mean=MEAN_255, std=STD_255) -> np.ndarray:
    """mmseg ``Normalize`` on 0–255 pixels → float32."""
    return (image.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ----------------------------------------------------------------------------------------------- transforms
@dataclasses.dataclass(frozen=True)
class SegTrainTransform(grain.transforms.RandomMap):
    """The official training pipeline. record ``{'image': uint8 [H, W, 3], 'segmentation': uint8 [H, W]}`` (from
    :class:`DecodedSegmentationSource`) → ``{'image': float32 [c, c, 3] normalised, 0 on padding, 'label': int32
    [c, c] class ids, 255 = ignore}``."""

    crop_size: int = 512
    img_scale: tuple = (2048, 512)
    ratio_range: tuple = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    reduce_zero_label: bool = True
    ignore_index: int = IGNORE_INDEX

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = np.asarray(transforms.decode_image(element['image']))
        label = decode_label_map(element['segmentation'])
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        scale = random_scale(rng, tuple(self.img_scale), tuple(self.ratio_range))
        size = rescale_size(image.shape[0], image.shape[1], scale)
        image, label = resize_image(image, size), resize_label(label, size)
        crop = (self.crop_size, self.crop_size)
        y1, y2, x1, x2 = cat_max_crop_box(rng, label, crop, self.cat_max_ratio, self.ignore_index)
        image, label = image[y1:y2, x1:x2], label[y1:y2, x1:x2]
        if rng.random() < self.hflip:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        image = pad_to(normalize_255(image), crop, 0.0)
        label = pad_to(np.ascontiguousarray(label), crop, self.ignore_index)
        return {'image': image, 'label': label.astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class SegEvalTransform(grain.transforms.Map):
    """The official test pipeline: image resized (keep ratio) to fit ``img_scale`` and normalised; the label map
    keeps its original size. → ``{'image': float32 [h, w, 3], 'label': uint8 [H, W]}``."""

    img_scale: tuple = (2048, 512)
    reduce_zero_label: bool = True

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        image = np.asarray(transforms.decode_image(element['image']))
        label = decode_label_map(element['segmentation'])
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        size = rescale_size(image.shape[0], image.shape[1], tuple(self.img_scale))
        return {'image': normalize_255(resize_image(image, size)), 'label': label}


def eval_records(source, transform: SegEvalTransform, limit: Optional[int] = None):
    """Yield the transformed records of ``source`` in order (one image at a time: sizes differ)."""
    n = len(source) if not limit else min(limit, len(source))
    for i in range(n):
        yield transform.map(source[i])
