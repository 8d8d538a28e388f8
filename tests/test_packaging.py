"""Packaging: the recipes ship as ``beitv2_jax.configs`` (``--config demo``), one version everywhere, one flag style
(underscores; the old dashed spellings are aliases). The full ``pip install .`` + demo run outside the clone is a
manual check (README)."""
import argparse
import re
from pathlib import Path

import pytest

import beitv2_jax
from beitv2_jax import main, recipes

from conftest import load_config_file

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_packages_name_every_package_directory():
    text = (REPO / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(beitv2_jax[a-z_.]*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "beitv2_jax").rglob("__init__.py")}
    assert listed == found | {"beitv2_jax.configs"}
    assert '"beitv2_jax.configs" = "configs"' in text


@pytest.mark.parametrize("value, expected", [
    ("demo", "configs/demo.py"), ("beitv2_demo", "configs/demo.py"),
    ("finetune_base:300", "configs/finetune_base.py:300"), ("configs/knn.py", "configs/knn.py"),
    ("no_such_recipe", "no_such_recipe"), ("elsewhere/demo.py", "elsewhere/demo.py")])
def test_recipe_names_resolve_to_the_packaged_files(value, expected, monkeypatch):
    monkeypatch.chdir(REPO)
    resolved = recipes.resolve_config_arg(value)
    assert resolved.replace(str(REPO) + "/", "") == expected
    assert main.packaged_config_argv(["prog", "--config", value])[2] == resolved
    assert main.packaged_config_argv(["prog", f"--config={value}"])[1] == f"--config={resolved}"


def test_packaged_recipe_loads_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the clone: configs/demo.py is not reachable as a relative path
    path = recipes.resolve_config_arg("demo")
    assert Path(path).is_file() and load_config_file("demo").task == "demo"
    assert {"demo", "finetune_base", "vqkd_base_clip", "segment_demo"} <= set(recipes.recipe_names())


def test_one_version():
    citation = (REPO / "CITATION.cff").read_text()
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f'version: "{beitv2_jax.__version__}"' in citation
    headings = re.findall(r"^## (\S+)", changelog, re.M)
    if headings[0] == "Unreleased":  # keep-a-changelog: pending changes sit above the latest release
        headings = headings[1:]
    assert headings[0] == beitv2_jax.__version__ and "Unreleased" not in headings
    license_text = (REPO / "LICENSE").read_text()
    assert "MIT License" in license_text and "The beitv2_jax authors" in license_text


def _long_options(parser: argparse.ArgumentParser) -> list:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _long_options(sub)
        out += [action.option_strings] if action.option_strings else []
    return out


def test_one_flag_style():
    from beitv2_jax import tokenize
    from beitv2_jax.convert import cli

    for parser in (cli.build_parser(), tokenize.build_parser()):
        for names in _long_options(parser):
            long = [n for n in names if n.startswith("--")]
            assert "-" not in long[0][2:], f"{long[0]}: the first spelling uses underscores"
            assert all("--" + n[2:].replace("-", "_") == long[0] for n in long), names  # others: dashed aliases
    args = cli.build_parser().parse_args(["--input", "a", "--output", "b", "--hf-config", "c", "--trust-pickle"])
    assert args.hf_config == "c" and args.trust_pickle
