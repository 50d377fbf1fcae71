"""MD checkpoints: everything the next step depends on, in the run's own dtype, so a resumed run is bitwise
the uninterrupted one (integrator state, neighbour list, step, output sizes)."""

from __future__ import annotations

import dataclasses as pydc
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .jaxmd import JaxMDSystem
from .neighbors import GeoditeNeighborList

CHECKPOINT_VERSION = 2  # 2: + neighbour-list state and output sizes (1 still reads)


def save_md_checkpoint(state: Any, neighbors: GeoditeNeighborList, step: int, path: str | os.PathLike,
                       settings: Any, species: np.ndarray, outputs: dict | None = None) -> Path:
    """Write everything the next step depends on to ``path`` (``.npz``) atomically (a temporary file renamed
    over the old one): the integrator state (positions, momenta, forces, thermostat/barostat chains, box,
    RNG key) and the neighbour list (skin-list indices and reference positions, tight capacity and
    occupancy), every array in the run's own dtype, plus the step and ``outputs`` (trajectory and log sizes,
    see :func:`~geodite_jax.simulation.io.output_record`). :func:`load_md_checkpoint` rebuilds exactly this
    state, so a resumed run is bitwise the uninterrupted one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree_util.tree_leaves(state)
    skin = neighbors.skin
    nbr_leaves = jax.tree_util.tree_leaves(skin)
    statics = {f.name: getattr(skin, f.name) for f in pydc.fields(skin) if f.metadata.get("static")
               and isinstance(getattr(skin, f.name), (int, float, type(None)))}
    meta = {"version": CHECKPOINT_VERSION, "step": step, "settings": pydc.asdict(settings),
            "species": np.asarray(species).tolist(), "n_leaves": len(leaves),
            "neighbors": {"type": type(skin).__name__, "n_leaves": len(nbr_leaves), "static": statics,
                          "capacity": int(neighbors.capacity)},
            "outputs": outputs or {}}
    arrays = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)}
    arrays.update({f"nbr_{i}": np.asarray(x) for i, x in enumerate(nbr_leaves)})
    arrays["tight_count"] = np.asarray(neighbors.tight_count)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, meta=np.asarray(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_md_checkpoint(path: str | os.PathLike, settings: Any, system: JaxMDSystem, template: Any,
                       box_of: Callable[[Any], Any]) -> tuple[Any, GeoditeNeighborList, int, dict | None]:
    """``(state, neighbors, step, outputs)`` saved by :func:`save_md_checkpoint`; checks they fit this run
    (``settings``, ``system``, and ``template``, an integrator state of this ensemble whose pytree the saved
    leaves must fill; ``box_of(state)`` reads an integrator state's box).

    A version-1 checkpoint (no neighbour list stored) gets a fresh list: the run continues correctly but
    not bitwise as the uninterrupted one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MD checkpoint not found: {path}")
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            arrays = [data[f"leaf_{i}"] for i in range(meta["n_leaves"])]
            nbr_meta = meta.get("neighbors")
            nbr_arrays = [data[f"nbr_{i}"] for i in range(nbr_meta["n_leaves"])] if nbr_meta else None
            tight_count = data["tight_count"] if nbr_meta else None
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path} is not a readable MD checkpoint: {err}") from None
    if meta.get("version") not in (1, CHECKPOINT_VERSION):
        raise ValueError(f"{path}: checkpoint version {meta.get('version')!r}, expected {CHECKPOINT_VERSION}")
    if meta["species"] != system.species.tolist():
        raise ValueError(f"{path} holds a different structure ({len(meta['species'])} atoms) than this run")
    if meta["settings"] != pydc.asdict(settings):
        diff = {k: (v, pydc.asdict(settings)[k]) for k, v in meta["settings"].items()
                if pydc.asdict(settings).get(k) != v}
        raise ValueError(f"{path} was written with other MD settings: (saved, now) = {diff}")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(leaves) != len(arrays):
        raise ValueError(f"{path} does not match this ensemble's state ({len(arrays)} vs {len(leaves)} arrays)")
    for a, t in zip(arrays, leaves, strict=True):
        if a.dtype != np.dtype(t.dtype):
            raise ValueError(f"{path} was written in {a.dtype}, this run is {np.dtype(t.dtype)}: use the "
                             "checkpoint's --dtype")
    state = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(a, t.dtype).reshape(t.shape) for a, t in zip(arrays, leaves, strict=True)])
    box = box_of(state)
    if nbr_meta is None:
        nbr = system.allocate(state.position, box)
    else:
        nbr = _restore_neighbors(system, path, state, box, nbr_meta, nbr_arrays, tight_count)
    return state, nbr, int(meta["step"]), meta.get("outputs") or None

def _restore_neighbors(system: JaxMDSystem, path: Path, state: Any, box: Any, nbr_meta: dict,
                   arrays: list[np.ndarray], tight_count: np.ndarray) -> GeoditeNeighborList:
    """The saved neighbour list, its arrays set into a freshly allocated one of the same kind and statics."""
    template = system.allocate(state.position, box)
    skin = template.skin
    if type(skin).__name__ != nbr_meta["type"]:
        raise ValueError(f"{path} holds a {nbr_meta['type']} neighbour list, this run uses {type(skin).__name__}")
    skin = skin.set(**nbr_meta["static"])
    leaves, treedef = jax.tree_util.tree_flatten(skin)
    if len(leaves) != len(arrays):
        raise ValueError(f"{path} does not match this run's neighbour list ({len(arrays)} vs {len(leaves)} arrays)")
    skin = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(a, jnp.asarray(t).dtype) for a, t in zip(arrays, leaves, strict=True)])
    return template.set(skin=skin, tight_count=jnp.asarray(tight_count, template.tight_count.dtype),
                        capacity=int(nbr_meta["capacity"]))
