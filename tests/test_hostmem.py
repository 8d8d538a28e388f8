"""The restart with transparent huge pages for XLA:CPU's host buffers (beitv2_jax/hostmem.py)."""
import os
import subprocess
import sys

import pytest

from beitv2_jax import hostmem


def test_tuned_environment_adds_the_tunable_only_where_it_takes_effect():
    env = hostmem.tuned_environment({"PATH": "/bin"}, "madvise", (2, 36))
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env["PATH"] == "/bin"
    kept = hostmem.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", (2, 35))
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hostmem.tuned_environment({}, "always", (2, 36)) is None  # every mapping is huge already
    assert hostmem.tuned_environment({}, "never", (2, 36)) is None
    assert hostmem.tuned_environment({}, None, (2, 36)) is None  # no THP information (not Linux, container)
    assert hostmem.tuned_environment({}, "madvise", (2, 34)) is None  # glibc without the tunable
    assert hostmem.tuned_environment({}, "madvise", None) is None  # musl and others
    assert hostmem.tuned_environment({"BEITV2_JAX_HUGEPAGES": "0"}, "madvise", (2, 36)) is None  # turned off
    assert hostmem.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36)) is None
    assert hostmem.tuned_environment(env, "madvise", (2, 36)) is None  # restarted once, not again


def test_thp_mode_reads_the_bracketed_setting(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(str(path)) == "madvise"
    assert hostmem.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(hostmem.tuned_environment({}, hostmem.thp_mode(), hostmem.glibc_version()) is None,
                    reason="this machine's THP mode or C library gives the restart nothing to do")
def test_the_process_restarts_once_with_the_tunable_and_its_arguments():
    code = ("import os, sys; from beitv2_jax import hostmem; print('start', flush=True); "
            "hostmem.restart_with_huge_pages(); print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", code, "a b", "--x=1"], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split("\n")
    assert out[0] == "start" and out[1] == "start"  # the command ran twice (same process, re-executed) ...
    assert out[2].endswith("glibc.malloc.hugetlb=1 ['a b', '--x=1']") and len(out) == 4  # ... and only twice
    off = subprocess.run([sys.executable, "-c", code], env={**env, hostmem.OPT_OUT: "0"}, capture_output=True,
                         text=True, check=True, timeout=60).stdout.split("\n")
    assert off[0] == "start" and off[1].split()[1] == "None"
