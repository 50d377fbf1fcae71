"""MD resume (issue 14, items 2 and 4): a resumed float32 run is bitwise the uninterrupted one, and a resume
after a process killed while writing a trajectory frame truncates the trajectory and the log to the
checkpoint's step."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from ase.build import bulk
from ase.io import read, write
from conftest import sane_potential

from geodite_jax.simulation import MDRunner, MDSettings, jaxmd_system

ROOT = Path(__file__).resolve().parents[1]



def si64() -> object:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    atoms.rattle(0.03, seed=3)
    return atoms


def test_float32_resume_is_bitwise_and_repairs_a_partial_frame(tmp_path):
    """float32 NVT Langevin, 3 blocks of 10 steps. The interrupted run stops after its step-20 checkpoint; a
    kill during the step-30 write is mimicked by appending half of that frame to the trajectory and half a row
    to the log. The resume restores the neighbour list exactly, and ends with positions, momenta and forces
    bitwise equal to the uninterrupted run's, and trajectory and log byte-identical to it."""
    system = jaxmd_system(sane_potential(), si64(), dtype="float32", skin=0.3)
    runner = MDRunner(system, MDSettings("nvt", temperature_K=500.0, friction_per_fs=0.02, seed=7))
    traj_full, log_full = tmp_path / "full.extxyz", tmp_path / "full.csv"
    full = runner.run(runner.init(), 30, block=10, trajectory=traj_full, log=log_full, progress=False)

    traj, log, ckpt = tmp_path / "run.extxyz", tmp_path / "run.csv", tmp_path / "run.npz"
    first = runner.run(runner.init(), 20, block=10, trajectory=traj, log=log, checkpoint=ckpt, progress=False)
    full_bytes, log_bytes = traj_full.read_bytes(), log_full.read_bytes()
    assert traj.read_bytes() == full_bytes[:len(traj.read_bytes())]
    frame30 = full_bytes[len(traj.read_bytes()):]
    with traj.open("ab") as fh:  # the process died half-way through the step-30 frame
        fh.write(frame30[:len(frame30) // 2])
    with log.open("ab") as fh:
        fh.write(log_bytes[len(log.read_bytes()):][:25])
    with pytest.raises(Exception):  # noqa: B017 (ASE raises several types): the file is broken
        read(traj, ":")

    resumed = runner.resume(ckpt)
    assert resumed.step == 20
    for a, b in zip(jax.tree_util.tree_leaves(resumed.state), jax.tree_util.tree_leaves(first.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype
    # The neighbour list as the interrupted run left it (not re-allocated at the resumed positions).
    for a, b in zip(jax.tree_util.tree_leaves(resumed.neighbors), jax.tree_util.tree_leaves(first.neighbors),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.neighbors.capacity == first.neighbors.capacity
    assert resumed.neighbors.skin.max_occupancy == first.neighbors.skin.max_occupancy

    second = runner.run(resumed, 30, block=10, trajectory=traj, log=log, checkpoint=ckpt, progress=False,
                        append=True)
    assert second.step == 30 and np.asarray(second.state.position).dtype == np.float32
    for name in ("position", "momentum", "force"):
        np.testing.assert_array_equal(np.asarray(getattr(second.state, name)), np.asarray(getattr(full.state, name)))
    assert traj.read_bytes() == full_bytes
    assert log.read_bytes() == log_bytes
    assert [f.info["step"] for f in read(traj, ":")] == [0, 10, 20, 30]


KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    from geodite_jax.simulation import io
    from geodite_jax.cli import main

    if sys.argv[1] == "kill":  # SIGKILL half-way through writing the step-30 frame
        original = io.TrajectoryWriter.write

        def write(self, atoms):
            if atoms.info.get("step") == 30:
                import io as _io
                from ase.io import write as ase_write
                buf = _io.StringIO()
                ase_write(buf, atoms, format="extxyz")
                data = buf.getvalue().encode()
                self._fh.write(data[: len(data) // 2])
                self._fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, atoms)

        io.TrajectoryWriter.write = write
    raise SystemExit(main(sys.argv[2:]))
''')


@pytest.mark.slow  # three `geodite md` processes, each compiling the model: ~3 min on the shared 2-core machine
def test_md_cli_resume_after_kill_during_frame_write(tmp_path):
    """`geodite md` (float32, NVT 500 K, a frame every 10 steps, checkpoint) is SIGKILLed half-way through the
    step-30 frame; the same command with --resume succeeds, the trajectory reads back and is byte-identical
    to an uninterrupted run's (the float32 resume is exact), the log too, and no float64 warning is printed."""
    model = sane_potential().save(tmp_path / "model")
    structure = tmp_path / "si.extxyz"
    write(structure, si64())

    def md(mode: str, out: str, *extra: str) -> subprocess.CompletedProcess:
        args = ["md", str(structure), "--model", str(model), "--ensemble", "nvt", "--temperature", "500",
                "--steps", "50", "--traj-every", "10", "--skin", "0.3", "--dtype", "float32", "--quiet",
                "--output", str(tmp_path / f"{out}.extxyz"), "--log", str(tmp_path / f"{out}.csv"),
                "--checkpoint", str(tmp_path / f"{out}.npz"), *extra]
        return subprocess.run([sys.executable, "-c", KILL_SCRIPT, mode, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)

    full = md("plain", "full")
    assert full.returncode == 0, full.stderr[-3000:]
    assert "float64" not in full.stderr, full.stderr[-3000:]
    killed = md("kill", "run")
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    partial = (tmp_path / "run.extxyz").read_bytes()
    assert partial.count(b"Lattice=") == 4  # frames 0, 10, 20 and the header of the partial step-30 frame
    resumed = md("plain", "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 20" in resumed.stdout
    frames = read(tmp_path / "run.extxyz", ":")
    assert [f.info["step"] for f in frames] == [0, 10, 20, 30, 40, 50]
    assert (tmp_path / "run.extxyz").read_bytes() == (tmp_path / "full.extxyz").read_bytes()
    assert (tmp_path / "run.csv").read_bytes() == (tmp_path / "full.csv").read_bytes()
