"""A small, deterministic training set labelled with ASE's EMT calculator (no download needed).

The labels are **EMT** (effective-medium theory, Jacobsen-Stoltze-Nørskov; ASE's ``EMT`` calculator), a cheap
many-body model of fcc metals, **not DFT**. The set is for tests, tutorials and smoke-training a model end to
end; numbers obtained on it say nothing about accuracy on real materials.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.stress import voigt_6_to_full_3x3_stress

from .frames import Frame

#: Equilibrium fcc lattice constants of ASE's EMT (Å), found by minimising the EMT energy of each element.
EMT_LATTICE = {"Al": 3.994, "Cu": 3.590, "Ni": 3.487, "Pd": 3.879, "Ag": 4.064, "Pt": 3.922, "Au": 4.056}

#: Default share of each configuration group in the generated set.
DEFAULT_GROUPS = {"rattle": 0.25, "strain": 0.2, "vacancy": 0.1, "md-300K": 0.15, "md-800K": 0.15,
                  "md-1500K": 0.15}

# Supercells: (conventional cubic?, repeat). Primitive-cell repeats give non-orthogonal (rhombohedral) cells.
_CELLS = ((True, (1, 1, 1)), (True, (1, 1, 2)), (True, (1, 2, 2)), (True, (2, 2, 2)),
          (False, (2, 2, 2)), (False, (2, 2, 3)), (False, (3, 3, 2)), (False, (3, 3, 3)))
_MD_SNAPSHOTS, _MD_WARMUP, _MD_INTERVAL = 6, 10, 4  # per trajectory: steps before the first and between


def generate_emt_frames(n_frames: int = 1500, seed: int = 0, elements: Sequence[str] = ("Cu", "Ni", "Al"), *,
                        groups: Mapping[str, float] | None = None, max_atoms: int = 32) -> list[Frame]:
    """Labelled fcc structures of ``elements`` and their alloys with EMT energy, forces and stress.

    Labels are from ASE's EMT calculator (effective-medium model), NOT DFT. Compositions: pure elements,
    random substitutional alloys (2-3 elements, random fractions) and ordered L1_2 A3B (Ni3Al, Cu3Al, ...),
    in periodic cells of 4-27 atoms (conventional cubic and rhombohedral primitive supercells, near the
    Vegard lattice constant ±2%). Groups (``Frame.group``):

    * ``rattle``: Gaussian displacements with σ = 0.01-0.15 Å;
    * ``strain``: isotropic (±6%) plus shear (±4%) strain, small rattle;
    * ``vacancy``: one atom removed, rattled;
    * ``md-300K``, ``md-800K``, ``md-1500K``: Langevin NVT snapshots (2 fs steps, every 4 steps after 10).

    Deterministic in ``(n_frames, seed, elements, groups, max_atoms)``.

    Args:
        groups: share of each group (keys from :data:`DEFAULT_GROUPS`); normalised.
        max_atoms: largest cell (supercells with more atoms are not used).

    Returns:
        ``n_frames`` :class:`Frame` objects (ids ``emt-<seed>-<k>``; ``info``: formula, structure kind).
    """
    unknown = [e for e in elements if e not in EMT_LATTICE]
    if unknown or not elements:
        raise ValueError(f"EMT elements must be among {sorted(EMT_LATTICE)}, got {list(elements)}")
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    shares = dict(DEFAULT_GROUPS if groups is None else groups)
    bad = [g for g in shares if g not in DEFAULT_GROUPS]
    if bad or not shares or min(shares.values()) < 0 or sum(shares.values()) <= 0:
        raise ValueError(f"groups must map names from {list(DEFAULT_GROUPS)} to non-negative shares, got {shares}")
    cells = [c for c in _CELLS if (4 if c[0] else 1) * int(np.prod(c[1])) <= max_atoms]
    if not cells:
        raise ValueError(f"max_atoms={max_atoms} is smaller than the smallest cell (4 atoms)")
    names = list(shares)
    weights = np.array([shares[g] for g in names], dtype=np.float64)
    # Frames per group fixed up front (largest remainder), so the mix is exact and independent of luck.
    quota = np.floor(weights / weights.sum() * n_frames).astype(int)
    quota[np.argsort(-(weights / weights.sum() * n_frames - quota))[:n_frames - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    frames: list[Frame] = []
    for group, count in zip(names, quota, strict=True):
        made = 0
        while made < count:
            atoms, kind = _base_structure(rng, list(elements), cells)
            if group.startswith("md-"):
                snaps = _md(atoms, float(group[3:-1]), rng, min(_MD_SNAPSHOTS, count - made))
            else:
                snaps = [_label(_perturb(atoms, group, rng))]
            for snap, labels in snaps:
                frames.append(Frame(numbers=snap.numbers, positions=snap.positions, cell=snap.cell.array,
                                    pbc=snap.pbc, **labels, group=group, id=f"emt-{seed}-{len(frames)}",
                                    info={"formula": snap.get_chemical_formula(), "structure": kind,
                                          "labels": "EMT"}))
            made += len(snaps)
    return frames


def _base_structure(rng: np.random.Generator, elements: list[str],
                    cells: Sequence[tuple[bool, tuple[int, int, int]]]) -> tuple[Atoms, str]:
    """A random composition on a random fcc supercell near its Vegard lattice constant."""
    kinds = ["pure"] + (["random", "L1_2"] if len(elements) > 1 else [])
    kind = kinds[rng.choice(len(kinds), p=[0.3, 0.45, 0.25] if len(kinds) == 3 else [1.0])]
    if kind == "L1_2":  # A3B on the conventional cube: B at the corner, A on the face centres
        a_el, b_el = rng.choice(elements, size=2, replace=False)
        cubic, repeat = True, [c for c in cells if c[0]][rng.integers(len([c for c in cells if c[0]]))][1]
        unit = bulk(str(a_el), "fcc", a=1.0, cubic=True)
        unit.symbols[0] = str(b_el)
    else:
        cubic, repeat = cells[rng.integers(len(cells))]
        unit = bulk(elements[0], "fcc", a=1.0, cubic=cubic)
    atoms = unit.repeat(repeat)
    if kind == "pure":
        atoms.symbols[:] = elements[rng.integers(len(elements))]
    elif kind == "random":
        chosen = rng.choice(elements, size=min(len(elements), int(rng.integers(2, 4))), replace=False)
        fractions = rng.dirichlet(np.ones(len(chosen)))
        atoms.symbols[:] = [str(s) for s in rng.choice(chosen, size=len(atoms), p=fractions)]
    lattice = float(np.mean([EMT_LATTICE[s] for s in atoms.get_chemical_symbols()]))  # Vegard's law
    atoms.set_cell(atoms.cell * lattice * rng.uniform(0.98, 1.02), scale_atoms=True)
    return atoms, kind


def _rattle(atoms: Atoms, stdev: float, rng: np.random.Generator) -> None:
    atoms.positions += rng.normal(scale=stdev, size=atoms.positions.shape)


def _perturb(atoms: Atoms, group: str, rng: np.random.Generator) -> Atoms:
    atoms = atoms.copy()
    if group == "rattle":
        _rattle(atoms, rng.uniform(0.01, 0.15), rng)
    elif group == "strain":
        shear = rng.uniform(-0.04, 0.04, size=(3, 3))
        strain = np.eye(3) * rng.uniform(-0.06, 0.06) + (shear + shear.T) / 2 * (1 - np.eye(3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
        _rattle(atoms, 0.02, rng)
    elif group == "vacancy":
        if len(atoms) > 1:
            del atoms[int(rng.integers(len(atoms)))]
        _rattle(atoms, 0.05, rng)
    return atoms


def _md(atoms: Atoms, temperature: float, rng: np.random.Generator,
        n_snapshots: int) -> list[tuple[Atoms, dict]]:
    """Langevin NVT snapshots with their labels; velocities start at 2T (equipartition halves it)."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    MaxwellBoltzmannDistribution(atoms, temperature_K=2 * temperature, rng=rng)
    dyn = Langevin(atoms, timestep=2.0 * units.fs, temperature_K=temperature, friction=0.02 / units.fs,
                   fixcm=False, rng=rng)
    dyn.run(_MD_WARMUP)
    snapshots = []
    for _ in range(n_snapshots):
        dyn.run(_MD_INTERVAL)
        # The integrator's last force call was at these positions: EMT computed energy, forces and stress there.
        snapshots.append(_label(atoms, atoms.calc))
    return snapshots


def _label(atoms: Atoms, calc: EMT | None = None) -> tuple[Atoms, dict]:
    """A copy of ``atoms`` and its EMT labels (fresh evaluation unless ``calc`` holds results for ``atoms``)."""
    if calc is None or calc.check_state(atoms):
        calc = EMT()
        calc.calculate(atoms, ["energy", "forces", "stress"])
    results = calc.results
    labels = {"energy": float(results["energy"]), "forces": np.array(results["forces"]),
              "stress": voigt_6_to_full_3x3_stress(results["stress"])}
    snapshot = atoms.copy()
    snapshot.calc = None
    snapshot.wrap()  # MD drifts atoms out of the cell; wrapping changes no label
    return snapshot, labels
