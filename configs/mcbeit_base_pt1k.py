"""mc-BEiT ViT-B/16, ImageNet-1k, 800 epochs: multi-choice soft targets (omega 0.2, tokenizer temperature 4.0,
similarity temperature 1.0, gradients through the similarity matrix as the official code: stop_gradient_similarity
False), block masking of 75 patches (code default; the README's random 75 % needs a pipeline option), no colour
jitter, AdamW betas 0.9/0.98, batch 2048, lr 1.5e-3.
Tokenizer: the DALL-E dVAE (the official code's dall-e option); any VQ-KD tokenizer works too
(--config.tokenizer.kind=vqkd).

python -m beitv2_jax.main --config configs/mcbeit_base_pt1k.py --workdir DIR \
    --config.tokenizer.checkpoint=DVAE_DIR --config.data.data_dir=TFDS_DIR
"""
from beitv2_jax import recipes


def get_config():
    return recipes.mcbeit_pretrain(800)
