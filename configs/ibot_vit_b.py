"""iBOT ViT-B/16, ImageNet-1k: the ViT-S recipe's arguments with norm_last_layer true (weight_g frozen; the code's
advice for ViT-B); 400 epochs and batch 1024 as recalled from the paper (the official ViT-B args.txt is linked from
the README, not in the repository). Gradient clipping 3.0 is per tensor (config.optim.clip_mode = 'per_tensor').

python -m beitv2_jax.main --config configs/ibot_vit_b.py --workdir DIR --config.data.data_dir=TFDS_DIR
"""
from beitv2_jax import recipes


def get_config():
    return recipes.ibot("base")
