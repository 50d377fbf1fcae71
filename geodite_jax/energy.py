"""The energy head: edge vectors -> per-atom energies, and their derivatives (forces, virial, stress).

Energy of atom i: E_i = E0(Z_i) + s_E · (E_i^NN + E_i^ZBL). Every path (ASE calculator, batched prediction,
training, jax-md, benchmarks, LAMMPS export) composes it through :func:`atom_energies`, and every stress
comes from :func:`strain_derivatives`: forces F = −∂E/∂r and σ = (1/V) ∂E/∂ε (symmetric strain ε, ASE's sign
convention, eV/Å³) from one autodiff pass, so they are conservative.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jraph
import numpy as np
from flax import struct

from .config import GeoditeConfig
from .edges import pad_vector
from .model import Geodite


@struct.dataclass
class PotentialState:
    """The differentiable pytree every energy function takes (see :meth:`Potential.state`).

    ``params``: the Flax variables; ``element_energies [119]``: E0 by atomic number (eV);
    ``energy_scale []``: s_E. Training differentiates w.r.t. ``params`` only; the others are constants.
    """

    params: Any
    element_energies: jnp.ndarray
    energy_scale: jnp.ndarray

    @classmethod
    def create(cls, params: Any, element_energies: Any, energy_scale: Any, dtype: Any = jnp.float32
               ) -> PotentialState:
        """Cast floating parameters, E0 and s_E to ``dtype`` (integer leaves stay as they are)."""
        return cls(as_dtype(params, dtype), jnp.asarray(element_energies, dtype), jnp.asarray(energy_scale, dtype))


def as_dtype(tree: Any, dtype: Any) -> Any:
    """Floating leaves of ``tree`` as ``dtype`` arrays; integer leaves (species, indices) unchanged."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype,
                                                                                    jnp.floating) else x, tree)


def atom_energies(model: Geodite, state: PotentialState, vectors: jnp.ndarray, species: jnp.ndarray,
                  senders: jnp.ndarray, receivers: jnp.ndarray, *, edge_mask: jnp.ndarray | None = None,
                  vacuum: jnp.ndarray | None = None, sorted_receivers: bool = False,
                  neighbours_per_node: int | None = None, dropout_rng: jax.Array | None = None,
                  exchange: Callable[[jnp.ndarray], jnp.ndarray] | None = None
                  ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Per-atom energies ``E0[Z] + s_E (nn + zbl)``, ``[N]`` (eV), and the model's raw outputs.

    Args:
        vectors: ``[E, 3]`` edge vectors ``r_j − r_i`` (Å) of edge j -> i (cell shifts included).
        species: ``[N]`` atomic numbers (0 for padding atoms).
        senders, receivers: ``[E]`` atom indices.
        edge_mask: ``[E]`` True for real edges; the others get :func:`pad_vector` (None: all real).
        vacuum: a precomputed isolated-atom table (:meth:`Potential.vacuum_energies`); None recomputes it
            from ``state.params`` (use that when differentiating w.r.t. the parameters).
        sorted_receivers, neighbours_per_node: the edge layout (see :class:`~geodite_jax.model.Geodite`).
        dropout_rng: turns the attention dropout on (training); None is deterministic.
        exchange: ghost-row exchange of a spatial decomposition (see :meth:`Geodite.__call__`).

    Returns:
        ``(node_energies [N], out)`` with ``out = {"nn" [N], "zbl" [N], "nn_per_layer" [N, T]}`` (unscaled).
        Padding atoms are not masked here: their energy is E0[0] = 0 plus the model's (zero-edge) output.
    """
    if edge_mask is not None:
        vectors = jnp.where(edge_mask[:, None], vectors, pad_vector(model.config.cutoff).astype(vectors.dtype))
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    out = model.apply(state.params, vectors, species, senders, receivers, vacuum=vacuum,
                      sorted_receivers=sorted_receivers, neighbours_per_node=neighbours_per_node,
                      deterministic=dropout_rng is None, rngs=rngs, exchange=exchange)
    e0 = jnp.asarray(state.element_energies, vectors.dtype)[species]
    return e0 + state.energy_scale * (out["nn"] + out["zbl"]), out


def symmetric_deformation(strain: jnp.ndarray) -> jnp.ndarray:
    """``I + (ε + εᵀ)/2``, ``[..., 3, 3]``: the deformation a strain applies (rows of positions and cells)."""
    return jnp.eye(3, dtype=strain.dtype) + 0.5 * (strain + jnp.swapaxes(strain, -1, -2))


def strain_derivatives(energy: Callable[[jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, Any]],
                       positions: jnp.ndarray, strain_shape: tuple[int, ...] = (3, 3)
                       ) -> tuple[jnp.ndarray, Any, jnp.ndarray, jnp.ndarray]:
    """``(E, aux, forces [N, 3], virial [..., 3, 3])`` of ``energy(positions, strain) -> (E, aux)`` at zero
    strain, in one autodiff pass. ``energy`` applies :func:`symmetric_deformation` of the strain to whatever
    it deforms (positions and cells, or jax-md's pair vectors); the virial is ∂E/∂ε."""
    strain = jnp.zeros(strain_shape, positions.dtype)
    (e, aux), (grad_pos, virial) = jax.value_and_grad(energy, argnums=(0, 1), has_aux=True)(positions, strain)
    return e, aux, -grad_pos, virial


def stress_from_virial(virial: jnp.ndarray, volume: jnp.ndarray) -> jnp.ndarray:
    """σ = virial / V, ``[..., 3, 3]`` (eV/Å³); NaN where the volume is zero (no periodic cell)."""
    safe = jnp.where(volume > 0, volume, 1.0)
    return jnp.where((volume > 0)[..., None, None], virial / safe[..., None, None], jnp.nan)


# ----------------------------------------------------------------------------- batched graphs (jraph)
def padding_masks(graph: jraph.GraphsTuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(node_mask [N], edge_mask [E], graph_mask [G])``: True for real entries.

    The last graph holds all padding nodes; other padding graphs are empty (a real graph never is).
    Padding edges are zero-shift self-loops, wherever they sit (both edge layouts).

    Works on numpy and on traced jax arrays (shapes are static).
    """
    xp = np if isinstance(graph.n_node, np.ndarray) else jnp
    n_nodes, n_graphs = graph.nodes["species"].shape[0], graph.n_node.shape[0]
    node_mask = xp.arange(n_nodes) < graph.n_node[:-1].sum()
    # A padding edge is a self-loop with zero shift; a real edge never is (an atom's own images have shifts).
    edge_mask = (graph.senders != graph.receivers) | xp.any(graph.edges["shifts"] != 0, axis=-1)
    graph_mask = (xp.arange(n_graphs) < n_graphs - 1) & (graph.n_node > 0)
    return node_mask, edge_mask, graph_mask


def edge_vectors(positions: jnp.ndarray, cell: jnp.ndarray, graph: jraph.GraphsTuple) -> jnp.ndarray:
    """``r_j + shifts @ cell_g − r_i`` for every edge, ``[E, 3]`` (``positions [N, 3]``, ``cell [G, 3, 3]``)."""
    edge_graph = jnp.repeat(jnp.arange(graph.n_edge.shape[0]), graph.n_edge, total_repeat_length=graph.senders.shape[0])
    offsets = jnp.einsum("ek,ekl->el", graph.edges["shifts"], cell[edge_graph])
    return positions[graph.senders] - positions[graph.receivers] + offsets


def make_energy_fn(config: GeoditeConfig, sorted_receivers: bool = True, neighbours_per_node: int | None = None,
                   chunk_edges: int | None = None,
                   fused: bool | None = None) -> Callable[..., tuple[jnp.ndarray, dict]]:
    """``fn(state, positions [N, 3], cell [G, 3, 3], graph, vacuum=None, dropout_rng=None) -> (E_total, aux)``,
    differentiable in positions, cell and ``state`` (a :class:`PotentialState`); with a ``dropout_rng`` the
    attention dropout is on (training).

    ``sorted_receivers``: the graph's receivers are non-decreasing (as :func:`batch_graphs` makes them).
    ``neighbours_per_node``: the graph uses the block layout of ``batch_graphs(..., neighbours_per_node=M)``.
    ``chunk_edges``: edge slots per chunk of receiver nodes in the block layout (see :class:`Geodite`).
    ``fused``: the fused CPU kernels (see :class:`Geodite`; None: where available and within budget).

    ``aux`` holds ``node_energies [N]`` (zero on padding), ``energy [G]`` and the unscaled components.
    """
    model = Geodite(config, chunk_edges, fused)

    def fn(state: PotentialState, positions: jnp.ndarray, cell: jnp.ndarray, graph: jraph.GraphsTuple,
           vacuum: jnp.ndarray | None = None, dropout_rng: jax.Array | None = None) -> tuple[jnp.ndarray, dict]:
        node_mask, edge_mask, _ = padding_masks(graph)
        species = graph.nodes["species"]
        node_energies, out = atom_energies(
            model, state, edge_vectors(positions, cell, graph), species, graph.senders, graph.receivers,
            edge_mask=edge_mask, vacuum=vacuum, sorted_receivers=sorted_receivers,
            neighbours_per_node=neighbours_per_node, dropout_rng=dropout_rng)
        node_energies = jnp.where(node_mask, node_energies, 0.0)
        n_graph = graph.n_node.shape[0]
        energy = jax.ops.segment_sum(node_energies, _node_graph(graph), n_graph, indices_are_sorted=True)
        aux = {"node_energies": node_energies, "energy": energy, "nn": out["nn"], "zbl": out["zbl"],
               "nn_per_layer": out["nn_per_layer"]}
        return node_energies.sum(), aux

    return fn


def make_predict_fn(config: GeoditeConfig, sorted_receivers: bool = True, neighbours_per_node: int | None = None,
                    chunk_edges: int | None = None, fused: bool | None = None) -> Callable[..., dict[str, jnp.ndarray]]:
    """``predict(state, graph, vacuum=None, dropout_rng=None) -> {"energy" [G], "forces" [N, 3], "stress"
    [G, 3, 3], "virial" [G, 3, 3], "node_energies" [N], ...}``.

    One autodiff pass gives forces and the strain derivative (:func:`strain_derivatives`); stress is NaN for
    graphs without volume (molecules). Not jitted: wrap it in ``jax.jit``.
    """
    energy_fn = make_energy_fn(config, sorted_receivers, neighbours_per_node, chunk_edges, fused)

    def predict(state: PotentialState, graph: jraph.GraphsTuple, vacuum: jnp.ndarray | None = None,
                dropout_rng: jax.Array | None = None) -> dict[str, jnp.ndarray]:
        positions, cell = graph.nodes["positions"], graph.globals["cell"]
        node_graph = _node_graph(graph)

        def strained_energy(pos: jnp.ndarray, strain: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
            deform = symmetric_deformation(strain)  # [G, 3, 3]
            pos = jnp.einsum("ni,nij->nj", pos, deform[node_graph])
            return energy_fn(state, pos, cell @ deform, graph, vacuum, dropout_rng)

        _, aux, forces, virial = strain_derivatives(strained_energy, positions, cell.shape)
        node_mask, _, _ = padding_masks(graph)
        stress = stress_from_virial(virial, jnp.abs(jnp.linalg.det(cell)))
        return {"energy": aux["energy"], "forces": jnp.where(node_mask[:, None], forces, 0.0),
                "stress": stress, "node_energies": aux["node_energies"], "virial": virial,
                "nn_per_layer": aux["nn_per_layer"], "nn": aux["nn"], "zbl": aux["zbl"]}

    return predict


def _node_graph(graph: jraph.GraphsTuple) -> jnp.ndarray:
    """Graph index of every node, ``[N]``."""
    n_graph, n_node = graph.n_node.shape[0], graph.nodes["species"].shape[0]
    return jnp.repeat(jnp.arange(n_graph), graph.n_node, total_repeat_length=n_node)
