"""The input pipeline alone (grain, decode + augment + mask + batch), host side."""
from __future__ import annotations

import dataclasses
import io
import time
from typing import Any, Optional

import grain
import ml_collections
import numpy as np

from beitv2_jax.data import transforms

# ----------------------------------------------------------------------------------------------- input pipeline
IMAGENET_TRAIN_RECORDS = 1_281_167


class SyntheticJpegSource:
    """``length`` records cycling over ``num`` random-noise JPEGs of ``height × width`` (ImageNet's typical
    500×375), as encoded bytes records.

    Used when the config's dataset is not prepared on this machine, so the decode + augment cost stays realistic.
    ``length`` defaults to ImageNet-1k's train split: grain's shuffle (``index_shuffle``) costs per record about
    5 µs at that size but 0.4 ms at 64 records (it walks cycles of a larger permutation), so a 64-record source
    would time an artefact of tiny data sets (docs/benchmarks.md §2.3).
    """

    def __init__(self, num: int = 64, height: int = 375, width: int = 500, seed: int = 0,
                 length: int = IMAGENET_TRAIN_RECORDS):
        from PIL import Image

        self.length = length
        rng = np.random.default_rng(seed)
        self.records = []
        for i in range(num):
            # Upsampled noise compresses like a photo (≈ 55 kB at quality 90; ImageNet averages ≈ 110 kB).
            small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            self.records.append({"image": buf.getvalue(), "label": i % 1000})

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.records[index % len(self.records)]


@dataclasses.dataclass(frozen=True)
class HostFloatReference(grain.transforms.RandomMap):
    """The pretraining transform as it was before uint8 on the wire (the "before" of the benchmark): the official
    order (colour jitter on the whole decoded image, flip it, crop) and both views converted to float32 on the host
    (model view normalised, tokenizer view in [0, 1], shipped as two arrays)."""

    transform: transforms.PretrainTransform

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        official = dataclasses.replace(self.transform, jitter_full_image=True)
        return transforms.host_pretrain_views(official.random_map(element, rng), official.mean, official.std)


def bench_input_pipeline(config: ml_collections.ConfigDict, batch_size: int, num_batches: int = 8,
                         num_workers: Optional[int] = None, reference: bool = False) -> dict:
    """Images/s of the task's grain pipeline alone (decode, two-view augment, mask, batch), host side only.

    ``num_workers`` overrides ``config.data.num_workers``. The first batch (worker start-up) is not timed.
    ``reference=True`` (pretrain only) times ``HostFloatReference`` instead: the pipeline before uint8 on the wire.
    """
    from beitv2_jax.data import pipeline, sources

    data = config.data
    workers = data.num_workers if num_workers is None else num_workers
    try:
        source = sources.open_source(data.dataset, data.train_split, data.data_dir)
        source_name = data.dataset
    except FileNotFoundError:
        source = SyntheticJpegSource()
        source_name = "synthetic 500x375 JPEGs (dataset not prepared here)"
    if config.task == "pretrain":
        transform = pipeline.pretrain_transform(data)
        if reference:
            transform = HostFloatReference(transform)
    else:
        if reference:
            raise ValueError(f"the host-float reference pipeline exists for pretrain only, not {config.task}")
        transform = transforms.TokenizerTrainTransform(input_size=data.input_size,
                                                       min_crop_scale=data.tokenizer_min_crop_scale,
                                                       interpolation=data.interpolation)
    # As the tasks read it (pipeline._make_iterator): decoded records, bad ones replaced and counted. The "before"
    # reference decodes to a numpy copy as the pipeline did before (the transforms then re-wrap it for PIL).
    source = transforms.DecodedSource(source, pil=not reference)
    transform = transforms.count_bad_records(transform)
    ds = pipeline.make_dataset(source, transform=transform, global_batch_size=batch_size, process_index=0,
                               process_count=1, seed=0, num_workers=workers, read_threads=data.read_threads,
                               prefetch_batches=data.prefetch_batches)
    it = iter(ds)
    t_start = time.perf_counter()
    batch = next(it)
    first = time.perf_counter() - t_start
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    dt = time.perf_counter() - t0
    it.close()
    return {"source": source_name, "num_workers": workers, "read_threads": data.read_threads,
            "batches": num_batches, "img_per_s": num_batches * batch_size / dt, "first_batch_s": first,
            "bytes_per_image": sum(np.asarray(v).nbytes for v in batch.values()) // batch_size,
            "path": "host float32, jitter on the whole image" if reference else "uint8, jitter after the crop"}


def bench_pipeline_before_after(config: ml_collections.ConfigDict, batch_size: int, num_batches: int = 8,
                                num_workers: Optional[int] = None) -> dict:
    """``bench_input_pipeline`` of the current pipeline, and for pretrain also of ``HostFloatReference`` in the
    same run (reference first): ``{..., 'reference': {...}, 'speedup': current / reference}``."""
    reference = None
    if config.task == "pretrain":
        reference = bench_input_pipeline(config, batch_size, num_batches, num_workers, reference=True)
    result = bench_input_pipeline(config, batch_size, num_batches, num_workers)
    if reference is not None:
        result.update(reference=reference, speedup=result["img_per_s"] / reference["img_per_s"])
    return result


def format_pipeline(result: dict) -> str:
    """The ``--pipeline_only`` report lines."""
    line = (f"input pipeline alone ({result['task']}, batch {result['batch_size']}): {result['img_per_s']:.1f} img/s "
            f"({result['source']}, {result['num_workers']} workers, {result['read_threads']} threads, "
            f"{result['batches']} batches; first batch {result['first_batch_s']:.1f} s; {result['path']}, "
            f"{result['bytes_per_image'] / 1e3:.0f} kB/image)")
    ref = result.get("reference")
    if ref:
        line += (f"\n  before (same run): {ref['img_per_s']:.1f} img/s ({ref['path']}, "
                 f"{ref['bytes_per_image'] / 1e3:.0f} kB/image) -> speedup {result['speedup']:.2f}x")
    return line
