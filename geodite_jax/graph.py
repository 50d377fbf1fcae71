"""Structures -> graphs: input validation, host-side neighbour search, batching with padding to buckets.

A graph is a :class:`jraph.GraphsTuple` with

* ``nodes = {"positions": [N, 3], "species": [N] int32}``
* ``edges = {"shifts": [E, 3]}``: integer cell shifts (stored as floats) of the sender's image
* ``globals = {"cell": [G, 3, 3]}``: rows are lattice vectors (zeros for a molecule)
* ``senders``/``receivers`` ``[E]`` int32, ``n_node``/``n_edge`` ``[G]`` int32.

Edge j -> i (sender j, receiver i) has the vector ``r_j + shifts @ cell − r_i``, computed on the device
inside the differentiated function so that forces and stress see positions and cell. Edges are sorted by
receiver. Batches always end with one padding graph that owns the padding nodes and edges (jraph's
convention); padding edges join the first padding node to itself and are masked by the model wrapper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jraph
import numpy as np
import vesin
from ase import Atoms
from ase.data import chemical_symbols

from .elements import MAX_Z

MIN_DISTANCE = 0.1  # Å: closer pairs are rejected as overlapping atoms


def check_atomic_numbers(numbers: Sequence[int] | np.ndarray, num_elements: int | None = None) -> None:
    """``ValueError`` naming the first of ``numbers [N]`` that is no element (outside 1..118) or, with
    ``num_elements``, beyond a model's element table (Z ≥ ``num_elements``)."""
    numbers = np.asarray(numbers).reshape(-1)
    bad = np.flatnonzero((numbers < 1) | (numbers > MAX_Z))
    if bad.size:
        raise ValueError(f"unknown element: atomic number {int(numbers[bad[0]])} at atom {int(bad[0])} "
                         f"(valid atomic numbers are 1..{MAX_Z})")
    if num_elements is not None:
        bad = np.flatnonzero(numbers >= num_elements)
        if bad.size:
            z = int(numbers[bad[0]])
            raise ValueError(f"element {chemical_symbols[z]} (Z={z}) at atom {int(bad[0])} is not known to this "
                             f"model, which covers Z=1..{num_elements - 1}")


def validate_atoms(atoms: Atoms, num_elements: int | None = None) -> None:
    """Raise ``ValueError`` naming the problem if ``atoms`` cannot be evaluated.

    Checks: at least one atom, known atomic numbers ``numbers [N]`` (1..118, and < ``num_elements`` if given),
    finite ``positions [N, 3]`` and ``cell [3, 3]``, a non-singular cell along the periodic directions.
    """
    if len(atoms) == 0:
        raise ValueError("empty structure: the Atoms object has no atoms")
    check_atomic_numbers(atoms.numbers, num_elements)
    positions = np.asarray(atoms.positions)
    if not np.all(np.isfinite(positions)):
        atom = int(np.flatnonzero(~np.isfinite(positions).all(1))[0])
        raise ValueError(f"positions contain NaN or inf (atom {atom}: {positions[atom].tolist()})")
    cell = np.asarray(atoms.cell.array)
    if not np.all(np.isfinite(cell)):
        raise ValueError(f"cell contains NaN or inf: {cell.tolist()}")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any():
        periodic = cell[pbc]
        if np.linalg.matrix_rank(periodic, tol=1e-6) < periodic.shape[0] or (
                pbc.all() and abs(np.linalg.det(cell)) < 1e-6):
            raise ValueError(f"singular cell along the periodic directions {pbc.tolist()}: {cell.tolist()}")


# Largest span (in cutoffs) handed to vesin's cell grid: far beyond it vesin 0.6 dies with SIGFPE (measured:
# a non-periodic box of 5e5 Å with a 5 Å cutoff, or a periodic one of 1e9 Å), which no Python code can catch.
MAX_SPAN_CUTOFFS = 1.0e4


def neighbour_list(positions: np.ndarray, cell: np.ndarray, pbc: Sequence[bool],
                   cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All pairs closer than ``cutoff`` including periodic images (O(N)), sorted by receiver.

    Handles triclinic cells, mixed periodicity and cells smaller than the cutoff (an atom then sees
    several images of one neighbour, and its own images). Only the zero-shift self pair is excluded.

    Any extent is safe: a free structure is searched with a k-d tree (never a box), and the atoms of a slab
    or wire are first split into groups separated by more than the cutoff along the non-periodic directions,
    each searched (vesin) in a box of its own size, so far-apart atoms (one atom 1e6 Å away) are simply
    isolated. A periodic cell too large for the cell grid is a ``ValueError``.

    Args:
        positions: ``[N, 3]`` Å; cell: ``[3, 3]`` rows are lattice vectors (ignored along non-periodic
            directions); pbc: ``[3]`` bools; cutoff: Å.

    Returns:
        ``(receivers [E], senders [E], shifts [E, 3] int, distances [E])``.
    """
    pbc = np.asarray(pbc, dtype=bool)
    positions = np.asarray(positions, np.float64).reshape(-1, 3)
    cell = np.array(cell, dtype=np.float64)
    if not pbc.any():
        i, j, shifts, d = _free_pairs(positions, cutoff)
    else:
        i, j, shifts, d = _periodic_pairs(positions, cell, pbc, cutoff)
    order = np.lexsort((j, i))
    return (i[order].astype(np.int32), j[order].astype(np.int32), shifts[order].astype(np.int64), d[order])


def _free_pairs(positions: np.ndarray, cutoff: float) -> tuple[np.ndarray, ...]:
    """Pairs of a free structure (no box at all): k-d tree, both directions, ``d < cutoff``."""
    from scipy.spatial import cKDTree

    n = len(positions)
    pairs = cKDTree(positions).query_pairs(float(cutoff), output_type="ndarray") if n > 1 else np.zeros((0, 2), int)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    d = np.linalg.norm(positions[pairs[:, 1]] - positions[pairs[:, 0]], axis=1)
    keep = d < cutoff
    a, b, d = pairs[keep, 0], pairs[keep, 1], d[keep]
    i, j = np.concatenate([a, b]), np.concatenate([b, a])
    return i, j, np.zeros((len(i), 3), np.int64), np.concatenate([d, d])


def _split_by_gaps(coords: np.ndarray, cutoff: float) -> list[np.ndarray]:
    """Index groups of points such that points of different groups are more than ``cutoff`` apart along at
    least one of the directions (columns of ``coords``); applied recursively until no gap is left."""
    groups, done = [np.arange(len(coords))], []
    while groups:
        idx = groups.pop()
        split = False
        for axis in range(coords.shape[1]):
            x = coords[idx, axis]
            order = np.argsort(x, kind="stable")
            gaps = np.flatnonzero(np.diff(x[order]) >= cutoff)
            if gaps.size:
                groups.extend(idx[part] for part in np.split(order, gaps + 1))
                split = True
                break
        if not split:
            done.append(idx)
    return done


def _periodic_pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
                    ) -> tuple[np.ndarray, ...]:
    """Pairs with periodic images along ``pbc``: positions wrapped into the cell, far-apart groups along the
    non-periodic directions searched separately (vesin), shifts returned for the unwrapped positions."""
    periodic = cell[pbc]
    widths = _perpendicular_spans(cell, pbc)
    if widths.max() > MAX_SPAN_CUTOFFS * cutoff:
        raise ValueError(f"periodic cell too large for the neighbour search: lattice spans "
                         f"{np.round(widths, 1).tolist()} Å exceed {MAX_SPAN_CUTOFFS:g} x the cutoff {cutoff} Å")
    # Wrap along the periodic directions: r = r_w + m @ cell with integer m (zero along free directions).
    frac = positions @ np.linalg.pinv(periodic)  # [N, n_periodic] coordinates along the periodic vectors
    m = np.zeros((len(positions), 3), np.int64)
    m[:, pbc] = np.floor(frac).astype(np.int64)
    wrapped = positions - m @ cell
    if pbc.all():
        groups = [np.arange(len(positions))]
    else:
        # Directions orthogonal to every periodic lattice vector: a gap along them is a gap between all images.
        _, _, vt = np.linalg.svd(periodic)
        free_dirs = vt[periodic.shape[0]:]
        groups = _split_by_gaps(wrapped @ free_dirs.T, cutoff)
    out_i, out_j, out_s, out_d = [], [], [], []
    for idx in groups:
        box = cell.copy() if pbc.all() else _complete_cell(cell, pbc, wrapped[idx], cutoff)
        if not pbc.all():
            spans = _perpendicular_spans(box, np.ones(3, bool))
            if spans.max() > MAX_SPAN_CUTOFFS * cutoff:
                raise ValueError(f"structure too extended for the neighbour search: a connected group of {len(idx)} "
                                 f"atoms spans {spans.max():.3g} Å (more than {MAX_SPAN_CUTOFFS:g} x the cutoff "
                                 f"{cutoff} Å) along a non-periodic direction")
        nl = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
        i, j, s, d = nl.compute(wrapped[idx], box, pbc.tolist(), "ijSd")
        i, j = idx[np.asarray(i, np.int64)], idx[np.asarray(j, np.int64)]
        s = np.asarray(s, np.int64)
        s[:, ~pbc] = 0  # never images along a free direction (vesin makes none)
        out_i.append(i)
        out_j.append(j)
        out_s.append(s - m[j] + m[i])  # back to the unwrapped positions
        out_d.append(np.asarray(d, np.float64))
    return (np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s).reshape(-1, 3),
            np.concatenate(out_d))


def _perpendicular_spans(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Length of each lattice vector along ``pbc`` projected on the normal of the others (its width), Å."""
    out = []
    for k in np.flatnonzero(pbc):
        others = [cell[a] for a in range(3) if a != k and np.linalg.norm(cell[a]) > 0]
        normal = np.cross(*others) if len(others) == 2 else np.zeros(3)
        if np.linalg.norm(normal) < 1e-12:
            out.append(float(np.linalg.norm(cell[k])))
        else:
            out.append(float(abs(cell[k] @ normal) / np.linalg.norm(normal)))
    return np.asarray(out)


def _complete_cell(cell: np.ndarray, pbc: np.ndarray, positions: np.ndarray, cutoff: float) -> np.ndarray:
    """Replace the lattice vectors of non-periodic directions by long orthogonal ones (never used as shifts)."""
    box = cell.copy()
    extent = float(np.ptp(positions, axis=0).max()) + 2 * cutoff + 1.0 if len(positions) else 1.0
    periodic = box[pbc]
    for axis in np.flatnonzero(~pbc):
        others = [box[k] for k in range(3) if k != axis and (pbc[k] or np.linalg.norm(box[k]) > 0)]
        if len(others) == 2 and np.linalg.norm(np.cross(*others)) > 1e-9:
            normal = np.cross(*others)
        elif len(periodic):
            trial = np.eye(3)[axis] - periodic @ np.linalg.pinv(periodic) @ np.eye(3)[axis]
            normal = trial if np.linalg.norm(trial) > 1e-9 else np.eye(3)[axis]
        else:
            normal = np.eye(3)[axis]
        box[axis] = normal / np.linalg.norm(normal) * extent
        if np.linalg.matrix_rank(box, tol=1e-9) < 3:
            box[axis] = np.eye(3)[axis] * extent
    if abs(np.linalg.det(box)) < 1e-9:
        box = np.eye(3) * extent
        box[pbc] = cell[pbc]
    return box


def atoms_to_graph(atoms: Atoms, cutoff: float, num_elements: int | None = None,
                   dtype: np.dtype | type = np.float32) -> jraph.GraphsTuple:
    """One structure of ``N`` atoms as a single (unpadded) graph, after :func:`validate_atoms` and an overlap check.

    Returns:
        ``GraphsTuple`` with ``nodes = {"positions": [N, 3], "species": [N]}``, ``edges = {"shifts": [E, 3]}``,
        ``globals = {"cell": [1, 3, 3]}`` (zeros for a molecule), ``senders``/``receivers [E]`` sorted by
        receiver, ``n_node = [N]``, ``n_edge = [E]`` (floats in ``dtype``).
    """
    validate_atoms(atoms, num_elements)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell.array, np.float64) if pbc.any() else np.zeros((3, 3))
    positions = np.asarray(atoms.positions, np.float64)
    receivers, senders, shifts, dist = neighbour_list(positions, cell, pbc, cutoff)
    if dist.size and dist.min() < MIN_DISTANCE:
        k = int(np.argmin(dist))
        raise ValueError(f"overlapping atoms: atoms {int(receivers[k])} and {int(senders[k])} "
                         f"(shift {shifts[k].tolist()}) are {dist[k]:.4f} Å apart, closer than {MIN_DISTANCE} Å")
    return jraph.GraphsTuple(
        nodes={"positions": positions.astype(dtype), "species": np.asarray(atoms.numbers, np.int32)},
        edges={"shifts": shifts.astype(dtype)},
        globals={"cell": cell[None].astype(dtype)},
        senders=senders, receivers=receivers,
        n_node=np.array([len(atoms)], np.int32), n_edge=np.array([len(senders)], np.int32),
    )


def bucket(n: int, minimum: int, multiple: int, growth: float = 1.25) -> int:
    """Smallest size on the ladder ``minimum, ~minimum·growth, ...`` (multiples of ``multiple``) that holds ``n``.

    Few distinct sizes means few jit compilations; the geometric ladder wastes at most ``growth − 1``.
    """
    size = max(minimum, multiple)
    while size < n:
        size = int(math.ceil(size * growth / multiple) * multiple)
    return size


def max_degree(graphs: Sequence[jraph.GraphsTuple]) -> int:
    """Largest number of incoming edges (``receivers [E]`` counts) of any node in ``graphs``."""
    return max((int(np.bincount(g.receivers).max()) if len(g.receivers) else 0) for g in graphs)


def batch_graphs(graphs: Sequence[jraph.GraphsTuple], n_node: int | None = None, n_edge: int | None = None,
                 n_graph: int | None = None, neighbours_per_node: int | None = None) -> jraph.GraphsTuple:
    """Concatenate graphs and pad to ``(n_node, n_edge, n_graph)`` (defaults: buckets of the totals).

    The result always ends with at least one padding graph; the last one holds the ≥ 1 padding nodes,
    any other padding graphs are empty. Padding edges are self-loops with zero shift (never a real
    edge), which is how :func:`geodite_jax.energy.padding_masks` recognises them.

    Returns:
        one ``GraphsTuple`` with ``positions [n_node, 3]``, ``species [n_node]``, ``shifts [n_edge, 3]``,
        ``senders``/``receivers [n_edge]``, ``cell [n_graph, 3, 3]``, ``n_node``/``n_edge [n_graph]``.

    ``neighbours_per_node=M`` lays the edges out in blocks: node k owns edges ``k·M .. k·M + M − 1`` (its
    real edges first, then padding self-loops), so ``n_edge = n_node · M``. The model then sums over
    neighbours by reshaping, which is faster where degrees are uniform (crystals).
    """
    real_nodes = sum(int(g.n_node.sum()) for g in graphs)
    real_edges = sum(int(g.n_edge.sum()) for g in graphs)
    real_graphs = sum(len(g.n_node) for g in graphs)
    n_node = bucket(real_nodes + 1, 8, 8) if n_node is None else n_node
    n_graph = real_graphs + 1 if n_graph is None else n_graph
    if neighbours_per_node is not None:
        degree = max_degree(graphs)
        if degree > neighbours_per_node:
            raise ValueError(f"a node has {degree} neighbours, more than neighbours_per_node={neighbours_per_node}")
        if n_edge is not None and n_edge != n_node * neighbours_per_node:
            raise ValueError(f"with neighbours_per_node={neighbours_per_node}, n_edge must be n_node x "
                             f"{neighbours_per_node} = {n_node * neighbours_per_node}, got {n_edge}")
        n_edge = n_node * neighbours_per_node
    n_edge = bucket(real_edges, 256, 64) if n_edge is None else n_edge
    if n_node < real_nodes + 1 or n_edge < real_edges or n_graph < real_graphs + 1:
        raise ValueError(f"batch of {real_graphs} graphs, {real_nodes} nodes, {real_edges} edges does not fit the "
                         f"padding budget ({n_graph} graphs incl. 1 padding, {n_node} nodes incl. ≥1 padding, "
                         f"{n_edge} edges)")
    dtype = graphs[0].nodes["positions"].dtype
    positions = np.zeros((n_node, 3), dtype)
    species = np.zeros(n_node, np.int32)
    cells = np.zeros((n_graph, 3, 3), dtype)
    nn = np.zeros(n_graph, np.int32)
    ne = np.zeros(n_graph, np.int32)
    shifts = np.zeros((n_edge, 3), dtype)
    if neighbours_per_node is None:  # padding edges: self-loops on the first padding node
        receivers = np.full(n_edge, real_nodes, np.int32)
    else:  # every slot starts as a self-loop of its owner; real edges overwrite the first slots
        receivers = np.repeat(np.arange(n_node, dtype=np.int32), neighbours_per_node)
    senders = receivers.copy()
    node_off = edge_off = graph_off = 0
    for g in graphs:
        a, b, c = int(g.n_node.sum()), int(g.n_edge.sum()), len(g.n_node)
        positions[node_off:node_off + a] = g.nodes["positions"]
        species[node_off:node_off + a] = g.nodes["species"]
        cells[graph_off:graph_off + c] = g.globals["cell"]
        nn[graph_off:graph_off + c] = g.n_node
        if neighbours_per_node is None:
            slots = np.arange(edge_off, edge_off + b)
            ne[graph_off:graph_off + c] = g.n_edge
        else:
            # Rank of each edge among its receiver's edges: its slot within that node's block.
            order = np.argsort(g.receivers, kind="stable")
            recv = g.receivers[order]
            rank = np.empty(b, np.int64)
            rank[order] = np.arange(b) - np.searchsorted(recv, recv, side="left")
            slots = (g.receivers + node_off) * neighbours_per_node + rank
            ne[graph_off:graph_off + c] = g.n_node * neighbours_per_node
        shifts[slots] = g.edges["shifts"]
        senders[slots] = g.senders + node_off
        receivers[slots] = g.receivers + node_off
        node_off, edge_off, graph_off = node_off + a, edge_off + b, graph_off + c
    nn[-1] = n_node - real_nodes  # padding nodes (and their edges) belong to the last graph
    ne[-1] = n_edge - int(ne[:-1].sum())
    return jraph.GraphsTuple(nodes={"positions": positions, "species": species}, edges={"shifts": shifts},
                             globals={"cell": cells}, senders=senders, receivers=receivers, n_node=nn, n_edge=ne)
