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


def resize_rel_pos_bias_table(
    table: np.ndarray,
    new_window: Sequence[int],
    old_window: Sequence[int] | None = None,
) -> np.ndarray:
    """Resize a table ``[(2H−1)(2W−1)+3, heads]`` to ``new_window`` like timm's ``resize_rel_pos_bias_table``.

    The patch-pair grid is resampled with the unilm geometric-progression source grid and linear interpolation
    (timm's default, no scipy); the three CLS rows are kept as they are.
    """
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
    if src == dst:
        return table
    extra = table[-NUM_CLS_ENTRIES:]
    grid = table[:-NUM_CLS_ENTRIES].astype(np.float64).reshape(src[0], src[1], -1)
    wy = _linear_weights(_geometric_source_positions(src[0], dst[0]),
                         np.arange(-(dst[0] // 2), dst[0] // 2 + 0.1, 1.0))
    wx = _linear_weights(_geometric_source_positions(src[1], dst[1]),
                         np.arange(-(dst[1] // 2), dst[1] // 2 + 0.1, 1.0))
    resized = np.einsum("ys,xt,sth->yxh", wy, wx, grid).reshape(dst[0] * dst[1], -1)
    return np.concatenate([resized.astype(table.dtype), extra], axis=0)


def window_for_image(image_size: int | Tuple[int, int], patch_size: int) -> Tuple[int, int]:
    """Patch grid ``(H, W)`` for an image size in pixels."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    return image_size[0] // patch_size, image_size[1] // patch_size
