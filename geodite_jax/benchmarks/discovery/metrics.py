"""Matbench Discovery metrics: stability classification (F1, precision, ...), regression (MAE, RMSE, R²), the
combined performance score, the fixed-hull prediction formula and the relaxed-structure RMSD. Hull distances
in eV/atom; a missing (NaN) prediction counts as predicted unstable."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from ase import Atoms

STABILITY_THRESHOLD = 0.0  # eV/atom
#: CPS weights (matbench-discovery ``DEFAULT_CPS_CONFIG``) and the RMSD scale of its geometry term.
CPS_WEIGHTS = {"F1": 0.5, "kappa_SRME": 0.4, "RMSD": 0.1}
CPS_RMSD_SCALE = 0.15


def r2_score(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """Coefficient of determination ``1 − Σ(y−ŷ)² / Σ(y−ȳ)²`` (sklearn's ``r2_score``), [n] -> float.

    NaN when fewer than two points or when ``y_true`` is constant (sklearn's degenerate cases differ; we
    refuse to invent a number).
    """
    y, p = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {y.shape} vs {p.shape}")
    ss_tot = float(np.sum((y - y.mean()) ** 2)) if y.size else 0.0
    if y.size < 2 or ss_tot == 0.0:
        return math.nan
    return 1.0 - float(np.sum((y - p) ** 2)) / ss_tot


def classify_stable(e_hull_true: Sequence[float], e_hull_pred: Sequence[float],
                    threshold: float = STABILITY_THRESHOLD) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks ``(TP, FN, FP, TN)`` [n] from true and predicted hull distances (eV/atom).

    Stable means ``e_hull ≤ threshold``; a NaN prediction is predicted unstable. A NaN true value is an
    error (the reference must be complete).
    """
    true, pred = np.asarray(e_hull_true, np.float64), np.asarray(e_hull_pred, np.float64)
    if true.shape != pred.shape or true.ndim != 1:
        raise ValueError(f"e_hull_true and e_hull_pred must be 1-d of equal length, got {true.shape} and {pred.shape}")
    if np.isnan(true).any():
        raise ValueError(f"e_hull_true contains {int(np.isnan(true).sum())} NaN values (reference must be complete)")
    actual = true <= threshold
    predicted = np.where(np.isnan(pred), False, pred <= threshold)
    return actual & predicted, actual & ~predicted, ~actual & predicted, ~actual & ~predicted


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def stable_metrics(e_hull_true: Sequence[float], e_hull_pred: Sequence[float],
                   threshold: float = STABILITY_THRESHOLD, prevalence: float | None = None) -> dict[str, float]:
    """Discovery metrics of predicted against true hull distances, [n], [n] -> dict.

    Keys: ``TP FN FP TN`` (counts), ``Precision Recall F1 Accuracy TPR FPR TNR FNR DAF`` and ``MAE RMSE R2``
    (eV/atom, over rows where the prediction is finite). ``DAF = Precision / prevalence``; ``prevalence``
    defaults to the stable fraction of ``e_hull_true`` (pass the unique-prototype prevalence for subsets).
    Undefined ratios (zero denominators) are NaN.
    """
    tp, fn, fp, tn = (int(m.sum()) for m in classify_stable(e_hull_true, e_hull_pred, threshold))
    n = tp + fn + fp + tn
    if n == 0:
        raise ValueError("stable_metrics needs at least one structure")
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall) if not math.isnan(precision + recall) else math.nan
    prevalence = _ratio(tp + fn, n) if prevalence is None else float(prevalence)
    true, pred = np.asarray(e_hull_true, np.float64), np.asarray(e_hull_pred, np.float64)
    ok = np.isfinite(pred)
    err = pred[ok] - true[ok]
    return {"TP": tp, "FN": fn, "FP": fp, "TN": tn, "Precision": precision, "Recall": recall, "F1": f1,
            "Accuracy": (tp + tn) / n, "TPR": recall, "FPR": _ratio(fp, fp + tn), "TNR": _ratio(tn, tn + fp),
            "FNR": _ratio(fn, fn + tp), "DAF": _ratio(precision, prevalence),
            "MAE": float(np.mean(np.abs(err))) if err.size else math.nan,
            "RMSE": float(np.sqrt(np.mean(err ** 2))) if err.size else math.nan,
            "R2": r2_score(true[ok], pred[ok]), "n": n, "n_missing": int((~ok).sum())}


def combined_performance_score(f1: float | None, kappa_srme: float | None, rmsd: float | None) -> float:
    """CPS = [0.5·F1 + 0.4·(1 − κ_SRME/2) + 0.1·clip(1 − RMSD/0.15, 0, 1)] / 1.0; NaN if any part is missing."""
    parts = (f1, kappa_srme, rmsd)
    if any(p is None or not math.isfinite(p) for p in parts):
        return math.nan
    scores = {"F1": float(f1), "kappa_SRME": 1.0 - float(kappa_srme) / 2.0,
              "RMSD": min(max(1.0 - float(rmsd) / CPS_RMSD_SCALE, 0.0), 1.0)}
    return sum(CPS_WEIGHTS[k] * v for k, v in scores.items()) / sum(CPS_WEIGHTS.values())


def predicted_hull_distance(e_form_pred: float | np.ndarray, e_form_dft: float | np.ndarray,
                            e_hull_dft: float | np.ndarray) -> float | np.ndarray:
    """Protocol step 4: ``Ê_hull = E_hull,DFT + e_form_pred − e_form_DFT`` on the fixed DFT hull (eV/atom)."""
    return np.asarray(e_hull_dft) + np.asarray(e_form_pred) - np.asarray(e_form_dft)


def structure_rmsd(relaxed: Atoms, reference: Atoms) -> float:
    """Normalised RMS displacement of pymatgen's ``StructureMatcher(stol=1.0, scale=False)``; 1.0 if unmatched."""
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.io.ase import AseAtomsAdaptor

    rms = StructureMatcher(stol=1.0, scale=False).get_rms_dist(
        AseAtomsAdaptor.get_structure(relaxed), AseAtomsAdaptor.get_structure(reference))
    return 1.0 if rms is None else float(rms[0])


def summarize(records: Sequence[dict[str, Any]], prevalence: float | None = None) -> dict[str, Any]:
    """Metrics over records that carry ``e_hull_true``; failures keep their (possibly missing) prediction."""
    scored = [r for r in records if r.get("e_hull_true") is not None]
    summary: dict[str, Any] = {"n_structures": len(records), "n_scored": len(scored),
                               "n_failed": sum(r.get("failure") is not None for r in records),
                               "n_not_converged": sum(not r.get("converged", False) for r in records),
                               "mean_steps": float(np.mean([r.get("steps", 0) for r in records])) if records else 0.0}
    if scored:
        pred = [math.nan if r.get("e_hull_pred") is None else r["e_hull_pred"] for r in scored]
        summary.update(stable_metrics([r["e_hull_true"] for r in scored], pred, prevalence=prevalence))
    return summary
