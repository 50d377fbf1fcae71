"""The allocator settings of geodite_jax.host_memory: freed blocks stay in the process, so a second call's
temporaries are not faulted in again (see the module)."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

# In a fresh process: import geodite_jax, then, in a worker thread as XLA's, allocate 64 MiB, touch every page,
# free it and do it again. Prints whether the settings were applied and the minor faults of the second touch.
PROBE = """
import ctypes, ctypes.util, resource, threading
import geodite_jax
from geodite_jax import host_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size, faults = 64 << 20, []
def work():
    for _ in range(2):
        block = libc.malloc(size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(block, 1, size)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(block)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(host_memory.APPLIED, faults[1])
"""


def _probe(**env: str) -> tuple[bool, int]:
    environ = {k: v for k, v in os.environ.items() if k not in ("GEODITE_MALLOC",)}
    environ.update(env, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def _thp_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            return "[always]" in fh.read()
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux" or not ctypes.util.find_library("c"), reason="glibc settings: Linux only")
def test_freed_memory_is_reused_without_page_faults_unless_opted_out():
    from geodite_jax.host_memory import _glibc

    if _glibc() is None:
        pytest.skip("the C library is not glibc: geodite_jax leaves the allocator as it is")
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    applied, faults = _probe()
    assert applied
    assert faults < pages // 100, f"{faults} page faults re-touching a freed 64 MiB block ({pages} pages)"
    applied, faults = _probe(GEODITE_MALLOC="0")
    assert not applied
    if not _thp_always():  # with 4 KiB pages glibc's defaults fault every page in again (the cost avoided above)
        assert faults > pages // 2, faults
