"""``python -m beitv2_jax.convert`` (see ``beitv2_jax/convert/cli.py``)."""
import sys

from beitv2_jax.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
