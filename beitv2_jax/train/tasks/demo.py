"""Task ``demo``: iBOT teacher → VQ-KD tokenizer → BEiT v2 pretraining → evaluation, each in a sub-folder.

1. ``ibot/``: a short iBOT run; its EMA teacher backbone (``ibot/teacher``) is the VQ-KD teacher ("any ViT
   checkpoint of ours");
2. ``vqkd/``: the tokenizer distilling it (``vqkd/tokenizer``);
3. ``pretrain/``: BEiT v2 pretraining against that tokenizer (``pretrain/model``);
4. k-NN and linear probe of the iBOT teacher, the BEiT v2 encoder and both architectures at random initialisation;
5. ``segment/``: a short semantic-segmentation run (UperNet) on the built-in masks from the BEiT v2 encoder
   (``segment/pretrained``) and from its random-init twin (``segment/random_init``), mIoU of both.

A finished stage (its exported model exists) is skipped, an interrupted one resumes from its checkpoint, so
re-running the command continues the demo. Ends with a summary table (also ``summary.json``), PNGs, and the
evaluation in ``<workdir>/tensorboard`` (:func:`write_tensorboard`).
"""
from __future__ import annotations

import re
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from beitv2_jax import storage
from beitv2_jax.data import on_device, sources
from beitv2_jax.models import teachers as teachers_lib
from beitv2_jax.models import vit
from beitv2_jax.train import metrics as metrics_lib
from beitv2_jax.train import sharding
from beitv2_jax.train.tasks import common, ibot, knn, pretrain, vqkd


def save_random_vit(directory: str, image_size: int, patch_size: int, width: int, depth: int, num_heads: int,
                    seed: int = 0) -> None:
    """A random-init ViT (iBOT's architecture) saved as one of our checkpoints (kind ``vit``): a cheap stand-in
    teacher for tests of the VQ-KD stage."""
    from beitv2_jax.convert import store

    model = vit.VisionTransformer(image_size=image_size, patch_size=patch_size, width=width, depth=depth,
                                  num_heads=num_heads, qkv_bias="full", use_abs_pos=True, use_final_norm=True,
                                  pooling="cls")
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, image_size, image_size, 3)))["params"]
    fields = {f: getattr(model, f) for f in ("image_size", "patch_size", "width", "depth", "num_heads", "qkv_bias",
                                             "use_abs_pos", "use_final_norm", "pooling")}
    store.save_variables(directory, {"params": jax.device_get(flax.linen.meta.unbox(params))}, "vit", fields)


def stage_config(stage: ml_collections.ConfigDict, config: ml_collections.ConfigDict, **overrides):
    """``recipes.demo_stage`` (the demo's data / batch / seed / mesh with the stage's own keys on top), then
    ``overrides`` (``{"section.key": value}``)."""
    from beitv2_jax import recipes

    c = recipes.demo_stage(stage, config)
    with c.unlocked():
        for path, value in overrides.items():
            section, key = path.split(".")
            c[section][key] = value
    return c


def beit_features(model_cfg: dict, params, pooling: str):
    """A feature function ``images → [B, D]`` for a BEiT pretraining model's backbone + final norm (``pooling``
    ``cls``, ``mean`` of the patch tokens, or ``cls+mean``: both concatenated, ``[B, 2·D]``)."""
    model = pretrain.build_model(model_cfg)
    bb = model.backbone

    def features(images):
        out = bb.apply({"params": params["backbone"]}, images)
        x = teachers_lib._layer_norm(out["pre_norm"], params["norm"]["scale"], params["norm"]["bias"],
                                     bb.layer_norm_eps)
        pooled = {"cls": x[:, 0], "mean": x[:, 1:].mean(1)}
        return jnp.concatenate([pooled[p] for p in pooling.split("+")], axis=-1)

    return features, bb


RAW_PIXELS = "raw pixels (input view)"


def raw_pixel_features(images):
    """The baseline feature ``[B, H·W·3]``: the model's input view (the eval transform's normalised pixels),
    flattened."""
    return images.reshape(images.shape[0], -1)


def evaluate(config, workdir: str, teacher_dir: str, tokenizer_dir: str, model_dir: str, mesh) -> dict:
    from beitv2_jax import recipes
    from beitv2_jax.convert import store
    from beitv2_jax.train.tasks import finetune, linear_probe

    data = config.data
    batch = config.batch_size
    results = {}
    probe = config.eval.get("linear_probe") or recipes.demo_linear_probe()
    probe_settings = linear_probe.ProbeSettings(probe.epochs, probe.batch_size, probe.optim.to_dict(), config.seed,
                                                probe.get("standardize", False))

    # Every feature below reads the same images: one pass of the input pipeline per split, held in memory.
    images = {split: knn.eval_batches(data, split, batch) for split in (data.train_split, data.eval_split)}

    def features_of(name, feature_fn):
        """(train, test) features of ``feature_fn``: ``([n, D], labels)`` each."""
        return tuple(knn.extract_features(feature_fn, data, split, batch, mesh, desc=f"{name}: {part} features",
                                          batches=images[split])
                     for split, part in ((data.train_split, "train"), (data.eval_split, "test")))

    def knn_of(name, feature_fn=None, features=None):
        """k-NN and a linear probe on the same cached features (train split → test split)."""
        tr, te = features if features is not None else features_of(name, feature_fn)
        num_classes = int(max(tr[1].max(), te[1].max())) + 1
        results[name] = knn.knn_accuracy(*tr, *te, num_classes, config.eval.knn_k, config.eval.knn_temperature)
        probe_result = linear_probe.train_on_features(*tr, *te, num_classes, probe_settings,
                                                      desc=f"{name}: linear probe")
        results[name].update(linear_top1=probe_result["top1"], linear_top5=probe_result["top5"])

    def knn_of_pools(name, model_cfg, params):
        """``knn_of`` for the CLS and the mean-of-patches feature of a BEiT backbone, from one forward pass."""
        both, _ = beit_features(model_cfg, params, "cls+mean")
        tr, te = features_of(f"{name} (cls, mean)", both)
        width = tr[0].shape[1] // 2
        for i, pooling in enumerate(("cls", "mean")):
            part = slice(i * width, (i + 1) * width)
            knn_of(f"{name} ({pooling})", features=((tr[0][:, part], tr[1]), (te[0][:, part], te[1])))

    knn_of(RAW_PIXELS, raw_pixel_features)
    teacher = finetune.load_pretrained(teacher_dir)
    teacher_encoder = linear_probe.encoder_model(teacher)
    teacher_features = linear_probe.feature_fn(teacher_encoder, "cls")
    knn_of("iBOT teacher (cls)", lambda x: teacher_features(teacher.params, x))
    ibot_init = ibot.build_model(stage_config(config.ibot, config)).init(jax.random.PRNGKey(config.seed + 5))
    random_teacher = {k: v for k, v in ibot_init["backbone"].items() if k != "mask_token"}  # official iBOT init
    knn_of("iBOT ViT, random init (cls)", lambda x: teacher_features(random_teacher, x))

    variables, _, model_cfg = store.load_variables(model_dir)
    knn_of_pools("BEiT v2 encoder", model_cfg, variables["params"])
    model = pretrain.build_model(model_cfg)
    size, n = data.input_size, model.backbone.num_patches
    mask = jnp.zeros((1, n), bool).at[:, :data.num_masked_patches].set(True)
    random_params = flax.linen.meta.unbox(
        model.init(jax.random.PRNGKey(config.seed + 7), jnp.zeros((1, size, size, 3)), mask)["params"])
    knn_of_pools("same encoder, random init", model_cfg, random_params)

    # Token maps of a few test images and the code usage over the test split.
    tokenizer, tok_vars = vqkd.load_tokenizer(tokenizer_dir)
    index_fn = jax.jit(lambda b: {"ids": tokenizer.apply(tok_vars, on_device.unit_float(b["image"]),
                                                         method="get_codebook_indices"),
                                  "image": on_device.unit_float(b["image"])})
    outs = common.eval_pass(index_fn, images[data.eval_split], mesh, "tokenizer: test-split codes")
    ids = np.concatenate([o["ids"] for o in outs])
    counts = np.bincount(ids.reshape(-1), minlength=tokenizer.num_codes)
    common.usage_histogram_png(counts, storage.join(workdir, "codebook_usage.png"), "test-split code usage")
    k = config.eval.num_token_maps
    h, w = tokenizer.encoder.window
    common.token_map_png(outs[0]["image"][:k], ids[:k].reshape(-1, h, w), storage.join(workdir, "token_maps.png"),
                         tokenizer.num_codes)
    results["tokenizer"] = {"test_codebook_usage": float((counts > 0).mean() * 100),
                            "num_codes": int(tokenizer.num_codes)}
    return results


SEGMENT_RUNS = (("pretrained", False), ("random_init", True))


def segment_stage(config: ml_collections.ConfigDict, workdir: str, model_dir: str) -> dict:
    """The ``segment`` task (``config.segment``) from the BEiT v2 encoder and from the same architecture at random
    initialisation; a finished run (its model exists) is not repeated. Returns ``{run: results.json 'last'}``."""
    from beitv2_jax.train.tasks import segment

    out = {}
    for name, random_init in SEGMENT_RUNS:
        c = config.segment.copy_and_resolve_references()
        with c.unlocked():
            c.seed = config.seed
            c.data.data_dir = config.data.data_dir
            c.mesh = config.mesh.copy_and_resolve_references()
            c.allow_config_change = config.allow_config_change
            c.pretrained.checkpoint = model_dir
            c.pretrained.random_init = random_init
        run_dir = storage.join(workdir, "segment", name)
        if not storage.exists(storage.join(run_dir, "model")):
            segment.run(c, run_dir)
        out[name] = storage.read_json(storage.join(run_dir, "results.json"))["last"]
    return out


def final_metrics(workdir: str) -> dict:
    path = storage.join(workdir, "metrics.jsonl")
    if not storage.exists(path):
        return {}
    last = {}
    for row in metrics_lib.read_jsonl(path):
        last.update(row)
    return last


def print_summary(results: dict, stage_times: dict, workdir: str) -> str:
    lines = ["", "=" * 72, "beitv2_jax demo summary", "=" * 72]
    for stage, seconds in stage_times.items():
        lines.append(f"  stage {stage:<10} {seconds:8.1f} s")
    nan = float("nan")
    b = results.get("ibot", {})
    if b:
        lines.append(f"  iBOT: loss {b.get('first_loss', nan):.3f} -> {b.get('loss', nan):.3f} (cls {b.get('cls', nan):.3f}, "
                     f"patch {b.get('patch', nan):.3f})")
    v = results.get("vqkd", {})
    if v:
        usage = v.get("eval/codebook_usage")  # absent with vqkd.eval_every_epochs=0
        lines.append(f"  VQ-KD: rec_loss {v.get('first_rec_loss', nan):.4f} -> {v.get('rec_loss', nan):.4f}"
                     + (f", eval code usage {100 * usage:.1f}%" if usage is not None else ""))
    p = results.get("pretrain", {})
    if p:
        lines.append(f"  BEiT v2: loss {p.get('first_loss', float('nan')):.3f} -> {p.get('loss', float('nan')):.3f}, "
                     f"mlm_acc_1 {p.get('mlm_acc_1', float('nan')):.3f}, mlm_acc_2 {p.get('mlm_acc_2', float('nan')):.3f}")
    evals = results.get("knn", {})
    lines.append(f"  {'test split: k-NN (k=20, T=0.07), linear probe':<48} {'k-NN@1':>7} {'k-NN@5':>7} "
                 f"{'linear@1':>9}")
    for name, r in evals.items():
        lines.append(f"  {name:<48} {r['knn_top1']:7.2f} {r['knn_top5']:7.2f} "
                     f"{r.get('linear_top1', float('nan')):9.2f}")
    pairs = [("iBOT teacher, cls", evals.get("iBOT teacher (cls)"), evals.get("iBOT ViT, random init (cls)"))]
    pairs += [(f"BEiT v2 encoder, {pool}" + (" (paper: patch aggregation)" if pool == "cls" else ""),
               evals.get(f"BEiT v2 encoder ({pool})"), evals.get(f"same encoder, random init ({pool})"))
              for pool in ("cls", "mean")]
    pairs = [(label, pre, rnd) for label, pre, rnd in pairs if pre and rnd]
    if pairs:  # 7-wide columns as in the table above; per metric the trained encoder, then its random-init twin
        lines.append(f"  {'trained vs random init (same architecture)':<48} {'linear@1':^15}  {'k-NN@1':^15}".rstrip())
        lines.append(f"  {'':<48} {'trained':>7} {'random':>7}  {'trained':>7} {'random':>7}")
        for label, pre, rnd in pairs:
            lines.append(f"  {label:<48} {pre.get('linear_top1', nan):7.2f} {rnd.get('linear_top1', nan):7.2f}  "
                         f"{pre['knn_top1']:7.2f} {rnd['knn_top1']:7.2f}")
    raw = evals.get(RAW_PIXELS)
    if raw:  # no random-init twin: its numbers under the trained columns
        lines.append(f"  {'baseline: raw pixels of the input view':<48} {raw.get('linear_top1', nan):7.2f} {'':>7}  "
                     f"{raw['knn_top1']:7.2f}")
    sg = results.get("segment", {})
    if sg.get("pretrained") and sg.get("random_init"):
        header = f"segmentation ({sg['pretrained']['num_images']} test images, 11 classes)"
        lines.append(f"  {header:<48} {'mIoU':>7} {'mAcc':>7} {'aAcc':>7}")
        for label, run in (("from the BEiT v2 encoder", "pretrained"),
                           ("same architecture, random init", "random_init")):
            lines.append(f"  {label:<48} " + " ".join(f"{sg[run][k]:7.2f}" for k in ("mIoU", "mAcc", "aAcc")))
    t = results.get("tokenizer", {})
    if t:
        lines.append(f"  tokenizer test-split code usage: {t['test_codebook_usage']:.1f}% of {t['num_codes']} codes")
    lines.append(f"  PNGs: {storage.join(workdir, 'token_maps.png')}, {storage.join(workdir, 'codebook_usage.png')}")
    lines.append("=" * 72)
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def tag_name(name: str) -> str:
    """A results name as one TensorBoard tag component: 'BEiT v2 encoder (cls)' → 'beit_v2_encoder_cls'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def evaluation_scalars(results: dict) -> dict:
    """``eval/<encoder (feature)>/<metric>`` for every k-NN / linear-probe row, ``eval/segment_<run>/<metric>``
    and ``eval/tokenizer/test_codebook_usage`` (%)."""
    scalars = {f"eval/{tag_name(name)}/{k}": float(row[k]) for name, row in results.get("knn", {}).items()
               for k in ("knn_top1", "knn_top5", "linear_top1", "linear_top5") if k in row}
    scalars.update({f"eval/segment_{run}/{k}": float(row[k]) for run, row in results.get("segment", {}).items()
                    for k in ("mIoU", "mAcc", "aAcc") if k in row})
    if "test_codebook_usage" in results.get("tokenizer", {}):
        scalars["eval/tokenizer/test_codebook_usage"] = float(results["tokenizer"]["test_codebook_usage"])
    return scalars


def evaluation_markdown(results: dict) -> str:
    """The evaluation as Markdown tables (TensorBoard's text tab): k-NN / linear probe per encoder and feature,
    then segmentation."""
    nan = float("nan")
    lines = ["| encoder (feature), test split | k-NN@1 | k-NN@5 | linear@1 | linear@5 |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['knn_top1']:.2f} | {r['knn_top5']:.2f} | {r.get('linear_top1', nan):.2f} | "
              f"{r.get('linear_top5', nan):.2f} |" for name, r in results.get("knn", {}).items()]
    if results.get("segment"):
        lines += ["", "| segmentation | mIoU | mAcc | aAcc |", "|---|---|---|---|"]
        lines += [f"| {run} | {r['mIoU']:.2f} | {r['mAcc']:.2f} | {r['aAcc']:.2f} |"
                  for run, r in results["segment"].items()]
    return "\n".join(lines)


def write_tensorboard(workdir: str, results: dict, summary: str) -> None:
    """The demo's evaluation into ``<workdir>/tensorboard`` at the BEiT v2 stage's last step:
    :func:`evaluation_scalars`, ``text/evaluation`` (:func:`evaluation_markdown`), ``text/summary`` (the printed
    summary) and ``images/token_maps``, ``images/codebook_usage`` (the PNGs); the config comes with the first record
    (``metrics.MetricsWriter``)."""
    from PIL import Image

    step = int(results.get("pretrain", {}).get("step", 0))
    writer = metrics_lib.MetricsWriter(workdir)
    try:
        writer.write_scalars(step, evaluation_scalars(results))
        writer.write_text(step, "evaluation", evaluation_markdown(results))
        writer.write_text(step, "summary", metrics_lib.preformatted(summary))
        for name in ("token_maps", "codebook_usage"):
            path = storage.join(workdir, f"{name}.png")
            if storage.exists(path):
                with storage.open(path, "rb") as f:
                    writer.write_image(step, name, np.asarray(Image.open(f).convert("RGB")))
    finally:
        writer.close()


def _first_and_last(workdir: str, key: str) -> dict:
    path = storage.join(workdir, "metrics.jsonl")
    rows = metrics_lib.read_jsonl(path) if storage.exists(path) else []
    values = [r[key] for r in rows if key in r]
    return {f"first_{key}": values[0]} if values else {}


def run(config: ml_collections.ConfigDict, workdir: str):
    common.log_header("demo", config, workdir)
    common.prepare_workdir(config, workdir)
    mesh = sharding.make_mesh(config.get("mesh"))
    times = {}
    ibot_dir = storage.join(workdir, "ibot")
    teacher_dir = storage.join(ibot_dir, ibot.TEACHER_DIR)
    vqkd_dir = storage.join(workdir, "vqkd")
    tokenizer_dir = storage.join(vqkd_dir, "tokenizer")
    pretrain_dir = storage.join(workdir, "pretrain")
    model_dir = storage.join(pretrain_dir, "model")

    start = time.perf_counter()
    if not storage.exists(teacher_dir):
        ibot.run(stage_config(config.ibot, config), ibot_dir)
    times["ibot"] = time.perf_counter() - start

    start = time.perf_counter()
    if not storage.exists(tokenizer_dir):
        vqkd.run(stage_config(config.vqkd, config, **{"teacher.checkpoint": teacher_dir}), vqkd_dir)
    times["vqkd"] = time.perf_counter() - start

    start = time.perf_counter()
    if not storage.exists(model_dir):
        pretrain.run(stage_config(config.pretrain, config, **{"tokenizer.checkpoint": tokenizer_dir}), pretrain_dir)
    times["pretrain"] = time.perf_counter() - start

    start = time.perf_counter()
    results = {"knn": evaluate(config, workdir, teacher_dir, tokenizer_dir, model_dir, mesh)}
    results["tokenizer"] = results["knn"].pop("tokenizer")
    times["eval"] = time.perf_counter() - start
    results["ibot"] = {**final_metrics(ibot_dir), **_first_and_last(ibot_dir, "loss")}
    results["vqkd"] = {**final_metrics(vqkd_dir), **_first_and_last(vqkd_dir, "rec_loss")}
    results["pretrain"] = {**final_metrics(pretrain_dir), **_first_and_last(pretrain_dir, "loss")}
    if "segment" in config and config.data.dataset != sources.DEMO_NAME:
        logging.info("segment stage skipped: it trains on the built-in shapes' masks (config.data.dataset=%r)",
                     config.data.dataset)
    elif "segment" in config:
        start = time.perf_counter()
        results["segment"] = segment_stage(config, workdir, model_dir)
        times["segment"] = time.perf_counter() - start
    results["stage_seconds"] = times
    if jax.process_index() == 0:
        storage.write_json(storage.join(workdir, "summary.json"), results, indent=2)
        write_tensorboard(workdir, results, print_summary(results, times, workdir))
    logging.info("demo finished")
    return results
