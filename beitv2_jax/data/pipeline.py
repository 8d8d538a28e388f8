"""Grain input pipelines: per-process shard → shuffle per epoch → repeat → augment → batch.

All transformations are index-based ``MapDataset`` steps applied before ``to_iter_dataset``, so a
batch depends only on (seed, global batch index, process_index, process_count): the same with 0 or N
prefetch worker processes. The iterators' state is the global batch index (``{'next_batch': k}``), so a
run resumes exactly from ``iterator.get_state()`` with another ``num_workers`` or process count.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from typing import Any, Mapping

from absl import flags
import grain
import ml_collections
import numpy as np

from beitv2_jax.data import sources, transforms


def default_data_config() -> ml_collections.ConfigDict:
    """Data settings of the BEiT v2 ViT-B/16 pretraining recipe (reference §2.3, §2.4)."""
    config = ml_collections.ConfigDict()
    config.dataset = sources.DEMO_NAME  # 'beitv2_demo' | 'imagenet2012' | a prepared folder name
    # None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
    config.data_dir = ml_collections.config_dict.placeholder(str)
    config.train_split = 'train'
    config.eval_split = 'test'  # 'validation' for imagenet2012
    config.input_size = 224  # backbone view, pixels
    config.second_input_size = 224  # tokenizer view, pixels
    config.patch_size = 16
    config.num_masked_patches = 75
    config.min_mask_patches_per_block = 16
    config.max_mask_patches_per_block = ml_collections.config_dict.placeholder(int)  # None: no cap
    config.min_crop_scale = 0.2  # pretraining crop scale range (min_crop_scale, 1)
    config.tokenizer_min_crop_scale = 0.08  # VQ-KD training crop scale range
    config.color_jitter = 0.4  # brightness = contrast = saturation strength; 0 disables
    config.interpolation = 'bicubic'
    config.second_interpolation = 'bicubic'
    config.eval_crop_pct = 0.875
    config.num_workers = 8  # grain prefetch processes per host; 0 = in the main process
    config.read_threads = 4  # threads per process, each building whole batches
    config.prefetch_batches = 4  # batches buffered per process
    return config


def _stream_seeds(seed: int, process_index: int) -> tuple[int, int]:
    """Two independent uint32 seeds (shuffle, augmentation) for this process."""
    shuffle_seed, map_seed = np.random.SeedSequence([seed, process_index]).generate_state(2)
    return int(shuffle_seed), int(map_seed)


def _ensure_absl_flags_parsed() -> None:
    """grain's ``mp_prefetch`` reads an absl flag; outside ``absl.app.run`` mark flags as parsed."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the pid now belongs to another user's process
        return False
    return True


def _exit_with_parent(training_pid: int, worker_index: int, worker_count: int) -> None:
    """grain worker start-up: a daemon thread ends this worker (within ~0.5 s) once the training process is gone;
    killed with SIGKILL, it cannot stop its workers, which would otherwise live on holding memory. Checked both ways:
    this worker was re-parented (its parent exited) or the training process no longer exists. Ctrl-C in a terminal
    reaches the whole process group: workers ignore it, the training process saves a checkpoint and stops them."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent or not _process_alive(training_pid):
                os._exit(0)  # pylint: disable=protected-access  (nothing to clean up: the consumer is gone)

    threading.Thread(target=watch, name='exit-with-parent', daemon=True).start()


def make_dataset(source, *, transform, global_batch_size: int, process_index: int,
                 process_count: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = True,
                 num_workers: int = 0, read_threads: int = 4, prefetch_batches: int = 4) -> BatchStream:
    """Builds this process's slice of the global batch stream.

    One global stream is defined identically on every process: shuffle (per epoch, ``seed``) → repeat →
    augment (each record's generator is keyed by its *global* position) → global batches of
    ``global_batch_size``. Process ``i`` of ``P`` yields rows ``[i·b, (i+1)·b)`` of every global batch
    (``b = global_batch_size / P``) and computes only those. So the global batch — content and augmentation —
    is the same for any process count, and the result does not depend on the worker count.

    With ``drop_remainder=False`` (one pass for evaluation) the data are padded by repeating the last record
    to a whole number of global batches, and every record carries ``valid`` (False on padding).

    Args:
      source: random-access source (``len`` + ``__getitem__``), e.g. from ``sources.open_source``.
      transform: ``grain.transforms.RandomMap`` (per-record generator), ``grain.transforms.Map`` or a callable.
      global_batch_size: batch over all processes.
      process_index, process_count: this host's slice.
      seed: pipeline seed (shuffle order per epoch and augmentation).
      shuffle: reshuffle every epoch.
      num_epochs: None repeats forever.
      drop_remainder: drop a final partial global batch (else pad it, see above).
      num_workers: grain prefetch processes (0: in this process).
      read_threads, prefetch_batches: per-process threads and buffered batches.

    Returns:
      ``BatchStream`` of batches (dicts of numpy arrays with a leading batch axis of ``b``); its iterators
      save and restore ``{'next_batch': k}``.
    """
    if global_batch_size % process_count:
        raise ValueError(f'global_batch_size={global_batch_size} is not divisible by '
                         f'process_count={process_count}.')
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
    if len(source) == 0:
        raise ValueError('the dataset is empty')
    shuffle_seed, map_seed = _stream_seeds(seed, 0)  # the same on every process: one global stream
    ds = grain.MapDataset.source(source)
    num_records = len(ds)
    padded = num_records
    if not drop_remainder:
        if shuffle:
            raise ValueError('drop_remainder=False (padded evaluation pass) needs shuffle=False')
        padded = -(-num_records // global_batch_size) * global_batch_size
        ds = grain.MapDataset.range(padded).map(lambda i: source[min(i, num_records - 1)])
    if shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat(num_epochs)
    if isinstance(transform, grain.transforms.RandomMap):
        ds = ds.random_map(transform, seed=map_seed)
    else:
        ds = ds.map(transform)
    if not drop_remainder:
        ds = ds.map_with_index(lambda i, x: {**x, 'valid': np.bool_(i % padded < num_records)})
    local = global_batch_size // process_count
    ds = ds.batch(local, drop_remainder=True)
    ds = ds[process_index::process_count]
    read_options = grain.ReadOptions(num_threads=read_threads,
                                     prefetch_buffer_size=max(prefetch_batches, read_threads))
    return BatchStream(ds, read_options, num_workers)


NEXT_BATCH = 'next_batch'


class BatchStream:
    """This process's batches: batch ``k`` is its rows of global batch ``k``. Iterable (like a
    ``grain.IterDataset``); ``iter()`` gives a ``BatchIterator``."""

    def __init__(self, batches: grain.MapDataset, read_options: grain.ReadOptions, num_workers: int):
        self._batches = batches
        self._read_options = read_options
        self._num_workers = num_workers

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self)

    def __len__(self) -> int:
        """This process's number of batches (``sys.maxsize`` for an endless stream)."""
        return len(self._batches)

    def open(self, start: int) -> grain.DatasetIterator:
        """A grain iterator from batch ``start`` on: the map dataset is sliced before ``to_iter_dataset``
        (O(1): nothing before ``start`` is read), then prefetched by ``num_workers`` processes if > 0."""
        ds = self._batches[start:].to_iter_dataset(self._read_options)
        if self._num_workers > 0:
            _ensure_absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers),
                                worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
        return iter(ds)


class BatchIterator:
    """Iterator over a ``BatchStream`` whose state is the number of global batches consumed,
    ``{'next_batch': k}``: the same on every process and for any ``num_workers``, so a checkpoint restores
    into a run with another worker or process count (same global batch size, seed and data). The grain
    iterator (and its worker processes) starts at the first ``next``; ``set_state`` restarts it there."""

    def __init__(self, stream: BatchStream, next_batch: int = 0):
        self._stream = stream
        self._next_batch = next_batch
        self._grain_iterator = None

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict:
        if self._grain_iterator is None:
            self._grain_iterator = self._stream.open(self._next_batch)
        batch = next(self._grain_iterator)
        self._next_batch += 1
        return batch

    def __len__(self) -> int:
        """The batches left (of a finite stream, e.g. one evaluation pass; ``sys.maxsize`` when endless)."""
        return max(len(self._stream) - self._next_batch, 0)

    def get_state(self) -> dict[str, int]:
        return {NEXT_BATCH: self._next_batch}

    def set_state(self, state: Mapping[str, Any]) -> None:
        next_batch = batches_consumed(state)
        self.close()
        self._next_batch = next_batch

    def close(self) -> None:
        """Stop the grain iterator and its prefetch processes (the next ``next`` starts them again)."""
        if self._grain_iterator is not None:
            self._grain_iterator.close()
            self._grain_iterator = None


def batches_consumed(state: Mapping[str, Any]) -> int:
    """The global batch index a saved iterator state points at.

    Reads ``{'next_batch': k}`` and the grain iterator states that checkpoints held before it: ``{'next_index':
    k}`` (``num_workers=0``) and ``mp_prefetch``'s, where worker ``w`` of ``W`` reads ``batches[w::W]`` and has
    consumed ``iterators_in_use_states[w]['next_index']`` of them. Raises ``ValueError`` naming the keys of
    any other state.
    """
    if NEXT_BATCH in state:
        return int(state[NEXT_BATCH])
    if 'next_index' in state:
        return int(state['next_index'])
    if 'iterators_in_use_states' in state:
        return sum(int(worker['next_index']) for worker in state['iterators_in_use_states'])
    raise ValueError(f'unknown data iterator state with keys {sorted(state)}; expected {{"{NEXT_BATCH}": k}}')


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top  (only when the caller did not say)
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def pretrain_transform(data_config: ml_collections.ConfigDict) -> transforms.PretrainTransform:
    """The two-view + mask transform described by ``data_config``."""
    return transforms.PretrainTransform(
        input_size=data_config.input_size,
        second_input_size=data_config.second_input_size,
        patch_size=data_config.patch_size,
        num_masked_patches=data_config.num_masked_patches,
        min_mask_patches_per_block=data_config.min_mask_patches_per_block,
        max_mask_patches_per_block=data_config.max_mask_patches_per_block,
        min_crop_scale=data_config.min_crop_scale,
        color_jitter=data_config.color_jitter,
        interpolation=data_config.interpolation,
        second_interpolation=data_config.second_interpolation,
    )


def _make_iterator(data_config, split, transform, global_batch_size, seed, process_index,
                   process_count, **kwargs) -> BatchIterator:
    process_index, process_count = _process_layout(process_index, process_count)
    source = transforms.DecodedSource(sources.open_source(data_config.dataset, split, data_config.data_dir),
                                      pil=True)  # every transform here starts with decode_image
    ds = make_dataset(source, transform=transform, global_batch_size=global_batch_size,
                      process_index=process_index, process_count=process_count, seed=seed,
                      num_workers=data_config.num_workers, read_threads=data_config.read_threads,
                      prefetch_batches=data_config.prefetch_batches, **kwargs)
    return iter(ds)


def make_pretrain_iterator(data_config: ml_collections.ConfigDict, global_batch_size: int,
                           seed: int, process_index: int | None = None,
                           process_count: int | None = None) -> BatchIterator:
    """Endless pretraining batches ``{'image': uint8 [b, s, s, 3], 'mask': bool [b, (s / patch)**2], 'label':
    i32 [b], 'bad_records': i32 [b]}`` (+ ``'tokenizer_image': uint8 [b, s2, s2, 3]`` when the two views differ,
    see ``transforms.PretrainTransform``; ``data.on_device.pretrain_views`` makes the float views) with
    ``b = global_batch_size / processes``; ``bad_records`` marks rows that replace an undecodable record
    (``transforms.DecodedSource``).

    ``process_index``/``process_count`` default to ``jax.process_index()``/``jax.process_count()``.
    """
    return _make_iterator(data_config, data_config.train_split,
                          transforms.count_bad_records(pretrain_transform(data_config)),
                          global_batch_size, seed, process_index, process_count)


def make_tokenizer_iterator(data_config: ml_collections.ConfigDict, global_batch_size: int,
                            seed: int, process_index: int | None = None,
                            process_count: int | None = None) -> BatchIterator:
    """Endless VQ-KD training batches ``{'image': uint8 [b, s, s, 3], 'label': i32 [b],
    'bad_records': i32 [b]}``."""
    transform = transforms.TokenizerTrainTransform(
        input_size=data_config.input_size, min_crop_scale=data_config.tokenizer_min_crop_scale,
        interpolation=data_config.interpolation)
    return _make_iterator(data_config, data_config.train_split, transforms.count_bad_records(transform),
                          global_batch_size, seed, process_index, process_count)


def make_eval_iterator(data_config: ml_collections.ConfigDict, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       split: str | None = None, drop_remainder: bool = False) -> BatchIterator:
    """One pass over the eval split: ``{'image': uint8 [b, s, s, 3], 'label': i32 [b]}`` (padded passes add
    ``'valid'``).

    Images are resized to ``int(s / eval_crop_pct)`` and centre-cropped; the consumer converts them on device
    (``data.on_device.normalized`` / ``unit_float``).
    """
    transform = transforms.EvalTransform(
        input_size=data_config.input_size, crop_pct=data_config.eval_crop_pct,
        interpolation=data_config.interpolation)
    return _make_iterator(data_config, split or data_config.eval_split, transform,
                          global_batch_size, 0, process_index, process_count, shuffle=False,
                          num_epochs=1, drop_remainder=drop_remainder)


class IteratorState:
    """Serialises a grain iterator's position as JSON bytes (for orbax or a side file).

    ``IteratorState.save(it)`` → bytes; ``IteratorState.restore(it, data)`` moves a freshly built
    iterator (same data, seed and global batch size; any process layout and ``num_workers``) to the saved
    position.
    """

    @staticmethod
    def save(iterator: BatchIterator) -> bytes:
        return json.dumps(iterator.get_state()).encode('utf-8')

    @staticmethod
    def restore(iterator: BatchIterator, data: bytes | str) -> BatchIterator:
        state: dict[str, Any] = json.loads(data)
        iterator.set_state(state)
        return iterator
