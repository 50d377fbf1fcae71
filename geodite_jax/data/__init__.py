"""Training data: labelled frames, readers, the memory-mapped graph store, batching and the EMT generator.

Pipeline: ``read_frames(path)`` -> ``preprocess(frames, dir, cutoff=...)`` (neighbour lists once, on disk) ->
``GraphDataset.open(dir)`` -> ``budget_for(ds, ...)`` -> ``iterate_batches(ds, indices, budget, ...)``.
"""

from .batching import (
    Batch,
    BatchBudget,
    budget_for,
    collate,
    fitting_budget,
    iterate_batches,
    num_batches,
    plan_batches,
    prefetch,
    stack_batches,
)
from .emt import generate_emt_frames
from .frames import Frame
from .pymatgen_json import kbar_to_ase_stress, mlearn_voigt_to_3x3, structure_from_pymatgen
from .readers import FILE_FORMATS, detect_format, read_frames
from .splits import split_frames, split_indices
from .stats import DatasetStats, compute_stats, fit_element_energies
from .store import GraphDataset, preprocess

__all__ = [
    "FILE_FORMATS", "Batch", "BatchBudget", "DatasetStats", "Frame", "GraphDataset", "budget_for", "collate",
    "compute_stats", "detect_format", "fit_element_energies", "fitting_budget", "generate_emt_frames",
    "iterate_batches", "kbar_to_ase_stress", "mlearn_voigt_to_3x3", "num_batches", "plan_batches", "prefetch",
    "preprocess", "read_frames", "split_frames", "split_indices", "stack_batches", "structure_from_pymatgen",
]
