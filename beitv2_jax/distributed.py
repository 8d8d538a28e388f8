"""Multi-process start-up: ``jax.distributed.initialize`` when the environment or the flags call for it.

* explicit: ``--coordinator_address HOST:PORT --num_processes N --process_id I`` (any cluster, or several
  processes on one machine; on CPU the gloo collectives are switched on);
* Cloud TPU VMs (detected with JAX's own check; GKE TPU pods by ``TPU_WORKER_HOSTNAMES``) and SLURM jobs
  with more than one task: ``initialize()`` with no arguments reads the TPU metadata / ``SLURM_*`` variables;
* ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` in the environment.
Single-process runs initialise nothing.
"""
from __future__ import annotations

import os
from typing import Optional

import jax


def _on_cloud_tpu_vm() -> bool:
    """JAX's own test for a Cloud TPU VM (where ``initialize()`` reads the worker layout from the metadata
    server); False when that private helper is unavailable."""
    try:
        from jax._src.clusters import cloud_tpu_cluster

        return bool(cloud_tpu_cluster.running_in_cloud_tpu_vm)
    except (ImportError, AttributeError):
        return False


def wanted_from_environment(env=os.environ, on_tpu_vm=None) -> bool:
    """True when a launcher started us as one of several processes (or on a TPU VM, where one process per
    host joins the slice)."""
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):  # GKE TPU pods
        return True
    if _on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm:
        return True
    return bool(env.get("JAX_COORDINATOR_ADDRESS"))


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, env=os.environ) -> bool:
    """Initialise the multi-process runtime if asked for; returns True when it did."""
    if coordinator_address is None and env.get("JAX_COORDINATOR_ADDRESS"):
        coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
        num_processes = num_processes or int(env.get("JAX_NUM_PROCESSES", "0")) or None
        process_id = process_id if process_id is not None else (
            int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
    if coordinator_address is None and not wanted_from_environment(env):
        return False
    # Cross-process collectives of the CPU backend (harmless when the computation runs on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    return True
