"""Optimiser rules, losses, patch aggregation, the CLI's error messages, and tiny end-to-end runs."""
import json
import math
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beitv2_jax import recipes
from beitv2_jax.models import beit
from beitv2_jax.train import optim
from beitv2_jax.train.tasks import pretrain

from conftest import REPO_ROOT, load_config_file


def official_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    """unilm beit2/utils.py cosine_scheduler, verbatim in numpy."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup_schedule = np.linspace(start_warmup_value, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(math.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


@pytest.mark.parametrize("epochs,niter,warmup", [(300, 625, 10), (5, 7, 1), (3, 4, 0)])
def test_schedule_matches_official(epochs, niter, warmup):
    ref = official_cosine_scheduler(1.5e-3, 1e-5, epochs, niter, warmup)
    sched = optim.cosine_schedule(1.5e-3, 1e-5, epochs * niter, warmup * niter)
    steps = np.unique(np.r_[0, 1, warmup * niter - 1, warmup * niter, warmup * niter + 1,
                            np.linspace(0, epochs * niter - 1, 50).astype(int), epochs * niter - 1])
    steps = steps[(steps >= 0) & (steps < len(ref))]
    ours = np.array([float(sched(s)) for s in steps])
    np.testing.assert_allclose(ours, ref[steps], rtol=2e-5, atol=1e-10)


def test_pretrain_no_decay_set_is_official():
    config = load_config_file("beitv2_base_pt1k_300e")
    model = pretrain.build_model(pretrain.model_config(config))
    mask = jnp.zeros((1, 196), bool).at[:, :75].set(True)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), mask)["params"]
    params = flax.linen.meta.unbox(shapes)
    decay = flax.traverse_util.flatten_dict(optim.weight_decay_mask(params, config.optim.no_decay))
    decay = {"/".join(k): v for k, v in decay.items()}
    # Official get_parameter_groups: no decay for ndim<=1, '.bias', and cls_token.
    assert not decay["backbone/cls_token"]
    assert decay["backbone/mask_token"] and decay["backbone/rel_pos_bias/relative_position_bias_table"]
    for name in ("backbone/blocks_0/attn/q_bias", "backbone/blocks_0/attn/v_bias", "backbone/blocks_0/gamma_1",
                 "backbone/blocks_3/norm1/scale", "backbone/blocks_3/attn/proj_bias", "norm/scale", "lm_head/bias",
                 "backbone/patch_embed/bias", "cls_pt_layers_1/mlp/fc2/bias"):
        assert not decay[name], name
    for name in ("backbone/blocks_0/attn/qkv", "backbone/blocks_0/attn/proj", "backbone/patch_embed/kernel",
                 "lm_head/kernel", "cls_pt_layers_0/mlp/fc1/kernel"):
        assert decay[name], name
    # Counting in the official layout: 220 tensors; decayed = 2-D/4-D weights + mask_token + table = 65.
    assert sum(decay.values()) == 1 + 1 + 1 + 1 + 14 * 4  # patch_embed, mask_token, table, lm_head, 4 per block
    assert len(decay) == 220 - 1  # one tensor per official key, minus the relative_position_index buffer


def test_mim_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(2, 3))
    loss, acc = pretrain.mim_loss(jnp.asarray(logits), jnp.asarray(labels))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, labels[..., None], -1).mean()
    np.testing.assert_allclose(float(loss), ref, rtol=1e-6)
    assert float(acc) == pytest.approx((logits.argmax(-1) == labels).mean())


def _tiny_beit(early_layers=2):
    backbone = beit.beit_backbone(image_size=32, patch_size=8, width=32, depth=4, num_heads=4)
    return beit.BEiTPretrainModel(backbone=backbone, vocab_size=16, num_masked_patches=6, early_layers=early_layers)


def test_patch_aggregation_takes_block_early_layers():
    model = _tiny_beit(early_layers=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    mask = jnp.zeros((2, 16), bool).at[:, 2:8].set(True)
    params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(1), x, mask)["params"])
    base = model.apply({"params": params}, x, mask)

    def perturbed(block):
        p = jax.tree.map(lambda a: a, params)
        p["backbone"][block]["mlp"]["fc2"]["bias"] = p["backbone"][block]["mlp"]["fc2"]["bias"] + 1.0
        return model.apply({"params": p}, x, mask)

    after = perturbed("blocks_2")  # block number early_layers + 1
    np.testing.assert_array_equal(after["aggregation_input"][:, 1:], base["aggregation_input"][:, 1:])
    assert float(jnp.abs(after["aggregation_input"][:, 0] - base["aggregation_input"][:, 0]).max()) > 1e-3
    before = perturbed("blocks_1")  # block number early_layers: its output is the early state
    assert float(jnp.abs(before["aggregation_input"][:, 1:] - base["aggregation_input"][:, 1:]).max()) > 1e-3
    # logits_1 comes from the final layer at the masked positions, in row-major order
    np.testing.assert_array_equal(base["positions"], np.tile(np.arange(2, 8), (2, 1)))


def test_masked_positions_static_and_ordered():
    mask = np.zeros((3, 10), bool)
    for i, idx in enumerate([[0, 3, 9], [1, 2, 3], [7, 8, 9]]):
        mask[i, idx] = True
    np.testing.assert_array_equal(beit.masked_positions(jnp.asarray(mask), 3), [[0, 3, 9], [1, 2, 3], [7, 8, 9]])


def _run_main(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "beitv2_jax.main", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_unknown_key_and_missing_file(tmp_path):
    r = _run_main("--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.nonexistent=1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'config.nonexistent'")
    assert "Traceback" not in r.stderr
    r = _run_main("--config", "configs/no_such_file.py", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "no_such_file.py" in r.stderr and "Traceback" not in r.stderr
    r = _run_main("--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.batch_size=abc")
    assert r.returncode == 2 and "batch_size" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("override,key", [
    ("--config.data.num_masked_patches=65", "config.data.num_masked_patches"),
    ("--config.pretrain.model.early_layers=4", "config.model.early_layers"),
    ("--config.mesh.data=3", "config.mesh"),
])
def test_cli_validation_names_the_key(tmp_path, override, key):
    r = _run_main("--config", "configs/demo.py", "--workdir", str(tmp_path), override)
    assert r.returncode == 2, r.stderr[-2000:]
    assert key in r.stderr.strip().splitlines()[-1]


def tiny_stage(name, demo_data_dir, steps, **model):
    demo = load_config_file("demo")
    c = demo[name]
    with c.unlocked():
        c.data = demo.data
        c.data.data_dir = demo_data_dir
        c.data.input_size = c.data.second_input_size = 16
        c.data.num_masked_patches = 6
        c.data.min_mask_patches_per_block = 2
        c.batch_size = 32
        c.steps_per_epoch = steps
        c.num_epochs = 2
        c.log_every_steps = 5
        c.checkpoint_every_steps = steps
        c.model.update(model)
    return c


@pytest.fixture(scope="module")
def tiny_tokenizer(demo_data_dir, tmp_path_factory):
    from beitv2_jax.train.tasks import demo, vqkd

    root = tmp_path_factory.mktemp("stages")
    cfg = tiny_stage("vqkd", demo_data_dir, steps=15, width=32, depth=1, num_heads=2, decoder_depth=1,
                     num_codes=64)
    demo.save_random_vit(str(root / "teacher"), image_size=16, patch_size=4, width=64, depth=2, num_heads=4, seed=1)
    with cfg.unlocked():
        cfg.teacher.checkpoint = str(root / "teacher")
        cfg.eval_every_epochs = 2
    vqkd.run(cfg, str(root / "vqkd"))
    return root


def test_vqkd_trains_and_exports(tiny_tokenizer):
    rows = [json.loads(l) for l in open(tiny_tokenizer / "vqkd" / "metrics.jsonl")]
    rec = [r["rec_loss"] for r in rows if "rec_loss" in r]
    assert rec[-1] < 0.7 * rec[0], rec
    evals = [r for r in rows if "eval/codebook_usage" in r]
    assert evals and evals[-1]["eval/codebook_usage"] > 0.3
    assert (tiny_tokenizer / "vqkd" / "tokenizer" / "model.json").exists()
    assert (tiny_tokenizer / "vqkd" / "codebook_usage.png").exists()


def test_pretrain_loss_falls_and_resume_continues(tiny_tokenizer, demo_data_dir, tmp_path):
    from beitv2_jax.train.tasks import pretrain as task

    cfg = tiny_stage("pretrain", demo_data_dir, steps=20, width=32, depth=3, num_heads=2, early_layers=2,
                     vocab_size=64)
    with cfg.unlocked():
        cfg.tokenizer.checkpoint = str(tiny_tokenizer / "vqkd" / "tokenizer")
        cfg.optim.warmup_epochs = 0
    workdir = str(tmp_path / "pt")
    full = task.run(cfg, workdir)
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.5, losses  # 2·ln(64) ≈ 8.3 at the start
    assert {"loss_1", "loss_2", "mlm_acc_1", "mlm_acc_2"} <= set(rows[-1])

    # Resume: a run stopped after epoch 1 (its checkpoint at step 20) and continued gives the same params.
    import shutil
    shutil.rmtree(os.path.join(workdir, "checkpoints", "40"))
    shutil.rmtree(os.path.join(workdir, "model"))
    resumed = task.run(cfg, workdir)
    assert int(resumed.step) == 40
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_demo_chains_ibot_vqkd_pretrain_and_evaluation(demo_data_dir, tmp_path, capsys):
    """The README run line's stages at toy size: the iBOT teacher feeds VQ-KD, whose tokenizer feeds BEiT v2; the
    summary has every row; a second run skips the finished stages."""
    from beitv2_jax.train.tasks import demo

    c = load_config_file("demo")
    c.data.update(data_dir=demo_data_dir, input_size=16, second_input_size=16, num_masked_patches=6,
                  min_mask_patches_per_block=2)
    for name, model in (("ibot", dict(width=32, depth=1, num_heads=2)),
                        ("vqkd", dict(width=32, depth=1, num_heads=2, decoder_depth=1, num_codes=32)),
                        ("pretrain", dict(width=32, depth=2, num_heads=2, early_layers=1, vocab_size=32))):
        stage = c[name]
        stage.batch_size, stage.steps_per_epoch, stage.num_epochs, stage.log_every_steps = 32, 3, 1, 3
        stage.model.update(model)
    c.ibot.crops.update(num_local=1, local_size=8)
    c.ibot.head.update(out_dim=32, patch_out_dim=32, hidden_dim=32, bottleneck_dim=16)
    c.vqkd.eval_every_epochs = 1
    with c.unlocked():
        c.eval.linear_probe = recipes.demo_linear_probe()
        c.eval.linear_probe.epochs = 2
        del c.segment  # stage 5 needs a 4-block encoder: tests/test_segment.py runs it on one

    results = demo.run(c, str(tmp_path))
    assert (tmp_path / "ibot" / "teacher" / "model.json").exists()
    assert json.load(open(tmp_path / "vqkd" / "config.json"))["teacher"]["checkpoint"] == str(
        tmp_path / "ibot" / "teacher")
    expected = {"iBOT teacher (cls)", "iBOT ViT, random init (cls)", "BEiT v2 encoder (cls)", "BEiT v2 encoder (mean)",
                "same encoder, random init (cls)", "same encoder, random init (mean)", demo.RAW_PIXELS}
    assert set(results["knn"]) == expected
    for row in results["knn"].values():
        assert 0 <= row["knn_top1"] <= 100 and 0 <= row["linear_top1"] <= 100
    summary = capsys.readouterr().out
    assert "iBOT teacher, cls" in summary and "iBOT: loss" in summary
    from beitv2_jax.train import metrics  # the evaluation and the PNGs reach TensorBoard; every tag in a namespace

    tags = {tag for _, tag, _, _ in metrics.read_events(str(tmp_path / "tensorboard"))}
    assert {"eval/beit_v2_encoder_cls/linear_top1", "images/token_maps", "images/codebook_usage",
            "text/summary/text_summary", "text/evaluation/text_summary", "text/config/text_summary"} <= tags
    for stage in ("ibot", "vqkd", "pretrain"):
        tags |= {tag for _, tag, _, _ in metrics.read_events(str(tmp_path / stage / "tensorboard"))}
    assert {"train/loss", "data/wait_s", "eval/perplexity", "images/codebook_usage"} <= tags
    assert all(tag.split("/")[0] in ("train", "eval", "data", "images", "text", "_hparams_") for tag in tags)
    assert json.load(open(tmp_path / "summary.json"))["knn"][demo.RAW_PIXELS] == results["knn"][demo.RAW_PIXELS]
    again = demo.run(c, str(tmp_path))  # finished stages are skipped
    assert again["stage_seconds"]["ibot"] < 1.0 and again["stage_seconds"]["pretrain"] < 1.0


def test_pretrain_step_on_uint8_matches_the_host_float_batch():
    """The step fed uint8 (one view, normalised on device) = the step fed the host float32 views of before."""
    import ml_collections

    from beitv2_jax.data import transforms
    from beitv2_jax.models import vqkd
    from beitv2_jax.train import state as state_lib

    size = 16
    tokenizer = vqkd.build_vqkd(dict(image_size=size, patch_size=4, width=32, depth=1, num_heads=2, decoder_depth=1,
                                     num_codes=32, code_dim=8, teacher_dim=16))
    x, mask = jnp.zeros((1, size, size, 3)), jnp.zeros((1, 16), bool).at[:, :6].set(True)
    tok_vars = flax.linen.meta.unbox(jax.jit(tokenizer.init)(jax.random.PRNGKey(1), x))
    model = pretrain.build_model({"backbone": dict(image_size=size, patch_size=4, width=32, depth=1, num_heads=2),
                                  "vocab_size": 32, "num_masked_patches": 6, "early_layers": 0, "head_layers": 0})
    params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), x, mask)["params"])
    optim_cfg = ml_collections.ConfigDict(dict(lr=1e-3, min_lr=1e-5, warmup_steps=1, b1=0.9, b2=0.98, eps=1e-8,
                                               weight_decay=0.05, clip_grad=3.0, no_decay=["cls_token$"]))
    tx, schedule = optim.make_optimizer(optim_cfg, params, 10, 5)
    state = state_lib.create(params, tx, extra={"bad_steps": jnp.zeros((), jnp.int32)})
    step = pretrain.make_train_step(model, tokenizer, tx, schedule)
    both = jax.jit(lambda st, tv, wire, host: (step(st, wire, tv)[1], step(st, host, tv)[1]))  # one compile
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16), bool)
    for row in masks:
        row[rng.choice(16, 6, replace=False)] = True
    wire = {"image": rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8), "mask": masks}
    host = transforms.host_pretrain_views(wire)
    assert host["image"].dtype == host["tokenizer_image"].dtype == np.float32
    on_device, on_host = both(state, tok_vars, wire, host)
    for key in ("loss", "mlm_acc_1", "grad_norm"):
        np.testing.assert_allclose(float(on_device[key]), float(on_host[key]), rtol=1e-6, err_msg=key)
