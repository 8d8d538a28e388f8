"""Transparent huge pages for XLA:CPU's host buffers (a restart of the command with one glibc tunable).

Each execution of a compiled step on the CPU backend allocates its temporaries as one large block (the demo's BEiT v2
step at batch 128: ~520 MiB). glibc serves blocks that large with a fresh ``mmap`` and returns them with ``munmap``,
so every step faults in all of its pages again at 4 KiB each (≈ 130,000 minor faults per step, a fifth of the
process's CPU time spent in the kernel). With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc ≥ 2.35) malloc
``madvise``s its blocks for transparent huge pages, which on kernels whose THP mode is ``madvise`` (the Debian/Ubuntu
default) turns those faults into 2 MiB ones: the demo's pretraining step took 367–413 ms instead of 439–475 ms on 2
cores (docs/benchmarks.md §2.1).

glibc reads its tunables once, at process start, so ``python -m beitv2_jax.main`` / ``beitv2_jax.bench`` re-execute
themselves (same PID, arguments and file descriptors) with the tunable added when it is missing and would take
effect. ``BEITV2_JAX_HUGEPAGES=0`` turns this off; a ``GLIBC_TUNABLES`` that already sets ``glibc.malloc.hugetlb``
is left as it is.
"""
from __future__ import annotations

import os
import platform
import re
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "BEITV2_JAX_HUGEPAGES"  # "0": never restart
_MARK = "BEITV2_JAX_HUGEPAGES_REEXEC"  # set in the restarted process: restart at most once
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_ENABLED) -> Optional[str]:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), None where unknown."""
    try:
        with open(path) as f:
            match = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return match.group(1) if match else None


def glibc_version() -> Optional[tuple[int, int]]:
    """(major, minor) of the C library when it is glibc, else None."""
    name, version = platform.libc_ver()
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if name == "glibc" and match else None


def tuned_environment(environ: Mapping[str, str], mode: Optional[str],
                      glibc: Optional[tuple[int, int]]) -> Optional[dict[str, str]]:
    """The environment to restart with, or None when a restart would change nothing (THP not in ``madvise`` mode,
    not glibc ≥ 2.35, already restarted or tuned, or turned off with ``BEITV2_JAX_HUGEPAGES=0``)."""
    if mode != "madvise" or glibc is None or glibc < MIN_GLIBC:
        return None
    if environ.get(OPT_OUT) == "0" or environ.get(_MARK) or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return None
    tunables = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    return {**environ, "GLIBC_TUNABLES": tunables, _MARK: "1"}


def restart_with_huge_pages() -> None:
    """Replace this process by the same command line with ``glibc.malloc.hugetlb=1`` when that would take effect
    (see ``tuned_environment``); returns (doing nothing) otherwise or if the restart fails. Call it first thing in
    a ``__main__``, before output is written or threads start."""
    if not sys.platform.startswith("linux"):
        return
    env = tuned_environment(os.environ, thp_mode(), glibc_version())
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:
        return
