"""What the three training drivers share: split files, prediction files, thread settings, timing.

Imported by ``train_geodite.py`` (project python) and by ``train_nequix.py`` / ``train_mace.py`` (inside the
peers' virtualenvs), so it depends only on the standard library, numpy and ASE.

Split files are extxyz with the labels under MACE's default keys (``REF_energy`` in ``info``, eV;
``REF_forces`` in ``arrays``, eV/Å; ``REF_stress`` in ``info``, ``[3, 3]`` eV/Å³, ASE sign, periodic frames
only), so that no reader mistakes them for a calculator's results.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ENERGY_KEY, FORCES_KEY, STRESS_KEY = "REF_energy", "REF_forces", "REF_stress"
N_THREADS = 2

#: Same thread settings for every child (the 2-core machine), set before jax / torch are imported.
THREAD_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": str(N_THREADS),
    "MKL_NUM_THREADS": str(N_THREADS),
    "OPENBLAS_NUM_THREADS": str(N_THREADS),
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true",
    "JAX_PLATFORMS": "cpu",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def set_thread_env() -> None:
    for key, value in THREAD_ENV.items():
        os.environ.setdefault(key, value)


def read_split(path: str | Path) -> list[Any]:
    """The ``ase.Atoms`` of a split file (labels in ``info`` / ``arrays`` under the ``REF_*`` keys)."""
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found")
    return list(ase.io.read(path, index=":", format="extxyz"))


def labels(atoms: Any) -> tuple[float, np.ndarray, np.ndarray | None]:
    """``(energy eV, forces [n_atoms, 3] eV/Å, stress [3, 3] eV/Å³ or None)`` of one split frame (stress is
    stored as ASE Voigt-6)."""
    from ase.stress import voigt_6_to_full_3x3_stress

    stress = atoms.info.get(STRESS_KEY)
    if stress is not None:
        stress = np.asarray(stress, dtype=np.float64)
        stress = voigt_6_to_full_3x3_stress(stress) if stress.size == 6 else stress.reshape(3, 3)
    return float(atoms.info[ENERGY_KEY]), np.asarray(atoms.arrays[FORCES_KEY], dtype=np.float64), stress


def write_predictions(path: str | Path, energy: Sequence[float], forces: Sequence[np.ndarray],
                      stress: Sequence[np.ndarray | None]) -> Path:
    """Save predictions of one test file as ``.npz``: ``energy`` [F] eV, ``forces`` [sum n_atoms, 3] eV/Å
    (frames in file order), ``stress`` [F, 3, 3] eV/Å³ ASE sign (NaN where the model gives none)."""
    stress_arr = np.stack([np.full((3, 3), np.nan) if s is None else np.asarray(s, np.float64).reshape(3, 3)
                           for s in stress]) if len(stress) else np.zeros((0, 3, 3))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, energy=np.asarray(energy, np.float64),
             forces=np.concatenate([np.asarray(f, np.float64).reshape(-1, 3) for f in forces]) if len(forces)
             else np.zeros((0, 3)), stress=stress_arr)
    tmp.replace(path)
    return path


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children (all threads), seconds."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Stopwatch:
    """Wall and CPU seconds of a block: ``with Stopwatch() as sw: ...; sw.wall, sw.cpu``."""

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = cpu_seconds() - self._cpu


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Atomic JSON write (a half-written result must never look finished)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
