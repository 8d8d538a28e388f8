"""BEiT v1 ViT-B/16, ImageNet-1k, 800 epochs: DALL-E dVAE tokenizer (8192 codes) on a 112-px lanczos view, 75
block-masked patches, no patch-aggregation head; batch 2048, lr 1.5e-3, 10 warm-up epochs, wd 0.05, clip 3.0,
drop path 0.1, layer scale 0.1, ImageNet mean/std (the README's IN-1k recipe).

python -m beitv2_jax.convert.family dalle_encoder --input encoder.pkl --output DVAE_DIR   # needs `pip install dall-e`
python -m beitv2_jax.main --config configs/beit_v1_base_pt1k.py --workdir DIR \
    --config.tokenizer.checkpoint=DVAE_DIR --config.data.data_dir=TFDS_DIR
"""
from beitv2_jax import recipes


def get_config():
    return recipes.beit_v1_pretrain(800)
