"""Packing structures into padded batches of a few fixed shapes (a jit compilation each), epoch plans, prefetching.

An epoch is a *plan*: the (seeded) shuffled order of the structures cut greedily into batches that fit a
:class:`BatchBudget`. The plan is a pure function of ``(dataset sizes, indices, budget, seed, epoch)``, so
iterating twice gives the same batches and ``start=k`` resumes exactly after ``k`` batches.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import jraph
import numpy as np

from ..graph import batch_graphs
from .store import GraphDataset


class Batch(NamedTuple):
    """Padded graphs and labels; with ``num_shards=D`` every array has a leading ``[D]`` axis.

    ``graph`` follows :func:`geodite_jax.graph.batch_graphs` (sparse layout, receivers sorted, last graph =
    padding), numpy float64. Labels are zero where absent or padding, and the weights say which count.
    ``indices`` maps graph slots back to the dataset (to scatter predictions).
    """

    graph: jraph.GraphsTuple   # N = budget.n_node nodes, E = budget.n_edge edges, G = budget.n_graph graphs
    energy: np.ndarray         # [G] total energy, eV
    forces: np.ndarray         # [N, 3] eV/Å
    stress: np.ndarray         # [G, 3, 3] eV/Å³, ASE sign
    energy_weight: np.ndarray  # [G] 1.0 for a real graph with an energy label
    forces_weight: np.ndarray  # [N] 1.0 for a real atom whose frame has force labels
    stress_weight: np.ndarray  # [G] 1.0 for a real fully periodic graph with a stress label
    indices: np.ndarray        # [G] int64 dataset index of each graph slot, -1 for padding slots


class BatchBudget(NamedTuple):
    """Padded sizes of every (sub-)batch: ``n_node`` includes >= 1 padding node, ``n_graph`` 1 padding graph."""

    n_node: int
    n_edge: int
    n_graph: int

    def check(self) -> None:
        if self.n_node < 2 or self.n_graph < 2 or self.n_edge < 0:
            raise ValueError(f"invalid budget {self}: need n_node >= 2 (>= 1 padding node), n_graph >= 2 "
                             "(1 padding graph), n_edge >= 0")

    def fits(self, n_atoms: int, n_edges: int, n_graphs: int = 1) -> bool:
        return n_atoms + 1 <= self.n_node and n_edges <= self.n_edge and n_graphs + 1 <= self.n_graph

    def ladder(self, levels: int, floor: float = 0.5) -> tuple[BatchBudget, ...]:
        """``levels`` budgets from about ``floor`` x this one up to this one (nodes and edges scaled together,
        nodes to multiples of 8 and edges of 64, ``n_graph`` kept), smallest first; ``levels=1``: ``(self,)``.

        Packing stays greedy against the largest; each batch is then padded to the smallest level that holds
        it (:func:`fitting_budget`). Padding costs as much as real edges, and a batch of B typical structures
        fills ~50-70 % of a budget sized for B plus 2σ, so a few levels (one compilation each) save ~1/3 of a step.
        """
        if levels < 1 or not 0.0 < floor <= 1.0:
            raise ValueError(f"need levels >= 1 and 0 < floor <= 1, got levels={levels}, floor={floor}")
        out: list[BatchBudget] = []
        for k in range(levels):
            f = 1.0 if levels == 1 else floor + (1.0 - floor) * k / (levels - 1)
            level = BatchBudget(min(self.n_node, max(2, _round_up(f * self.n_node, 8))),
                                min(self.n_edge, _round_up(f * self.n_edge, 64)), self.n_graph)
            if level not in out:
                out.append(level)
        return tuple(out)


def fitting_budget(ladder: Sequence[BatchBudget], n_atoms: int, n_edges: int) -> BatchBudget:
    """The smallest budget of ``ladder`` (smallest first) that holds ``n_atoms`` atoms and ``n_edges`` edges
    (graph slots are the same on every level); the last one if none is smaller."""
    return next((b for b in ladder if b.fits(n_atoms, n_edges)), ladder[-1])


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def budget_for(ds: GraphDataset, graphs_per_batch: int | None = None, *, target_nodes: int | None = None,
               indices: Sequence[int] | np.ndarray | None = None, sigmas: float = 2.0, node_multiple: int = 8,
               edge_multiple: int = 64, max_nodes: int | None = None) -> BatchBudget:
    """A budget from the size statistics of ``ds`` (or of its frames ``indices``).

    ``graphs_per_batch=B``: nodes and edges for B typical structures, ``B·mean + sigmas·√B·std`` (so most
    batches reach B graphs before running out of room), and at least the biggest structure.
    ``target_nodes=T``: about T real nodes per batch, edges for T atoms at the data's edges per atom, and
    enough graph slots for T atoms of small (5th percentile) structures.
    ``max_nodes``: refuse (``ValueError`` naming it) a dataset whose biggest structure needs more nodes.
    """
    if (graphs_per_batch is None) == (target_nodes is None):
        raise ValueError("give exactly one of graphs_per_batch and target_nodes")
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        raise ValueError("no structures to size a budget for")
    atoms, edges = ds.n_atoms[idx].astype(np.float64), ds.n_edges[idx].astype(np.float64)
    biggest = int(idx[np.argmax(atoms)])
    if max_nodes is not None and atoms.max() + 1 > max_nodes:
        raise ValueError(f"structure {str(ds.ids[biggest])!r} (index {biggest}) has {int(atoms.max())} atoms; it "
                         f"does not fit max_nodes={max_nodes} (which includes one padding node)")
    if graphs_per_batch is not None:
        if graphs_per_batch < 1:
            raise ValueError(f"graphs_per_batch must be >= 1, got {graphs_per_batch}")
        b = graphs_per_batch
        nodes = b * atoms.mean() + sigmas * math.sqrt(b) * atoms.std()
        n_edge = b * edges.mean() + sigmas * math.sqrt(b) * edges.std()
        n_graph = b + 1
    else:
        if target_nodes < 1:
            raise ValueError(f"target_nodes must be >= 1, got {target_nodes}")
        nodes = float(target_nodes)
        b = max(1.0, target_nodes / atoms.mean())
        n_edge = target_nodes * edges.sum() / atoms.sum() + sigmas * math.sqrt(b) * edges.std()
        n_graph = int(math.ceil(target_nodes / max(1.0, np.percentile(atoms, 5)))) + 1
    n_node = _round_up(max(nodes, atoms.max()) + 1, node_multiple)
    n_edge = _round_up(max(n_edge, edges.max(), 1), edge_multiple)
    if max_nodes is not None:
        n_node = min(n_node, max_nodes)
    return BatchBudget(int(n_node), int(n_edge), int(n_graph))


def plan_batches(ds: GraphDataset, indices: Sequence[int] | np.ndarray | None, budget: BatchBudget, *,
                 shuffle: bool = True, seed: int = 0, epoch: int = 0, num_shards: int | None = None,
                 drop_last: bool = False) -> list[list[np.ndarray]]:
    """The epoch's batches: a list of steps, each ``num_shards`` (None: 1) arrays of dataset indices.

    Structures are taken in the order ``indices`` (shuffled by a generator seeded with ``(seed, epoch)`` if
    ``shuffle``) and packed greedily: a batch is closed when the next structure would not fit. The last
    step's missing sub-batches are empty (all padding); ``drop_last`` drops that step if it is incomplete
    (for one shard: the final, usually part-filled batch).

    The number of steps can differ by about 1% between epochs (packing depends on the order); it is exact
    for the ``(seed, epoch)`` given.
    """
    budget = BatchBudget(*budget)
    budget.check()
    num_shards = 1 if num_shards is None else int(num_shards)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    order = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if shuffle:
        order = order[np.random.default_rng((int(seed), int(epoch))).permutation(len(order))]
    atoms, edges = ds.n_atoms[order], ds.n_edges[order]
    too_big = np.flatnonzero((atoms + 1 > budget.n_node) | (edges > budget.n_edge))
    if too_big.size:
        i = int(order[too_big[0]])
        raise ValueError(f"structure {str(ds.ids[i])!r} (index {i}, {int(ds.n_atoms[i])} atoms, {int(ds.n_edges[i])} "
                         f"edges) does not fit the batch budget {budget}; use a larger budget")
    batches, start = [], 0
    node_cap, edge_cap, graph_cap = budget.n_node - 1, budget.n_edge, budget.n_graph - 1
    n_nodes = n_edges = 0
    for k, (a, e) in enumerate(zip(atoms.tolist(), edges.tolist(), strict=True)):
        if k > start and (n_nodes + a > node_cap or n_edges + e > edge_cap or k - start >= graph_cap):
            batches.append(order[start:k])
            start, n_nodes, n_edges = k, 0, 0
        n_nodes, n_edges = n_nodes + a, n_edges + e
    if len(order) > start:
        batches.append(order[start:])
    steps = [batches[i:i + num_shards] for i in range(0, len(batches), num_shards)]
    if steps and (len(steps[-1]) < num_shards or (num_shards == 1 and drop_last)):
        if drop_last:
            steps.pop()
        else:
            steps[-1] = steps[-1] + [np.zeros(0, np.int64)] * (num_shards - len(steps[-1]))
    return steps


def num_batches(ds: GraphDataset, indices: Sequence[int] | np.ndarray | None, budget: BatchBudget,
                **plan_options: object) -> int:
    """Number of steps of the epoch (same options as :func:`plan_batches`; depends on seed and epoch)."""
    return len(plan_batches(ds, indices, budget, **plan_options))


def collate(ds: GraphDataset, indices: Sequence[int] | np.ndarray, budget: BatchBudget) -> Batch:
    """Frames ``indices`` of ``ds`` as one :class:`Batch` padded to exactly ``budget`` (empty -> all padding)."""
    n_node, n_edge, n_graph = budget
    idx = [int(i) for i in indices]
    energy, stress = np.zeros(n_graph), np.zeros((n_graph, 3, 3))
    forces, forces_weight = np.zeros((n_node, 3)), np.zeros(n_node)
    energy_weight, stress_weight = np.zeros(n_graph), np.zeros(n_graph)
    slots = np.full(n_graph, -1, np.int64)
    slots[:len(idx)] = idx
    if not idx:
        graph = _padding_graph(budget)
    else:
        graph = batch_graphs([ds.graph(i) for i in idx], n_node, n_edge, n_graph)
        offset = 0
        for g, i in enumerate(idx):
            lab, n = ds.labels(i), int(ds.n_atoms[i])
            energy[g], stress[g] = lab["energy"] * lab["has_energy"], lab["stress"] * lab["has_stress"]
            energy_weight[g] = float(lab["has_energy"])
            stress_weight[g] = float(lab["has_stress"] and lab["pbc"].all())
            if lab["has_forces"]:
                forces[offset:offset + n] = lab["forces"]
                forces_weight[offset:offset + n] = 1.0
            offset += n
    return Batch(graph, energy, forces, stress, energy_weight, forces_weight, stress_weight, slots)


def _padding_graph(budget: BatchBudget) -> jraph.GraphsTuple:
    """A batch with no real graph, laid out as :func:`batch_graphs` lays out padding."""
    n_node, n_edge, n_graph = budget
    n_nodes, n_edges = np.zeros(n_graph, np.int32), np.zeros(n_graph, np.int32)
    n_nodes[-1], n_edges[-1] = n_node, n_edge
    return jraph.GraphsTuple(nodes={"positions": np.zeros((n_node, 3)), "species": np.zeros(n_node, np.int32)},
                             edges={"shifts": np.zeros((n_edge, 3))}, globals={"cell": np.zeros((n_graph, 3, 3))},
                             senders=np.zeros(n_edge, np.int32), receivers=np.zeros(n_edge, np.int32),
                             n_node=n_nodes, n_edge=n_edges)


def stack_batches(batches: Sequence[Batch]) -> Batch:
    """Stack equally shaped batches along a new leading axis ``[D, ...]``."""
    import jax

    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)


def iterate_batches(ds: GraphDataset, indices: Sequence[int] | np.ndarray | None, budget: BatchBudget, *,
                    shuffle: bool = True, seed: int = 0, epoch: int = 0, num_shards: int | None = None,
                    drop_last: bool = False, start: int = 0, buckets: int = 1) -> Iterator[Batch]:
    """Yield the batches of :func:`plan_batches`, each padded to exactly ``budget``.

    ``num_shards=None``: plain batches. ``num_shards=D`` (any D >= 1): arrays with a leading ``[D]`` axis,
    D sub-batches for D devices; missing ones at the end of the epoch are all padding with zero weights.
    ``start=k`` skips the first ``k`` steps without building them (exact resume).
    ``buckets=K``: the plan is the same, but each step is padded to the smallest of ``budget.ladder(K)`` that
    holds its largest sub-batch (at most K shapes, so at most K compilations of a jitted step).
    """
    steps = plan_batches(ds, indices, budget, shuffle=shuffle, seed=seed, epoch=epoch, num_shards=num_shards,
                         drop_last=drop_last)
    ladder = BatchBudget(*budget).ladder(buckets)
    for step in steps[start:]:
        size = fitting_budget(ladder, max(int(ds.n_atoms[part].sum()) for part in step),
                              max(int(ds.n_edges[part].sum()) for part in step))
        subs = [collate(ds, part, size) for part in step]
        yield subs[0] if num_shards is None else stack_batches(subs)


def prefetch(iterator: Iterable, size: int = 2) -> Iterator:
    """Produce items of ``iterator`` in a background thread, up to ``size`` ahead of the consumer.

    The thread starts at the first ``next()``. Exceptions of the producer are re-raised in the consumer;
    closing the returned generator (or breaking out of the loop) stops the thread.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put((err, None))

    thread = threading.Thread(target=produce, name="geodite-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            err, item = items.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5.0)
