"""Training checkpoints: the full optimiser state (orbax) plus the host-side position in the run (JSON).

A checkpoint directory is written next to its final place and renamed into it, so a crash while saving
leaves the previous checkpoint intact; a reader never sees a half-written one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..files import atomic_directory, quiet_failed_orbax_reads, read_json_object, recover_directory

CHECKPOINT_VERSION = 1
_STATE_DIR = "state"
_META_FILE = "trainer.json"


def _leaves_dict(tree: Any) -> dict[str, np.ndarray]:
    return {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(tree))}


def save_checkpoint(path: str | os.PathLike, state: Any, meta: dict[str, Any]) -> Path:
    """Write the pytree ``state`` (all leaves, exact) and the JSON-able ``meta`` to ``path`` atomically."""
    import orbax.checkpoint as ocp

    quiet_failed_orbax_reads()
    state = jax.device_get(state)
    with atomic_directory(path) as tmp:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / _STATE_DIR, _leaves_dict(state))
            ckpt.wait_until_finished()
        (tmp / _META_FILE).write_text(json.dumps({"checkpoint_version": CHECKPOINT_VERSION, **meta}, indent=1))
    return Path(path)


def load_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON part of a checkpoint, with a clear error for a missing or damaged one. A save interrupted
    between its renames is recovered first (:func:`recover_directory`)."""
    recover_directory(path)
    meta_file = Path(path) / _META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"no training checkpoint at {path} ({_META_FILE} missing)")
    meta = read_json_object(meta_file)
    if meta.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {meta.get('checkpoint_version')!r}; "
                         f"this geodite_jax reads version {CHECKPOINT_VERSION}")
    return meta


def load_checkpoint(path: str | os.PathLike, like: Any) -> tuple[Any, dict[str, Any]]:
    """Restore a state with the structure, shapes and dtypes of ``like`` (e.g. a freshly initialised state)."""
    import orbax.checkpoint as ocp

    quiet_failed_orbax_reads()
    meta = load_checkpoint_meta(path)
    leaves, treedef = jax.tree_util.tree_flatten(like)
    target = {f"leaf_{i:05d}": np.zeros(np.shape(x), np.asarray(x).dtype) for i, x in enumerate(leaves)}
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(Path(path).absolute() / _STATE_DIR, target)
    except Exception as err:  # orbax raises many types for a damaged or mismatched directory
        raise ValueError(f"cannot restore the training state from {path} (does the config match the run that "
                         f"wrote it?): {type(err).__name__}: {err}") from None
    new = [np.asarray(restored[f"leaf_{i:05d}"]) for i in range(len(leaves))]
    for i, (a, b) in enumerate(zip(new, leaves, strict=True)):
        if a.shape != np.shape(b):
            raise ValueError(f"checkpoint {path}: state leaf {i} has shape {a.shape}, the run needs {np.shape(b)}")
    return jax.tree_util.tree_unflatten(treedef, new), meta
