"""Simulation with Geodite: jax-md MD (NVE/NVT/NPT) and FIRE, ASE relaxation, batched replicas,
differentiable trajectories, trajectory I/O. See :mod:`.jaxmd` for the conventions (jax-md boxes,
fractional coordinates) and :mod:`.neighbors` for the two-level neighbour lists."""

from .differentiable import make_nve_observable
from .io import CSVLog, TrajectoryWriter, read_structure
from .jaxmd import JaxMDSystem, geodite_neighbor_list, jaxmd_system, make_energy_forces_stress, make_geodite_energy
from .md import ENSEMBLES, MDRunner, MDSettings, MDState
from .neighbors import GeoditeNeighborFns, GeoditeNeighborList, minimum_image_repeat, perpendicular_widths
from .relax import RelaxResult, relax_ase, relax_jaxmd, relax_structures
from .replicas import ReplicaRun, ReplicaRunner, replica_positions

__all__ = [
    "CSVLog", "ENSEMBLES", "GeoditeNeighborFns", "GeoditeNeighborList", "JaxMDSystem", "MDRunner", "MDSettings",
    "MDState", "RelaxResult", "ReplicaRun", "ReplicaRunner", "TrajectoryWriter", "geodite_neighbor_list",
    "jaxmd_system", "make_energy_forces_stress", "make_geodite_energy", "make_nve_observable", "minimum_image_repeat",
    "perpendicular_widths", "read_structure", "relax_ase", "relax_jaxmd", "relax_structures", "replica_positions",
]
