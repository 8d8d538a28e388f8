"""The demo: iBOT teacher → VQ-KD tokenizer → BEiT v2 pretraining → evaluation → segmentation, on the built-in data,
CPU-sized.

python -m beitv2_jax.main --config configs/demo.py --workdir /tmp/beitv2_demo

Each stage is a checkpointed task in a sub-folder of the workdir (ibot/, vqkd/, pretrain/); running the same
command again resumes where it stopped. Images are the 64×64 built-in shapes, cropped and resized to 32×32 with
4×4 patches (an 8×8 grid, 24 of 64 patches masked ≈ the paper's 75/196).

The top-level ``data`` and ``batch_size`` apply to every stage and to the evaluation; a key set in ``stage_data``
(``--config.stage_data.dataset=my_unlabeled``) applies to the three training stages, and a stage's own ``data.*`` /
``batch_size`` key, when set (``--config.pretrain.data.min_crop_scale=0.4``), wins for that stage.
Stage lengths are epochs with a floor in steps (``min_steps``: the built-in set's 234 / 234 / 624 steps), so a small
folder of images gets the same number of steps. Your own images: docs/own_data.md.
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
    c.data.num_workers = 0  # 2-core machine: decode in-process
    # One reading thread: these records are tiny, the transform is Python-bound and a second thread only fights for
    # the GIL (the BEiT / iBOT pipelines give 2,270 / 860 img/s with 1 thread, 1,840 / 650 with 2).
    c.data.read_threads = 1
    return c


def demo_pretrain():
    """Stage 3: BEiT v2 pretraining, ViT 64-wide × 4 blocks, patch aggregation from block 3, 16 epochs."""
    p = demo_data(recipes.beitv2_pretrain("base", 300))
    p.batch_size = 128
    p.num_epochs = 16
    p.model.update(width=64, depth=4, num_heads=4, patch_size=4, vocab_size=512, early_layers=3, head_layers=2,
                   layer_scale_init=0.1, drop_path_rate=0.0)
    p.optim.update(lr=1.5e-3, min_lr=1e-5, warmup_epochs=1)
    p.log_every_steps = 20
    return p


def get_config():
    c = demo_data(recipes.base_run("demo"))
    c.batch_size = 128
    c.log_every_steps = 20
    # Data keys for the three training stages only (unset = config.data's), e.g. an unlabelled folder to pretrain on
    # while config.data (labelled) is what the evaluation reads.
    c.stage_data = recipes.unset_data_section()
    # Stage 1: a short iBOT run; its EMA teacher (ibot/teacher) is the VQ-KD teacher ("any ViT checkpoint of ours").
    b = demo_data(recipes.ibot_demo())
    b.knn_at_end = False  # the demo's evaluation stage measures it
    b.min_steps = 234  # 6 epochs × 39 steps of the built-in set's 5,000 images
    c.ibot = recipes.inherited_stage(b)

    v = demo_data(recipes.vqkd("vit_checkpoint", decoder_depth=1))
    v.num_epochs = 6
    # A 4-d lookup space keeps more of the 512 codes in use on this small data set (the paper notes lower lookup
    # dimensions raise usage): ~52 % on the v2 demo set (95 % on v1's fully random colours; 32-d: ~30 %).
    v.model.update(width=64, depth=2, num_heads=4, patch_size=4, num_codes=512, code_dim=4)
    v.optim.update(lr=1e-3, lr_batch_base=128, min_lr=1e-4, warmup_epochs=1)
    v.log_every_steps = 20
    v.eval_every_epochs = 3
    v.min_steps = 234
    c.vqkd = recipes.inherited_stage(v)

    p = demo_pretrain()
    p.min_steps = 624  # 16 epochs × 39 steps
    c.pretrain = recipes.inherited_stage(p)

    c.eval = ml_collections.ConfigDict({"knn_k": 20, "knn_temperature": 0.07, "num_token_maps": 6})
    # Stage 5: segmentation on the built-in masks from pretrain/model and from its random-init twin.
    c.segment = recipes.demo_segment()
    return c
