"""Relative position bias index and tables (BEiT layout), and resizing to other resolutions.

For a window of ``H×W`` patches plus one CLS token the table has ``(2H−1)(2W−1) + 3`` rows:
patch pairs use row ``(dy + H − 1)(2W − 1) + (dx + W − 1)`` with ``dy = y_i − y_j``, ``dx = x_i − x_j``,
and the last three rows are CLS→patch, patch→CLS and CLS→CLS (729, 730, 731 for 14×14).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

NUM_CLS_ENTRIES = 3


def num_relative_distance(window: Sequence[int]) -> int:
    """Rows of the table for ``window = (H, W)``: (2H−1)(2W−1) + 3."""
    h, w = window
    return (2 * h - 1) * (2 * w - 1) + NUM_CLS_ENTRIES


def relative_position_index(window: Sequence[int], with_cls_token: bool = True) -> np.ndarray:
    """Index into the table for every (query, key) token pair, exactly as the official BEiT code.

    Returns:
      int32 array ``[H·W + 1, H·W + 1]`` (with CLS first) or ``[H·W, H·W]`` without CLS.
    """
    h, w = window
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([ys.reshape(-1), xs.reshape(-1)])  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]
    patch_index = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
    if not with_cls_token:
        return patch_index.astype(np.int32)
    n = h * w
    num_patch_rel = (2 * h - 1) * (2 * w - 1)
    index = np.zeros((n + 1, n + 1), dtype=np.int32)
    index[1:, 1:] = patch_index
    index[0, :] = num_patch_rel  # CLS -> patch
    index[:, 0] = num_patch_rel + 1  # patch -> CLS
    index[0, 0] = num_patch_rel + 2  # CLS -> CLS
    return index


def gather_bias(table, window: Sequence[int]):
    """Table ``[num_relative_distance, heads]`` → bias ``[heads, N+1, N+1]`` (works on jax or numpy)."""
    index = relative_position_index(window)
    n = index.shape[0]
    bias = table[index.reshape(-1)].reshape(n, n, -1)
    return bias.transpose(2, 0, 1)


def _geometric_source_positions(src: int, dst: int) -> np.ndarray:
    """Source sample positions on a geometric-progression grid (unilm/timm ``_calc``)."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = (1.0 - q ** (src // 2)) / (1.0 - q)
        if gp > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(dis)] + [0.0] + dis, dtype=np.float64)


def _linear_weights(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Interpolation matrix ``[len(targets), len(points)]`` of 1-D linear interpolation on an uneven grid.

    Mirrors timm's ``RegularGridInterpolator`` (clamped at the ends, like ``torch.bucketize``).
    """
    n = points.shape[0]
    right = np.minimum(np.searchsorted(points, targets, side="left"), n - 1)
    left = np.clip(right - 1, 0, n - 1)
    dist_left = np.maximum(targets - points[left], 0.0)
    dist_right = np.maximum(points[right] - targets, 0.0)
    both_zero = (dist_left == 0) & (dist_right == 0)
    dist_left = np.where(both_zero, 1.0, dist_left)
    dist_right = np.where(both_zero, 1.0, dist_right)
    total = dist_left + dist_right
    weights = np.zeros((targets.shape[0], n), dtype=np.float64)
    rows = np.arange(targets.shape[0])
    np.add.at(weights, (rows, left), dist_right / total)
    np.add.at(weights, (rows, right), dist_left / total)
    return weights


RESIZE_METHODS = ("official_cubic", "timm_linear")


def _cubic_spline_resize(grid: np.ndarray, src_y: np.ndarray, src_x: np.ndarray, dst_y: np.ndarray,
                         dst_x: np.ndarray) -> np.ndarray:
    """Per-head interpolating bicubic spline (SciPy ``RectBivariateSpline(kx=3, ky=3, s=0)``, which is what the
    removed ``interp2d(kind='cubic')`` fitted on a rectilinear grid): ``[sy, sx, heads]`` → ``[dy, dx, heads]``.
    A grid of fewer than 4 offsets along an axis (window 2, where the official code fails) gets degree n − 1."""
    from scipy import interpolate

    k0, k1 = min(3, grid.shape[0] - 1), min(3, grid.shape[1] - 1)
    out = np.empty((dst_y.shape[0], dst_x.shape[0], grid.shape[-1]), np.float64)
    for h in range(grid.shape[-1]):
        spline = interpolate.RectBivariateSpline(src_y, src_x, grid[..., h], kx=k0, ky=k1, s=0)
        out[..., h] = spline(dst_y, dst_x)
    return out


def resize_rel_pos_bias_table(
    table: np.ndarray,
    new_window: Sequence[int],
    old_window: Sequence[int] | None = None,
    method: str = "timm_linear",
) -> np.ndarray:
    """Resize a table ``[(2H−1)(2W−1)+3, heads]`` to ``new_window``; the three CLS rows are kept as they are.

    Both methods sample the old patch-pair grid on the unilm geometric-progression source positions (``q`` found by
    bisection so that the outermost old offset lands on the new one):

    * ``official_cubic``: the official BEiT / BEiT v2 loaders (``run_class_finetuning.py``, the segmentation
      ``mmcv_custom/checkpoint.py``): a cubic spline per head, SciPy ``interp2d(x, y, z, kind='cubic')`` there,
      ``RectBivariateSpline(kx=3, ky=3, s=0)`` here (same FITPACK interpolating spline; ``interp2d`` is gone from
      SciPy ≥ 1.14). Computed in float64 and cast back (the official code casts to float32 too).
    * ``timm_linear``: timm's ``resize_rel_pos_bias_table`` (linear interpolation on the same grid, no SciPy).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"relative position table resize method must be one of {RESIZE_METHODS}, got {method!r}")
    table = np.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"relative position table must be [positions, heads], got shape {table.shape}")
    dst = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if old_window is None:
        side = int(round((table.shape[0] - NUM_CLS_ENTRIES) ** 0.5))
        if side * side != table.shape[0] - NUM_CLS_ENTRIES:
            raise ValueError(f"cannot infer a square window for a table with {table.shape[0]} rows; pass old_window")
        src = (side, side)
    else:
        src = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    if table.shape[0] != src[0] * src[1] + NUM_CLS_ENTRIES:
        raise ValueError(f"relative position table has {table.shape[0]} rows, expected {src[0] * src[1]} + "
                         f"{NUM_CLS_ENTRIES} for the window {old_window}")
    if src == dst:
        return table
    extra = table[-NUM_CLS_ENTRIES:]
    grid = table[:-NUM_CLS_ENTRIES].astype(np.float64).reshape(src[0], src[1], -1)
    src_y, src_x = _geometric_source_positions(src[0], dst[0]), _geometric_source_positions(src[1], dst[1])
    dst_y = np.arange(-(dst[0] // 2), dst[0] // 2 + 0.1, 1.0)
    dst_x = np.arange(-(dst[1] // 2), dst[1] // 2 + 0.1, 1.0)
    if method == "official_cubic":
        resized = _cubic_spline_resize(grid, src_y, src_x, dst_y, dst_x)
    else:
        resized = np.einsum("ys,xt,sth->yxh", _linear_weights(src_y, dst_y), _linear_weights(src_x, dst_x), grid)
    resized = resized.reshape(dst[0] * dst[1], -1)
    return np.concatenate([resized.astype(table.dtype), extra], axis=0)


def window_for_image(image_size: int | Tuple[int, int], patch_size: int) -> Tuple[int, int]:
    """Patch grid ``(H, W)`` for an image size in pixels."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    return image_size[0] // patch_size, image_size[1] // patch_size
