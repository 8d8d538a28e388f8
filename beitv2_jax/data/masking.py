"""Block-wise masking for masked image modeling (BEiT v1 algorithm, BEiT v2 exact count).

Mirrors unilm ``beit2/masking_generator.py``: rectangles of random area and aspect ratio are
masked until ``num_masking_patches`` cells are covered or no rectangle fits, then random cells are
masked or unmasked so that every mask has exactly ``num_masking_patches`` ones. The only change is
that all randomness comes from an explicit ``numpy.random.Generator``, so a mask is a pure
function of the generator's state (one generator per record in the data pipeline).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

Block = tuple[int, int, int, int]  # (top, left, height, width) in patches

_MAX_ATTEMPTS = 10


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """Python ``random.uniform`` semantics: ``low + (high - low) * U[0, 1)`` (``high < low`` is fine)."""
    return low + (high - low) * rng.random()


@dataclasses.dataclass(frozen=True)
class MaskingGenerator:
    """Draws ``[height, width]`` boolean masks with exactly ``num_masking_patches`` ones.

    Attributes:
      window_size: (height, width) of the patch grid, e.g. (14, 14) for 224 px / 16 px patches.
      num_masking_patches: exact number of masked patches per mask (75 in BEiT v2).
      min_num_patches: smallest block area in patches (``--min_mask_patches_per_block``, 16).
      max_num_patches: largest block area; None means ``num_masking_patches``.
      min_aspect: smallest block aspect ratio h/w; log-uniform in [min_aspect, max_aspect].
      max_aspect: largest aspect ratio; None means ``1 / min_aspect``.
    """

    window_size: tuple[int, int] | int = (14, 14)
    num_masking_patches: int = 75
    min_num_patches: int = 16
    max_num_patches: int | None = None
    min_aspect: float = 0.3
    max_aspect: float | None = None

    def __post_init__(self):
        if isinstance(self.window_size, int):
            object.__setattr__(self, 'window_size', (self.window_size, self.window_size))
        object.__setattr__(self, 'window_size', tuple(int(s) for s in self.window_size))
        height, width = self.window_size
        if not 0 <= self.num_masking_patches <= height * width:
            raise ValueError(
                f'num_masking_patches={self.num_masking_patches} must lie in [0, {height * width}] '
                f'for window_size={self.window_size}.')

    @property
    def height(self) -> int:
        return self.window_size[0]

    @property
    def width(self) -> int:
        return self.window_size[1]

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    @property
    def max_block_patches(self) -> int:
        return self.num_masking_patches if self.max_num_patches is None else self.max_num_patches

    @property
    def log_aspect_ratio(self) -> tuple[float, float]:
        max_aspect = self.max_aspect or 1.0 / self.min_aspect
        return math.log(self.min_aspect), math.log(max_aspect)

    def _mask_block(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator,
                    blocks: list[Block]) -> int:
        """Masks one rectangle in place (up to 10 attempts); returns the number of newly masked cells."""
        log_low, log_high = self.log_aspect_ratio
        for _ in range(_MAX_ATTEMPTS):
            target_area = _uniform(rng, self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(_uniform(rng, log_low, log_high))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                window = mask[top:top + h, left:left + w]
                num_new = h * w - int(window.sum())
                if 0 < num_new <= max_mask_patches:
                    window[...] = True
                    blocks.append((top, left, h, w))
                    return num_new
        return 0

    def generate(self, rng: np.random.Generator, return_blocks: bool = False):
        """Draws one mask.

        Args:
          rng: the generator all draws come from.
          return_blocks: also return the rectangles placed by the block stage.

        Returns:
          ``mask`` bool ``[height, width]`` with exactly ``num_masking_patches`` True cells, or
          ``(mask, blocks)`` with ``blocks`` a list of ``(top, left, height, width)`` rectangles in
          the order drawn (before the exact-count fix-up).
        """
        mask = np.zeros(self.window_size, dtype=bool)
        blocks: list[Block] = []
        count = 0
        while count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - count, self.max_block_patches)
            delta = self._mask_block(mask, max_mask_patches, rng, blocks)
            if delta == 0:
                break
            count += delta

        # BEiT v2 fix-up: unmask or mask random cells so the count is exact.
        if count > self.num_masking_patches:
            rows, cols = mask.nonzero()
            chosen = rng.choice(rows.shape[0], count - self.num_masking_patches, replace=False)
            mask[rows[chosen], cols[chosen]] = False
        elif count < self.num_masking_patches:
            rows, cols = (~mask).nonzero()
            chosen = rng.choice(rows.shape[0], self.num_masking_patches - count, replace=False)
            mask[rows[chosen], cols[chosen]] = True
        return (mask, blocks) if return_blocks else mask

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Returns a bool ``[height, width]`` mask with exactly ``num_masking_patches`` True cells."""
        return self.generate(rng)
