"""BEiT v1: the DALL-E dVAE encoder against the ``dall-e`` package, its converter, and a tiny v1 pretraining run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beitv2_jax.convert import engine, family
from beitv2_jax.models import dvae
from beitv2_jax.train.tasks import pretrain

from conftest import load_config_file


@pytest.mark.parametrize("kwargs,size", [(dict(n_hid=64, n_blk_per_group=1, vocab_size=512), 32), ({}, 112)],
                         ids=["small", "default-8192"])
def test_encoder_matches_dall_e_package(kwargs, size):
    import dall_e  # the README set-up line installs it (pip install --no-deps dall-e==0.1)
    import torch

    torch.manual_seed(0)
    encoder = dall_e.Encoder(**kwargs).eval()  # random weights (the package's own init)
    state_dict = {k: v.numpy() for k, v in encoder.state_dict().items()}
    variables, config = family.import_dalle_encoder(state_dict, image_size=size)
    if not kwargs:
        assert config == dict(group_count=4, n_hid=256, n_blk_per_group=2, vocab_size=8192, input_channels=3,
                              image_size=112)
        assert sum(x.size for x in jax.tree.leaves(variables)) == 53_786_240
    images = np.random.default_rng(0).uniform(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        ref = encoder(dall_e.map_pixels(torch.from_numpy(images).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).numpy()
    ref = ref.reshape(2, -1, ref.shape[-1])
    model = dvae.build_dvae(config)
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, method="logits"))(variables, jnp.asarray(images)))
    assert logits.shape == (2, (size // 8) ** 2, config["vocab_size"])
    assert np.abs(logits - ref).max() <= 1e-5
    ids = np.asarray(model.apply(variables, jnp.asarray(images), method="get_codebook_indices"))
    np.testing.assert_array_equal(ids, ref.argmax(-1))  # 100 % equal labels
    back = family.export_dalle_encoder(variables, config)
    assert list(back) == list(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_converter_reports_every_problem_and_the_layout_is_registered():
    model = dvae.DVAEEncoder(n_hid=16, n_blk_per_group=1, vocab_size=32)
    variables = dvae.init_variables(model)
    state_dict = family.export_dalle_encoder(variables, dvae.model_config(model))
    assert "blocks.group_2.block_1.id_path.w" in state_dict and "blocks.group_1.block_1.id_path.w" not in state_dict
    assert state_dict["blocks.input.w"].shape == (16, 3, 7, 7)  # OIHW
    broken = dict(state_dict, extra=np.zeros(1))
    broken.pop("blocks.output.conv.b")
    broken["blocks.input.b"] = np.zeros(5, np.float32)
    with pytest.raises(engine.ConversionError) as e:
        family.import_dalle_encoder(broken)
    text = str(e.value)
    assert "blocks.output.conv.b" in text and "extra" in text and "blocks.input.b" in text
    assert engine.get_layout("dalle_encoder").name == "dalle_encoder"
    assert engine.get_layout("official_ibot").name == "official_ibot"


def test_save_and_load(tmp_path):
    model = dvae.DVAEEncoder(n_hid=16, n_blk_per_group=1, vocab_size=32, image_size=32)
    variables = dvae.init_variables(model, seed=3)
    dvae.save_dvae(str(tmp_path / "d"), variables, dvae.model_config(model))
    loaded, loaded_vars = dvae.load_dvae(str(tmp_path / "d"))
    assert loaded == model
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(loaded_vars)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tiny_beit_v1_pretraining_loss_falls(demo_data_dir, tmp_path):
    model = dvae.DVAEEncoder(n_hid=16, n_blk_per_group=1, vocab_size=64, image_size=32)
    directory = dvae.save_dvae(str(tmp_path / "dvae"), dvae.init_variables(model), dvae.model_config(model))
    c = load_config_file("beit_v1_tiny")
    with c.unlocked():
        c.data.data_dir = demo_data_dir
        c.tokenizer.checkpoint = directory
        c.optim.lr = 3e-3
    workdir = str(tmp_path / "v1")
    pretrain.run(c, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.5, losses  # ln(64) ≈ 4.16 at the start
    assert "loss_2" not in rows[-1]  # no patch-aggregation head in BEiT v1
    from beitv2_jax.convert import store

    _, kind, config = store.load_variables(os.path.join(workdir, "model"))
    assert kind == "beit_pretrain" and config["head_layers"] == 0
