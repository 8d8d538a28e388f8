"""The benchmarked train steps: task configs, the frozen network's size, ``Workload`` builders with random
weights and synthetic batches, and the analytic matmul FLOP counts."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

TASKS = ("pretrain", "vqkd")


# ----------------------------------------------------------------------------------------------- configs
def stage_config(config: ml_collections.ConfigDict, stage: Optional[str] = None) -> ml_collections.ConfigDict:
    """The task config to benchmark: ``config`` itself, or for the demo config its ``stage`` section completed
    with the demo's data/mesh/seed (exactly what the demo task trains)."""
    if config.get("task") == "demo":
        from beitv2_jax.train.tasks import demo

        stage = stage or "pretrain"
        if stage not in TASKS:
            raise ValueError(f"--stage must be one of {TASKS} for the demo config, got {stage!r}")
        return demo.stage_config(config[stage], config)
    if config.get("task") not in TASKS:
        raise ValueError(f"config.task must be one of {TASKS} (or 'demo' with --stage), got {config.get('task')!r}")
    if stage not in (None, config.task):
        raise ValueError(f"--stage={stage} does not apply to a {config.task!r} config")
    return config


@dataclasses.dataclass(frozen=True)
class FrozenArch:
    """Size of the frozen network (tokenizer for pretrain, teacher for vqkd)."""

    kind: str  # vqkd | clip | dino | vit
    width: int
    depth: int
    num_heads: int
    patch_size: int
    image_size: int
    extra: tuple = ()  # (key, value) pairs: num_codes, code_dim, proj_dim, ...

    def get(self, key, default=None):
        return dict(self.extra).get(key, default)


def frozen_arch(config: ml_collections.ConfigDict, root: Optional[ml_collections.ConfigDict] = None,
                width: int = 0, depth: int = 0, num_heads: int = 0) -> FrozenArch:
    """The frozen network's size: official ViT-B/16, or the demo's own when ``root`` is the demo config."""
    m = config.model
    if config.task == "pretrain":
        if root is not None and root.get("task") == "demo":
            v = root.vqkd.model
            w, d, h, p, code_dim = v.width, v.depth, v.num_heads, v.patch_size, v.code_dim
        else:
            w, d, h, p, code_dim = 768, 12, 12, m.patch_size, 32
        return FrozenArch("vqkd", width or w, depth or d, num_heads or h, p, config.data.second_input_size,
                          (("num_codes", m.vocab_size), ("code_dim", code_dim)))
    kind = config.teacher.kind
    if root is not None and root.get("task") == "demo":
        t = root.ibot.model  # the demo's VQ-KD teacher is the iBOT stage's ViT
        return FrozenArch("vit", width or t.width, depth or t.depth, num_heads or t.num_heads, m.patch_size,
                          config.data.input_size)
    kind = {"clip": "clip", "dino": "dino"}.get(kind, "vit")
    extra = (("proj_dim", 512),) if kind == "clip" else ()
    return FrozenArch(kind, width or 768, depth or 12, num_heads or 12, m.patch_size, config.data.input_size, extra)


# ----------------------------------------------------------------------------------------------- workloads
@dataclasses.dataclass
class Workload:
    """A built train step: ``step(state, batch, aux) -> (state, metrics)``, its inputs, and what it computes."""

    task: str
    step: Callable  # the un-jitted step function
    state: Any
    batch: dict
    aux: Any  # frozen network variables (tokenizer or teacher params)
    batch_size: int
    analytic: dict  # analytic matmul FLOPs per image, by part
    arch: dict  # everything the PyTorch mirror needs
    num_params: int
    frozen_params: int


def _unbox(tree):
    return flax.linen.meta.unbox(tree)


def _count(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def _synthetic_mask(rng: np.random.Generator, batch: int, num_patches: int, num_masked: int) -> np.ndarray:
    """``[batch, num_patches]`` bool with exactly ``num_masked`` True per row (the real generator's contract)."""
    mask = np.zeros((batch, num_patches), bool)
    for row in mask:
        row[rng.permutation(num_patches)[:num_masked]] = True
    return mask


def _random_codebook(key, num_codes: int, code_dim: int):
    from beitv2_jax.models import quantizer

    return quantizer.l2_normalize(jax.random.normal(key, (num_codes, code_dim), jnp.float32))


def _materialise(fn: Callable, *args, abstract: bool = False):
    """``fn(*args)`` jitted, or only its shapes/dtypes (``jax.eval_shape``) when ``abstract``.

    Initialisers are compiled without backend optimisation: they run once, and on a CPU the optimised compile of
    a model's ``init`` takes as long as that of its train step.
    """
    if abstract:
        return jax.eval_shape(fn, *args)
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def build_pretrain(config: ml_collections.ConfigDict, frozen: FrozenArch, batch_size: int,
                   frozen_dtype: str, abstract: bool = False) -> Workload:
    """The ``pretrain`` task's train step with random weights, a random tokenizer and a synthetic batch.

    ``abstract``: state and tokenizer variables are ``ShapeDtypeStruct``s (enough to trace; nothing allocated).
    """
    from beitv2_jax.models import vqkd as vqkd_lib
    from beitv2_jax.train import optim
    from beitv2_jax.train import state as state_lib
    from beitv2_jax.train.tasks import pretrain

    cfg = pretrain.model_config(config)
    model = pretrain.build_model(cfg)
    tok_cfg = dict(image_size=frozen.image_size, patch_size=frozen.patch_size, width=frozen.width,
                   depth=frozen.depth, num_heads=frozen.num_heads, decoder_depth=1, num_codes=frozen.get("num_codes"),
                   code_dim=frozen.get("code_dim"), teacher_dim=8, kmeans_init=False, dtype=frozen_dtype)
    tokenizer = vqkd_lib.build_vqkd(tok_cfg)
    size, size2 = config.data.input_size, config.data.second_input_size
    n, k = model.backbone.num_patches, config.data.num_masked_patches
    if tokenizer.encoder.num_patches != n:
        raise ValueError(f"tokenizer grid {tokenizer.encoder.window} != backbone grid {model.backbone.window}")

    def init_variables():
        key = jax.random.PRNGKey(config.seed)
        dummy_mask = jnp.zeros((1, n), bool).at[:, :k].set(True)
        params = _unbox(model.init(key, jnp.zeros((1, size, size, 3)), dummy_mask)["params"])
        tok = _unbox(tokenizer.init(jax.random.fold_in(key, 1), jnp.zeros((1, size2, size2, 3))))
        quantize = dict(tok["codebook"]["quantize"], initted=jnp.ones((), jnp.int32),
                        weight=_random_codebook(jax.random.fold_in(key, 2), tokenizer.num_codes, tokenizer.code_dim))
        return params, {"params": tok["params"], "codebook": {"quantize": quantize}}

    params, tok_vars = _materialise(init_variables, abstract=abstract)
    tx, schedule = optim.make_optimizer(config.optim, params, total_steps=100_000, steps_per_epoch=1000)
    create = lambda p: state_lib.create(p, tx, extra={"bad_steps": jnp.zeros((), jnp.int32)},  # noqa: E731
                                        seed=config.seed)
    state = jax.eval_shape(create, params) if abstract else create(params)

    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((batch_size, size, size, 3), np.float32),
             "tokenizer_image": rng.random((batch_size, size2, size2, 3), np.float32),
             "mask": _synthetic_mask(rng, batch_size, n, k)}
    bb = model.backbone
    arch = dict(image_size=size, patch_size=bb.patch_size, width=bb.width, depth=bb.depth, num_heads=bb.num_heads,
                mlp_ratio=bb.mlp_ratio, layer_scale_init=bb.layer_scale_init, vocab_size=model.vocab_size,
                early_layers=model.early_layers, head_layers=model.head_layers, num_masked=k,
                tokenizer=dataclasses.asdict(frozen), optim=config.optim.to_dict())
    return Workload("pretrain", pretrain.make_train_step(model, tokenizer, tx, schedule), state, batch, tok_vars,
                    batch_size, analytic_pretrain(arch), arch, _count(params),
                    _count(_encoder_only(tok_vars["params"])))


def _encoder_only(tok_params):
    """The tokenizer parameters that get_codebook_indices uses (the decoder is built but never run)."""
    return {k: v for k, v in tok_params.items() if not k.startswith("decode")}


def build_teacher(frozen: FrozenArch, dtype: str):
    from beitv2_jax.models import teachers
    from beitv2_jax.train.tasks import common

    common_kw = dict(image_size=frozen.image_size, patch_size=frozen.patch_size, width=frozen.width,
                     depth=frozen.depth, num_heads=frozen.num_heads, dtype=common.compute_dtype(dtype))
    if frozen.kind == "clip":
        model = teachers.clip_vit_b16(num_classes=frozen.get("proj_dim"), **common_kw)
        return teachers.Teacher(model=model, normalisation="clip", project=True, name="clip")
    if frozen.kind == "dino":
        return teachers.Teacher(model=teachers.dino_vit_b16(**common_kw), normalisation="imagenet", name="dino")
    from beitv2_jax.models import vit

    model = vit.VisionTransformer(qkv_bias="full", use_abs_pos=True, use_final_norm=True, pooling="cls", **common_kw)
    return teachers.Teacher(model=model, normalisation="imagenet", name="vit")


def build_vqkd(config: ml_collections.ConfigDict, frozen: FrozenArch, batch_size: int,
               frozen_dtype: str, abstract: bool = False) -> Workload:
    """The ``vqkd`` task's train step with random weights, a random teacher and a synthetic batch (steady state:
    random unit-norm codebook, no k-means branch). ``abstract`` as in ``build_pretrain``."""
    from beitv2_jax.models import vqkd as vqkd_lib
    from beitv2_jax.train import optim
    from beitv2_jax.train import state as state_lib
    from beitv2_jax.train.tasks import vqkd

    teacher = build_teacher(frozen, frozen_dtype)
    size = config.data.input_size
    cfg = vqkd.model_config(config, teacher.feature_dim)
    cfg["kmeans_init"] = False
    model = vqkd_lib.build_vqkd(cfg)

    def init_variables():
        key = jax.random.PRNGKey(config.seed)
        teacher_params = _unbox(teacher.model.init(jax.random.fold_in(key, 1), jnp.zeros((1, size, size, 3))))
        variables = _unbox(model.init(key, jnp.zeros((1, size, size, 3), jnp.float32)))
        codebook = dict(variables["codebook"]["quantize"],
                        weight=_random_codebook(jax.random.fold_in(key, 2), model.num_codes, model.code_dim))
        return variables["params"], {"quantize": codebook}, teacher_params["params"]

    params, codebook, teacher_params = _materialise(init_variables, abstract=abstract)
    optim_cfg = config.optim.copy_and_resolve_references()
    with optim_cfg.unlocked():
        optim_cfg.lr = config.optim.lr * config.batch_size / config.optim.get("lr_batch_base", 128)
    tx, schedule = optim.make_optimizer(optim_cfg, params, total_steps=100_000, steps_per_epoch=1000)

    def create(params, codebook):
        extra = {"epoch_counts": jnp.zeros((model.num_codes,), jnp.float32), "bad_steps": jnp.zeros((), jnp.int32)}
        return state_lib.create(params, tx, model_state={"codebook": codebook}, extra=extra, seed=config.seed)

    state = jax.eval_shape(create, params, codebook) if abstract else create(params, codebook)
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((batch_size, size, size, 3), np.float32)}
    enc, dec = model.encoder, model.decoder
    arch = dict(image_size=size, patch_size=enc.patch_size, width=enc.width, depth=enc.depth,
                num_heads=enc.num_heads, mlp_ratio=enc.mlp_ratio, decoder_width=dec.width, decoder_depth=dec.depth,
                decoder_heads=dec.num_heads, num_codes=model.num_codes, code_dim=model.code_dim,
                teacher_dim=model.teacher_dim, decay=model.decay, teacher=dataclasses.asdict(frozen),
                optim=optim_cfg.to_dict())
    return Workload("vqkd", vqkd.make_train_step(model, teacher, tx, schedule), state, batch, teacher_params,
                    batch_size, analytic_vqkd(arch), arch, _count(params), _count(teacher_params))


# ----------------------------------------------------------------------------------------------- analytic FLOPs
def vit_blocks_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
    """Forward matmul FLOPs of ``depth`` pre-LN blocks on ``tokens`` tokens: qkv, QKᵀ, AV, proj, fc1, fc2."""
    per_block = (2 * tokens * width * 3 * width + 2 * 2 * tokens * tokens * width + 2 * tokens * width * width
                 + 2 * 2 * tokens * width * mlp_dim)
    return float(depth * per_block)


def dense_flops(rows: int, fan_in: int, fan_out: int) -> float:
    return float(2 * rows * fan_in * fan_out)


def analytic_pretrain(a: dict) -> dict:
    """Matmul FLOPs per image of one pretraining step (forward ×1 for the frozen tokenizer; ×3 = forward +
    backward for the trained model; ×2 for the patch embedding, whose input needs no gradient)."""
    n = (a["image_size"] // a["patch_size"]) ** 2
    t = a["tokenizer"]
    nt = (t["image_size"] // t["patch_size"]) ** 2
    extra = dict(t["extra"])
    tok = (dense_flops(nt, t["patch_size"] ** 2 * 3, t["width"])
           + vit_blocks_flops(nt + 1, t["width"], t["depth"], 4 * t["width"])
           # The task layer and the code distances run on the masked patches only (their ids are the labels).
           + dense_flops(a["num_masked"], t["width"], t["width"])
           + dense_flops(a["num_masked"], t["width"], extra["code_dim"])
           + dense_flops(a["num_masked"], extra["code_dim"], extra["num_codes"]))
    d, mlp = a["width"], int(a["width"] * a["mlp_ratio"])
    embed = dense_flops(n, a["patch_size"] ** 2 * 3, d)
    blocks = vit_blocks_flops(n + 1, d, a["depth"], mlp)
    head = vit_blocks_flops(n + 1, d, a["head_layers"], mlp)
    lm = (2 if a["head_layers"] else 1) * dense_flops(a["num_masked"], d, a["vocab_size"])
    parts = {"tokenizer_fwd": tok, "patch_embed": 2 * embed, "blocks": 3 * blocks, "aggregation_head": 3 * head,
             "lm_head": 3 * lm}
    parts["total"] = sum(parts.values())
    return parts


def analytic_vqkd(a: dict) -> dict:
    """Matmul FLOPs per image of one VQ-KD step: teacher forward, encoder/decoder forward + backward, the
    codebook distances (forward only; no gradient reaches the codebook)."""
    n = (a["image_size"] // a["patch_size"]) ** 2
    t = a["teacher"]
    extra = dict(t["extra"])
    teacher = (dense_flops(n, t["patch_size"] ** 2 * 3, t["width"])
               + vit_blocks_flops(n + 1, t["width"], t["depth"], 4 * t["width"])
               + (dense_flops(n, t["width"], extra["proj_dim"]) if "proj_dim" in extra else 0.0))
    d, dd, c = a["width"], a["decoder_width"], a["code_dim"]
    mlp = int(d * a["mlp_ratio"])
    parts = {
        "teacher_fwd": teacher,
        "encoder_patch_embed": 2 * dense_flops(n, a["patch_size"] ** 2 * 3, d),
        "encoder_blocks": 3 * vit_blocks_flops(n + 1, d, a["depth"], mlp),
        "task_layers": 3 * (dense_flops(n, d, d) + dense_flops(n, d, c) + dense_flops(n, dd, dd)
                            + dense_flops(n, dd, a["teacher_dim"])),
        "codebook_distances": dense_flops(n, c, a["num_codes"]),
        "decoder_embed": 3 * dense_flops(n, c, dd),
        "decoder_blocks": 3 * vit_blocks_flops(n + 1, dd, a["decoder_depth"], int(dd * a["mlp_ratio"])),
    }
    parts["total"] = sum(parts.values())
    return parts
