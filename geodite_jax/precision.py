"""Precision: the one place that maps ``"float32" | "float64"`` to a dtype and switches JAX's 64-bit mode."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

#: Names accepted wherever a precision is chosen (calculator, jax-md, training, CLI).
DTYPE_NAMES = ("float32", "float64")


def enable_float64() -> None:
    """Switch JAX to 64-bit mode (a process-wide setting; float32 arrays stay float32)."""
    jax.config.update("jax_enable_x64", True)


def check_dtype_name(name: str) -> None:
    """``ValueError`` unless ``name`` is one of :data:`DTYPE_NAMES`."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, got {name!r}")


def resolve_dtype(name: str) -> Any:
    """The JAX dtype for ``name``; ``"float64"`` switches the process to 64-bit mode first (float32 leaves it
    as it is, so a float64 run elsewhere in the process is not disturbed)."""
    check_dtype_name(name)
    if name == "float64":
        enable_float64()
        return jnp.float64
    return jnp.float32
