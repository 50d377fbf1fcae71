"""Compiling C++ XLA FFI handler libraries against jaxlib's headers, cached on disk (atomic, per source)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import jax


def build_ffi_library(name: str, source: str, flags: list[str], what: str, *, libs: tuple[str, ...] = (),
                      compiler: str = "g++", key_extra: str = "", cache: str | os.PathLike | None = None) -> Path:
    """Path of ``<cache>/<name>_<key>.so`` compiled from ``source`` (``flags`` before it, ``libs`` after), built
    only if absent.

    The key hashes the source, the jaxlib version and ``key_extra``; the cache is ``cache``,
    ``$GEODITE_CACHE`` or ``<tmp>/geodite_jax``. Concurrent builders write their own temporary file and
    rename it into place. A failed compile raises ``RuntimeError`` naming ``what`` and the command.
    """
    import jaxlib

    key = hashlib.sha256((source + jaxlib.__version__ + key_extra).encode()).hexdigest()[:16]
    cache = Path(cache or os.environ.get("GEODITE_CACHE", Path(tempfile.gettempdir()) / "geodite_jax"))
    target = cache / f"{name}_{key}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"{name}_{key}.cc"
    src.write_text(source)
    tmp = cache / f"{target.name}.{os.getpid()}.tmp"
    cmd = [compiler, *flags, "-shared", "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}", str(src),
           "-o", str(tmp), *libs]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"compiling {what} failed ({' '.join(cmd)}):\n{result.stderr[-2000:]}")
    os.replace(tmp, target)
    return target
