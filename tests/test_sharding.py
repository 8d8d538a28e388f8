"""Scale-out: the same losses and parameters on every mesh, real parameter splits, cross-mesh restore,
2-process training, mesh validation and multi-process start-up."""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from beitv2_jax import distributed
from beitv2_jax.train import sharding

from conftest import CHEAP_XLA_FLAGS, REPO_ROOT, hidden_torch_dir, make_random_tokenizer


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesh")
    # tiny programs: compiling dominates, so the cheaper LLVM settings (the same for every mesh) save ~30 s
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {CHEAP_XLA_FLAGS}", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests", "scripts", "mesh_equivalence.py"),
                        str(tmp / "out.npz"), str(tmp / "ckpt")], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(np.load(tmp / "out.npz"))


@pytest.mark.parametrize("mesh", ["8-1-1", "2-4-1", "2-2-2"])
def test_same_losses_and_params_on_every_mesh(mesh_results, mesh):
    d = mesh_results
    for task in ("vqkd", "pretrain"):
        np.testing.assert_allclose(d[f"{mesh}/{task}_losses"], d[f"1-1-1/{task}_losses"], rtol=1e-5)
    for group, tol in (("vqkd_params", 1e-5), ("pretrain_params", 1e-5), ("codebook", 1e-6)):
        names = [k.split("/", 1)[1] for k in d if k.startswith(f"1-1-1/{group}/")]
        assert names
        for name in names:
            np.testing.assert_allclose(d[f"{mesh}/{name}"], d[f"1-1-1/{name}"], atol=tol, err_msg=name)


def test_parameters_really_split(mesh_results):
    d = mesh_results
    # qkv [D=32, 3, H=4, Dh=8]: embed over fsdp, heads over tensor
    assert d["8-1-1/qkv_shard_shape"].tolist() == [32, 3, 4, 8]
    assert d["2-4-1/qkv_shard_shape"].tolist() == [8, 3, 4, 8]
    assert d["2-2-2/qkv_shard_shape"].tolist() == [16, 3, 2, 8]
    # fc1 [32, 128] (embed, mlp) and its Adam moment follow the same split
    assert d["2-2-2/fc1_shard_shape"].tolist() == [16, 64] == d["2-2-2/fc1_mu_shard_shape"].tolist()
    assert d["2-4-1/fc1_mu_shard_shape"].tolist() == [8, 128]


def test_checkpoint_restores_on_another_mesh(mesh_results):
    d = mesh_results
    assert float(d["restored-2-2-2/max_diff"]) == 0.0 and float(d["restored-1-1-1/max_diff"]) == 0.0
    assert d["restored-2-2-2/qkv_shard_shape"].tolist() == [16, 3, 2, 8]
    assert d["restored-1-1-1/qkv_shard_shape"].tolist() == [32, 3, 4, 8]


def test_mesh_config_validation():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.mesh_shape({"data": 3, "fsdp": 4}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.mesh_shape({"model": 2}, 8)


def test_distributed_detection():
    assert not distributed.wanted_from_environment({}, on_tpu_vm=False)
    assert distributed.wanted_from_environment({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"}, on_tpu_vm=False)
    assert not distributed.wanted_from_environment({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "1"}, on_tpu_vm=False)
    assert distributed.wanted_from_environment({"TPU_WORKER_HOSTNAMES": "a,b"}, on_tpu_vm=False)
    assert distributed.wanted_from_environment({}, on_tpu_vm=True)
    assert not distributed.wanted_from_environment({})  # this machine is no TPU VM


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_pretrain_args(workdir, tokenizer_dir, data_dir, *overrides):
    return ["--config", os.path.join(REPO_ROOT, "tests", "scripts", "tiny_pretrain.py"), "--workdir", str(workdir),
            f"--config.tokenizer.checkpoint={tokenizer_dir}", f"--config.data.data_dir={data_dir}", *overrides]


def _start_two_processes(args, env):
    """Two `python -m beitv2_jax.main ARGS` processes joined by jax.distributed on localhost (gloo)."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "beitv2_jax.main", *args,
                              f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def _finish(procs) -> list:
    """Wait for the processes; assert that each exited 0; their stderr."""
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [err for _, err in outs]


# 2 processes × 4 fake CPU devices: fsdp over all 8 (every parameter split across the processes), and tensor
# parallel over each process's 4 devices with data parallelism across the processes.
TWO_PROCESS_MESHES = {"fsdp": ("--config.mesh.data=1", "--config.mesh.fsdp=8"),
                      "tensor": ("--config.mesh.data=2", "--config.mesh.tensor=4")}


def test_two_processes_match_one(tmp_path, demo_data_dir):
    """Sharded 2-process runs (fsdp=8; tensor=4) give the 1-process losses, finish, and export the 1-process model;
    their checkpoint resumes in one process."""
    from beitv2_jax.convert import store

    tokenizer_dir = make_random_tokenizer(tmp_path / "tok")
    cheap = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"  # same in every run
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=cheap, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([hidden_torch_dir(tmp_path), REPO_ROOT]))
    single = subprocess.Popen([sys.executable, "-m", "beitv2_jax.main",
                               *_tiny_pretrain_args(tmp_path / "one", tokenizer_dir, demo_data_dir)],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    env4 = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {cheap}")
    runs = {name: _start_two_processes(_tiny_pretrain_args(tmp_path / name, tokenizer_dir, demo_data_dir, *mesh),
                                       env4) for name, mesh in TWO_PROCESS_MESHES.items()}
    _finish([single])
    one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    exported_one, _, _ = store.load_variables(str(tmp_path / "one" / "model"))
    for name, procs in runs.items():
        _finish(procs)
        two = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
        np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5, err_msg=name)
        # The export is gathered from the shards, written once (process 0; the other waits), complete, and equals
        # the 1-process one.
        exported_two, _, _ = store.load_variables(str(tmp_path / name / "model"))
        assert jax.tree.structure(exported_two) == jax.tree.structure(exported_one)
        for a, b in zip(jax.tree.leaves(exported_one), jax.tree.leaves(exported_two)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
        assert not [entry for entry in os.listdir(tmp_path / name) if entry.startswith(".model.")]
    # The 2-process fsdp checkpoint of step 2 resumes in one process (8 devices, the same mesh): steps 3-4 and the
    # export repeat the 1-process run (the data iterator's state is the global batch index, for any process count).
    resumed = tmp_path / "fsdp_to_one_process"
    shutil.copytree(tmp_path / "fsdp", resumed)
    for name in ("checkpoints/3", "checkpoints/4", "model", "metrics.jsonl"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else os.remove(resumed / name)
    env8 = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {cheap}")
    err = _finish([subprocess.Popen([sys.executable, "-m", "beitv2_jax.main", *_tiny_pretrain_args(
        resumed, tokenizer_dir, demo_data_dir, *TWO_PROCESS_MESHES["fsdp"])], cwd=REPO_ROOT, env=env8,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)])[0]
    assert "resuming at step 2" in err
    rows = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [3, 4]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in one[2:]], rtol=1e-5)
    exported, _, _ = store.load_variables(str(resumed / "model"))
    for a, b in zip(jax.tree.leaves(exported_one), jax.tree.leaves(exported)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
