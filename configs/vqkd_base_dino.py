"""VQ-KD tokenizer with a DINO ViT-B/16 teacher (768-d targets), decoder depth 1 (released `..._1x768x12_dino`).

python -m beitv2_jax.convert --format dino --input dino_vitbase16_pretrain.pth --output DINO_DIR
python -m beitv2_jax.main --config configs/vqkd_base_dino.py --workdir DIR --config.teacher.checkpoint=DINO_DIR
"""
from beitv2_jax import recipes


def get_config(decoder_depth="1"):
    config = recipes.vqkd("dino", int(decoder_depth))
    config.dtype = "bfloat16"  # GPU/TPU compute; params, optimizer state, quantizer and losses stay float32
    return config
