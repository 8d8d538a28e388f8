"""BEiT v2 ViT-L/16 semantic segmentation on ADE20K (official recipe, reference §3.3: as the base config with
lr 4e-5 (3e-5 from pt1k_ft21k), layer decay 0.9, drop path 0.2, out_indices [7, 11, 15, 23], UperNet channels
1024). Paper: 56.7 mIoU from pt1k, 57.5 from pt1k_ft21k.

python -m beitv2_jax.main --config configs/segment_ade20k_large.py --workdir DIR \
    --config.pretrained.checkpoint=PRETRAIN_WORKDIR/model --config.data.data_dir=TFDS_DIR
"""
from beitv2_jax import recipes


def get_config(init: str = "pt1k"):
    return recipes.beitv2_segment("large", init)
