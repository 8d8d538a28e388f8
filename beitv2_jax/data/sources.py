"""Random-access tfds data sources (array_record, read without TensorFlow).

Three kinds of dataset are supported, all opened with :func:`open_source`:

* ``beitv2_demo``: a built-in procedurally generated set of 64x64 shapes and textures (10 classes,
  5,000 train / 1,000 test), made on first use in about a second by :func:`ensure_demo_dataset`.
* image folders: ``<src>/<class>/*.jpg|png`` (optionally ``<src>/<split>/<class>/...``) converted by
  :func:`prepare_image_folder` (or ``python -m beitv2_jax.data.sources prepare-folder``) into a tfds
  dataset whose ``image`` feature holds the encoded file bytes; ``<src>/*.jpg`` (or ``--unlabeled``) gives an
  unlabelled dataset (no ``label`` feature) for the self-supervised tasks; ``--holdout F --seed S`` makes a
  stratified ``val`` split (docs/own_data.md).
* ``beitv2_demo_seg``: the same shapes with their per-pixel class maps (11 classes: background + the 10 shapes),
  for semantic segmentation (:func:`ensure_demo_seg_dataset`).
* segmentation folders: ``<src>/images/<split>/*.jpg`` with ``<src>/annotations/<split>/*.png`` label maps of the
  same stem (the ``ADEChallengeData2016`` layout), converted by the same ``prepare-folder`` command.
* ``imagenet2012`` and any other tfds dataset already prepared in ``data_dir`` as array_record.
  Preparing ImageNet uses tfds' own builder, which needs TensorFlow at preparation time only:
  ``tfds build imagenet2012 --manual_dir=DIR --data_dir=DIR --file_format=array_record``.

``data_dir`` may be a ``gs://`` URI: the shards are read from there directly (array_record's reader has a GCS
backend). array_record's *writer* only writes local files, so the demo set and image folders are prepared in a
local temporary directory and uploaded (``dataset_info.json``, which marks a prepared dataset, last).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import sys
import tempfile
import types
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging
import tensorflow_datasets as tfds

from beitv2_jax import progress, storage

DEMO_NAME = 'beitv2_demo'
DEMO_SEG_NAME = 'beitv2_demo_seg'
IMAGE_FOLDER_NAME = 'beitv2_image_folder'
DEMO_IMAGE_SIZE = 64
DEMO_CLASSES = ('circle', 'square', 'triangle', 'cross', 'ring', 'stripes_h', 'stripes_v',
                'checker', 'diamond', 'ellipse')
DEMO_SPLIT_SIZES = {'train': 5000, 'test': 1000}
DEMO_SEG_CLASSES = ('background',) + DEMO_CLASSES  # segmentation ids: 0 background, 1 + shape id
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
_SPLIT_DIR_NAMES = ('train', 'val', 'validation', 'test')
HOLDOUT_SPLIT = 'val'  # prepare-folder --holdout's split
# Names of a held-out evaluation split: a config asking for one of them gets the only one a dataset has.
EVAL_SPLIT_NAMES = ('validation', 'val', 'test')
MAX_NAMED_BAD_IMAGES = 10
_DEMO_SEED = 20240717
_DEMO_CHUNK = 500


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets``."""
    return os.path.expanduser(os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


def _resolve(data_dir: str | os.PathLike | None) -> str:
    if not data_dir:
        return default_data_dir()
    return os.fspath(data_dir) if storage.is_remote(data_dir) else os.path.expanduser(os.fspath(data_dir))


@contextlib.contextmanager
def _file_lock(directory: str) -> Iterator[None]:
    """Exclusive inter-process lock on the directory ``directory`` itself (created if missing), released on exit.

    Locking the directory's own descriptor leaves no lock file behind, whatever happens to the process.
    """
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _prepare(builder: tfds.core.DatasetBuilder) -> None:
    """``download_and_prepare`` without network access and without a leftover downloads folder (tfds's progress
    bars only on a terminal: in a log file they are carriage-return soup)."""
    if not progress.interactive():
        tfds.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix='tfds_downloads_') as download_dir:
        builder.download_and_prepare(
            download_dir=download_dir,
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def _prepare_and_upload(make_builder, data_dir: str) -> None:
    """Prepare ``make_builder(local_data_dir)`` in a local temporary data_dir, then upload its version folder to
    the same place under the URI ``data_dir`` (array_record's writer cannot write to object stores). Processes
    racing here upload identical files; ``dataset_info.json`` goes last, so a half-upload is never "prepared"."""
    with tempfile.TemporaryDirectory(prefix='tfds_stage_') as local:
        builder = make_builder(local)
        _prepare(builder)
        rel = os.path.relpath(os.fspath(builder.data_dir), local).split(os.sep)
        storage.upload_tree(os.fspath(builder.data_dir), storage.join(data_dir, *rel))


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base for our builders: no download, no checksums file.

    ``code_path`` is overridden because tfds 4.9.x's default needs the ``importlib_resources``
    backport for builders defined inside a package (it is only installed on Python < 3.9).
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        return None


# ----------------------------------------------------------------------------------------------
# Built-in demo dataset: procedurally generated shapes and textures.
# ----------------------------------------------------------------------------------------------


def _demo_params(split_seed: int, index: int, label: int) -> dict[str, Any]:
    """Per-example random parameters, seeded by (split, index) only."""
    rng = np.random.default_rng([_DEMO_SEED, split_seed, index])
    size = DEMO_IMAGE_SIZE
    radius = rng.uniform(0.25, 0.42) * size
    margin = 0.75 * radius
    centre = rng.uniform(margin, size - margin, size=2)
    if DEMO_CLASSES[label] in ('square', 'diamond'):
        angle = rng.uniform(-np.pi / 18, np.pi / 18)  # keep square vs diamond distinct
    elif DEMO_CLASSES[label] in ('stripes_h', 'stripes_v', 'checker'):
        angle = 0.0
    else:
        angle = rng.uniform(0, 2 * np.pi)
    # Light on dark or dark on light, with a faint random tint: the shape, not a per-image colour pair, is what
    # tells images apart (v1's fully random colours let self-distillation match views by colour alone).
    fg = rng.uniform(170, 255) + rng.uniform(-15, 15, size=3)
    bg = rng.uniform(0, 85) + rng.uniform(-15, 15, size=3)
    if rng.random() < 0.5:
        fg, bg = bg, fg
    return dict(
        radius=radius, centre=centre, angle=angle, fg=fg, bg=bg,
        period=rng.uniform(3.0, 5.0),  # stripe / checker cell width in pixels
        aspect=rng.uniform(0.35, 0.55),  # ellipse minor/major axis
        gradient=rng.uniform(-30, 30, size=(2, 3)),  # background colour ramp (y, x) per channel
        noise=6.0 * rng.standard_normal(size=(size, size, 3), dtype=np.float32),
    )


def _in_square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85


def _stripes(t, period):
    return (np.floor(t / period) % 2) == 0


# Foreground masks from rotated coordinates (u, v) in units of the shape radius, unrotated pixel
# offsets (dy, dx) from the centre, stripe period in pixels and ellipse minor/major axis ratio.
_DEMO_SHAPES = {
    'circle': lambda u, v, dy, dx, p, a: u**2 + v**2 <= 1.0,
    'square': lambda u, v, dy, dx, p, a: _in_square(u, v),
    'triangle': lambda u, v, dy, dx, p, a: (v >= -0.5) & (v <= 1.0 - np.sqrt(3.0) * np.abs(u)),
    'cross': lambda u, v, dy, dx, p, a: (((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3))
                                         & (np.maximum(np.abs(u), np.abs(v)) <= 1.0)),
    'ring': lambda u, v, dy, dx, p, a: (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= 0.55**2),
    'stripes_h': lambda u, v, dy, dx, p, a: _in_square(u, v) & _stripes(dy, p),
    'stripes_v': lambda u, v, dy, dx, p, a: _in_square(u, v) & _stripes(dx, p),
    'checker': lambda u, v, dy, dx, p, a: _in_square(u, v) & (_stripes(dy, p) ^ _stripes(dx, p)),
    'diamond': lambda u, v, dy, dx, p, a: np.abs(u) + np.abs(v) <= 1.15,
    'ellipse': lambda u, v, dy, dx, p, a: u**2 + (v / a)**2 <= 1.0,
}
assert tuple(_DEMO_SHAPES) == DEMO_CLASSES


def render_demo_images(split_seed: int, indices: Sequence[int], labels: Sequence[int],
                       return_masks: bool = False):
    """Renders demo images ``uint8 [n, 64, 64, 3]``; image i depends only on (split_seed, indices[i]).

    With ``return_masks`` also returns the shapes' foreground masks ``bool [n, 64, 64]`` (the pixels drawn in the
    foreground colour: stripes and checkers are their drawn cells, a ring is the annulus).
    """
    labels = np.asarray(labels)
    params = [_demo_params(split_seed, int(i), int(c)) for i, c in zip(indices, labels)]
    stack = lambda key: np.stack([p[key] for p in params]).astype(np.float32)
    size = DEMO_IMAGE_SIZE
    grid = np.arange(size, dtype=np.float32) + 0.5
    centre, radius, angle = stack('centre'), stack('radius'), stack('angle')
    dy = grid[None, :, None] - centre[:, 0, None, None]  # [n, H, 1]
    dx = grid[None, None, :] - centre[:, 1, None, None]  # [n, 1, W]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    scale = radius[:, None, None]
    u = (cos * dx + sin * dy) / scale
    v = (cos * dy - sin * dx) / scale
    dy, dx = np.broadcast_to(dy, u.shape), np.broadcast_to(dx, u.shape)
    period, aspect = stack('period')[:, None, None], stack('aspect')[:, None, None]
    fg_mask = np.zeros(u.shape, dtype=bool)
    for class_id, shape_fn in enumerate(_DEMO_SHAPES.values()):
        sel = labels == class_id
        if sel.any():
            fg_mask[sel] = shape_fn(u[sel], v[sel], dy[sel], dx[sel], period[sel], aspect[sel])
    ramp = grid / size - 0.5
    gradient = stack('gradient')  # [n, 2, 3]
    bg = (stack('bg')[:, None, None, :] + ramp[None, :, None, None] * gradient[:, None, None, 0]
          + ramp[None, None, :, None] * gradient[:, None, None, 1])
    image = np.where(fg_mask[..., None], stack('fg')[:, None, None, :], bg) + stack('noise')
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return (image, fg_mask) if return_masks else image


def demo_segmentation_maps(fg_masks: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Per-pixel class ids ``uint8 [n, H, W]``: 0 on the background, ``1 + label`` on the shape's pixels."""
    labels = np.asarray(labels, np.int64)
    return np.where(fg_masks, (labels + 1)[:, None, None], 0).astype(np.uint8)


def demo_labels(split: str) -> np.ndarray:
    """Class ids ``int64 [n]`` for a demo split: balanced, in a fixed shuffled order."""
    n = DEMO_SPLIT_SIZES[split]
    rng = np.random.default_rng([_DEMO_SEED, _split_seed(split)])
    return rng.permutation(np.arange(n) % len(DEMO_CLASSES))


def _split_seed(split: str) -> int:
    return list(DEMO_SPLIT_SIZES).index(split) + 1


class Beitv2Demo(_LocalBuilder, skip_registration=True):
    """Procedural shapes/textures: 10 classes, 64x64 RGB, 5,000 train + 1,000 test (no download)."""

    name = DEMO_NAME
    VERSION = tfds.core.Version('2.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.',
                     '2.0.0': 'Larger shapes (radius 0.25-0.42 of the image), light-on-dark / dark-on-light.'}

    def _info(self) -> tfds.core.DatasetInfo:
        size = DEMO_IMAGE_SIZE
        return self.dataset_info_from_configs(
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                # Raw bytes encoding: ~20x faster to prepare than the int64-list default.
                'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding='bytes'),
                'label': tfds.features.ClassLabel(names=DEMO_CLASSES),
            }),
            supervised_keys=('image', 'label'),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in DEMO_SPLIT_SIZES}

    def _generate_examples(self, split: str):
        labels = demo_labels(split)
        for start in range(0, len(labels), _DEMO_CHUNK):
            indices = np.arange(start, min(start + _DEMO_CHUNK, len(labels)))
            images = render_demo_images(_split_seed(split), indices, labels[indices])
            for index, image in zip(indices, images):
                yield int(index), {'image': image, 'label': int(labels[index])}


def _ensure_generated(builder_class: type, data_dir: str | os.PathLike | None) -> None:
    """Prepares the generated data set ``builder_class`` in ``data_dir`` unless it is there; safe across processes
    (a local data_dir is locked; a gs:// one gets a local build uploaded, see ``_prepare_and_upload``)."""
    data_dir = _resolve(data_dir)
    if builder_class(data_dir=data_dir).is_prepared():  # no lock needed (works on read-only dirs)
        return
    if storage.is_remote(data_dir):
        _prepare_and_upload(lambda local: builder_class(data_dir=local, file_format='array_record'), data_dir)
        return
    with _file_lock(data_dir):
        builder = builder_class(data_dir=data_dir, file_format='array_record')
        if not builder.is_prepared():
            _prepare(builder)


def ensure_demo_dataset(data_dir: str | os.PathLike | None = None) -> None:
    """Prepares ``beitv2_demo`` in ``data_dir`` unless it is there; safe across processes."""
    _ensure_generated(Beitv2Demo, data_dir)


class Beitv2DemoSeg(_LocalBuilder, skip_registration=True):
    """The demo shapes with per-pixel class maps: 11 classes (0 background, 1 + shape id), 64x64, 5,000 train +
    1,000 test; image i of a split is image i of ``beitv2_demo`` (same pixels), its map marks the shape's pixels."""

    name = DEMO_SEG_NAME
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release (the beitv2_demo 2.0.0 images).'}

    def _info(self) -> tfds.core.DatasetInfo:
        size = DEMO_IMAGE_SIZE
        return self.dataset_info_from_configs(
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding='bytes'),
                'segmentation': tfds.features.Tensor(shape=(size, size), dtype=np.uint8, encoding='bytes'),
                'label': tfds.features.ClassLabel(names=DEMO_CLASSES),
            }),
            supervised_keys=('image', 'segmentation'),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in DEMO_SPLIT_SIZES}

    def _generate_examples(self, split: str):
        labels = demo_labels(split)
        for start in range(0, len(labels), _DEMO_CHUNK):
            indices = np.arange(start, min(start + _DEMO_CHUNK, len(labels)))
            images, masks = render_demo_images(_split_seed(split), indices, labels[indices], return_masks=True)
            maps = demo_segmentation_maps(masks, labels[indices])
            for index, image, seg in zip(indices, images, maps):
                yield int(index), {'image': image, 'segmentation': seg, 'label': int(labels[index])}


def ensure_demo_seg_dataset(data_dir: str | os.PathLike | None = None) -> None:
    """Prepares ``beitv2_demo_seg`` in ``data_dir`` unless it is there; safe across processes."""
    _ensure_generated(Beitv2DemoSeg, data_dir)


# ----------------------------------------------------------------------------------------------
# Image folders: <src>/<class>/<file> or <src>/<split>/<class>/<file>, stored as encoded bytes.
# ----------------------------------------------------------------------------------------------


def _list_images(class_dir: str) -> list[str]:
    return sorted(
        os.path.join(root, f) for root, _, files in os.walk(class_dir) for f in files
        if f.lower().endswith(IMAGE_EXTENSIONS))


def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))
                  and not d.startswith('.'))


def _direct_images(path: str) -> list[str]:
    """Image files directly in ``path`` (not in its sub-folders)."""
    return sorted(os.path.join(path, f) for f in os.listdir(path)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f)))


def _is_unlabeled_dir(path: str) -> bool:
    """A folder of images without class sub-folders (images directly in it, no sub-folders).

    Raises:
      ValueError: images directly in the folder *and* sub-folders (the layout does not say which is meant).
    """
    direct, subdirs = _direct_images(path), _subdirs(path)
    if direct and subdirs:
        raise ValueError(f'{path} holds both images ({len(direct)}) and sub-folders ({", ".join(subdirs[:3])}); '
                         f'pass --unlabeled to read every image under it without labels, or move the images into '
                         f'class sub-folders')
    return bool(direct)


def holdout_indices(labels: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Indices (sorted) of a stratified hold-out of ``round(fraction · n)`` of ``n`` items; deterministic in
    ``seed``.

    Each class (label; -1 = unlabelled, one group) gives its largest-remainder share of the total, its items drawn
    by a seeded permutation (classes in sorted order, one generator), so the hold-out's class proportions match the
    data's to within one item per class.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f'--holdout {fraction} must be in (0, 1)')
    labels = np.asarray(labels, np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    total = int(round(fraction * len(labels)))
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]), i))  # largest remainder first
    for i in order[:total - int(take.sum())]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)


def scan_image_folder(src_dir: str, unlabeled: bool = False, holdout: float = 0.0, seed: int = 0,
                      holdout_split: str = HOLDOUT_SPLIT) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Finds classes and files.

    Layouts: ``<src>/<class>/*`` (labelled), ``<src>/*`` (images directly in the folder: unlabelled), either of
    them under split folders ``<src>/<split>/...`` when every sub-folder of ``src_dir`` is a split name
    (train/val/validation/test). With ``unlabeled`` every image under a split folder (sub-folders included) is
    unlabelled. Unlabelled items carry label -1 (the dataset then has no ``label`` feature).
    ``holdout`` > 0 moves a seeded, class-stratified ``round(holdout · n)`` of the ``train`` split into
    ``holdout_split`` (:func:`holdout_indices`); it needs a folder without an evaluation split of its own.

    Returns:
      ``(class_names, {split: [(path, label), ...]})``; ``class_names`` is empty for unlabelled data.
    """
    top = _subdirs(src_dir)
    if top and all(d in _SPLIT_DIR_NAMES for d in top) and not _direct_images(src_dir):
        split_dirs = {d: os.path.join(src_dir, d) for d in top}
    else:
        split_dirs = {'train': src_dir}
    first = 'train' if 'train' in split_dirs else next(iter(split_dirs))
    flat = {split: unlabeled or _is_unlabeled_dir(path) for split, path in split_dirs.items()}
    if len(set(flat.values())) > 1:
        raise ValueError(f'splits {sorted(s for s, f in flat.items() if f)} hold images without class sub-folders '
                         f'but {sorted(s for s, f in flat.items() if not f)} have class sub-folders; use one layout '
                         f'(or --unlabeled for all)')
    splits = {}
    if flat[first]:
        class_names = []
        for split, split_dir in split_dirs.items():
            splits[split] = [(path, -1) for path in _list_images(split_dir)]
    else:
        class_names = _subdirs(split_dirs[first])
        if not class_names:
            raise ValueError(f'No class sub-folders or images found in {split_dirs[first]}.')
        for split, split_dir in split_dirs.items():
            unknown = set(_subdirs(split_dir)) - set(class_names)
            if unknown:
                raise ValueError(f'Split {split!r} has classes not in {first!r}: {sorted(unknown)}')
            splits[split] = [(path, label) for label, name in enumerate(class_names)
                             for path in _list_images(os.path.join(split_dir, name))]
    for split, split_dir in split_dirs.items():
        if not splits[split]:
            raise ValueError(f'No images with extensions {IMAGE_EXTENSIONS} found in {split_dir}.')
    if holdout:
        others = sorted(set(splits) - {'train'})
        if others or 'train' not in splits:
            raise ValueError(f'--holdout needs a folder without split folders other than train; {src_dir} has '
                             f'{", ".join(others) or "no train split"}')
        items = splits['train']
        held = set(holdout_indices([label for _, label in items], holdout, seed).tolist())
        splits = {'train': [x for i, x in enumerate(items) if i not in held],
                  holdout_split: [x for i, x in enumerate(items) if i in held]}
        if not splits['train'] or not splits[holdout_split]:
            raise ValueError(f'--holdout {holdout} of {len(items)} images leaves an empty split '
                             f'(train {len(splits["train"])}, {holdout_split} {len(splits[holdout_split])})')
    return class_names, splits


class Beitv2ImageFolder(_LocalBuilder, skip_registration=True):
    """Images from a folder of class sub-folders (``label``) or of unlabelled images (no ``label`` feature);
    ``image`` holds the encoded file bytes. See :func:`scan_image_folder` for the layouts and the hold-out."""

    name = IMAGE_FOLDER_NAME
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}

    def __init__(self, *, src_dir: str, verify: bool = True, unlabeled: bool = False, holdout: float = 0.0,
                 seed: int = 0, **kwargs):
        self._src_dir = os.path.expanduser(src_dir)
        self._class_names, self._splits = scan_image_folder(self._src_dir, unlabeled, holdout, seed)
        self._verify = verify
        self.bad_images: list[str] = []  # files skipped because they cannot be decoded (with verify)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {'image': tfds.features.Tensor(shape=(), dtype=np.object_),
                    'file_name': tfds.features.Tensor(shape=(), dtype=np.object_)}
        if self._class_names:
            features['label'] = tfds.features.ClassLabel(names=self._class_names)
        return self.dataset_info_from_configs(
            description=f'Image folder {self._src_dir}' + ('' if self._class_names else ' (unlabelled)'),
            features=tfds.features.FeaturesDict(features),
            supervised_keys=('image', 'label') if self._class_names else None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(items) for split, items in self._splits.items()}

    def _generate_examples(self, items: list[tuple[str, int]]):
        for path, label in items:
            rel = os.path.relpath(path, self._src_dir)
            with open(path, 'rb') as f:
                data = f.read()
            if self._verify and not _decodable(data):
                self.bad_images.append(rel)
                continue
            record = {'image': data, 'file_name': rel}
            if self._class_names:
                record['label'] = label
            yield rel, record


def _decodable(*encoded: bytes) -> bool:
    """Whether every encoded image decodes (prepare-time verification of folder datasets)."""
    from beitv2_jax.data import transforms  # pylint: disable=g-import-not-at-top  (transforms imports PIL)

    try:
        for data in encoded:
            transforms.decode_image(data)
    except transforms.UndecodableImageError:
        return False
    return True


def _folder_builder_class(name: str, base: type = Beitv2ImageFolder) -> type:
    """A non-registered subclass of ``base`` whose tfds name (and so its directory) is ``name``."""
    return types.new_class(name, (base,), {'skip_registration': True},
                           lambda ns: ns.update(name=name, __module__=__name__))


PREPARATION_FILE = 'beitv2_preparation.json'  # next to dataset_info.json: source folder and skipped images


def preparation_record(name: str, data_dir: str | os.PathLike | None = None) -> dict:
    """``{'src': ..., 'num_bad_images': n, 'bad_images': [first names]}`` of a prepared folder dataset ({} if
    none was recorded)."""
    path = storage.join(_resolve(data_dir), name, str(Beitv2ImageFolder.VERSION), PREPARATION_FILE)
    return storage.read_json(path) if storage.exists(path) else {}


def prepare_image_folder(src_dir: str, data_dir: str | os.PathLike | None = None,
                         name: str = IMAGE_FOLDER_NAME, overwrite: bool = False, verify: bool = True,
                         unlabeled: bool = False, holdout: float = 0.0, seed: int = 0) -> str:
    """Converts an image folder into the array_record tfds dataset ``name`` in ``data_dir``.

    A folder with ``images/`` and ``annotations/`` sub-folders is a segmentation folder
    (:func:`scan_segmentation_folder`: records ``image``, ``segmentation``, ``file_name``); any other is a
    classification folder (:func:`scan_image_folder`: ``image``, ``label``, ``file_name``; no ``label`` for a
    folder of images without class sub-folders or with ``unlabeled``; ``holdout`` > 0: a seeded stratified
    ``val`` split of that fraction of the images, recorded with ``seed`` in ``PREPARATION_FILE``).
    ``name`` must be a tfds-style name (lower case, digits, underscores). If ``name`` is already prepared there
    from the same folder, nothing is done; from another folder, ``ValueError`` unless ``overwrite`` (then it is
    rebuilt). With ``verify`` every image (and label map) is decoded once: the records that cannot be are left out,
    counted and named (the first ``MAX_NAMED_BAD_IMAGES``) in the log and in ``PREPARATION_FILE``. Returns the
    dataset directory ``data_dir/name/1.0.0``.
    """
    if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
        raise ValueError(f'dataset name {name!r} must match [a-z][a-z0-9_]* (lower case, digits, underscores)')
    src = os.path.realpath(os.path.expanduser(src_dir))
    if not os.path.isdir(src):
        raise FileNotFoundError(f'--src {src_dir} is not a folder')
    data_dir = _resolve(data_dir)
    out_dir = storage.join(data_dir, name, str(Beitv2ImageFolder.VERSION))
    remote = storage.is_remote(data_dir)
    segmentation = is_segmentation_folder(src)
    if segmentation and (unlabeled or holdout):
        raise ValueError(f'--unlabeled and --holdout are for classification folders; {src} is a segmentation '
                         f'folder (images/ and annotations/)')
    how = {} if segmentation else {'unlabeled': unlabeled, 'holdout': holdout, 'seed': seed}
    with contextlib.nullcontext() if remote else _file_lock(data_dir):
        if storage.exists(storage.join(out_dir, 'dataset_info.json')):
            record = preparation_record(name, data_dir)
            before = record.get('src')
            before_how = {k: record.get(k, v) for k, v in (('unlabeled', False), ('holdout', 0.0), ('seed', 0))}
            same_how = segmentation or before_how == how
            if before is None or (before == src and same_how):  # None: prepared before sources were recorded
                return out_dir
            if not overwrite:
                what = (f'from {before}, not {src}' if before != src else
                        f'with {before_how}, not {how}')
                raise ValueError(f'dataset {name!r} in {data_dir} was prepared {what}; pass --overwrite to rebuild '
                                 f'it, or choose another --name')
            storage.rmtree(storage.join(data_dir, name))
        builders = []
        base = Beitv2SegmentationFolder if segmentation else Beitv2ImageFolder

        def build(builder_data_dir: str):
            builders.append(_folder_builder_class(name, base)(src_dir=src, data_dir=builder_data_dir,
                                                              file_format='array_record', verify=verify, **how))
            return builders[-1]

        if remote:  # prepared in a local temporary data_dir, then uploaded
            _prepare_and_upload(build, data_dir)
        else:
            _prepare(build(data_dir))
        bad = builders[0].bad_images
        sizes = {split: len(items) for split, items in builders[0]._splits.items()}  # pylint: disable=protected-access
        storage.write_json(storage.join(out_dir, PREPARATION_FILE),
                           {'src': src, 'verified': verify, 'num_bad_images': len(bad),
                            'bad_images': bad[:MAX_NAMED_BAD_IMAGES], **how,
                            'holdout_split': HOLDOUT_SPLIT if holdout else None,
                            'scanned_split_sizes': sizes}, indent=2)
    if bad:
        shown = ', '.join(bad[:MAX_NAMED_BAD_IMAGES]) + (', ...' if len(bad) > MAX_NAMED_BAD_IMAGES else '')
        logging.warning('left out %d image(s) of %s that cannot be decoded: %s', len(bad), src, shown)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Segmentation folders: <src>/images/<split>/<file> + <src>/annotations/<split>/<stem>.png.
# ----------------------------------------------------------------------------------------------

SEG_IMAGES_DIR, SEG_ANNOTATIONS_DIR = 'images', 'annotations'
_SEG_SPLIT_NAMES = {'training': 'train'}  # ADEChallengeData2016 folder name → tfds split name


def is_segmentation_folder(src_dir: str) -> bool:
    """Whether ``src_dir`` has the segmentation layout (``images/`` and ``annotations/`` sub-folders)."""
    return all(os.path.isdir(os.path.join(src_dir, d)) for d in (SEG_IMAGES_DIR, SEG_ANNOTATIONS_DIR))


def scan_segmentation_folder(src_dir: str) -> dict[str, list[tuple[str, str]]]:
    """``{split: [(image_path, label_map_path), ...]}`` for ``<src>/images/<split>/...`` and
    ``<src>/annotations/<split>/...`` (label maps matched by relative path without extension; ``training`` is
    named ``train``). Without split sub-folders everything is the ``train`` split.

    Raises:
      ValueError: no images, or images without a label map (the first few are named).
    """
    images_root = os.path.join(src_dir, SEG_IMAGES_DIR)
    labels_root = os.path.join(src_dir, SEG_ANNOTATIONS_DIR)
    split_dirs = _subdirs(images_root) or ['']
    splits = {}
    for split_dir in split_dirs:
        image_dir = os.path.join(images_root, split_dir)
        label_dir = os.path.join(labels_root, split_dir)
        labels = {os.path.splitext(os.path.relpath(p, label_dir))[0]: p
                  for p in (_list_images(label_dir) if os.path.isdir(label_dir) else [])}
        pairs, missing = [], []
        for path in _list_images(image_dir):
            stem = os.path.splitext(os.path.relpath(path, image_dir))[0]
            (pairs.append((path, labels[stem])) if stem in labels else missing.append(stem))
        if missing:
            raise ValueError(f'{len(missing)} images in {image_dir} have no label map in {label_dir} '
                             f'(e.g. {missing[:3]})')
        if not pairs:
            raise ValueError(f'No images with extensions {IMAGE_EXTENSIONS} found in {image_dir}.')
        splits[_SEG_SPLIT_NAMES.get(split_dir, split_dir or 'train')] = pairs
    return splits


class Beitv2SegmentationFolder(_LocalBuilder, skip_registration=True):
    """Images with per-pixel label maps; ``image`` and ``segmentation`` hold the encoded file bytes."""

    name = 'beitv2_segmentation_folder'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}

    def __init__(self, *, src_dir: str, verify: bool = True, **kwargs):
        self._src_dir = os.path.expanduser(src_dir)
        self._splits = scan_segmentation_folder(self._src_dir)
        self._verify = verify
        self.bad_images: list[str] = []  # records skipped because the image or its label map cannot be decoded
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f'Segmentation folder {self._src_dir}',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Tensor(shape=(), dtype=np.object_),
                'segmentation': tfds.features.Tensor(shape=(), dtype=np.object_),
                'file_name': tfds.features.Tensor(shape=(), dtype=np.object_),
            }),
            supervised_keys=('image', 'segmentation'),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(items) for split, items in self._splits.items()}

    def _generate_examples(self, items: list[tuple[str, str]]):
        for image_path, label_path in items:
            rel = os.path.relpath(image_path, self._src_dir)
            with open(image_path, 'rb') as f, open(label_path, 'rb') as g:
                image, label = f.read(), g.read()
            if self._verify and not _decodable(image, label):
                self.bad_images.append(rel)
                continue
            yield rel, {'image': image, 'segmentation': label, 'file_name': rel}


# ----------------------------------------------------------------------------------------------
# Opening sources.
# ----------------------------------------------------------------------------------------------


def _not_prepared_error(name: str, data_dir: str) -> FileNotFoundError:
    base_name = name.split('/')[0].split(':')[0]
    if base_name == 'scene_parse150':
        how = (f'tfds build scene_parse150 --data_dir={data_dir} --file_format=array_record   (needs TensorFlow '
               f'once: pip install ".[prepare]"), or the ADEChallengeData2016 folder: python -m '
               f'beitv2_jax.data.sources prepare-folder --src ADEChallengeData2016 --data_dir {data_dir} --name ade20k')
    elif base_name == 'ade20k':
        how = (f'python -m beitv2_jax.data.sources prepare-folder --src ADEChallengeData2016 --data_dir {data_dir} '
               f'--name ade20k   (the unzipped ADEChallengeData2016.zip: images/ and annotations/)')
    elif base_name == 'imagenet2012':
        how = (f'tfds build imagenet2012 --manual_dir=<dir with ILSVRC2012_img_*.tar> '
               f'--data_dir={data_dir} --file_format=array_record   (needs TensorFlow once: '
               f'pip install ".[prepare]")')
    else:
        how = (f'python -m beitv2_jax.data.sources prepare-folder --src <image folder> '
               f'--data_dir {data_dir} --name {name}')
    return FileNotFoundError(
        f'Dataset {name!r} is not prepared in data_dir={data_dir!r}. Build it with:\n  {how}')


def resolve_split(split: str, available: Sequence[str]) -> str:
    """The split of ``available`` that ``split`` names. A held-out name (``EVAL_SPLIT_NAMES``: validation, val,
    test) that the dataset lacks resolves to the only held-out split it has (a recipe's ``validation`` reads a
    prepared folder's ``val``); a tfds slice (``train[:90%]``) keeps its slice.

    Raises:
      ValueError: one line naming the split, the candidates (ambiguous) or the splits there are (missing).
    """
    base, bracket, rest = split.partition('[')
    if base in available or '+' in split:
        return split
    candidates = [s for s in EVAL_SPLIT_NAMES if s in available] if base in EVAL_SPLIT_NAMES else []
    if len(candidates) == 1:
        if (base, candidates[0]) not in _RESOLVED_SPLITS:
            _RESOLVED_SPLITS.add((base, candidates[0]))
            logging.info('split %r is not in the dataset: reading its only held-out split %r', base, candidates[0])
        return candidates[0] + bracket + rest
    if candidates:
        raise ValueError(f'split {base!r} is ambiguous: the dataset has {", ".join(candidates)}; name one of them')
    raise ValueError(f'split {base!r} does not exist; the dataset has {", ".join(sorted(available)) or "none"}')


_RESOLVED_SPLITS: set = set()


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The prepared builder of ``name`` in (resolved) ``data_dir`` (demo sets generated on first use)."""
    if name == DEMO_NAME:
        ensure_demo_dataset(data_dir)
        return Beitv2Demo(data_dir=data_dir)
    if name == DEMO_SEG_NAME:
        ensure_demo_seg_dataset(data_dir)
        return Beitv2DemoSeg(data_dir=data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise _not_prepared_error(name, data_dir) from None
    if not builder.is_prepared():
        raise _not_prepared_error(name, data_dir)
    return builder


def has_labels(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether the prepared dataset ``name`` has a ``label`` feature (an unlabelled image folder has none)."""
    return 'label' in _builder(name, _resolve(data_dir)).info.features


def open_source(name: str, split: str, data_dir: str | os.PathLike | None = None):
    """Returns the random-access data source (``len`` + ``__getitem__`` of feature dicts).

    ``beitv2_demo`` is generated on first use. ``imagenet2012`` must have been prepared beforehand
    (``tfds build imagenet2012 --manual_dir=... --file_format=array_record``; that step needs
    TensorFlow, reading does not). Folder datasets are read from their files on disk.

    ``split`` is resolved by :func:`resolve_split` (``validation`` reads ``val`` when that is the only held-out
    split).

    Raises:
      FileNotFoundError: naming the dataset, the data_dir and the command to build it.
      ValueError: a split that does not exist or is ambiguous (one line).
    """
    builder = _builder(name, _resolve(data_dir))
    return builder.as_data_source(split=resolve_split(split, list(builder.info.splits)))


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m beitv2_jax.data.sources')
    commands = parser.add_subparsers(dest='command', required=True)
    folder = commands.add_parser('prepare-folder', help='convert an image folder to a tfds dataset')
    folder.add_argument('--src', required=True, help='folder of class sub-folders, or of images '
                        '(unlabelled), either one optionally under split folders train/val/test, or a '
                        'segmentation folder with images/<split>/ and annotations/<split>/')
    folder.add_argument('--data_dir', default=None, help='tfds data_dir (default $TFDS_DATA_DIR)')
    folder.add_argument('--name', default=IMAGE_FOLDER_NAME, help='dataset name to create')
    folder.add_argument('--overwrite', action='store_true',
                        help='rebuild NAME when it was prepared from another --src')
    folder.add_argument('--unlabeled', action='store_true',
                        help='every image under --src (sub-folders included) without labels, for self-supervised '
                        'pretraining (a folder with images directly in it and no sub-folders is read so anyway)')
    folder.add_argument('--holdout', type=float, default=0.0,
                        help='fraction of the images moved into a "val" split (stratified by class, seeded by '
                        '--seed) when the folder has no split folders of its own; 0 = none')
    folder.add_argument('--seed', type=int, default=0, help='seed of the --holdout draw')
    folder.add_argument('--skip_verify', action='store_true',
                        help='do not decode every image once at preparation (bad ones are then skipped in training)')
    demo = commands.add_parser('prepare-demo', help='generate the built-in demo datasets (classes and masks)')
    demo.add_argument('--data_dir', default=None)
    args = parser.parse_args(argv)
    if args.command == 'prepare-folder':
        try:
            out_dir = prepare_image_folder(args.src, args.data_dir, name=args.name, overwrite=args.overwrite,
                                           verify=not args.skip_verify, unlabeled=args.unlabeled,
                                           holdout=args.holdout, seed=args.seed)
        except (ValueError, OSError) as e:
            print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
            sys.exit(2)
        record = preparation_record(args.name, args.data_dir)
        if record.get('num_bad_images'):
            print(f"{record['num_bad_images']} image(s) could not be decoded and were left out: "
                  f"{', '.join(record['bad_images'])}", file=sys.stderr)
        sizes = ', '.join(f'{k} {v}' for k, v in record.get('scanned_split_sizes', {}).items())
        unlabelled = 'unlabeled' in record and not has_labels(args.name, args.data_dir)
        print(f"{args.name}: {sizes} images{' (unlabelled)' if unlabelled else ''}", file=sys.stderr)
        print(out_dir)
    else:
        ensure_demo_dataset(args.data_dir)
        ensure_demo_seg_dataset(args.data_dir)
        print(storage.join(_resolve(args.data_dir), DEMO_NAME))
        print(storage.join(_resolve(args.data_dir), DEMO_SEG_NAME))


if __name__ == '__main__':
    # Run from the importable module so builder classes have a package path (tfds needs it).
    from beitv2_jax.data import sources as _sources  # pylint: disable=import-self
    _sources._main()  # pylint: disable=protected-access
