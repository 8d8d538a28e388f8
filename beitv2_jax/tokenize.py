"""``python -m beitv2_jax.tokenize``: the VQ-KD code ids of image files (official ``beit2/test_get_code.py``).

::

  python -m beitv2_jax.tokenize --checkpoint TOKENIZER_DIR --images a.jpg b.png photos/ \\
      [--output OUT_DIR] [--size 224] [--crop_pct 0.875] [--batch_size 16]

``TOKENIZER_DIR`` is a tokenizer written by the ``vqkd`` task (``<workdir>/tokenizer``) or by
``python -m beitv2_jax.convert --format official_vqkd``. A directory given to ``--images`` contributes its image
files (not recursively). Each image is read with PIL, its shorter side resized to ``int(size / crop_pct)``
(bicubic; 256 for 224), centre-cropped to ``size`` and scaled to [0, 1] (``Resize`` → ``CenterCrop`` →
``ToTensor``, no normalisation, as the official script), then tokenised with ``get_codebook_indices``.

The h×w ids of every image are printed. With ``--output`` the tool also writes ``tokens.json`` (paths, ids,
grid, number of codes), ``tokens.npy`` (int32 ``[n, h, w]``), one ``<index>_<name>.png`` per image (the crop
next to its patches coloured by code id) and ``token_maps.png`` (all of them in one column).
Problems (missing checkpoint, unreadable image, wrong size) end the run with one ``error: ...`` line, exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from beitv2_jax import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class TokenizeError(Exception):
    """A problem with the user's input, reported as one line (no traceback)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m beitv2_jax.tokenize",
        description="Print (and save) the VQ-KD tokenizer code ids of image files.")
    p.add_argument("--checkpoint", required=True,
                   help="tokenizer directory (vqkd task's <workdir>/tokenizer or a convert --format official_vqkd "
                        "output)")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                   help="image files, or directories whose image files are all used")
    p.add_argument("--output", help="directory for tokens.json, tokens.npy and the token-map PNGs")
    p.add_argument("--size", type=int,
                   help="crop size in pixels (default: the tokenizer's image size; must equal it)")
    p.add_argument("--crop_pct", "--crop-pct", type=float, default=0.875,
                   help="resize the shorter side to int(size / crop_pct) before the centre crop (default 0.875)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=16,
                   help="images per forward pass (default 16)")
    return p


# ----------------------------------------------------------------------------------------------- inputs
def expand_image_paths(paths: Sequence[str]) -> list:
    """Files as given, directories replaced by their image files (sorted). Missing paths are an error."""
    out = []
    for path in paths:
        if storage.isdir(path):
            found = sorted(storage.join(path, f) for f in storage.listdir(path)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and storage.isfile(storage.join(path, f)))
            if not found:
                raise TokenizeError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in directory {path}")
            out.extend(found)
        elif storage.isfile(path):
            out.append(path)
        else:
            raise TokenizeError(f"image not found: {path}")
    return out


def load_image(path: str, size: int, crop_pct: float):
    """One image file → float32 ``[size, size, 3]`` in [0, 1]: shorter side to ``int(size / crop_pct)``
    (bicubic), centre crop, ``/ 255``. Any mode (grey, palette, RGBA, 16-bit) is converted to RGB."""
    from beitv2_jax.data import transforms

    try:
        with storage.open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizeError(f"cannot read image {path}: {e.strerror or e}") from e
    try:
        image = transforms.decode_image(data)
    except transforms.UndecodableImageError as e:
        raise TokenizeError(f"cannot read image {path}: {e}") from e
    image = transforms.resize_shorter(image, int(size / crop_pct), "bicubic")
    return transforms.to_unit_float(transforms.center_crop(image, size))


def read_tokenizer_config(directory: str) -> dict:
    """The model config stored in a tokenizer directory's ``model.json`` (checked to be a VQ-KD; nothing big
    is loaded)."""
    from beitv2_jax.convert import store

    if not storage.isdir(directory):
        raise TokenizeError(f"tokenizer checkpoint directory not found: {directory}")
    try:
        description = store.read_description(directory)
    except (FileNotFoundError, ValueError) as e:
        raise TokenizeError(str(e)) from e
    if description.get("model_kind") != "vqkd":
        raise TokenizeError(f"{directory} holds a {description.get('model_kind')!r} model, not a VQ-KD tokenizer")
    return description["model_config"]


def load_tokenizer(directory: str):
    """``(VQKD model, variables)`` from a tokenizer directory, with one-line errors."""
    from beitv2_jax import api

    read_tokenizer_config(directory)
    try:
        tokenizer = api.load_tokenizer(directory)
    except (FileNotFoundError, ValueError) as e:
        raise TokenizeError(f"cannot load the tokenizer in {directory}: {e}") from e
    return tokenizer.module, tokenizer.variables


# ----------------------------------------------------------------------------------------------- tokens
def tokenize(model, variables, images, batch_size: int):
    """Code ids ``int32 [n, h, w]`` of ``images`` ``float32 [n, S, S, 3]`` in [0, 1]; batches are padded to
    ``batch_size`` so the function compiles once."""
    import jax
    import numpy as np

    fn = jax.jit(lambda v, x: model.apply(v, x, method="get_codebook_indices"))
    h, w = model.encoder.window
    n = len(images)
    batch = max(1, min(batch_size, n))
    out = []
    for start in range(0, n, batch):
        chunk = images[start:start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(fn(variables, chunk))[:batch - pad])
    return np.concatenate(out).reshape(n, h, w).astype(np.int32)


def format_tokens(path: str, ids) -> str:
    """``path (h×w tokens):`` then one line of right-aligned ids per patch row."""
    width = len(str(int(ids.max()))) if ids.size else 1
    rows = "\n".join("  " + " ".join(f"{int(t):>{width}d}" for t in row) for row in ids)
    return f"{path} ({ids.shape[0]}x{ids.shape[1]} tokens):\n{rows}"


def write_outputs(directory: str, paths: Sequence[str], images, ids, num_codes: int, info: dict) -> list:
    """``tokens.json``, ``tokens.npy``, a PNG per image and ``token_maps.png`` under ``directory``; returns the
    written paths."""
    import numpy as np

    from beitv2_jax.train.tasks.common import token_map_png

    storage.makedirs(directory)
    written = []
    record = dict(info, num_codes=int(num_codes), grid=list(ids.shape[1:]),
                  images=[{"path": storage.abspath(p), "tokens": ids[i].tolist()} for i, p in enumerate(paths)])
    json_path = storage.join(directory, "tokens.json")
    storage.write_json(json_path, record)
    npy_path = storage.join(directory, "tokens.npy")
    with storage.open(npy_path, "wb") as f:
        np.save(f, ids)
    written += [json_path, npy_path]
    for i, path in enumerate(paths):
        stem = os.path.splitext(storage.basename(path))[0]
        png = storage.join(directory, f"{i:03d}_{stem}.png")
        token_map_png(images[i:i + 1], ids[i:i + 1], png, num_codes)
        written.append(png)
    grid = storage.join(directory, "token_maps.png")
    token_map_png(images, ids, grid, num_codes)
    return written + [grid]


def crop_size(args, config: dict) -> int:
    """The crop size: ``--size`` or the tokenizer's image size; other options checked on the way."""
    if args.batch_size < 1:
        raise TokenizeError(f"--batch_size must be at least 1, got {args.batch_size}")
    if not 0 < args.crop_pct <= 1:
        raise TokenizeError(f"--crop_pct must be in (0, 1], got {args.crop_pct}")
    native = int(config.get("image_size", 224))
    size = native if args.size is None else args.size
    if size != native:
        raise TokenizeError(f"--size {size} differs from the tokenizer's image size {native} (its position "
                            f"embedding is fixed); pass --size {native} or omit --size")
    return size


def run(args) -> int:
    config = read_tokenizer_config(args.checkpoint)
    size = crop_size(args, config)
    paths = expand_image_paths(args.images)
    import numpy as np

    images = np.stack([load_image(p, size, args.crop_pct) for p in paths])
    model, variables = load_tokenizer(args.checkpoint)
    ids = tokenize(model, variables, images, args.batch_size)
    for path, image_ids in zip(paths, ids):
        print(format_tokens(path, image_ids))
    if args.output:
        info = {"checkpoint": storage.abspath(args.checkpoint), "image_size": size, "crop_pct": args.crop_pct}
        try:
            written = write_outputs(args.output, paths, images, ids, model.num_codes, info)
        except OSError as e:
            raise TokenizeError(f"cannot write to {args.output}: {e.strerror or e}") from e
        print(f"wrote {len(written)} files to {args.output} (tokens.json, tokens.npy, "
              f"{len(paths)} per-image PNGs, token_maps.png)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except TokenizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
