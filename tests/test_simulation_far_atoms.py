"""Structures spanning ~1e6 Å (issue 14, item 5): vesin died with SIGFPE on them (exit 136, no Python error).

Everything runs in a child process, so a native crash fails the test instead of killing pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import sys
    FULL = sys.argv[1] == "full"
    import numpy as np
    from ase import Atoms
    from ase.build import fcc111
    from ase.cluster import Icosahedron
    import geodite_jax as gd
    from geodite_jax.simulation import relax_ase

    # The neighbour search alone, free and slab, with an atom 1e6 Å away: it is isolated.
    cu13 = Icosahedron("Cu", 2)
    far = cu13 + Atoms("Cu", positions=[[1e6, 0.0, 0.0]])
    i, j, s, d = gd.neighbour_list(far.positions, np.zeros((3, 3)), [False] * 3, 5.0)
    i0, j0, s0, d0 = gd.neighbour_list(cu13.positions, np.zeros((3, 3)), [False] * 3, 5.0)
    assert len(i) == len(i0) > 0 and 13 not in i and 13 not in j
    slab = fcc111("Cu", (2, 2, 3), vacuum=5.0)
    far_slab = slab + Atoms("Cu", positions=[[1.0, 1.0, 1e6]])
    far_slab.cell, far_slab.pbc = slab.cell, slab.pbc
    i, j, s, d = gd.neighbour_list(far_slab.positions, far_slab.cell.array, far_slab.pbc, 5.0)
    i0, j0, s0, d0 = gd.neighbour_list(slab.positions, slab.cell.array, slab.pbc, 5.0)
    assert sorted(zip(i.tolist(), j.tolist(), map(tuple, s.tolist()))) == \\
        sorted(zip(i0.tolist(), j0.tolist(), map(tuple, s0.tolist())))
    print("NEIGHBOURS-OK")
    if not FULL:
        raise SystemExit(0)

    pot = gd.Potential.init(gd.GeoditeConfig.preset("tiny"), seed=0, element_energies="mptrj")
    calc = gd.GeoditeCalculator(pot, dtype="float64")
    single = Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    single.calc = calc
    e1 = single.get_potential_energy()
    pair = Atoms("Cu2", positions=[[0, 0, 0], [1e6, 0, 0]])
    pair.calc = calc
    assert abs(pair.get_potential_energy() - 2 * e1) < 1e-9
    assert np.abs(pair.get_forces()).max() == 0.0
    cu13.calc = calc
    e13 = cu13.get_potential_energy()
    far.calc = calc
    assert abs(far.get_potential_energy() - (e13 + e1)) < 1e-8
    # `geodite relax` uses relax_ase on this calculator: a few FIRE steps run without a crash.
    result = relax_ase(far, calc, fmax=0.05, max_steps=3)
    assert np.isfinite(result.energy) and np.abs(result.atoms.positions[13] - [1e6, 0, 0]).max() == 0.0
    print("FAR-ATOMS-OK")
''')


def _run(mode: str) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_far_apart_atoms_are_isolated_not_a_crash():
    """Neighbour search (what crashed inside vesin) of a cluster and of a slab with one atom 1e6 Å away:
    exit 0, the far atom has no neighbours, the other pairs are those without it."""
    assert "NEIGHBOURS-OK" in _run("quick")


@pytest.mark.slow  # four model compilations (Cu, Cu2, Cu13, Cu14 and the relaxation): ~60 s
def test_far_atom_cluster_energy_and_relaxation():
    """GeoditeCalculator on Cu2 1e6 Å apart (twice the isolated atom's energy, zero forces) and on Cu13 + one
    atom 1e6 Å away, and relax_ase on the latter (what `geodite relax` runs)."""
    assert "FAR-ATOMS-OK" in _run("full")
