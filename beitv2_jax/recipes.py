"""Recipe building blocks shared by the files in configs/ (each get_config() there is the entry point)."""
import ml_collections

from beitv2_jax.data.pipeline import default_data_config


def base_run(task: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 0
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params and optimizer state stay float32)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.data = default_data_config()
    c.batch_size = 2048  # global batch over all hosts
    c.eval_batch_size = 0  # 0 = batch_size
    c.num_epochs = 1
    c.steps_per_epoch = 0  # 0 = len(train split) // batch_size
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.max_bad_steps = 10  # consecutive non-finite steps before the run stops
    c.allow_config_change = False  # resume a workdir whose config.json differs
    return c


def beitv2_pretrain(size: str = "base", epochs: int = 1600) -> ml_collections.ConfigDict:
    """BEiT v2 pretraining on ImageNet-1k with the official recipe (reference §2)."""
    c = base_run("pretrain")
    c.data.dataset = "imagenet2012"
    c.data.eval_split = "validation"
    c.batch_size = 2048
    c.num_epochs = epochs
    c.model = ml_collections.ConfigDict({
        "patch_size": 16,
        "width": 768 if size == "base" else 1024,
        "depth": 12 if size == "base" else 24,
        "num_heads": 12 if size == "base" else 16,
        "mlp_ratio": 4.0,
        "layer_scale_init": 0.1 if size == "base" else 1e-5,
        "drop_path_rate": 0.1 if epochs >= 1600 else 0.0,
        "vocab_size": 8192,
        "early_layers": 9 if size == "base" else 21,
        "head_layers": 2,
        "init_truncation": 1.0,  # the official pretraining trunc_normal cuts at ±1σ
        "attention_impl": "einsum",
        "remat_policy": "none",
    })
    c.tokenizer = ml_collections.ConfigDict({"checkpoint": ""})  # dir from the vqkd task or the converter
    c.optim = ml_collections.ConfigDict({
        "lr": 1.5e-3, "min_lr": 1e-5, "warmup_epochs": 10, "b1": 0.9, "b2": 0.999 if epochs >= 1600 else 0.98,
        "eps": 1e-8, "weight_decay": 0.05, "clip_grad": 3.0,
        # no decay: ndim<=1 and biases (automatic) + cls_token; mask_token and the shared table ARE decayed.
        "no_decay": ["cls_token$", "pos_embed$"],
    })
    c.checkpoint_every_steps = 5000
    return c


def vqkd(teacher: str = "clip", decoder_depth: int = 3) -> ml_collections.ConfigDict:
    """VQ-KD tokenizer training with the official recipe (reference §1.5)."""
    c = base_run("vqkd")
    c.data.dataset = "imagenet2012"
    c.data.eval_split = "validation"
    c.batch_size = 512
    c.num_epochs = 100
    c.model = ml_collections.ConfigDict({
        "patch_size": 16, "width": 768, "depth": 12, "num_heads": 12, "decoder_depth": decoder_depth,
        "num_codes": 8192, "code_dim": 32, "decay": 0.99, "kmeans_init": True,
    })
    c.teacher = ml_collections.ConfigDict({
        "kind": teacher,  # clip | dino | vit_checkpoint
        "checkpoint": "",  # directory written by `python -m beitv2_jax.convert` (or a training task)
        "layer": ml_collections.config_dict.placeholder(int),  # None = last block
        "use_norm": True,
        "normalisation": ml_collections.config_dict.placeholder(str),  # None = the teacher's own
    })
    c.optim = ml_collections.ConfigDict({
        "lr": 5e-5, "lr_batch_base": 128,  # lr = 5e-5 * batch / 128 (= 2e-4 at 512)
        "min_lr": 1e-5, "warmup_epochs": 10, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 1e-4,
        "clip_grad": 0.0, "no_decay": ["cls_token$", "pos_embed$"],
    })
    c.eval_every_epochs = 1
    return c
