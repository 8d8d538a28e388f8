"""Issue #18 item 4, outputs people read: progress and plain log lines, TensorBoard namespaces, labelled PNGs, the
demo summary's alignment. Cheap: no model is compiled (a Python step function drives the loop)."""
import json
import math
import re
from dataclasses import dataclass, replace

import numpy as np
import pytest

from beitv2_jax import progress
from beitv2_jax.train import loop, metrics, sharding
from beitv2_jax.train.tasks import common, demo

NAMESPACES = ("train", "eval", "data", "images", "text", "_hparams_")


def tags_of(logdir: str) -> dict:
    """``{tag: kind}`` of every summary in the event files under ``logdir``."""
    return {tag: kind for _, tag, kind, _ in metrics.read_events(logdir)}


def test_metric_names_map_to_three_scalar_namespaces():
    assert metrics.scalar_tag("loss") == "train/loss"
    assert metrics.scalar_tag("img_per_sec") == "train/img_per_sec"
    assert metrics.scalar_tag("data_wait_s") == "data/wait_s"
    assert metrics.scalar_tag("bad_records") == "data/bad_records"
    assert metrics.scalar_tag("eval/top1") == "eval/top1"
    assert metrics.scalar_tag("train/codebook_usage") == "train/codebook_usage"
    assert metrics.scalar_tag("teacher/entropy") == "train/teacher/entropy"


def test_plain_progress_without_a_terminal(capsys, monkeypatch):
    """Under pytest stdout/stderr are not terminals (a log file): no bar, no carriage return; one line at the end,
    and one per ``PLAIN_INTERVAL_S`` while the loop runs."""
    assert not progress.interactive() and progress.plain_lines()
    assert list(progress.track(range(5), "features (train)", unit="batch")) == list(range(5))
    out, err = capsys.readouterr()
    assert "\r" not in out + err and err == ""
    assert re.fullmatch(r"\d\d:\d\d:\d\d features \(train\): 5/5 batch done \(\d+\.\d s, .* batch/s\)\n", out), out
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    assert sum(progress.track(iter(range(3)), "probe", total=3, unit="epoch")) == 3
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[1].split(" (")[0] for line in lines] == [
        "1/3 epoch running", "2/3 epoch running", "3/3 epoch running", "3/3 epoch done"]


@dataclass(frozen=True)
class ToyState:
    step: int
    extra: dict

    def replace(self, **kw):
        return replace(self, **kw)


def toy_step(state, batch):
    loss = float(np.asarray(batch["x"]).mean())
    return state.replace(step=state.step + 1), {"loss": np.float32(loss), "lr": np.float32(1e-3)}


def test_loop_prints_one_plain_line_per_window_and_writes_namespaced_tags(tmp_path, capsys):
    """7 steps, a window every 3: lines at steps 3, 6, 7 on stdout (nothing else, no carriage return), and every
    TensorBoard tag in train/, data/ or text/ (the workdir's config.json as text)."""
    (tmp_path / "config.json").write_text(json.dumps({"task": "toy", "optim": {"lr": 1e-3}}))
    batches = ({"x": np.full((2, 1), i, np.float32), "bad_records": np.zeros(2, np.int32)} for i in range(1, 8))
    writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
    state = loop.run(workdir=str(tmp_path), state=ToyState(0, {}), train_step=toy_step, iterator=batches,
                     mesh=sharding.make_mesh(None), total_steps=7, steps_per_epoch=7, batch_size=2, log_every=3,
                     writer=writer, desc="toy")
    writer.close()
    assert state.step == 7
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    lines = out.splitlines()
    assert [line.split(" ", 4)[1:4] for line in lines] == [["toy", "step", "3/7"], ["toy", "step", "6/7"],
                                                           ["toy", "step", "7/7"]]
    fields = [dict(kv.split("=") for kv in line.split(" ")[4:]) for line in lines]
    assert [float(f["loss"]) for f in fields] == [2.0, 5.0, 7.0]  # window means of the step losses
    assert {"lr", "img_per_sec", "data_wait_s", "step_s", "goodput", "bad_records", "nonfinite_steps"} <= set(fields[0])
    assert fields[1]["bad_records"] == "0" and "compile_s" in fields[0] and "compile_s" not in fields[1]

    tags = tags_of(str(tmp_path / "tensorboard"))
    assert {"train/loss", "train/lr", "train/img_per_sec", "data/wait_s", "data/bad_records"} <= set(tags)
    assert tags["text/config/text_summary"] == "text" and "_hparams_/session_start_info" in tags
    assert all(tag.split("/")[0] in NAMESPACES for tag in tags), sorted(tags)
    config_text = [v for _, tag, _, v in metrics.read_events(str(tmp_path / "tensorboard")) if tag.startswith("text/")]
    assert json.loads(config_text[0]) == {"optim": {"lr": 1e-3}, "task": "toy"}  # Markdown code block = indented


def test_codebook_usage_figure_is_labelled_on_a_log_axis():
    counts = np.array([0, 8, 0, 8, 2, 2, 0, 0])  # 4 of 8 used; p = (.4, .4, .1, .1)
    fig = common.usage_histogram_figure(counts, "test-split code usage")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel().startswith("code rank") and ax.get_ylabel() == "count (log scale)"
    perplexity = math.exp(-2 * (0.4 * math.log(0.4) + 0.1 * math.log(0.1)))
    assert common.code_perplexity(counts) == pytest.approx(perplexity)
    assert ax.get_title() == (f"test-split code usage: 4/8 codes used (50.0%), perplexity {perplexity:.1f}, "
                              f"20 tokens")
    assert ax.get_legend().get_texts()[0].get_text() == "4 unused codes (count 0)"


def test_token_map_figure_writes_each_code_id_in_its_patch(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 512, (2, 3, 4))
    fig = common.token_map_figure(rng.random((2, 12, 16, 3)), tokens, 512)
    axes = np.asarray(fig.axes).reshape(2, 2)
    for i in range(2):
        assert axes[i, 0].get_title() == f"image {i}"
        assert axes[i, 1].get_title() == f"token ids (3x4 patches, {len(np.unique(tokens[i]))} distinct codes)"
        written = {(round(t.get_position()[1]), round(t.get_position()[0])): int(t.get_text())
                   for t in axes[i, 1].texts}
        assert written == {(y, x): int(tokens[i, y, x]) for y in range(3) for x in range(4)}
    assert fig._suptitle.get_text().startswith("VQ-KD token maps (codebook of 512 codes")
    image = common.token_map_png(rng.random((2, 12, 16, 3)), tokens, str(tmp_path / "maps.png"), 512)
    assert image.dtype == np.uint8 and image.shape[2] == 3 and (tmp_path / "maps.png").stat().st_size > 0


def fake_results():
    row = lambda k1, lin: {"knn_top1": k1, "knn_top5": 90.0, "linear_top1": lin, "linear_top5": 95.5}
    knn = {"iBOT teacher (cls)": row(45.6, 46.9), "iBOT ViT, random init (cls)": row(32.5, 32.4),
           "BEiT v2 encoder (cls)": row(40.0, 53.5), "BEiT v2 encoder (mean)": row(38.6, 39.2),
           "same encoder, random init (cls)": row(33.5, 26.0), "same encoder, random init (mean)": row(7.4, 5.0)}
    segment = {"pretrained": {"num_images": 200, "mIoU": 12.49, "mAcc": 16.08, "aAcc": 79.39},
               "random_init": {"num_images": 200, "mIoU": 8.62, "mAcc": 10.76, "aAcc": 7.59}}
    return {"knn": knn, "segment": segment, "tokenizer": {"test_codebook_usage": 84.0, "num_codes": 512},
            "pretrain": {"step": 40}}


def column_ends(line: str) -> list:
    return [m.end() for m in re.finditer(r"\S+", line)][-4:]


def test_demo_summary_blocks_are_aligned(capsys):
    text = demo.print_summary(fake_results(), {"eval": 1.0}, "/w")
    lines = text.splitlines()
    pairs = lines.index(next(l for l in lines if "trained vs random init" in l))
    block = lines[pairs + 1:pairs + 5]  # sub-header + 3 rows: 4 right-aligned columns at the same offsets
    assert len(block) == 4 and len({tuple(column_ends(l)) for l in block}) == 1, "\n".join(block)
    header, ends = lines[pairs], column_ends(block[0])
    width = len("trained")  # each metric's name sits over its two columns
    assert ends[0] - width <= header.index("linear@1") and header.index("linear@1") + 8 <= ends[1]
    assert ends[2] - width <= header.index("k-NN@1") and header.index("k-NN@1") + 6 <= ends[3]
    seg = lines.index(next(l for l in lines if l.strip().startswith("segmentation (200 test images")))
    ends = {tuple(column_ends(l)[-3:]) for l in lines[seg:seg + 3]}
    assert len(ends) == 1, "\n".join(lines[seg:seg + 3])


def test_demo_evaluation_reaches_tensorboard(tmp_path):
    results = fake_results()
    common.usage_histogram_png(np.array([5, 0, 3, 1]), str(tmp_path / "codebook_usage.png"))
    common.token_map_png(np.zeros((1, 8, 8, 3)), np.array([[[0, 1], [2, 3]]]), str(tmp_path / "token_maps.png"), 4)
    demo.write_tensorboard(str(tmp_path), results, "summary\n  a  1.00")
    events = metrics.read_events(str(tmp_path / "tensorboard"))
    values = {tag: value for _, tag, _, value in events}
    assert {step for step, *_ in events} == {40}
    assert values["eval/beit_v2_encoder_cls/linear_top1"] == pytest.approx(53.5)
    assert values["eval/same_encoder_random_init_mean/knn_top5"] == pytest.approx(90.0)
    assert values["eval/segment_random_init/mIoU"] == pytest.approx(8.62)
    assert values["eval/tokenizer/test_codebook_usage"] == 84.0
    assert "| BEiT v2 encoder (cls) | 40.00 | 90.00 | 53.50 | 95.50 |" in values["text/evaluation/text_summary"]
    assert values["text/summary/text_summary"] == "    summary\n      a  1.00"
    assert {"images/token_maps", "images/codebook_usage"} <= set(values)
    assert all(tag.split("/")[0] in NAMESPACES for tag in values), sorted(values)
