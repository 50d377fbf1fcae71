"""Device sharding of the data-parallel step: a one-axis ``Mesh("data")``, replicated pytrees, global batches
``[D, ...]`` sharded over the mesh (one process or several), and host copies of replicated results."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(devices: list | None = None) -> Mesh:
    """A one-axis mesh ``("data",)`` over ``devices`` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def host_copy(tree: Any) -> Any:
    """NumPy copy of a replicated pytree from this process's first device (works with several processes,
    where a global array is not fully addressable by any one of them)."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree on every device of ``mesh`` (the step's outputs live there too: same types, no recompile)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def put_batch(batch: Any, mesh: Mesh, dtype: Any) -> Any:
    """Host batch ``[D, ...]`` (numpy) -> global arrays sharded over the mesh's data axis; floats to ``dtype``.

    With several processes, each passes the same global batch and contributes the rows of its own devices.
    """
    sharding = NamedSharding(mesh, P("data"))

    def convert(x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            x = x.astype(dtype)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        per = x.shape[0] // jax.process_count()
        local = x[jax.process_index() * per:(jax.process_index() + 1) * per]
        return jax.make_array_from_process_local_data(sharding, local, x.shape)

    return jax.tree_util.tree_map(convert, batch)
