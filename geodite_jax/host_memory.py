"""glibc's allocator told to keep freed memory in the process, applied at import before JAX starts its threads.

XLA:CPU allocates each call's temporaries afresh and frees them when the call ends. glibc serves blocks that
large with ``mmap`` (or, from the per-thread arenas of JAX's worker threads, always with ``mmap``) and returns
them to the kernel on ``free``, so every call faults its temporaries in again, 4 KiB at a time: about
150,000 minor page faults (600 MB) per NaCl-216 E+F+S call of Geodite-MP. On a 2-vCPU AMD EPYC (2026-12-07,
separate processes alternated) that call took 0.45-0.54 s with glibc's defaults and 0.29-0.31 s with the
settings below; Cu-256 (84,000 faults, 1.04 against 1.05 s) and Si-1000 (190,000 faults, 2.43-2.57 against
2.59-2.86 s, peak RSS 1.80 against 1.88-1.91 GB), whose chunk loops reuse smaller buffers, gained little.
Three ``mallopt`` settings make glibc behave like a caching allocator (as XLA's own does on GPUs): one arena,
so worker threads allocate from the main heap; no ``mmap`` below 2 GiB; the heap trimmed only when more than
2 GiB at its top are free. The numbers computed are the same.

The cost: memory freed by a call stays in the process for the next one (up to the call's own peak, which
the settings do not raise), and all threads share one arena lock. ``GEODITE_MALLOC=0`` opts out.
Nothing is changed on a libc other than glibc, or when a GPU plugin of JAX is installed and ``JAX_PLATFORMS``
does not name the CPU alone (device buffers do not come from ``malloc``; host threads keep their arenas).
The one-arena setting binds only threads that have not yet allocated, so it is applied at import, first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
#: The largest value ``mallopt`` takes (a C ``int``): blocks of 2 GiB and more still come from ``mmap``.
KEEP_BYTES = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def _gpu_jax() -> bool:
    """Whether JAX may run on a GPU here: a CUDA/ROCm plugin is installed and ``JAX_PLATFORMS`` is not 'cpu'."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    # The plugins install top-level packages jax_cuda12_plugin, jax_rocm60_plugin, ... (a glob, not a metadata scan).
    return any(glob.glob(os.path.join(entry, pattern)) for entry in sys.path if entry
               for pattern in ("jax_cuda*", "jax_rocm*"))


def keep_freed_memory() -> bool:
    """Apply the settings above where allowed; True if they were applied."""
    if os.environ.get("GEODITE_MALLOC", "1") == "0" or _gpu_jax():
        return False
    libc = _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, KEEP_BYTES)))


APPLIED = keep_freed_memory()
