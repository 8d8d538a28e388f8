"""A tiny iBOT run on the built-in demo data for tests: 16-px global / 8-px local crops, 4-px patches, a 2-block
32-wide ViT, a 64-way head, batch 16.

python -m beitv2_jax.main --config configs/ibot_tiny.py --workdir /tmp/ibot_tiny
"""
from beitv2_jax import recipes


def get_config():
    c = recipes.ibot_demo()
    c.data.input_size = 16
    c.data.num_masked_patches = 6  # BEiT keys of the data section: unused by iBOT, kept valid
    c.data.min_mask_patches_per_block = 2
    c.data.read_threads = 1
    c.batch_size = 16
    c.steps_per_epoch = 4
    c.num_epochs = 2
    c.log_every_steps = 1
    c.checkpoint_every_steps = 4
    c.model.update(width=32, depth=2, num_heads=2)
    c.head.update(out_dim=64, patch_out_dim=64, hidden_dim=32, bottleneck_dim=16)
    c.crops.update(num_local=2, local_size=8)
    c.knn_at_end = False
    return c
