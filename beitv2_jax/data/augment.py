"""Fine-tuning augmentations: RandAugment, random erasing, mixup/cutmix, and the train transform.

The official BEiT v2 fine-tuning builds timm's ``create_transform(is_training=True, auto_augment=
'rand-m9-mstd0.5-inc1', re_prob=0.25, re_mode='pixel', interpolation='bicubic')`` and ``timm.data.Mixup(0.8,
1.0, switch_prob=0.5, mode='batch', label_smoothing=0.1)`` (reference §3.1). This module re-implements them:

* per-image ops (RandAugment, random erasing) run on the host in the grain pipeline and draw every random number
  from the record's ``numpy.random.Generator`` in the same order and with the same meaning as timm's draws from
  Python's ``random`` (so a test can replay one stream into both and compare pixels);
* mixup/cutmix runs on device inside the jitted train step (one λ and one box per global batch, partner = the
  batch reversed, like timm's ``mode='batch'``) from a key derived from (seed, step).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, NamedTuple, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from beitv2_jax.data import transforms

LEVEL_DENOM = 10.0  # timm's magnitude scale: M / 10 is the fraction of each op's range
_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                   "nearest": Image.Resampling.NEAREST}


def fill_color(mean=transforms.IMAGENET_MEAN) -> tuple:
    """Fill for geometric ops: the dataset mean in uint8 (timm ``img_mean``), (124, 116, 104) for ImageNet."""
    return tuple(min(255, round(255 * x)) for x in mean)


# ----------------------------------------------------------------------------------------------- RandAugment ops
# Each op: (PIL image, *args, fill, resample) → PIL image, as timm.data.auto_augment.
def _affine(image: Image.Image, matrix: tuple, fill: tuple, resample) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _solarize_add(image: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


def _posterize(image: Image.Image, bits: int) -> Image.Image:
    """Keep the ``bits`` most significant bits per channel (``ImageOps.posterize``); ``bits = 0``
    (``PosterizeIncreasing`` at magnitude 10) gives black, as older Pillow did — recent Pillow rejects 0, which
    makes timm's op raise."""
    if bits >= 8:
        return image
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return image.point([i & mask for i in range(256)] * len(image.getbands()))


OPS: dict[str, Callable[..., Image.Image]] = {
    "AutoContrast": lambda im, fill, resample: ImageOps.autocontrast(im),
    "Equalize": lambda im, fill, resample: ImageOps.equalize(im),
    "Invert": lambda im, fill, resample: ImageOps.invert(im),
    "Rotate": lambda im, deg, fill, resample: im.rotate(deg, resample=resample, fillcolor=fill),
    "Posterize": lambda im, bits, fill, resample: _posterize(im, bits),
    "Solarize": lambda im, thresh, fill, resample: ImageOps.solarize(im, thresh),
    "SolarizeAdd": lambda im, add, fill, resample: _solarize_add(im, add),
    "Color": lambda im, f, fill, resample: ImageEnhance.Color(im).enhance(f),
    "Contrast": lambda im, f, fill, resample: ImageEnhance.Contrast(im).enhance(f),
    "Brightness": lambda im, f, fill, resample: ImageEnhance.Brightness(im).enhance(f),
    "Sharpness": lambda im, f, fill, resample: ImageEnhance.Sharpness(im).enhance(f),
    "ShearX": lambda im, f, fill, resample: _affine(im, (1, f, 0, 0, 1, 0), fill, resample),
    "ShearY": lambda im, f, fill, resample: _affine(im, (1, 0, 0, f, 1, 0), fill, resample),
    "TranslateXRel": lambda im, pct, fill, resample: _affine(im, (1, 0, pct * im.size[0], 0, 1, 0), fill, resample),
    "TranslateYRel": lambda im, pct, fill, resample: _affine(im, (1, 0, 0, 0, 1, pct * im.size[1]), fill, resample),
}


def _negate(value: float, rng: np.random.Generator) -> float:
    """timm ``_randomly_negate``: −value when a uniform draw exceeds 0.5."""
    return -value if rng.random() > 0.5 else value


def _enhance(level: float, rng) -> tuple:
    return (level / LEVEL_DENOM) * 1.8 + 0.1,


def _enhance_increasing(level: float, rng) -> tuple:
    return max(0.1, 1.0 + _negate((level / LEVEL_DENOM) * 0.9, rng)),


def _solarize_level(level: float) -> int:
    return min(256, int((level / LEVEL_DENOM) * 256))


def _posterize_level(level: float) -> int:
    return int((level / LEVEL_DENOM) * 4)


# Magnitude (0..10) → op arguments; ``rng`` is used only by the signed ops (one draw each).
LEVEL_TO_ARGS: dict[str, Optional[Callable[[float, np.random.Generator], tuple]]] = {
    "AutoContrast": None, "Equalize": None, "Invert": None,
    "Rotate": lambda m, rng: (_negate((m / LEVEL_DENOM) * 30.0, rng),),
    "Posterize": lambda m, rng: (_posterize_level(m),),
    "PosterizeIncreasing": lambda m, rng: (4 - _posterize_level(m),),
    "Solarize": lambda m, rng: (_solarize_level(m),),
    "SolarizeIncreasing": lambda m, rng: (256 - _solarize_level(m),),
    "SolarizeAdd": lambda m, rng: (min(128, int((m / LEVEL_DENOM) * 110)),),
    "Color": _enhance, "Contrast": _enhance, "Brightness": _enhance, "Sharpness": _enhance,
    "ColorIncreasing": _enhance_increasing, "ContrastIncreasing": _enhance_increasing,
    "BrightnessIncreasing": _enhance_increasing, "SharpnessIncreasing": _enhance_increasing,
    "ShearX": lambda m, rng: (_negate((m / LEVEL_DENOM) * 0.3, rng),),
    "ShearY": lambda m, rng: (_negate((m / LEVEL_DENOM) * 0.3, rng),),
    "TranslateXRel": lambda m, rng: (_negate((m / LEVEL_DENOM) * 0.45, rng),),
    "TranslateYRel": lambda m, rng: (_negate((m / LEVEL_DENOM) * 0.45, rng),),
}

# timm _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS (same order: the op index drawn selects from it).
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")


def op_function(name: str) -> Callable[..., Image.Image]:
    """The image function of an op name (``'ColorIncreasing'`` uses ``Color``'s)."""
    return OPS[name.replace("Increasing", "")]


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm ``rand_augment_transform(config_str, hparams)``: ``num_layers`` ops drawn with replacement, each
    applied with probability ``prob`` at magnitude ``N(magnitude, magnitude_std)`` clipped to [0, magnitude_max].

    ``__call__(image, rng)``: PIL RGB → PIL RGB. ``from_string('rand-m9-mstd0.5-inc1')`` parses timm's syntax.
    """

    magnitude: float = 9.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.5
    magnitude_max: float = LEVEL_DENOM
    increasing: bool = True
    fill: tuple = (124, 116, 104)
    interpolation: str = "bicubic"

    @classmethod
    def from_string(cls, config_str: str, **kwargs) -> "RandAugment":
        parts = config_str.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment config must start with 'rand', got {config_str!r}")
        fields = {}
        for part in parts[1:]:
            key, value = (re.split(r"(\d.*)", part) + [""])[:2]
            if not value:
                raise ValueError(f"bad RandAugment section {part!r} in {config_str!r}")
            if key == "m":
                fields["magnitude"] = float(int(value))
            elif key == "n":
                fields["num_layers"] = int(value)
            elif key == "p":
                fields["prob"] = float(value)
            elif key == "mstd":
                fields["magnitude_std"] = float("inf") if float(value) > 100 else float(value)
            elif key == "mmax":
                fields["magnitude_max"] = float(int(value))
            elif key == "inc":
                fields["increasing"] = bool(int(value))
            else:
                raise ValueError(f"unknown RandAugment section {part!r} in {config_str!r} (m, n, p, mstd, mmax, inc)")
        return cls(**fields, **kwargs)

    @property
    def op_names(self) -> tuple:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS

    def sample_magnitude(self, rng: np.random.Generator) -> float:
        magnitude = self.magnitude
        if self.magnitude_std == float("inf"):
            magnitude = 0.0 + magnitude * rng.random()
        elif self.magnitude_std > 0:
            magnitude = magnitude + self.magnitude_std * rng.standard_normal()
        return max(0.0, min(magnitude, self.magnitude_max or LEVEL_DENOM))

    def apply_op(self, image: Image.Image, name: str, rng: np.random.Generator) -> Image.Image:
        """One timm ``AugmentOp``: skip with probability 1 − prob, else draw the magnitude (and sign) and apply."""
        if self.prob < 1.0 and rng.random() > self.prob:
            return image
        magnitude = self.sample_magnitude(rng)
        level_fn = LEVEL_TO_ARGS[name]
        args = level_fn(magnitude, rng) if level_fn is not None else ()
        return op_function(name)(image, *args, fill=self.fill, resample=_INTERPOLATIONS[self.interpolation])

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        names = self.op_names
        for index in rng.choice(len(names), self.num_layers, replace=True):
            image = self.apply_op(image, names[int(index)], rng)
        return image


# ----------------------------------------------------------------------------------------------- random erasing
def random_erasing_box(height: int, width: int, rng: np.random.Generator, prob: float = 0.25,
                       min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                       max_aspect: Optional[float] = None, min_count: int = 1,
                       max_count: int = 1) -> list:
    """timm ``RandomErasing._erase`` box sampling: ``[(top, left, h, w), ...]`` (empty when not applied)."""
    if rng.random() > prob:
        return []
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    count = min_count if min_count == max_count else int(rng.integers(min_count, max_count + 1))
    area, boxes = height * width, []
    for _ in range(count):
        for _ in range(10):
            target_area = (min_area + (max_area - min_area) * rng.random()) * area / count
            aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rng.random())
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                boxes.append((top, left, h, w))
                break
    return boxes


def erase(image: np.ndarray, boxes: list, rng: np.random.Generator, mode: str = "pixel") -> np.ndarray:
    """Fill ``boxes`` of a normalised float image ``[H, W, C]`` with N(0, 1) per pixel (``pixel``), per channel
    (``rand``) or zeros (``const``), like timm's ``_get_pixels``. Returns a new array."""
    out = np.array(image, copy=True)
    channels = out.shape[-1]
    for top, left, h, w in boxes:
        if mode == "pixel":
            fill = rng.standard_normal((h, w, channels), dtype=np.float32)
        elif mode == "rand":
            fill = rng.standard_normal((1, 1, channels), dtype=np.float32)
        elif mode == "const":
            fill = np.zeros((1, 1, channels), np.float32)
        else:
            raise ValueError(f"random erasing mode must be pixel, rand or const, got {mode!r}")
        out[top:top + h, left:left + w] = fill
    return out


# ----------------------------------------------------------------------------------------------- train transform
@dataclasses.dataclass(frozen=True)
class FinetuneTrainTransform(grain.transforms.RandomMap):
    """timm ``transforms_imagenet_train`` as the official fine-tuning configures it.

    RandomResizedCrop(scale (min_crop_scale, 1), ratio (3/4, 4/3)) → horizontal flip → RandAugment (or colour
    jitter when ``auto_augment`` is empty; timm disables jitter under RandAugment) → ToTensor → Normalize →
    RandomErasing. record ``{'image': uint8 [H, W, 3] | bytes, 'label'}`` → ``{'image': float32 [s, s, 3]
    normalised, 'label': int32}``; without random erasing (``re_prob=0``) the image is shipped as uint8 and the step
    normalises it (``data.on_device.normalized``, which passes float32 through). The linear-probe train view is the same with ``auto_augment=''``,
    ``color_jitter=0`` and ``re_prob=0``.
    """

    input_size: int = 224
    min_crop_scale: float = 0.08
    hflip: float = 0.5
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    interpolation: str = "bicubic"
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    mean: tuple = transforms.IMAGENET_MEAN
    std: tuple = transforms.IMAGENET_STD

    @functools.cached_property
    def rand_augment(self) -> Optional[RandAugment]:
        if not self.auto_augment:
            return None
        return RandAugment.from_string(self.auto_augment, fill=fill_color(self.mean), interpolation=self.interpolation)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = transforms.decode_image(element["image"])
        box = transforms.random_resized_crop_box(image.height, image.width, rng, scale=(self.min_crop_scale, 1.0))
        image = transforms.resized_crop(image, box, self.input_size, self.interpolation)
        if self.hflip > 0 and rng.random() < self.hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        augment = self.rand_augment
        if augment is not None:
            image = augment(image, rng)
        elif self.color_jitter > 0:
            image = transforms.color_jitter(image, rng, self.color_jitter, self.color_jitter, self.color_jitter)
        label = np.int32(element.get("label", -1))
        if self.re_prob <= 0:  # uint8 on the wire; the step normalises (data.on_device.normalized)
            return {"image": np.asarray(image), "label": label}
        x = transforms.normalize(transforms.to_unit_float(image), self.mean, self.std)
        boxes = random_erasing_box(x.shape[0], x.shape[1], rng, prob=self.re_prob, max_count=self.re_count)
        x = erase(x, boxes, rng, self.re_mode)  # N(0, 1) fills live in normalised space: float32 on the wire
        return {"image": x.astype(np.float32), "label": label}


# ----------------------------------------------------------------------------------------------- mixup / cutmix
class MixParams(NamedTuple):
    """One batch's mixing: ``lam`` (weight of the original image, after the cutmix area correction),
    ``use_cutmix`` (bool), ``box`` = (y_lo, y_hi, x_lo, x_hi) pixel bounds (ignored unless cutmix)."""

    lam: jax.Array
    use_cutmix: jax.Array
    box: tuple


@dataclasses.dataclass(frozen=True)
class Mixup:
    """timm ``Mixup(mixup_alpha, cutmix_alpha, prob, switch_prob, mode='batch', correct_lam=True,
    label_smoothing, num_classes)`` for NHWC batches on device."""

    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    correct_lam: bool = True

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def sample(self, key: jax.Array, height: int, width: int) -> MixParams:
        """Draw λ, the mixup/cutmix switch and the cutmix box for one batch (timm ``_params_per_batch``)."""
        k_apply, k_switch, k_lam, k_y, k_x = jax.random.split(key, 5)
        applied = jax.random.uniform(k_apply) < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = jax.random.uniform(k_switch) < self.switch_prob
        else:
            use_cutmix = jnp.bool_(self.cutmix_alpha > 0)
        alpha = jnp.where(use_cutmix, self.cutmix_alpha, self.mixup_alpha).astype(jnp.float32)
        lam = jax.random.beta(k_lam, alpha, alpha)  # Beta(α, α) of the chosen method (one sampler)
        lam = jnp.where(applied, lam, 1.0).astype(jnp.float32)
        use_cutmix = use_cutmix & applied
        cy = jax.random.randint(k_y, (), 0, height)
        cx = jax.random.randint(k_x, (), 0, width)
        box, cut_lam = cutmix_box(lam, cy, cx, height, width)
        if self.correct_lam:
            lam = jnp.where(use_cutmix, cut_lam, lam)
        return MixParams(lam, use_cutmix, box)

    def __call__(self, key: jax.Array, images: jax.Array, labels: jax.Array) -> tuple:
        """``images [B, H, W, C]``, int ``labels [B]`` → mixed images and soft targets ``[B, num_classes]``."""
        if not self.enabled:
            return images, smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        params = self.sample(key, images.shape[1], images.shape[2])
        return mix_images(images, params), mixup_target(labels, self.num_classes, params.lam, self.label_smoothing)


def cutmix_box(lam, cy, cx, height: int, width: int) -> tuple:
    """timm ``rand_bbox`` + area correction for centre ``(cy, cx)``: ``((y_lo, y_hi, x_lo, x_hi), 1 − area/HW)``."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    y_lo = jnp.clip(cy - cut_h // 2, 0, height)
    y_hi = jnp.clip(cy + (cut_h + 1) // 2, 0, height)
    x_lo = jnp.clip(cx - cut_w // 2, 0, width)
    x_hi = jnp.clip(cx + (cut_w + 1) // 2, 0, width)
    area = (y_hi - y_lo) * (x_hi - x_lo)
    return (y_lo, y_hi, x_lo, x_hi), 1.0 - area.astype(jnp.float32) / float(height * width)


def mix_images(images: jax.Array, params: MixParams) -> jax.Array:
    """Mix every image with its partner in the reversed batch: paste the box (cutmix) or blend with λ (mixup)."""
    flipped = images[::-1]
    height, width = images.shape[1], images.shape[2]
    y_lo, y_hi, x_lo, x_hi = params.box
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= y_lo) & (rows < y_hi) & (cols >= x_lo) & (cols < x_hi)  # [H, W]
    cut = jnp.where(inside[None, :, :, None], flipped, images)
    lam = params.lam.astype(images.dtype)
    blend = images * lam + flipped * (1 - lam)
    return jnp.where(params.use_cutmix, cut, blend)


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """One-hot ``[B, C]`` with ``1 − s + s/C`` on the label and ``s/C`` elsewhere (timm ``one_hot``)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def mixup_target(labels: jax.Array, num_classes: int, lam, smoothing: float = 0.0) -> jax.Array:
    """timm ``mixup_target``: λ·y + (1 − λ)·y[::-1] with label-smoothed one-hot ``y``. Rows sum to 1."""
    y = smooth_one_hot(labels, num_classes, smoothing)
    return y * lam + y[::-1] * (1.0 - lam)
