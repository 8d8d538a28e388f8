"""The demo's segmentation stage on its own: the built-in shapes with per-pixel masks (``beitv2_demo_seg``, 11
classes, 64×64), the official ADE20K pipeline at 1/8 scale, a 64-channel UperNet, 120 steps, whole-image mIoU.

python -m beitv2_jax.main --config configs/segment_demo.py --workdir DIR \
    --config.pretrained.checkpoint=DEMO/pretrain/model
python -m beitv2_jax.main --config configs/segment_demo.py --workdir DIR_RANDOM \
    --config.pretrained.checkpoint=DEMO/pretrain/model --config.pretrained.random_init=True   # the twin
"""
from beitv2_jax import recipes


def get_config():
    return recipes.demo_segment()
