"""The step benchmark (``beitv2_jax.bench``): sane numbers on a tiny config, FLOP counts, the bf16 precision policy.

The timing runs use tiny demo-stage models and a handful of steps; the FLOP-count checks of the ViT-B/16 recipes
only trace the step (abstract shapes, nothing compiled or allocated).
"""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, load_config_file

from beitv2_jax import bench


def tiny_demo(stage: str, demo_data_dir=None, **model):
    """configs/demo.py with the ``stage`` model shrunk (compile time on 2 CPU cores is what costs here)."""
    config = load_config_file("demo")
    with config.unlocked():
        if demo_data_dir is not None:
            config.data.data_dir = demo_data_dir
        config[stage].model.update(model)
    return config


# ----------------------------------------------------------------------------------------------- timing runs
def test_bench_pretrain_tiny_numbers_are_sane(demo_data_dir):
    if bench.torch_problem():
        pytest.skip(bench.torch_problem())
    config = tiny_demo("pretrain", demo_data_dir, depth=2, early_layers=1, head_layers=1)
    r = bench.run_bench(config, stage="pretrain", batch_size=8, steps=2, warmup=1, repeats=2, compare_torch=True,
                        torch_compile=False, pipeline_batches=2, frozen_depth=1, precision=True, peak=1.0)
    assert r["task"] == "pretrain" and r["platform"] == "cpu"
    for name in ("jax", "torch_eager"):
        s = r[name]
        assert s["img_per_s"] > 0 and s["step_ms"] > 0 and s["step_ms_min"] <= s["step_ms"] <= s["step_ms_max"]
        assert math.isclose(s["img_per_s"], 8 / (s["step_ms"] / 1000), rel_tol=1e-6)
    # XLA's count (all ops) is within 20% of the analytic matmul count; the matmuls traced in the jaxpr are exact.
    assert 0.8 < r["xla_over_analytic"] < 1.2, r["xla_over_analytic"]
    assert r["precision"]["matmul_flops"] / 8 == pytest.approx(r["flops_per_image_analytic"], rel=1e-6)
    # The PyTorch mirror is the same architecture (same trained parameter count) and yields a ratio.
    assert r["torch_params"] == r["num_params"]
    assert r["torch_eager"]["jax_speedup"] > 0 and math.isfinite(r["torch_eager"]["jax_speedup"])
    # MFU = analytic FLOPs/image × img/s / peak (CPU has no table entry: the test passes a 1 TFLOP/s peak).
    assert r["peak_tflops"] == 1.0 and 0 < r["jax"]["mfu"] < 1
    assert r["jax"]["mfu"] == pytest.approx(r["flops_per_image_analytic"] * r["jax"]["img_per_s"] / 1e12)
    assert r["memory_plan"]["temp_size_in_bytes"] > 0 and r["memory_plan"]["alias_size_in_bytes"] > 0  # donated
    assert r["input_pipeline"]["img_per_s"] > 0 and r["input_pipeline"]["source"] == "beitv2_demo"
    assert math.isfinite(r["final_loss"])
    text = bench.format_report(r)
    assert "ours (JAX)" in text and "torch eager" in text and "FLOPs/image" in text
    # The PyTorch settings compared with are pinned, stored and printed; "auto" attention is einsum on CPU.
    assert r["torch_settings"] == bench.torch_settings("cpu") and "torch settings: autocast off" in text
    assert r["attention_impl"] == "auto" and r["attention_kernel"] == "einsum"


def test_bench_cli_trace_only_with_stage_and_overrides(tmp_path):
    """The CLI: demo stage + --config.* overrides + --json, in --trace_only mode (nothing compiled)."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "beitv2_jax.bench", "--config", "configs/demo.py", "--stage", "vqkd",
           "--config.vqkd.model.depth=1", "--config.vqkd.dtype=bfloat16", "--frozen_depth=1", "--batch=4",
           "--trace_only", f"--json={out}"]
    p = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "task vqkd (demo stage vqkd)" in p.stdout and "% of matmul FLOPs in bf16" in p.stdout
    r = json.loads(out.read_text())
    assert r["trace_only"] and r["dtype"] == "bfloat16" and r["frozen_dtype"] == "bfloat16"
    assert r["arch"]["depth"] == 1 and r["frozen"]["depth"] == 1 and r["batch_size"] == 4
    assert r["precision"]["matmul_flops"] / 4 == pytest.approx(r["flops_per_image_analytic"], rel=1e-6)


def test_bench_cli_pipeline_only_with_spawned_workers(tmp_path, demo_data_dir):
    """``--pipeline_only`` times the demo's grain pipeline with 2 spawned worker processes, builds no model."""
    out = tmp_path / "p.json"
    cmd = [sys.executable, "-m", "beitv2_jax.bench", "--config", "configs/demo.py", "--stage", "pretrain",
           f"--config.data.data_dir={demo_data_dir}", "--pipeline_only", "--batch=16", "--pipeline_batches=3",
           "--pipeline_workers=2", f"--json={out}"]
    p = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "input pipeline alone (pretrain, batch 16):" in p.stdout and "FLOPs" not in p.stdout
    r = json.loads(out.read_text())
    assert r["source"] == "beitv2_demo" and r["num_workers"] == 2 and r["batches"] == 3 and r["img_per_s"] > 0


# ----------------------------------------------------------------------------------------------- FLOP counts
@pytest.mark.parametrize("name", ["beitv2_base_pt1k_300e", "vqkd_base_clip", "beitv2_large_pt1k_1600e"])
def test_analytic_flops_match_traced_matmuls_at_full_size(name):
    """The analytic count equals the matmul FLOPs in the step's jaxpr for the paper-size recipes."""
    config = load_config_file(name)
    frozen = bench.frozen_arch(config)
    build = bench.build_pretrain if config.task == "pretrain" else bench.build_vqkd
    work = build(config, frozen, batch_size=2, frozen_dtype="float32", abstract=True)
    report = bench.precision_report(work.step, work.state, work.batch, work.aux)
    # (rel 1e-5: the CLIP tower also projects its pooled CLS token, unused by the teacher and dropped by XLA)
    assert report["matmul_flops"] / 2 == pytest.approx(work.analytic["total"], rel=1e-5)
    if name == "beitv2_base_pt1k_300e":
        # ViT-B/16 forward (patch embed + 12 blocks at 197 tokens) is the well-known ≈ 35.1 GFLOP (17.6 GMAC).
        blocks = bench.vit_blocks_flops(197, 768, 12, 3072) + bench.dense_flops(196, 768, 768)
        assert blocks / 1e9 == pytest.approx(35.1, abs=0.2)
        assert work.num_params == pytest.approx(106.1e6, rel=0.01)  # backbone 86M + 2 cls_pt blocks + LM head
        assert work.frozen_params == pytest.approx(86.4e6, rel=0.01)  # ViT-B/16 tokenizer encoder + task layer


def test_peak_table():
    class Dev:
        def __init__(self, platform, kind):
            self.platform, self.device_kind = platform, kind

    assert bench.peak_tflops(Dev("gpu", "NVIDIA H100 80GB HBM3")) == 989.0
    assert bench.peak_tflops(Dev("gpu", "NVIDIA H200")) == 989.0
    assert bench.peak_tflops(Dev("gpu", "NVIDIA A100-SXM4-40GB")) == 312.0
    assert bench.peak_tflops(Dev("tpu", "TPU v4")) == 275.0
    assert bench.peak_tflops(Dev("tpu", "TPU v5 lite")) == 197.0
    assert bench.peak_tflops(Dev("tpu", "TPU v5p")) == 459.0
    assert bench.peak_tflops(Dev("cpu", "cpu")) is None
    assert bench.peak_tflops(Dev("cpu", "cpu"), 2.5) == 2.5


# ----------------------------------------------------------------------------------------------- precision policy
@pytest.mark.parametrize("stage", ["pretrain", "vqkd"])
def test_bf16_config_computes_in_bf16_and_keeps_state_and_losses_fp32(stage):
    config = tiny_demo(stage)
    with config.unlocked():
        config[stage].dtype = "bfloat16"
    sc = bench.stage_config(config, stage)
    build = bench.build_pretrain if stage == "pretrain" else bench.build_vqkd
    work = build(sc, bench.frozen_arch(sc, config), batch_size=4, frozen_dtype="bfloat16", abstract=True)
    r = bench.precision_report(work.step, work.state, work.batch, work.aux)
    # Parameters, optimizer moments, the codebook and the EMA counts stay float32, before and after the step.
    for tree in (r["state_dtypes"], r["out_state_dtypes"]):
        assert tree["params"] == ["float32"]
        assert set(tree["opt_state"]) <= {"float32", "int32"}  # int32 = Adam's step count
        assert set(tree["model_state"]) <= {"float32", "int32"}  # codebook weight/cluster_size; initted
    # Losses and every metric are float32.
    assert set(r["metric_dtypes"].values()) == {"float32"}
    # The bulk of the matmul FLOPs runs in bf16 ...
    assert r["bf16_matmul_fraction"] > (0.95 if stage == "pretrain" else 0.85)
    # ... while the codebook distances run in float32 at HIGHEST precision (one such matmul: the lookup).
    highest = {k: v for k, v in r["matmuls"].items() if "HIGHEST" in k}
    assert list(highest) == ["dot_general float32xfloat32->float32 HIGHEST"] and highest[
        "dot_general float32xfloat32->float32 HIGHEST"]["count"] == 1
    # Every other float32 matmul is a VQ-KD task layer (run in float32 by design, as the official code does).
    f32 = sum(v["flops"] for k, v in r["matmuls"].items() if "bfloat16" not in k and "HIGHEST" not in k)
    assert f32 / 4 == pytest.approx(_task_layer_flops(work), rel=1e-6)


def _task_layer_flops(work):
    """Forward FLOPs per image of the float32 task layers (×3 with backward for the trained tokenizer)."""
    a = work.arch
    if work.task == "pretrain":
        t, n = a["tokenizer"], a["num_masked"]  # the tokenizer's task layer runs on the masked patches only
        return bench.dense_flops(n, t["width"], t["width"]) + bench.dense_flops(n, t["width"], dict(t["extra"])[
            "code_dim"])
    n = (a["image_size"] // a["patch_size"]) ** 2
    return work.analytic["task_layers"]


def test_fp32_config_has_no_bf16():
    config = tiny_demo("pretrain")
    sc = bench.stage_config(config, "pretrain")
    work = bench.build_pretrain(sc, bench.frozen_arch(sc, config), batch_size=2, frozen_dtype="float32",
                                abstract=True)
    r = bench.precision_report(work.step, work.state, work.batch, work.aux)
    assert r["bf16_matmul_fraction"] == 0.0 and not any("bfloat16" in k for k in r["matmuls"])


def _tiny_vit(**kw):
    from beitv2_jax.models import vit

    return vit.VisionTransformer(image_size=32, patch_size=8, width=64, depth=2, num_heads=4, rel_pos="shared",
                                 layer_scale_init=0.1, use_mask_token=True, **kw)


def test_attention_impls_in_bf16_stay_close_to_fp32():
    """einsum and jax.nn.dot_product_attention ('xla') in bf16 against the fp32 einsum reference."""
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    base = _tiny_vit()
    params = jax.eval_shape(base.init, jax.random.PRNGKey(0), x)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

    @jax.jit
    def outputs(params, x):  # one compile for the three variants
        ref = base.apply({"params": params}, x)["encoded"]
        bf16 = {impl: _tiny_vit(attention_impl=impl, dtype=jnp.bfloat16).apply({"params": params}, x)["encoded"]
                for impl in ("einsum", "xla")}
        return ref, bf16

    ref, bf16 = outputs(params, x)
    ref = np.asarray(ref)
    for impl, out in bf16.items():
        assert out.dtype == jnp.bfloat16
        err = np.abs(np.asarray(out.astype(jnp.float32)) - ref)
        assert err.max() < 0.05 * np.abs(ref).max() and err.mean() < 0.02 * np.abs(ref).mean(), impl
    diff = np.abs(np.asarray(bf16["einsum"], np.float32) - np.asarray(bf16["xla"], np.float32))
    assert diff.mean() < 0.02 * np.abs(ref).mean()


def test_synthetic_inputs_follow_the_real_contracts():
    mask = bench._synthetic_mask(np.random.default_rng(0), 5, 64, 24)
    assert mask.shape == (5, 64) and mask.dtype == bool and (mask.sum(1) == 24).all()
    src = bench.SyntheticJpegSource(num=2, height=60, width=80)
    from beitv2_jax.data import transforms

    assert len(src) == 1_281_167 and transforms.decode_image(src[1]["image"]).size == (80, 60)
    assert src[5]["image"] == src[1]["image"] != src[0]["image"]  # ImageNet's length over 2 distinct JPEGs
    assert len(bench.SyntheticJpegSource(num=2, height=60, width=80, length=2)) == 2


def test_stage_selection_errors():
    demo = load_config_file("demo")
    with pytest.raises(ValueError, match="--stage"):
        bench.stage_config(demo, "finetune")
    with pytest.raises(ValueError, match="does not apply"):
        bench.stage_config(load_config_file("vqkd_base_clip"), "pretrain")
    assert bench.stage_config(demo, "vqkd").task == "vqkd"
    assert bench.stage_config(demo).task == "pretrain"


def test_top_ops_ranks_device_kernels_or_xla_cpu_ops_per_step():
    """The profile summary of a perfetto trace: device streams when the trace has a device, else XLA:CPU's threads;
    python/host events never count."""
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "tf_XLAPjRtCpuClient/1"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "python"}}]
    ops = [{"ph": "X", "pid": 1, "tid": 7, "name": "fusion.1", "dur": 300.0},
           {"ph": "X", "pid": 1, "tid": 7, "name": "dot.2", "dur": 100.0},
           {"ph": "X", "pid": 1, "tid": 7, "name": "fusion.1", "dur": 200.0},
           {"ph": "X", "pid": 1, "tid": 8, "name": "PjitFunction(step)", "dur": 5000.0},
           {"ph": "X", "pid": 1, "tid": 7, "name": "ThunkExecutor::Execute", "dur": 600.0}]
    r = bench.top_ops(meta + ops, steps=2, top=5)
    assert r["where"] == "XLA:CPU threads" and r["total_ms_per_step"] == pytest.approx(0.3)
    assert [(o["name"], o["count"]) for o in r["ops"]] == [("fusion.1", 1), ("dot.2", 0)]
    assert r["ops"][0]["ms_per_step"] == pytest.approx(0.25) and r["ops"][0]["share"] == pytest.approx(5 / 6)
    assert [(k["name"], k["count"]) for k in r["kinds"]] == [("fusion", 1), ("dot", 0)]
    gpu = meta + [{"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
                  {"ph": "X", "pid": 2, "tid": 1, "name": "cudnn_fmha", "dur": 50.0}]
    assert [o["name"] for o in bench.top_ops(gpu + ops, steps=1)["ops"]] == ["cudnn_fmha"]


def test_torch_settings_are_pinned_for_the_comparison():
    cuda, cpu = bench.torch_settings("cuda"), bench.torch_settings("cpu")
    assert cuda["compile_mode"] == "max-autotune" and cuda["autocast"] == "bfloat16" and cuda["channels_last"]
    assert "MATH" not in cuda["sdpa_backends"] and "CUDNN_ATTENTION" in cuda["sdpa_backends"]
    assert cpu["autocast"].startswith("off") and not cpu["channels_last"]
    with pytest.raises(ValueError, match="compile mode"):
        bench.torch_settings("cuda", "fastest")
