"""Operations: the persistent compilation cache, the profiler window, the step-time / goodput fields of
metrics.jsonl, the new config keys' validation and the topology-aware / multi-slice mesh."""
import glob
import gzip
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from beitv2_jax import recipes, runtime, validate
from beitv2_jax.train import loop, sharding

from conftest import REPO_ROOT


# ----------------------------------------------------------------------------------------------- loop fields
@flax.struct.dataclass
class _ToyState:
    step: jnp.ndarray
    w: jnp.ndarray
    extra: dict


@jax.jit
def _toy_step(state, batch):
    w = state.w - 0.1 * jnp.mean(batch["x"], axis=0)
    return state.replace(step=state.step + 1, w=w), {"loss": jnp.sum(w ** 2), "nonfinite": jnp.float32(0.0)}


class _SlowInput:
    """Batches of 4 rows that take ``wait`` seconds each (an input pipeline slower than the step)."""

    def __init__(self, wait):
        self.wait, self.n = wait, 0

    def __next__(self):
        time.sleep(self.wait)
        self.n += 1
        return {"x": np.full((4, 3), self.n, np.float32)}


def test_loop_writes_step_time_goodput_and_a_profile_of_steps_10_to_12(tmp_path):
    mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
    state = _ToyState(step=jnp.int32(0), w=jnp.zeros(3), extra={})
    wait = 0.03
    loop.run(workdir=str(tmp_path), state=state, train_step=_toy_step, iterator=_SlowInput(wait), mesh=mesh,
             total_steps=14, steps_per_epoch=14, batch_size=4, log_every=7, profile=(10, 12))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [7, 14]
    assert "compile_s" in rows[0] and "compile_s" not in rows[1] and rows[0]["compile_s"] > 0
    # The sleep is input time, not step time. The loop keeps 2 batches in flight on the device (prefetch), so the
    # first window waits for 9 inputs and the second for the last 5: per window the mean differs, in all 14 waits.
    assert sum(r["data_wait_s"] for r in rows) * 7 >= 14 * wait, rows
    for r in rows:
        wall_per_step = 4 / r["img_per_sec"]
        assert r["data_wait_s"] < wall_per_step, r
        assert 0 <= r["step_s"] and r["data_wait_s"] + r["step_s"] <= wall_per_step * (1 + 1e-6), r
        assert 0 < r["goodput"] < 1
    # input-bound toy run: the data wait is most of each step
    assert rows[1]["data_wait_s"] > rows[1]["step_s"]
    traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    (trace_json,) = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.trace.json.gz"))
    events = json.load(gzip.open(trace_json))["traceEvents"]
    calls = {e["ts"] for e in events if e.get("name") == "PjitFunction(_toy_step)"}
    sleeps = [e for e in events if str(e.get("name")).startswith("$test_ops.py") and "__next__" in e["name"]]
    # the 3 steps' inputs, 10..12 (taken from the input while steps 10..12 run: with prefetch, those of 12..14)
    assert len(calls) >= 2 and len(sleeps) == 3, (len(calls), len(sleeps), [e.get("name") for e in sleeps])


def test_profile_window_stops_an_unfinished_trace(tmp_path):
    window = runtime.ProfileWindow((3, 50), str(tmp_path / "p"))
    for step in range(1, 6):
        window.before(step)
        window.after(step, jnp.ones(2) * step)
    assert window.active and window.traced == [3, 4, 5]
    window.close()
    assert not window.active and glob.glob(str(tmp_path / "p" / "plugins" / "profile" / "*" / "*.xplane.pb"))


# ----------------------------------------------------------------------------------------------- compile cache
def test_compilation_cache_dir_choice(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert runtime.compilation_cache_dir("", str(tmp_path / "run")) is None
    assert runtime.compilation_cache_dir("/x/cache", str(tmp_path / "run")) == "/x/cache"
    assert runtime.compilation_cache_dir("auto", str(tmp_path / "run")) == str(tmp_path / "jax_compilation_cache")
    assert runtime.compilation_cache_dir("auto", "gs://b/runs/base/") == "gs://b/runs/jax_compilation_cache"
    assert runtime.compilation_cache_dir("auto", "gs://b") == "gs://b/jax_compilation_cache"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/env/cache")
    assert runtime.compilation_cache_dir("auto", str(tmp_path / "run")) == "/env/cache"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert runtime.compilation_cache_dir("auto", str(locked / "run"), home="/h") == \
            "/h/.cache/beitv2_jax/jax_compilation_cache"


CACHE_SCRIPT = """
import sys, jax, jax.numpy as jnp
from beitv2_jax import runtime
runtime.setup_compilation_cache("auto", sys.argv[1])
stats = runtime.COMPILE_STATS.track()
print(float(jax.jit(lambda x: jnp.tanh(x) @ x.T + 1)(jnp.ones((8, 8))).sum()))
print(stats.cache_hits, stats.cache_misses, stats.programs)
"""


def test_second_start_loads_programs_from_the_cache(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    outs = [subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(tmp_path / "run")], env=env, capture_output=True,
                           text=True, timeout=120) for _ in range(2)]
    for out in outs:
        assert out.returncode == 0, out.stderr[-2000:]
    (first_value, first), (second_value, second) = [o.stdout.split("\n")[:2] for o in outs]
    hits, misses, programs = map(int, first.split())
    assert hits == 0 and misses == programs >= 1
    hits, misses, programs = map(int, second.split())
    assert misses == 0 and hits == programs >= 1
    assert first_value == second_value
    assert os.listdir(tmp_path / "jax_compilation_cache")


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("value", [(12, 10), (0, 3), (5,), ("a", "b"), (1.0, 2.0)])
def test_bad_profile_is_one_clear_error(value):
    config = recipes.base_run("pretrain")
    config.profile = value
    with pytest.raises(validate.ConfigError, match=r"config.profile must be \(\) or \(first_step, last_step\)"):
        validate.validate_run_settings(config)


def test_demo_profile_belongs_to_a_stage():
    from conftest import load_config_file

    config = load_config_file("demo")
    config.profile = (10, 12)
    with pytest.raises(validate.ConfigError, match=r"per stage in the demo: use --config.pretrain.profile"):
        validate.validate_config(config)


def test_profile_dir_per_process(monkeypatch):
    assert runtime.profile_dir("/w") == "/w/profile"
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax, "process_index", lambda: 3)
    assert runtime.profile_dir("gs://b/w") == "gs://b/w/profile/process_3"


def test_new_keys_are_operational():
    old = json.loads(recipes.base_run("pretrain").to_json_best_effort())
    for key in ("compilation_cache_dir", "profile"):
        old.pop(key)
    old["mesh"].pop("dcn_data")
    new = recipes.base_run("pretrain")
    new.profile = (10, 12)
    assert validate.config_changes(old, json.loads(new.to_json_best_effort())) == []
    validate.validate_run_settings(new)


# ----------------------------------------------------------------------------------------------- mesh
def _fake_devices(n, slices=None, processes=1, kind="fake"):
    devices = []
    for i in range(n):
        d = SimpleNamespace(id=i, process_index=i * processes // n, platform="gpu", device_kind=kind)
        if slices:
            d.slice_index = i * slices // n
        devices.append(d)
    return devices


def test_multi_slice_mesh_puts_slices_outermost_on_data():
    devices = _fake_devices(16, slices=2)
    config = {"data": -1, "fsdp": 2, "tensor": 1, "dcn_data": 2}
    assert sharding.mesh_shape(config, 16) == (8, 2, 1)
    grid = sharding.device_grid(config, devices[8:] + devices[:8])  # order of the list does not matter
    assert grid.shape == (8, 2, 1)
    assert [d.slice_index for d in grid[:, 0, 0]] == [0] * 4 + [1] * 4
    assert sorted(d.id for d in grid.flat) == list(range(16))
    for s in range(2):  # every fsdp pair stays inside one slice
        assert all(len({d.slice_index for d in grid[i, :, 0]}) == 1 for i in range(s * 4, s * 4 + 4))


def test_multi_slice_mesh_falls_back_to_processes_and_checks_counts():
    grid = sharding.device_grid({"data": -1, "dcn_data": 2}, _fake_devices(8, processes=2))
    assert [d.process_index for d in grid[:, 0, 0]] == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="dcn_data=4 but the devices belong to 2 slices"):
        sharding.device_grid({"data": -1, "dcn_data": 4}, _fake_devices(8, slices=2))
    with pytest.raises(ValueError, match=r"belong to 2 slices: set config.mesh.dcn_data=2"):
        sharding.device_grid({"data": -1}, _fake_devices(8, slices=2))
    with pytest.raises(ValueError, match="dcn_data=3 does not divide the 8 devices"):
        sharding.mesh_shape({"data": -1, "dcn_data": 3}, 8)
    with pytest.raises(ValueError, match="needs 8 devices, but 4 are available per slice"):
        sharding.mesh_shape({"data": 8, "dcn_data": 2}, 8)


def test_tpu_mesh_follows_the_torus():
    """8 v4 chips of a 2×2×2 slice listed in a scrambled order: each fsdp group of a (2, 4, 1) mesh is one
    physical 2×2 plane and the tensor pairs of a (2, 2, 2) mesh are neighbouring chips, where reshaping the list
    would mix planes."""
    coords = [(x, y, z) for z in range(2) for y in range(2) for x in range(2)]
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    devices = [SimpleNamespace(id=i, coords=coords[i], core_on_chip=0, platform="tpu", device_kind="TPU v4",
                               process_index=0, slice_index=0) for i in order]

    def one_plane(group):
        return any(len({d.coords[axis] for d in group}) == 1 for axis in range(3))

    grid = sharding.device_grid({"data": 2, "fsdp": 4, "tensor": 1}, devices)
    assert all(one_plane(grid[i, :, 0]) for i in range(2))
    assert not all(one_plane(row) for row in np.asarray(devices, dtype=object).reshape(2, 4))
    grid = sharding.device_grid({"data": 2, "fsdp": 2, "tensor": 2}, devices)
    for pair in grid.reshape(4, 2):
        assert sum(abs(p - q) for p, q in zip(pair[0].coords, pair[1].coords)) == 1


def test_make_mesh_on_the_real_devices():
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1}))
    assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.size == jax.device_count()
    assert sharding.data_parallel_size(mesh) == jax.device_count()
