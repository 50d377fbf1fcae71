"""On-disk graph store: round trip, neighbour lists, memory mapping, atomic writes, E0 fit, statistics."""

from __future__ import annotations

import numpy as np
import pytest

from geodite_jax.data import Frame, GraphDataset, fit_element_energies, generate_emt_frames, preprocess
from geodite_jax.graph import atoms_to_graph

CUTOFF = 5.0


@pytest.fixture(scope="module")
def frames():
    """EMT crystals plus the awkward cases: a molecule, a slab (mixed pbc), an unlabelled frame."""
    rng = np.random.default_rng(0)
    out = generate_emt_frames(24, seed=3)
    out.append(Frame([8, 1, 1], [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], np.zeros((3, 3)), [False] * 3,
                     energy=-14.2, forces=rng.normal(size=(3, 3)), group="water", id="mol"))
    out.append(Frame([29, 29, 28], [[0, 0, 0], [1.8, 1.8, 0], [0, 1.8, 1.8]], np.diag([3.6, 3.6, 0.0]),
                     [True, True, False], energy=-3.1, forces=rng.normal(size=(3, 3)), group="slab", id="slab"))
    out.append(Frame([13] * 4, [[0, 0, 0], [2, 2, 0], [2, 0, 2], [0, 2, 2]], np.eye(3) * 4.0, [True] * 3,
                     group="nolabel", id="bare"))
    return out


@pytest.fixture(scope="module")
def store(frames, tmp_path_factory):
    return preprocess(frames, tmp_path_factory.mktemp("s") / "store", cutoff=CUTOFF, shard_size=7,
                      progress=False, source="test")


def test_round_trip(frames, store):
    assert len(store) == len(frames) and len(store._shards) == 4  # 27 frames in shards of 7
    for i, f in enumerate(frames):
        assert store.frame(i).equals(f), f.id
    assert list(store.ids) == [f.id for f in frames] and list(store.groups) == [f.group for f in frames]
    np.testing.assert_array_equal(store.n_atoms, [len(f) for f in frames])
    bare = store.labels(len(frames) - 1)
    assert not (bare["has_energy"] or bare["has_forces"] or bare["has_stress"])
    mol = store.labels(len(frames) - 3)
    assert mol["has_energy"] and mol["has_forces"] and not mol["has_stress"]
    memory = GraphDataset.from_frames(frames, CUTOFF)
    assert all(memory.frame(i).equals(f) for i, f in enumerate(frames))


def test_neighbour_lists_equal_atoms_to_graph(frames, store):
    for i, f in enumerate(frames):
        ref = atoms_to_graph(f.to_atoms(), CUTOFF, 100, np.float64)
        got = store.graph(i)
        for a, b in zip(got, ref, strict=True):  # every field of the GraphsTuple
            if isinstance(a, dict):
                assert a.keys() == b.keys()
                for k in a:
                    assert a[k].dtype == b[k].dtype, (f.id, k)
                    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{f.id} {k}")
            else:
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a, b, err_msg=f.id)
    assert store.n_edges.sum() > 0 and store.n_edges[-3] == 6  # the water molecule: 3 x 2 directed edges


def test_mmap_open(store):
    mapped = GraphDataset.open(store.path)
    loaded = GraphDataset.open(store.path, mmap=False)
    assert isinstance(mapped._shards[0]["positions"], np.memmap)
    assert not isinstance(loaded._shards[0]["positions"], np.memmap)
    for i in (0, 9, len(store) - 1):
        assert mapped.frame(i).equals(loaded.frame(i))
    assert mapped.stats == store.stats and mapped.cutoff == CUTOFF
    mapped.require_cutoff(CUTOFF)
    with pytest.raises(ValueError, match=r"cutoff 5.0 Å but the model needs 6.0 Å"):
        mapped.require_cutoff(6.0)


def test_subset_is_a_view(store):
    view = store.subset([5, 2, 20])
    assert len(view) == 3 and list(view.ids) == [store.ids[5], store.ids[2], store.ids[20]]
    np.testing.assert_array_equal(view.graph(1).nodes["positions"], store.graph(2).nodes["positions"])
    assert view.stats.n_atoms == int(store.n_atoms[[5, 2, 20]].sum())
    assert view._shards[0]["positions"] is store._shards[0]["positions"]
    with pytest.raises(IndexError):
        view.graph(3)


def test_atomic_write(frames, tmp_path):
    def failing():
        for k, f in enumerate(frames):
            if k == 10:
                raise RuntimeError("reader died")
            yield f

    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="reader died"):
        preprocess(failing(), target, cutoff=CUTOFF, shard_size=3, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the store nor a temporary directory is left

    overlapping = Frame([29, 29], [[0, 0, 0], [0.05, 0, 0]], np.eye(3) * 5, [True] * 3, id="clash")
    with pytest.raises(ValueError, match="frame 'clash': overlapping atoms"):
        preprocess([frames[0], overlapping], target, cutoff=CUTOFF, progress=False)
    assert list(tmp_path.iterdir()) == []
    ds = preprocess([frames[0], overlapping, frames[1]], target, cutoff=CUTOFF, progress=False, on_error="skip")
    assert list(ds.ids) == [frames[0].id, frames[1].id]
    with pytest.raises(FileExistsError):
        preprocess(frames[:2], target, cutoff=CUTOFF, progress=False)
    ds = preprocess(frames[:3], target, cutoff=CUTOFF, progress=False, overwrite=True)
    assert len(ds) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fit_element_energies_exact():
    rng = np.random.default_rng(1)
    truth = np.zeros(119)
    truth[[1, 8, 26, 79]] = [-3.4, -4.9, -8.3, -3.2]
    counts = np.zeros((40, 119))
    counts[:, [1, 8, 26, 79]] = rng.integers(0, 9, size=(40, 4))
    counts[0, 1] = max(counts[0, 1], 1)
    e0 = fit_element_energies((counts, counts @ truth))
    np.testing.assert_allclose(e0, truth, atol=1e-8)
    # Fixed references: the others are fitted to the remainder, exactly.
    fixed = fit_element_energies((counts, counts @ truth), fixed={8: -4.9, 26: -8.3})
    np.testing.assert_allclose(fixed, truth, atol=1e-8)
    shifted = fit_element_energies((counts, counts @ truth), fixed={8: -5.9})
    assert shifted[8] == -5.9 and not np.allclose(shifted[[1, 26, 79]], truth[[1, 26, 79]], atol=1e-3)
    defaults = np.full(119, 7.0)
    e0 = fit_element_energies((counts, counts @ truth), defaults=defaults)
    assert e0[2] == 7.0 and e0[8] == pytest.approx(-4.9, abs=1e-8)
    # Rank deficient: Ni and Al only ever as Ni3Al -> minimum-norm, energies reproduced, finite.
    ni3al = np.zeros((5, 119))
    ni3al[:, 28], ni3al[:, 13] = 3 * np.arange(1, 6), np.arange(1, 6)
    e0 = fit_element_energies((ni3al, ni3al @ truth + (-5.0 * ni3al[:, 28] - 4.0 * ni3al[:, 13])))
    np.testing.assert_allclose(ni3al @ e0, 3 * np.arange(1, 6) * -5.0 + np.arange(1, 6) * -4.0, atol=1e-8)
    assert np.isfinite(e0).all() and e0[28] / e0[13] == pytest.approx(3.0)  # min-norm lies along (3, 1)


def test_fit_element_energies_on_dataset(frames):
    truth = np.zeros(119)
    truth[[13, 28, 29]] = [-2.5, -4.4, -3.6]
    synthetic = [Frame(f.numbers, f.positions, f.cell, f.pbc, energy=float(truth[f.numbers].sum()), id=f.id)
                 for f in frames[:24]]
    ds = GraphDataset.from_frames(synthetic, CUTOFF)
    np.testing.assert_allclose(fit_element_energies(ds), truth, atol=1e-8)
    assert ds.stats.energy_per_atom_std == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(ds.stats.element_energy_array(), truth, atol=1e-8)


def test_stats_hand_case():
    box = np.eye(3) * 10.0
    frames = [
        Frame([29, 29], [[0, 0, 0], [2.5, 0, 0]], box, [True] * 3, energy=-2.0, forces=[[1, 0, 0], [-1, 0, 0]]),
        Frame([29, 28], [[0, 0, 0], [0, 2.4, 0]], box, [True] * 3, energy=-3.0, forces=[[0, 2, 0], [0, -2, 0]],
              stress=np.eye(3) * 1e-3),
        Frame([28, 28], [[0, 0, 0], [0, 0, 2.3]], box, [True] * 3, energy=-4.2),
    ]
    stats = GraphDataset.from_frames(frames, cutoff=3.0).stats
    assert (stats.n_frames, stats.n_atoms, stats.n_edges, stats.max_atoms, stats.max_edges) == (3, 6, 6, 2, 2)
    assert stats.mean_neighbours == 1.0  # each atom sees its partner only (images are 7+ Å away)
    assert (stats.frames_with_energy, stats.frames_with_forces, stats.frames_with_stress) == (3, 2, 1)
    assert stats.elements == [28, 29] and stats.element_counts == {"Ni": 3, "Cu": 3}
    assert stats.force_rms == pytest.approx(np.sqrt(10 / 12))
    # Least squares by hand: rows (Cu, Ni) = (2,0), (1,1), (0,2); energies -2, -3, -4.2.
    a = np.array([[2.0, 0], [1, 1], [0, 2]])
    e = np.array([-2.0, -3.0, -4.2])
    cu, ni = np.linalg.solve(a.T @ a, a.T @ e)
    assert stats.element_energies["Cu"] == pytest.approx(cu) and stats.element_energies["Ni"] == pytest.approx(ni)
    per_atom = (e - a @ [cu, ni]) / 2
    # ridge=1e-8 shifts the fit by ~1e-9 eV: physically nothing, numerically not bit-exact.
    assert stats.energy_per_atom_mean == pytest.approx(per_atom.mean(), abs=1e-8)
    assert stats.energy_per_atom_std == pytest.approx(per_atom.std(), rel=1e-6)
    assert type(stats).from_dict(stats.to_dict()) == stats
