"""The command line: ``python -m beitv2_jax.bench`` (flags, CPU pinning, JSON output)."""
from __future__ import annotations

import os

from beitv2_jax.bench.pipeline import bench_input_pipeline, bench_pipeline_before_after, format_pipeline
from beitv2_jax.bench.run import format_report, run_bench
from beitv2_jax.bench.torch_ref import TORCH_COMPILE_MODES
from beitv2_jax.bench.workloads import stage_config

# ----------------------------------------------------------------------------------------------- CLI
def pin_cpus(n: int) -> list:
    """Restrict this process to its first ``n`` allowed CPUs. XLA sizes its CPU thread pool from the affinity mask
    when the backend starts, and torch's OpenMP pool likewise, so call this before the first JAX computation."""
    cpus = sorted(os.sched_getaffinity(0))[:n]
    os.sched_setaffinity(0, cpus)
    return cpus


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/<name>.py (a pretrain, vqkd or demo config).",
                                    lock_config=True)
    flags.DEFINE_string("stage", None, "For configs/demo.py: which stage to benchmark (pretrain | vqkd).")
    flags.DEFINE_integer("batch", 0, "Global batch size (0 = config.batch_size).")
    flags.DEFINE_integer("steps", 10, "Steps per timed window.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
    flags.DEFINE_integer("repeats", 3, "Timed windows (interleaved with the PyTorch runs); the median is reported.")
    flags.DEFINE_enum("compare", None, ["torch"], "Also time the same architecture in PyTorch.")
    flags.DEFINE_bool("torch_compile", True, "With --compare torch: also time torch.compile.")
    flags.DEFINE_enum("torch_compile_mode", "max-autotune", list(TORCH_COMPILE_MODES),
                      "torch.compile(mode=...) for the PyTorch reference (printed with its other settings).")
    flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = torch's default).")
    flags.DEFINE_integer("cpu_threads", 0, "Pin this process to its first N CPUs before JAX starts, so XLA's and "
                         "torch's thread pools both use N threads (0 = all; use 1 on a shared machine).")
    flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per chip for MFU (0 = from the device table).")
    flags.DEFINE_bool("input_pipeline", True, "Also time the grain input pipeline alone.")
    flags.DEFINE_bool("pipeline_only", False, "Only time the input pipeline (no model is built or compiled).")
    flags.DEFINE_integer("pipeline_batches", 8, "Batches timed for the input pipeline.")
    flags.DEFINE_bool("pipeline_reference", True, "With --pipeline_only (pretrain): also time the pipeline as it was "
                      "before uint8 on the wire (host float32 views, colour jitter on the whole image) in the same run.")
    flags.DEFINE_integer("pipeline_workers", -1, "grain worker processes for the pipeline timing (-1 = config).")
    flags.DEFINE_integer("frozen_width", 0, "Tokenizer/teacher width (0 = official ViT-B/16 or the demo's).")
    flags.DEFINE_integer("frozen_depth", 0, "Tokenizer/teacher depth (0 = default).")
    flags.DEFINE_integer("frozen_heads", 0, "Tokenizer/teacher heads (0 = default).")
    flags.DEFINE_string("frozen_dtype", None, "Tokenizer/teacher compute dtype (default: config.dtype).")
    flags.DEFINE_bool("precision", False, "Also report the step's matmul dtypes and state dtypes (jaxpr).")
    flags.DEFINE_bool("trace_only", False, "Only trace the step on abstract shapes: analytic FLOPs + precision "
                      "report, nothing compiled or timed.")
    flags.DEFINE_integer("profile_top", 0, "Also trace a few steps with jax.profiler and print this many most "
                         "costly ops (device kernels on GPU/TPU, XLA:CPU ops on CPU).")
    flags.DEFINE_string("json", None, "Also write the result dict as JSON to this path.")


def main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None:
        raise SystemExit("error: --config is required, e.g. --config configs/demo.py --stage pretrain")
    if FLAGS.cpu_threads > 0:
        pin_cpus(FLAGS.cpu_threads)
    if FLAGS.compare == "torch":
        # JAX would otherwise take 75% of GPU memory up front and leave PyTorch too little (read at backend start).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if FLAGS.pipeline_only:
        config = stage_config(FLAGS.config, FLAGS.stage)
        timing = bench_pipeline_before_after if FLAGS.pipeline_reference else bench_input_pipeline
        result = timing(config, FLAGS.batch or config.batch_size, FLAGS.pipeline_batches,
                        None if FLAGS.pipeline_workers < 0 else FLAGS.pipeline_workers)
        result.update(task=config.task, batch_size=FLAGS.batch or config.batch_size)
        print(format_pipeline(result))
    else:
        result = run_bench(FLAGS.config, stage=FLAGS.stage, batch_size=FLAGS.batch, steps=FLAGS.steps,
                           warmup=FLAGS.warmup, repeats=FLAGS.repeats, compare_torch=FLAGS.compare == "torch",
                           torch_compile=FLAGS.torch_compile, torch_threads=FLAGS.torch_threads or FLAGS.cpu_threads,
                           peak=FLAGS.peak_tflops,
                           input_pipeline=FLAGS.input_pipeline, pipeline_batches=FLAGS.pipeline_batches,
                           pipeline_workers=None if FLAGS.pipeline_workers < 0 else FLAGS.pipeline_workers,
                           frozen_width=FLAGS.frozen_width, frozen_depth=FLAGS.frozen_depth,
                           frozen_heads=FLAGS.frozen_heads, frozen_dtype=FLAGS.frozen_dtype, precision=FLAGS.precision,
                           trace_only=FLAGS.trace_only, torch_compile_mode=FLAGS.torch_compile_mode,
                           profile_top=FLAGS.profile_top)
        print(format_report(result))
    if FLAGS.json:
        from beitv2_jax import storage

        storage.write_json(FLAGS.json, result, indent=1, default=str)
