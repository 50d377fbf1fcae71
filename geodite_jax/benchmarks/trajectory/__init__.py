"""Analysis of MD trajectories against a reference (AIMD): RDFs, RDF overlap, MSD, diffusivity, stability.

One module an idea: :mod:`.frames` (reading XDATCARs, cell geometry, pair search), :mod:`.rdf`, :mod:`.diffusion`
(unwrapping, MSD, diffusivity), :mod:`.stability`; their public names are all here.

Pure NumPy (plus vesin for periodic pair search, so any triclinic cell works); no JAX. Conventions:
positions in Å, cells as ASE row vectors ``[3, 3]``, times in ps, energies in eV.

RDF error and overlap follow ``../shared/docs/data_and_benchmarks.md`` §2.5 (the Matbench MD protocol)::

    rdf_error   = 100 · min(1, ∫|g_ref − g_pred| dr / ∫|g_ref − 1| dr)      (500 bins up to r_max)
    rdf_overlap = 1 − rdf_error / 100                                       (1 = identical, 0 = no better than g ≡ 1)

``r_max`` defaults to half the shortest perpendicular width of the cell (for a cubic cell, half the
shortest cell vector as in the protocol), the largest radius at which no pair is seen twice.
"""

from .diffusion import A2_PER_PS_TO_CM2_PER_S, MSD, Diffusivity, diffusivity, msd, msd_by_species, unwrap
from .frames import default_r_max, perpendicular_widths, read_xdatcar
from .rdf import RDF, coordination_number, rdf, rdf_error, rdf_overlap
from .stability import StabilityReport, nearest_neighbour_distances, stability_report

__all__ = [
    "A2_PER_PS_TO_CM2_PER_S", "MSD", "RDF", "Diffusivity", "StabilityReport", "coordination_number", "default_r_max",
    "diffusivity", "msd", "msd_by_species", "nearest_neighbour_distances", "perpendicular_widths", "rdf",
    "rdf_error", "rdf_overlap", "read_xdatcar", "stability_report", "unwrap",
]
