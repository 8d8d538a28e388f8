"""``run_bench``: one benchmark run (ours, optionally PyTorch eager / torch.compile, the input pipeline) and
``format_report``, the printed table."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import ml_collections

from beitv2_jax.bench.measure import (JaxRunner, _device_peak_bytes, _summary, peak_tflops, precision_report,
                                      profile_top_ops)
from beitv2_jax.bench.pipeline import bench_input_pipeline
from beitv2_jax.bench.torch_ref import TorchRunner, torch_problem
from beitv2_jax.bench.workloads import build_pretrain, build_vqkd, frozen_arch, stage_config
from beitv2_jax.models.vit import resolve_attention_impl
from beitv2_jax.train.tasks.common import compute_dtype

# ----------------------------------------------------------------------------------------------- the bench
def run_bench(config: ml_collections.ConfigDict, *, stage: Optional[str] = None, batch_size: int = 0,
              steps: int = 10, warmup: int = 2, repeats: int = 3, compare_torch: bool = False,
              torch_compile: bool = True, torch_threads: int = 0, peak: float = 0.0, input_pipeline: bool = True,
              pipeline_batches: int = 8, pipeline_workers: Optional[int] = None, frozen_width: int = 0,
              frozen_depth: int = 0, frozen_heads: int = 0, frozen_dtype: Optional[str] = None,
              precision: bool = False, trace_only: bool = False, torch_compile_mode: str = "max-autotune",
              profile_top: int = 0) -> dict:
    """Benchmark one train step; returns a dict of results (see ``format_report`` for the fields).

    ``trace_only``: build the step on abstract shapes and report the analytic FLOPs and the precision report only
    (nothing compiled, allocated or timed: checks a ViT-L bf16 config in seconds on a laptop).
    ``torch_compile_mode``: ``torch.compile(mode=...)`` of the PyTorch reference (its settings: ``torch_settings``).
    ``profile_top`` > 0: also trace our step with ``jax.profiler`` and report its ``profile_top`` most costly ops.
    """
    from beitv2_jax.train import sharding

    root = config
    config = stage_config(config, stage)
    batch_size = batch_size or config.batch_size
    frozen = frozen_arch(config, root, frozen_width, frozen_depth, frozen_heads)
    frozen_dtype = frozen_dtype or config.get("dtype", "float32")
    mesh = sharding.make_mesh(config.get("mesh"))
    dp = sharding.data_parallel_size(mesh)
    if batch_size % dp:
        raise ValueError(f"batch {batch_size} is not divisible by the data-parallel size {dp}")
    build = build_pretrain if config.task == "pretrain" else build_vqkd
    work = build(config, frozen, batch_size, frozen_dtype, abstract=trace_only)
    device = jax.devices()[0]
    result: dict = {
        "task": config.task, "stage": stage, "batch_size": batch_size, "dtype": config.get("dtype", "float32"),
        "frozen_dtype": frozen_dtype, "attention_impl": config.model.get("attention_impl", "auto"),
        "attention_kernel": resolve_attention_impl(config.model.get("attention_impl", "auto"),
                                                   compute_dtype(config.get("dtype", "float32")),
                                                   config.model.width // config.model.num_heads),
        "remat_policy": config.model.get("remat_policy", "none"), "device": device.device_kind,
        "platform": device.platform, "num_devices": jax.device_count(), "jax_version": jax.__version__,
        "num_params": work.num_params, "frozen": dataclasses.asdict(frozen), "frozen_params": work.frozen_params,
        "arch": {k: v for k, v in work.arch.items() if k not in ("optim", "tokenizer", "teacher")},
        "steps": steps, "repeats": repeats, "warmup": warmup, "trace_only": trace_only,
        "flops_per_image_analytic": work.analytic["total"], "analytic_breakdown": work.analytic,
    }
    if precision or trace_only:
        result["precision"] = precision_report(work.step, work.state, work.batch, work.aux)
    if trace_only:
        return result

    ours = JaxRunner(work, mesh)
    result["compile_s"] = ours.compile_s
    # cost_analysis() describes the partitioned per-device program: × devices for the global step.
    flops_xla = float(ours.cost.get("flops", 0.0)) * mesh.devices.size
    result["flops_per_image_xla"] = flops_xla / batch_size if flops_xla else None
    result["xla_over_analytic"] = (result["flops_per_image_xla"] / work.analytic["total"]
                                   if flops_xla else None)
    result["memory_plan"] = ours.memory_plan

    runners = [("jax", ours)]
    torch_device = None
    if compare_torch:
        problem = torch_problem()
        if problem:
            result["torch_error"] = problem
        else:
            import torch

            if device.platform == "gpu" and torch.cuda.is_available():
                torch_device = "cuda"
            elif device.platform == "cpu":
                torch_device = "cpu"
            else:
                result["torch_error"] = f"no PyTorch backend for a {device.platform} device"
        if torch_device:
            result["torch_device"] = torch_device
            result["torch_version"] = torch.__version__
            eager = TorchRunner(work, torch_device, compile_model=False, threads=torch_threads,
                                compile_mode=torch_compile_mode)
            result["torch_settings"] = eager.settings
            result["torch_params"] = eager.num_params
            result["torch_threads"] = torch.get_num_threads()
            runners.append(("torch_eager", eager))
            if torch_compile:
                try:
                    runners.append(("torch_compile", TorchRunner(work, torch_device, compile_model=True,
                                                                 threads=torch_threads,
                                                                 compile_mode=torch_compile_mode)))
                    result["torch_compile_s"] = runners[-1][1].compile_s
                except Exception as e:  # noqa: BLE001 - report, keep the eager numbers
                    result["torch_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"

    for _, runner in runners:
        if warmup:
            runner.run(warmup)
    per_step: dict = {name: [] for name, _ in runners}
    for _ in range(repeats):  # interleaved windows: machine noise hits every contender alike
        for name, runner in runners:
            per_step[name].append(runner.run(steps) / steps)
    for name, _ in runners:
        result[name] = _summary(per_step[name], batch_size)
    result["jax"]["compile_s"] = ours.compile_s
    metrics = jax.device_get(ours.last_metrics)
    result["final_loss"] = float(metrics["loss"])
    result["peak_device_bytes"] = _device_peak_bytes(device)
    if torch_device == "cuda":
        import torch

        result["torch_peak_device_bytes"] = int(torch.cuda.max_memory_allocated())

    pk = peak_tflops(device, peak)
    result["peak_tflops"] = pk
    if pk:
        chips = mesh.devices.size
        for name, _ in runners:  # MFU from the analytic model FLOPs (recomputation under remat not counted)
            achieved = work.analytic["total"] * result[name]["img_per_s"]
            result[name]["mfu"] = achieved / (pk * 1e12 * (chips if name == "jax" else 1))
        if flops_xla:
            result["jax"]["hfu_xla"] = result["flops_per_image_xla"] * result["jax"]["img_per_s"] / (
                pk * 1e12 * chips)
    for name, _ in runners[1:]:
        result[name]["jax_speedup"] = result[name]["step_ms"] / result["jax"]["step_ms"]
    if len(runners) > 1 and mesh.devices.size > 1:
        result["torch_note"] = (f"ours ran on {mesh.devices.size} devices, PyTorch on one: compare with one visible "
                                f"device (CUDA_VISIBLE_DEVICES=0)")
    if profile_top:
        result["profile"] = profile_top_ops(ours, steps=max(1, min(steps, 5)), top=profile_top)
    if input_pipeline:
        try:
            result["input_pipeline"] = bench_input_pipeline(config, batch_size, pipeline_batches, pipeline_workers)
        except Exception as e:  # noqa: BLE001 - the step numbers stand on their own
            result["input_pipeline"] = {"error": f"{type(e).__name__}: {e}"}
    return result


# ----------------------------------------------------------------------------------------------- report
def _fmt_flops(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.0f} FLOP"


def _fmt_bytes(x: Optional[int]) -> str:
    return "n/a" if not x else f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def _precision_lines(p: dict) -> str:
    total = p["matmul_flops"] or 1.0
    rows = [f"precision: {100 * p['bf16_matmul_fraction']:.1f}% of matmul FLOPs in bf16; state dtypes "
            + ", ".join(f"{k} {'/'.join(v) or '-'}" for k, v in p["state_dtypes"].items())
            + f"; metrics {'/'.join(sorted(set(p['metric_dtypes'].values())))}"]
    for label, v in sorted(p["matmuls"].items(), key=lambda kv: -kv[1]["flops"]):
        rows.append(f"  {100 * v['flops'] / total:5.1f}%  x{v['count']:<4d} {label}")
    return "\n".join(rows)


def format_report(r: dict) -> str:
    lines = []
    add = lines.append
    a = r["arch"]
    add(f"task {r['task']}" + (f" (demo stage {r['stage']})" if r.get("stage") else "")
        + f" | batch {r['batch_size']} | compute {r['dtype']} (frozen net {r['frozen_dtype']}) | attention "
          f"{r['attention_impl']}" + (f" (→ {r['attention_kernel']})" if r.get("attention_kernel") not in (
              None, r["attention_impl"]) else "") + f" | remat {r['remat_policy']}")
    add(f"model: ViT width {a['width']} depth {a['depth']} heads {a['num_heads']} patch {a['patch_size']} "
        f"image {a['image_size']} | {r['num_params'] / 1e6:.2f}M trained params | frozen {r['frozen']['kind']} "
        f"width {r['frozen']['width']} depth {r['frozen']['depth']} ({r['frozen_params'] / 1e6:.2f}M params)")
    if r.get("trace_only"):
        p = r["precision"]
        add(f"traced only (nothing compiled or run): analytic matmul FLOPs/image "
            f"{_fmt_flops(r['flops_per_image_analytic'])}, jaxpr matmul FLOPs/image "
            f"{_fmt_flops(p['matmul_flops'] / r['batch_size'])}")
        add(_precision_lines(p))
        return "\n".join(lines)
    add(f"device: {r['device']} ×{r['num_devices']} ({r['platform']}), jax {r['jax_version']}; "
        f"compile {r['compile_s']:.1f} s; timing: {r['repeats']} windows × {r['steps']} steps after "
        f"{r['warmup']} warm-up steps")
    fx, fa = r["flops_per_image_xla"], r["flops_per_image_analytic"]
    add(f"FLOPs/image: XLA cost analysis {_fmt_flops(fx)} | analytic matmuls {_fmt_flops(fa)}"
        + (f" | XLA/analytic {r['xla_over_analytic']:.3f}" if r.get("xla_over_analytic") else ""))
    if "precision" in r:
        p = r["precision"]
        add(f"jaxpr matmul FLOPs/image {_fmt_flops(p['matmul_flops'] / r['batch_size'])}")
        add(_precision_lines(p))
    pk = r.get("peak_tflops")
    add(f"peak: {f'{pk:.0f} TFLOP/s dense bf16 per chip' if pk else 'n/a (CPU: pass --peak_tflops)'}")
    add("")
    add(f"{'':14s} {'step ms (median [min, max])':>30s} {'img/s':>10s} {'MFU':>7s} {'vs ours':>8s}")
    for name in ("jax", "torch_eager", "torch_compile"):
        if name not in r:
            continue
        s = r[name]
        mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a"
        ratio = f"{s['jax_speedup']:.2f}x" if "jax_speedup" in s else "1.00x"
        label = {"jax": "ours (JAX)", "torch_eager": "torch eager", "torch_compile": "torch.compile"}[name]
        add(f"{label:14s} {s['step_ms']:10.1f} [{s['step_ms_min']:.1f}, {s['step_ms_max']:.1f}]".ljust(46)
            + f"{s['img_per_s']:10.1f} {mfu:>7s} {ratio:>8s}")
    if r["jax"].get("hfu_xla") is not None:
        add(f"(MFU from the analytic model FLOPs; from XLA's count of all ops, recomputation included: "
            f"{100 * r['jax']['hfu_xla']:.1f}%)")
    if "torch_device" in r:
        add(f"(torch {r.get('torch_version')} on {r['torch_device']}, {r.get('torch_threads')} threads, "
            f"{r.get('torch_params', 0) / 1e6:.2f}M trained params"
            + (f", torch.compile warm-up {r['torch_compile_s']:.0f} s" if "torch_compile_s" in r else "")
            + "; 'vs ours' = their step time / ours)")
        ts = r.get("torch_settings") or {}
        add("torch settings: " + ", ".join(f"{k} {'/'.join(v) if isinstance(v, list) else v}"
                                           for k, v in ts.items()))
    for key in ("torch_error", "torch_compile_error", "torch_note"):
        if key in r:
            add(f"{key}: {r[key]}")
    add("")
    mp = r.get("memory_plan") or {}
    add(f"memory: device peak {_fmt_bytes(r.get('peak_device_bytes'))}; XLA plan: arguments "
        f"{_fmt_bytes(mp.get('argument_size_in_bytes'))}, temporaries {_fmt_bytes(mp.get('temp_size_in_bytes'))}, "
        f"donated/aliased {_fmt_bytes(mp.get('alias_size_in_bytes'))}"
        + (f"; torch peak {_fmt_bytes(r['torch_peak_device_bytes'])}" if r.get("torch_peak_device_bytes") else ""))
    ip = r.get("input_pipeline")
    if ip:
        if "error" in ip:
            add(f"input pipeline: {ip['error']}")
        else:
            add(f"input pipeline alone: {ip['img_per_s']:.1f} img/s ({ip['source']}, {ip['num_workers']} workers, "
                f"{ip['read_threads']} threads, {ip['batches']} batches)")
    prof = r.get("profile")
    if prof:
        add(f"profile ({prof['where']}, {prof['total_ms_per_step']:.1f} ms of ops per step), top ops:")
        for op in prof["ops"]:
            add(f"  {100 * op['share']:5.1f}%  {op['ms_per_step']:8.2f} ms  x{op['count']:<4d} {op['name'][:100]}")
        add("by kind (op names without their .N suffix):")
        for op in prof["kinds"]:
            add(f"  {100 * op['share']:5.1f}%  {op['ms_per_step']:8.2f} ms  x{op['count']:<4d} {op['name'][:100]}")
    add(f"final loss {r['final_loss']:.4f}")
    return "\n".join(lines)
