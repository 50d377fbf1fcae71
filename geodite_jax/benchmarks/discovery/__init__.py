"""Matbench Discovery: classification/regression metrics, CPS, MP2020-corrected hull distances, relax driver.

Definitions follow ``data_and_benchmarks.md`` §2.1 (matbench-discovery ``metrics/discovery.py`` at commit
2c7f9fc): a material is stable when its hull distance is ≤ ``STABILITY_THRESHOLD`` = 0 eV/atom; a missing
(NaN) prediction counts as predicted *unstable*; MAE, RMSE and R² use the rows where both values exist.
Energies are total energies in eV, hull distances and formation energies in eV/atom.

One module an idea: :mod:`.metrics` (classification and regression metrics, CPS), :mod:`.hull` (MP2020
corrections, formation energies, hull distances), :mod:`.driver` (structure input, the resumable
relax-and-predict driver); their public names are all here.
"""

from .driver import (
    DEFAULT_FMAX,
    DEFAULT_MAX_STEPS,
    ID_KEYS,
    predict_record,
    read_jsonl,
    read_structures,
    relax,
    relax_and_predict,
    structure_id,
)
from .hull import (
    E_FORM_DFT_KEY,
    E_HULL_DFT_KEY,
    ELEMENTAL_REFS_FILE,
    elemental_reference_energies,
    formation_energy_per_atom,
    hull_distance,
    load_reference_entries,
    mp2020_corrected_energy,
    mp_parameters,
)
from .metrics import (
    CPS_RMSD_SCALE,
    CPS_WEIGHTS,
    STABILITY_THRESHOLD,
    classify_stable,
    combined_performance_score,
    predicted_hull_distance,
    r2_score,
    stable_metrics,
    structure_rmsd,
    summarize,
)

__all__ = [
    "CPS_RMSD_SCALE", "CPS_WEIGHTS", "DEFAULT_FMAX", "DEFAULT_MAX_STEPS", "ELEMENTAL_REFS_FILE", "E_FORM_DFT_KEY",
    "E_HULL_DFT_KEY", "ID_KEYS", "STABILITY_THRESHOLD", "classify_stable", "combined_performance_score",
    "elemental_reference_energies", "formation_energy_per_atom", "hull_distance", "load_reference_entries",
    "mp2020_corrected_energy", "mp_parameters", "predict_record", "predicted_hull_distance", "r2_score",
    "read_jsonl", "read_structures", "relax", "relax_and_predict", "stable_metrics", "structure_id",
    "structure_rmsd", "summarize",
]
