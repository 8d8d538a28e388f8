"""Semantic-segmentation evaluation: whole-image and sliding-window inference, mIoU / mAcc / aAcc.

Mirrors mmseg 0.11 (``EncoderDecoder.whole_inference`` / ``slide_inference`` with ``rescale=True`` and
``mean_iou``/``total_intersect_and_union``):

* a forward gives logits at the input's resolution (the decode head's 1/4 map resized bilinearly,
  ``align_corners=False``);
* slide: windows of ``crop`` every ``stride`` (the last row/column of windows flush with the image edge), the
  logits summed into the image and divided by the count of windows covering each pixel; whole: one window = the
  image;
* the averaged logits are resized bilinearly to the original label map's size, argmax → prediction;
* one confusion matrix over the whole eval set (pixels whose label is ``ignore_index`` left out) →
  aAcc = Σ intersect / Σ label area, per-class IoU = intersect / union and Acc = intersect / label area,
  mIoU / mAcc = their means over classes where they are defined (NaN-mean, as mmseg).

Static shapes: windows are always ``crop``-sized (an image smaller than the crop is padded with 0 — the normalised
training pad — and the padded part of the logits is dropped; mmseg would run the smaller window itself); the
per-image canvas and the original-size label map are padded to multiples of ``bucket`` pixels so that images of
nearby sizes share one compiled function.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.data.segmentation import IGNORE_INDEX

Window = tuple[int, int, int, int]  # (y1, y2, x1, x2)


def slide_windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> list[Window]:
    """mmseg ``slide_inference`` windows, row-major: ``h_grids = max(H − ch + sh − 1, 0) // sh + 1`` (and the same
    for w), each window moved back to end at the image edge."""
    (ch, cw), (sh, sw) = crop, stride
    h_grids = max(height - ch + sh - 1, 0) // sh + 1
    w_grids = max(width - cw + sw - 1, 0) // sw + 1
    windows = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * sh, wi * sw
            y2, x2 = min(y1 + ch, height), min(x1 + cw, width)
            windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return windows


def bilinear_matrix(src: int, dst: int, rows: Optional[int] = None, cols: Optional[int] = None) -> np.ndarray:
    """``[dst, src]`` weights of PyTorch ``interpolate(mode='bilinear', align_corners=False)`` along one axis
    (source coordinate ``(i + 0.5)·src/dst − 0.5`` clamped at 0, two taps), zero-padded to ``[rows, cols]``."""
    out = np.zeros((rows or dst, cols or src), np.float32)
    x = np.maximum((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5, 0.0)
    i0 = np.minimum(np.floor(x).astype(np.int64), src - 1)
    i1 = np.minimum(i0 + 1, src - 1)
    lam = (x - i0).astype(np.float32)
    np.add.at(out, (np.arange(dst), i0), 1.0 - lam)
    np.add.at(out, (np.arange(dst), i1), lam)
    return out


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``[..., H, W, C]`` → ``[..., h, w, C]`` as PyTorch bilinear, ``align_corners=False`` (fp32, exact taps)."""
    h, w = size
    if x.shape[-3:-1] == (h, w):
        return x
    ry = jnp.asarray(bilinear_matrix(x.shape[-3], h))
    rx = jnp.asarray(bilinear_matrix(x.shape[-2], w))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,...hwc->...owc", ry, x.astype(jnp.float32), precision=hi)
    return jnp.einsum("pw,...owc->...opc", rx, x, precision=hi)


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """``int32 [C, C]`` counts of (label, prediction) pairs; pixels labelled ``ignore_index`` (or ≥ C) left out."""
    label = label.astype(jnp.int32).reshape(-1)
    pred = pred.astype(jnp.int32).reshape(-1)
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    index = jnp.where(valid, label * num_classes + pred, 0)
    counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes * num_classes)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def metrics_from_confusion(confusion: np.ndarray) -> dict:
    """mmseg ``mean_iou`` from the summed confusion matrix: ``aAcc``, ``mIoU``, ``mAcc`` (in %), per-class
    ``IoU``/``Acc`` lists (NaN where undefined) and the pixel count."""
    confusion = np.asarray(confusion, np.float64)
    intersect = np.diag(confusion)
    area_label = confusion.sum(1)
    area_pred = confusion.sum(0)
    union = area_label + area_pred - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
        acc = intersect / area_label
        all_acc = intersect.sum() / area_label.sum()
    nanmean = lambda v: float(np.nanmean(v)) * 100 if np.isfinite(v).any() else float("nan")
    return {"aAcc": float(all_acc) * 100, "mIoU": nanmean(iou), "mAcc": nanmean(acc),
            "IoU": [float(v) * 100 for v in iou], "Acc": [float(v) * 100 for v in acc],
            "num_pixels": int(area_label.sum())}


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _add_window(canvas, count, logits, k, y1, x1):
    """Add window ``k`` of ``logits [B, ch, cw, C]`` to ``canvas [Hc, Wc, C]`` at (y1, x1); count += 1 there."""
    window = jax.lax.dynamic_index_in_dim(logits, k, keepdims=False).astype(canvas.dtype)
    ch, cw, c = window.shape
    current = jax.lax.dynamic_slice(canvas, (y1, x1, 0), (ch, cw, c))
    canvas = jax.lax.dynamic_update_slice(canvas, current + window, (y1, x1, 0))
    ones = jax.lax.dynamic_slice(count, (y1, x1), (ch, cw)) + 1.0
    return canvas, jax.lax.dynamic_update_slice(count, ones, (y1, x1))


def _original_size_logits(canvas, count, ry, rx):
    """Window-averaged logits ``canvas / count`` resized by ``ry [Ho, Hc]``, ``rx [Wo, Wc]`` (zero outside the
    image) → ``[Ho, Wo, C]``."""
    mean = canvas / jnp.maximum(count, 1.0)[..., None]
    hi = jax.lax.Precision.HIGHEST
    out = jnp.einsum("oh,hwc->owc", ry, mean, precision=hi)
    return jnp.einsum("pw,owc->opc", rx, out, precision=hi)


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def _finish_image(canvas, count, ry, rx, label, num_classes: int, ignore_index: int):
    """Original-size logits → argmax → confusion against ``label [Ho, Wo]`` (``ignore_index`` on the padding)."""
    out = _original_size_logits(canvas, count, ry, rx)
    return confusion_matrix(jnp.argmax(out, -1), label, num_classes, ignore_index)


_logits_at_original_size = jax.jit(_original_size_logits)


class SegmentationEvaluator:
    """Runs ``forward(images [B, h, w, 3]) → logits [B, h, w, C]`` (at the input resolution, float32) over eval
    records ``{'image': float32 [h, w, 3], 'label': uint8 [H, W]}`` and accumulates the confusion matrix.

    ``mode``: ``slide`` (windows of ``crop`` every ``stride``) or ``whole`` (one window = the image; consecutive
    images of the same size share a batch). ``batch_size`` windows per forward (the last batch padded with zeros);
    ``put`` places a host batch on the devices (e.g. sharded over the mesh's batch axes).
    """

    def __init__(self, forward: Callable, num_classes: int, mode: str = "slide", crop: tuple = (512, 512),
                 stride: tuple = (341, 341), batch_size: int = 8, ignore_index: int = IGNORE_INDEX,
                 bucket: int = 32, put: Optional[Callable] = None):
        if mode not in ("slide", "whole"):
            raise ValueError(f"evaluation mode must be 'slide' or 'whole', got {mode!r}")
        self.forward, self.num_classes, self.mode = forward, num_classes, mode
        self.crop, self.stride = tuple(crop), tuple(stride)
        self.batch_size, self.ignore_index, self.bucket = batch_size, ignore_index, bucket
        self.put = put or jnp.asarray

    def _jobs(self, index: int, image: np.ndarray):
        """``(index, window, crop image)`` per window; crops padded to the window shape with 0."""
        h, w = image.shape[:2]
        if self.mode == "whole":
            yield index, (0, h, 0, w), image
            return
        for y1, y2, x1, x2 in slide_windows(h, w, self.crop, self.stride):
            crop = image[y1:y2, x1:x2]
            if crop.shape[:2] != self.crop:
                crop = np.pad(crop, ((0, self.crop[0] - crop.shape[0]), (0, self.crop[1] - crop.shape[1]), (0, 0)))
            yield index, (y1, y2, x1, x2), crop

    def _canvas_shape(self, h: int, w: int) -> tuple[int, int]:
        ch, cw = (h, w) if self.mode == "whole" else (max(h, self.crop[0]), max(w, self.crop[1]))
        return _round_up(ch, self.bucket), _round_up(cw, self.bucket)

    def run(self, records: Iterable[dict]) -> dict:
        """The metrics of :func:`metrics_from_confusion` plus ``confusion`` (numpy) and ``num_images``."""
        return self._run(records, keep_logits=False)

    def predict(self, records: Iterable[dict]) -> list:
        """Per record, the logits at the label map's size ``float32 [H, W, C]`` (argmax = the prediction)."""
        return self._run(records, keep_logits=True)

    def _run(self, records: Iterable[dict], keep_logits: bool):
        total = jnp.zeros((self.num_classes, self.num_classes), jnp.int32)
        open_images: dict = {}  # index → [canvas, count, windows left, record]
        pending: list = []  # jobs waiting for a full batch of one crop shape
        num_images = 0
        logits_out: dict = {}

        def flush():
            nonlocal total
            if not pending:
                return
            shape = pending[0][2].shape
            batch = np.zeros((self.batch_size,) + shape, np.float32)
            for k, (_, _, crop) in enumerate(pending):
                batch[k] = crop
            logits = self.forward(self.put(batch))
            for k, (index, (y1, _, x1, _), _) in enumerate(pending):
                entry = open_images[index]
                entry[0], entry[1] = _add_window(entry[0], entry[1], logits, k, y1, x1)
                entry[2] -= 1
                if entry[2] == 0:
                    if keep_logits:
                        logits_out[index] = np.asarray(jax.device_get(self._finish(entry, logits=True)))
                    else:
                        total = total + self._finish(entry)
                    del open_images[index]
            pending.clear()

        for index, record in enumerate(records):
            image = np.asarray(record["image"], np.float32)
            h, w = image.shape[:2]
            jobs = list(self._jobs(index, image))
            hc, wc = self._canvas_shape(h, w)
            canvas = jnp.zeros((hc, wc, self.num_classes), jnp.float32)
            open_images[index] = [canvas, jnp.zeros((hc, wc), jnp.float32), len(jobs), record]
            for job in jobs:
                if pending and (len(pending) == self.batch_size or pending[0][2].shape != job[2].shape):
                    flush()
                pending.append(job)
            num_images += 1
        flush()
        if keep_logits:
            return [logits_out[i] for i in range(num_images)]
        confusion = np.asarray(jax.device_get(total))
        result = metrics_from_confusion(confusion)
        result.update(confusion=confusion, num_images=num_images)
        return result

    def _finish(self, entry, logits: bool = False) -> jax.Array:
        canvas, count, _, record = entry
        h, w = np.asarray(record["image"]).shape[:2]
        label = np.asarray(record["label"])
        ho, wo = label.shape
        hob, wob = _round_up(ho, self.bucket), _round_up(wo, self.bucket)
        ry = bilinear_matrix(h, ho, rows=hob, cols=canvas.shape[0])
        rx = bilinear_matrix(w, wo, rows=wob, cols=canvas.shape[1])
        if logits:
            return _logits_at_original_size(entry[0], entry[1], jnp.asarray(ry), jnp.asarray(rx))[:ho, :wo]
        padded = np.full((hob, wob), self.ignore_index, np.int32)
        padded[:ho, :wo] = label
        return _finish_image(canvas, count, jnp.asarray(ry), jnp.asarray(rx), jnp.asarray(padded),
                             num_classes=self.num_classes, ignore_index=self.ignore_index)
