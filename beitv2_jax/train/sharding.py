"""Device mesh from the config and shardings for batches and replicated state.

``config.mesh`` maps axis names to sizes (``{'data': -1, 'fsdp': 1, 'tensor': 1}``; −1 = all remaining devices).
Batches are split over ``data × fsdp``; this module places the state replicated, and the scale-out work maps
the models' logical axis names onto ``fsdp``/``tensor`` through ``logical_axis_rules``.

The device grid is topology-aware (``jax.experimental.mesh_utils.create_device_mesh``: on TPU, neighbouring mesh
positions are neighbouring chips of the torus). ``config.mesh.dcn_data`` > 1 spreads the ``data`` axis over that many
TPU slices (or, where devices have no ``slice_index``, process groups) joined by the data-centre network:
``data``/``fsdp``/``tensor`` then describe one slice, the mesh's ``data`` axis has ``dcn_data × data`` positions
(slice-major, ``create_hybrid_device_mesh``), and only the gradient all-reduce of ``data`` crosses slices.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DCN_KEY = "dcn_data"  # config.mesh key: number of slices (or process groups) the data axis spans over DCN


def dcn_size(mesh_config: Mapping[str, int] | None) -> int:
    """``config.mesh.dcn_data`` (1 when absent): how many slices the ``data`` axis spans."""
    value = dict(mesh_config or {}).get(DCN_KEY, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.mesh.{DCN_KEY} must be an integer >= 1 (the number of slices), got {value!r}")
    return value


def slice_mesh_shape(mesh_config: Mapping[str, int] | None, num_devices: int) -> tuple[int, ...]:
    """Resolve ``{'data': -1, ...}`` against the devices of one slice (``num_devices / dcn_data``) → sizes in
    ``MESH_AXES`` order."""
    mesh_config = dict(mesh_config or {"data": -1})
    unknown = set(mesh_config) - set(MESH_AXES) - {DCN_KEY}
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; allowed: {MESH_AXES + (DCN_KEY,)}")
    slices = dcn_size(mesh_config)
    if num_devices % slices:
        raise ValueError(f"config.mesh.{DCN_KEY}={slices} does not divide the {num_devices} devices")
    num_devices //= slices
    sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("config.mesh: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    where = f" per slice (config.mesh.{DCN_KEY}={slices})" if slices > 1 else ""
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh {mesh_config} does not divide the {num_devices} devices{where}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but {num_devices} are available{where}")
    return tuple(sizes)


def mesh_shape(mesh_config: Mapping[str, int] | None, num_devices: int) -> tuple[int, ...]:
    """Sizes of the whole mesh in ``MESH_AXES`` order (``data`` includes the ``dcn_data`` slices)."""
    sizes = slice_mesh_shape(mesh_config, num_devices)
    return (sizes[0] * dcn_size(mesh_config),) + sizes[1:]


def device_grid(mesh_config: Mapping[str, int] | None, devices) -> np.ndarray:
    """The devices arranged as ``mesh_shape(...)`` (an object array in ``MESH_AXES`` order), topology-aware.

    One slice: ``mesh_utils.create_device_mesh`` (a TPU torus is walked so that mesh neighbours are chip
    neighbours; other platforms keep ``devices``' order), falling back to a plain reshape with a warning when
    the shape cannot follow the torus. ``dcn_data`` > 1: ``mesh_utils.create_hybrid_device_mesh`` with the slices
    (``device.slice_index``; processes where devices have none) outermost on ``data``.
    """
    devices = list(devices)
    per_slice = slice_mesh_shape(mesh_config, len(devices))
    slices = dcn_size(mesh_config)
    if slices == 1:
        found = len({getattr(d, "slice_index", 0) for d in devices})
        if found > 1:
            raise ValueError(f"the devices belong to {found} slices: set config.mesh.{DCN_KEY}={found}")
        try:
            return mesh_utils.create_device_mesh(per_slice, devices)
        except (ValueError, NotImplementedError, AssertionError) as e:
            logging.warning("mesh %s does not follow the device topology (%s); using the device order", per_slice, e)
            return np.asarray(devices, dtype=object).reshape(per_slice)
    by_process = not hasattr(devices[0], "slice_index")
    granule = "process_index" if by_process else "slice_index"
    found = len({getattr(d, granule) for d in devices})
    if found != slices:
        raise ValueError(f"config.mesh.{DCN_KEY}={slices} but the devices belong to {found} "
                         f"{'processes' if by_process else 'slices'}")
    return mesh_utils.create_hybrid_device_mesh(per_slice, (slices, 1, 1), devices, process_is_granule=by_process)


def make_mesh(mesh_config: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """The ``MESH_AXES`` mesh of ``config.mesh`` over ``devices`` (default: all devices), see ``device_grid``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(device_grid(mesh_config, devices), MESH_AXES)


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
