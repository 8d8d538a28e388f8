"""``python -m beitv2_jax.tokenize`` in a subprocess on a tiny random tokenizer: its ids equal
``get_codebook_indices`` computed in-process on the official preprocessing (torchvision ``Resize`` →
``CenterCrop`` → ``ToTensor``, as ``beit2/test_get_code.py``), its files, and its one-line errors."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, make_random_tokenizer

SIZE, NUM_CODES = 16, 64


def run_cli(*args, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "beitv2_jax.tokenize", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_random_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", image_size=SIZE, patch_size=4,
                                 num_codes=NUM_CODES)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Generated images of various sizes, aspect ratios and modes: RGB PNG, JPEG, grey PNG, RGBA PNG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:30]
    smooth = np.stack([xx * 8, yy * 6, (xx + yy) * 3], -1).astype(np.uint8)
    specs = [("rgb.png", Image.fromarray(smooth)),
             ("photo.jpg", Image.fromarray(rng.integers(0, 256, (24, 50, 3), dtype=np.uint8))),
             ("grey.png", Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L")),
             ("alpha.png", Image.fromarray(rng.integers(0, 256, (33, 21, 4), dtype=np.uint8), "RGBA"))]
    paths = []
    for name, image in specs:
        path = root / name
        if name.endswith(".jpg"):
            image.save(path, quality=90)
        else:
            image.save(path)
        paths.append(str(path))
    return paths


def official_view(path: str) -> np.ndarray:
    """``beit2/test_get_code.py`` preprocessing: Resize(int(S / 0.875), bicubic) → CenterCrop(S) → ToTensor."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize(int(SIZE / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(SIZE), transforms.ToTensor()])
    return transform(Image.open(path).convert("RGB")).numpy().transpose(1, 2, 0)


@pytest.fixture(scope="module")
def expected_ids(tokenizer_dir, image_files) -> dict:
    """``{path: [h, w] ids}``: ``get_codebook_indices`` through the pretrain task's tokenizer loader."""
    from beitv2_jax.train.tasks.vqkd import load_tokenizer

    model, variables = load_tokenizer(tokenizer_dir)
    images = jnp.asarray(np.stack([official_view(p) for p in image_files]))
    ids = jax.jit(lambda v, x: model.apply(v, x, method="get_codebook_indices"))(variables, images)
    h, w = model.encoder.window
    return dict(zip(image_files, np.asarray(ids).reshape(len(image_files), h, w)))


def parse_printed(stdout: str) -> list:
    """``[(path, [h, w] ids), ...]`` from the CLI's printout."""
    out = []
    for line in stdout.splitlines():
        if line.endswith("tokens):"):
            out.append((line.rsplit(" (", 1)[0], []))
        elif line.startswith("  ") and out:
            out[-1][1].append([int(v) for v in line.split()])
    return [(path, np.asarray(rows)) for path, rows in out]


def test_tokenize_cli_matches_get_codebook_indices(tokenizer_dir, image_files, expected_ids, tmp_path):
    """A directory of 4 images (RGB/grey/RGBA PNG, JPEG; sorted) plus one file again, batches of 3 (the second
    padded): printed ids, tokens.npy and tokens.json equal the in-process ``get_codebook_indices``; one PNG per
    image + a grid."""
    out_dir = tmp_path / "out"
    result = run_cli("--checkpoint", tokenizer_dir, "--images", os.path.dirname(image_files[0]), image_files[1],
                     "--output", out_dir, "--batch-size", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(image_files) + [image_files[1]]
    expected = np.stack([expected_ids[p] for p in files])
    assert expected.shape == (5, 4, 4) and len(np.unique(expected)) > 1

    printed = parse_printed(result.stdout)
    assert [path for path, _ in printed] == files
    np.testing.assert_array_equal(np.stack([ids for _, ids in printed]), expected)

    saved = np.load(out_dir / "tokens.npy")
    assert saved.dtype == np.int32
    np.testing.assert_array_equal(saved, expected)
    record = json.loads((out_dir / "tokens.json").read_text())
    assert (record["num_codes"], record["grid"], record["image_size"]) == (NUM_CODES, [4, 4], SIZE)
    assert [r["path"] for r in record["images"]] == [os.path.abspath(p) for p in files]
    np.testing.assert_array_equal(np.asarray([r["tokens"] for r in record["images"]]), expected)

    for i, path in enumerate(files):
        png = out_dir / f"{i:03d}_{os.path.splitext(os.path.basename(path))[0]}.png"
        with Image.open(png) as im:  # crop | labelled token map: 2 × 3 in + 0.4 in wide, 3.45 in + 0.45 in per row
            assert im.size == (640, 390)
    with Image.open(out_dir / "token_maps.png") as im:
        assert im.size == (640, 5 * 345 + 45)


def test_tokenize_cli_errors(tokenizer_dir, image_files, tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    assert_one_line_error(run_cli("--checkpoint", missing, "--images", image_files[0]),
                          "checkpoint directory not found", str(missing))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert_one_line_error(run_cli("--checkpoint", empty, "--images", image_files[0]), "model.json")
    not_a_tokenizer = tmp_path / "vit_model"
    not_a_tokenizer.mkdir()
    (not_a_tokenizer / "model.json").write_text(json.dumps(
        {"format": "beitv2_jax.variables", "version": 1, "model_kind": "vit", "model_config": {}}))
    assert_one_line_error(run_cli("--checkpoint", not_a_tokenizer, "--images", image_files[0]),
                          "'vit' model, not a VQ-KD tokenizer")
    assert_one_line_error(run_cli("--checkpoint", tokenizer_dir, "--images", tmp_path / "nope.png"),
                          "image not found", "nope.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    assert_one_line_error(run_cli("--checkpoint", tokenizer_dir, "--images", image_files[0], broken),
                          "cannot read image", "broken.png")
    assert_one_line_error(run_cli("--checkpoint", tokenizer_dir, "--images", image_files[0], "--size", 224),
                          "--size 224", str(SIZE))
