"""Linear probe of a frozen encoder on ImageNet-1k: final-layer CLS (patch-aggregation models) or mean patch
token (others) — paper §3.2; AdamW lr 4e-3, wd 1e-4, batch 1024, 100 epochs, RandomResizedCrop + flip views.

python -m beitv2_jax.main --config configs/linear_probe.py --workdir DIR \
    --config.pretrained.checkpoint=PRETRAIN_WORKDIR/model --config.data.data_dir=TFDS_DIR
Per-layer protocol (BEiT v1: a head per block on [CLS, mean patch], best layer reported):
    --config.probe.feature=per_layer
Features computed once and cached (eval transform, no augmentation): --config.probe.cache_features=True
SGD instead of AdamW: --config.optim.name=sgd --config.optim.lr=0.1 --config.optim.weight_decay=0
"""
from beitv2_jax import recipes


def get_config():
    return recipes.linear_probe()
