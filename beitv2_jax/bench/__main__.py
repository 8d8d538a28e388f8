"""``python -m beitv2_jax.bench``."""
from absl import app

from beitv2_jax.bench.cli import _define_flags, main

if __name__ == "__main__":
    _define_flags()
    app.run(main)
