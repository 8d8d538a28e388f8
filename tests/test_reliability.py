"""Issue #8: a pretraining run survives SIGKILL/SIGTERM bit for bit, bad checkpoints, failed saves, bad images, NaNs.

The run-level tests start ``python -m beitv2_jax.main`` on a tiny pretraining config (16-px images, a 2-block
ViT, 12 steps, a checkpoint and a metrics row every step). To keep restarts cheap all runs share one persistent
compilation cache, compile with XLA's cheap CPU settings (the same for every run, so bit-exact comparisons hold)
and do not see torch (tensorboardX imports it when installed, ~3 s per start; nothing in these runs needs it).
"""
import errno
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from beitv2_jax.data import sources, transforms
from beitv2_jax.train import checkpoint as ckpt_lib

from conftest import REPO_ROOT, hidden_torch_dir

TOTAL_STEPS = 12
CURVE_KEYS = ("loss", "loss_1", "loss_2", "mlm_acc_1", "mlm_acc_2", "grad_norm", "lr")
TOKENIZER = dict(image_size=16, patch_size=4, width=16, depth=1, num_heads=2, decoder_depth=1, num_codes=32,
                 code_dim=8, teacher_dim=16, kmeans_init=False, dtype="float32")

CONFIG_TEMPLATE = '''
from beitv2_jax import recipes


def get_config():
    c = recipes.beitv2_pretrain("base", 300)
    c.data.dataset = "beitv2_demo"
    c.data.eval_split = "test"
    c.data.input_size = c.data.second_input_size = 16
    c.data.patch_size = 4
    c.data.num_masked_patches = 6
    c.data.min_mask_patches_per_block = 2
    c.data.num_workers = 0
    c.data.read_threads = 1
    c.data.prefetch_batches = 1
    c.batch_size = 8
    c.steps_per_epoch = 4
    c.num_epochs = 3
    c.log_every_steps = 1
    c.checkpoint_every_steps = 1
    c.keep_checkpoints = 3
    c.model.update(width=16, depth=2, num_heads=2, patch_size=4, vocab_size=32, early_layers=1, head_layers=1,
                   drop_path_rate=0.1)
    c.optim.update(warmup_epochs=1)
{overrides}
    return c
'''


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and helpers.
# ---------------------------------------------------------------------------------------------------------------


def make_tokenizer(directory: str) -> None:
    """A tiny VQ-KD tokenizer with random weights (shapes from ``eval_shape``: no compilation)."""
    from beitv2_jax.convert import store
    from beitv2_jax.models import vqkd as vqkd_lib

    model = vqkd_lib.build_vqkd(TOKENIZER)
    shapes = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    store.save_variables(directory, variables, "vqkd", TOKENIZER)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_data_dir):
    """``(root, env)``: a tokenizer in ``root/tokenizer`` and the subprocess environment (shared compile cache)."""
    root = tmp_path_factory.mktemp("reliability")
    make_tokenizer(str(root / "tokenizer"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
               PYTHONPATH=os.pathsep.join([hidden_torch_dir(root), REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    return root, env, demo_data_dir


def write_config(setup, name: str, **overrides) -> str:
    """A config file for the tiny run; ``overrides`` are ``section__key=value`` (``__`` for ``.``)."""
    root, _, data_dir = setup
    values = {"data.data_dir": data_dir, "tokenizer.checkpoint": str(root / "tokenizer")}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    lines = "\n".join(f"    c.{k} = {v!r}" for k, v in values.items())
    path = root / f"{name}.py"
    path.write_text(CONFIG_TEMPLATE.replace("{overrides}", lines))
    return str(path)


def main_command(config: str, workdir: str) -> list:
    return [sys.executable, "-m", "beitv2_jax.main", "--config", config, "--workdir", workdir]


def run_main(setup, config: str, workdir: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(config, workdir), cwd=REPO_ROOT, env=setup[1], capture_output=True, text=True,
                          timeout=timeout)


def start_and_signal(setup, config: str, workdir: str, at_step: int, sig: int, timeout: float = 240,
                     group: bool = False):
    """Start a run, send ``sig`` once a metrics row of step >= ``at_step`` is written; ``(returncode, stderr)``.
    ``group``: to the run's whole process group (its data workers too), as a terminal sends Ctrl-C."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    offset = os.path.getsize(metrics) if os.path.exists(metrics) else 0
    with open(os.path.join(os.path.dirname(workdir), f"stderr_{os.path.basename(workdir)}.txt"), "w+") as err:
        proc = subprocess.Popen(main_command(config, workdir), cwd=REPO_ROOT, env=setup[1], stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=group)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _new_steps(metrics, offset) and max(_new_steps(metrics, offset)) >= at_step:
                os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
                break
            time.sleep(0.02)
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
        err.seek(0)
        return proc.returncode, err.read()


def _new_steps(path: str, offset: int) -> list:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        f.seek(offset)
        return [json.loads(line)["step"] for line in f.read().splitlines() if line.endswith("}")]


def metric_rows(workdir: str) -> dict:
    """``{step: [row, ...]}`` with every row logged for that step (a resumed run logs some steps again)."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            rows.setdefault(row["step"], []).append(row)
    return rows


def loss_curve(workdir: str) -> dict:
    """``{step: (loss, ...)}``; asserts that the rows logged twice for a step (after a restart) agree bit for bit."""
    curve = {}
    for step, rows in metric_rows(workdir).items():
        values = {tuple(row[k] for k in CURVE_KEYS) for row in rows}
        assert len(values) == 1, f"step {step} logged with different values: {values}"
        curve[step] = values.pop()
    return curve


def final_params(workdir: str):
    from beitv2_jax.convert import store

    return store.load_variables(os.path.join(workdir, "model"))[0]["params"]


def assert_same_run(reference_dir: str, workdir: str) -> None:
    curve, expected = loss_curve(workdir), loss_curve(reference_dir)
    assert sorted(curve) == list(range(1, TOTAL_STEPS + 1))
    assert curve == expected
    ref, got = final_params(reference_dir), final_params(workdir)
    assert jax.tree.structure(ref) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


def checkpoint_steps(workdir: str) -> list:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def checkpoint_state(workdir: str, step: int) -> dict:
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run (its workdir)."""
    workdir = str(setup[0] / "reference")
    result = run_main(setup, write_config(setup, "base"), workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):  # read by the log-file test
        (setup[0] / f"reference_{name}.txt").write_text(text)
    return workdir


# ---------------------------------------------------------------------------------------------------------------
# Kill and preemption: exact resume.
# ---------------------------------------------------------------------------------------------------------------


def test_sigkill_at_three_random_steps_resumes_bit_exact(setup, reference):
    config = write_config(setup, "base")
    workdir = str(setup[0] / "killed")
    kill_steps = sorted(np.random.default_rng(20240817).choice(np.arange(2, TOTAL_STEPS - 1), 3, replace=False))
    for step in kill_steps:
        code, stderr = start_and_signal(setup, config, workdir, int(step), signal.SIGKILL)
        assert code == -signal.SIGKILL, f"run to be killed at step {step} ended by itself ({code}): {stderr[-2000:]}"
    result = run_main(setup, config, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(reference, workdir)


def test_sigterm_saves_that_step_exits_zero_and_resumes_bit_exact(setup, reference):
    config = write_config(setup, "base")
    workdir = str(setup[0] / "terminated")
    code, stderr = start_and_signal(setup, config, workdir, 5, signal.SIGTERM)
    assert code == 0, stderr[-3000:]
    stopped = int(stderr.split("preempted: stopped at step ")[1].split()[0])
    assert 5 <= stopped < TOTAL_STEPS
    assert checkpoint_steps(workdir)[-1] == stopped
    assert max(loss_curve(workdir)) == stopped
    assert not os.path.exists(os.path.join(workdir, "model"))  # stopped before the end: nothing exported
    result = run_main(setup, config, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(reference, workdir)


def test_log_file_has_one_plain_line_per_window_and_namespaced_tensorboard_tags(setup, reference):
    """stdout and stderr are files here (as in a SLURM job): no tqdm redraws (no carriage return), one plain line
    per logging window (every step here) with the row's metrics; every TensorBoard tag in train/, data/, text/."""
    from beitv2_jax.train import metrics

    stdout, stderr = ((setup[0] / f"reference_{name}.txt").read_text() for name in ("stdout", "stderr"))
    assert "\r" not in stdout + stderr
    lines = [line for line in stdout.splitlines() if " pretrain step " in line]
    assert [line.split(" step ")[1].split()[0] for line in lines] == [f"{s}/{TOTAL_STEPS}" for s in
                                                                      range(1, TOTAL_STEPS + 1)]
    rows = metric_rows(reference)
    for step, line in enumerate(lines, 1):
        fields = dict(kv.split("=") for kv in line.split()[4:])
        assert float(fields["loss"]) == pytest.approx(rows[step][0]["loss"], rel=1e-3)
        assert {"lr", "mlm_acc_1", "img_per_sec", "data_wait_s", "step_s", "bad_records"} <= set(fields)
    tags = {tag for _, tag, _, _ in metrics.read_events(os.path.join(reference, "tensorboard"))}
    assert {"train/loss", "train/mlm_acc_1", "data/wait_s", "data/bad_records", "text/config/text_summary"} <= tags
    assert all(tag.split("/")[0] in ("train", "data", "text", "_hparams_") for tag in tags), sorted(tags)


def test_resume_with_another_num_workers_and_ctrl_c_is_bit_exact(setup, reference):
    """data.num_workers 0 -> 2 -> 0 across a SIGTERM stop and a Ctrl-C (SIGINT to the whole process group, as a
    terminal sends it: the two grain workers get it too): Ctrl-C is handled like SIGTERM (that step saved, exit 0, no
    traceback), and the losses and the final parameters are those of the uninterrupted run (the data iterator's
    state is the global batch index, the same for any worker count)."""
    workdir = str(setup[0] / "workers")
    serial, prefetched = write_config(setup, "base"), write_config(setup, "workers2", data__num_workers=2)
    stopped = [0]
    for config, at_step, sig, reason in ((serial, 3, signal.SIGTERM, "preempted"),
                                         (prefetched, 7, signal.SIGINT, "interrupted (Ctrl-C)")):
        code, stderr = start_and_signal(setup, config, workdir, at_step, sig, group=sig == signal.SIGINT)
        assert code == 0, stderr[-3000:]
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
        stopped.append(int(stderr.split(f"{reason}: stopped at step ")[1].split()[0]))
        assert stopped[-2] < stopped[-1] < TOTAL_STEPS, stopped
        data = ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).restore(
            stopped[-1], args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        assert data["iterator"] == {"next_batch": stopped[-1]}
    result = run_main(setup, serial, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at step {stopped[-1]}" in result.stderr
    assert_same_run(reference, workdir)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite guard.
# ---------------------------------------------------------------------------------------------------------------


def test_injected_nan_is_skipped_counted_and_too_many_stop_the_run(setup):
    config = write_config(setup, "nan", inject_nan_steps=[3, 7, 8], max_bad_steps=2, keep_checkpoints=20)
    workdir = str(setup[0] / "nan")
    result = run_main(setup, config, workdir)
    assert result.returncode == 1, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: 2 consecutive steps") and "config.max_bad_steps=2" in last_line, last_line
    rows = {step: rows[-1] for step, rows in metric_rows(workdir).items()}
    assert rows[3]["nonfinite"] == 1.0 and math.isnan(rows[3]["loss"])
    assert rows[4]["nonfinite"] == 0.0 and rows[4]["nonfinite_steps"] == 1.0 and math.isfinite(rows[4]["loss"])
    assert rows[8]["nonfinite_steps"] == 3.0
    # No checkpoint is written while a streak of skipped steps is open (3 and 7), and the run stopped at step 8
    # (2nd bad step in a row) without saving it; the newest checkpoint holds good parameters.
    assert checkpoint_steps(workdir) == [1, 2, 4, 5, 6]
    after = checkpoint_state(workdir, 4)
    assert int(after["extra"]["bad_steps"]) == 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(checkpoint_state(workdir, 6)["params"]))
    assert "the newest checkpoint, step 6 in" in last_line


def test_non_finite_guard_fetches_once_per_window_and_a_later_good_step_does_not_hide_the_limit(monkeypatch):
    """No host sync per step: the flags of a 5-step window come back in one device_get; a streak that reached
    max_bad_steps (steps 2-3) still stops the run after the good steps 4-5 of the same window, and the first
    diverged loss (step 9) is reported although step 10 is back to normal."""
    from beitv2_jax.train import loop

    fetches = []
    original = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: fetches.append(1) or original(x))
    guard = loop.NonFiniteGuard(max_bad_steps=2, check_every=5)
    for step, bad in enumerate([0, 1, 1, 0], start=1):
        guard.push(step, jnp.float32(bad), jnp.float32(1.0))
    assert fetches == [] and guard.total == 0  # nothing fetched inside the window
    guard.push(5, jnp.float32(0), jnp.float32(1.0))
    assert fetches == [1] and guard.total == 2 and guard.streak == 0 and not guard.suspect
    with pytest.raises(loop.NonFiniteError, match=r"^2 consecutive steps \(up to step 3\)"):
        guard.check()

    guard = loop.NonFiniteGuard(max_bad_steps=2, divergence_factor=10.0, check_every=100)
    for step in range(1, 11):
        guard.push(step, jnp.float32(0), jnp.float32(1000.0 if step == 9 else 1.0))
    guard.flush()  # the loop's flush at a logging window or before a save
    with pytest.raises(loop.DivergenceError, match="diverged at step 9: 1000"):
        guard.check()


# ---------------------------------------------------------------------------------------------------------------
# Bad data.
# ---------------------------------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def odd_images() -> dict:
    """``{file name: bytes}``: valid images in unusual modes and sizes (13) and corrupt files (3)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))
    gray16 = Image.fromarray((rng.integers(0, 65536, (20, 22))).astype(np.uint16))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    jpeg = _encode(rgb, "JPEG", quality=90)
    files = {
        "rgb.jpg": jpeg, "rgb.png": _encode(rgb, "PNG"), "gray.jpg": _encode(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"), "rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "la.png": _encode(rgb.convert("LA"), "PNG"), "palette.png": _encode(palette, "PNG"),
        "gray16.png": _encode(gray16, "PNG"), "bilevel.png": _encode(rgb.convert("1"), "PNG"),
        "tiny.png": _encode(rgb.resize((5, 3)), "PNG"), "thin.png": _encode(rgb.resize((40, 2)), "PNG"),
        "big.gif": _encode(rgb.resize((64, 48)), "GIF"), "rgb.bmp": _encode(rgb, "BMP"),
        "truncated.jpg": jpeg[:len(jpeg) // 2], "garbage.png": rng.integers(0, 256, 300, dtype=np.uint8).tobytes(),
        "empty.jpg": b"",
    }
    return files


CORRUPT = ("truncated.jpg", "garbage.png", "empty.jpg")


@pytest.mark.parametrize("name", sorted(odd_images()))
def test_decode_converts_odd_formats_and_rejects_corrupt_files(name):
    data = odd_images()[name]
    if name in CORRUPT:
        with pytest.raises(transforms.UndecodableImageError, match="cannot decode"):
            transforms.decode_image(data)
        return
    image = transforms.decode_image(data)
    assert image.mode == "RGB" and min(image.size) >= 1
    if name == "gray16.png":  # 16-bit values are scaled, not clipped
        expected = np.round(np.asarray(Image.open(io.BytesIO(data)), np.float32) / 257.0)
        np.testing.assert_array_equal(np.asarray(image)[..., 0], expected)


def test_decode_16_bit_array_and_small_images_through_the_transforms():
    image = transforms.decode_image(np.array([[0, 257, 65535]], np.uint16))
    np.testing.assert_array_equal(np.asarray(image)[0, :, 0], [0, 1, 255])
    record = {"image": np.zeros((3, 5, 3), np.uint8)}
    out = transforms.PretrainTransform(input_size=16, second_input_size=16, patch_size=4, num_masked_patches=6,
                                       min_mask_patches_per_block=2).random_map(record, np.random.default_rng(0))
    assert out["image"].shape == (16, 16, 3) and out["mask"].sum() == 6
    assert transforms.EvalTransform(input_size=16).map(record)["image"].shape == (16, 16, 3)


def test_decoded_source_replaces_bad_records_deterministically(caplog):
    good = _encode(Image.new("RGB", (4, 4), (10, 20, 30)), "PNG")
    records = [{"image": good if i not in (2, 3, 5) else b"broken", "label": i,
                "file_name": f"f{i}.png".encode()} for i in range(6)]
    source = transforms.DecodedSource(records)
    with caplog.at_level(logging.WARNING):
        out = [source[i] for i in range(6)]
    assert [int(o["label"]) for o in out] == [0, 1, 4, 4, 4, 0]  # the next decodable record, wrapping around
    assert [int(o["bad_records"]) for o in out] == [0, 0, 1, 1, 0, 1]
    assert all(o["image"].shape == (4, 4, 3) and o["image"].dtype == np.uint8 for o in out)
    warned = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
    assert len(warned) == 3 and all(any(f"'f{i}.png'" in w for w in warned) for i in (2, 3, 5))
    with pytest.raises(transforms.BadDataError, match="cannot be decoded"):
        transforms.DecodedSource([{"image": b"x"}] * 4)[0]


def test_corrupt_and_odd_images_train_and_skips_are_counted(setup, tmp_path):
    src = tmp_path / "images" / "things"
    src.mkdir(parents=True)
    for name, data in odd_images().items():
        (src / name).write_bytes(data)
    data_dir = str(tmp_path / "tfds")
    # verify=False: the corrupt files reach training, which replaces and counts them (prepare-time verification,
    # the default, would leave them out: test_prepare_folder_verifies_every_image)
    sources.prepare_image_folder(str(tmp_path / "images"), data_dir, name="odd_images", verify=False)
    config = write_config(setup, "odd", data__dataset="odd_images", data__data_dir=data_dir, steps_per_epoch=2,
                          num_epochs=1)  # 16 images, batch 8: one pass over the data
    workdir = str(tmp_path / "odd")
    result = run_main(setup, config, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metric_rows(workdir)
    assert rows[2][-1]["bad_records"] == len(CORRUPT)
    assert all(math.isfinite(r[-1]["loss"]) for r in rows.values())
    for name in CORRUPT:
        assert f"skipping bad image 'things/{name}'" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: unreadable newest step, failed writes.
# ---------------------------------------------------------------------------------------------------------------


def _tree(value: float) -> dict:
    return {"w": jnp.full((4,), value, jnp.float32), "b": jnp.arange(50, dtype=jnp.float32) + value}


def _truncate_files(directory) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


def test_truncated_latest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    manager = ckpt_lib.make_manager(str(tmp_path))
    for step in (1, 2, 3):
        assert ckpt_lib.save(manager, step, _tree(step), {"iterator": {"n": step}}, required=True)
    _truncate_files(tmp_path / "checkpoints" / "3" / "state")
    half_written = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp" / "state"  # a save killed midway
    half_written.mkdir(parents=True)
    (half_written / "_METADATA").write_text("{")
    manager = ckpt_lib.make_manager(str(tmp_path))
    assert manager.all_steps() == [1, 2, 3]
    with caplog.at_level(logging.WARNING):
        state, data, step = ckpt_lib.restore_latest(manager, _tree(0))
    assert step == 2 and data == {"iterator": {"n": 2}} and float(state["w"][0]) == 2.0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint step 3" in messages and "cannot be read" in messages and "checkpoints_unreadable" in messages
    assert (tmp_path / "checkpoints_unreadable" / "3").is_dir() and manager.all_steps() == [1, 2]
    assert ckpt_lib.save(manager, 3, _tree(3), required=True)  # the step is written again after the resume
    _truncate_files(tmp_path / "checkpoints")  # nothing readable: refuse rather than start from scratch
    with pytest.raises(ckpt_lib.CheckpointError, match="none of the checkpoints"):
        ckpt_lib.restore_latest(ckpt_lib.make_manager(str(tmp_path)), _tree(0))


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


async def _no_space_async(*args, **kwargs):
    _no_space()


# The simulated blocking failure leaves one of orbax's asyncio callbacks to a closed event loop (harmless).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("where", ["background", "blocking"])
def test_failed_save_keeps_the_previous_checkpoint_and_reports(tmp_path, caplog, monkeypatch, where):
    manager = ckpt_lib.make_manager(str(tmp_path), max_to_keep=1)
    assert ckpt_lib.save(manager, 1, _tree(1), required=True)
    handler = ocp.handlers.JsonCheckpointHandler
    monkeypatch.setattr(handler, "_save_fn" if where == "background" else "async_save", _no_space_async)
    with caplog.at_level(logging.ERROR):
        ckpt_lib.save(manager, 2, _tree(2))
        ckpt_lib.wait(manager)
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "saving checkpoint step 2" in errors and "No space left" in errors and "step 1, is kept" in errors
    assert checkpoint_steps(str(tmp_path)) == [1] and manager.latest_step() == 1
    assert ckpt_lib.restore_latest(ckpt_lib.make_manager(str(tmp_path)), _tree(0))[2] == 1
    with pytest.raises(ckpt_lib.CheckpointError, match="No space left|could not be written"):
        ckpt_lib.save(manager, 3, _tree(3), required=True)  # a final / preemption save must not fail silently
    monkeypatch.undo()
    assert ckpt_lib.save(manager, 4, _tree(4), required=True)
    assert checkpoint_steps(str(tmp_path)) == [4]


# ---------------------------------------------------------------------------------------------------------------
# Issue #17: silent corruption, divergence, double starts, full disks, orphans, incompatible configs, prepare-folder.
# ---------------------------------------------------------------------------------------------------------------


def _flip_bytes_in_largest_file(step_dir, count: int = 64) -> str:
    """Invert ``count`` bytes in the middle of the largest file under ``step_dir`` (size unchanged)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    path = max(files, key=os.path.getsize)
    middle = os.path.getsize(path) // 2
    with open(path, "r+b") as f:
        f.seek(middle)
        data = f.read(count)
        f.seek(middle)
        f.write(bytes(255 - b for b in data))
    return path


def test_checkpoint_with_flipped_bytes_is_detected_by_its_digest(tmp_path, caplog):
    manager = ckpt_lib.make_manager(str(tmp_path))
    rng = np.random.default_rng(0)
    trees = {s: {"w": jnp.asarray(rng.standard_normal((64, 256)), jnp.float32), "b": jnp.arange(50.0) + s}
             for s in (1, 2)}
    for step, tree in trees.items():
        assert ckpt_lib.save(manager, step, tree, {"iterator": {"n": step}}, required=True)
    _flip_bytes_in_largest_file(tmp_path / "checkpoints" / "2")
    with ocp.StandardCheckpointer() as checkpointer:  # the array store itself reads the changed bytes silently
        silent = checkpointer.restore(str(tmp_path / "checkpoints" / "2" / "state"))
    assert not np.array_equal(silent["w"], trees[2]["w"])
    with caplog.at_level(logging.WARNING):
        state, data, step = ckpt_lib.restore_latest(ckpt_lib.make_manager(str(tmp_path)), trees[1])
    assert step == 1 and data == {"iterator": {"n": 1}}
    np.testing.assert_array_equal(state["w"], trees[1]["w"])
    assert "the data of array w does not match the digest" in caplog.text
    assert (tmp_path / "checkpoints_unreadable" / "2").is_dir()


def test_digest_changes_with_any_single_bit():
    x = jnp.asarray(np.random.default_rng(1).standard_normal(1000), jnp.float32)
    base = ckpt_lib.state_digest({"x": x, "k": jnp.arange(3, dtype=jnp.uint32), "h": x.astype(jnp.bfloat16)})
    bits = np.asarray(x).view(np.uint32).copy()
    for index, bit in ((0, 0), (517, 31), (999, 13)):
        flipped = bits.copy()
        flipped[index] ^= np.uint32(1 << bit)
        changed = ckpt_lib.state_digest({"x": jnp.asarray(flipped.view(np.float32)), "k": jnp.arange(3, dtype=jnp.uint32),
                                         "h": x.astype(jnp.bfloat16)})
        assert changed["x"] != base["x"] and changed["k"] == base["k"]


def test_flipped_bytes_in_newest_checkpoint_resume_from_the_previous_bit_exact(setup, reference):
    config = write_config(setup, "base")
    workdir = str(setup[0] / "flipped")
    code, stderr = start_and_signal(setup, config, workdir, 6, signal.SIGKILL)
    assert code == -signal.SIGKILL, stderr[-2000:]
    newest = checkpoint_steps(workdir)[-1]
    _flip_bytes_in_largest_file(os.path.join(workdir, "checkpoints", str(newest), "state"))
    result = run_main(setup, config, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    # Detected either by the digest (the bytes fell in array data) or by the array store itself (they fell in an
    # OCDBT index node or a chunk header: where the middle of the largest file lands depends on the async write
    # order); the digest path alone is asserted deterministically in test_checkpoint_with_flipped_bytes_is_detected_...
    assert re.search(rf"checkpoint step {newest} in \S+ cannot be read", result.stderr), result.stderr[-3000:]
    assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", str(newest)))
    ref, got = final_params(reference), final_params(workdir)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_divergence_stops_before_saving_and_names_the_good_checkpoint(setup):
    config = write_config(setup, "diverge", optim__lr=1e3)  # the loss goes 7 → 9e5 at step 3 (then 8e9, NaN)
    workdir = str(setup[0] / "diverge")
    result = run_main(setup, config, workdir)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the loss diverged at step 3") and "config.divergence_factor=10" in last
    assert f"the newest checkpoint, step 2 in {workdir}/checkpoints, was written before it" in last
    assert checkpoint_steps(workdir) == [1, 2]
    assert not os.path.exists(os.path.join(workdir, "model"))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(checkpoint_state(workdir, 2)["params"]))


def test_update_that_makes_parameters_non_finite_is_skipped():
    import optax

    from beitv2_jax.models import vit
    from beitv2_jax.train import state as state_lib
    from beitv2_jax.train.tasks import finetune

    model = vit.VisionTransformer(image_size=8, patch_size=4, width=8, depth=1, num_heads=2, num_classes=3)
    params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"])
    tx = optax.adamw(learning_rate=float("nan"))  # finite loss and gradients, NaN parameters after the update
    state = state_lib.create(params, tx, extra={"bad_steps": jnp.zeros((), jnp.int32)})
    mixup = finetune.augment.Mixup(num_classes=3, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
    step = jax.jit(finetune.make_train_step(model, tx, lambda s: 0.0, mixup))
    batch = {"image": jnp.ones((2, 8, 8, 3)), "label": jnp.array([0, 2])}
    new, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 1.0
    assert int(new.step) == 1 and int(new.extra["bad_steps"]) == 1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)


def test_second_run_on_the_same_workdir_is_refused_and_the_first_finishes(setup, reference):
    config = write_config(setup, "base")
    workdir = str(setup[0] / "double")
    metrics = os.path.join(workdir, "metrics.jsonl")
    with open(os.path.join(str(setup[0]), "stderr_double_first.txt"), "w+") as err:
        first = subprocess.Popen(main_command(config, workdir), cwd=REPO_ROOT, env=setup[1],
                                 stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 240
        while not _new_steps(metrics, 0) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run_main(setup, config, workdir)
        assert first.wait(timeout=240) == 0
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: --workdir {workdir} is in use by another run (pid {first.pid} on ")
    assert "Traceback" not in second.stderr
    assert_same_run(reference, workdir)
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]


def test_metrics_rows_stay_whole_when_the_disk_is_full(tmp_path, caplog):
    from beitv2_jax import storage
    from beitv2_jax.train import metrics as metrics_lib

    writer = metrics_lib.MetricsWriter(str(tmp_path), enabled=True)
    writer.write_scalars(1, {"loss": 1.0})
    log = writer._jsonl
    real = log._file

    class FullDisk:  # writes half of what it is given to the file, then fails like a full disk
        def tell(self):
            return real.tell()

        def write(self, text):
            real.write(text[: len(text) // 2])
            real.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            real.close()

    log._file = FullDisk()
    with caplog.at_level(logging.ERROR):
        writer.write_scalars(2, {"loss": 2.0})
    assert "metrics row of step 2 not written" in caplog.text and "No space left" in caplog.text
    writer.write_scalars(3, {"loss": 3.0})  # the disk has room again
    writer.close()
    assert [r["step"] for r in metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 3]
    # A torn last line (a process killed mid-write) is cut when the log is opened again.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    log = storage.AppendLog(str(tmp_path / "metrics.jsonl"))
    assert log.repaired == len('{"step": 4, "lo')
    log.append('{"step": 4}\n')
    log.close()
    assert [r["step"] for r in metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 3, 4]


def _processes_with(tag: str) -> list:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_sigkill_with_two_workers_leaves_no_orphans(setup):
    tag = f"BEITV2_ORPHAN_TEST={os.getpid()}"
    config = write_config(setup, "orphans", data__num_workers=2)
    workdir = str(setup[0] / "orphans")
    env = dict(setup[1], BEITV2_ORPHAN_TEST=str(os.getpid()))
    code, stderr = start_and_signal((setup[0], env, setup[2]), config, workdir, 2, signal.SIGKILL)
    assert code == -signal.SIGKILL, stderr[-2000:]
    deadline = time.monotonic() + 10
    while _processes_with(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(tag) == []


def test_incompatible_config_change_is_named_and_leaves_config_json(setup, reference, tmp_path):
    import shutil

    workdir = str(tmp_path / "changed")
    shutil.copytree(reference, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        before = f.read()
    changed = write_config(setup, "wider", model__width=32, allow_config_change=True)
    result = run_main(setup, changed, workdir)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint step 12 in ") and "does not fit this config: params/" in last
    assert "(16,) there and (32,) in the model" in last or "16" in last
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == before
    assert checkpoint_steps(workdir) == checkpoint_steps(reference)  # nothing moved aside
    result = run_main(setup, write_config(setup, "base"), workdir)  # the original command still runs
    assert result.returncode == 0, result.stderr[-3000:]


def test_prepare_folder_verifies_every_image_and_refuses_another_source(tmp_path):
    src, other = tmp_path / "images" / "things", tmp_path / "other" / "stuff"
    src.mkdir(parents=True)
    other.mkdir(parents=True)
    for name, data in odd_images().items():
        (src / name).write_bytes(data)
    (other / "one.png").write_bytes(odd_images()["rgb.png"])
    data_dir = str(tmp_path / "tfds")
    sources.prepare_image_folder(str(tmp_path / "images"), data_dir, name="odd")
    record = sources.preparation_record("odd", data_dir)
    assert record["num_bad_images"] == 3 and sorted(record["bad_images"]) == sorted(f"things/{n}" for n in CORRUPT)
    assert len(sources.open_source("odd", "train", data_dir)) == len(odd_images()) - 3
    with pytest.raises(ValueError, match="was prepared from .*images, not .*other; pass --overwrite"):
        sources.prepare_image_folder(str(tmp_path / "other"), data_dir, name="odd")
    sources.prepare_image_folder(str(tmp_path / "other"), data_dir, name="odd", overwrite=True)
    assert len(sources.open_source("odd", "train", data_dir)) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No class sub-folders"):  # a failed preparation leaves no lock behind
        sources.prepare_image_folder(str(tmp_path / "empty"), data_dir, name="empty")
    assert not [n for n in os.listdir(data_dir) if n.endswith(".lock")]
    for argv, message in ((["--src", str(tmp_path / "nope")], "is not a folder"),
                          (["--src", str(tmp_path / "images"), "--name", "Bad-Name"], "must match")):
        with pytest.raises(SystemExit) as info:
            sources._main(["prepare-folder", "--data_dir", data_dir, *argv])
        assert info.value.code == 2


@pytest.fixture()
def small_disk(tmp_path):
    """A 8 MiB tmpfs (needs root, as in CI; skipped where mounting is not allowed)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_mid_run_keeps_a_checkpoint_and_whole_metrics_rows(setup, reference, small_disk):
    config = write_config(setup, "base")
    workdir = str(small_disk / "run")
    metrics = os.path.join(workdir, "metrics.jsonl")
    filler = small_disk / "filler"
    with open(os.path.join(str(setup[0]), "stderr_disk_full.txt"), "w+") as err:
        proc = subprocess.Popen(main_command(config, workdir), cwd=REPO_ROOT, env=setup[1], stdout=subprocess.DEVNULL,
                                stderr=err)
        deadline = time.monotonic() + 240
        while max(_new_steps(metrics, 0), default=0) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        # Fill the disk: every later write fails with ENOSPC. Unbuffered, so that closing the file has nothing left
        # to flush (a buffered close would raise ENOSPC again).
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        code = proc.wait(timeout=240)
        err.seek(0)
        stderr = err.read()
    assert code == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1].strip()  # after the progress bar's carriage return
    assert last.startswith("error: ") and "No space left on device" in last and "is kept" in last, last
    assert "Exception in thread" not in stderr  # the TensorBoard writer thread survives the full disk (no hang)
    kept = checkpoint_steps(workdir)
    assert kept and kept[-1] < TOTAL_STEPS
    filler.unlink()
    result = run_main(setup, config, workdir)  # space again: resume from the kept checkpoint
    assert result.returncode == 0, result.stderr[-3000:]
    with open(metrics, encoding="utf-8") as f:
        assert all(json.loads(line) for line in f)  # no torn line glued to a later row
    assert_same_run(reference, workdir)


EXIT_WITH_NOISY_THREAD = r'''
import os, sys, threading, time
from beitv2_jax import main

def noise():  # an abandoned background writer, like orbax's event loop after a failed save or a C++ logger
    while True:
        sys.stderr.write("RuntimeError: Event loop is closed\n")
        sys.stderr.flush()
        os.write(2, b"RuntimeError: Event loop is closed\n")

for _ in range(2):
    threading.Thread(target=noise, daemon=True).start()
time.sleep(0.2)
main._exit_now("error: the one line", code=1)
'''


def test_the_error_line_is_last_even_while_other_threads_write_to_stderr():
    """CI once saw 'RuntimeError: Event loop is closed' printed by an abandoned save thread after the error line."""
    for _ in range(5):
        proc = subprocess.run([sys.executable, "-c", EXIT_WITH_NOISY_THREAD], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert "Event loop is closed" in proc.stderr and lines[-1] == "error: the one line", lines[-3:]
