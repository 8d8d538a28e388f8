"""Run 3 training steps of tiny VQ-KD and BEiT v2 pretraining on several meshes of 8 fake CPU devices.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scripts/mesh_equivalence.py OUT.npz WORKDIR
Writes losses, final params, codebooks and the parameter shardings per mesh; the test compares them.
"""
import os
import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from beitv2_jax.models import beit, teachers, vit, vqkd  # noqa: E402
from beitv2_jax.train import optim, sharding  # noqa: E402
from beitv2_jax.train import state as state_lib  # noqa: E402
from beitv2_jax.train.tasks import common, pretrain  # noqa: E402
from beitv2_jax.train.tasks import vqkd as vqkd_task  # noqa: E402

MESHES = {"8-1-1": (8, 1, 1), "2-4-1": (2, 4, 1), "2-2-2": (2, 2, 2), "1-1-1": (1, 1, 1)}
OPTIM = ml_collections.ConfigDict(dict(lr=1e-3, min_lr=1e-5, warmup_steps=1, b1=0.9, b2=0.98, eps=1e-8,
                                       weight_decay=0.05, clip_grad=3.0, no_decay=["cls_token$"]))
B, SIZE = 16, 16


def make_mesh(shape):
    n = int(np.prod(shape))
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), devices=jax.devices()[:n])


def batches(seed):
    rng = np.random.default_rng(seed)
    for _ in range(3):
        mask = np.zeros((B, 16), bool)
        for row in mask:
            row[rng.choice(16, 6, replace=False)] = True
        yield {"image": rng.normal(size=(B, SIZE, SIZE, 3)).astype(np.float32),
               "tokenizer_image": rng.uniform(size=(B, SIZE, SIZE, 3)).astype(np.float32), "mask": mask}


def tiny_vqkd():
    return vqkd.build_vqkd(dict(image_size=SIZE, patch_size=4, width=32, depth=2, num_heads=4, decoder_depth=1,
                                num_codes=32, code_dim=8, teacher_dim=16))


def run_vqkd(mesh):
    model = tiny_vqkd()
    teacher_model = vit.VisionTransformer(image_size=SIZE, patch_size=4, width=16, depth=1, num_heads=2,
                                          qkv_bias="full", use_abs_pos=True)
    teacher = teachers.Teacher(model=teacher_model)
    teacher_params = flax.linen.meta.unbox(teacher_model.init(jax.random.PRNGKey(5), jnp.zeros((1, SIZE, SIZE, 3))))
    teacher_params = teacher_params["params"]
    x = jnp.zeros((1, SIZE, SIZE, 3))
    variables = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), x))
    tx, schedule = optim.make_optimizer(OPTIM, variables["params"], 10, 5)
    extra = {"epoch_counts": jnp.zeros((32,)), "bad_steps": jnp.zeros((), jnp.int32)}
    state = state_lib.create(variables["params"], tx, model_state={"codebook": variables["codebook"]}, extra=extra)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    state, state_sh = common.shard_state(state, boxed, tx, mesh, None)
    step = common.jit_train_step(vqkd_task.make_train_step(model, teacher, tx, schedule), state_sh, mesh)
    teacher_params = jax.device_put(teacher_params, sharding.replicated(mesh))
    losses = []
    for batch in batches(1):
        state, m = step(state, sharding.to_global_batch({"image": batch["tokenizer_image"]}, mesh), teacher_params)
        losses.append(float(m["loss"]))
    return losses, state


def run_pretrain(mesh, tokenizer, tok_vars):
    cfg = {"backbone": dict(image_size=SIZE, patch_size=4, width=32, depth=3, num_heads=4), "vocab_size": 32,
           "num_masked_patches": 6, "early_layers": 2, "head_layers": 2}
    model = pretrain.build_model(cfg)
    x, mask = jnp.zeros((1, SIZE, SIZE, 3)), jnp.zeros((1, 16), bool).at[:, :6].set(True)
    params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), x, mask)["params"])
    tx, schedule = optim.make_optimizer(OPTIM, params, 10, 5)
    state = state_lib.create(params, tx, extra={"bad_steps": jnp.zeros((), jnp.int32)})
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, mask)["params"]
    state, state_sh = common.shard_state(state, boxed, tx, mesh, None)
    step = common.jit_train_step(pretrain.make_train_step(model, tokenizer, tx, schedule), state_sh, mesh)
    tok_vars = jax.device_put(tok_vars, sharding.replicated(mesh))
    losses = []
    for batch in batches(2):
        state, m = step(state, sharding.to_global_batch(batch, mesh), tok_vars)
        losses.append(float(m["loss"]))
    return losses, state, boxed


def flat(tree, prefix):
    return {f"{prefix}/" + "/".join(k): np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(jax.device_get(tree)).items()}


def restore_elsewhere(saved_state, boxed, workdir, result):
    """A checkpoint written on mesh (8,1,1) restores onto (2,2,2) and onto one device with identical values."""
    from beitv2_jax.train import checkpoint as ckpt_lib

    manager = ckpt_lib.make_manager(workdir)
    ckpt_lib.save(manager, 3, saved_state, {"note": "mesh 8-1-1"})
    manager.wait_until_finished()
    for name in ("2-2-2", "1-1-1"):
        mesh = make_mesh(MESHES[name])
        rep = sharding.replicated(mesh)
        param_sh = sharding.param_shardings(boxed, mesh)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), saved_state.params,
                              param_sh)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), saved_state)
        abstract = abstract.replace(params=target)
        restored, data_state, step = ckpt_lib.restore_latest(ckpt_lib.make_manager(workdir), abstract)
        assert step == 3 and data_state == {"note": "mesh 8-1-1"}
        leaf = restored.params["backbone"]["blocks_0"]["attn"]["qkv"]
        result[f"restored-{name}/qkv_shard_shape"] = np.array(leaf.addressable_shards[0].data.shape)
        result[f"restored-{name}/max_diff"] = np.array(max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(jax.tree.leaves(saved_state), jax.tree.leaves(restored))))


def main(out, workdir):
    tokenizer = tiny_vqkd()
    tok_vars = flax.linen.meta.unbox(tokenizer.init(jax.random.PRNGKey(3), jnp.zeros((1, SIZE, SIZE, 3))))
    # a k-means-initialised codebook so that labels are meaningful
    _, upd = tokenizer.apply(tok_vars, jax.random.uniform(jax.random.PRNGKey(4), (8, SIZE, SIZE, 3)), train=True,
                             mutable=["codebook"])
    tok_vars = {**tok_vars, **upd}
    result = {}
    for name, shape in MESHES.items():
        mesh = make_mesh(shape)
        v_losses, v_state = run_vqkd(mesh)
        p_losses, p_state, boxed = run_pretrain(mesh, tokenizer, tok_vars)
        result[f"{name}/vqkd_losses"] = np.array(v_losses)
        result[f"{name}/pretrain_losses"] = np.array(p_losses)
        result.update(flat(v_state.params, f"{name}/vqkd_params"))
        result.update(flat(v_state.model_state["codebook"], f"{name}/codebook"))
        result.update(flat(p_state.params, f"{name}/pretrain_params"))
        qkv = p_state.params["backbone"]["blocks_0"]["attn"]["qkv"]
        result[f"{name}/qkv_shard_shape"] = np.array(qkv.addressable_shards[0].data.shape)
        fc1 = p_state.params["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]
        result[f"{name}/fc1_shard_shape"] = np.array(fc1.addressable_shards[0].data.shape)
        mu = p_state.opt_state[1].mu["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]
        result[f"{name}/fc1_mu_shard_shape"] = np.array(mu.addressable_shards[0].data.shape)
        if name == "8-1-1":
            saved = p_state
    restore_elsewhere(saved, boxed, workdir, result)
    np.savez(out, **result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
