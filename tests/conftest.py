"""Shared fixtures: float64 mode, small potentials and an evaluator."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

import geodite_jax as gd  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def perturbed(pot: gd.Potential, seed: int, scale: float = 0.3) -> gd.Potential:
    """The same potential with every parameter perturbed (so no test relies on special initial values)."""
    leaves, treedef = jax.tree_util.tree_flatten(pot.params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = [np.asarray(x) + scale * np.sqrt(np.mean(np.asarray(x) ** 2) + 1e-4) *
           np.asarray(jax.random.normal(k, np.shape(x))) for x, k in zip(leaves, keys, strict=True)]
    params = jax.tree_util.tree_unflatten(treedef, new)
    return gd.Potential(pot.config, params, pot.element_energies, pot.energy_scale)


def sane_potential() -> gd.Potential:
    """The perturbed tiny potential with the universal ZBL kept: perturbed ZBL exponents can turn negative,
    which makes the repulsion grow with distance (hundreds of keV for a metal); MD needs a sane surface."""
    base = gd.Potential.init(gd.GeoditeConfig.preset("tiny"), seed=0, element_energies="mptrj")
    pert = perturbed(base, seed=1)
    params = jax.tree_util.tree_map(np.asarray, pert.params)
    for key in ("zbl_alpha", "zbl_beta", "zbl_coefs", "zbl_exps"):
        params["params"][key] = base.params["params"][key]
    return gd.Potential(pert.config, params, pert.element_energies, pert.energy_scale)


@pytest.fixture(scope="session")
def tiny() -> gd.Potential:
    base = gd.Potential.init(gd.GeoditeConfig.preset("tiny"), seed=0, element_energies="mptrj")
    return perturbed(base, seed=1)


class Evaluator:
    """Jitted energy/forces/stress of one potential for single structures, padded to buckets."""

    def __init__(self, pot: gd.Potential, dtype=jnp.float64) -> None:
        self.pot, self.dtype = pot, dtype
        self.state = pot.state(dtype)
        self.predict = jax.jit(gd.make_predict_fn(pot.config))

    def __call__(self, atoms, n_node: int | None = None, n_edge: int | None = None) -> dict[str, np.ndarray]:
        np_dtype = np.float64 if self.dtype == jnp.float64 else np.float32
        graph = gd.atoms_to_graph(atoms, self.pot.config.cutoff, self.pot.config.num_elements, np_dtype)
        batch = gd.batch_graphs([graph], n_node, n_edge)
        out = self.predict(self.state, jax.tree_util.tree_map(jnp.asarray, batch))
        n = len(atoms)
        return {"energy": float(out["energy"][0]), "forces": np.asarray(out["forces"][:n]),
                "stress": np.asarray(out["stress"][0]), "energies": np.asarray(out["node_energies"][:n])}


@pytest.fixture(scope="session")
def evaluate(tiny) -> Evaluator:
    return Evaluator(tiny)
