"""``python -m beitv2_jax.bench``."""
from absl import app

from beitv2_jax.bench.cli import _define_flags, main

if __name__ == "__main__":
    from beitv2_jax import hostmem

    hostmem.restart_with_huge_pages()  # the same host allocator settings as beitv2_jax.main
    _define_flags()
    app.run(main)
