"""The bf16 precision policy (issue #9): float32 params, compute in ``config.dtype``, attention logits / softmax,
quantizer and losses in float32.

* the VQ-KD teacher runs its matmuls in ``config.dtype`` and still hands float32 targets to the cosine loss;
* einsum attention accumulates q·k in float32 (``preferred_element_type``) from bf16 operands;
* the ``xla`` attention path gets the shared relative position bias as ``[1, H, T, T]`` and matches einsum.

Tiny models only (width 32–64, depth 2, 32×32 images); most checks read jaxprs, nothing large is compiled.
"""
import collections

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from beitv2_jax.models import teachers, vit
from beitv2_jax.models import vqkd as vqkd_lib
from beitv2_jax.train import state as state_lib
from beitv2_jax.train.tasks import vqkd as vqkd_task

SIZE, PATCH, DEPTH = 32, 8, 2
TEACHER = dict(image_size=SIZE, patch_size=PATCH, width=32, depth=DEPTH, num_heads=2, qkv_bias="full",
               use_abs_pos=True, use_final_norm=True, pooling="cls")
MATMULS_PER_BLOCK = 8  # q, k, v (three dots of the qkv kernel slices), q·k, p·v, proj, fc1, fc2
PATCH_EMBED_MATMULS = 1  # the patch embedding is one dot of the flattened patches (not a convolution)


# ----------------------------------------------------------------------------------------------- jaxpr helpers
def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def equations(jaxpr, primitive: str):
    """Every ``primitive`` equation of a (closed) jaxpr, nested jaxprs (jit, custom_jvp, remat, ...) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            yield eqn
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from equations(sub, primitive)


def dot_generals(jaxpr):
    return equations(jaxpr, "dot_general")


def dot_dtype_counts(jaxpr) -> collections.Counter:
    """``Counter`` of dot_generals keyed by their operand dtypes, e.g. ``('bfloat16', 'bfloat16')``."""
    return collections.Counter(tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in dot_generals(jaxpr))


BF16, F32 = ("bfloat16", "bfloat16"), ("float32", "float32")


# ----------------------------------------------------------------------------------------------- (a) VQ-KD teacher
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from beitv2_jax.convert import store

    model = vit.VisionTransformer(**TEACHER)
    params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"])
    directory = str(tmp_path_factory.mktemp("teacher"))
    store.save_variables(directory, {"params": jax.device_get(params)}, "vit", TEACHER)
    return directory


def _vqkd_config(teacher_dir, dtype):
    return ml_collections.ConfigDict({"dtype": dtype, "data": {"input_size": SIZE},
                                      "teacher": {"kind": "dino", "checkpoint": teacher_dir}})


def test_teacher_dtype_default_is_float32_and_bf16_targets_are_float32(teacher_dir):
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, SIZE, SIZE, 3))
    default, params = teachers.teacher_from_checkpoint("dino", teacher_dir, image_size=SIZE)
    fp32, _ = vqkd_task.load_teacher(_vqkd_config(teacher_dir, "float32"))
    bf16, bf16_params = vqkd_task.load_teacher(_vqkd_config(teacher_dir, "bfloat16"))
    assert default.model.dtype == jnp.float32 and default.model == fp32.model
    assert bf16.model.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16_params))  # params stay float32

    default_jaxpr = jax.make_jaxpr(default.features)(params, images)
    bf16_jaxpr = jax.make_jaxpr(bf16.features)(params, images)
    assert dot_dtype_counts(default_jaxpr) == {F32: MATMULS_PER_BLOCK * DEPTH + PATCH_EMBED_MATMULS}
    assert dot_dtype_counts(bf16_jaxpr) == {BF16: MATMULS_PER_BLOCK * DEPTH + PATCH_EMBED_MATMULS}  # every teacher matmul in bf16
    assert bf16_jaxpr.out_avals[0].dtype == jnp.float32  # targets for the cosine loss stay float32

    ref, out = jax.jit(lambda p, x: (default.features(p, x), bf16.features(p, x)))(params, images)
    assert out.dtype == jnp.float32 and out.shape == ref.shape == (2, (SIZE // PATCH) ** 2, TEACHER["width"])
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert err < 2e-2, err


def test_vqkd_train_step_runs_the_teacher_in_bf16(teacher_dir):
    """Same bf16 tokenizer, teacher in float32 vs bf16: exactly the teacher's matmuls move to bf16; loss float32."""
    cfg = dict(image_size=SIZE, patch_size=PATCH, width=32, depth=DEPTH, num_heads=2, decoder_depth=1,
               num_codes=16, code_dim=8, teacher_dim=TEACHER["width"], dtype="bfloat16")
    model = vqkd_lib.build_vqkd(cfg)
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, SIZE, SIZE, 3))
    variables = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1]))
    tx = optax.adamw(1e-3)
    extra = {"epoch_counts": jnp.zeros((model.num_codes,), jnp.float32), "bad_steps": jnp.zeros((), jnp.int32)}
    state = jax.eval_shape(lambda v: state_lib.create(v["params"], tx, model_state={"codebook": v["codebook"]},
                                                      extra=extra), variables)
    counts, metrics = {}, {}
    for dtype in ("float32", "bfloat16"):
        teacher, tparams = vqkd_task.load_teacher(_vqkd_config(teacher_dir, dtype))
        step = vqkd_task.make_train_step(model, teacher, tx, lambda s: 1e-3)
        jaxpr = jax.make_jaxpr(step)(state, {"image": images}, tparams)
        counts[dtype] = dot_dtype_counts(jaxpr)
        metrics[dtype] = jax.eval_shape(step, state, {"image": images}, tparams)[1]
    teacher_matmuls = MATMULS_PER_BLOCK * DEPTH + PATCH_EMBED_MATMULS
    assert counts["bfloat16"][BF16] - counts["float32"][BF16] == teacher_matmuls
    assert counts["float32"][F32] - counts["bfloat16"][F32] == teacher_matmuls
    assert counts["bfloat16"][BF16] > teacher_matmuls  # the tokenizer's encoder/decoder are bf16 as well
    for name in ("loss", "rec_loss", "quant_loss"):
        assert metrics["bfloat16"][name].dtype == jnp.float32, name


# ----------------------------------------------------------------------------------------------- (b) einsum logits
def _tiny_vit(**kw):
    return vit.VisionTransformer(image_size=SIZE, patch_size=PATCH, width=64, depth=DEPTH, num_heads=4,
                                 rel_pos="shared", layer_scale_init=0.1, **kw)


def _random_params(model, x, seed=3, std=0.3):
    shapes = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"])
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [std * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _params_with_bias(model, x):
    """Random params (std 0.2) with a non-zero relative position table, so the attention bias matters."""
    params = _random_params(model, x, std=0.2)
    table = params["rel_pos_bias"]["relative_position_bias_table"]
    params["rel_pos_bias"]["relative_position_bias_table"] = jax.random.normal(jax.random.PRNGKey(5), table.shape)
    return params


def test_einsum_attention_logits_accumulate_in_float32():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, SIZE, SIZE, 3))
    fp32, bf16 = _tiny_vit(), _tiny_vit(dtype=jnp.bfloat16)
    params = _random_params(fp32, x)
    tokens, heads = (SIZE // PATCH) ** 2 + 1, 4

    jaxpr = jax.make_jaxpr(lambda p, x: bf16.apply({"params": p}, x)["encoded"])(params, x)
    logits = [e for e in dot_generals(jaxpr) if e.outvars[0].aval.shape == (2, heads, tokens, tokens)]
    assert len(logits) == DEPTH
    for eqn in logits:
        assert [str(v.aval.dtype) for v in eqn.invars] == ["bfloat16", "bfloat16"]  # q, k in the compute dtype
        assert eqn.params["preferred_element_type"] == jnp.float32 and eqn.outvars[0].aval.dtype == jnp.float32
    # float32 models: the same dot_general as before (float32 in and out, default precision).
    for eqn in dot_generals(jax.make_jaxpr(lambda p, x: fp32.apply({"params": p}, x)["encoded"])(params, x)):
        assert all(v.aval.dtype == jnp.float32 for v in (*eqn.invars, *eqn.outvars))
        assert eqn.params["precision"] is None

    def loss(p, model):
        return jnp.mean(model.apply({"params": p}, x)["encoded"].astype(jnp.float32) ** 2)

    @jax.jit
    def run(params):
        return (fp32.apply({"params": params}, x)["encoded"], bf16.apply({"params": params}, x)["encoded"],
                jax.grad(loss)(params, fp32), jax.grad(loss)(params, bf16))

    ref, out, ref_grads, grads = run(params)
    assert out.dtype == jnp.bfloat16
    err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert err < 2e-2, err
    # The backward pass (float32 logit cotangent × bf16 q/k) traces, compiles and stays close to float32.
    flat_ref, flat = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)]) for t in (ref_grads, grads))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads)) and bool(jnp.isfinite(flat).all())
    assert float(jnp.linalg.norm(flat - flat_ref) / jnp.linalg.norm(flat_ref)) < 5e-2


# ----------------------------------------------------------------------------------------------- (c) xla + bias
def test_xla_attention_gets_a_batch_shared_bias_and_matches_einsum(monkeypatch):
    x = jax.random.normal(jax.random.PRNGKey(1), (3, SIZE, SIZE, 3))
    einsum, xla = _tiny_vit(), _tiny_vit(attention_impl="xla")
    params = _params_with_bias(einsum, x)
    table = params["rel_pos_bias"]["relative_position_bias_table"]

    seen = []
    original = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["bias"].shape, kwargs["bias"].dtype))
        return original(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    out = xla.apply({"params": params}, x)["encoded"]
    tokens = (SIZE // PATCH) ** 2 + 1
    assert seen == [((1, 4, tokens, tokens), jnp.float32)] * DEPTH  # shared across the batch, not [B, H, T, T]

    ref = einsum.apply({"params": params}, x)["encoded"]
    no_bias = einsum.apply({"params": {**params, "rel_pos_bias": {"relative_position_bias_table": 0 * table}}},
                           x)["encoded"]
    assert float(jnp.abs(no_bias - ref).max()) > 1e-2  # the bias is not a no-op here
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


# ----------------------------------------------------------------------------------------------- (d) cuDNN (GPU)
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused attention needs a CUDA GPU")
def test_cudnn_attention_with_shared_bias_matches_einsum_forward_and_backward():
    """bf16 cuDNN fused attention (shared relative position bias as [1, H, T, T]) against the einsum path: outputs
    and every gradient, the relative position table's included, close to the float32 einsum reference."""
    x = jax.random.normal(jax.random.PRNGKey(1), (4, SIZE, SIZE, 3))
    fp32 = _tiny_vit()
    einsum_bf16, cudnn_bf16 = _tiny_vit(dtype=jnp.bfloat16), _tiny_vit(dtype=jnp.bfloat16, attention_impl="cudnn")
    params = _params_with_bias(fp32, x)

    def loss(p, model):
        return jnp.mean(model.apply({"params": p}, x)["encoded"].astype(jnp.float32) ** 2)

    @jax.jit
    def run(params):
        return {name: (m.apply({"params": params}, x)["encoded"].astype(jnp.float32), jax.grad(loss)(params, m))
                for name, m in (("fp32", fp32), ("einsum", einsum_bf16), ("cudnn", cudnn_bf16))}

    hlo = run.lower(params).compile().as_text()
    assert "cudnn" in hlo.lower()  # the fused kernel is really used, not a fallback
    out = run(params)
    ref, ref_grads = out["fp32"]
    flat = {k: jnp.concatenate([g.ravel() for g in jax.tree.leaves(v[1])]) for k, v in out.items()}
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
    for name in ("einsum", "cudnn"):
        assert rel(out[name][0], ref) < 2e-2, (name, rel(out[name][0], ref))
        assert rel(flat[name], flat["fp32"]) < 5e-2, (name, rel(flat[name], flat["fp32"]))
    # cuDNN vs einsum at the same (bf16) precision: no further than either is from float32.
    assert rel(out["cudnn"][0], out["einsum"][0]) < 2e-2
    g_table = lambda k: out[k][1]["rel_pos_bias"]["relative_position_bias_table"]  # noqa: E731
    assert float(jnp.abs(g_table("fp32")).max()) > 0
    assert rel(g_table("cudnn"), g_table("fp32")) < 5e-2, rel(g_table("cudnn"), g_table("fp32"))


def test_cudnn_path_pads_odd_token_counts_without_changing_the_result(monkeypatch):
    """The cuDNN path pads 17 tokens to 18 (cuDNN trains with a bias only at even lengths) with a key no query can
    attend to; checked on CPU by routing the padded call to the XLA kernel: same output and gradients as einsum."""
    x = jax.random.normal(jax.random.PRNGKey(1), (3, SIZE, SIZE, 3))
    einsum, cudnn = _tiny_vit(), _tiny_vit(attention_impl="cudnn")
    params = _params_with_bias(einsum, x)
    seen = []
    original = jax.nn.dot_product_attention

    def on_xla(q, k, v, *, bias, scale, implementation):
        seen.append((implementation, q.shape[1], bias.shape))
        return original(q, k, v, bias=bias.astype(jnp.float32), scale=scale, implementation="xla")

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_xla)
    loss = lambda p, m: jnp.mean(m.apply({"params": p}, x)["encoded"] ** 2)  # noqa: E731
    out, grads = cudnn.apply({"params": params}, x)["encoded"], jax.grad(loss)(params, cudnn)
    tokens = (SIZE // PATCH) ** 2 + 1
    assert seen[0] == ("cudnn", tokens + 1, (1, 4, tokens + 1, tokens + 1))
    ref, ref_grads = einsum.apply({"params": params}, x)["encoded"], jax.grad(loss)(params, einsum)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))


def test_cudnn_vit_pads_the_sequence_once_at_the_embedding_not_qkv_in_every_block(monkeypatch):
    """The ViT pads 17 tokens to 18 once (a [B, T, D] pad before the blocks); no block pads its q/k/v. Traced on
    CPU with the cuDNN call routed to the XLA kernel."""
    original = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, k, v, *, bias, scale, implementation: original(
        q, k, v, bias=bias.astype(jnp.float32), scale=scale, implementation="xla"))
    x = jnp.zeros((2, SIZE, SIZE, 3))
    model = _tiny_vit(attention_impl="cudnn")
    params = _random_params(model, x)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x)["encoded"])(params)
    pads = collections.Counter(len(eqn.invars[0].aval.shape) for eqn in equations(jaxpr, "pad"))
    # The token pad and the shared bias's row and column pads, once for all DEPTH blocks; no [B, T, H, Dh] q/k/v pad.
    assert pads[3] == 3 and pads[4] == 0, pads
    assert jaxpr.out_avals[0].shape == (2, (SIZE // PATCH) ** 2 + 1, 64)  # the pad token is dropped again


def test_auto_attention_picks_the_platform_kernel():
    resolve = vit.resolve_attention_impl
    assert resolve("auto", jnp.float32, 64, "cpu") == "einsum" == resolve("auto", jnp.bfloat16, 64, "cpu")
    assert resolve("auto", jnp.bfloat16, 64, "gpu") == "cudnn"
    assert resolve("auto", jnp.float32, 64, "gpu") == "xla"  # cuDNN fused attention takes bf16/fp16 only
    assert resolve("auto", jnp.bfloat16, 12, "gpu") == "xla"  # head dim not a multiple of 8
    assert resolve("auto", jnp.bfloat16, 64, "tpu") == "xla"
    assert resolve("einsum", jnp.bfloat16, 64, "gpu") == "einsum"  # an explicit choice stays
    assert vit.VisionTransformer().attention_impl == "auto"
    # Every network is built with "auto" unless told otherwise: the frozen tokenizer and teachers included.
    tok = vqkd_lib.build_vqkd({"width": 32, "depth": 1, "num_heads": 2, "decoder_depth": 1})
    assert tok.encoder.attention_impl == tok.decoder.attention_impl == "auto"
    assert teachers.clip_vit_b16().attention_impl == teachers.dino_vit_b16().attention_impl == "auto"
