"""Shared fixtures: the demo data set prepared once per test session, tiny task configs."""
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# The suite's programs are tiny, so compiling them dominates its time: LLVM's cheaper settings cut the suite by ~30 %.
# Every process of the suite (and every subprocess, which inherits the environment) uses the same settings; the suite
# passed with either on 2026-12-01. Run with XLA_FLAGS=--xla_backend_optimization_level=2 for the full ones.
CHEAP_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CHEAP_XLA_FLAGS}".strip()

try:
    import torch  # noqa: F401  (dev requirement; absent in a runtime-only install)
except ImportError:
    pass
else:
    from beitv2_jax.torch_compat import import_torchvision_on_cpu_torch

    import_torchvision_on_cpu_torch()


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    from beitv2_jax.data import sources

    data_dir = str(tmp_path_factory.mktemp("tfds_demo"))
    sources.ensure_demo_dataset(data_dir)
    return data_dir


def hidden_torch_dir(root) -> str:
    """A directory to put first on a subprocess's PYTHONPATH so that ``import torch`` fails there: tensorboardX
    imports torch when installed (~3 s per start) and runs of ``beitv2_jax.main`` need none of it."""
    directory = os.path.join(str(root), "no_torch")
    os.makedirs(os.path.join(directory, "torch"), exist_ok=True)
    with open(os.path.join(directory, "torch", "__init__.py"), "w") as f:
        f.write("raise ImportError('torch is hidden in these runs')\n")
    return directory


def load_config_file(name: str, arg=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(REPO_ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def make_random_tokenizer(directory, image_size=16, patch_size=4, num_codes=64):
    """A tiny VQ-KD tokenizer with random weights and a k-means-initialised codebook, saved with convert.store."""
    import flax
    import jax
    import jax.numpy as jnp

    from beitv2_jax.convert import store
    from beitv2_jax.models import vqkd

    cfg = dict(image_size=image_size, patch_size=patch_size, width=32, depth=1, num_heads=2, decoder_depth=1,
               num_codes=num_codes, code_dim=8, teacher_dim=16)
    model = vqkd.build_vqkd(cfg)
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, image_size, image_size, 3))
    variables = flax.linen.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x[:1]))
    _, update = jax.jit(lambda v, images: model.apply(v, images, train=True, mutable=["codebook"]))(variables, x)
    store.save_variables(str(directory), {**variables, **update}, "vqkd", cfg)
    return str(directory)
