"""Config validation before any compute: each impossible config gives one line naming the key."""
import json
import os
import subprocess
import sys

import pytest

from beitv2_jax import recipes, validate

from conftest import REPO_ROOT, load_config_file


@pytest.fixture()
def tokenizer_dir(tmp_path):
    """A directory that describes a 32-code, 16-px VQ-KD tokenizer (validation reads only ``model.json``)."""
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    (directory / "model.json").write_text(json.dumps({
        "format": "beitv2_jax.variables", "version": 1, "model_kind": "vqkd",
        "model_config": {"num_codes": 32, "image_size": 16}}))
    return str(directory)


@pytest.fixture()
def config(tokenizer_dir, demo_data_dir):
    """A valid tiny pretraining config."""
    c = recipes.beitv2_pretrain("base", 300)
    c.data.update(dataset="beitv2_demo", data_dir=demo_data_dir, input_size=16, second_input_size=16, patch_size=4,
                  num_masked_patches=6, min_mask_patches_per_block=2)
    c.batch_size = 8
    c.steps_per_epoch = 4
    c.model.update(width=16, depth=2, num_heads=2, patch_size=4, vocab_size=32, early_layers=1, head_layers=1)
    c.tokenizer.checkpoint = tokenizer_dir
    return c


def error_of(config, workdir=None) -> str:
    with pytest.raises(validate.ConfigError) as info:
        validate.validate_config(config, workdir)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_configs_pass(config, tmp_path, demo_data_dir):
    validate.validate_config(config, str(tmp_path))
    demo = load_config_file("demo")
    demo.data.data_dir = demo_data_dir
    validate.validate_config(demo)


def _unlocked_set(config, path: str, value) -> None:
    """Set ``path`` to ``value`` as a config file could: new keys and other types included."""
    *sections, key = path.split(".")
    for section in sections:
        config = config[section]
    with config.unlocked():
        if key in config:
            del config[key]  # drop the field's type, as a hand-written config file would not have it
        config[key] = value


@pytest.mark.parametrize("path,value,named,allowed", [
    ("chekpoint_every_steps", 5, "unknown config key 'config.chekpoint_every_steps'", "checkpoint_every_steps"),
    ("model.dept", 3, "unknown config key 'config.model.dept'", "depth"),
    ("data.input_sise", 16, "unknown config key 'config.data.input_sise'", "input_size"),
])
def test_unknown_key_names_it_and_the_allowed_keys(config, path, value, named, allowed):
    _unlocked_set(config, path, value)
    message = error_of(config)
    assert named in message and allowed in message


@pytest.mark.parametrize("path,value,named", [
    ("batch_size", "8", "config.batch_size must be int"),
    ("num_epochs", 1.5, "config.num_epochs must be int"),
    ("optim.lr", "1e-3", "config.optim.lr must be int or float"),
    ("data.interpolation", 3, "config.data.interpolation must be str"),
    ("model.head_layers", True, "config.model.head_layers must be int"),
    ("inject_nan_steps", "3", "config.inject_nan_steps must be list or tuple"),
])
def test_wrong_type_names_the_key_and_the_type(config, path, value, named):
    _unlocked_set(config, path, value)
    assert named in error_of(config)


@pytest.mark.parametrize("path,value,named", [
    ("data.num_masked_patches", 17, "config.data.num_masked_patches=17 must be in [1, 16]"),
    ("mesh.data", 3, "config.mesh"),
    ("model.early_layers", 2, "config.model.early_layers=2 must be in [1, depth-1] = [1, 1]"),
    ("model.patch_size", 8, "config.model.patch_size=8 must equal config.data.patch_size=4"),
    ("model.vocab_size", 64, "config.model.vocab_size=64 must equal the tokenizer's 32 codes"),
    ("data.second_input_size", 32, "config.data.second_input_size=32 must equal the tokenizer's image size 16"),
    ("tokenizer.checkpoint", "/no/such/dir", "config.tokenizer.checkpoint='/no/such/dir' is not a directory"),
    ("dtype", "float16", "config.dtype must be one of ('float32', 'bfloat16')"),
    ("max_bad_steps", 0, "config.max_bad_steps must be a positive integer"),
    ("data.interpolation", "cubic", "config.data.interpolation must be one of"),
    ("inject_nan_steps", [0], "config.inject_nan_steps must be a list of step numbers >= 1"),
    ("data.dataset", "no_such_dataset", "config.data.dataset='no_such_dataset'"),
    ("data.train_split", "nope", "config.data.train_split='nope'"),
])
def test_impossible_value_names_the_key(config, path, value, named):
    _unlocked_set(config, path, value)
    assert named in error_of(config)


def test_batch_not_divisible_by_data_parallel_size(config, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "device_count", lambda: 4)
    config.batch_size = 6
    assert "config.batch_size=6 is not divisible by the data-parallel size 4" in error_of(config)
    config.batch_size = 8
    config.mesh.data = 3  # 3 × 1 × 1 != 4 devices
    assert "config.mesh" in error_of(config) and "4" in error_of(config)


def test_empty_dataset_and_too_small_dataset(config, monkeypatch):
    from beitv2_jax.data import sources

    monkeypatch.setattr(sources, "open_source", lambda *args: [])
    assert "config.data.dataset='beitv2_demo', config.data.train_split='train': the split is empty" in \
        error_of(config)
    monkeypatch.setattr(sources, "open_source", lambda *args: [{}] * 5)
    config.steps_per_epoch = 0  # derived from the data: needs a whole batch
    assert "config.batch_size=8 is larger than the 5 records" in error_of(config)


def test_demo_config_keys_and_stages():
    demo = load_config_file("demo")
    _unlocked_set(demo, "batch_sise", 3)
    assert "unknown config key 'config.batch_sise'" in error_of(demo)
    demo = load_config_file("demo")
    _unlocked_set(demo, "pretrain.model.dept", 3)
    assert "unknown config key 'config.pretrain.model.dept'" in error_of(demo)
    demo = load_config_file("demo")
    demo.pretrain.model.early_layers = 4
    assert "config.model.early_layers=4" in error_of(demo)
    demo = load_config_file("demo")
    _unlocked_set(demo, "ibot.crops.num_locals", 3)
    assert "unknown config key 'config.ibot.crops.num_locals'" in error_of(demo)


@pytest.mark.parametrize("path,value,named", [
    ("tokenizer.kind", "vqgan", "config.tokenizer.kind must be one of ('vqkd', 'dvae')"),
    ("targets", "soft", "config.targets must be one of ('hard', 'multi_choice')"),
])
def test_family_switches_name_the_key(config, path, value, named):
    _unlocked_set(config, path, value)
    assert named in error_of(config)


def test_dvae_tokenizer_kind_and_grid_are_checked(config, tmp_path):
    config.tokenizer.kind = "dvae"  # the fixture's directory holds a VQ-KD tokenizer
    assert "holds a 'vqkd' model, not a 'dvae' tokenizer (config.tokenizer.kind='dvae')" in error_of(config)
    directory = tmp_path / "dvae"
    directory.mkdir()
    (directory / "model.json").write_text(json.dumps({
        "format": "beitv2_jax.variables", "version": 1, "model_kind": "dvae",
        "model_config": {"vocab_size": 32, "group_count": 4}}))
    config.tokenizer.checkpoint = str(directory)
    config.data.second_input_size = 16  # stride 8: a 2×2 token grid for a 4×4 patch grid
    assert "config.data.second_input_size=16 gives 4 dVAE tokens (stride 8)" in error_of(config)
    config.data.second_input_size = 32
    validate.validate_config(config)
    config.targets = "multi_choice"
    config.multi_choice.omega = 1.5
    assert "config.multi_choice.omega=1.5 must be in [0, 1]" in error_of(config)


@pytest.mark.parametrize("path,value,named", [
    ("masking.pred_shape", "blocks", "config.masking.pred_shape must be one of ('block', 'rand')"),
    ("masking.pred_ratio_var", [0.0], "must be non-empty lists of the same length"),
    ("masking.pred_ratio", [0.0, 0.9], "pred_ratio 0.9 ± pred_ratio_var 0.2 must stay in [0, 1)"),
    ("crops.local_size", 10, "config.crops.local_size=10 must be a multiple of config.data.patch_size=4"),
    ("head.num_layers", 1, "config.head.num_layers=1 must be >= 2"),
    ("head.out_dm", 64, "unknown config key 'config.head.out_dm'"),
])
def test_ibot_config_errors_name_the_key(path, value, named, demo_data_dir):
    c = load_config_file("ibot_tiny")
    c.data.data_dir = demo_data_dir
    validate.validate_config(c)
    _unlocked_set(c, path, value)
    assert named in error_of(c)


def test_workdir_with_another_config_is_refused_unless_allowed(config, tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(sort_keys=True))
    config.log_every_steps = 7  # operational keys may change between runs
    config.data.num_workers = 2
    validate.validate_config(config, workdir)
    config.optim.lr = 2e-3
    message = error_of(config, workdir)
    assert "config.optim.lr: 0.0015 → 0.002" in message and "allow_config_change" in message
    config.allow_config_change = True
    validate.validate_config(config, workdir)


def _run_main(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "beitv2_jax.main", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_gives_one_line_for_a_config_file_with_a_typo(config, tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("import ml_collections\n\n\ndef get_config():\n"
                    f"    c = ml_collections.ConfigDict({config.to_dict()!r})\n"
                    "    c.max_bad_step = 3\n    return c\n")
    result = _run_main("--config", str(path), "--workdir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown config key 'config.max_bad_step'") and "max_bad_steps" in last
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("path,value,message", [
    ("optim.lr", float("nan"), "config.optim.lr must be a finite number, got nan"),
    ("optim.lr", -1.0, "config.optim.lr=-1.0 must be in (0.0, ∞)"),
    ("optim.warmup_epochs", -1, "config.optim.warmup_epochs=-1 must be in [0.0, ∞)"),
    ("optim.b2", 1.0, "config.optim.b2=1.0 must be in [0.0, 1.0)"),
    ("model.drop_path_rate", 2.0, "config.model.drop_path_rate=2.0 must be in [0.0, 1.0)"),
    ("data.num_workers", -1, "config.data.num_workers=-1 must be in [0, ∞)"),
    ("divergence_factor", 0.5, "config.divergence_factor=0.5 must be 0 (off) or > 1"),
])
def test_values_out_of_range_are_refused_with_the_key(config, path, value, message):
    section, _, key = path.rpartition(".")
    (config[section] if section else config)[key] = value
    assert error_of(config) == message


def test_demo_stage_values_are_checked(demo_data_dir):
    demo = load_config_file("demo")
    demo.data.data_dir = demo_data_dir
    demo.vqkd.optim.lr = float("inf")
    assert error_of(demo) == "config.vqkd.optim.lr must be a finite number, got inf"


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "beitv2_jax.main", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["syntax", "raises", "no_get_config", "misspelled", "workdir_file", "read_only"])
def test_cli_one_line_for_broken_config_files_keys_and_workdirs(tmp_path, case):
    files = {"syntax": "def get_config(:\n", "raises": "def get_config():\n    raise ValueError('boom')\n",
             "no_get_config": "X = 1\n"}
    config, workdir, extra = os.path.join(REPO_ROOT, "configs", "knn.py"), str(tmp_path / "run"), []
    if case in files:
        config = str(tmp_path / f"{case}.py")
        with open(config, "w") as f:
            f.write(files[case])
    expected = {
        "syntax": f"error: cannot load config file '{config}': invalid syntax (line 1)",
        "raises": f"error: cannot load config file '{config}': get_config() raised ValueError: boom",
        "no_get_config": f"error: config file '{config}' has no get_config() function",
        "misspelled": "error: unknown config key 'config.data.datset' in --config.data.datset (did you mean "
                      "\"dataset\"?)",
        "workdir_file": f"error: --workdir {tmp_path / 'afile'} is a file, not a directory",
        "read_only": "error: --workdir /proc/1 cannot be written",
    }[case]
    if case == "misspelled":
        extra = ["--config.data.datset=x"]
    elif case == "workdir_file":
        workdir = str(tmp_path / "afile")
        open(workdir, "w").close()
    elif case == "read_only":
        workdir = "/proc/1"  # a directory nobody may create files in, not even root
    result = _cli("--config", config, "--workdir", workdir, *extra)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith(expected), result.stderr


def test_batch_axes_must_split_over_the_processes(config, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    config.mesh.update(data=1, fsdp=1, tensor=-1)  # tensor over every device: both processes' rows on one replica
    assert error_of(config) == ("config.mesh data×fsdp = 1×1 = 1 must be a multiple of the 2 processes (each "
                                "process feeds its own batch rows); move devices from config.mesh.tensor to data or "
                                "fsdp")
