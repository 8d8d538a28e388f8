"""The generic conversion engine: one table of :class:`Rule` s per layout drives both import and export.

A rule ties one or more PyTorch state-dict keys to one or more flat Flax variable paths
(``"params/blocks_0/attn/qkv"``, ``"codebook/quantize/weight"``) through a :class:`~.transforms.Transform`
and its inverse. A layout (see ``layouts.py``) is a function ``(model_kind, model_config, options) → rules``
plus a function that infers the model config from a state dict.

Import (:func:`import_state_dict`): drop the layout's ignored keys (reported), infer the config, build the rules,
then check **everything** before giving up: missing keys, unexpected keys, transforms that fail, converted
shapes against the model's ``jax.eval_shape`` init shapes, model parameters left without a source. All problems
are reported together in one :class:`ConversionError` (a ``ValueError``); nothing is ever loaded partially.

Export (:func:`export_variables`): the same rules run backwards; missing or unexpected Flax variables are
errors too. Derived rules (``Rule.derived``) re-create PyTorch-only tensors (e.g. the official
``relative_position_index`` buffers) on export and are validated and discarded on import.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from beitv2_jax.convert.transforms import Transform


@dataclasses.dataclass(frozen=True)
class Rule:
    """``torch`` keys ⇄ ``flax`` paths through ``transform``.

    ``derived=True``: the PyTorch tensors carry no information of their own (buffers the model can rebuild);
    on import they are optional and only validated, on export they are re-created from the ``flax`` inputs
    (which other rules own).
    """

    torch: tuple
    flax: tuple
    transform: Transform
    derived: bool = False


@dataclasses.dataclass(frozen=True)
class Layout:
    """A checkpoint naming scheme. ``rules(kind, config, options)``; ``infer(state_dict, options, hf_config,
    notes)`` returns ``(kind, config)`` and appends to ``notes`` what it had to assume; ``ignore`` are regexes of
    keys dropped on import (and reported)."""

    name: str
    description: str
    rules: Callable[[str, dict, dict], list]
    infer: Callable[[Mapping[str, np.ndarray], dict, Optional[dict], list], tuple]
    ignore: tuple = ()
    detect_options: Callable[[Mapping[str, np.ndarray]], dict] = lambda state_dict: {}
    default_options: Callable[[str, dict], dict] = lambda kind, config: {}


LAYOUTS: dict = {}


def register(layout: Layout) -> Layout:
    LAYOUTS[layout.name] = layout
    return layout


def get_layout(name) -> Layout:
    if isinstance(name, Layout):
        return name
    from beitv2_jax.convert import layouts  # noqa: F401  (registers the layouts)

    if name not in LAYOUTS:
        raise ValueError(f"unknown checkpoint format {name!r}; choose one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]


# ----------------------------------------------------------------------------------------------- errors
_INDEX = re.compile(r"(?<=[._/])\d+(?=[._/]|$)")


def _ranges(values: Iterable[int]) -> str:
    values = sorted(set(values))
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def summarize_keys(keys: Iterable[str]) -> list:
    """Keys grouped by their numeric indices: ``blocks.{0-11}.attn.q_bias``. Lossless (falls back to listing)."""
    groups = collections.OrderedDict()
    for key in keys:
        pattern = _INDEX.sub("{}", key)
        groups.setdefault(pattern, []).append(tuple(int(m) for m in _INDEX.findall(key)))
    lines = []
    for pattern, indices in groups.items():
        slots = len(indices[0])
        if slots == 0 or len(indices) == 1:
            lines.extend(pattern.format(*idx) for idx in indices)
            continue
        per_slot = [sorted({idx[s] for idx in indices}) for s in range(slots)]
        if int(np.prod([len(v) for v in per_slot])) == len(set(indices)):
            lines.append(pattern.format(*("{" + _ranges(v) + "}" for v in per_slot)))
        else:
            lines.extend(pattern.format(*idx) for idx in indices)
    return lines


class ConversionError(ValueError):
    """Everything that stops a conversion, gathered: ``missing``, ``unexpected`` (keys or paths), ``problems``."""

    def __init__(self, what: str, missing=(), unexpected=(), problems=(), hint: str = ""):
        self.missing, self.unexpected, self.problems = list(missing), list(unexpected), list(problems)
        counts = []
        if self.missing:
            counts.append(f"{len(self.missing)} missing")
        if self.unexpected:
            counts.append(f"{len(self.unexpected)} unexpected")
        if self.problems:
            counts.append(f"{len(self.problems)} other problem(s)")
        lines = [f"{what}: {', '.join(counts)}"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}):")
            lines += [f"    {k}" for k in summarize_keys(self.missing)]
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}):")
            lines += [f"    {k}" for k in summarize_keys(self.unexpected)]
        if self.problems:
            lines.append("  problems:")
            lines += [f"    {p}" for p in self.problems]
        if hint:
            lines.append(f"  hint: {hint}")
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------------------------- trees
def flatten_variables(variables: Mapping[str, Any]) -> dict:
    """Nested variables (``nn.Partitioned`` boxes allowed) → ``{"params/blocks_0/attn/qkv": np.ndarray}``."""
    import flax.linen as nn
    from flax import traverse_util

    plain = nn.meta.unbox(dict(variables))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(plain, sep="/").items()}


def unflatten_variables(flat: Mapping[str, np.ndarray]) -> dict:
    from flax import traverse_util

    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _as_float32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind == "f" or x.dtype.name == "bfloat16":
        return x.astype(np.float32, copy=False)
    return x


def _describe(keys: Sequence[str], arrays: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {tuple(arrays[k].shape)}" for k in keys)


# ----------------------------------------------------------------------------------------------- import
@dataclasses.dataclass
class Converted:
    """Result of an import: nested ``variables`` (``{'params': ..., ['codebook': ...]}``, numpy arrays),
    the ``ignored`` keys, the layout ``options`` found and ``notes`` on config values that were assumed."""

    variables: dict
    model_kind: str
    model_config: dict
    ignored: list
    options: dict
    notes: list = dataclasses.field(default_factory=list)


def apply_overrides(kind: str, config: dict, overrides: Optional[Mapping[str, Any]]) -> dict:
    """Set config fields; for ``beit_pretrain`` backbone (ViT) fields may be given without ``backbone.``."""
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for key, value in (overrides or {}).items():
        target, name = config, key
        if "." in key:
            head, name = key.split(".", 1)
            target = config.get(head)
            if not isinstance(target, dict):
                raise ValueError(f"unknown config field {key!r} for a {kind} model")
        elif key not in config and isinstance(config.get("backbone"), dict) and key in config["backbone"]:
            target = config["backbone"]
        if name not in target:
            raise ValueError(f"unknown config field {key!r} for a {kind} model; known: {sorted(target)}")
        target[name] = value
    return config


def unknown_fields(config: Mapping[str, Any]) -> list:
    """Config fields (top level or ``backbone.``) a layout left as None: not in the checkpoint, no safe default."""
    unknown = [k for k, v in config.items() if v is None]
    backbone = config.get("backbone")
    if isinstance(backbone, Mapping):
        unknown += [k for k, v in backbone.items() if v is None]
    return unknown


def infer_config(state_dict: Mapping[str, Any], fmt, hf_config: Optional[dict] = None,
                 options: Optional[dict] = None) -> tuple:
    """``(model_kind, model_config, notes)`` read from a state dict in layout ``fmt`` (``notes`` say what
    had to be assumed, e.g. heads when the checkpoint has no relative position table). Fields the layout cannot
    tell are None (see :func:`unknown_fields`); the config is normalised only when there are none."""
    from beitv2_jax.convert import model_shapes

    layout = get_layout(fmt)
    arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
    ignore = [re.compile(p) for p in layout.ignore]
    arrays = {k: v for k, v in arrays.items() if not any(p.search(k) for p in ignore)}
    notes = []
    opts = dict(layout.detect_options(arrays), **(options or {}))
    kind, config = layout.infer(arrays, opts, hf_config, notes)
    return kind, (config if unknown_fields(config) else model_shapes.normalize_config(kind, config)), notes


def import_state_dict(state_dict: Mapping[str, Any], fmt, *, model_kind: Optional[str] = None,
                      model_config: Optional[dict] = None, overrides: Optional[Mapping[str, Any]] = None,
                      hf_config: Optional[dict] = None, options: Optional[dict] = None,
                      check_shapes: bool = True) -> Converted:
    """PyTorch ``state_dict`` (name → array; torch tensors are accepted too) → our variables.

    ``model_kind``/``model_config`` skip inference; ``overrides`` set config fields after inference (e.g.
    ``{"num_heads": 12}``); ``hf_config`` is a Hugging Face ``config.json`` dict used for what a state dict
    cannot tell (heads, LayerNorm eps, activation). ``check_shapes`` compares every converted array with the
    model's init shapes (``jax.eval_shape``). Raises :class:`ConversionError` listing every problem.
    """
    layout = get_layout(fmt)
    arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
    ignore = [re.compile(p) for p in layout.ignore]
    ignored = [k for k in arrays if any(p.search(k) for p in ignore)]
    arrays = {k: v for k, v in arrays.items() if k not in set(ignored)}
    opts = dict(layout.detect_options(arrays))
    opts.update(options or {})
    notes = []
    if model_config is None:
        model_kind, model_config = layout.infer(arrays, opts, hf_config, notes)
    elif model_kind is None:
        raise ValueError("model_kind is required with model_config")
    from beitv2_jax.convert import model_shapes

    what = f"cannot import the {layout.name!r} state dict as a {model_kind} model"
    model_config = apply_overrides(model_kind, model_config, overrides)
    unknown = unknown_fields(model_config)
    if unknown:  # the layout could not read them and would not guess (see the notes): the caller must give them
        raise ConversionError(what, problems=[n for n in notes if n.split(" ", 1)[0] in unknown] or [
            f"{', '.join(unknown)}: not stored in the checkpoint"], hint="give them as overrides (CLI: --set "
                              f"{unknown[0]}=VALUE)")
    model_config = model_shapes.normalize_config(model_kind, model_config)
    rules = layout.rules(model_kind, model_config, opts)

    wanted, optional = [], set()
    for rule in rules:
        if rule.derived:
            optional.update(rule.torch)
        else:
            wanted.extend(rule.torch)
    wanted_set = set(wanted)
    missing = [k for k in wanted if k not in arrays]
    unexpected = [k for k in arrays if k not in wanted_set and k not in optional]

    flat, problems = {}, []
    for rule in rules:
        present = [k for k in rule.torch if k in arrays]
        if rule.derived:
            if not present:
                continue
            if len(present) < len(rule.torch):
                missing.extend(k for k in rule.torch if k not in arrays)
                continue
        elif len(present) < len(rule.torch):
            continue  # already reported as missing
        inputs = [_as_float32(arrays[k]) for k in rule.torch]
        try:
            outputs = rule.transform.to_flax(*inputs)
        except Exception as e:  # noqa: BLE001 - any failure is reported with the keys involved
            problems.append(f"{_describe(rule.torch, arrays)} → {', '.join(rule.flax) or '(check)'}: "
                            f"{rule.transform.name} failed: {e}")
            continue
        if rule.derived:
            continue
        for path, value in zip(rule.flax, outputs):
            flat[path] = np.asarray(value)

    expected = None
    if check_shapes:
        try:
            expected = model_shapes.param_shapes(model_kind, model_config)
        except Exception as e:  # noqa: BLE001 - an impossible config is one more problem to report
            problems.append(f"cannot build the {model_kind} model from the config: {e}")
    if expected is not None:
        source = {p: rule.torch for rule in rules if not rule.derived for p in rule.flax}
        for path, value in flat.items():
            if path not in expected:
                problems.append(f"{path} (from {', '.join(source[path])}) is not a parameter of the model")
            elif tuple(value.shape) != tuple(expected[path].shape):
                problems.append(f"shape mismatch: {_describe(source[path], arrays)} → {path} "
                                f"{tuple(value.shape)}, the model expects {tuple(expected[path].shape)}")
            else:
                flat[path] = value.astype(expected[path].dtype, copy=False)
        left = [p for p in expected if p not in source]  # no rule at all: the layout cannot fill them
        if left:
            problems.append("model parameters with no source in the state dict: " + ", ".join(
                summarize_keys(left)))
    if missing or unexpected or problems:
        raise ConversionError(what, missing, unexpected, problems, hint=_config_hint(model_kind, model_config))
    overridden = {k.rsplit(".", 1)[-1] for k in (overrides or {})}
    notes = [n for n in notes if n.split(" ", 1)[0] not in overridden]
    return Converted(unflatten_variables(flat), model_kind, model_config, ignored, opts, notes)


def _config_hint(kind: str, config: dict) -> str:
    shown = {k: v for k, v in config.items() if k != "backbone"}
    if "backbone" in config:
        shown["backbone"] = config["backbone"]
    return f"model config used: {shown}; fix with overrides (CLI: --set key=value) or another --format"


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


# ----------------------------------------------------------------------------------------------- export
def export_variables(variables: Mapping[str, Any], fmt, model_kind: str, model_config: dict, *,
                     options: Optional[dict] = None) -> dict:
    """Our variables → PyTorch state dict (``{key: np.ndarray}`` in the layout's key order)."""
    from beitv2_jax.convert import model_shapes

    layout = get_layout(fmt)
    model_config = model_shapes.normalize_config(model_kind, model_config)
    flat = flatten_variables(variables)
    opts = dict(layout.default_options(model_kind, model_config))
    opts.update(options or {})
    rules = layout.rules(model_kind, model_config, opts)
    owned = [p for rule in rules if not rule.derived for p in rule.flax]
    needed = owned + [p for rule in rules if rule.derived for p in rule.flax]
    missing = list(dict.fromkeys(p for p in needed if p not in flat))
    unexpected = [p for p in flat if p not in set(owned)]
    if missing or unexpected:
        raise ConversionError(f"cannot export the {model_kind} variables to {layout.name!r}", missing, unexpected,
                              hint=_config_hint(model_kind, model_config))
    out = {}
    for rule in rules:
        outputs = rule.transform.to_torch(*[flat[p] for p in rule.flax])
        for key, value in zip(rule.torch, outputs):
            out[key] = np.ascontiguousarray(value)
    return out
