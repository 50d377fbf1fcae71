"""geodite_jax: Geodite, an O(3)-equivariant interatomic potential without tensor products, in JAX/Flax."""

from . import host_memory, xla_setup  # noqa: F401  (first: process settings that must precede JAX's backend)
from .calculator import GeoditeCalculator
from .config import GeoditeConfig
from .energy import PotentialState, atom_energies, make_energy_fn, make_predict_fn, padding_masks
from .graph import atoms_to_graph, batch_graphs, bucket, max_degree, neighbour_list, validate_atoms
from .model import Geodite, count_params, init_params
from .potential import Potential
from .precision import enable_float64

__version__ = "0.1.0"

__all__ = [
    "Geodite", "GeoditeCalculator", "GeoditeConfig", "Potential", "PotentialState", "atom_energies",
    "atoms_to_graph", "batch_graphs", "bucket", "count_params", "enable_float64", "init_params", "make_energy_fn",
    "make_predict_fn", "max_degree", "neighbour_list", "padding_masks", "validate_atoms",
]
