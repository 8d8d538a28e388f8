"""BEiT v2 ViT-B/16 ImageNet-1k fine-tuning (official recipe: batch 1024, lr 5e-4, 100 epochs, 20 warmup, AdamW
wd 0.05, layer decay 0.6 for the 1600-epoch encoder / 0.65 for the 300-epoch one, drop path 0.2 / 0.1, mixup 0.8,
cutmix 1.0, label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25).

python -m beitv2_jax.main --config configs/finetune_base.py --workdir DIR \
    --config.pretrained.checkpoint=PRETRAIN_WORKDIR/model --config.data.data_dir=TFDS_DIR
python -m beitv2_jax.main --config configs/finetune_base.py:300 ...          # from the 300-epoch encoder
python -m beitv2_jax.main --config configs/finetune_base.py ... \
    --config.pretrained.checkpoint=beitv2_base_patch16_224_pt1k.pth --config.pretrained.format=official_beitv2
python -m beitv2_jax.main --config finetune_base ... --config.pretrained.checkpoint=beitv2_base_patch16_224_pt1k
                                                          # the official checkpoint by name (downloaded once)
"""
from beitv2_jax import recipes


def get_config(pretrain_epochs: str = "1600"):
    return recipes.beitv2_finetune("base", int(pretrain_epochs))
