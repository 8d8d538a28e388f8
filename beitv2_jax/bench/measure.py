"""Measuring a compiled JAX step: the jaxpr precision report, XLA cost/memory analysis, peak FLOP/s per chip and
the timed-window runner."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.bench.workloads import Workload

# Dense bf16 peak TFLOP/s per chip, matched against ``device.device_kind`` (first matching substring wins).
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0), ("L4", 121.0), ("A10G", 70.0),
    ("V100", 125.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v4", 275.0), ("TPU v6", 918.0),
)

# ----------------------------------------------------------------------------------------------- jaxpr inspection
def _subjaxprs(params: dict):
    for value in params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def _walk_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _subjaxprs(eqn.params):
            yield from _walk_eqns(sub)


def _matmul_flops(eqn) -> float:
    out = eqn.outvars[0].aval
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        return 2.0 * np.prod(out.shape) * np.prod([lhs.shape[i] for i in lhs_contract])
    # Each output element is a dot over one output feature's kernel slice (rhs.size / out_features terms).
    out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * np.prod(out.shape) * np.prod(rhs.shape) / out_features


def precision_report(step: Callable, *args) -> dict:
    """What a step computes in which dtype, from its jaxpr: matmul FLOPs by (input dtypes → output dtype,
    precision), the dtypes of params / optimizer state / model state / metrics, and of the loss.

    Returns ``{'matmuls': {label: {'count', 'flops'}}, 'matmul_flops', 'bf16_matmul_fraction', 'state_dtypes':
    {'params'|'opt_state'|'model_state'|'extra': sorted dtype names}, 'metric_dtypes': {name: dtype}}``.
    """
    closed = jax.make_jaxpr(step)(*args)
    matmuls: dict = {}
    total = bf16 = 0.0
    for eqn in _walk_eqns(closed.jaxpr):
        if eqn.primitive.name not in ("dot_general", "conv_general_dilated"):
            continue
        ins = "x".join(str(v.aval.dtype) for v in eqn.invars[:2])
        prec = eqn.params.get("precision")
        prec = prec[0] if isinstance(prec, tuple) else prec
        prec_name = "" if prec is None else f" {getattr(prec, 'name', prec)}"
        label = f"{eqn.primitive.name} {ins}->{eqn.outvars[0].aval.dtype}{prec_name}"
        flops = _matmul_flops(eqn)
        entry = matmuls.setdefault(label, {"count": 0, "flops": 0.0})
        entry["count"] += 1
        entry["flops"] += flops
        total += flops
        if all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars[:2]):
            bf16 += flops
    state, _, _ = args
    out_state, metrics = jax.eval_shape(step, *args)
    dtypes = lambda tree: sorted({str(x.dtype) for x in jax.tree.leaves(tree)})  # noqa: E731
    return {"matmuls": matmuls, "matmul_flops": total, "bf16_matmul_fraction": bf16 / total if total else 0.0,
            "state_dtypes": {k: dtypes(getattr(state, k)) for k in ("params", "opt_state", "model_state", "extra")},
            "out_state_dtypes": {k: dtypes(getattr(out_state, k)) for k in ("params", "opt_state", "model_state")},
            "metric_dtypes": {k: str(v.dtype) for k, v in metrics.items()}}


# ----------------------------------------------------------------------------------------------- timing
def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _memory_plan(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def _device_peak_bytes(device) -> Optional[int]:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def peak_tflops(device, override: float = 0.0) -> Optional[float]:
    """Dense bf16 peak of ``device`` in TFLOP/s (``override`` > 0 wins; None for CPUs and unknown chips)."""
    if override and override > 0:
        return float(override)
    kind = getattr(device, "device_kind", "")
    if device.platform == "cpu":
        return None
    for name, value in PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return value
    return None


class JaxRunner:
    """The compiled step with its (donated) state, stepped in timed windows."""

    def __init__(self, work: Workload, mesh):
        from beitv2_jax.train import sharding

        self.replicated = sharding.replicated(mesh)
        self.state = jax.device_put(work.state, self.replicated)
        self.aux = jax.device_put(work.aux, self.replicated)
        self.batch = sharding.to_global_batch(work.batch, mesh)
        jitted = jax.jit(work.step, donate_argnums=0)
        t0 = time.perf_counter()
        lowered = jitted.lower(self.state, self.batch, self.aux)
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.cost = _cost(self.compiled)
        self.memory_plan = _memory_plan(self.compiled)

    def run(self, steps: int) -> float:
        """Run ``steps`` steps, sync once; returns seconds."""
        state = self.state
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = self.compiled(state, self.batch, self.aux)
        jax.block_until_ready((state, metrics))
        dt = time.perf_counter() - t0
        self.state = state
        self.last_metrics = metrics
        return dt


def _summary(times_per_step: list, batch_size: int) -> dict:
    ms = [1000.0 * t for t in times_per_step]
    med = statistics.median(ms)
    return {"step_ms": med, "step_ms_min": min(ms), "step_ms_max": max(ms), "step_ms_all": ms,
            "img_per_s": batch_size / (med / 1000.0), "img_per_s_max": batch_size / (min(ms) / 1000.0)}


# ----------------------------------------------------------------------------------------------- profile
def _trace_events(logdir: str) -> list:
    import glob
    import gzip
    import json

    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"jax.profiler wrote no perfetto trace under {logdir}")
    with gzip.open(paths[-1]) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def top_ops(events: list, steps: int, top: int = 15) -> dict:
    """The ``top`` ops by total time in a perfetto trace of ``steps`` steps: device kernels (GPU/TPU streams) when
    the trace has a device, else XLA:CPU's op thunks (the PjRt CPU client and Eigen threads).

    Returns ``{'where', 'total_ms_per_step', 'ops': [{'name', 'ms_per_step', 'share', 'count'}], 'kinds': [...]}``
    where ``kinds`` sums the ops by name without their ``.N`` suffix (``fusion.12`` → ``fusion``). XLA:CPU's
    enclosing ``ThunkExecutor`` events are not ops (they contain them)."""
    import re

    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") ==
                 "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") ==
               "thread_name"}
    device_pids = {pid for pid, name in processes.items() if name.startswith("/device:")}

    def is_op(e) -> bool:
        if device_pids:
            return e["pid"] in device_pids
        thread = threads.get((e["pid"], e["tid"]), "")
        return ("XLAPjRtCpuClient" in thread or "XLAEigen" in thread) and not e["name"].startswith("ThunkExecutor")

    total: dict = {}
    count: dict = {}
    for e in events:
        if e.get("ph") == "X" and is_op(e):
            total[e["name"]] = total.get(e["name"], 0.0) + float(e.get("dur", 0.0))
            count[e["name"]] = count.get(e["name"], 0) + 1
    all_us = sum(total.values()) or 1.0
    kinds: dict = {}
    kind_count: dict = {}
    for name, us in total.items():
        kind = re.sub(r"\.\d+$", "", name)
        kinds[kind] = kinds.get(kind, 0.0) + us
        kind_count[kind] = kind_count.get(kind, 0) + count[name]

    def rows(table, counts):
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [{"name": name, "ms_per_step": us / 1000.0 / steps, "share": us / all_us,
                 "count": counts[name] // steps} for name, us in ranked]

    return {"where": "device" if device_pids else "XLA:CPU threads", "total_ms_per_step": all_us / 1000.0 / steps,
            "ops": rows(total, count), "kinds": rows(kinds, kind_count)}


def profile_top_ops(runner: JaxRunner, steps: int = 3, top: int = 15, logdir: Optional[str] = None) -> dict:
    """Trace ``steps`` steps of ``runner`` with ``jax.profiler`` (perfetto trace) and return ``top_ops`` of it."""
    import shutil
    import tempfile

    own = logdir is None
    logdir = logdir or tempfile.mkdtemp(prefix="bench_profile_")
    try:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            runner.run(steps)
        result = top_ops(_trace_events(logdir), steps, top)
    finally:
        if own:
            shutil.rmtree(logdir, ignore_errors=True)
    return result
