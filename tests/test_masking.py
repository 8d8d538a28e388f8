"""Tests for the block-wise mask generator against the official algorithm."""

import math
import random

import numpy as np
import pytest

from beitv2_jax.data.masking import MaskingGenerator


def official_mask(py_rng, height, width, num_masking, min_num=16, max_num=None, min_aspect=0.3,
                  max_aspect=None):
    """Straight port of unilm beit2/masking_generator.py, returning (mask, blocks)."""
    max_num = num_masking if max_num is None else max_num
    max_aspect = max_aspect or 1 / min_aspect
    log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
    mask = np.zeros((height, width), dtype=np.int32)
    blocks = []

    def _mask(max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = py_rng.uniform(min_num, max_mask_patches)
            aspect_ratio = math.exp(py_rng.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = py_rng.randint(0, height - h)
                left = py_rng.randint(0, width - w)
                num_masked = mask[top:top + h, left:left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                    blocks.append((top, left, h, w))
                if delta > 0:
                    break
        return delta

    mask_count = 0
    while mask_count < num_masking:
        delta = _mask(min(num_masking - mask_count, max_num))
        if delta == 0:
            break
        mask_count += delta
    if mask_count < num_masking:
        ys, xs = (mask == 0).nonzero()
        chosen = np.random.default_rng(py_rng.randrange(2**32)).choice(
            ys.shape[0], num_masking - mask_count, replace=False)
        mask[ys[chosen], xs[chosen]] = 1
    return mask.astype(bool), blocks


@pytest.mark.parametrize('window,count,min_num', [((14, 14), 75, 16), ((4, 4), 6, 2),
                                                  ((4, 4), 6, 16), ((8, 6), 20, 4),
                                                  ((14, 14), 0, 16), ((7, 7), 49, 4)])
def test_exact_count(window, count, min_num):
    gen = MaskingGenerator(window, num_masking_patches=count, min_num_patches=min_num)
    rng = np.random.default_rng(0)
    for _ in range(300):
        mask = gen(rng)
        assert mask.shape == window and mask.dtype == bool
        assert int(mask.sum()) == count


def test_deterministic_given_generator():
    gen = MaskingGenerator()
    a = [gen(np.random.default_rng([3, i])) for i in range(20)]
    b = [gen(np.random.default_rng([3, i])) for i in range(20)]
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all((x == a[0]).all() for x in a[1:])


def test_int_window_size():
    assert MaskingGenerator(window_size=6, num_masking_patches=10).window_size == (6, 6)
    with pytest.raises(ValueError):
        MaskingGenerator(window_size=(2, 2), num_masking_patches=5)


@pytest.mark.parametrize('window,count,min_num,max_num', [((14, 14), 75, 16, None),
                                                          ((14, 14), 75, 4, 30),
                                                          ((6, 6), 12, 3, None)])
def test_block_geometry(window, count, min_num, max_num):
    """Blocks fit strictly inside the window, and area/aspect agree with the draw up to rounding."""
    gen = MaskingGenerator(window, count, min_num_patches=min_num, max_num_patches=max_num)
    max_block = count if max_num is None else max_num
    rng = np.random.default_rng(1)
    for _ in range(500):
        mask, blocks = gen.generate(rng, return_blocks=True)
        replay = np.zeros(window, dtype=bool)
        for top, left, h, w in blocks:
            remaining = count - int(replay.sum())
            assert 0 < h < window[0] and 0 < w < window[1]
            assert top >= 0 and left >= 0 and top + h <= window[0] and left + w <= window[1]
            # h = round(sqrt(A * a)), w = round(sqrt(A / a)), a in [0.3, 1/0.3],
            # A >= min(min_num, remaining).
            assert (h + 0.5) / max(w - 0.5, 1e-9) >= gen.min_aspect
            assert (h - 0.5) / (w + 0.5) <= 1 / gen.min_aspect
            assert (h + 0.5) * (w + 0.5) >= min(min_num, remaining, max_block)
            new = h * w - int(replay[top:top + h, left:left + w].sum())
            assert 0 < new <= min(remaining, max_block)
            replay[top:top + h, left:left + w] = True
        assert (replay <= mask).all()  # blocks never overshoot, so the fix-up only adds cells
        assert int(mask.sum()) == count


def test_statistics_match_official():
    """Mean number of blocks and mean block area over 10k masks agree with the official code (2%)."""
    num_masks = 10_000
    gen = MaskingGenerator((14, 14), 75, min_num_patches=16)
    rng = np.random.default_rng(0)
    ours = [gen.generate(rng, return_blocks=True)[1] for _ in range(num_masks)]
    py_rng = random.Random(0)
    ref = [official_mask(py_rng, 14, 14, 75)[1] for _ in range(num_masks)]

    def stats(all_blocks):
        num_blocks = np.mean([len(b) for b in all_blocks])
        area = np.mean([h * w for b in all_blocks for (_, _, h, w) in b])
        return num_blocks, area

    (ours_n, ours_area), (ref_n, ref_area) = stats(ours), stats(ref)
    assert abs(ours_n / ref_n - 1) < 0.02, (ours_n, ref_n)
    assert abs(ours_area / ref_area - 1) < 0.02, (ours_area, ref_area)


def test_spatial_frequency_matches_official():
    """Per-cell masking frequency is ~uniform-ish and agrees with the official code."""
    num_masks = 4000
    gen = MaskingGenerator((14, 14), 75, min_num_patches=16)
    rng = np.random.default_rng(5)
    ours = np.mean([gen(rng) for _ in range(num_masks)], axis=0)
    py_rng = random.Random(5)
    ref = np.mean([official_mask(py_rng, 14, 14, 75)[0] for _ in range(num_masks)], axis=0)
    assert abs(ours.mean() - 75 / 196) < 1e-9 and abs(ref.mean() - 75 / 196) < 1e-9
    assert np.abs(ours - ref).max() < 0.05
