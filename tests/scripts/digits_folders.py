"""Writes scikit-learn's 1,797 handwritten digits (8×8, 0–16) as 32-px RGB PNGs (bilinear upscale, white on black)
in the two layouts of docs/own_data.md: ``OUT/classes/<digit>/*.png`` (for evaluation; prepared with a stratified
``--holdout``) and ``OUT/unlabeled/*.png`` (for pretraining): the images of the class folders that the same
``--holdout``/``--seed`` leaves in ``train``, so the pretraining never sees a test image.

    python tests/scripts/digits_folders.py --out /tmp/digits --holdout 0.221 --seed 0

Needs scikit-learn (not a requirement of the project: ``pip install scikit-learn``).
"""
import argparse
import os
import shutil

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from beitv2_jax.data import sources


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--holdout", type=float, default=0.221)  # 397 of 1,797 (the split sizes)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    digits = load_digits()
    for layout in ("classes", "unlabeled"):
        shutil.rmtree(os.path.join(args.out, layout), ignore_errors=True)
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = os.path.join(args.out, "classes", str(label))
        os.makedirs(folder, exist_ok=True)
        gray = Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)).resize((args.size, args.size),
                                                                                  Image.BILINEAR)
        gray.convert("RGB").save(os.path.join(folder, f"{i:04d}.png"))
    _, splits = sources.scan_image_folder(os.path.join(args.out, "classes"), holdout=args.holdout, seed=args.seed)
    os.makedirs(os.path.join(args.out, "unlabeled"))
    for path, _ in splits["train"]:
        shutil.copy(path, os.path.join(args.out, "unlabeled", os.path.basename(path)))
    print({split: len(items) for split, items in splits.items()})


if __name__ == "__main__":
    main()
