"""Grain transforms for BEiT v2: decode, shared colour jitter / flip / crop for two views, masks.

Every random draw comes from the ``numpy.random.Generator`` that grain's ``random_map`` hands to
each record (seeded by pipeline seed and record index), so outputs do not depend on worker count.
Image ops follow torchvision on PIL images (``ColorJitter`` via ``ImageEnhance``,
``RandomResizedCrop`` box sampling, ``Resize``/``CenterCrop`` rounding), see reference §2.4.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

from absl import logging
import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageStat

from beitv2_jax.data.masking import MaskingGenerator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CropBox = tuple[int, int, int, int]  # (top, left, height, width) in pixels

_INTERPOLATIONS = {
    'bicubic': Image.Resampling.BICUBIC,
    'bilinear': Image.Resampling.BILINEAR,
    'lanczos': Image.Resampling.LANCZOS,
    'nearest': Image.Resampling.NEAREST,
}


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


class UndecodableImageError(ValueError):
    """Image bytes that cannot be decoded: corrupt, truncated, empty or not an image."""


class BadDataError(RuntimeError):
    """So many consecutive records are undecodable that the data set itself must be broken."""


_SIXTEEN_BIT_MODES = ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N')  # PIL modes of 16/32-bit integer images


def _scale_16_bit(array: np.ndarray) -> np.ndarray:
    """16-bit pixel values ``[0, 65535]`` → uint8 ``[0, 255]`` (rounded)."""
    return np.round(np.clip(array.astype(np.float32), 0, 65535) / 257.0).astype(np.uint8)


def _to_rgb(pil: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: 16-bit grayscale scaled to 8 bits, float images clipped to [0, 255], palette and
    CMYK converted, alpha dropped (as torchvision's ``pil_loader`` does)."""
    if pil.mode in _SIXTEEN_BIT_MODES:
        pil = Image.fromarray(_scale_16_bit(np.asarray(pil)))
    elif pil.mode == 'F':
        pil = Image.fromarray(np.clip(np.asarray(pil), 0, 255).astype(np.uint8))
    elif pil.mode in ('P', 'PA'):  # through RGBA so that a transparent palette index converts cleanly
        pil = pil.convert('RGBA')
    return pil if pil.mode == 'RGB' else pil.convert('RGB')


def decode_image(image: Any) -> Image.Image:
    """Encoded bytes (any format PIL reads) or a pixel array ``[H, W]``, ``[H, W, 1|3|4]`` → PIL RGB image.

    Grayscale, palette, CMYK and RGBA images are converted to RGB, 16-bit images (PNG/TIFF bytes or
    ``uint16`` arrays) scaled to 8 bits. Corrupt, truncated or empty bytes raise ``UndecodableImageError``. A PIL
    image (``DecodedSource(..., pil=True)``'s records) is converted to RGB only (no copy when it is RGB already).
    """
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, (bytes, bytearray, np.bytes_)):
        data = bytes(image)
        try:
            pil = Image.open(io.BytesIO(data))
            pil.load()  # a truncated file fails here (PIL's LOAD_TRUNCATED_IMAGES is off)
            return _to_rgb(pil)
        except Exception as e:  # noqa: BLE001 - PIL reports bad data as OSError, SyntaxError, zlib.error, ...
            raise UndecodableImageError(f'cannot decode {len(data)} bytes as an image '
                                        f'({type(e).__name__}: {e})') from e
    array = np.asarray(image)
    if array.dtype == object:  # 0-d object array holding the bytes
        return decode_image(array.item())
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    array = _scale_16_bit(array) if array.dtype == np.uint16 else array.astype(np.uint8, copy=False)
    return _to_rgb(Image.fromarray(array))


MAX_CONSECUTIVE_BAD_RECORDS = 100


def record_name(record: dict[str, Any], index: int) -> str:
    """``'<file_name>' (record <index>)`` or ``record <index>`` for warnings about a record."""
    name = record.get('file_name')
    if isinstance(name, np.ndarray):
        name = name.item()
    if isinstance(name, bytes):
        name = name.decode('utf-8', 'replace')
    return f'{name!r} (record {index})' if name else f'record {index}'


class DecodedSource:
    """A random-access source (``len`` + ``__getitem__``) whose records carry ``image`` decoded to RGB
    ``uint8 [H, W, 3]`` and a ``bad_records`` flag (int32 0 or 1).

    A record whose image cannot be decoded is replaced by the next decodable record in source order
    (wrapping around), flagged ``bad_records=1`` and named in a warning. The replacement depends on the
    index only, so batches stay full, the stream is the same for any worker count, a resumed iterator
    reproduces it exactly, and over one pass the flags add up to the number of bad records. More than
    ``max_consecutive_bad`` bad records in a row raise ``BadDataError``.

    ``pil=True``: ``image`` stays the decoded PIL RGB image, for transforms that start with ``decode_image`` (every
    transform of ``data.pipeline`` and ``data.multicrop``): the copy to a numpy array and back that would cost
    ≈ 1 ms of a 500×375 image's ≈ 4 ms is skipped.
    """

    def __init__(self, source, max_consecutive_bad: int = MAX_CONSECUTIVE_BAD_RECORDS, pil: bool = False):
        self._source = source
        self._max_consecutive_bad = max_consecutive_bad
        self._pil = pil

    def __len__(self) -> int:
        return len(self._source)

    def decode(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record with its encoded fields decoded; raises ``UndecodableImageError`` (subclasses decode more)."""
        image = decode_image(record['image'])
        return {**record, 'image': image if self._pil else np.asarray(image)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = len(self._source)
        for offset in range(min(size, self._max_consecutive_bad + 1)):
            position = (int(index) + offset) % size
            record = self._source[position]
            try:
                decoded = self.decode(record)
            except UndecodableImageError as e:
                if offset == 0:  # each bad record is reported (and counted) when its own index is read
                    logging.warning('skipping bad image %s: %s', record_name(record, position), e)
                continue
            return {**decoded, 'bad_records': np.int32(offset > 0)}
        raise BadDataError(f'{offset + 1} consecutive records from record {int(index)} on cannot be decoded as '
                           f'images; the data set looks broken')


def count_bad_records(transform):
    """Wrap a record transform so that its output keeps the record's ``bad_records`` flag (set by
    ``DecodedSource``); a batch then carries how many of its records replaced a bad one."""
    if isinstance(transform, grain.transforms.RandomMap):
        return _RandomMapKeepingFlag(transform)
    return _MapKeepingFlag(transform)


@dataclasses.dataclass(frozen=True)
class _RandomMapKeepingFlag(grain.transforms.RandomMap):
    transform: grain.transforms.RandomMap

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out = self.transform.random_map(element, rng)
        return {**out, 'bad_records': element.get('bad_records', np.int32(0))}


@dataclasses.dataclass(frozen=True)
class _MapKeepingFlag(grain.transforms.Map):
    transform: Any

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        fn = self.transform.map if isinstance(self.transform, grain.transforms.Map) else self.transform
        return {**fn(element), 'bad_records': element.get('bad_records', np.int32(0))}


JitterParams = tuple[np.ndarray, tuple[float | None, float | None, float | None]]


def color_jitter_params(rng: np.random.Generator, brightness: float = 0.4, contrast: float = 0.4,
                        saturation: float = 0.4) -> JitterParams:
    """torchvision ``ColorJitter.get_params`` with hue=None.

    Returns ``(order, factors)``: a permutation of the four adjustment ids (0 brightness,
    1 contrast, 2 saturation, 3 hue — always skipped) and the factors ``U[max(0, 1-x), 1+x]`` drawn
    in the order brightness, contrast, saturation (None where the strength is 0).
    """
    order = rng.permutation(4)
    factors = tuple(None if x <= 0 else _uniform(rng, max(0.0, 1.0 - x), 1.0 + x)
                    for x in (brightness, contrast, saturation))
    return order, factors


def apply_color_jitter(image: Image.Image, order: np.ndarray,
                       factors: tuple[float | None, ...]) -> Image.Image:
    """Applies the adjustments in ``order`` with ``PIL.ImageEnhance`` (torchvision on PIL images)."""
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for fn_id in order:
        if fn_id < 3 and factors[fn_id] is not None:
            image = enhancers[fn_id](image).enhance(factors[fn_id])
    return image


def color_jitter(image: Image.Image, rng: np.random.Generator, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4) -> Image.Image:
    """torchvision ``ColorJitter(brightness, contrast, saturation, hue=0)`` on a PIL RGB image."""
    return apply_color_jitter(image, *color_jitter_params(rng, brightness, contrast, saturation))


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> CropBox:
    """torchvision ``RandomResizedCrop.get_params``: 10 attempts, then a centre crop.

    Returns ``(top, left, crop_height, crop_width)`` in pixels.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(rng, *scale)
        aspect_ratio = math.exp(_uniform(rng, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, box: CropBox, size: int,
                 interpolation: str = 'bicubic') -> Image.Image:
    """Crops ``box = (top, left, h, w)`` and resizes to ``size x size`` (torchvision resized_crop)."""
    top, left, h, w = box
    return image.crop((left, top, left + w, top + h)).resize((size, size),
                                                             _INTERPOLATIONS[interpolation])


def resize_shorter(image: Image.Image, size: int, interpolation: str = 'bicubic') -> Image.Image:
    """torchvision ``Resize(size)``: shorter side → ``size``, longer ``int(size * long / short)``."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), _INTERPOLATIONS[interpolation])


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` for images at least ``size`` on each side."""
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_unit_float(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL RGB or uint8 ``[..., H, W, 3]`` → float32 in [0, 1] (``ToTensor`` without the transpose)."""
    return np.asarray(image, dtype=np.float32) / np.float32(255.0)


def normalize(x: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """``(x - mean) / std`` per channel on float32 ``[..., 3]`` in [0, 1]."""
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _label(element: dict[str, Any]) -> np.int32:
    return np.int32(element.get('label', -1))


def mirror_box(box: CropBox, width: int) -> CropBox:
    """The box of ``box`` in the horizontally mirrored image of ``width`` pixels (and back)."""
    top, left, h, w = box
    return top, width - left - w, h, w


def flipped_resized_crop(image: Image.Image, box: CropBox, flip: bool, size: int,
                         interpolation: str = 'bicubic') -> Image.Image:
    """``resized_crop`` of the image mirrored when ``flip``, without mirroring the whole image: the mirrored box is
    cut from ``image``, resized, and only the ``size × size`` result is flipped (pixel-identical to flipping first:
    PIL's resampling weights are symmetric, so resize and mirror commute; tests/test_data.py checks it)."""
    if not flip:
        return resized_crop(image, box, size, interpolation)
    return resized_crop(image, mirror_box(box, image.width), size, interpolation).transpose(
        Image.Transpose.FLIP_LEFT_RIGHT)


CONTRAST_MEAN_REDUCTION = 4  # the contrast mean is read from the full image box-reduced by this factor per side


def apply_color_jitter_to_crops(views: list[Image.Image], image: Image.Image, order: np.ndarray,
                                factors: tuple[float | None, ...],
                                reduction: int = CONTRAST_MEAN_REDUCTION) -> list[Image.Image]:
    """``apply_color_jitter`` on crops of ``image`` instead of on ``image`` itself (then cropped).

    Brightness and saturation act per pixel, so they commute with crop + resize up to uint8 rounding and clipping.
    Contrast blends with the grayscale mean of the *whole* image as it stands at that point of ``order``
    (torchvision on PIL): that mean is read from a copy of ``image`` box-reduced ``reduction``× per side, carried
    through the adjustments that precede contrast (1/16 of the pixels for the default 4), so it can differ by one
    grey level from the full-image one (``int(mean + 0.5)`` of a slightly different mean); when contrast comes first
    the full image's mean is read (exact).
    """
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    active = [int(i) for i in order if i < 3 and factors[i] is not None]
    before_contrast = active[:active.index(1)] if 1 in active else []
    proxy = image.reduce(reduction) if before_contrast and reduction > 1 else image  # contrast first: exact mean
    for fn_id in active:
        factor = factors[fn_id]
        if fn_id == 1:
            mean = int(ImageStat.Stat(proxy.convert('L')).mean[0] + 0.5)
            views = [Image.blend(Image.new('RGB', v.size, (mean,) * 3), v, factor) for v in views]
            proxy = None  # contrast occurs once: later adjustments need no whole-image statistics
        else:
            views = [enhancers[fn_id](v).enhance(factor) for v in views]
            if proxy is not None and before_contrast:
                proxy = enhancers[fn_id](proxy).enhance(factor)
    return views


@dataclasses.dataclass(frozen=True)
class PretrainTransform(grain.transforms.RandomMap):
    """BEiT v2 pretraining view pair + block mask (``DataAugmentationForBEiT``), uint8 on the wire.

    record ``{'image': uint8 [H, W, 3] | bytes, 'label'?}`` → ``{'image': uint8 [s, s, 3], 'mask': bool
    [(s / patch)**2] row-major, 'label': int32}`` plus ``'tokenizer_image': uint8 [s2, s2, 3]`` only when the
    tokenizer view differs from the model view (size or interpolation; BEiT v2 ViT-B/16 uses one 224² bicubic view
    for both). The jitted step turns them into floats with ``data.on_device.pretrain_views``: the model view
    ImageNet-normalised (``mean``/``std``), the tokenizer view in [0, 1]. Both views share the colour jitter, the flip
    and the crop box; random draws in the official order jitter parameters, flip, crop box, mask.

    By default the flip and colour jitter are applied to the crops (``flipped_resized_crop``,
    ``apply_color_jitter_to_crops``): the same draws as the official order, pixels within a few grey levels of it
    (tests/test_data.py states the measured bound), at ~2.5× the speed. ``jitter_full_image=True`` runs the
    official order (jitter the whole decoded image, flip it, crop) exactly.
    """

    input_size: int = 224
    second_input_size: int = 224
    patch_size: int = 16
    num_masked_patches: int = 75
    min_mask_patches_per_block: int = 16
    max_mask_patches_per_block: int | None = None
    min_crop_scale: float = 0.2
    color_jitter: float = 0.4
    interpolation: str = 'bicubic'
    second_interpolation: str = 'bicubic'
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    jitter_full_image: bool = False

    @property
    def masking(self) -> MaskingGenerator:
        grid = self.input_size // self.patch_size
        return MaskingGenerator((grid, grid), self.num_masked_patches,
                                min_num_patches=self.min_mask_patches_per_block,
                                max_num_patches=self.max_mask_patches_per_block)

    @property
    def one_view(self) -> bool:
        """Whether the tokenizer view is the model view (same size and interpolation of the same box)."""
        return (self.second_input_size, self.second_interpolation) == (self.input_size, self.interpolation)

    def _sizes(self) -> list[tuple[int, str]]:
        first = (self.input_size, self.interpolation)
        return [first] if self.one_view else [first, (self.second_input_size, self.second_interpolation)]

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = decode_image(element['image'])
        jitter = color_jitter_params(rng, self.color_jitter, self.color_jitter, self.color_jitter) \
            if self.color_jitter > 0 else None
        flip = bool(rng.random() < 0.5)
        box = random_resized_crop_box(image.height, image.width, rng, scale=(self.min_crop_scale, 1.0))
        if self.jitter_full_image:
            if jitter is not None:
                image = apply_color_jitter(image, *jitter)
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            views = [resized_crop(image, box, size, interp) for size, interp in self._sizes()]
        else:
            views = [flipped_resized_crop(image, box, flip, size, interp) for size, interp in self._sizes()]
            if jitter is not None:
                views = apply_color_jitter_to_crops(views, image, *jitter)
        out = {'image': np.asarray(views[0]), 'mask': self.masking(rng).reshape(-1), 'label': _label(element)}
        if not self.one_view:
            out['tokenizer_image'] = np.asarray(views[1])
        return out


def host_pretrain_views(batch: dict[str, Any], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict[str, Any]:
    """The float views the pipeline built on the host before uint8 went on the wire: ``PretrainTransform``'s
    output (record or batch) → ``'image'`` float32 ImageNet-normalised and ``'tokenizer_image'`` float32 in [0, 1]
    (numpy; ``data.on_device.pretrain_views`` computes the same inside the step). Used by the benchmark's
    host-float reference and the tests."""
    view = to_unit_float(batch['image'])
    second = to_unit_float(batch['tokenizer_image']) if 'tokenizer_image' in batch else view
    return {**batch, 'image': normalize(view, mean, std), 'tokenizer_image': second}


@dataclasses.dataclass(frozen=True)
class TokenizerTrainTransform(grain.transforms.RandomMap):
    """VQ-KD training view: RandomResizedCrop(scale (min_crop_scale, 1)) + flip.

    record → ``{'image': uint8 [s, s, 3], 'label': int32}``; the step takes it to [0, 1] with
    ``data.on_device.unit_float``.
    """

    input_size: int = 224
    min_crop_scale: float = 0.08
    interpolation: str = 'bicubic'

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = decode_image(element['image'])
        box = random_resized_crop_box(image.height, image.width, rng, scale=(self.min_crop_scale, 1.0))
        image = resized_crop(image, box, self.input_size, self.interpolation)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {'image': np.asarray(image), 'label': _label(element)}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    """Resize shorter side to ``int(size / crop_pct)`` + centre crop.

    record → ``{'image': uint8 [s, s, 3], 'label': int32}``; the consumer converts it on device
    (``data.on_device.normalized`` for a backbone, ``unit_float`` for a tokenizer).
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = 'bicubic'

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        image = decode_image(element['image'])
        image = resize_shorter(image, int(self.input_size / self.crop_pct), self.interpolation)
        return {'image': np.asarray(center_crop(image, self.input_size)), 'label': _label(element)}
