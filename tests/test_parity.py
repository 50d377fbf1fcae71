"""Number-for-number parity with the authors' PyTorch implementation (issue 7).

Checkpoints of the reference implementation are converted and evaluated on the reference structures; the
reference's own energies, forces, stresses and per-atom energies (``reference_outputs.json``) are the target.
The small model runs on every structure, the Geodite-MP-sized model on a subset (CPU time), both in
float64 and float32. Needs ``../shared/data/geodite-reference`` (skipped without it) and torch for the
conversion (skipped without it).

Tolerances (issue 7): float64 1e-8 eV/atom in energy and per-atom energies, 1e-7 eV/Å in forces,
1e-9 eV/Å³ in stress; float32 1e-4 eV/atom and eV, 1e-3 eV/Å, 1e-5 relative in stress.

Which reference the float32 results are compared with: the float64 one, i.e. the exact function. The
reference's own float32 numbers are further from it than ours: it evaluates the C² switching polynomials
expanded, 1 − 21x⁵ + 35x⁶ − 15x⁷, which cancels catastrophically where the ZBL switch is small (Cu nearest
neighbours sit at x ≈ 0.97): its float32 Cu is 3e-4 eV/atom and 1-2e-2 eV/Å off its float64 (SOURCE.md:
torch.compile vs eager float32 alone differ by 8e-3 eV/Å there), while we evaluate the polynomials in
factored form and stay within the targets of the float64 numbers. Exception, ``_FLOAT32_TARGET``: the
O2 dimer at 0.6 Å sits at z = 10.0 and 10.6 Å; rounding 10.6 to float32 moves r by 3.8e-7 Å, which with
|F| = 1.4e3 eV/Å alone shifts E by 2.7e-4 eV/atom and F by ~1e-3 eV/Å in any float32 code. The reference
float32 run started from the same rounded input, so it is the target there (we match it to 5e-5 eV/atom,
2.5e-4 eV/Å).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

REF_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "geodite-reference"
MODELS = {"small": "geodite-small-perturbed.ckpt", "mp": "geodite-mp-perturbed.ckpt"}
ALL = ["Cu_fcc_2x2x2_rattled", "NaCl_rocksalt_2x2x2_rattled", "Si_diamond_2x2x2_rattled", "LiPS_triclinic_random",
       "ethanol_nonperiodic", "Fe_isolated_periodic", "O2_dimer_0.6A", "O2_dimer_1.2A", "O2_dimer_3.0A"]
# Geodite-MP size (CPU time): a triclinic cell with several images of a neighbour and wrapped atoms, a
# molecule, and the ZBL-dominated dimers (the large crystals cost seconds each at this size).
MP_SUBSET = ["LiPS_triclinic_random", "ethanol_nonperiodic", "O2_dimer_0.6A", "O2_dimer_1.2A"]
STRUCTURES = {"small": ALL, "mp": MP_SUBSET}
DTYPES = ("float64", "float32")

# energy: eV/atom, node: eV (per-atom energies), forces: eV/Å, stress: eV/Å³ (+ relative to max |σ|).
TOL = {"float64": {"energy": 1e-8, "node": 1e-8, "forces": 1e-7, "stress": 1e-9, "stress_rel": 1e-9},
       "float32": {"energy": 1e-4, "node": 1e-4, "forces": 1e-3, "stress": 1e-5, "stress_rel": 1e-5}}
_FLOAT32_TARGET = {"O2_dimer_0.6A": "float32"}  # see the module docstring; all others: "float64"

CASES = [(model, dtype, name) for model, names in STRUCTURES.items() for dtype in DTYPES for name in names]


def _require_reference() -> None:
    if not (REF_DIR / "reference_outputs.json").is_file():
        pytest.skip(f"reference data not found at {REF_DIR} (../shared/data/geodite-reference next to the repo)")


@cache
def _reference() -> tuple[dict, dict]:
    import ase.io

    outputs = json.loads((REF_DIR / "reference_outputs.json").read_text())["results"]
    frames = {atoms.info["name"]: atoms for atoms in ase.io.read(REF_DIR / "structures.extxyz", index=":")}
    return outputs, frames


@cache
def _potential(model: str):  # noqa: ANN202
    from geodite_jax.convert import potential_from_reference_checkpoint

    return potential_from_reference_checkpoint(REF_DIR / MODELS[model])


@cache
def _predictions(model: str, dtype: str) -> dict[str, dict[str, np.ndarray]]:
    """All structures of ``model`` in one padded batch: one compilation per model and dtype."""
    import jax
    import jax.numpy as jnp

    import geodite_jax as gd

    _, frames = _reference()
    pot = _potential(model)
    np_dtype, jnp_dtype = (np.float64, jnp.float64) if dtype == "float64" else (np.float32, jnp.float32)
    names = STRUCTURES[model]
    graphs = [gd.atoms_to_graph(frames[name], pot.config.cutoff, pot.config.num_elements, np_dtype) for name in names]
    batch = jax.tree_util.tree_map(jnp.asarray, gd.batch_graphs(graphs))
    out = jax.jit(gd.make_predict_fn(pot.config))(pot.state(jnp_dtype), batch, pot.vacuum_energies(jnp_dtype))
    assert out["forces"].dtype == jnp_dtype
    out = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), out)
    results, offset = {}, 0
    for index, (name, graph) in enumerate(zip(names, graphs, strict=True)):
        atoms = slice(offset, offset + int(graph.n_node[0]))
        offset = atoms.stop
        results[name] = {"energy": out["energy"][index], "stress": out["stress"][index], "forces": out["forces"][atoms],
                         "node_energies": out["node_energies"][atoms], "zbl": out["zbl"][atoms],
                         "nn_per_layer": out["nn_per_layer"][atoms]}
    return results


@pytest.fixture(scope="module")
def x64():
    """float64 runs need JAX's 64-bit mode (float32 arrays stay float32); restored afterwards."""
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="module")
def converted(x64):
    _require_reference()
    pytest.importorskip("torch")
    return _predictions


@pytest.mark.parametrize("model,dtype,name", CASES)
def test_matches_reference(converted, model, dtype, name):
    ours = converted(model, dtype)[name]
    outputs, frames = _reference()
    target = _FLOAT32_TARGET.get(name, "float64") if dtype == "float32" else "float64"
    ref = outputs[f"{model}/{target}"][name]
    tol = TOL[dtype]
    n_atoms = len(frames[name])
    where = f"{model}/{name}, our {dtype} vs reference {target}"

    d_energy = abs(ours["energy"] - ref["energy"]) / n_atoms
    assert d_energy <= tol["energy"], f"{where}: |ΔE|/atom = {d_energy:.3g} eV"
    d_node = np.abs(ours["node_energies"] - np.asarray(ref["per_atom_energy"])).max()
    assert d_node <= tol["node"], f"{where}: max |ΔE_i| = {d_node:.3g} eV"
    d_forces = np.abs(ours["forces"] - np.asarray(ref["forces"])).max()
    assert d_forces <= tol["forces"], f"{where}: max |ΔF| = {d_forces:.3g} eV/Å"
    if frames[name].pbc.all():  # the reference returns a zero stress for molecules (a code artefact)
        ref_stress = np.asarray(ref["stress_3x3"])
        allowed = tol["stress"] + tol["stress_rel"] * np.abs(ref_stress).max()
        d_stress = np.abs(ours["stress"] - ref_stress).max()
        assert d_stress <= allowed, f"{where}: max |Δσ| = {d_stress:.3g} eV/Å³ (allowed {allowed:.3g})"


@pytest.mark.parametrize("model,name", [(model, name) for model, names in STRUCTURES.items() for name in names])
def test_energy_components_match_reference(converted, model, name):
    """The unscaled ZBL and per-layer learned energies of every atom, separately (float64)."""
    ours = converted(model, "float64")[name]
    ref = _reference()[0][f"{model}/float64"][name]
    np.testing.assert_allclose(ours["zbl"], ref["per_atom_zbl_unscaled"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ours["nn_per_layer"], ref["per_atom_nn_per_layer_unscaled"], rtol=0, atol=1e-10)


def test_isolated_atom_is_its_reference_energy(converted):
    outputs, _ = _reference()
    for dtype in DTYPES:
        assert converted("small", dtype)["Fe_isolated_periodic"]["energy"] == pytest.approx(
            outputs[f"small/{dtype}"]["Fe_isolated_periodic"]["energy"], abs=1e-12)


@pytest.mark.parametrize("model,cutoff", [("small", 5.0), ("mp", 6.0)])
def test_neighbour_lists_match_reference(model, cutoff):
    """Our edges (receiver, sender, cell shift) are exactly the reference's, for every structure.

    The reference wraps positions into the cell first and stores shifts relative to the wrapped
    positions, with edge vector r_j − r_i − shift·cell; converted to our unwrapped convention here.
    """
    _require_reference()
    import geodite_jax as gd

    edges = np.load(REF_DIR / "reference_edges.npz")
    _, frames = _reference()
    for name, atoms in frames.items():
        index, shifts = edges[f"{model}/{name}/index"], edges[f"{model}/{name}/shifts"]
        senders, receivers = index
        wrap = np.zeros((len(atoms), 3))
        if atoms.pbc.all():  # wrapped = positions + wrap @ cell
            wrap = -np.floor(np.linalg.solve(atoms.cell.array.T, atoms.positions.T).T)
        ours_shifts = np.rint(-shifts + wrap[senders] - wrap[receivers]).astype(int)
        reference = sorted(zip(receivers.tolist(), senders.tolist(), map(tuple, ours_shifts.tolist()), strict=True))
        graph = gd.atoms_to_graph(atoms, cutoff, dtype=np.float64)
        ours = sorted(zip(graph.receivers.tolist(), graph.senders.tolist(),
                          map(tuple, np.rint(graph.edges["shifts"]).astype(int).tolist()), strict=True))
        assert ours == reference, f"{model}/{name}: {len(ours)} edges, reference {len(reference)}"


def test_ase_calculator_matches_reference(converted):
    """The user path: the converted potential in GeoditeCalculator (float64, triclinic cell, wrapped atoms)."""
    import geodite_jax as gd

    outputs, frames = _reference()
    ref = outputs["small/float64"]["LiPS_triclinic_random"]
    atoms = frames["LiPS_triclinic_random"].copy()
    atoms.calc = gd.GeoditeCalculator(_potential("small"), dtype="float64")
    assert atoms.get_potential_energy() == pytest.approx(ref["energy"], abs=1e-8 * len(atoms))
    np.testing.assert_allclose(atoms.get_forces(), ref["forces"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(atoms.get_stress(), ref["stress_voigt"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(atoms.get_potential_energies(), ref["per_atom_energy"], rtol=0, atol=1e-8)
