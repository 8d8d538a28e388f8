"""The demo: teacher → VQ-KD tokenizer → BEiT v2 pretraining → k-NN evaluation, on the built-in data, CPU-sized.

python -m beitv2_jax.main --config configs/demo.py --workdir /tmp/beitv2_demo

Each stage is a checkpointed task in a sub-folder of the workdir (teacher/, vqkd/, pretrain/); running the same
command again resumes where it stopped. Images are the 64×64 built-in shapes, cropped and resized to 32×32 with
4×4 patches (an 8×8 grid, 24 of 64 patches masked ≈ the paper's 75/196).
"""
import ml_collections

from beitv2_jax import recipes


def demo_data(c):
    c.data.dataset = "beitv2_demo"
    c.data.eval_split = "test"
    c.data.input_size = 32
    c.data.second_input_size = 32
    c.data.patch_size = 4
    c.data.num_masked_patches = 24
    c.data.min_mask_patches_per_block = 4
    c.data.num_workers = 0  # 2-core machine: decode in-process threads
    c.data.read_threads = 2
    return c


def get_config():
    c = demo_data(recipes.base_run("demo"))
    c.batch_size = 128
    c.log_every_steps = 20
    # Stage 1: a fixed feature extractor as the teacher — a random-init ViT saved as one of our checkpoints
    # (exercises the "any ViT checkpoint of ours" teacher path; the iBOT teacher replaces it later).
    c.teacher_model = ml_collections.ConfigDict({"width": 64, "depth": 2, "num_heads": 4, "patch_size": 4})

    v = demo_data(recipes.vqkd("vit_checkpoint", decoder_depth=1))
    v.batch_size = 128
    v.num_epochs = 6
    # A 4-d lookup space keeps ≥ 90 % of the 512 codes in use on this small data set (32-d: ~30 %; the paper
    # notes lower lookup dimensions raise usage).
    v.model.update(width=64, depth=2, num_heads=4, patch_size=4, num_codes=512, code_dim=4)
    v.optim.update(lr=1e-3, lr_batch_base=128, min_lr=1e-4, warmup_epochs=1)
    v.log_every_steps = 20
    v.eval_every_epochs = 3
    c.vqkd = v

    p = demo_data(recipes.beitv2_pretrain("base", 300))
    p.batch_size = 128
    p.num_epochs = 8
    p.model.update(width=64, depth=4, num_heads=4, patch_size=4, vocab_size=512, early_layers=3, head_layers=2,
                   layer_scale_init=0.1, drop_path_rate=0.0)
    p.optim.update(lr=1.5e-3, min_lr=1e-5, warmup_epochs=1)
    p.log_every_steps = 20
    c.pretrain = p

    c.eval = ml_collections.ConfigDict({"knn_k": 20, "knn_temperature": 0.07, "num_token_maps": 6})
    return c
