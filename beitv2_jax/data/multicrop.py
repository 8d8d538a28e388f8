"""iBOT multi-crop views and masks as a grain transform (``DataAugmentationiBOT`` + ``ImageFolderMask``).

Per image: ``num_global`` global crops (RandomResizedCrop ``global_scale``, bicubic) and ``num_local`` local crops
(``local_scale``), each followed by the DINO augmentations

  flip (p 0.5) → ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8 → grayscale (p 0.2) → Gaussian blur
  (global 1: p 1.0; global 2..: p 0.1, then solarize p 0.2; local: p 0.5; radius U(0.1, 2) pixels at the official
  224 / 96-px crop sizes, scaled with the crop size otherwise) → ImageNet normalisation,

and one block mask per global crop: ratio drawn per crop from ``pred_ratio`` ± ``pred_ratio_var`` (one of the listed
ratios with equal probability; README: ``{0, U(0.1, 0.5)}``, so half the crops are unmasked), then BEiT-style blocks
until ``ratio · H · W`` patches (a float target, no exact-count fix-up, minimum block ``(min(H, W) // 3)²``), or
exactly ``int(ratio · H · W)`` uniformly random patches with ``pred_shape='rand'``. All randomness comes from the
per-record ``numpy.random.Generator`` grain hands to ``random_map``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image, ImageFilter, ImageOps

from beitv2_jax.data import pipeline, sources, transforms
from beitv2_jax.data.masking import MaskingGenerator

PRED_SHAPES = ("block", "rand")


# ----------------------------------------------------------------------------------------------- image ops
def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision ``adjust_hue`` on a PIL RGB image: shift the HSV hue channel by ``hue_factor · 255`` (uint8
    wrap-around)."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor {hue_factor} is not in [-0.5, 0.5]")
    hsv = np.array(image.convert("HSV"), np.uint8)  # one copy, [H, W, 3]; no split / merge of three bands
    hsv[..., 0] += np.int32(hue_factor * 255).astype(np.uint8)  # uint8 arithmetic wraps around as torchvision's
    return Image.fromarray(hsv, "HSV").convert(image.mode)


def color_jitter_with_hue(image: Image.Image, rng: np.random.Generator, brightness: float = 0.4,
                          contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1) -> Image.Image:
    """torchvision ``ColorJitter(brightness, contrast, saturation, hue)``: a random order of the four adjustments with
    factors drawn as ``get_params`` does (brightness, contrast, saturation, then hue ~ U(−hue, hue))."""
    order, factors = transforms.color_jitter_params(rng, brightness, contrast, saturation)
    hue_factor = transforms._uniform(rng, -hue, hue) if hue > 0 else None
    k = int(np.flatnonzero(order == 3)[0])
    image = transforms.apply_color_jitter(image, order[:k], factors)
    if hue_factor is not None:
        image = adjust_hue(image, hue_factor)
    return transforms.apply_color_jitter(image, order[k + 1:], factors)


def to_grayscale_rgb(image: Image.Image) -> Image.Image:
    """torchvision ``rgb_to_grayscale(num_output_channels=3)`` on PIL: luma ``L`` copied to three channels."""
    gray = np.asarray(image.convert("L"), np.uint8)
    return Image.fromarray(np.dstack([gray, gray, gray]), "RGB")


def gaussian_blur(image: Image.Image, rng: np.random.Generator, prob: float, radius_min: float = 0.1,
                  radius_max: float = 2.0, radius_scale: float = 1.0) -> Image.Image:
    """DINO/iBOT ``utils.GaussianBlur``: with probability ``prob`` (drawn as ``U ≤ prob``) a PIL Gaussian blur of
    radius U(radius_min, radius_max) · ``radius_scale``."""
    if not rng.random() <= prob:
        return image
    radius = transforms._uniform(rng, radius_min, radius_max) * radius_scale
    return image.filter(ImageFilter.GaussianBlur(radius=radius))


def solarize(image: Image.Image, rng: np.random.Generator, prob: float) -> Image.Image:
    """``utils.Solarization``: ``ImageOps.solarize`` (threshold 128) with probability ``prob``."""
    return ImageOps.solarize(image) if rng.random() < prob else image


def flip_and_color_jitter(image: Image.Image, rng: np.random.Generator, jitter: tuple = (0.4, 0.4, 0.2, 0.1),
                          jitter_prob: float = 0.8, grayscale_prob: float = 0.2) -> Image.Image:
    """Flip (0.5) → ColorJitter(*jitter) with p ``jitter_prob`` → grayscale (``grayscale_prob``); the defaults are
    the official ones."""
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < jitter_prob:
        image = color_jitter_with_hue(image, rng, *jitter)
    if rng.random() < grayscale_prob:
        image = to_grayscale_rgb(image)
    return image


# ----------------------------------------------------------------------------------------------- masks
def pred_ratio(rng: np.random.Generator, ratios: tuple, variances: tuple) -> float:
    """``ImageFolderMask.get_pred_ratio``: each ratio ``r`` with variance ``v`` gives U(r − v, r + v) (or r when
    v = 0); one of them is chosen uniformly."""
    if len(ratios) != len(variances):
        raise ValueError(f"pred_ratio {ratios} and pred_ratio_var {variances} must have the same length")
    drawn = []
    for r, v in zip(ratios, variances):
        if r < v:
            raise ValueError(f"pred_ratio {r} must be >= its pred_ratio_var {v}")
        drawn.append(transforms._uniform(rng, r - v, r + v) if v > 0 else r)
    return float(drawn[int(rng.integers(len(drawn)))])


def block_mask(rng: np.random.Generator, grid: int, target: float, min_aspect: float = 0.3) -> np.ndarray:
    """iBOT's block masking on a ``grid × grid`` patch grid: blocks of area U((grid // 3)², remaining) and log-uniform
    aspect are added while fewer than ``target`` (a float) patches are masked; stops when no block fits."""
    mask = np.zeros((grid, grid), bool)
    generator = MaskingGenerator((grid, grid), 0, min_num_patches=(grid // 3) ** 2, min_aspect=min_aspect)
    count = 0
    while count < target:
        delta = generator._mask_block(mask, target - count, rng, [])
        if delta == 0:
            break
        count += delta
    return mask


def random_mask(rng: np.random.Generator, grid: int, target: float) -> np.ndarray:
    """Exactly ``int(target)`` uniformly random masked patches (``pred_shape='rand'``)."""
    mask = np.zeros(grid * grid, bool)
    mask[rng.permutation(grid * grid)[:int(target)]] = True
    return mask.reshape(grid, grid)


# ----------------------------------------------------------------------------------------------- the transform
@dataclasses.dataclass(frozen=True)
class MultiCropTransform(grain.transforms.RandomMap):
    """record ``{'image', 'label'?}`` → ``{'global_crops': uint8 [G, s, s, 3], 'local_crops': uint8
    [L, l, l, 3] (only when L > 0), 'masks': bool [G, (s / patch)²] row-major, 'label': int32}``; the iBOT step
    ImageNet-normalises the crops on device (``data.on_device.normalized``)."""

    global_size: int = 224
    local_size: int = 96
    num_global: int = 2
    num_local: int = 10
    global_scale: tuple = (0.25, 1.0)
    local_scale: tuple = (0.05, 0.25)
    patch_size: int = 16
    pred_ratio: tuple = (0.0, 0.3)
    pred_ratio_var: tuple = (0.0, 0.2)
    pred_shape: str = "block"
    min_aspect: float = 0.3
    color_jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    interpolation: str = "bicubic"

    def crop(self, image: Image.Image, rng: np.random.Generator, size: int, scale: tuple, blur: float,
             solarize_prob: float = 0.0, official_size: int = 224) -> np.ndarray:
        """One augmented view, uint8 ``[size, size, 3]``."""
        box = transforms.random_resized_crop_box(image.height, image.width, rng, scale=tuple(scale))
        view = flip_and_color_jitter(transforms.resized_crop(image, box, size, self.interpolation), rng,
                                     tuple(self.color_jitter), self.color_jitter_prob, self.grayscale_prob)
        view = gaussian_blur(view, rng, blur, radius_scale=size / official_size)
        if solarize_prob > 0:
            view = solarize(view, rng, solarize_prob)
        return np.asarray(view)

    def mask(self, rng: np.random.Generator) -> np.ndarray:
        grid = self.global_size // self.patch_size
        target = pred_ratio(rng, tuple(self.pred_ratio), tuple(self.pred_ratio_var)) * grid * grid
        if self.pred_shape == "block":
            return block_mask(rng, grid, target, self.min_aspect)
        if self.pred_shape == "rand":
            return random_mask(rng, grid, target)
        raise ValueError(f"pred_shape must be one of {PRED_SHAPES}, got {self.pred_shape!r}")

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = transforms.decode_image(element["image"])
        crops = [self.crop(image, rng, self.global_size, self.global_scale, blur=1.0)]
        crops += [self.crop(image, rng, self.global_size, self.global_scale, blur=0.1, solarize_prob=0.2)
                  for _ in range(self.num_global - 1)]
        local = [self.crop(image, rng, self.local_size, self.local_scale, blur=0.5, official_size=96)
                 for _ in range(self.num_local)]
        out = {"global_crops": np.stack(crops), "masks": np.stack([self.mask(rng).reshape(-1) for _ in crops]),
               "label": transforms._label(element)}
        if local:
            out["local_crops"] = np.stack(local)
        return out


def multicrop_transform(config: ml_collections.ConfigDict) -> MultiCropTransform:
    """The transform of an ``ibot`` config (``config.data``, ``config.crops``, ``config.masking``)."""
    crops, masking = config.crops, config.masking
    if masking.pred_shape not in PRED_SHAPES:
        raise ValueError(f"config.masking.pred_shape must be one of {PRED_SHAPES}, got {masking.pred_shape!r}")
    return MultiCropTransform(
        global_size=config.data.input_size, local_size=crops.local_size, num_global=crops.num_global,
        num_local=crops.num_local, global_scale=tuple(crops.global_scale), local_scale=tuple(crops.local_scale),
        patch_size=config.data.patch_size, pred_ratio=tuple(masking.pred_ratio),
        pred_ratio_var=tuple(masking.pred_ratio_var), pred_shape=masking.pred_shape,
        min_aspect=masking.get("min_aspect", 0.3), color_jitter=tuple(crops.get("color_jitter", (0.4, 0.4, 0.2, 0.1))),
        color_jitter_prob=crops.get("color_jitter_prob", 0.8), grayscale_prob=crops.get("grayscale_prob", 0.2),
        interpolation=config.data.interpolation)


def make_ibot_iterator(config: ml_collections.ConfigDict, global_batch_size: int, seed: int,
                       process_index: int | None = None, process_count: int | None = None) -> pipeline.BatchIterator:
    """Endless iBOT batches (this process's rows of each global batch): ``{'global_crops': [b, G, s, s, 3],
    'local_crops': [b, L, l, l, 3], 'masks': bool [b, G, N], 'label': [b], 'bad_records': [b]}``."""
    data = config.data
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    source = transforms.DecodedSource(sources.open_source(data.dataset, data.train_split, data.data_dir),
                                      pil=True)  # MultiCropTransform starts with decode_image
    transform = transforms.count_bad_records(multicrop_transform(config))
    ds = pipeline.make_dataset(source, transform=transform, global_batch_size=global_batch_size,
                               process_index=process_index, process_count=process_count, seed=seed,
                               num_workers=data.num_workers, read_threads=data.read_threads,
                               prefetch_batches=data.prefetch_batches)
    return iter(ds)
