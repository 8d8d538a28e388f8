"""Training-step benchmark: ``python -m beitv2_jax.bench --config configs/<name>.py [flags] [--config.x=y ...]``.

Builds the configured task's real train step (``pretrain`` or ``vqkd``; for ``configs/demo.py`` one of its stages,
``--stage pretrain|vqkd``) with random weights and a synthetic on-device batch, compiles it once, times
steady-state steps and reports:

* img/s and ms/step (median and spread over ``--repeats`` timed windows of ``--steps`` steps, one device sync per
  window, no host round-trip inside a window);
* model FLOPs per image from XLA's cost analysis of the compiled step, cross-checked with an analytic count of
  the ViT matmuls (and with the matmul FLOPs counted in the step's jaxpr);
* MFU against the device's dense bf16 peak (``PEAK_TFLOPS``; CPU: n/a unless ``--peak_tflops``);
* peak device memory (``device.memory_stats()`` where the backend has it) and XLA's compiled memory plan;
* the input pipeline's img/s alone (grain, the config's data section; synthetic JPEGs if the dataset is absent);
* with ``--compare torch``: the same architecture in PyTorch on the same device in the same run, built from
  ``transformers`` BEiT/CLIP/ViT layers (eager, and ``torch.compile`` unless ``--notorch_compile``; AMP bf16 on
  GPU, fp32 on CPU), timed in windows interleaved with ours, and the ratio.

The frozen network of each task is built with random weights too: the VQ-KD tokenizer for ``pretrain`` and the
teacher for ``vqkd``. Recipe configs get the official ViT-B/16 sizes (every released tokenizer and teacher is a
ViT-B/16), ``configs/demo.py`` stages get the demo's own tokenizer/teacher; ``--frozen_width/--frozen_depth/
--frozen_heads`` override. The VQ-KD codebook starts from random unit vectors and ``kmeans_init`` is off, so the
timed step is the steady-state step (the k-means branch runs once, at step 0, in real training).

The main logic is ``run_bench(config, ...)`` returning a dict; ``format_report`` turns it into the printed table.

Modules: ``workloads`` (the benchmarked steps and analytic FLOPs), ``measure`` (jaxpr precision report, XLA cost,
timed windows), ``pipeline`` (the input pipeline alone), ``torch_ref`` (the PyTorch reference), ``run`` (one run
and its report), ``cli`` (flags).
"""
# The package's API (``from beitv2_jax import bench; bench.run_bench(...)``), as when it was one module.
from beitv2_jax.bench.cli import main, pin_cpus  # noqa: F401
from beitv2_jax.bench.measure import (  # noqa: F401
    PEAK_TFLOPS, JaxRunner, _cost, _device_peak_bytes, _matmul_flops, _memory_plan, _summary, _walk_eqns,
    peak_tflops, precision_report, profile_top_ops, top_ops)
from beitv2_jax.bench.pipeline import SyntheticJpegSource, bench_input_pipeline  # noqa: F401
from beitv2_jax.bench.run import _fmt_bytes, _fmt_flops, _precision_lines, format_report, run_bench  # noqa: F401
from beitv2_jax.bench.torch_ref import (  # noqa: F401
    TORCH_COMPILE_MODES, TorchRunner, _torch_modules, torch_problem, torch_settings, torch_train_step)
from beitv2_jax.bench.workloads import (  # noqa: F401
    TASKS, FrozenArch, Workload, _encoder_only, _materialise, _random_codebook, _synthetic_mask, analytic_pretrain,
    analytic_vqkd, build_pretrain, build_teacher, build_vqkd, dense_flops, frozen_arch, stage_config,
    vit_blocks_flops)
