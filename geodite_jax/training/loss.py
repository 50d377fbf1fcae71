"""Losses on energy per atom, force components and stress components, in the Geodite recipe's normalised units.

All functions return *sums and counts* rather than means, so that sub-batches on several devices combine
into exactly the mean over the global batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

TERMS = ("energy", "forces", "stress")


class LossNorms(NamedTuple):
    """Scales that make the three targets O(1): eV/atom, eV/Å, eV/Å³."""

    energy: float
    forces: float
    stress: float


def penalty(x: jnp.ndarray, kind: str, delta: float) -> jnp.ndarray:
    """Element-wise loss of a normalised error: Huber (quadratic below ``delta``), squared or absolute."""
    if kind == "mse":
        return x**2
    if kind == "mae":
        return jnp.abs(x)
    ax = jnp.abs(x)
    return jnp.where(ax <= delta, 0.5 * x**2, delta * (ax - 0.5 * delta))


def errors(pred: dict[str, jnp.ndarray], batch: Any) -> dict[str, jnp.ndarray]:
    """Physical errors with unlabelled / padding entries zeroed: energy per atom ``[G]`` (eV/atom), forces
    ``[N, 3]`` (eV/Å), stress ``[G, 3, 3]`` (eV/Å³)."""
    n_atoms = jnp.maximum(batch.graph.n_node, 1).astype(pred["energy"].dtype)
    e = jnp.where(batch.energy_weight > 0, (pred["energy"] - batch.energy) / n_atoms, 0.0)
    f = jnp.where(batch.forces_weight[:, None] > 0, pred["forces"] - batch.forces, 0.0)
    # Predicted stress is NaN for volume-less graphs (molecules, padding): never selected there.
    s = jnp.where(batch.stress_weight[:, None, None] > 0, pred["stress"] - batch.stress, 0.0)
    return {"energy": e, "forces": f, "stress": s}


def counts(batch: Any) -> dict[str, jnp.ndarray]:
    """Number of labelled entries of each term (weights summed; 3 per force, 9 per stress)."""
    return {"energy": batch.energy_weight.sum(), "forces": 3.0 * batch.forces_weight.sum(),
            "stress": 9.0 * batch.stress_weight.sum()}


def loss_sums(pred: dict[str, jnp.ndarray], batch: Any, norms: LossNorms, kind: str, delta: float,
              ) -> dict[str, jnp.ndarray]:
    """Per term: the summed penalty (normalised units) and the summed |error| and error² (physical units)."""
    err = errors(pred, batch)
    weights = {"energy": batch.energy_weight, "forces": batch.forces_weight[:, None],
               "stress": batch.stress_weight[:, None, None]}
    out = {}
    for term in TERMS:
        x = err[term]
        w = weights[term]
        out[f"{term}_loss"] = jnp.sum(w * penalty(x / getattr(norms, term), kind, delta))
        out[f"{term}_abs"] = jnp.sum(w * jnp.abs(x))
        out[f"{term}_sq"] = jnp.sum(w * x**2)
    return out


def combine(sums: dict[str, jnp.ndarray], count: dict[str, jnp.ndarray], weights: dict[str, float],
            ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Total loss ``Σ_k w_k L_k`` and MAE/RMSE per term from (global) sums and counts."""
    total = 0.0
    metrics = {}
    for term in TERMS:
        n = jnp.maximum(count[term], 1.0)
        term_loss = sums[f"{term}_loss"] / n
        total = total + weights[term] * term_loss
        metrics[f"{term}_loss"] = term_loss
        metrics[f"{term}_mae"] = sums[f"{term}_abs"] / n
        metrics[f"{term}_rmse"] = jnp.sqrt(sums[f"{term}_sq"] / n)
    metrics["loss"] = total
    return total, metrics
