"""BEiT v2 ViT-B/16 semantic segmentation on ADE20K (official recipe, reference §3.3: UperNet, crop 512, batch 16,
160k iterations, AdamW lr 5e-5, layer decay 0.75 (0.85 from the 21k intermediate fine-tuned encoder), weight decay
0.05, poly schedule with 1500 warmup iterations, drop path 0.15, out_indices [3, 5, 7, 11], slide test crop 512 /
stride 341). Paper: 53.1 mIoU from pt1k, 53.5 from pt1k_ft21k.

python -m beitv2_jax.data.sources prepare-folder --src ADEChallengeData2016 --data_dir TFDS_DIR --name ade20k
python -m beitv2_jax.main --config configs/segment_ade20k_base.py --workdir DIR \
    --config.pretrained.checkpoint=PRETRAIN_WORKDIR/model --config.data.data_dir=TFDS_DIR
python -m beitv2_jax.main --config configs/segment_ade20k_base.py:pt1k_ft21k ... \
    --config.pretrained.checkpoint=beitv2_base_patch16_224_pt1k_ft21k.pth --config.pretrained.format=official_beitv2
"""
from beitv2_jax import recipes


def get_config(init: str = "pt1k"):
    return recipes.beitv2_segment("base", init)
