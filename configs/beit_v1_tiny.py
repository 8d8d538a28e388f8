"""A tiny BEiT v1 run on the built-in demo data for tests: 16-px view with 4-px patches (4 × 4 grid), a 32-px
tokenizer view for a dVAE with stride 8, a 3-block 32-wide ViT, 64 codes, batch 16.

python -m beitv2_jax.main --config configs/beit_v1_tiny.py --workdir DIR --config.tokenizer.checkpoint=DVAE_DIR
"""
from beitv2_jax import recipes


def get_config():
    c = recipes.beit_v1_pretrain(2)
    c.data.dataset = "beitv2_demo"
    c.data.eval_split = "test"
    c.data.input_size = 16
    c.data.second_input_size = 32
    c.data.patch_size = 4
    c.data.num_masked_patches = 6
    c.data.min_mask_patches_per_block = 2
    c.data.num_workers = 0
    c.data.read_threads = 1
    c.batch_size = 16
    c.steps_per_epoch = 10
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10
    c.model.update(patch_size=4, width=32, depth=3, num_heads=2, vocab_size=64, drop_path_rate=0.0)
    c.optim.update(warmup_epochs=0)
    return c
