"""The released BEiT v2 / BEiT / VQ-KD tokenizer checkpoints by name: download → verify → convert → cache.

::

  import beitv2_jax
  beitv2_jax.registry.names()                                   # what can be loaded by name
  model = beitv2_jax.from_pretrained("beitv2_base_patch16_224_pt1k_ft21kto1k")
  tokenizer = beitv2_jax.load_tokenizer("vqkd_encoder_base_decoder_3x768x12_clip")

A name is fetched once: the official ``.pth`` is downloaded to ``<cache>/downloads/``, verified, converted with
``beitv2_jax.convert`` into ``<cache>/models/<name>/`` (our weight directory, preprocessing included) and the
download deleted; later calls read the directory. ``<cache>`` is ``$BEITV2_JAX_CACHE`` or ``~/.cache/beitv2_jax``.
``$BEITV2_JAX_URL_BASE`` replaces ``https://github.com/addf400/files/releases/download`` (a mirror; the tests use a
server on 127.0.0.1). The official files are PyTorch pickles: converting them needs torch
(``pip install 'beitv2_jax[torch]'``).

Verification: the tokenizers' file names carry the first 8 hex digits of their sha256 (``torch.hub``'s
``check_hash`` convention), which is checked. The authors publish no hash for the other files: those are verified by
loadability only — the strict conversion (every key present, no unexpected key, every shape equal to the model's)
must succeed, or nothing is cached. URLs and file names: ``unilm/beit2/README.md`` and ``unilm/beit/README.md``
(see /work/shared/reference); preprocessing: ImageNet mean/std, bicubic; crop_pct 0.9 (base) / 0.95 (large) for the
fine-tuned classifiers as timm's ``beitv2_*`` configs, 0.875 (Resize 256 → crop 224) otherwise; the tokenizers take
[0, 1] images (``test_get_code.py``: Resize(256) → CenterCrop(224) → ToTensor).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.request
import uuid
from typing import Optional

OFFICIAL_URL_BASE = "https://github.com/addf400/files/releases/download"
URL_BASE_ENV = "BEITV2_JAX_URL_BASE"
CACHE_ENV = "BEITV2_JAX_CACHE"
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
UNIT = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


class DownloadError(OSError):
    """A download that failed or did not verify (one line)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One released checkpoint: ``release`` (folder of the GitHub release), ``filename``, ``format`` (a convert
    layout), ``overrides`` (config fields the file does not store, e.g. heads of a model without a relative position
    table), ``preprocessing``, ``sha256`` (full hash, when published) or ``sha256_prefix`` (from the file name)."""

    release: str
    filename: str
    format: str
    description: str
    preprocessing: dict
    overrides: dict = dataclasses.field(default_factory=dict)
    sha256: Optional[str] = None
    sha256_prefix: Optional[str] = None

    def url(self) -> str:
        base = os.environ.get(URL_BASE_ENV, OFFICIAL_URL_BASE).rstrip("/")
        return f"{base}/{self.release}/{self.filename}"


def _pre(crop_pct: float, unit: bool = False) -> dict:
    return dict(UNIT if unit else IMAGENET, crop_pct=crop_pct, interpolation="bicubic")  # size: the model's


def _build() -> dict:
    out = {}
    ft_crop = {"base": 0.9, "large": 0.95}
    for size in ("base", "large"):
        stem = f"beitv2_{size}_patch16_224_pt1k"
        for suffix, epochs in (("", 1600), ("_300e", 300)):
            out[stem + suffix] = Entry("BEiT-v2", f"{stem}{suffix}.pth", "official_beitv2",
                                       f"BEiT v2 ViT-{size[0].upper()}/16, ImageNet-1k pretraining ({epochs} epochs; "
                                       f"encoder + LM head + patch aggregation)", _pre(0.875))
        for suffix, what in (("_ft1k", "fine-tuned on ImageNet-1k (1000 classes)"),
                             ("_ft21k", "intermediate fine-tuning on ImageNet-21k (21841 classes)"),
                             ("_ft21kto1k", "fine-tuned on ImageNet-21k then ImageNet-1k (1000 classes)")):
            out[stem + suffix] = Entry("BEiT-v2", f"{stem}{suffix}.pth", "official_finetune",
                                       f"BEiT v2 ViT-{size[0].upper()}/16 {what}", _pre(ft_crop[size]))
        v1 = f"beit_{size}_patch16_224_pt22k"
        out[v1] = Entry("v1.0", f"{v1}.pth", "official_beitv2",
                        f"BEiT (v1) ViT-{size[0].upper()}/16, ImageNet-22k pretraining (DALL-E tokens)", _pre(0.875))
        out[v1 + "_ft22k"] = Entry("v1.0", f"{v1}_ft22k.pth", "official_finetune",
                                   f"BEiT (v1) ViT-{size[0].upper()}/16 pretrained and fine-tuned on ImageNet-22k",
                                   _pre(0.875))
    out["beit_base_patch16_224_pt1k_800ep"] = Entry(
        "v1.0", "beit_base_patch16_224_pt1k_800ep.pth", "official_beitv2",
        "BEiT (v1) ViT-B/16, ImageNet-1k pretraining 800 epochs (absolute positions, no layer scale)", _pre(0.875),
        overrides={"num_heads": 12})
    for name, digest, what in (("vqkd_encoder_base_decoder_3x768x12_clip", "d5036aa7",
                                "VQ-KD tokenizer, 3-block decoder, CLIP-B/16 teacher (used for BEiT v2 pretraining)"),
                               ("vqkd_encoder_base_decoder_1x768x12_clip", "d93179da",
                                "VQ-KD tokenizer, 1-block decoder, CLIP-B/16 teacher"),
                               ("vqkd_encoder_base_decoder_1x768x12_dino", "663c55d7",
                                "VQ-KD tokenizer, 1-block decoder, DINO-B/16 teacher")):
        out[name] = Entry("BEiT-v2", f"{name}-{digest}.pth", "official_vqkd", what, _pre(0.875, unit=True),
                          overrides={"num_heads": 12, "decoder_heads": 12}, sha256_prefix=digest)
    return out


REGISTRY = _build()


def names() -> list:
    """The official checkpoints that can be loaded by name."""
    return sorted(REGISTRY)


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "beitv2_jax"))


def model_dir(name: str) -> str:
    """Where the converted ``name`` is cached."""
    return os.path.join(cache_dir(), "models", name)


def download(entry: Entry, directory: str) -> str:
    """``entry``'s file in ``directory`` (downloaded unless present), its sha256 checked when one is known."""
    from beitv2_jax import progress

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, entry.filename)
    if not os.path.isfile(path):
        url = entry.url()
        tmp = f"{path}.part-{uuid.uuid4().hex[:8]}"
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0) or None
                bar = progress.bar(total, entry.filename, unit="B")  # a tqdm bar, or plain lines in a log file
                try:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
                finally:
                    bar.close()
            os.replace(tmp, path)
        except OSError as e:
            raise DownloadError(f"cannot download {url}: {getattr(e, 'reason', None) or e}") from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    actual = digest.hexdigest()
    expected = entry.sha256 or entry.sha256_prefix
    if expected and not actual.startswith(expected):
        os.remove(path)
        raise DownloadError(f"{entry.filename}: sha256 {actual[:16]}… does not match the published "
                            f"{expected[:16]}… (file deleted; a broken download or a wrong mirror)")
    return path


def fetch(name: str) -> str:
    """The cached weight directory of the official checkpoint ``name`` (downloaded and converted once)."""
    from beitv2_jax.convert import engine, store, torch_io

    if name not in REGISTRY:
        raise KeyError(f"unknown checkpoint name {name!r}; known: {', '.join(names())}")
    target = model_dir(name)
    if os.path.isfile(os.path.join(target, store.MODEL_JSON)):
        return target
    entry = REGISTRY[name]
    path = download(entry, os.path.join(cache_dir(), "downloads"))
    state_dict, _, training_args = torch_io.load_checkpoint(path)
    converted = engine.import_state_dict(state_dict, entry.format, overrides=entry.overrides,
                                         options=torch_io.layout_options(training_args))
    info = {"source": entry.url(), "format": entry.format, "name": name, "options": converted.options,
            "verified": "sha256" if entry.sha256 else ("sha256 prefix" if entry.sha256_prefix else "loadability")}
    store.save_variables(target, converted.variables, converted.model_kind, converted.model_config, info=info,
                         preprocessing=entry.preprocessing)
    os.remove(path)
    return target
