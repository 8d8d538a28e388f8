"""Your own images (issue #19): unlabelled folders, the hold-out split, split-name resolution, data checks before
compute in every task, per-stage demo overrides, step budgets with a floor and the raw-pixel baseline."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, hidden_torch_dir, load_config_file

from beitv2_jax import recipes, validate
from beitv2_jax.data import sources, transforms
from beitv2_jax.train.tasks import common


def _pngs(folder, count, seed=0, size=8):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A flat folder of 7 images (unlabelled) and a class folder (10 + 7 + 3 images) prepared with a 20 %
    hold-out, both in one data_dir."""
    root = tmp_path_factory.mktemp("own")
    _pngs(root / "flat", 7)
    for name, count in (("a", 10), ("b", 7), ("c", 3)):
        _pngs(root / "classes" / name, count, seed=count)
    data_dir = str(root / "tfds")
    sources.prepare_image_folder(str(root / "flat"), data_dir, name="flat")
    sources.prepare_image_folder(str(root / "classes"), data_dir, name="held", holdout=0.2, seed=0)
    return root, data_dir


def test_flat_folder_is_an_unlabelled_dataset(folders, tmp_path):
    root, data_dir = folders
    source = sources.open_source("flat", "train", data_dir)
    assert len(source) == 7 and not sources.has_labels("flat", data_dir)
    assert "label" not in source[0] and sources.has_labels("held", data_dir)
    view = transforms.EvalTransform(input_size=8, crop_pct=1.0, interpolation="bilinear").map(source[0])
    assert view["label"] == -1 and view["image"].shape == (8, 8, 3)
    # Images next to sub-folders: ambiguous without --unlabeled; with it every image under the folder counts.
    _pngs(tmp_path / "mixed", 2)
    _pngs(tmp_path / "mixed" / "sub" / "deeper", 3)
    with pytest.raises(ValueError, match="both images .* pass --unlabeled"):
        sources.scan_image_folder(str(tmp_path / "mixed"))
    classes, splits = sources.scan_image_folder(str(tmp_path / "mixed"), unlabeled=True)
    assert classes == [] and len(splits["train"]) == 5 and {label for _, label in splits["train"]} == {-1}


def test_holdout_is_stratified_exact_and_deterministic(folders):
    labels = [0] * 10 + [1] * 7 + [2] * 3
    held = sources.holdout_indices(labels, 0.2, seed=0)
    # round(0.2 · 20) = 4; quotas 2, 1.4, 0.6 → floors 2, 1, 0 and the largest remainder (class 2) gets the 4th
    assert len(held) == 4 and np.bincount(np.asarray(labels)[held], minlength=3).tolist() == [2, 1, 1]
    np.testing.assert_array_equal(held, sources.holdout_indices(labels, 0.2, seed=0))
    assert any(not np.array_equal(held, sources.holdout_indices(labels, 0.2, seed=s)) for s in (1, 2, 3))
    root, data_dir = folders
    assert len(sources.open_source("held", "train", data_dir)) == 16
    val = sources.open_source("held", "val", data_dir)
    assert sorted(int(r["label"]) for r in val) == [0, 0, 1, 2]
    record = sources.preparation_record("held", data_dir)
    assert (record["holdout"], record["seed"], record["holdout_split"]) == (0.2, 0, "val")
    assert record["scanned_split_sizes"] == {"train": 16, "val": 4}
    with pytest.raises(ValueError, match="was prepared with .*pass --overwrite"):  # another draw is another dataset
        sources.prepare_image_folder(str(root / "classes"), data_dir, name="held", holdout=0.2, seed=1)
    with pytest.raises(ValueError, match="leaves an empty split"):
        sources.scan_image_folder(str(root / "flat"), holdout=0.01)


def test_split_names_resolve_or_fail_in_one_line(folders):
    assert sources.resolve_split("validation", ["train", "val"]) == "val"
    assert sources.resolve_split("test", ["train", "val"]) == "val"
    assert sources.resolve_split("validation[:50%]", ["train", "val"]) == "val[:50%]"
    assert sources.resolve_split("test", ["train", "val", "test"]) == "test"
    with pytest.raises(ValueError, match=r"^split 'validation' is ambiguous: the dataset has val, test; name one"):
        sources.resolve_split("validation", ["train", "val", "test"])
    with pytest.raises(ValueError, match=r"^split 'validation' does not exist; the dataset has train$"):
        sources.resolve_split("validation", ["train"])
    _, data_dir = folders
    assert len(sources.open_source("held", "validation", data_dir)) == 4  # a recipe's default reads 'val'


def _task_config(task, data_dir, dataset):
    c = {"knn": recipes.knn_eval, "linear_probe": recipes.linear_probe, "finetune": recipes.beitv2_finetune,
         "segment": recipes.beitv2_segment, "pretrain": recipes.beitv2_pretrain, "vqkd": recipes.vqkd,
         "ibot": recipes.ibot_demo}[task]()
    if task == "ibot":
        c.knn_at_end = False
    c.data.update(dataset=dataset, data_dir=data_dir)
    c.batch_size = 4
    return c


@pytest.mark.parametrize("task", ["knn", "linear_probe", "finetune", "segment", "pretrain", "vqkd", "ibot", "demo"])
def test_every_task_checks_its_data_before_compute(folders, task):
    """A missing dataset, a missing split and (for the tasks that need them) absent labels: one line each."""
    _, data_dir = folders
    config = load_config_file("demo") if task == "demo" else _task_config(task, data_dir, "nope")
    config.data.update(dataset="nope", data_dir=data_dir)
    config.batch_size = 4
    with pytest.raises(validate.ConfigError, match=r"config\.data\.dataset='nope'.* is not prepared") as info:
        validate.check_data(config)
    assert "\n" not in str(info.value)
    config.data.update(dataset="held", train_split="train", eval_split="nope")
    if task not in ("pretrain", "ibot"):  # they read only the train split (ibot without knn_at_end)
        with pytest.raises(validate.ConfigError, match="split 'nope' does not exist; the dataset has train, val"):
            validate.check_data(config)
    config.data.update(dataset="flat", eval_split="train")
    if task in ("knn", "linear_probe", "finetune", "demo"):
        with pytest.raises(validate.ConfigError, match=r"dataset='flat' has no labels .*needs class labels"):
            validate.check_data(config)
    elif task != "segment":  # the self-supervised tasks take unlabelled images
        validate.check_data(config)
    if task == "ibot":  # ... unless iBOT is to run its k-NN at the end
        config.knn_at_end = True
        with pytest.raises(validate.ConfigError, match="has no labels .*the ibot task needs class labels"):
            validate.check_data(config)


def test_demo_stage_reads_its_own_unlabelled_data_and_the_cli_refuses_in_one_line(folders, tmp_path):
    _, data_dir = folders
    c = load_config_file("demo")
    c.data.update(dataset="held", data_dir=data_dir, eval_split="validation")
    c.batch_size = 4
    c.stage_data.dataset = "flat"  # the three training stages pretrain on the unlabelled folder
    c.vqkd.eval_every_epochs = 0  # the flat folder has no held-out split
    validate.check_data(c)
    c.vqkd.eval_every_epochs = 3
    with pytest.raises(validate.ConfigError, match=r"^config\.vqkd\.data\.dataset='flat', config\.vqkd\.data\."
                                                   r"eval_split='validation': split 'validation' does not exist"):
        validate.check_data(c)
    # One CLI run: knn on the unlabelled folder ends before loading anything, with one line and exit code 2.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([hidden_torch_dir(tmp_path), REPO_ROOT]))
    r = subprocess.run([sys.executable, "-m", "beitv2_jax.main", "--config", "configs/knn.py", "--workdir",
                        str(tmp_path / "w"), f"--config.pretrained.checkpoint={tmp_path}", "--config.data.dataset=flat",
                        f"--config.data.data_dir={data_dir}"], cwd=REPO_ROOT, env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: config.data.dataset='flat' has no labels")


def test_demo_stage_overrides_apply_to_their_stage_only():
    c = load_config_file("demo")
    c.pretrain.data.dataset = "my_photos"
    c.pretrain.data.min_crop_scale = 0.5
    c.vqkd.batch_size = 64
    c.batch_size = 32
    c.data.color_jitter = 0.1
    c.stage_data.color_jitter = 0.2  # all three training stages (the evaluation keeps config.data's)
    pretrain, vqkd, ibot = (recipes.demo_stage(c[s], c) for s in ("pretrain", "vqkd", "ibot"))
    assert (pretrain.data.dataset, pretrain.data.min_crop_scale, pretrain.data.color_jitter) == ("my_photos", 0.5, 0.2)
    assert (ibot.data.dataset, ibot.data.min_crop_scale, ibot.data.color_jitter) == (
        "beitv2_demo", c.data.min_crop_scale, 0.2)
    c.ibot.data.color_jitter = 0.3  # the stage's own key wins over stage_data
    assert recipes.demo_stage(c.ibot, c).data.color_jitter == 0.3
    assert (pretrain.batch_size, vqkd.batch_size, ibot.batch_size) == (32, 64, 32)  # the demo's batch unless set
    assert pretrain.data.to_dict() == {**c.data.to_dict(), "dataset": "my_photos", "min_crop_scale": 0.5,
                                       "color_jitter": 0.2}
    # Built-in demo: every stage reads exactly the top-level data and batch (what the README's numbers ran with).
    d = load_config_file("demo")
    for stage in ("ibot", "vqkd", "pretrain"):
        s = recipes.demo_stage(d[stage], d)
        assert s.data.to_dict() == d.data.to_dict() and s.batch_size == d.batch_size == 128
    c.pretrain.data.input_size = 36  # sizes chain the stages: refused in one line, not silently ignored
    with pytest.raises(validate.ConfigError, match=r"^config\.pretrain\.data\.input_size=36 differs from "
                                                   r"config\.data\.input_size=32"):
        validate.validate_config(c)


def test_cli_override_of_a_stage_data_key_parses_to_its_type(tmp_path):
    """``--config.pretrain.data.input_size=36`` reaches the validation (typed int) and is refused in one line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([hidden_torch_dir(tmp_path), REPO_ROOT]))
    r = subprocess.run([sys.executable, "-m", "beitv2_jax.main", "--config", "configs/demo.py", "--workdir",
                        str(tmp_path / "w"), "--config.pretrain.data.input_size=36"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: config.pretrain.data.input_size=36 differs")


def test_keys_added_at_their_off_value_do_not_block_resuming_an_older_run():
    old = {"num_epochs": 6, "data": {"dataset": "d"}}
    new = {"num_epochs": 6, "min_steps": 0, "data": {"dataset": "d"}, "stage_data": {"dataset": None}}
    assert validate.config_changes(old, new) == []
    assert validate.config_changes(old, {**new, "min_steps": 234}) == ["min_steps: '<absent>' → 234"]
    assert validate.config_changes({**old, "min_steps": 234}, new) == ["min_steps: 234 → 0"]


def test_min_steps_floor_keeps_the_budget_on_small_data():
    assert common.resolve_steps(5000, 128, 6, min_steps=234) == (39, 234)  # the built-in demo: unchanged
    assert common.resolve_steps(1400, 128, 6, min_steps=234) == (39, 234)  # 10 steps/epoch raised to 39
    assert common.resolve_steps(1400, 128, 16, min_steps=624) == (39, 624)
    assert common.resolve_steps(5000, 64, 6, min_steps=234) == (78, 468)  # more data per epoch: more steps
    assert common.resolve_steps(1400, 128, 6) == (10, 60)  # without a floor: the official count
    assert common.resolve_steps(1400, 128, 6, steps_per_epoch=5, min_steps=60) == (5, 30)  # set: it wins
    assert common.budget_line("ibot", 1400, 128, 6, 39, 234, "raised to min_steps 234 from 10 steps/epoch") == (
        "ibot: 1400 train images, batch 128, 6 epochs × 39 steps → 234 steps (raised to min_steps 234 from 10 "
        "steps/epoch)")
    demo = load_config_file("demo")
    assert (demo.ibot.min_steps, demo.vqkd.min_steps, demo.pretrain.min_steps) == (234, 234, 624)


def test_summary_reports_the_raw_pixel_baseline(tmp_path, capsys):
    from beitv2_jax.train.tasks import demo

    images = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    np.testing.assert_array_equal(demo.raw_pixel_features(images), images.reshape(2, 48))
    row = {"knn_top1": 97.25, "knn_top5": 99.0, "linear_top1": 95.5}
    text = demo.print_summary({"knn": {demo.RAW_PIXELS: row}}, {}, str(tmp_path))
    assert "raw pixels (input view)" in text and "baseline: raw pixels of the input view" in text
    line = [l for l in text.splitlines() if l.strip().startswith("baseline")][0]
    assert "95.50" in line and "97.25" in line


def test_summary_omits_tokenizer_eval_usage_when_vqkd_ran_no_eval(tmp_path):
    from beitv2_jax.train.tasks import demo

    no_eval = {"vqkd": {"first_rec_loss": 0.65, "rec_loss": 0.04}}  # vqkd.eval_every_epochs=0
    line = [l for l in demo.print_summary(no_eval, {}, str(tmp_path)).splitlines() if "VQ-KD" in l][0]
    assert line.strip() == "VQ-KD: rec_loss 0.6500 -> 0.0400" and "nan" not in line
    with_eval = {"vqkd": {**no_eval["vqkd"], "eval/codebook_usage": 0.84375}}
    line = [l for l in demo.print_summary(with_eval, {}, str(tmp_path)).splitlines() if "VQ-KD" in l][0]
    assert line.endswith(", eval code usage 84.4%")
