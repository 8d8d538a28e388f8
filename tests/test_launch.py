"""Launch scripts (launch/*.sh, launch/slurm.sbatch): --dry-run prints the right commands and runs nothing; the
real mode runs exactly what --dry-run printed (gcloud/srun/python replaced by recording stubs); the per-worker
and per-task shell snippets give every process the right coordinator, process count and id. Also: the tables of
docs/scaling.md are the output of the script embedded in it."""
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

TPU = os.path.join(REPO_ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO_ROOT, "launch", "slurm.sbatch")
LOCAL = os.path.join(REPO_ROOT, "launch", "local_gpu.sh")
BASE = "configs/beitv2_base_pt1k_1600e.py"
LARGE = "configs/beitv2_large_pt1k_1600e.py"
OVERRIDES = ["--config.dtype=bfloat16", "--config.mesh.fsdp=4", "--config.data.data_dir=/data/my tfds"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# A stub that appends its argv (and a few environment variables) as one JSON line to $STUB_LOG.
RECORDER = """#!{python}
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"name": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                        "JAX_LOCAL_DEVICE_IDS": os.environ.get("JAX_LOCAL_DEVICE_IDS"),
                        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                        "cwd": os.getcwd()}}) + "\\n")
"""
SCONTROL = """#!/usr/bin/env bash
[[ $1 == show && $2 == hostnames ]] || exit 3
case $3 in
  "gpu-[017-018]") printf 'gpu-017\\ngpu-018\\n' ;;
  *) echo "$3" ;;
esac
"""


def _write_exe(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


@pytest.fixture
def stubs(tmp_path):
    """A bin/ dir with recording gcloud, srun, python, nvidia-smi and curl-free scontrol; returns (env, log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "srun", "python", "fake_python"):
        _write_exe(bin_dir / name, RECORDER.format(python=sys.executable))
    _write_exe(bin_dir / "scontrol", SCONTROL)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_NAME", "PROJECT_ID", "ZONE"))}
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}", STUB_LOG=str(log), TMPDIR=str(tmp_path))
    return env, log


def _calls(log):
    return [json.loads(line) for line in open(log)] if os.path.exists(log) else []


def _run(script, args, env, cwd=REPO_ROOT):
    return subprocess.run(["bash", script, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def _commands(stdout):
    """The command lines of a --dry-run output (comments dropped), each split like bash would."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def _option(words, prefix):
    values = [w[len(prefix):] for w in words if w.startswith(prefix)]
    assert len(values) == 1, (prefix, words)
    return values[0]


# ----------------------------------------------------------------------------------------------- all scripts
@pytest.mark.parametrize("script", [TPU, SLURM, LOCAL])
def test_help_and_syntax(script, stubs):
    env, log = stubs
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    r = _run(script, ["--help"], env)
    assert r.returncode == 0 and "Usage:" in r.stdout and "--dry-run" in r.stdout
    head = open(script).read().split("\n", 40)
    assert any(line.strip() == "set -euo pipefail" for line in head)
    assert _calls(log) == []


@pytest.mark.parametrize("script,args,message", [
    (LOCAL, ["--workdir", "/w"], "--config is required"),
    (LOCAL, ["--config", "configs/nope.py", "--workdir", "/w"], "config file not found"),
    (LOCAL, ["--config", BASE, "--workdir", "/w", "--bogus"], "unknown argument"),
    (TPU, ["--zone", "z", "--config", BASE, "--workdir", "/w"], "--tpu is required"),
    (TPU, ["--tpu", "t", "--zone", "z", "--create", "--config", BASE, "--workdir", "/w"], "--accelerator-type"),
    (TPU, ["--tpu", "t", "--zone", "z", "--config", "/etc/hostname", "--workdir", "/w"], "file of this repository"),
    (TPU, ["--tpu", "t", "--zone", "z", "--config", BASE, "--workdir", "relative"], "absolute path"),
    (SLURM, ["--config", BASE, "--workdir", "/w"], "SLURM_JOB_ID is not set"),
])
def test_bad_arguments_fail_with_one_line(script, args, message, stubs):
    env, log = stubs
    r = _run(script, [*args, "--dry-run"], env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _calls(log) == []


@pytest.mark.parametrize("script,args", [
    (TPU, ["--tpu", "t", "--zone", "z", "--config", BASE, "--workdir", "/w"]),
    (LOCAL, ["--config", BASE, "--workdir", "/w"]),
])
def test_dry_run_after_the_separator_still_runs_nothing(script, args, stubs):
    env, log = stubs
    r = _run(script, [*args, "--", "--config.dtype=bfloat16", "--dry-run"], env)
    assert r.returncode == 0, r.stderr
    assert "nothing was run" in r.stdout and _calls(log) == []
    assert "--dry-run" not in r.stdout.split("nothing was run", 1)[1]


@pytest.mark.parametrize("script,args", [
    (TPU, ["--tpu", "t", "--zone", "z", "--config", BASE]),
    (LOCAL, ["--config", BASE]),
])
def test_gs_workdir_is_passed_on_as_a_uri(script, args, stubs):
    env, log = stubs
    r = _run(script, [*args, "--workdir", "gs://bucket/runs/base", "--dry-run"], env)
    assert r.returncode == 0, r.stderr
    assert "--workdir=gs://bucket/runs/base" in r.stdout and _calls(log) == []


# ----------------------------------------------------------------------------------------------- TPU pod
TPU_ARGS = ["--tpu", "beitv2-test", "--zone", "us-central2-b", "--project", "my-project",
            "--config", BASE, "--workdir", "/mnt/shared/runs/base"]


def test_tpu_dry_run_prints_every_step_and_runs_nothing(stubs):
    env, log = stubs
    r = _run(TPU, [*TPU_ARGS, "--create", "--accelerator-type", "v4-64", "--spot", "--dry-run", "--", *OVERRIDES],
             env)
    assert r.returncode == 0, r.stderr
    assert _calls(log) == [] and not os.path.exists(os.path.join(env["TMPDIR"], "beitv2_jax-src.tar.gz"))
    create, archive, scp, setup, run = _commands(r.stdout)
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and create[5] == "beitv2-test"
    assert {"--accelerator-type=v4-64", "--version=tpu-ubuntu2204-base", "--spot"} <= set(create)
    assert archive[:2] == ["git", "-C"] and "archive" in archive
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[6] == "beitv2-test:beitv2_jax-src.tar.gz"
    for cmd in (create, scp, setup, run):
        assert {"--zone=us-central2-b", "--project=my-project"} <= set(cmd), cmd
    for cmd in (scp, setup, run):
        assert "--worker=all" in cmd
    for cmd in (setup, run):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "beitv2-test"]
    assert "pip install -q -e ." in _option(setup, "--command=") and "jax[tpu]" in _option(setup, "--command=")
    remote = _option(run, "--command=")
    for piece in ("python -m beitv2_jax.main", f"--config={BASE}", "--workdir=/mnt/shared/runs/base",
                  "--coordinator_address=$COORDINATOR:8476", "--num_processes=${#WORKERS[@]}", "--process_id=$ID",
                  "--config.dtype=bfloat16", "--config.mesh.fsdp=4", "'--config.data.data_dir=/data/my tfds'"):
        assert piece in remote, piece
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0


def test_tpu_skip_setup_and_setup_only(stubs):
    env, _ = stubs
    only_run = _commands(_run(TPU, [*TPU_ARGS, "--skip-setup", "--dry-run"], env).stdout)
    assert len(only_run) == 1 and only_run[0][4] == "ssh" and "beitv2_jax.main" in _option(only_run[0], "--command=")
    only_setup = _commands(_run(TPU, ["--tpu", "t", "--zone", "z", "--setup-only", "--dry-run"], env).stdout)
    assert [c[0] for c in only_setup] == ["git", "gcloud", "gcloud"]
    assert "beitv2_jax.main" not in " ".join(only_setup[-1])


def _fake_worker(tmp_path, endpoints, worker):
    """A home directory with the checkout, a venv whose python records its argv, and a curl that answers the
    metadata queries the way a TPU VM's metadata server does."""
    home = tmp_path / f"home{worker}"
    (home / "beitv2_jax").mkdir(parents=True)
    (home / "beitv2_venv" / "bin").mkdir(parents=True)
    _write_exe(home / "beitv2_venv" / "bin" / "python", RECORDER.format(python=sys.executable))
    bin_dir = tmp_path / f"curl{worker}"
    bin_dir.mkdir()
    _write_exe(bin_dir / "curl", f"""#!/usr/bin/env bash
case "${{@: -1}}" in
  */agent-worker-number) echo -n {worker} ;;
  */worker-network-endpoints) echo -n '{endpoints}' ;;
  *) exit 22 ;;
esac
""")
    return home, bin_dir


@pytest.mark.parametrize("endpoints,coordinator", [
    ("beitv2-w-0:uid0:10.130.0.2,beitv2-w-1:uid1:10.130.0.3,beitv2-w-2:uid2:10.130.0.4,beitv2-w-3:uid3:10.130.0.5",
     "10.130.0.2"),
    ("t1v-n-abc-w-0,t1v-n-abc-w-1,t1v-n-abc-w-2,t1v-n-abc-w-3", "t1v-n-abc-w-0"),
])
def test_tpu_remote_command_on_fake_workers(stubs, tmp_path, endpoints, coordinator):
    """Run the printed --command on 4 fake workers: each gets worker 0 as coordinator, 4 processes, its own id."""
    env, log = stubs
    r = _run(TPU, [*TPU_ARGS, "--skip-setup", "--dry-run", "--", *OVERRIDES], env)
    remote = _option(_commands(r.stdout)[0], "--command=")
    for worker in range(4):
        home, curl_dir = _fake_worker(tmp_path, endpoints, worker)
        worker_env = dict(env, HOME=str(home), PATH=f"{curl_dir}:{env['PATH']}")
        out = subprocess.run(["bash", "-c", remote], env=worker_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert (home / "beitv2_logs" / f"base-worker{worker}.log").exists()
    calls = _calls(log)
    assert len(calls) == 4
    for worker, call in enumerate(calls):
        assert call["argv"] == ["-m", "beitv2_jax.main", f"--config={BASE}", "--workdir=/mnt/shared/runs/base",
                                f"--coordinator_address={coordinator}:8476", "--num_processes=4",
                                f"--process_id={worker}", *OVERRIDES]
        assert call["cwd"].endswith(f"home{worker}/beitv2_jax")


@pytest.mark.skipif(shutil.which("git") is None or not os.path.isdir(os.path.join(REPO_ROOT, ".git")),
                    reason="needs a git checkout")
def test_tpu_real_mode_runs_what_dry_run_printed(stubs):
    env, log = stubs
    args = [*TPU_ARGS, "--create", "--accelerator-type", "v5p-32", "--", *OVERRIDES]
    printed = _commands(_run(TPU, ["--dry-run", *args], env).stdout)
    r = _run(TPU, args, env)
    assert r.returncode == 0, r.stderr
    assert [["gcloud", *c["argv"]] for c in _calls(log)] == [c for c in printed if c[0] == "gcloud"]
    assert "--version=v2-alpha-tpuv5" in printed[0]
    tarball = os.path.join(env["TMPDIR"], "beitv2_jax-src.tar.gz")
    listing = subprocess.run(["tar", "-tzf", tarball], capture_output=True, text=True).stdout.split()
    assert "beitv2_jax/main.py" in listing and BASE in listing


# ----------------------------------------------------------------------------------------------- SLURM
def _slurm_env(env, ntasks=16, nodes=2, job_id=4242):
    return dict(env, SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="gpu-[017-018]", SLURM_NTASKS=str(ntasks),
                SLURM_JOB_NUM_NODES=str(nodes), SLURM_PROCID="0", SLURM_SUBMIT_DIR=REPO_ROOT)


def test_slurm_dry_run_one_process_per_gpu(stubs):
    env, log = stubs
    r = _run(SLURM, ["--dry-run", "--config", BASE, "--workdir", "/shared/runs/base", "--", *OVERRIDES],
             _slurm_env(env))
    assert r.returncode == 0, r.stderr
    assert _calls(log) == []  # srun was not started
    (srun,) = _commands(r.stdout)
    assert srun[0] == "srun" and "--ntasks=16" in srun and f"--chdir={REPO_ROOT}" in srun
    port = 12000 + 4242 % 20000
    task = srun[srun.index("-c") + 1]
    assert "--process_id=$SLURM_PROCID" in task and "ids=$SLURM_LOCALID" in task
    args = srun[srun.index("-c") + 3:]
    assert args == [f"--config={BASE}", "--workdir=/shared/runs/base", f"--coordinator_address=gpu-017:{port}",
                    "--num_processes=16", *OVERRIDES]
    assert "coordinator gpu-017" in r.stdout and "one per gpu" in r.stdout


def test_slurm_dry_run_one_process_per_node_and_explicit_port(stubs):
    env, _ = stubs
    r = _run(SLURM, ["--dry-run", "--port", "23456", "--config", LARGE, "--workdir", "/shared/runs/large",
                     "--config.mesh.fsdp=2"], _slurm_env(env, ntasks=2, nodes=2))
    assert r.returncode == 0, r.stderr
    (srun,) = _commands(r.stdout)
    task = srun[srun.index("-c") + 1]
    assert "SLURM_GPUS_ON_NODE" in task and "--process_id=$SLURM_PROCID" in task
    assert srun[srun.index("-c") + 3:] == [f"--config={LARGE}", "--workdir=/shared/runs/large",
                                           "--coordinator_address=gpu-017:23456", "--num_processes=2",
                                           "--config.mesh.fsdp=2"]


@pytest.mark.parametrize("ntasks,mode_flag,gpus_on_node,bound", [
    (16, [], None, False), (16, [], None, True), (2, [], "4", False), (2, ["--mode", "gpu"], None, False)])
def test_slurm_real_mode_tasks_get_their_ids(stubs, ntasks, mode_flag, gpus_on_node, bound):
    """Submit for real with a recording srun, then play srun: run its `bash -c` once per task (``bound``: SLURM
    gives every task only its own GPU, as with --gpus-per-task=1)."""
    env, log = stubs
    slurm_env = _slurm_env(env, ntasks=ntasks, nodes=2)
    args = [*mode_flag, "--python", "fake_python", "--config", BASE, "--workdir", "/shared/runs/base", "--",
            *OVERRIDES]
    printed = _commands(_run(SLURM, ["--dry-run", *args], slurm_env).stdout)
    r = _run(SLURM, args, slurm_env)
    assert r.returncode == 0, r.stderr
    (srun_call,) = _calls(log)
    assert ["srun", *srun_call["argv"]] == printed[0]
    argv = srun_call["argv"]
    bash_cmd = argv[argv.index("bash"):]
    per_node = ntasks // 2
    for task in range(ntasks):
        task_env = dict(slurm_env, SLURM_PROCID=str(task), SLURM_LOCALID=str(task % per_node))
        if gpus_on_node:
            task_env["SLURM_GPUS_ON_NODE"] = gpus_on_node
        if bound:
            task_env["CUDA_VISIBLE_DEVICES"] = str(task % per_node)
        out = subprocess.run(bash_cmd, env=task_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    calls = _calls(log)[1:]
    assert len(calls) == ntasks
    port = 12000 + 4242 % 20000
    for task, call in enumerate(calls):
        assert call["name"] == "fake_python"
        assert call["argv"] == ["-m", "beitv2_jax.main", f"--process_id={task}", f"--config={BASE}",
                                "--workdir=/shared/runs/base", f"--coordinator_address=gpu-017:{port}",
                                f"--num_processes={ntasks}", *OVERRIDES]
        expected = "0,1,2,3" if gpus_on_node else "0" if bound else str(task % per_node)
        assert call["JAX_LOCAL_DEVICE_IDS"] == expected


# ----------------------------------------------------------------------------------------------- local GPU
def test_local_dry_run_and_real_mode(stubs, tmp_path):
    env, log = stubs
    args = ["--gpus", "0,1,2,3", "--config", BASE, "--workdir", "runs/base", "--", *OVERRIDES]
    r = _run(LOCAL, ["--dry-run", *args], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _calls(log) == []
    cd, cmd = _commands(r.stdout)
    assert cd == ["cd", REPO_ROOT]
    expected = ["-m", "beitv2_jax.main", f"--config={BASE}", f"--workdir={tmp_path}/runs/base", *OVERRIDES]
    assert cmd == ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3", "python", *expected]
    assert not any("coordinator" in w or "process_id" in w for w in cmd)
    r = _run(LOCAL, args, env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (call,) = _calls(log)
    assert call["argv"] == expected and call["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and call["cwd"] == REPO_ROOT


def test_local_all_gpus_and_log(stubs, tmp_path):
    env, log = stubs
    logfile = tmp_path / "run.log"
    r = _run(LOCAL, ["--config", LARGE, "--workdir", "/w", "--config.model.remat_policy=nothing_saveable",
                     "--log", str(logfile)], env)
    assert r.returncode == 0, r.stderr
    (call,) = _calls(log)
    assert call["CUDA_VISIBLE_DEVICES"] is None
    assert call["argv"][2:] == [f"--config={LARGE}", "--workdir=/w", "--config.model.remat_policy=nothing_saveable"]
    assert logfile.exists()


# ----------------------------------------------------------------------------------------------- docs/scaling.md
def test_scaling_doc_tables_are_the_scripts_output(tmp_path):
    doc = open(os.path.join(REPO_ROOT, "docs", "scaling.md"), encoding="utf-8").read()
    script = re.search(r"^```python scaling_numbers\n(.*?)^```$", doc, re.S | re.M).group(1)
    tables = re.search(r"<!-- generated by the script below: begin -->\n(.*?)<!-- generated by the script below: "
                       r"end -->", doc, re.S).group(1)
    path = tmp_path / "scaling_numbers.py"
    path.write_text(script, encoding="utf-8")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    r = subprocess.run([sys.executable, str(path)], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == tables
    assert "pretraining model **106,143,056**" in tables and "**163.7 GFLOPs**" in tables
