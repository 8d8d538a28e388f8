"""Shared fixtures: the demo data set prepared once per test session, tiny task configs."""
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    from beitv2_jax.data import sources

    data_dir = str(tmp_path_factory.mktemp("tfds_demo"))
    sources.ensure_demo_dataset(data_dir)
    return data_dir


def load_config_file(name: str, arg=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(REPO_ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)
