"""Weighted k-NN (k = 20, T = 0.07, cosine similarity on l2-normalised features) of a frozen encoder, ImageNet-1k.

python -m beitv2_jax.main --config configs/knn.py --workdir DIR \
    --config.pretrained.checkpoint=PRETRAIN_WORKDIR/model --config.data.data_dir=TFDS_DIR [--config.knn.feature=mean]
"""
from beitv2_jax import recipes


def get_config():
    return recipes.knn_eval()
