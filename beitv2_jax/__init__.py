"""beitv2_jax: BEiT v2 (VQ-KD tokenizer + masked image modeling) and its family in JAX/Flax.

``from_pretrained`` (image encoders) and ``load_tokenizer`` (VQ-KD) load our weight directories, Hugging Face
folders, checkpoint files and the official checkpoints by name (``registry.names()``); see ``beitv2_jax.api``.
"""
__version__ = "0.2.0"

from beitv2_jax import registry  # noqa: E402,F401  (light: no JAX import)
from beitv2_jax.api import Encoder, Tokenizer, from_pretrained, load_tokenizer, load_weights  # noqa: E402,F401

__all__ = ["Encoder", "Tokenizer", "from_pretrained", "load_tokenizer", "load_weights", "registry", "__version__"]
