"""Training-step benchmark: ``python -m beitv2_jax.bench --config configs/<name>.py [flags] [--config.x=y ...]``.

Builds the configured task's real train step (``pretrain`` or ``vqkd``; for ``configs/demo.py`` one of its stages,
``--stage pretrain|vqkd``) with random weights and a synthetic on-device batch, compiles it once, times
steady-state steps and reports:

* img/s and ms/step (median and spread over ``--repeats`` timed windows of ``--steps`` steps, one device sync per
  window, no host round-trip inside a window);
* model FLOPs per image from XLA's cost analysis of the compiled step, cross-checked with an analytic count of
  the ViT matmuls (and with the matmul FLOPs counted in the step's jaxpr);
* MFU against the device's dense bf16 peak (``PEAK_TFLOPS``; CPU: n/a unless ``--peak_tflops``);
* peak device memory (``device.memory_stats()`` where the backend has it) and XLA's compiled memory plan;
* the input pipeline's img/s alone (grain, the config's data section; synthetic JPEGs if the dataset is absent);
* with ``--compare torch``: the same architecture in PyTorch on the same device in the same run, built from
  ``transformers`` BEiT/CLIP/ViT layers (eager, and ``torch.compile`` unless ``--notorch_compile``; AMP bf16 on
  GPU, fp32 on CPU), timed in windows interleaved with ours, and the ratio.

The frozen network of each task is built with random weights too: the VQ-KD tokenizer for ``pretrain`` and the
teacher for ``vqkd``. Recipe configs get the official ViT-B/16 sizes (every released tokenizer and teacher is a
ViT-B/16), ``configs/demo.py`` stages get the demo's own tokenizer/teacher; ``--frozen_width/--frozen_depth/
--frozen_heads`` override. The VQ-KD codebook starts from random unit vectors and ``kmeans_init`` is off, so the
timed step is the steady-state step (the k-means branch runs once, at step 0, in real training).

The main logic is ``run_bench(config, ...)`` returning a dict; ``format_report`` turns it into the printed table.
"""
from __future__ import annotations

import dataclasses
import io
import os
import statistics
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# Dense bf16 peak TFLOP/s per chip, matched against ``device.device_kind`` (first matching substring wins).
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0), ("L4", 121.0), ("A10G", 70.0),
    ("V100", 125.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v4", 275.0), ("TPU v6", 918.0),
)

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
           + dense_flops(nt, t["width"], t["width"]) + dense_flops(nt, t["width"], extra["code_dim"])
           + dense_flops(nt, extra["code_dim"], extra["num_codes"]))
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


# ----------------------------------------------------------------------------------------------- jaxpr inspection
def _subjaxprs(params: dict):
    for value in params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def _walk_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _subjaxprs(eqn.params):
            yield from _walk_eqns(sub)


def _matmul_flops(eqn) -> float:
    out = eqn.outvars[0].aval
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        return 2.0 * np.prod(out.shape) * np.prod([lhs.shape[i] for i in lhs_contract])
    # Each output element is a dot over one output feature's kernel slice (rhs.size / out_features terms).
    out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * np.prod(out.shape) * np.prod(rhs.shape) / out_features


def precision_report(step: Callable, *args) -> dict:
    """What a step computes in which dtype, from its jaxpr: matmul FLOPs by (input dtypes → output dtype,
    precision), the dtypes of params / optimizer state / model state / metrics, and of the loss.

    Returns ``{'matmuls': {label: {'count', 'flops'}}, 'matmul_flops', 'bf16_matmul_fraction', 'state_dtypes':
    {'params'|'opt_state'|'model_state'|'extra': sorted dtype names}, 'metric_dtypes': {name: dtype}}``.
    """
    closed = jax.make_jaxpr(step)(*args)
    matmuls: dict = {}
    total = bf16 = 0.0
    for eqn in _walk_eqns(closed.jaxpr):
        if eqn.primitive.name not in ("dot_general", "conv_general_dilated"):
            continue
        ins = "x".join(str(v.aval.dtype) for v in eqn.invars[:2])
        prec = eqn.params.get("precision")
        prec = prec[0] if isinstance(prec, tuple) else prec
        prec_name = "" if prec is None else f" {getattr(prec, 'name', prec)}"
        label = f"{eqn.primitive.name} {ins}->{eqn.outvars[0].aval.dtype}{prec_name}"
        flops = _matmul_flops(eqn)
        entry = matmuls.setdefault(label, {"count": 0, "flops": 0.0})
        entry["count"] += 1
        entry["flops"] += flops
        total += flops
        if all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars[:2]):
            bf16 += flops
    state, _, _ = args
    out_state, metrics = jax.eval_shape(step, *args)
    dtypes = lambda tree: sorted({str(x.dtype) for x in jax.tree.leaves(tree)})  # noqa: E731
    return {"matmuls": matmuls, "matmul_flops": total, "bf16_matmul_fraction": bf16 / total if total else 0.0,
            "state_dtypes": {k: dtypes(getattr(state, k)) for k in ("params", "opt_state", "model_state", "extra")},
            "out_state_dtypes": {k: dtypes(getattr(out_state, k)) for k in ("params", "opt_state", "model_state")},
            "metric_dtypes": {k: str(v.dtype) for k, v in metrics.items()}}


# ----------------------------------------------------------------------------------------------- timing
def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _memory_plan(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def _device_peak_bytes(device) -> Optional[int]:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def peak_tflops(device, override: float = 0.0) -> Optional[float]:
    """Dense bf16 peak of ``device`` in TFLOP/s (``override`` > 0 wins; None for CPUs and unknown chips)."""
    if override and override > 0:
        return float(override)
    kind = getattr(device, "device_kind", "")
    if device.platform == "cpu":
        return None
    for name, value in PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return value
    return None


class JaxRunner:
    """The compiled step with its (donated) state, stepped in timed windows."""

    def __init__(self, work: Workload, mesh):
        from beitv2_jax.train import sharding

        self.replicated = sharding.replicated(mesh)
        self.state = jax.device_put(work.state, self.replicated)
        self.aux = jax.device_put(work.aux, self.replicated)
        self.batch = sharding.to_global_batch(work.batch, mesh)
        jitted = jax.jit(work.step, donate_argnums=0)
        t0 = time.perf_counter()
        lowered = jitted.lower(self.state, self.batch, self.aux)
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.cost = _cost(self.compiled)
        self.memory_plan = _memory_plan(self.compiled)

    def run(self, steps: int) -> float:
        """Run ``steps`` steps, sync once; returns seconds."""
        state = self.state
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = self.compiled(state, self.batch, self.aux)
        jax.block_until_ready((state, metrics))
        dt = time.perf_counter() - t0
        self.state = state
        self.last_metrics = metrics
        return dt


def _summary(times_per_step: list, batch_size: int) -> dict:
    ms = [1000.0 * t for t in times_per_step]
    med = statistics.median(ms)
    return {"step_ms": med, "step_ms_min": min(ms), "step_ms_max": max(ms), "step_ms_all": ms,
            "img_per_s": batch_size / (med / 1000.0), "img_per_s_max": batch_size / (min(ms) / 1000.0)}


# ----------------------------------------------------------------------------------------------- input pipeline
class SyntheticJpegSource:
    """``num`` random-noise JPEGs of ``height × width`` (ImageNet's typical 500×375), as encoded bytes records.

    Used when the config's dataset is not prepared on this machine, so the decode + augment cost stays realistic.
    """

    def __init__(self, num: int = 64, height: int = 375, width: int = 500, seed: int = 0):
        from PIL import Image

        rng = np.random.default_rng(seed)
        self.records = []
        for i in range(num):
            # Upsampled noise compresses like a photo (≈ 55 kB at quality 90; ImageNet averages ≈ 110 kB).
            small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            self.records.append({"image": buf.getvalue(), "label": i % 1000})

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index % len(self.records)]


def bench_input_pipeline(config: ml_collections.ConfigDict, batch_size: int, num_batches: int = 8,
                         num_workers: Optional[int] = None) -> dict:
    """Batches/s of the task's grain pipeline alone (decode, two-view augment, mask, batch), host side only.

    ``num_workers`` overrides ``config.data.num_workers``. The first batch (worker start-up) is not timed.
    """
    from beitv2_jax.data import pipeline, sources, transforms

    data = config.data
    workers = data.num_workers if num_workers is None else num_workers
    try:
        source = sources.open_source(data.dataset, data.train_split, data.data_dir)
        source_name = data.dataset
    except FileNotFoundError:
        source = SyntheticJpegSource()
        source_name = "synthetic 500x375 JPEGs (dataset not prepared here)"
    if config.task == "pretrain":
        transform = pipeline.pretrain_transform(data)
    else:
        transform = transforms.TokenizerTrainTransform(input_size=data.input_size,
                                                       min_crop_scale=data.tokenizer_min_crop_scale,
                                                       interpolation=data.interpolation)
    ds = pipeline.make_dataset(source, transform=transform, global_batch_size=batch_size, process_index=0,
                               process_count=1, seed=0, num_workers=workers, read_threads=data.read_threads,
                               prefetch_batches=data.prefetch_batches)
    it = iter(ds)
    t_start = time.perf_counter()
    next(it)
    first = time.perf_counter() - t_start
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    dt = time.perf_counter() - t0
    del it
    return {"source": source_name, "num_workers": workers, "read_threads": data.read_threads,
            "batches": num_batches, "img_per_s": num_batches * batch_size / dt, "first_batch_s": first}


# ----------------------------------------------------------------------------------------------- PyTorch mirror
def torch_problem() -> Optional[str]:
    """Why the PyTorch mirror cannot run here (None when it can): it needs torch and transformers ≥ 5 (whose BEiT
    layers take the position bias as ``attention_mask`` and live in ``BeitModel.layers``)."""
    try:
        import torch  # noqa: F401

        from beitv2_jax.torch_compat import import_torchvision_on_cpu_torch

        import_torchvision_on_cpu_torch()  # transformers imports torchvision when it is installed
        import transformers
    except ImportError as e:
        return f"torch/transformers not installed ({e})"
    if int(transformers.__version__.split(".")[0]) < 5:
        return f"the PyTorch mirror needs transformers>=5, found {transformers.__version__}"
    return None


class TorchRunner:
    """The same train step in PyTorch (``torch_train_step``), stepped in timed windows."""

    def __init__(self, work: Workload, device: str, compile_model: bool, threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.amp = device == "cuda"
        self.step_fn, self.num_params = torch_train_step(work.task, work.arch, work.batch, device, self.amp,
                                                      compile_model)
        self.compile_s = 0.0
        t0 = time.perf_counter()
        self.run(2)  # warm-up; with torch.compile this triggers compilation (forward and backward)
        self.compile_s = time.perf_counter() - t0

    def run(self, steps: int) -> float:
        torch = self.torch
        if self.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.step_fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
        else:
            float(loss)
        return time.perf_counter() - t0


def _beit_config(**kw):
    from transformers import BeitConfig

    base = dict(hidden_act="gelu", layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                drop_path_rate=0.0, use_mask_token=False, use_absolute_position_embeddings=False,
                use_relative_position_bias=False, use_shared_relative_position_bias=False, layer_scale_init_value=0.0,
                use_mean_pooling=False)
    base.update(kw)
    config = BeitConfig(**base)
    config._attn_implementation = "sdpa"  # torch.nn.functional.scaled_dot_product_attention, bias as attn_mask
    return config


def _torch_vit_trunk(width, depth, heads, image_size, patch_size, channels=3, mlp_ratio=4.0, **kw):
    """A transformers ``BeitModel`` used as a plain block stack (no final norm, no pooler)."""
    import torch.nn as nn
    from transformers.models.beit.modeling_beit import BeitModel

    cfg = _beit_config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                       intermediate_size=int(width * mlp_ratio), image_size=image_size, patch_size=patch_size,
                       num_channels=channels, **kw)
    model = BeitModel(cfg, add_pooling_layer=False)
    model.layernorm = nn.Identity()
    return model, cfg


def _torch_modules():
    """PyTorch mirrors of our models, built from transformers' BEiT / CLIP / ViT layers (defined lazily so the
    module imports without torch)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers.models.beit.modeling_beit import BeitLayer

    def run_blocks(trunk, x, resolution, bias=None, keep=None):
        kept = None
        for i, layer in enumerate(trunk.layers):
            x = layer(x, attention_mask=bias, resolution=resolution)
            if keep is not None and i + 1 == keep:
                kept = x
        return x, kept

    class Tokenizer(nn.Module):
        """VQ-KD encoder → task layer → l2-normalised codes → nearest unit-norm code (forward only)."""

        def __init__(self, t: dict):
            super().__init__()
            extra = dict(t["extra"])
            self.trunk, _ = _torch_vit_trunk(t["width"], t["depth"], t["num_heads"], t["image_size"], t["patch_size"],
                                             use_absolute_position_embeddings=True)
            self.fc_norm = nn.LayerNorm(t["width"], eps=1e-6)
            self.task = nn.Sequential(nn.Linear(t["width"], t["width"]), nn.Tanh(),
                                      nn.Linear(t["width"], extra["code_dim"]))
            self.register_buffer("codebook", F.normalize(torch.randn(extra["num_codes"], extra["code_dim"]), dim=-1))

        def forward(self, images):  # images NCHW in [0, 1]
            x = self.trunk.embeddings(images * 2.0 - 1.0)
            x, _ = run_blocks(self.trunk, x, images.shape[2:])
            with torch.autocast(images.device.type, enabled=False):
                z = F.normalize(self.task(self.fc_norm(x[:, 1:]).float()), dim=-1)
                cb = self.codebook
                dist = z.pow(2).sum(-1, keepdim=True) + cb.pow(2).sum(-1) - 2.0 * z @ cb.t()
            return dist.argmin(-1)  # [B, N]

    class Pretrain(nn.Module):
        """BEiT v2 MIM model (official ``VisionTransformerForMaskedImageModelingCLS``) on transformers' BEiT."""

        def __init__(self, a: dict):
            super().__init__()
            self.early = a["early_layers"]
            self.trunk, cfg = _torch_vit_trunk(a["width"], a["depth"], a["num_heads"], a["image_size"],
                                               a["patch_size"], mlp_ratio=a["mlp_ratio"], use_mask_token=True,
                                               use_shared_relative_position_bias=True,
                                               layer_scale_init_value=a["layer_scale_init"])
            # BeitLayer reads only use_relative_position_bias (False): the head blocks get the shared bias passed in.
            self.cls_pt_layers = nn.ModuleList([BeitLayer(cfg) for _ in range(a["head_layers"])])
            self.norm = nn.LayerNorm(a["width"], eps=1e-6)
            self.lm_head = nn.Linear(a["width"], a["vocab_size"])
            self.window = (a["image_size"] // a["patch_size"],) * 2

        def forward(self, images, mask, positions, labels):
            x = self.trunk.embeddings(images, bool_masked_pos=mask)
            bias = self.trunk.shared_position_bias(self.window, dim_size=x.shape[1])
            x, early = run_blocks(self.trunk, x, images.shape[2:], bias, keep=self.early if self.cls_pt_layers
                                  else None)
            index = positions[..., None].expand(-1, -1, x.shape[-1])
            logits = self.lm_head(torch.gather(self.norm(x)[:, 1:], 1, index))
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            if len(self.cls_pt_layers):
                h = torch.cat([x[:, :1], early[:, 1:]], dim=1)
                for layer in self.cls_pt_layers:
                    h = layer(h, attention_mask=bias, resolution=images.shape[2:])
                logits2 = self.lm_head(torch.gather(self.norm(h)[:, 1:], 1, index))
                loss = loss + F.cross_entropy(logits2.float().flatten(0, 1), labels.flatten())
            return loss

    class Teacher(nn.Module):
        """CLIP visual tower (``transformers`` CLIPVisionModelWithProjection) or a DINO-style ViT (ViTModel)."""

        def __init__(self, t: dict):
            super().__init__()
            self.kind = t["kind"]
            kw = dict(hidden_size=t["width"], intermediate_size=4 * t["width"], num_hidden_layers=t["depth"],
                      num_attention_heads=t["num_heads"], image_size=t["image_size"], patch_size=t["patch_size"])
            if self.kind == "clip":
                from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

                cfg = CLIPVisionConfig(projection_dim=dict(t["extra"])["proj_dim"], hidden_act="quick_gelu",
                                       layer_norm_eps=1e-5, **kw)
                cfg._attn_implementation = "sdpa"
                self.model = CLIPVisionModelWithProjection(cfg)
                mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
            else:
                from transformers import ViTConfig, ViTModel

                cfg = ViTConfig(qkv_bias=True, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, **kw)
                cfg._attn_implementation = "sdpa"
                self.model = ViTModel(cfg, add_pooling_layer=False)
                mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
            self.requires_grad_(False)

        def forward(self, images):
            x = (images.clamp(0, 1) - self.mean) / self.std
            if self.kind == "clip":
                h = self.model.vision_model(pixel_values=x).last_hidden_state
                return self.model.visual_projection(self.model.vision_model.post_layernorm(h[:, 1:])).float()
            return self.model(pixel_values=x).last_hidden_state[:, 1:].float()

    class VQKD(nn.Module):
        """VQ-KD tokenizer training forward: encoder → codes → straight-through → decoder → cosine loss."""

        def __init__(self, a: dict):
            super().__init__()
            self.encoder, _ = _torch_vit_trunk(a["width"], a["depth"], a["num_heads"], a["image_size"],
                                               a["patch_size"], mlp_ratio=a["mlp_ratio"],
                                               use_absolute_position_embeddings=True)
            self.window = a["image_size"] // a["patch_size"]
            self.decoder, _ = _torch_vit_trunk(a["decoder_width"], a["decoder_depth"], a["decoder_heads"],
                                               self.window, 1, channels=a["code_dim"], mlp_ratio=a["mlp_ratio"],
                                               use_absolute_position_embeddings=True)
            self.enc_norm = nn.LayerNorm(a["width"], eps=1e-6)
            self.dec_norm = nn.LayerNorm(a["decoder_width"], eps=1e-6)
            self.encode_task = nn.Sequential(nn.Linear(a["width"], a["width"]), nn.Tanh(),
                                             nn.Linear(a["width"], a["code_dim"]))
            self.decode_task = nn.Sequential(nn.Linear(a["decoder_width"], a["decoder_width"]), nn.Tanh(),
                                             nn.Linear(a["decoder_width"], a["teacher_dim"]))
            self.register_buffer("codebook", F.normalize(torch.randn(a["num_codes"], a["code_dim"]), dim=-1))

        def forward(self, images, target):
            x = self.encoder.embeddings(images * 2.0 - 1.0)
            x, _ = run_blocks(self.encoder, x, images.shape[2:])
            with torch.autocast(images.device.type, enabled=False):
                z = F.normalize(self.encode_task(self.enc_norm(x[:, 1:]).float()), dim=-1)  # [B, N, c]
                cb = self.codebook
                dist = z.pow(2).sum(-1, keepdim=True) + cb.pow(2).sum(-1) - 2.0 * z @ cb.t()
                idx = dist.argmin(-1)
                z_q = cb[idx]
                commit = (z_q.detach() - z).pow(2).mean()
                z_st = z + (z_q - z).detach()
            b, n, c = z_st.shape
            code_map = z_st.transpose(1, 2).reshape(b, c, self.window, self.window)
            h = self.decoder.embeddings(code_map)
            h, _ = run_blocks(self.decoder, h, code_map.shape[2:])
            with torch.autocast(images.device.type, enabled=False):
                out = self.decode_task(self.dec_norm(h[:, 1:]).float())
                rec = (1.0 - (F.normalize(out, dim=-1) * F.normalize(target, dim=-1)).sum(-1)).mean()
            return rec + commit, z.detach().flatten(0, 1), idx.flatten()

    return Tokenizer, Pretrain, Teacher, VQKD


def _torch_optimizer(model, optim: dict, device: str):
    """AdamW with the no-decay rule (ndim ≤ 1, biases, cls token) as ours; fused on CUDA, foreach on CPU."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "cls_token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.get("weight_decay", 0.0)},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim["lr"], betas=(optim["b1"], optim["b2"]), eps=optim["eps"], **kw)


def torch_train_step(task: str, arch: dict, batch: dict, device: str, amp: bool, compile_model: bool):
    """``(step() -> loss tensor, trained parameter count)`` for the PyTorch mirror of our ``task`` step."""
    import torch

    Tokenizer, Pretrain, Teacher, VQKD = _torch_modules()
    torch.manual_seed(0)
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).to(device)  # noqa: E731
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    clip = arch["optim"].get("clip_grad") or 0.0

    if task == "pretrain":
        model = Pretrain(arch).to(device)
        frozen = Tokenizer(arch["tokenizer"]).to(device).eval().requires_grad_(False)
        images, tok_images = nchw(batch["image"]), nchw(batch["tokenizer_image"])
        mask = torch.from_numpy(batch["mask"]).to(device)
    else:
        model = VQKD(arch).to(device)
        frozen = Teacher(arch["teacher"]).to(device).eval()
        images = nchw(batch["image"])
    model.train()
    opt = _torch_optimizer(model, arch["optim"], device)
    forward, frozen_forward = model, frozen
    if compile_model:
        forward, frozen_forward = torch.compile(model), torch.compile(frozen)
    params = [p for p in model.parameters() if p.requires_grad]

    def finish(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    if task == "pretrain":
        k = arch["num_masked"]

        def step():
            # Masked positions in row-major order without a device sync (as ours; torch.nonzero would sync).
            positions = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
            with torch.no_grad(), autocast():
                labels = torch.gather(frozen_forward(tok_images), 1, positions)
            with autocast():
                loss = forward(images, mask, positions, labels)
            finish(loss)
            return loss.detach()
    else:
        decay, num_codes = arch["decay"], arch["num_codes"]

        def step():
            with torch.no_grad(), autocast():
                target = frozen_forward(images)
            with autocast():
                loss, z_flat, idx = forward(images, target)
            finish(loss)
            with torch.no_grad():  # codebook EMA with re-normalisation (official norm_ema_inplace)
                cb = model.codebook
                bins = torch.zeros(num_codes, device=cb.device).index_add_(0, idx, torch.ones_like(z_flat[:, 0]))
                embed_sum = torch.zeros_like(cb).index_add_(0, idx, z_flat)
                new = torch.nn.functional.normalize(embed_sum / bins.clamp(min=1.0)[:, None], dim=-1)
                new = torch.where((bins == 0)[:, None], cb, new)
                cb.copy_(torch.nn.functional.normalize(decay * cb + (1.0 - decay) * new, dim=-1))
            return loss.detach()

    return step, sum(p.numel() for p in params)


# ----------------------------------------------------------------------------------------------- the bench
def run_bench(config: ml_collections.ConfigDict, *, stage: Optional[str] = None, batch_size: int = 0,
              steps: int = 10, warmup: int = 2, repeats: int = 3, compare_torch: bool = False,
              torch_compile: bool = True, torch_threads: int = 0, peak: float = 0.0, input_pipeline: bool = True,
              pipeline_batches: int = 8, pipeline_workers: Optional[int] = None, frozen_width: int = 0,
              frozen_depth: int = 0, frozen_heads: int = 0, frozen_dtype: Optional[str] = None,
              precision: bool = False, trace_only: bool = False) -> dict:
    """Benchmark one train step; returns a dict of results (see ``format_report`` for the fields).

    ``trace_only``: build the step on abstract shapes and report the analytic FLOPs and the precision report only
    (nothing compiled, allocated or timed: checks a ViT-L bf16 config in seconds on a laptop).
    """
    from beitv2_jax.train import sharding

    root = config
    config = stage_config(config, stage)
    batch_size = batch_size or config.batch_size
    frozen = frozen_arch(config, root, frozen_width, frozen_depth, frozen_heads)
    frozen_dtype = frozen_dtype or config.get("dtype", "float32")
    mesh = sharding.make_mesh(config.get("mesh"))
    dp = sharding.data_parallel_size(mesh)
    if batch_size % dp:
        raise ValueError(f"batch {batch_size} is not divisible by the data-parallel size {dp}")
    build = build_pretrain if config.task == "pretrain" else build_vqkd
    work = build(config, frozen, batch_size, frozen_dtype, abstract=trace_only)
    device = jax.devices()[0]
    result: dict = {
        "task": config.task, "stage": stage, "batch_size": batch_size, "dtype": config.get("dtype", "float32"),
        "frozen_dtype": frozen_dtype, "attention_impl": config.model.get("attention_impl", "einsum"),
        "remat_policy": config.model.get("remat_policy", "none"), "device": device.device_kind,
        "platform": device.platform, "num_devices": jax.device_count(), "jax_version": jax.__version__,
        "num_params": work.num_params, "frozen": dataclasses.asdict(frozen), "frozen_params": work.frozen_params,
        "arch": {k: v for k, v in work.arch.items() if k not in ("optim", "tokenizer", "teacher")},
        "steps": steps, "repeats": repeats, "warmup": warmup, "trace_only": trace_only,
        "flops_per_image_analytic": work.analytic["total"], "analytic_breakdown": work.analytic,
    }
    if precision or trace_only:
        result["precision"] = precision_report(work.step, work.state, work.batch, work.aux)
    if trace_only:
        return result

    ours = JaxRunner(work, mesh)
    result["compile_s"] = ours.compile_s
    # cost_analysis() describes the partitioned per-device program: × devices for the global step.
    flops_xla = float(ours.cost.get("flops", 0.0)) * mesh.devices.size
    result["flops_per_image_xla"] = flops_xla / batch_size if flops_xla else None
    result["xla_over_analytic"] = (result["flops_per_image_xla"] / work.analytic["total"]
                                   if flops_xla else None)
    result["memory_plan"] = ours.memory_plan

    runners = [("jax", ours)]
    torch_device = None
    if compare_torch:
        problem = torch_problem()
        if problem:
            result["torch_error"] = problem
        else:
            import torch

            if device.platform == "gpu" and torch.cuda.is_available():
                torch_device = "cuda"
            elif device.platform == "cpu":
                torch_device = "cpu"
            else:
                result["torch_error"] = f"no PyTorch backend for a {device.platform} device"
        if torch_device:
            result["torch_device"] = torch_device
            result["torch_version"] = torch.__version__
            eager = TorchRunner(work, torch_device, compile_model=False, threads=torch_threads)
            result["torch_params"] = eager.num_params
            result["torch_threads"] = torch.get_num_threads()
            runners.append(("torch_eager", eager))
            if torch_compile:
                try:
                    runners.append(("torch_compile", TorchRunner(work, torch_device, compile_model=True,
                                                                 threads=torch_threads)))
                    result["torch_compile_s"] = runners[-1][1].compile_s
                except Exception as e:  # noqa: BLE001 - report, keep the eager numbers
                    result["torch_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"

    for _, runner in runners:
        if warmup:
            runner.run(warmup)
    per_step: dict = {name: [] for name, _ in runners}
    for _ in range(repeats):  # interleaved windows: machine noise hits every contender alike
        for name, runner in runners:
            per_step[name].append(runner.run(steps) / steps)
    for name, _ in runners:
        result[name] = _summary(per_step[name], batch_size)
    result["jax"]["compile_s"] = ours.compile_s
    metrics = jax.device_get(ours.last_metrics)
    result["final_loss"] = float(metrics["loss"])
    result["peak_device_bytes"] = _device_peak_bytes(device)
    if torch_device == "cuda":
        import torch

        result["torch_peak_device_bytes"] = int(torch.cuda.max_memory_allocated())

    pk = peak_tflops(device, peak)
    result["peak_tflops"] = pk
    if pk:
        chips = mesh.devices.size
        for name, _ in runners:  # MFU from the analytic model FLOPs (recomputation under remat not counted)
            achieved = work.analytic["total"] * result[name]["img_per_s"]
            result[name]["mfu"] = achieved / (pk * 1e12 * (chips if name == "jax" else 1))
        if flops_xla:
            result["jax"]["hfu_xla"] = result["flops_per_image_xla"] * result["jax"]["img_per_s"] / (
                pk * 1e12 * chips)
    for name, _ in runners[1:]:
        result[name]["jax_speedup"] = result[name]["step_ms"] / result["jax"]["step_ms"]
    if len(runners) > 1 and mesh.devices.size > 1:
        result["torch_note"] = (f"ours ran on {mesh.devices.size} devices, PyTorch on one: compare with one visible "
                                f"device (CUDA_VISIBLE_DEVICES=0)")
    if input_pipeline:
        try:
            result["input_pipeline"] = bench_input_pipeline(config, batch_size, pipeline_batches, pipeline_workers)
        except Exception as e:  # noqa: BLE001 - the step numbers stand on their own
            result["input_pipeline"] = {"error": f"{type(e).__name__}: {e}"}
    return result


# ----------------------------------------------------------------------------------------------- report
def _fmt_flops(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.0f} FLOP"


def _fmt_bytes(x: Optional[int]) -> str:
    return "n/a" if not x else f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def _precision_lines(p: dict) -> str:
    total = p["matmul_flops"] or 1.0
    rows = [f"precision: {100 * p['bf16_matmul_fraction']:.1f}% of matmul FLOPs in bf16; state dtypes "
            + ", ".join(f"{k} {'/'.join(v) or '-'}" for k, v in p["state_dtypes"].items())
            + f"; metrics {'/'.join(sorted(set(p['metric_dtypes'].values())))}"]
    for label, v in sorted(p["matmuls"].items(), key=lambda kv: -kv[1]["flops"]):
        rows.append(f"  {100 * v['flops'] / total:5.1f}%  x{v['count']:<4d} {label}")
    return "\n".join(rows)


def format_report(r: dict) -> str:
    lines = []
    add = lines.append
    a = r["arch"]
    add(f"task {r['task']}" + (f" (demo stage {r['stage']})" if r.get("stage") else "")
        + f" | batch {r['batch_size']} | compute {r['dtype']} (frozen net {r['frozen_dtype']}) | attention "
          f"{r['attention_impl']} | remat {r['remat_policy']}")
    add(f"model: ViT width {a['width']} depth {a['depth']} heads {a['num_heads']} patch {a['patch_size']} "
        f"image {a['image_size']} | {r['num_params'] / 1e6:.2f}M trained params | frozen {r['frozen']['kind']} "
        f"width {r['frozen']['width']} depth {r['frozen']['depth']} ({r['frozen_params'] / 1e6:.2f}M params)")
    if r.get("trace_only"):
        p = r["precision"]
        add(f"traced only (nothing compiled or run): analytic matmul FLOPs/image "
            f"{_fmt_flops(r['flops_per_image_analytic'])}, jaxpr matmul FLOPs/image "
            f"{_fmt_flops(p['matmul_flops'] / r['batch_size'])}")
        add(_precision_lines(p))
        return "\n".join(lines)
    add(f"device: {r['device']} ×{r['num_devices']} ({r['platform']}), jax {r['jax_version']}; "
        f"compile {r['compile_s']:.1f} s; timing: {r['repeats']} windows × {r['steps']} steps after "
        f"{r['warmup']} warm-up steps")
    fx, fa = r["flops_per_image_xla"], r["flops_per_image_analytic"]
    add(f"FLOPs/image: XLA cost analysis {_fmt_flops(fx)} | analytic matmuls {_fmt_flops(fa)}"
        + (f" | XLA/analytic {r['xla_over_analytic']:.3f}" if r.get("xla_over_analytic") else ""))
    if "precision" in r:
        p = r["precision"]
        add(f"jaxpr matmul FLOPs/image {_fmt_flops(p['matmul_flops'] / r['batch_size'])}")
        add(_precision_lines(p))
    pk = r.get("peak_tflops")
    add(f"peak: {f'{pk:.0f} TFLOP/s dense bf16 per chip' if pk else 'n/a (CPU: pass --peak_tflops)'}")
    add("")
    add(f"{'':14s} {'step ms (median [min, max])':>30s} {'img/s':>10s} {'MFU':>7s} {'vs ours':>8s}")
    for name in ("jax", "torch_eager", "torch_compile"):
        if name not in r:
            continue
        s = r[name]
        mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a"
        ratio = f"{s['jax_speedup']:.2f}x" if "jax_speedup" in s else "1.00x"
        label = {"jax": "ours (JAX)", "torch_eager": "torch eager", "torch_compile": "torch.compile"}[name]
        add(f"{label:14s} {s['step_ms']:10.1f} [{s['step_ms_min']:.1f}, {s['step_ms_max']:.1f}]".ljust(46)
            + f"{s['img_per_s']:10.1f} {mfu:>7s} {ratio:>8s}")
    if r["jax"].get("hfu_xla") is not None:
        add(f"(MFU from the analytic model FLOPs; from XLA's count of all ops, recomputation included: "
            f"{100 * r['jax']['hfu_xla']:.1f}%)")
    if "torch_device" in r:
        add(f"(torch {r.get('torch_version')} on {r['torch_device']}, {r.get('torch_threads')} threads, "
            f"{r.get('torch_params', 0) / 1e6:.2f}M trained params"
            + (f", torch.compile warm-up {r['torch_compile_s']:.0f} s" if "torch_compile_s" in r else "")
            + "; 'vs ours' = their step time / ours)")
    for key in ("torch_error", "torch_compile_error", "torch_note"):
        if key in r:
            add(f"{key}: {r[key]}")
    add("")
    mp = r.get("memory_plan") or {}
    add(f"memory: device peak {_fmt_bytes(r.get('peak_device_bytes'))}; XLA plan: arguments "
        f"{_fmt_bytes(mp.get('argument_size_in_bytes'))}, temporaries {_fmt_bytes(mp.get('temp_size_in_bytes'))}, "
        f"donated/aliased {_fmt_bytes(mp.get('alias_size_in_bytes'))}"
        + (f"; torch peak {_fmt_bytes(r['torch_peak_device_bytes'])}" if r.get("torch_peak_device_bytes") else ""))
    ip = r.get("input_pipeline")
    if ip:
        if "error" in ip:
            add(f"input pipeline: {ip['error']}")
        else:
            add(f"input pipeline alone: {ip['img_per_s']:.1f} img/s ({ip['source']}, {ip['num_workers']} workers, "
                f"{ip['read_threads']} threads, {ip['batches']} batches)")
    add(f"final loss {r['final_loss']:.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI
def pin_cpus(n: int) -> list:
    """Restrict this process to its first ``n`` allowed CPUs. XLA sizes its CPU thread pool from the affinity mask
    when the backend starts, and torch's OpenMP pool likewise, so call this before the first JAX computation."""
    cpus = sorted(os.sched_getaffinity(0))[:n]
    os.sched_setaffinity(0, cpus)
    return cpus


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/<name>.py (a pretrain, vqkd or demo config).",
                                    lock_config=True)
    flags.DEFINE_string("stage", None, "For configs/demo.py: which stage to benchmark (pretrain | vqkd).")
    flags.DEFINE_integer("batch", 0, "Global batch size (0 = config.batch_size).")
    flags.DEFINE_integer("steps", 10, "Steps per timed window.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
    flags.DEFINE_integer("repeats", 3, "Timed windows (interleaved with the PyTorch runs); the median is reported.")
    flags.DEFINE_enum("compare", None, ["torch"], "Also time the same architecture in PyTorch.")
    flags.DEFINE_bool("torch_compile", True, "With --compare torch: also time torch.compile.")
    flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = torch's default).")
    flags.DEFINE_integer("cpu_threads", 0, "Pin this process to its first N CPUs before JAX starts, so XLA's and "
                         "torch's thread pools both use N threads (0 = all; use 1 on a shared machine).")
    flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per chip for MFU (0 = from the device table).")
    flags.DEFINE_bool("input_pipeline", True, "Also time the grain input pipeline alone.")
    flags.DEFINE_bool("pipeline_only", False, "Only time the input pipeline (no model is built or compiled).")
    flags.DEFINE_integer("pipeline_batches", 8, "Batches timed for the input pipeline.")
    flags.DEFINE_integer("pipeline_workers", -1, "grain worker processes for the pipeline timing (-1 = config).")
    flags.DEFINE_integer("frozen_width", 0, "Tokenizer/teacher width (0 = official ViT-B/16 or the demo's).")
    flags.DEFINE_integer("frozen_depth", 0, "Tokenizer/teacher depth (0 = default).")
    flags.DEFINE_integer("frozen_heads", 0, "Tokenizer/teacher heads (0 = default).")
    flags.DEFINE_string("frozen_dtype", None, "Tokenizer/teacher compute dtype (default: config.dtype).")
    flags.DEFINE_bool("precision", False, "Also report the step's matmul dtypes and state dtypes (jaxpr).")
    flags.DEFINE_bool("trace_only", False, "Only trace the step on abstract shapes: analytic FLOPs + precision "
                      "report, nothing compiled or timed.")
    flags.DEFINE_string("json", None, "Also write the result dict as JSON to this path.")


def main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None:
        raise SystemExit("error: --config is required, e.g. --config configs/demo.py --stage pretrain")
    if FLAGS.cpu_threads > 0:
        pin_cpus(FLAGS.cpu_threads)
    if FLAGS.compare == "torch":
        # JAX would otherwise take 75% of GPU memory up front and leave PyTorch too little (read at backend start).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if FLAGS.pipeline_only:
        config = stage_config(FLAGS.config, FLAGS.stage)
        result = bench_input_pipeline(config, FLAGS.batch or config.batch_size, FLAGS.pipeline_batches,
                                      None if FLAGS.pipeline_workers < 0 else FLAGS.pipeline_workers)
        result.update(task=config.task, batch_size=FLAGS.batch or config.batch_size)
        print(f"input pipeline alone ({result['task']}, batch {result['batch_size']}): {result['img_per_s']:.1f} "
              f"img/s ({result['source']}, {result['num_workers']} workers, {result['read_threads']} threads, "
              f"{result['batches']} batches; first batch {result['first_batch_s']:.1f} s)")
    else:
        result = run_bench(FLAGS.config, stage=FLAGS.stage, batch_size=FLAGS.batch, steps=FLAGS.steps,
                           warmup=FLAGS.warmup, repeats=FLAGS.repeats, compare_torch=FLAGS.compare == "torch",
                           torch_compile=FLAGS.torch_compile, torch_threads=FLAGS.torch_threads or FLAGS.cpu_threads,
                           peak=FLAGS.peak_tflops,
                           input_pipeline=FLAGS.input_pipeline, pipeline_batches=FLAGS.pipeline_batches,
                           pipeline_workers=None if FLAGS.pipeline_workers < 0 else FLAGS.pipeline_workers,
                           frozen_width=FLAGS.frozen_width, frozen_depth=FLAGS.frozen_depth,
                           frozen_heads=FLAGS.frozen_heads, frozen_dtype=FLAGS.frozen_dtype, precision=FLAGS.precision,
                           trace_only=FLAGS.trace_only)
        print(format_report(result))
    if FLAGS.json:
        from beitv2_jax import storage

        storage.write_json(FLAGS.json, result, indent=1, default=str)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
