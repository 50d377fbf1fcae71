"""MD across JAX devices (lammps-jax's grid spatial decomposition): the trajectory equals single-device jax-md,
atoms migrate between devices, and bad requests are named errors before any work starts.

The number of host devices is fixed when JAX starts, so the multi-device runs are subprocesses of
``experiments/dist_md_check.py`` with ``--xla_force_host_platform_device_count``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from ase.build import bulk

import geodite_jax as gd
from geodite_jax.priors import ZBL_UNIVERSAL

pytest.importorskip("lammps_jax", reason="MD across devices needs lammps-jax (pip install -e '.[lammps]')")

from geodite_jax.simulation.distributed import DistributedMD  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (\d+) \| (\S+) \| (\S+) \| (\S+) \| (\d+) \| (\d+) \| (\d+) \|", re.M)


def _check(*args: str, timeout: int) -> list[dict]:
    """Run the check script; its table rows as dicts (devices, grid, max_dr, max_dp, migrated, rebuilds)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # the script sets the host device count itself
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "dist_md_check.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [{"devices": int(m[0]), "grid": m[1], "max_dr": float(m[2]), "max_dp": float(m[3]),
             "migrated": int(m[4]), "rebuilds": int(m[6])} for m in ROW.findall(proc.stdout)]
    assert rows, proc.stdout
    return rows


@pytest.mark.slow  # ~40 s (a subprocess with two host devices, two compilations); the default suite is near 15 min
def test_two_devices_follow_the_jaxmd_trajectory(tiny, tmp_path):
    """108 Cu atoms on a 1x1x2 grid, 10 steps of 2 fs from 1500 K with a 0.1 Å skin: positions equal the
    single-device jax-md NVE run to 1e-8 Å, and atoms migrated between the two devices on the way. (The
    session's perturbed tiny potential with the universal ZBL kept, as conftest's sane_potential, saved: the
    subprocess then need not initialise one.)"""
    params = jax.tree_util.tree_map(np.asarray, tiny.params)
    for key, value in ZBL_UNIVERSAL.items():
        params["params"][f"zbl_{key}"] = np.asarray(value, np.float32)
    gd.Potential(tiny.config, params, tiny.element_energies, tiny.energy_scale).save(tmp_path / "tiny")
    (row,) = _check("--repeat", "3", "--steps", "10", "--devices", "2", "--temperature", "1500", "--dt-fs", "2",
                    "--skin", "0.1", "--model", str(tmp_path / "tiny"), timeout=600)
    assert row["devices"] == 2 and row["grid"] != "1x1x1"
    assert row["max_dr"] < 1e-8 and row["max_dp"] < 1e-6
    assert row["rebuilds"] > 0 and row["migrated"] > 0


@pytest.mark.slow  # 2,048 atoms x 100 steps, three runs (jax-md, 2 and 4 devices): minutes on 2 cores
def test_two_and_four_devices_follow_the_jaxmd_trajectory_2048_atoms_100_steps():
    rows = _check("--repeat", "8", "--steps", "100", "--devices", "2", "4", timeout=3600)
    assert [r["devices"] for r in rows] == [2, 4]
    for row in rows:
        assert row["max_dr"] < 1e-8 and row["migrated"] > 0


def test_more_devices_than_present_is_a_named_error(tiny):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(4)
    with pytest.raises(ValueError, match=rf"--devices {jax.device_count() + 1} is more than the"):
        DistributedMD(tiny, atoms, jax.device_count() + 1)


def test_cell_too_small_for_the_grid_is_a_named_error(tiny):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)  # 7.2 Å < 2 x (5 Å cutoff + 0.5 Å skin)
    with pytest.raises(ValueError, match=r"cell too small for MD across 1 devices.*atoms.repeat\(\(2, 2, 2\)\)"):
        DistributedMD(tiny, atoms, 1)


def test_cli_refuses_devices_beyond_those_present_before_loading(tmp_path, capsys):
    from geodite_jax.cli import main

    structure = tmp_path / "cu.extxyz"
    bulk("Cu", "fcc", a=3.61, cubic=True).repeat(4).write(structure)
    code = main(["md", str(structure), "--model", str(tmp_path / "no-such-model"), "--steps", "1", "--output",
                 str(tmp_path / "out.extxyz"), "--ensemble", "nve", "--devices", str(jax.device_count() + 1)])
    err = capsys.readouterr().err
    assert code == 2 and "is more than the" in err and "no-such-model" not in err


@pytest.mark.slow  # three compilations of the model gradient on one device
def test_a_capacity_overflow_regrows_and_redoes_the_block():
    """The compacted pair list made too small after the start: the block overflows, the capacities grow, the
    block is redone from its start, and the trajectory equals a run that never overflowed."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(4)
    atoms.rattle(0.05, seed=2)
    p0 = DistributedMD.initial_momenta_for(atoms, 300.0, seed=4)
    ref = DistributedMD(gd.Potential.init(gd.GeoditeConfig.preset("tiny"), seed=0), atoms, 1)
    expected = ref.gather(ref.advance(ref.init(p0), 5))
    md = DistributedMD(ref.potential, atoms, 1)
    state = md.init(p0)
    pairs = int(np.ceil((md.tight_edges - 16) / md.capacities.subgraph))
    md.tight_edges = int(0.8 * pairs)  # below the pairs within the cutoff
    md._build()
    out = md.gather(md.advance(state, 5))
    assert md.tight_edges > pairs and md.capacities.exchange > ref.capacities.exchange
    delta = out["frac"] - expected["frac"]
    np.testing.assert_allclose(delta - np.round(delta), 0.0, atol=1e-12)
    np.testing.assert_allclose(out["momenta"], expected["momenta"], atol=1e-10)
