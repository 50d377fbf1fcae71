"""Preprocessed on-disk dataset: frames, labels and neighbour lists as sharded, memory-mapped ``.npy`` arrays.

The neighbour lists for one cutoff are computed once (``geodite_jax.graph.atoms_to_graph``, so a stored graph
is exactly what the calculator would build) and epochs only slice arrays. Layout of a store directory::

    dataset.json                 format version, cutoff, counts, shards, per-frame groups and ids, source, stats
    shard_00000/
        numbers.npy     [A] uint8        positions.npy [A, 3] float64   forces.npy [A, 3] float64 (0 if unlabelled)
        atom_offsets.npy [F+1] int64     edge_offsets.npy [F+1] int64
        cell.npy [F, 3, 3]  pbc.npy [F, 3] bool  energy.npy [F]  stress.npy [F, 3, 3] (eV/Å³, ASE sign)
        has_energy.npy / has_forces.npy / has_stress.npy [F] bool
        senders.npy / receivers.npy [E] (frame-local atom indices, sorted by receiver)  shifts.npy [E, 3] int

A is the shard's atom count, F its frame count, E its edge count. Integer arrays use the smallest dtype
that holds them. Frames' ``info`` extras are not stored.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jraph
import numpy as np

from ..elements import MAX_Z
from ..files import atomic_directory
from .frames import Frame
from .shards import build_shard, with_graphs
from .stats import DatasetStats, compute_stats

FORMAT_VERSION = 1
META_FILE = "dataset.json"
_PER_FRAME = ("atom_offsets", "edge_offsets", "cell", "pbc", "energy", "stress", "has_energy", "has_forces",
              "has_stress")
_PER_ATOM = ("numbers", "positions", "forces")
_PER_EDGE = ("senders", "receivers", "shifts")
_ARRAYS = _PER_FRAME + _PER_ATOM + _PER_EDGE


class GraphDataset:
    """Frames with neighbour lists at one cutoff, in memory or memory-mapped from a store directory.

    Views (:meth:`subset`) share the arrays. Index ``i`` always refers to this view's ``i``-th frame.
    """

    def __init__(self, shards: list[dict[str, np.ndarray]], shard_of: np.ndarray, local: np.ndarray,
                 groups: np.ndarray, ids: np.ndarray, cutoff: float, num_elements: int, *, source: str = "",
                 path: Path | None = None, stats: DatasetStats | None = None) -> None:
        self._shards, self._shard_of, self._local = shards, np.asarray(shard_of), np.asarray(local)
        self.groups, self.ids = np.asarray(groups, dtype=str), np.asarray(ids, dtype=str)
        self.cutoff, self.num_elements, self.source, self.path = float(cutoff), int(num_elements), source, path
        self._stats = stats
        n_atoms, n_edges = np.zeros(len(self._local), np.int64), np.zeros(len(self._local), np.int64)
        for s, shard in enumerate(shards):
            sel = self._shard_of == s
            loc = self._local[sel]
            n_atoms[sel] = np.diff(shard["atom_offsets"])[loc]
            n_edges[sel] = np.diff(shard["edge_offsets"])[loc]
        self.n_atoms, self.n_edges = n_atoms, n_edges  # [F] each

    # --- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_frames(cls, frames: Iterable[Frame], cutoff: float, num_elements: int = 100,
                    on_error: str = "raise") -> GraphDataset:
        """In-memory dataset (small sets, tests, EMT): neighbour lists computed now."""
        items = list(with_graphs(frames, cutoff, num_elements, on_error))
        if not items:
            raise ValueError("no frames to build a dataset from")
        shard = build_shard(items)
        n = len(items)
        return cls([shard], np.zeros(n, np.int32), np.arange(n), [f.group for f, _ in items],
                   [f.id for f, _ in items], cutoff, num_elements, source="memory")

    @classmethod
    def open(cls, path: str | Path, mmap: bool = True) -> GraphDataset:
        """Open a store written by :func:`preprocess` (arrays memory-mapped read-only if ``mmap``)."""
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"not a preprocessed dataset (no {META_FILE}): {path}")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: dataset format version {meta.get('format_version')}, this code reads "
                             f"{FORMAT_VERSION}; preprocess the data again")
        shards, shard_of, local = [], [], []
        for s, info in enumerate(meta["shards"]):
            folder = path / info["name"]
            shards.append({name: np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None)
                           for name in _ARRAYS})
            shard_of.append(np.full(info["n_frames"], s, np.int32))
            local.append(np.arange(info["n_frames"]))
        stats = DatasetStats.from_dict(meta["stats"]) if meta.get("stats") else None
        return cls(shards, np.concatenate(shard_of), np.concatenate(local), meta["groups"], meta["ids"],
                   meta["cutoff"], meta["num_elements"], source=meta.get("source", ""), path=path, stats=stats)

    def subset(self, indices: Sequence[int] | np.ndarray) -> GraphDataset:
        """A view on frames ``indices`` of this dataset (arrays shared, nothing copied)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise ValueError(f"subset indices out of range for a dataset of {len(self)} frames")
        return GraphDataset(self._shards, self._shard_of[idx], self._local[idx], self.groups[idx], self.ids[idx],
                            self.cutoff, self.num_elements, source=self.source, path=self.path)

    # --- access -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._local)

    def __repr__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return (f"GraphDataset({len(self)} frames, {int(self.n_atoms.sum())} atoms, {int(self.n_edges.sum())} "
                f"edges, cutoff {self.cutoff} Å{where})")

    def require_cutoff(self, cutoff: float) -> None:
        """Raise ``ValueError`` unless the stored neighbour lists were built for ``cutoff`` (Å)."""
        if abs(self.cutoff - float(cutoff)) > 1e-9:
            where = f" at {self.path}" if self.path else ""
            raise ValueError(f"dataset{where} holds neighbour lists for cutoff {self.cutoff} Å but the model needs "
                             f"{float(cutoff)} Å; preprocess the data again with cutoff={float(cutoff)}")

    def _locate(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"frame {i} out of range for a dataset of {len(self)} frames")
        return self._shards[int(self._shard_of[i])], int(self._local[i])

    def graph(self, i: int) -> jraph.GraphsTuple:
        """Frame ``i`` as one unpadded graph, identical to ``atoms_to_graph(..., dtype=np.float64)``."""
        shard, j = self._locate(i)
        a0, a1 = shard["atom_offsets"][j:j + 2]
        e0, e1 = shard["edge_offsets"][j:j + 2]
        pbc = np.asarray(shard["pbc"][j])
        cell = np.array(shard["cell"][j], np.float64) if pbc.any() else np.zeros((3, 3))
        return jraph.GraphsTuple(
            nodes={"positions": np.array(shard["positions"][a0:a1], np.float64),
                   "species": np.array(shard["numbers"][a0:a1], np.int32)},
            edges={"shifts": np.array(shard["shifts"][e0:e1], np.float64)},
            globals={"cell": cell[None]},
            senders=np.array(shard["senders"][e0:e1], np.int32),
            receivers=np.array(shard["receivers"][e0:e1], np.int32),
            n_node=np.array([a1 - a0], np.int32), n_edge=np.array([e1 - e0], np.int32))

    def labels(self, i: int) -> dict[str, Any]:
        """``{energy (eV), forces [n_atoms, 3], stress [3, 3], has_energy, has_forces, has_stress, pbc [3]}``.

        Labels of frame ``i``; missing ones are zeros with the ``has_*`` flag False.
        """
        shard, j = self._locate(i)
        a0, a1 = shard["atom_offsets"][j:j + 2]
        return {"energy": float(shard["energy"][j]), "forces": np.array(shard["forces"][a0:a1], np.float64),
                "stress": np.array(shard["stress"][j], np.float64), "has_energy": bool(shard["has_energy"][j]),
                "has_forces": bool(shard["has_forces"][j]), "has_stress": bool(shard["has_stress"][j]),
                "pbc": np.array(shard["pbc"][j], bool)}

    def frame(self, i: int) -> Frame:
        """Frame ``i`` back as a :class:`Frame` (without ``info``)."""
        shard, j = self._locate(i)
        a0, a1 = shard["atom_offsets"][j:j + 2]
        lab = self.labels(i)
        return Frame(numbers=np.array(shard["numbers"][a0:a1], np.int64),
                     positions=np.array(shard["positions"][a0:a1], np.float64),
                     cell=np.array(shard["cell"][j], np.float64), pbc=np.array(shard["pbc"][j], bool),
                     energy=lab["energy"] if lab["has_energy"] else None,
                     forces=lab["forces"] if lab["has_forces"] else None,
                     stress=lab["stress"] if lab["has_stress"] else None, group=str(self.groups[i]),
                     id=str(self.ids[i]))

    def frames(self) -> Iterator[Frame]:
        for i in range(len(self)):
            yield self.frame(i)

    @property
    def pbc(self) -> np.ndarray:
        """``[F, 3]`` bool periodicity of every frame."""
        out = np.zeros((len(self), 3), bool)
        for s, shard in enumerate(self._shards):
            sel = self._shard_of == s
            out[sel] = np.asarray(shard["pbc"])[self._local[sel]]
        return out

    def label_flags(self) -> dict[str, np.ndarray]:
        """``{"energy", "forces", "stress"}``: ``[F]`` bool, whether each frame has that label."""
        out = {k: np.zeros(len(self), bool) for k in ("energy", "forces", "stress")}
        for s, shard in enumerate(self._shards):
            sel = self._shard_of == s
            for k in out:
                out[k][sel] = np.asarray(shard[f"has_{k}"])[self._local[sel]]
        return out

    @property
    def stats(self) -> DatasetStats:
        """Statistics (stored ones for a whole store, computed on first use for views and in-memory sets)."""
        if self._stats is None:
            self._stats = compute_stats(self)
        return self._stats

    def element_counts(self) -> np.ndarray:
        """``[F, 119]`` int32 atoms of each element per frame (memory F x 476 bytes: small sets only)."""
        out = np.zeros((len(self), MAX_Z + 1), np.int32)
        for block in self.blocks():
            out[block.rows] = block.counts
        return out

    def blocks(self) -> Iterator[Block]:
        """Per shard: this view's frames in that shard with their per-element counts and labels (one pass over
        the data for statistics and least-squares fits)."""
        for s, shard in enumerate(self._shards):
            rows = np.flatnonzero(self._shard_of == s)
            if rows.size == 0:
                continue
            loc = self._local[rows]
            offsets = np.asarray(shard["atom_offsets"])
            lens = np.diff(offsets)[loc]
            atoms = _ranges(offsets[loc], lens)
            frame_of_atom = np.repeat(np.arange(len(loc)), lens)
            numbers = np.asarray(shard["numbers"][atoms], np.int64)
            counts = np.bincount(frame_of_atom * (MAX_Z + 1) + numbers, minlength=len(loc) * (MAX_Z + 1))
            yield Block(shard, rows, loc, atoms, frame_of_atom, counts.reshape(len(loc), MAX_Z + 1))


@dataclasses.dataclass
class Block:
    """This view's frames in one shard with their element counts (:meth:`GraphDataset.blocks`)."""

    shard: dict[str, np.ndarray]
    rows: np.ndarray           # [k] positions in the view
    local: np.ndarray          # [k] frame indices in the shard
    atoms: np.ndarray          # [a] atom indices in the shard, frame by frame
    frame_of_atom: np.ndarray  # [a] in 0..k-1
    counts: np.ndarray         # [k, 119]


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for each (s, l), vectorised."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    shift = np.repeat(np.asarray(starts, np.int64) - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return np.arange(total, dtype=np.int64) + shift


def preprocess(frames: Iterable[Frame], out_dir: str | Path, *, cutoff: float, num_elements: int = 100,
               shard_size: int = 100_000, progress: bool = True, source: str = "", overwrite: bool = False,
               on_error: str = "raise") -> GraphDataset:
    """Write ``frames`` with their neighbour lists at ``cutoff`` to a store at ``out_dir``; return it opened.

    The store is written to a temporary sibling directory and renamed into place at the end, so an
    exception (a bad frame with ``on_error="raise"``, an interrupted reader) leaves no partial store. An
    existing ``out_dir`` is an error unless ``overwrite``. Memory: one shard of frames and edges at a time
    (about ``shard_size`` x atoms x (56 + 7 x neighbours) bytes). Statistics (:class:`DatasetStats`,
    with least-squares element energies) are computed at the end and stored in ``dataset.json``.
    """
    out_dir = Path(out_dir)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    bar = _progress_bar(progress)
    try:
        with atomic_directory(out_dir) as tmp:
            shards, groups, ids, buffer = [], [], [], []

            def flush() -> None:
                name = f"shard_{len(shards):05d}"
                arrays = build_shard(buffer)
                (tmp / name).mkdir()
                for key, value in arrays.items():
                    np.save(tmp / name / f"{key}.npy", value)
                shards.append({"name": name, "n_frames": len(buffer), "n_atoms": int(arrays["atom_offsets"][-1]),
                               "n_edges": int(arrays["edge_offsets"][-1])})
                buffer.clear()

            for frame, graph in with_graphs(frames, cutoff, num_elements, on_error):
                buffer.append((frame, graph))
                groups.append(frame.group)
                ids.append(frame.id)
                if bar is not None:
                    bar.update(1)
                if len(buffer) == shard_size:
                    flush()
            if buffer:
                flush()
            if not shards:
                raise ValueError("no frames to preprocess")
            meta = {"format_version": FORMAT_VERSION, "cutoff": float(cutoff), "num_elements": int(num_elements),
                    "n_frames": len(ids), "n_atoms": sum(s["n_atoms"] for s in shards),
                    "n_edges": sum(s["n_edges"] for s in shards), "shards": shards, "source": source,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "groups": groups, "ids": ids, "stats": None}
            (tmp / META_FILE).write_text(json.dumps(meta))
            meta["stats"] = GraphDataset.open(tmp).stats.to_dict()
            (tmp / META_FILE).write_text(json.dumps(meta))
    finally:
        if bar is not None:
            bar.close()
    return GraphDataset.open(out_dir)


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(desc="preprocess", unit="frame")
