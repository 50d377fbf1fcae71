"""Parity plots and learning curves as PNG (matplotlib, imported only here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..files import save_figure
from .evaluation import EV_PER_A3_TO_GPA, Predictions


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plots need matplotlib (pip install matplotlib)") from err
    return plt


def parity_plot(pred: Predictions, ds: Any, path: str | Path, baseline: Predictions | None = None,
                title: str = "") -> Path:
    """Predicted vs reference energy per atom, force components and stress components (one panel each)."""
    plt = _pyplot()
    n_atoms = np.asarray(ds.n_atoms)[pred.indices]
    offsets = np.concatenate([[0], np.cumsum(n_atoms)])
    ref = {"energy": [], "forces": [], "stress": []}
    got = {"energy": [], "forces": [], "stress": []}
    for k, i in enumerate(pred.indices):
        lab = ds.labels(int(i))
        if lab["has_energy"]:
            ref["energy"].append(lab["energy"] / n_atoms[k])
            got["energy"].append(pred.energy[k] / n_atoms[k])
        if lab["has_forces"]:
            ref["forces"].append(np.ravel(lab["forces"]))
            got["forces"].append(pred.forces[offsets[k]:offsets[k + 1]].ravel())
        if lab["has_stress"] and np.all(np.isfinite(pred.stress[k])):
            ref["stress"].append(np.ravel(lab["stress"]) * EV_PER_A3_TO_GPA)
            got["stress"].append(pred.stress[k].ravel() * EV_PER_A3_TO_GPA)
    panels = [(t, u) for t, u in (("energy", "eV/atom"), ("forces", "eV/Å"), ("stress", "GPa")) if ref[t]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (term, unit) in zip(axes[0], panels, strict=True):
        x = np.hstack(ref[term])
        y = np.hstack(got[term])
        mae = np.mean(np.abs(y - x))
        ax.scatter(x, y, s=4, alpha=0.5, label=f"model (MAE {mae:.3g})")
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"reference {term} ({unit})")
        ax.set_ylabel(f"predicted {term} ({unit})")
        ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path, dpi=120, title=title)


def _resumed_series(records: list[dict]) -> list[dict]:
    """One record per step: where the steps go back (a log written by a resumed run before logs were
    truncated on resume), the later records replace the earlier ones from that step on."""
    out: list[dict] = []
    for record in records:
        while out and out[-1]["step"] >= record["step"]:
            out.pop()
        out.append(record)
    return out


def learning_curves(log_file: str | Path, path: str | Path, title: str = "") -> Path:
    """Training loss (per logged window) and validation MAEs (per epoch) against the step, log scale."""
    plt = _pyplot()
    records = []
    for line in Path(log_file).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    train = _resumed_series([r for r in records if "train_loss" in r])
    valid = _resumed_series([r for r in records if "valid_loss" in r])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].semilogy([r["step"] for r in train], [r["train_loss"] for r in train], label="train", lw=0.8)
    if valid:
        axes[0].semilogy([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid", ms=3)
    axes[0].set_title("loss (normalised)")
    for ax, term, scale, unit in ((axes[1], "energy", 1e3, "meV/atom"), (axes[2], "forces", 1e3, "meV/Å")):
        ax.semilogy([r["step"] for r in train], [scale * r[f"train_{term}_mae"] for r in train], lw=0.8,
                    label="train")
        if valid:
            ax.semilogy([r["step"] for r in valid], [scale * r[f"valid_{term}_mae"] for r in valid], "o-", ms=3,
                        label="valid (EMA)")
        ax.set_title(f"{term} MAE ({unit})")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120, title=title)
