"""Edge indexing for message passing, and the chunked evaluation that bounds its memory.

Two layouts give the same numbers: sparse (any edge order; sums are segment sums) and neighbour blocks (node i
owns edges ``i·M .. i·M + M − 1``; sums are reshapes). In the block layout a layer can run over chunks of
receiver nodes (:meth:`Edges.map_chunks`), so no ``[E, 8, F]`` array ever exists whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

#: Bytes of one chunk's largest edge array: the steerable message block [C·M, 8, F] on the XLA path, an edge
#: state [C·M, F] with the fused kernels (which take the [E, 8, F] work out of the chunks). Small enough to
#: stay in cache, large enough that the per-chunk loop and recompute overhead is small: 1,024 edge slots per
#: chunk for Geodite-MP in float32 on the XLA path, 12,288 with the kernels (11-12 % faster on Cu-256 and
#: Si-1000 than 1,024 there, for 80 MB more; see README, Benchmarks). Small models get proportionally larger
#: chunks, so small systems run in one pass.
DEFAULT_CHUNK_BYTES = 6 * 2**20
#: Name (``jax.ad_checkpoint.checkpoint_name``) of the per-edge matmul outputs a chunk may keep for its backward.
SAVED_MATMUL = "edge_matmul"


def default_chunk_edges(num_features: int, dtype: Any, fused: bool = False) -> int:
    """Edge slots per chunk for :data:`DEFAULT_CHUNK_BYTES`: ``budget / (8 F · itemsize)``, or with the fused
    kernels (``fused``: the messages are fused) ``budget / (F · itemsize)``."""
    per_slot = (1 if fused else 8) * num_features * jnp.dtype(dtype).itemsize
    return max(64, DEFAULT_CHUNK_BYTES // per_slot)


@struct.dataclass
class Edges:
    """Edge indexing: sparse (any order) or neighbour blocks (every node owns ``block`` consecutive edges).

    In the block layout edge ``e`` has receiver ``e // block``: sums over a node's edges are reshape-sums
    and receiver gathers are broadcasts, which XLA fuses with their producers and consumers instead of
    materialising ``[E, 8, F]`` message arrays. Both layouts give the same numbers.
    """

    senders: jnp.ndarray  # [E]
    receivers: jnp.ndarray  # [E]
    num_nodes: int = struct.field(pytree_node=False)
    block: int | None = struct.field(pytree_node=False, default=None)
    sorted_receivers: bool = struct.field(pytree_node=False, default=False)
    chunk: int | None = struct.field(pytree_node=False, default=None)
    #: Distributed runs: ``exchange(x [N, ...]) -> x`` with ghost rows replaced by their owners' rows (see
    #: :meth:`Geodite.__call__`); None on one domain.
    exchange: Callable[[jnp.ndarray], jnp.ndarray] | None = struct.field(pytree_node=False, default=None)
    #: Receiver-sorted edges only: the messages' and the edge update's sender gathers are contracted over the
    #: whole graph by the CPU kernels of :mod:`geodite_jax.fused` instead of (per chunk) in XLA.
    fused_messages: bool = struct.field(pytree_node=False, default=False)
    fused_edge_update: bool = struct.field(pytree_node=False, default=False)
    #: Chunked layout: keep the chunks' matmul outputs (tagged :data:`SAVED_MATMUL`) for the backward pass
    #: instead of recomputing them with the rest of the chunk (the model decides, from a memory budget).
    save_matmuls: bool = struct.field(pytree_node=False, default=False)

    @property
    def kernel_receivers(self) -> jnp.ndarray:
        """Each edge's receiver for the fused kernels, ``[E]`` int32: ``e // block`` in the block layout."""
        if self.block:
            return jnp.arange(self.senders.shape[0], dtype=jnp.int32) // self.block
        return self.receivers

    def sync(self, data: jnp.ndarray) -> jnp.ndarray:
        """Node data ``[N, ...]`` whose ghost rows hold their owners' values (unchanged without ghosts)."""
        return data if self.exchange is None else self.exchange(data)

    def aggregate(self, data: jnp.ndarray) -> jnp.ndarray:
        """Σ over each node's incoming edges: ``[E, ...] -> [N, ...]``."""
        if self.block:
            return data.reshape(self.num_nodes, self.block, *data.shape[1:]).sum(1)
        return jax.ops.segment_sum(data, self.receivers, self.num_nodes, indices_are_sorted=self.sorted_receivers)

    def at_receivers(self, data: jnp.ndarray) -> jnp.ndarray:
        """Node data on each edge's receiver: ``[N, ...] -> [E, ...]``."""
        if self.block:
            shape = (self.num_nodes, self.block, *data.shape[1:])
            return jnp.broadcast_to(data[:, None], shape).reshape(self.num_nodes * self.block, *data.shape[1:])
        return data[self.receivers]

    def at_senders(self, data: jnp.ndarray) -> jnp.ndarray:
        """Node data on each edge's sender: ``[N, ...] -> [E, ...]``."""
        return data[self.senders]

    def map_chunks(self, fn: Callable[..., tuple[jnp.ndarray, ...]], node_local: tuple[jnp.ndarray, ...],
                   edge_local: tuple[jnp.ndarray, ...]) -> tuple[jnp.ndarray, ...]:
        """``fn(edges_c, *node_local_c, *edge_local_c)`` over chunks of receiver nodes, outputs concatenated.

        ``node_local`` arrays ``[N, ...]`` and ``edge_local`` arrays ``[E, ...]`` are sliced per chunk (the
        chunk's receivers and their edges); anything else ``fn`` needs (node arrays gathered at senders,
        weights) it closes over whole. Each output is per receiver (``[C, ...]`` per chunk -> ``[N, ...]``) or
        per edge (``[C·M, ...]`` -> ``[E, ...]``). Without chunks (:attr:`chunk` None) ``fn`` runs once on the
        whole graph.

        Each chunk is a ``jax.checkpoint``: the backward pass recomputes the chunk's edge intermediates
        instead of keeping them, so no ``[E, 8, F]`` array ever exists whole, and the working set of one
        chunk stays in cache. With :attr:`save_matmuls` the chunk keeps its outputs tagged
        :data:`SAVED_MATMUL` (``[C·M, F]``-sized matmul results) and recomputes only the cheap rest.
        The numbers do not depend on the chunk size (sums run within a node's block).
        """
        with jax.named_scope(fn.__name__):  # names the block in profiles (experiments/profile_eval.py)
            return self._map_chunks(fn, node_local, edge_local)

    def _map_chunks(self, fn: Callable[..., tuple[jnp.ndarray, ...]], node_local: tuple[jnp.ndarray, ...],
                    edge_local: tuple[jnp.ndarray, ...]) -> tuple[jnp.ndarray, ...]:
        chunk = self.chunk
        if chunk is None:
            return fn(self, *node_local, *edge_local)
        n, m = self.num_nodes, self.block
        if n % chunk:
            raise ValueError(f"{n} nodes do not split into chunks of {chunk}: pad the graph (see chunk_nodes)")
        n_chunks = n // chunk

        def split(x: jnp.ndarray, rows: int) -> jnp.ndarray:  # a reshape: no copy
            return x.reshape(n_chunks, rows, *x.shape[1:])

        xs = (split(self.senders, chunk * m), tuple(split(x, chunk) for x in node_local),
              tuple(split(x, chunk * m) for x in edge_local))

        def chunk_fn(args: tuple) -> tuple[jnp.ndarray, ...]:
            senders, nodes, edges = args
            return fn(Edges(senders, None, chunk, m, True), *nodes, *edges)

        policy = jax.checkpoint_policies.save_only_these_names(SAVED_MATMUL) if self.save_matmuls else None
        body = jax.checkpoint(chunk_fn, policy=policy)

        outs = jax.lax.map(body, xs)
        return tuple(o.reshape(-1, *o.shape[2:]) for o in outs)


def chunk_nodes(num_nodes: int, block: int | None, chunk_edges: int | None) -> int | None:
    """Receiver nodes per chunk for a budget of ``chunk_edges`` edge slots, or None (one pass).

    Only the neighbour-block layout is chunked (a chunk of C nodes owns exactly C·M consecutive edges).
    Chunks are balanced; :class:`Geodite` pads the node count to a multiple of C once, at its entry.
    """
    if not block or not chunk_edges or num_nodes * block <= chunk_edges:
        return None
    target = max(1, chunk_edges // block)
    n_chunks = -(-num_nodes // target)
    size = -(-num_nodes // n_chunks)
    for c in range(size, max(1, (3 * size) // 4) - 1, -1):  # a nearby divisor of N needs no padding at all
        if num_nodes % c == 0:
            return c
    return size


def pad_vector(cutoff: float) -> np.ndarray:
    """The vector given to padding edges, ``[3]``: longer than the cutoff (exactly zero energy, finite
    gradients) and longer than any real edge, so no padding pair is ever mistaken for a neighbour."""
    return np.array([2.0 * cutoff + 1.0, 0.0, 0.0])
