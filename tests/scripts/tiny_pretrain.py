"""A tiny BEiT v2 pretraining run on the demo data (16-px crops, 4×4 patches) for multi-process and
reliability tests: 1 epoch of 4 steps, batch 8, a metrics row and a checkpoint every step; 4 heads of 8 channels so
that the model splits over a tensor axis of up to 4 devices."""
from beitv2_jax import recipes


def get_config():
    c = recipes.beitv2_pretrain("base", 300)
    c.data.dataset = "beitv2_demo"
    c.data.eval_split = "test"
    c.data.input_size = c.data.second_input_size = 16
    c.data.patch_size = 4
    c.data.num_masked_patches = 6
    c.data.min_mask_patches_per_block = 2
    c.data.num_workers = 0
    c.data.read_threads = 1
    c.batch_size = 8
    c.steps_per_epoch = 4
    c.num_epochs = 1
    c.log_every_steps = 1
    c.checkpoint_every_steps = 1
    c.model.update(patch_size=4, width=32, depth=3, num_heads=4, vocab_size=64, early_layers=2, head_layers=2)
    c.optim.update(warmup_epochs=1)
    return c
