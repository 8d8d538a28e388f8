"""VQ-KD tokenizer, ViT-B/16 encoder, CLIP ViT-B/16 teacher, 8192×32 codebook, 100 epochs at batch 512.

Decoder depth 3 (the released `vqkd_encoder_base_decoder_3x768x12_clip`); `configs/vqkd_base_clip.py:1` for depth 1.
python -m beitv2_jax.convert --format openai_clip --input ViT-B-16.pt --output CLIP_DIR
python -m beitv2_jax.main --config configs/vqkd_base_clip.py --workdir DIR --config.teacher.checkpoint=CLIP_DIR
"""
from beitv2_jax import recipes


def get_config(decoder_depth="3"):
    config = recipes.vqkd("clip", int(decoder_depth))
    config.dtype = "bfloat16"  # GPU/TPU compute; params, optimizer state, quantizer and losses stay float32
    return config
