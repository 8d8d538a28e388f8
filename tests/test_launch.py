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
import threading
import time

import pytest

from conftest import REPO_ROOT

TPU = os.path.join(REPO_ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO_ROOT, "launch", "slurm.sbatch")
LOCAL = os.path.join(REPO_ROOT, "launch", "local_gpu.sh")
BASE = "configs/beitv2_base_pt1k_1600e.py"
LARGE = "configs/beitv2_large_pt1k_1600e.py"
OVERRIDES = ["--config.dtype=bfloat16", "--config.mesh.fsdp=4", "--config.data.data_dir=/data/my tfds"]


def _script_value(script, name):
    """The value a launcher assigns to ``name`` (``NAME="..."`` then ``NAME+=" ..."`` lines)."""
    return "".join(re.findall(rf'^{name}\+?="([^"]*)"$', open(script).read(), re.M))


GPU_FLAGS = _script_value(LOCAL, "GPU_XLA_FLAGS_DEFAULT")

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
    # the launchers add the caller's XLA_FLAGS to theirs: these tests expect none (the suite sets its own, conftest)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TPU_NAME", "PROJECT_ID", "ZONE", "XLA_FLAGS"))}
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
    """Run the printed --command on 4 fake workers: each gets worker 0 as coordinator, 4 processes, its own id; the
    run is detached (the command returns at once) and records its pid and, at its end, its status. On worker 0 a
    stale run of the same workdir (a process group recorded in the pid file) is stopped first."""
    env, log = stubs
    r = _run(TPU, [*TPU_ARGS, "--skip-setup", "--stop-wait", "5", "--dry-run", "--", *OVERRIDES], env)
    remote = _option(_commands(r.stdout)[0], "--command=")
    assert "LIBTPU_INIT_ARGS='--xla_tpu_enable_data_parallel_all_reduce_opt=true" in remote
    stale = None
    for worker in range(4):
        home, curl_dir = _fake_worker(tmp_path, endpoints, worker)
        worker_env = dict(env, HOME=str(home), PATH=f"{curl_dir}:{env['PATH']}")
        if worker == 0:
            (home / "beitv2_logs").mkdir()
            stale = subprocess.Popen(["sleep", "300"], start_new_session=True)
            reaper = threading.Thread(target=stale.wait, daemon=True)  # reaped at once: `kill -0` sees it gone
            reaper.start()
            (home / "beitv2_logs" / "base.pid").write_text(str(stale.pid))
        out = subprocess.run(["bash", "-c", remote], env=worker_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        status = home / "beitv2_logs" / "base.status"
        for _ in range(200):
            if status.exists() and status.read_text().strip():
                break
            time.sleep(0.05)
        assert status.read_text().strip() == "done"
        assert (home / "beitv2_logs" / f"base-worker{worker}.log").exists()
        assert int((home / "beitv2_logs" / "base.pid").read_text()) > 0
    assert stale.wait(timeout=10) == -15  # SIGTERM, as a run that should save its checkpoint
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
    assert cmd == ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3", f"XLA_FLAGS={GPU_FLAGS}", "python", *expected]
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


# ----------------------------------------------------------------------------------------------- Spot / watch
SPOT_ARGS = ["--tpu", "beitv2-v5p", "--zone", "us-east5-a", "--project", "my-project", "--create",
             "--accelerator-type", "v5p-128", "--spot", "--config", BASE, "--workdir", "gs://my-bucket/runs/base"]


def test_tpu_spot_watch_dry_run_prints_create_start_and_the_recovery(stubs):
    env, log = stubs
    r = _run(TPU, [*SPOT_ARGS, "--watch", "--dry-run", "--", *OVERRIDES], env)
    assert r.returncode == 0, r.stderr
    assert _calls(log) == []
    cmds = _commands(r.stdout)
    kinds = [" ".join(c[:5]) if c[0] == "gcloud" else c[0] for c in cmds]
    assert kinds == ["gcloud compute tpus tpu-vm create", "git", "gcloud compute tpus tpu-vm scp",
                     "gcloud compute tpus tpu-vm ssh", "gcloud compute tpus tpu-vm ssh",  # create, setup, start
                     "gcloud compute tpus tpu-vm describe", "gcloud compute tpus tpu-vm ssh",  # watch: state, status
                     "gcloud compute tpus tpu-vm delete", "gcloud compute tpus tpu-vm create", "git",
                     "gcloud compute tpus tpu-vm scp", "gcloud compute tpus tpu-vm ssh",
                     "gcloud compute tpus tpu-vm ssh",  # preempted slice: recreate, setup, start
                     "gcloud compute tpus tpu-vm ssh"]  # stopped run on a live slice: start
    create, start = cmds[0], cmds[4]
    assert {"--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5", "--spot"} <= set(create)
    assert cmds[8] == create and cmds[12] == start == cmds[13]
    remote = _option(start, "--command=")
    for piece in ("--workdir=gs://my-bucket/runs/base", "setsid nohup", "rm -f /tmp/libtpu_lockfile",
                  "kill -TERM -- -$P", "export LIBTPU_INIT_ARGS=", "> $HOME/beitv2_logs/base.pid"):
        assert piece in remote, piece
    assert "--worker=0" in cmds[6] and "--format=value(state)" in cmds[5]
    queued = _commands(_run(TPU, [*SPOT_ARGS, "--queued", "--dry-run"], env).stdout)[0]
    assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "beitv2-v5p-qr"]
    assert {"--node-id=beitv2-v5p", "--runtime-version=v2-alpha-tpuv5", "--spot"} <= set(queued)


def test_tpu_pins_a_jax_version_allowed_by_requirements(stubs):
    from packaging.requirements import Requirement

    pinned = re.search(r"^JAX_VERSION_DEFAULT=(\S+)$", open(TPU).read(), re.M).group(1)
    (jax_req,) = [Requirement(line.strip()) for line in open(os.path.join(REPO_ROOT, "requirements.txt"))
                  if line.startswith("jax") and not line.startswith("jaxlib")]
    assert jax_req.specifier.contains(pinned)
    env, _ = stubs
    setup = _commands(_run(TPU, ["--tpu", "t", "--zone", "z", "--setup-only", "--dry-run"], env).stdout)[-1]
    assert f'"jax[tpu]=={pinned}"' in _option(setup, "--command=")


# A gcloud that plays a Spot slice: `describe` answers the next state of $STATES, an ssh to worker 0 the next
# status of $STATUSES (the watch's poll); every call is recorded.
FAKE_GCLOUD = """#!{python}
import json, os, sys
state = json.load(open(os.environ["FAKE_STATE"]))
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"name": "gcloud", "argv": args}}) + "\\n")
if "--worker=all" in args and state.get("fail_starts", 0) and "beitv2_jax.main" in " ".join(args):
    state["fail_starts"] -= 1
    json.dump(state, open(os.environ["FAKE_STATE"], "w"))
    sys.exit(255)  # ssh's exit status when the connection fails
if "describe" in args:
    print(state["states"].pop(0))
elif "ssh" in args and "--worker=0" in args:
    print(state["statuses"].pop(0))
json.dump(state, open(os.environ["FAKE_STATE"], "w"))
"""


def test_tpu_watch_recreates_a_preempted_slice_and_restarts_a_stopped_run(stubs, tmp_path):
    env, log = stubs
    _write_exe(tmp_path / "bin" / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    state = tmp_path / "state.json"
    # poll 1: running; poll 2: slice preempted -> recreate (2 describes while it comes up); poll 3: the run
    # stopped (preempted on a live slice) -> start; poll 4: done -> exit 0
    state.write_text(json.dumps({"states": ["READY", "PREEMPTED", "CREATING", "READY", "READY", "READY"],
                                 "statuses": ["running", "preempted", "done"]}))
    args = [*SPOT_ARGS, "--skip-setup", "--watch", "--poll", "0", "--", *OVERRIDES]
    printed = _commands(_run(TPU, ["--dry-run", *args], env).stdout)
    r = _run(TPU, args, dict(env, FAKE_STATE=str(state)))
    assert r.returncode == 0, r.stderr
    calls = [["gcloud", *c["argv"]] for c in _calls(log)]
    create, start, describe, status, delete = printed[0], printed[1], printed[2], printed[3], printed[4]
    archive_scp_setup = [c for c in calls if c[4] in ("scp",) or (c[4] == "ssh" and "--worker=all" in c
                                                                    and "pip install" in " ".join(c))]
    assert calls == [create, start,
                     describe, status,  # running
                     describe, delete, create, describe, describe, *archive_scp_setup, start,  # recreated
                     describe, status, start,  # preempted run on a READY slice
                     describe, status]  # done
    assert len(archive_scp_setup) == 2  # scp + install after the recreation (git archive runs here, not in gcloud)
    assert "run is done" in r.stderr and "recreating" in r.stderr and "starting it again" in r.stderr
    assert json.loads(state.read_text()) == {"states": [], "statuses": []}


def test_tpu_watch_stops_on_a_failed_run(stubs, tmp_path):
    env, log = stubs
    _write_exe(tmp_path / "bin" / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"states": ["READY"], "statuses": ["failed:1"]}))
    attach = [a for a in SPOT_ARGS if a != "--create"] + ["--skip-setup", "--watch", "--attach", "--poll", "0"]
    r = _run(TPU, attach, dict(env, FAKE_STATE=str(state)))
    assert r.returncode == 1 and "failed:1" in r.stderr
    assert [c["argv"][3] for c in _calls(log)] == ["describe", "ssh"]  # attached: nothing created or started


# ----------------------------------------------------------------------------------------------- gs://, XLA flags
def test_gs_workdirs_are_kept_by_every_launcher(stubs):
    env, _ = stubs
    r = _run(LOCAL, ["--config", BASE, "--workdir", "gs://b/runs/x", "--dry-run"], env)
    assert r.returncode == 0 and "--workdir=gs://b/runs/x" in _commands(r.stdout)[-1]
    r = _run(SLURM, ["--dry-run", "--config", BASE, "--workdir", "gs://b/runs/x"], _slurm_env(env))
    assert r.returncode == 0 and "--workdir=gs://b/runs/x" in _commands(r.stdout)[0]
    r = _run(TPU, ["--tpu", "t", "--zone", "z", "--skip-setup", "--config", BASE, "--workdir", "gs://b/runs/x",
                   "--dry-run"], env)
    assert r.returncode == 0 and "--workdir=gs://b/runs/x" in _option(_commands(r.stdout)[0], "--command=")


def test_gpu_xla_flags_are_known_to_the_installed_jaxlib(stubs):
    """The launchers' GPU flags (the same in local_gpu.sh and slurm.sbatch) parse: XLA aborts on an unknown flag."""
    assert _script_value(SLURM, "GPU_XLA_FLAGS_DEFAULT") == GPU_FLAGS and GPU_FLAGS.count("--xla_gpu_") == 2
    env = dict(os.environ, XLA_FLAGS=GPU_FLAGS, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-1000:]
    env, log = stubs
    r = _run(SLURM, ["--dry-run", "--config", BASE, "--workdir", "/w", "--xla-flags", ""], _slurm_env(env))
    task = _commands(r.stdout)[0][_commands(r.stdout)[0].index("-c") + 1]
    assert "XLA_FLAGS" not in task and "NCCL_DEBUG=${NCCL_DEBUG:-WARN}" in task


def test_tpu_watch_survives_a_failed_start(stubs, tmp_path):
    env, log = stubs
    _write_exe(tmp_path / "bin" / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"states": ["READY"] * 3, "statuses": ["none", "none", "done"], "fail_starts": 1}))
    attach = [a for a in SPOT_ARGS if a != "--create"] + ["--skip-setup", "--watch", "--attach", "--poll", "0"]
    r = _run(TPU, attach, dict(env, FAKE_STATE=str(state)))
    assert r.returncode == 0, r.stderr
    assert "start failed; the next poll retries" in r.stderr and "run is done" in r.stderr
    assert [c["argv"][3] for c in _calls(log)] == ["describe", "ssh", "ssh", "describe", "ssh", "ssh", "describe",
                                                   "ssh"]
