"""Graph construction, neighbour search, padding and input validation."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list

import geodite_jax as gd


def pair_set(i, j, shifts):
    return sorted(zip(i.tolist(), j.tolist(), map(tuple, np.asarray(shifts).astype(int).tolist()), strict=True))


@pytest.mark.parametrize("case", ["si_primitive", "triclinic_small", "slab", "wire", "molecule", "hcp"])
def test_neighbour_list_matches_ase(case):
    if case == "si_primitive":
        atoms = bulk("Si", "diamond", a=5.43)  # cell far smaller than 6 Å: many images, own images too
    elif case == "triclinic_small":
        atoms = Atoms("LiP", scaled_positions=[[0.1, 0.2, 0.3], [0.6, 0.5, 0.9]], cell=[3.1, 3.6, 4.0, 70, 80, 110],
                      pbc=True)
    elif case == "slab":
        atoms = fcc111("Cu", (2, 2, 3), vacuum=5.0)
    elif case == "wire":
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.pbc = [False, False, True]
    elif case == "molecule":
        atoms = molecule("C6H6")
    else:
        atoms = bulk("Ti", "hcp", a=2.95, c=4.68)
    atoms.rattle(0.02, seed=1)
    cutoff = 6.0
    i, j, s = neighbor_list("ijS", atoms, cutoff)
    cell = atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3))
    ri, sj, shifts, dist = gd.neighbour_list(atoms.positions, cell, atoms.pbc, cutoff)
    assert pair_set(ri, sj, shifts) == pair_set(i, j, s)
    assert np.all(np.diff(ri) >= 0)  # sorted by receiver
    vec = atoms.positions[sj] + shifts @ atoms.cell.array - atoms.positions[ri]
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), dist, atol=1e-10)


def test_graph_fields_and_padding():
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    g = gd.atoms_to_graph(atoms, 5.0)
    assert g.nodes["positions"].shape == (2, 3) and g.nodes["species"].dtype == np.int32
    assert g.edges["shifts"].shape == (int(g.n_edge[0]), 3) and g.globals["cell"].shape == (1, 3, 3)
    b = gd.batch_graphs([g, g], n_node=16, n_edge=2048, n_graph=4)
    node_mask, edge_mask, graph_mask = gd.padding_masks(b)
    assert node_mask.sum() == 4 and edge_mask.sum() == 2 * g.n_edge[0] and graph_mask.tolist() == [1, 1, 0, 0]
    assert np.all(np.diff(b.receivers) >= 0)
    assert np.all(b.senders[~edge_mask] == 4) and np.all(b.receivers[~edge_mask] == 4)
    with pytest.raises(ValueError, match="does not fit the padding budget"):
        gd.batch_graphs([g, g], n_node=4, n_edge=2048)


def test_bucket_ladder_is_few_sizes():
    sizes = {gd.bucket(n, 256, 64) for n in range(1, 20000)}
    assert len(sizes) < 25
    assert all(gd.bucket(n, 8, 8) >= n for n in range(1, 3000))


def test_alone_equals_inside_padded_batch(tiny):
    """The same structure alone and inside a padded batch with others gives the same numbers."""
    import jax
    import jax.numpy as jnp

    a = bulk("NaCl", "rocksalt", a=5.64).repeat((2, 1, 1))
    a.rattle(0.05, seed=1)
    b = molecule("CH3CH2OH")
    c = bulk("Cu", "fcc", a=3.6)
    c.rattle(0.05, seed=2)
    cut, ne = tiny.config.cutoff, tiny.config.num_elements
    ga, gb, gc = (gd.atoms_to_graph(x, cut, ne, np.float64) for x in (a, b, c))
    predict = jax.jit(gd.make_predict_fn(tiny.config))
    state = tiny.state(jnp.float64)
    alone = predict(state, jax.tree_util.tree_map(jnp.asarray, gd.batch_graphs([ga])))
    batch = predict(state, jax.tree_util.tree_map(jnp.asarray,
                                                  gd.batch_graphs([gb, ga, gc], n_node=64, n_edge=4096, n_graph=5)))
    na, nb = len(a), len(b)
    np.testing.assert_allclose(batch["energy"][1], alone["energy"][0], rtol=1e-13)
    np.testing.assert_allclose(batch["forces"][nb:nb + na], alone["forces"][:na], atol=1e-11)
    np.testing.assert_allclose(batch["stress"][1], alone["stress"][0], atol=1e-13)
    assert np.all(np.isfinite(np.asarray(batch["forces"])))
    assert np.all(np.asarray(batch["forces"])[nb + na + len(c):] == 0)  # padding nodes
    assert np.all(np.asarray(batch["node_energies"])[nb + na + len(c):] == 0)
    assert np.isnan(batch["stress"][0]).all()  # the molecule has no stress
    assert batch["energy"][3] == 0 and batch["energy"][4] == 0  # padding graphs


def test_structures_in_one_bucket_compile_once(tiny):
    calc = gd.GeoditeCalculator(tiny, dtype="float64")
    for n, seed in [(2, 0), (2, 1), (2, 2)]:
        atoms = bulk("Cu", "fcc", a=3.6).repeat((n, 1, 1))
        atoms.rattle(0.05, seed=seed)
        atoms.calc = calc
        atoms.get_forces()
    # a different structure of a size in the same bucket
    atoms = bulk("Al", "fcc", a=4.05).repeat((2, 1, 1))
    atoms.calc = calc
    atoms.get_potential_energy()
    assert calc.compile_count == 1


@pytest.mark.parametrize("make, message", [
    (lambda: Atoms(), "empty structure"),
    (lambda: Atoms(numbers=[0, 1], positions=[[0, 0, 0], [1, 0, 0]]), "unknown element: atomic number 0"),
    (lambda: Atoms(numbers=[119, 1], positions=[[0, 0, 0], [1, 0, 0]]), "unknown element: atomic number 119"),
    (lambda: Atoms("Fm", positions=[[0, 0, 0]]), "Fm \\(Z=100\\) at atom 0 is not known to this model"),
    (lambda: Atoms("H2", positions=[[0, 0, 0], [np.nan, 0, 0]]), "NaN or inf"),
    (lambda: Atoms("H2", positions=[[0, 0, 0], [np.inf, 0, 0]]), "NaN or inf"),
    (lambda: Atoms("H2", positions=[[0, 0, 0], [1, 0, 0]], cell=[[1, 0, 0], [2, 0, 0], [0, 0, 1]], pbc=True),
     "singular cell"),
    (lambda: Atoms("H2", positions=[[0, 0, 0], [1, 0, 0]], cell=[[np.nan, 0, 0], [0, 1, 0], [0, 0, 1]], pbc=True),
     "cell contains NaN"),
    (lambda: Atoms("H2", positions=[[0, 0, 0], [0.05, 0, 0]]), "overlapping atoms"),
    (lambda: Atoms("H2", positions=[[0, 0, 0], [0, 0, 0]], cell=[5, 5, 5], pbc=True), "overlapping atoms"),
])
def test_bad_input_gives_clear_error(tiny, make, message):
    calc = gd.GeoditeCalculator(tiny)
    atoms = make()
    with pytest.raises(ValueError, match=message):
        calc.calculate(atoms, ["energy", "forces"])


def test_stress_of_a_molecule_is_not_a_silent_zero(tiny):
    from ase.calculators.calculator import PropertyNotImplementedError

    atoms = molecule("H2O")
    atoms.calc = gd.GeoditeCalculator(tiny)
    atoms.get_forces()
    with pytest.raises(PropertyNotImplementedError, match="non-periodic"):
        atoms.get_stress()


def test_neighbour_block_layout_gives_the_same_numbers(tiny):
    """Block layout (every node owns M edge slots) and sparse layout agree to float64 precision."""
    import jax
    import jax.numpy as jnp

    a = bulk("NaCl", "rocksalt", a=5.64).repeat((2, 1, 1))
    a.rattle(0.05, seed=1)
    b = molecule("CH3CH2OH")
    c = bulk("Si", "diamond", a=5.43)
    c.rattle(0.05, seed=4)
    graphs = [gd.atoms_to_graph(x, tiny.config.cutoff, dtype=np.float64) for x in (a, b, c)]
    m = gd.max_degree(graphs) + 3
    state = tiny.state(jnp.float64)
    sparse = jax.jit(gd.make_predict_fn(tiny.config))(
        state, jax.tree_util.tree_map(jnp.asarray, gd.batch_graphs(graphs, n_node=24, n_graph=4)))
    blocked = gd.batch_graphs(graphs, n_node=24, n_graph=4, neighbours_per_node=m)
    node_mask, edge_mask, _ = gd.padding_masks(blocked)
    assert blocked.senders.shape == (24 * m,) and edge_mask.sum() == sum(int(g.n_edge[0]) for g in graphs)
    assert np.all(blocked.receivers == np.repeat(np.arange(24), m))
    block = jax.jit(gd.make_predict_fn(tiny.config, neighbours_per_node=m))(
        state, jax.tree_util.tree_map(jnp.asarray, blocked))
    np.testing.assert_allclose(block["energy"], sparse["energy"], rtol=1e-12)
    np.testing.assert_allclose(block["forces"], sparse["forces"], atol=1e-10)
    np.testing.assert_allclose(np.asarray(block["stress"])[[0, 2]], np.asarray(sparse["stress"])[[0, 2]], atol=1e-12)
    with pytest.raises(ValueError, match="more than neighbours_per_node"):
        gd.batch_graphs(graphs, neighbours_per_node=m - 4)


def test_calculator_switches_layout_and_stays_exact(tiny):
    """A crystal (block layout) and a slab with vacuum (sparse layout) through one calculator."""
    calc = gd.GeoditeCalculator(tiny, dtype="float64")
    crystal = bulk("Cu", "fcc", a=3.6).repeat((4, 4, 4))
    crystal.rattle(0.05, seed=3)
    slab = fcc111("Cu", (2, 2, 4), vacuum=6.0)
    for atoms in (crystal, slab):
        atoms.calc = calc
        forces = atoms.get_forces()
        np.testing.assert_allclose(forces.sum(0), 0, atol=1e-9)
    assert set(calc._predictors) == {None, calc._block_budget}
