"""BEiT v2 ViT-L/16 ImageNet-1k fine-tuning (official recipe: batch 1024, lr 2e-4 for the 1600-epoch encoder /
5e-4 for the 300-epoch one, 50 epochs, 5 warmup, layer decay 0.8, drop path 0.2, mixup 0.8, cutmix 1.0).

python -m beitv2_jax.main --config configs/finetune_large.py --workdir DIR \
    --config.pretrained.checkpoint=PRETRAIN_WORKDIR/model --config.data.data_dir=TFDS_DIR
python -m beitv2_jax.main --config configs/finetune_large.py:300 ...         # from the 300-epoch encoder
"""
from beitv2_jax import recipes


def get_config(pretrain_epochs: str = "1600"):
    return recipes.beitv2_finetune("large", int(pretrain_epochs))
