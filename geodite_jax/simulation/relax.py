"""Structure relaxation: jax-md FIRE on positions, ASE FIRE with ``FrechetCellFilter`` for positions + cell,
and a Matbench-Discovery-style driver for a list of structures."""

from __future__ import annotations

import dataclasses as pydc
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms, units
from jax_md import minimize

from .jaxmd import JaxMDSystem
from .neighbors import run_with_regrowth


@pydc.dataclass
class RelaxResult:
    """Outcome of one relaxation: the relaxed structure (with its energy/forces/stress attached), the final
    energy (eV), max atomic force (eV/Å), max |σ + p·I| (eV/Å³, NaN when the cell was fixed), steps taken
    and whether both criteria were met."""

    atoms: Atoms
    energy: float
    fmax: float
    smax: float
    steps: int
    converged: bool


def _stress_residual(atoms: Atoms, pressure: float) -> float:
    stress = atoms.get_stress(voigt=False) + pressure * np.eye(3)
    return float(np.abs(stress).max())


def relax_ase(atoms: Atoms, calculator: Any, fmax: float = 0.02, cell: bool = False, smax: float | None = None,
              max_steps: int = 500, pressure_GPa: float = 0.0, trajectory: str | os.PathLike | None = None,
              logfile: str | None = None) -> RelaxResult:
    """FIRE on the positions (and, with ``cell=True``, the cell through ``FrechetCellFilter``) of a copy of
    ``atoms`` with any ASE calculator (e.g. :class:`~geodite_jax.GeoditeCalculator`).

    Converged when max |F| ≤ ``fmax`` (eV/Å) and, with the cell free, max |σ + p·I| ≤ ``smax`` (eV/Å³; default
    ``fmax / 40``, about 0.08 GPa at ``fmax=0.02``, the order of residual ASE's filter leaves at that fmax).
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    if not fmax > 0:
        raise ValueError(f"fmax must be positive (eV/Å), got {fmax}")
    if cell and not atoms.pbc.all():
        raise ValueError("cell relaxation needs a fully periodic structure")
    atoms = atoms.copy()
    atoms.calc = calculator
    smax = fmax / 40.0 if smax is None else smax
    pressure = pressure_GPa * units.GPa
    target = FrechetCellFilter(atoms, scalar_pressure=pressure) if cell else atoms
    opt = FIRE(target, logfile=logfile, trajectory=None if trajectory is None else str(trajectory))
    steps = 0
    converged = False
    # The optimizer's own test mixes cell and atom forces; loop until both stated criteria hold.
    while steps < max_steps:
        opt.run(fmax=fmax if not cell else min(fmax, smax * atoms.get_volume() / len(atoms)),
                steps=max_steps - steps)
        steps = opt.nsteps
        f_ok = np.abs(atoms.get_forces()).max() <= fmax if len(atoms) else True
        s_ok = (not cell) or _stress_residual(atoms, pressure) <= smax
        if f_ok and s_ok:
            converged = True
            break
        if opt.nsteps >= max_steps:
            break
    forces = atoms.get_forces()
    out = atoms.copy()
    from .io import frame

    stress = atoms.get_stress(voigt=False) if atoms.pbc.all() else None
    out = frame(out, atoms.get_potential_energy(), forces, stress)
    return RelaxResult(out, float(atoms.get_potential_energy()), float(np.sqrt((forces**2).sum(1)).max()),
                       _stress_residual(atoms, pressure) if cell else float("nan"), int(steps), converged)


def relax_jaxmd(system: JaxMDSystem, fmax: float = 0.02, max_steps: int = 1000, block: int = 50,
                dt_start: float = 0.1, dt_max: float = 0.4) -> RelaxResult:
    """jax-md ``minimize.fire_descent`` on the positions (cell fixed), ``block`` steps per jit call.

    Stops at the first block boundary with max |F| ≤ ``fmax``; neighbour-list overflows are reallocated and
    the block redone, as in MD.
    """
    if not fmax > 0:
        raise ValueError(f"fmax must be positive (eV/Å), got {fmax}")
    init_fn, apply_fn = minimize.fire_descent(system.energy_fn, system.shift_fn, dt_start=dt_start, dt_max=dt_max)
    masses = jnp.asarray(system.masses, system.dtype)
    fns = system.neighbor_fn
    nbr = fns.allocate(system.positions, system.box)
    state = init_fn(system.positions, mass=masses, neighbor=nbr)

    @jax.jit
    def run_block(state: Any, nbr: Any, n: jnp.ndarray) -> tuple[Any, Any]:
        def body(_: int, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            state, nbr = carry
            state = apply_fn(state, neighbor=nbr)
            return state, nbr.update(state.position)

        return jax.lax.fori_loop(0, n, body, (state, nbr))

    def force_max(state: Any) -> float:
        return float(jnp.sqrt(jnp.sum(state.force**2, axis=1)).max())

    steps = 0
    while steps < max_steps and force_max(state) > fmax:
        n = min(block, max_steps - steps)
        def regrow(new_state: Any, failed: Any, finite: bool, start: Any = state) -> Any:
            grown = fns.grow(failed, new_state.position if finite else start.position, tight=not finite)
            return fns.refit(grown, start.position)

        def block(nbr: Any, start: Any = state, n: int = n) -> tuple[Any, Any]:
            return run_block(start, nbr, jnp.asarray(n, jnp.int32))

        state, nbr = run_with_regrowth(block, nbr, regrow, "FIRE block")
        steps += n
    energy, forces, stress = system.energy_forces_stress(state.position, nbr)
    rot = system.rotation
    from .io import frame

    atoms = system.to_atoms(state.position)
    atoms = frame(atoms, float(energy), np.asarray(forces) @ rot,
                  rot.T @ np.asarray(stress) @ rot if system.pbc else None)
    fm = float(np.sqrt((np.asarray(forces) ** 2).sum(1)).max())
    return RelaxResult(atoms, float(energy), fm, float("nan"), steps, fm <= fmax)


def relax_structures(structures: Sequence[Atoms], potential: Any, fmax: float = 0.05, cell: bool = True,
                     max_steps: int = 500, dtype: str = "float32", progress: bool = True) -> list[RelaxResult]:
    """Relax every structure as Matbench Discovery does (FIRE + ``FrechetCellFilter``, fmax 0.05 eV/Å,
    at most 500 steps), with one :class:`~geodite_jax.GeoditeCalculator` (its size buckets grow, so the
    number of compilations stays small). A structure that fails gives ``converged=False`` and NaN energy
    rather than stopping the batch; bad input (an unknown element) still raises first.
    """
    from ..calculator import GeoditeCalculator

    for i, atoms in enumerate(structures):
        try:
            potential.check_atoms(atoms)
        except ValueError as err:
            raise ValueError(f"structure {i}: {err}") from None
    calc = GeoditeCalculator(potential, dtype=dtype)
    results: list[RelaxResult] = []
    iterator: Any = structures
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(structures, desc="relax", unit="structure")
        except ImportError:
            pass
    for atoms in iterator:
        periodic = bool(atoms.pbc.all())
        try:
            results.append(relax_ase(atoms, calc, fmax=fmax, cell=cell and periodic, max_steps=max_steps))
        except (RuntimeError, FloatingPointError, np.linalg.LinAlgError):
            results.append(RelaxResult(atoms.copy(), float("nan"), float("nan"), float("nan"), max_steps, False))
    return results
