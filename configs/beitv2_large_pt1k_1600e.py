"""BEiT v2 ViT-L/16, ImageNet-1k, 1600 epochs (batch 2048, lr 1.5e-3, layer scale 1e-5, early_layers 21).

python -m beitv2_jax.main --config configs/beitv2_large_pt1k_1600e.py --workdir DIR \
    --config.tokenizer.checkpoint=TOKENIZER_DIR --config.data.data_dir=TFDS_DIR
"""
from beitv2_jax import recipes


def get_config():
    config = recipes.beitv2_pretrain("large", 1600)
    config.dtype = "bfloat16"  # GPU/TPU compute; params, optimizer state, quantizer and losses stay float32
    return config
