"""XLA:CPU settings that geodite_jax needs for bounded memory, applied before JAX starts its backend.

XLA:CPU schedules a program for concurrency by default, which keeps many more buffers alive at once:
on Si-1000 (mp preset, E+F+S) the temporary memory is 16.1 KB per edge with that scheduler and 10.7 KB
per edge with the memory-oriented one (``compiled.memory_analysis()``; Si-8000 then evaluates in about
5 GB instead of 7.3 GB). The flag is read from ``XLA_FLAGS`` once, when JAX first initialises its CPU
backend, and per-compilation options do not reach it. So it is added to ``XLA_FLAGS`` at import,
unless the user has set it (either way) or opted out with ``GEODITE_XLA_FLAGS=0``. Importing
geodite_jax after JAX has already run a computation leaves the process as it is.
"""

from __future__ import annotations

import os

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def apply_default_xla_flags() -> bool:
    """Put :data:`SCHEDULER_FLAG` first in ``XLA_FLAGS`` where allowed; True if it was added."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("GEODITE_XLA_FLAGS", "1") == "0" or "xla_cpu_enable_concurrency_optimized_scheduler" in flags:
        return False
    # First, not last: XLA stops reading flags at a malformed token (one without "--"), so an appended flag
    # can be lost where XLA_FLAGS already holds one (as benchmark recipes' "intra_op_parallelism_threads=2").
    os.environ["XLA_FLAGS"] = f"{SCHEDULER_FLAG} {flags}".strip()
    return True


apply_default_xla_flags()
