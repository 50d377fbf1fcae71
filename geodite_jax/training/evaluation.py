"""Predictions over a dataset and the error table (energy meV/atom, forces meV/Å, stress GPa), with groups.

The baseline beside every table is the per-element-mean model: energy = Σ_i E0(Z_i) with E0 fitted by least
squares on the training set, zero forces, and the training set's mean stress.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ase.units import GPa

from ..config import GeoditeConfig
from ..energy import as_dtype, make_predict_fn
from ..potential import Potential
from ..precision import resolve_dtype

EV_PER_A3_TO_GPA = 1.0 / GPa


@dataclasses.dataclass
class Predictions:
    """Per-frame predictions for ``indices`` of a dataset (``forces`` concatenated in frame order)."""

    indices: np.ndarray  # [F] dataset indices
    energy: np.ndarray  # [F] total energy, eV
    forces: np.ndarray  # [sum of n_atoms, 3] eV/Å, frames in the order of ``indices``
    stress: np.ndarray  # [F, 3, 3] eV/Å³ (NaN where undefined)


def predict_dataset(state: dict, config: GeoditeConfig, ds: Any, indices: Sequence[int] | None = None,
                    budget: Any = None, dtype: Any = jnp.float32, progress: bool = False,
                    predict: Any = None) -> Predictions:
    """Energies, forces and stresses of ``ds[indices]`` with the model state ``state`` (see ``Potential.state``).

    Batches are packed in order to ``budget`` (default: sized for 8 typical structures), one compile.
    """
    from ..data import budget_for, iterate_batches

    indices = np.arange(len(ds)) if indices is None else np.asarray(indices, np.int64)
    budget = budget_for(ds, 8, indices=indices) if budget is None else budget
    predict = jax.jit(make_predict_fn(config)) if predict is None else predict
    n_atoms = np.asarray(ds.n_atoms)[indices]
    position = {int(i): k for k, i in enumerate(indices)}
    offsets = np.concatenate([[0], np.cumsum(n_atoms)])
    energy = np.full(len(indices), np.nan)
    stress = np.full((len(indices), 3, 3), np.nan)
    forces = np.full((int(offsets[-1]), 3), np.nan)
    batches = iterate_batches(ds, indices, budget, shuffle=False)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch", leave=False)
    for batch in batches:
        out = jax.device_get(predict(state, as_dtype(batch.graph, dtype)))
        node = 0
        for slot, index in enumerate(np.asarray(batch.indices)):
            n = int(batch.graph.n_node[slot])
            if index >= 0:
                k = position[int(index)]
                energy[k] = out["energy"][slot]
                stress[k] = out["stress"][slot]
                forces[offsets[k]:offsets[k + 1]] = out["forces"][node:node + n]
            node += n
    return Predictions(indices, energy, forces, stress)


def predict_potential(potential: Potential, ds: Any, indices: Sequence[int] | None = None, dtype: str = "float32",
                      progress: bool = False) -> Predictions:
    """:func:`predict_dataset` for a saved :class:`Potential` (checks the dataset's cutoff, and its elements with
    :meth:`Potential.check_elements`)."""
    jdtype = resolve_dtype(dtype)
    ds.require_cutoff(potential.config.cutoff)
    potential.check_elements(_elements_of(ds, indices))
    return predict_dataset(potential.state(jdtype), potential.config, ds, indices, dtype=jdtype, progress=progress)


def _elements_of(ds: Any, indices: Sequence[int] | None) -> list[int]:
    """Sorted atomic numbers present in ``ds[indices]`` (all of ``ds``: from its statistics)."""
    if indices is None:
        return sorted(int(z) for z in ds.stats.elements)
    return sorted({int(z) for i in indices for z in np.unique(ds.graph(int(i)).nodes["species"])})


def baseline_predictions(train_ds: Any, ds: Any, indices: Sequence[int] | None = None,
                         train_indices: Sequence[int] | None = None) -> Predictions:
    """The per-element-mean model fitted on ``train_ds[train_indices]``, applied to ``ds[indices]``."""
    from ..data import fit_element_energies

    train = train_ds if train_indices is None else train_ds.subset(np.asarray(train_indices))
    e0 = fit_element_energies(train)
    stresses = [train.labels(i)["stress"] for i in range(len(train)) if train.labels(i)["has_stress"]]
    mean_stress = np.mean(stresses, axis=0) if stresses else np.zeros((3, 3))
    indices = np.arange(len(ds)) if indices is None else np.asarray(indices, np.int64)
    energy, stress, forces = [], [], []
    for i in indices:
        species = np.asarray(ds.graph(int(i)).nodes["species"])
        energy.append(float(e0[species].sum()))
        stress.append(mean_stress)
        forces.append(np.zeros((len(species), 3)))
    return Predictions(indices, np.asarray(energy), np.concatenate(forces) if forces else np.zeros((0, 3)),
                       np.asarray(stress).reshape(-1, 3, 3))


def error_metrics(pred: Predictions, ds: Any, groups: bool = True) -> dict[str, dict[str, float]]:
    """MAE/RMSE of energy per atom (meV/atom), force components (meV/Å) and stress components (GPa).

    Returns ``{"all": {...}, "<group>": {...}}`` (groups only when the data have more than one).
    """
    labels = [ds.labels(int(i)) for i in pred.indices]
    names = np.asarray([ds.groups[int(i)] for i in pred.indices]) if groups else np.asarray([""] * len(labels))
    n_atoms = np.asarray(ds.n_atoms)[pred.indices]
    offsets = np.concatenate([[0], np.cumsum(n_atoms)])
    rows: dict[str, dict[str, list]] = {}
    for k, lab in enumerate(labels):
        keys = ["all"] + ([str(names[k])] if names[k] else [])
        entries: dict[str, list] = {"energy": [], "forces": [], "stress": []}
        if lab["has_energy"]:
            entries["energy"].append(np.atleast_1d((pred.energy[k] - lab["energy"]) / n_atoms[k] * 1e3))
        if lab["has_forces"]:
            entries["forces"].append((pred.forces[offsets[k]:offsets[k + 1]] - lab["forces"]).ravel() * 1e3)
        if lab["has_stress"] and np.all(np.isfinite(pred.stress[k])):
            entries["stress"].append((pred.stress[k] - lab["stress"]).ravel() * EV_PER_A3_TO_GPA)
        for key in keys:
            bucket = rows.setdefault(key, {"energy": [], "forces": [], "stress": [], "frames": []})
            bucket["frames"].append(1)
            for term, values in entries.items():
                bucket[term].extend(values)
    table = {}
    for key, bucket in rows.items():
        entry: dict[str, float] = {"frames": float(len(bucket["frames"]))}
        for term in ("energy", "forces", "stress"):
            if bucket[term]:
                err = np.concatenate(bucket[term])
                entry[f"{term}_mae"] = float(np.mean(np.abs(err)))
                entry[f"{term}_rmse"] = float(np.sqrt(np.mean(err**2)))
        table[key] = entry
    if len(table) == 2:  # a single group repeats "all"
        table = {"all": table["all"]}
    return table


_UNITS = {"energy": "meV/atom", "forces": "meV/Å", "stress": "GPa"}


def format_error_table(metrics: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]] | None = None,
                       title: str = "") -> str:
    """Markdown table: one row per group, MAE / RMSE per term, and the baseline's MAE beside ours."""
    header = ["group", "frames"]
    for term, unit in _UNITS.items():
        header += [f"E MAE ({unit})" if term == "energy" else f"{term[0].upper()} MAE ({unit})", "RMSE"]
        if baseline is not None:
            header.append("baseline MAE")
    lines = ([f"**{title}**", ""] if title else []) + ["| " + " | ".join(header) + " |",
                                                       "|" + "---|" * len(header)]
    for group, row in metrics.items():
        cells = [group, f"{int(row['frames'])}"]
        for term in _UNITS:
            digits = 4 if term == "stress" else 2
            cells += [f"{row[f'{term}_mae']:.{digits}f}" if f"{term}_mae" in row else "–",
                      f"{row[f'{term}_rmse']:.{digits}f}" if f"{term}_rmse" in row else "–"]
            if baseline is not None:
                base = baseline.get(group, {})
                cells.append(f"{base[f'{term}_mae']:.{digits}f}" if f"{term}_mae" in base else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
