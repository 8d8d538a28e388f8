"""The input pipeline alone (grain, decode + augment + mask + batch), host side."""
from __future__ import annotations

import io
import time
from typing import Optional

import ml_collections
import numpy as np

# ----------------------------------------------------------------------------------------------- input pipeline
class SyntheticJpegSource:
    """``num`` random-noise JPEGs of ``height × width`` (ImageNet's typical 500×375), as encoded bytes records.

    Used when the config's dataset is not prepared on this machine, so the decode + augment cost stays realistic.
    """

    def __init__(self, num: int = 64, height: int = 375, width: int = 500, seed: int = 0):
        from PIL import Image

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
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index % len(self.records)]


def bench_input_pipeline(config: ml_collections.ConfigDict, batch_size: int, num_batches: int = 8,
                         num_workers: Optional[int] = None) -> dict:
    """Batches/s of the task's grain pipeline alone (decode, two-view augment, mask, batch), host side only.

    ``num_workers`` overrides ``config.data.num_workers``. The first batch (worker start-up) is not timed.
    """
    from beitv2_jax.data import pipeline, sources, transforms

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
    else:
        transform = transforms.TokenizerTrainTransform(input_size=data.input_size,
                                                       min_crop_scale=data.tokenizer_min_crop_scale,
                                                       interpolation=data.interpolation)
    ds = pipeline.make_dataset(source, transform=transform, global_batch_size=batch_size, process_index=0,
                               process_count=1, seed=0, num_workers=workers, read_threads=data.read_threads,
                               prefetch_batches=data.prefetch_batches)
    it = iter(ds)
    t_start = time.perf_counter()
    next(it)
    first = time.perf_counter() - t_start
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    dt = time.perf_counter() - t0
    del it
    return {"source": source_name, "num_workers": workers, "read_threads": data.read_threads,
            "batches": num_batches, "img_per_s": num_batches * batch_size / dt, "first_batch_s": first}
