"""iBOT ViT-S/16, ImageNet-1k, 800 epochs: batch 1024 (16 GPUs × 64), lr 5e-4 · batch/256, wd 0.04 → 0.4, 2 global
224-px + 10 local 96-px crops, shared head to 8192, teacher temperature 0.04 → 0.07 over 30 epochs, masking ratio
0 or U(0.1, 0.5) per global crop (blocks), norm_last_layer false (the README command). Gradient clipping 3.0 is per
tensor (config.optim.clip_mode = 'per_tensor'), as the official utils.clip_gradients.

python -m beitv2_jax.main --config configs/ibot_vit_s.py --workdir DIR --config.data.data_dir=TFDS_DIR

The teacher backbone is written to DIR/teacher (evaluate it with configs/knn.py or configs/linear_probe.py and
--config.pretrained.checkpoint=DIR/teacher).
"""
from beitv2_jax import recipes


def get_config():
    return recipes.ibot("small")
