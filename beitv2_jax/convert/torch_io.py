"""Read and write PyTorch state dicts as ``{key: np.ndarray}``.

``.safetensors`` files are read/written with ``safetensors.numpy`` (torch only as a fallback for dtypes numpy
lacks, e.g. bfloat16). ``.pth``/``.pt``/``.bin`` files need torch, imported only inside these functions.
"""
from __future__ import annotations

import os
import pickle
from typing import Mapping, Optional

import numpy as np

from beitv2_jax import storage

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
# Where training scripts nest the state dict (timm's checkpoint_filter_fn order: model, then module).
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state", "model_ema")


class MissingTorchError(ImportError):
    """PyTorch is needed (a ``.pth``/``.pt``/``.bin`` file) but not installed: one line naming the extra."""


def import_torch(path: str):
    """``torch``, or :class:`MissingTorchError` saying how to get it (the runtime install has no torch)."""
    try:
        import torch
    except ImportError as e:
        raise MissingTorchError(f"{path}: reading or writing PyTorch pickle files (.pth/.pt/.bin) needs PyTorch, "
                                f"which is not installed: pip install 'beitv2_jax[torch]' (or use .safetensors)") \
            from e
    return torch


def _suffix(path: str) -> str:
    for suffix in TORCH_SUFFIXES + SAFETENSORS_SUFFIXES:
        if path.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: unknown checkpoint file type (expected one of "
                     f"{', '.join(TORCH_SUFFIXES + SAFETENSORS_SUFFIXES)})")


def _tensor_to_numpy(value) -> np.ndarray:
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
        value = value.float()
    return value.numpy()


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive (``torch.jit.save``): a zip with ``code/`` and ``constants.pkl`` members."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def unwrap(checkpoint) -> dict:
    """The tensor dict inside a training checkpoint (``{'model': ..., 'optimizer': ..., 'args': ...}``)."""
    seen = checkpoint
    for _ in range(3):
        if not isinstance(seen, Mapping):
            break
        if any(hasattr(v, "shape") for v in seen.values()):
            return dict(seen)
        nested = next((seen[k] for k in WRAPPER_KEYS if isinstance(seen.get(k), Mapping)), None)
        if nested is None:
            break
        seen = nested
    keys = list(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ValueError(f"no state dict found in the checkpoint (top-level: {keys}); expected tensors or one of "
                     f"{WRAPPER_KEYS}")


def strip_prefix(state_dict: Mapping, prefix: str) -> tuple:
    """Keys under ``prefix`` (stripped) and the list of other keys, which the caller should report."""
    kept = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not kept:
        raise ValueError(f"no key starts with {prefix!r} (first keys: {list(state_dict)[:5]})")
    return kept, [k for k in state_dict if not k.startswith(prefix)]


# Training arguments (the official scripts save ``args`` next to the weights) that layouts read as options because
# the weights alone do not pin them down.
LAYOUT_ARGS = ("early_layers",)


def load_state_dict(path: str, prefix: Optional[str] = None, trust_pickle: bool = False) -> tuple:
    """``(state_dict as numpy, dropped keys)``; see :func:`load_checkpoint`."""
    return load_checkpoint(path, prefix, trust_pickle)[:2]


def layout_options(training_args: Mapping) -> dict:
    """The ``LAYOUT_ARGS`` found in a checkpoint's training arguments, as conversion options."""
    return {k: training_args[k] for k in LAYOUT_ARGS if training_args.get(k) is not None}


def _training_args(checkpoint) -> dict:
    """``vars(checkpoint['args'])`` of a training checkpoint (an ``argparse.Namespace`` or a dict), else {}."""
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    if args is None:
        return {}
    args = args if isinstance(args, Mapping) else getattr(args, "__dict__", {})
    return {k: v for k, v in args.items() if isinstance(v, (bool, int, float, str, type(None)))}


def load_checkpoint(path: str, prefix: Optional[str] = None, trust_pickle: bool = False) -> tuple:
    """``(state_dict as numpy, dropped keys, training args)``. DDP's ``module.`` prefix is removed when every key
    has it. Training args: the scalar entries of the checkpoint's ``args`` (unilm scripts save their argparse
    namespace there), {} when absent — :func:`layout_options` picks what a conversion needs.

    ``.pth`` files are read with ``torch.load(weights_only=True)``; ``trust_pickle=True`` allows arbitrary
    pickled objects (only for files you trust).
    """
    if not storage.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    with storage.local_file(path) as local:  # a gs:// file is downloaded first (torch / safetensors read files)
        sd, training_args = _read_state_dict(local, trust_pickle)
    dropped = []
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if prefix:
        sd, dropped = strip_prefix(sd, prefix)
    return sd, dropped, training_args


def _read_state_dict(path: str, trust_pickle: bool) -> tuple:
    """A local ``.safetensors`` / ``.pth`` / TorchScript file → ``({key: numpy array}, training args)``."""
    training_args = {}
    suffix = _suffix(path)
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            from safetensors.numpy import load_file

            sd = load_file(path)
        except (TypeError, ValueError):  # e.g. bfloat16, which numpy cannot hold
            from safetensors.torch import load_file as load_torch

            sd = {k: _tensor_to_numpy(v) for k, v in load_torch(path).items()}
    else:
        import argparse

        torch = import_torch(path)
        if _is_torchscript(path):  # e.g. OpenAI's released CLIP files (ViT-B-16.pt)
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                checkpoint = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            torch.serialization.add_safe_globals([argparse.Namespace])  # unilm checkpoints carry their args
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
            except pickle.UnpicklingError as e:
                reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise ValueError(f"{path}: torch.load(weights_only=True) refused an object in the file ({reason}); "
                                 f"if you trust the file, allow it with trust_pickle=True (CLI: --trust_pickle)")
        sd = {k: _tensor_to_numpy(v) if hasattr(v, "detach") else np.asarray(v)
              for k, v in unwrap(checkpoint).items()}
        training_args = _training_args(checkpoint)
    return sd, training_args


def save_state_dict(path: str, state_dict: Mapping[str, np.ndarray], wrap: Optional[str] = None) -> None:
    """Write ``.safetensors`` (numpy) or ``.pth``/``.bin`` (torch; optionally nested as ``{wrap: sd}``).

    The file appears atomically (written next to ``path``, then renamed; a ``gs://`` path: written locally, then
    uploaded as one object).
    """
    if storage.is_remote(path):
        with storage.local_output(path) as local:
            save_state_dict(local, state_dict, wrap)
        return
    suffix = _suffix(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, tmp, metadata={"format": "pt"})
        else:
            torch = import_torch(path)
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
            torch.save({wrap: tensors} if wrap else tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
