"""Device mesh from the config and shardings for batches and replicated state.

``config.mesh`` maps axis names to sizes (``{'data': -1, 'fsdp': 1, 'tensor': 1}``; −1 = all remaining devices).
Batches are split over ``data × fsdp``; this module places the state replicated, and the scale-out work maps
the models' logical axis names onto ``fsdp``/``tensor`` through ``logical_axis_rules``.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: Mapping[str, int] | None, num_devices: int) -> tuple[int, ...]:
    """Resolve ``{'data': -1, ...}`` against ``num_devices`` → sizes in ``MESH_AXES`` order."""
    mesh_config = dict(mesh_config or {"data": -1})
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}")
    sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("config.mesh: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh {mesh_config} does not divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int] | None = None, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over ``data × fsdp``; other dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def host_copy(tree):
    """Every leaf as a numpy array holding its whole value, on every process (for exports and best-model saves).

    A leaf split over the devices of several processes (fsdp / tensor parallel) is first resharded to replicated
    with ``multihost_utils.process_allgather(tiled=True)``, one leaf at a time, so the extra device memory is one
    copy of the largest leaf (BEiT v2 ViT-L: the 1024×8192 LM head, 32 MiB in fp32); every host then holds the
    whole tree (that model in fp32: 1.35 GB). Leaves that are replicated or local to this process are copied
    without communication. When a leaf spans processes this is a collective: every process must call it with the
    same tree, in the same order. One code path for 1 and N processes.
    """
    from jax.experimental import multihost_utils

    def leaf(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(leaf, tree)


def to_global_batch(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch (this process's rows) → global ``jax.Array``s sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


# Logical parameter axes (set in models/vit.py via nn.with_logical_partitioning) → mesh axes.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("embed", "fsdp"),  # the model width: parameters split over fsdp (ZeRO-3 style)
    ("mlp", "tensor"),  # MLP hidden units: tensor parallel
    ("heads", "tensor"),  # attention heads: tensor parallel
    ("kv", None),  # per-head dim stays whole
    ("vocab", "tensor"),  # LM / classification head outputs
)


def logical_axis_rules(config) -> tuple:
    """``config.logical_axis_rules`` (list of (logical, mesh axis or None)) or the defaults."""
    rules = config.get("logical_axis_rules") if config is not None else None
    if not rules:
        return DEFAULT_LOGICAL_AXIS_RULES
    return tuple((str(a), None if b in (None, "", "none") else b) for a, b in rules)


def param_shardings(boxed_params, mesh: Mesh, rules=DEFAULT_LOGICAL_AXIS_RULES):
    """NamedShardings for a parameter tree whose leaves carry logical names (``nn.Partitioned`` boxes, e.g. the
    output of ``jax.eval_shape(model.init, ...)``); the result has the structure of the *unboxed* tree.
    Leaves without names are replicated."""
    import flax.linen as nn

    specs = nn.get_partition_spec(boxed_params)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def state_shardings(abstract_state, params_sharding, tx, mesh: Mesh):
    """Shardings for a whole ``TrainState``: params as given, optimizer moments like their parameters
    (``optax.tree_map_params``), everything else (step, codebook, counters, rng) replicated."""
    import optax

    rep = replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params_sharding,
                                transform_non_params=lambda _: rep,
                                is_leaf=lambda x: isinstance(x, NamedSharding))
    return abstract_state.replace(
        step=rep, params=params_sharding, opt_state=opt, model_state=jax.tree.map(lambda _: rep,
                                                                                  abstract_state.model_state),
        extra=jax.tree.map(lambda _: rep, abstract_state.extra), rng=rep)


def check_divisible(abstract_params, shardings) -> None:
    """Clear error when a sharded dimension does not divide by its mesh axes (instead of an XLA failure)."""
    flat_p = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sh in zip(flat_p, flat_s):
        for dim, axes in zip(leaf.shape, tuple(sh.spec) + (None,) * (len(leaf.shape) - len(sh.spec))):
            if axes is None:
                continue
            size = math.prod(sh.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            if dim % size:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ValueError(f"parameter {name} dim {dim} does not divide by mesh axes {axes} (size {size}); "
                                 f"change config.mesh or config.logical_axis_rules")
