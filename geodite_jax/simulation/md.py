"""Molecular dynamics in jax-md: NVE, NVT (Langevin, Nose-Hoover chain), NPT (Nose-Hoover), run in blocks.

Each block of steps is one jit-compiled ``lax.fori_loop`` (the block length is a traced argument, so a
shorter last block does not recompile). Between blocks the driver checks the neighbour list (an overflow
reallocates it and redoes the block from its start, so no pair is ever dropped), logs temperature,
pressure and energies, writes a trajectory frame and, if asked, an atomic checkpoint from which
:meth:`MDRunner.resume` continues the same trajectory.
"""

from __future__ import annotations

import dataclasses as pydc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ase import units
from jax_md import simulate

from .io import CSVLog, TrajectoryWriter, frame, output_record, truncate_outputs
from .jaxmd import JaxMDSystem
from .md_checkpoint import load_md_checkpoint, save_md_checkpoint
from .neighbors import GeoditeNeighborList, box_perpendicular_widths, run_with_regrowth

ENSEMBLES = ("nve", "nvt", "npt")
THERMOSTATS = ("langevin", "nose-hoover")


@pydc.dataclass(frozen=True)
class MDSettings:
    """What to simulate. Times in fs, temperatures in K, pressure in GPa.

    Attributes:
        ensemble: ``"nve"``, ``"nvt"`` or ``"npt"`` (isotropic Nose-Hoover barostat on the model's stress).
        temperature_K: thermostat target (NVT/NPT) and the Maxwell-Boltzmann draw of the initial momenta.
        timestep_fs: integration step.
        thermostat: NVT only: ``"langevin"`` (BAOAB) or ``"nose-hoover"`` (chain).
        friction_per_fs: Langevin friction γ.
        tau_fs: Nose-Hoover thermostat time constant; barostat_tau_fs: the barostat's.
        pressure_GPa: NPT target pressure.
        seed: random seed (initial momenta, Langevin noise).
        init_temperature_K: temperature of the initial momenta (default ``temperature_K``).
    """

    ensemble: str = "nvt"
    temperature_K: float = 300.0
    timestep_fs: float = 1.0
    thermostat: str = "langevin"
    friction_per_fs: float = 0.01
    tau_fs: float = 100.0
    pressure_GPa: float = 0.0
    barostat_tau_fs: float = 1000.0
    seed: int = 0
    init_temperature_K: float | None = None

    def __post_init__(self) -> None:
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}")
        if self.thermostat not in THERMOSTATS:
            raise ValueError(f"thermostat must be one of {THERMOSTATS}, got {self.thermostat!r}")
        if not (np.isfinite(self.timestep_fs) and 0 < self.timestep_fs <= 20):
            raise ValueError(f"timestep_fs must be in (0, 20] fs, got {self.timestep_fs}")
        if not (np.isfinite(self.temperature_K) and self.temperature_K >= 0):
            raise ValueError(f"temperature_K must be >= 0, got {self.temperature_K}")
        for name in ("friction_per_fs", "tau_fs", "barostat_tau_fs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not np.isfinite(self.pressure_GPa):
            raise ValueError(f"pressure_GPa must be finite, got {self.pressure_GPa}")

    @property
    def dt(self) -> float:
        """Time step in jax-md's (= ASE's) time unit, Å·sqrt(amu/eV)."""
        return self.timestep_fs * units.fs

    @property
    def kT(self) -> float:
        return self.temperature_K * units.kB


@pydc.dataclass
class MDState:
    """Where a run stands: the jax-md integrator state, its neighbour list and the step count.

    ``outputs``: set by :meth:`MDRunner.resume`: the trajectory and log sizes the checkpoint recorded, to
    which a resumed :meth:`MDRunner.run` truncates them.
    """

    state: Any
    neighbors: GeoditeNeighborList
    step: int = 0
    outputs: dict | None = None

    @property
    def position(self) -> jnp.ndarray:
        return self.state.position


def _kinetic_energy(momentum: jnp.ndarray, mass: jnp.ndarray) -> jnp.ndarray:
    """Σ p² / 2m in the run's dtype (jax-md's ``quantity.kinetic_energy`` asks for a float64 sum, which in
    float32 mode JAX truncates with a "float64 not available" warning)."""
    mass = jnp.reshape(mass, (-1, 1)) if jnp.ndim(mass) else mass
    return 0.5 * jnp.sum(momentum**2 / mass)


def _is_npt(settings: MDSettings) -> bool:
    return settings.ensemble == "npt"


class MDRunner:
    """Runs one :class:`~geodite_jax.simulation.jaxmd.JaxMDSystem` with :class:`MDSettings`.

    >>> system = jaxmd_system(potential, atoms)
    >>> runner = MDRunner(system, MDSettings("nvt", temperature_K=300))
    >>> md = runner.run(runner.init(), steps=1000, block=50, trajectory="traj.extxyz")
    """

    def __init__(self, system: JaxMDSystem, settings: MDSettings) -> None:
        if _is_npt(settings) and not system.pbc:
            raise ValueError("NPT needs a periodic structure (atoms.pbc all True)")
        self.system, self.settings = system, settings
        s, energy_fn, shift_fn = settings, system.energy_fn, system.shift_fn
        dt, kT = s.dt, s.kT
        if s.ensemble == "nve":
            self.init_fn, self.apply_fn = simulate.nve(energy_fn, shift_fn, dt)
        elif s.ensemble == "nvt" and s.thermostat == "langevin":
            self.init_fn, self.apply_fn = simulate.nvt_langevin(energy_fn, shift_fn, dt, kT,
                                                                gamma=s.friction_per_fs / units.fs)
        elif s.ensemble == "nvt":
            self.init_fn, self.apply_fn = simulate.nvt_nose_hoover(energy_fn, shift_fn, dt, kT,
                                                                   tau=s.tau_fs * units.fs)
        else:
            self.init_fn, self.apply_fn = simulate.npt_nose_hoover(
                energy_fn, shift_fn, dt, s.pressure_GPa * units.GPa, kT,
                barostat_kwargs={"tau": s.barostat_tau_fs * units.fs},
                thermostat_kwargs={"tau": s.tau_fs * units.fs})
        self.masses = jnp.asarray(system.masses, system.dtype)
        self._block = jax.jit(self._make_block())
        self._observe = jax.jit(self._make_observe())

    # ------------------------------------------------------------------------------------------ pieces
    def box_of(self, state: Any) -> jnp.ndarray | None:
        """The current box of an integrator state (changes under NPT)."""
        if _is_npt(self.settings):
            return simulate.npt_box(state)
        return self.system.box

    def _box_kwargs(self, state: Any) -> dict[str, Any]:
        return {"box": simulate.npt_box(state)} if _is_npt(self.settings) else {}

    def _make_block(self) -> Callable[..., tuple[Any, GeoditeNeighborList]]:
        apply_fn, box_kwargs = self.apply_fn, self._box_kwargs

        def block(state: Any, nbr: GeoditeNeighborList, n_steps: jnp.ndarray) -> tuple[Any, GeoditeNeighborList]:
            def body(_: int, carry: tuple[Any, GeoditeNeighborList]) -> tuple[Any, GeoditeNeighborList]:
                state, nbr = carry
                state = apply_fn(state, neighbor=nbr)
                return state, nbr.update(state.position, **box_kwargs(state))

            return jax.lax.fori_loop(0, n_steps, body, (state, nbr))

        return block

    def _make_observe(self) -> Callable[..., dict[str, jnp.ndarray]]:
        from .jaxmd import make_energy_forces_stress

        efs = make_energy_forces_stress(self.system.energy_fn, self.system.pbc)
        box_of, n_atoms = self.box_of, self.system.n_atoms

        def observe(state: Any, nbr: GeoditeNeighborList) -> dict[str, jnp.ndarray]:
            box = box_of(state)
            energy, forces, stress = efs(state.position, nbr, box)
            kinetic = _kinetic_energy(state.momentum, state.mass)
            out = {"potential": energy, "kinetic": kinetic, "forces": forces, "stress": stress,
                   "temperature": 2.0 * kinetic / (3 * n_atoms * units.kB)}
            if box is not None:
                volume = jnp.abs(jnp.linalg.det(box))
                # Total pressure: virial part −tr(σ)/3 plus the kinetic part 2 K / (3 V).
                out["pressure"] = -jnp.trace(stress) / 3.0 + 2.0 * kinetic / (3.0 * volume)
                out["volume"] = volume
            else:
                out["pressure"] = jnp.asarray(jnp.nan)
                out["volume"] = jnp.asarray(jnp.nan)
            return out

        return observe

    # ---------------------------------------------------------------------------------------- driving
    def init(self, momenta: np.ndarray | None = None) -> MDState:
        """Initial state at the system's positions: Maxwell-Boltzmann momenta at ``init_temperature_K``
        (zero total momentum) unless ``momenta [n_atoms, 3]`` (ASE units, input frame) are given."""
        s, system = self.settings, self.system
        key = jax.random.PRNGKey(s.seed)
        kT0 = (s.temperature_K if s.init_temperature_K is None else s.init_temperature_K) * units.kB
        R = system.positions
        nbr = system.allocate(R, system.box)
        kwargs: dict[str, Any] = {"mass": self.masses, "neighbor": nbr}
        if momenta is not None:
            kwargs["momenta"] = jnp.asarray(system.rotate_in(momenta), system.dtype)
        if s.ensemble == "nve":
            state = self.init_fn(key, R, kT0, **kwargs)
        elif s.ensemble == "nvt":
            state = self.init_fn(key, R, kT=kT0, **kwargs)
        else:
            state = self.init_fn(key, R, system.box, kT=kT0, **kwargs)
        if not np.all(np.isfinite(np.asarray(state.force))):
            raise RuntimeError("the initial forces are not finite")
        return MDState(state, nbr, 0)

    def advance(self, md: MDState, n_steps: int) -> MDState:
        """``n_steps`` steps in one compiled block; an overflowing neighbour list is reallocated and the
        block redone from its start (so the result never depends on a dropped pair)."""
        fns, tried = self.system.neighbor_fn, [md.neighbors]

        def regrow(state: Any, failed: GeoditeNeighborList, finite: bool) -> GeoditeNeighborList | None:
            # Capacities from the larger of the needs at the block's start and at its (failed) end.
            box_end = self.box_of(state) if finite else self.box_of(md.state)
            grown = fns.grow(failed, state.position if finite else md.state.position, box_end,
                             tight=not finite or bool(failed.tight_overflow))
            nbr = fns.refit(grown, md.state.position, **self._box_kwargs(md.state))
            if not finite and nbr.capacity == tried[-1].capacity == int(nbr.skin.idx.shape[1]):
                return None  # nothing left to grow: the state itself blew up
            tried.append(nbr)
            return nbr

        state, nbr = run_with_regrowth(lambda nbr: self._block(md.state, nbr, jnp.asarray(n_steps, jnp.int32)),
                                       md.neighbors, regrow, f"MD block at step {md.step}")
        self._check_box(state)
        return MDState(state, nbr, md.step + n_steps)

    def _check_box(self, state: Any) -> None:
        if not _is_npt(self.settings) or self.system.multi_image:  # the multi-image list takes any width
            return
        widths = box_perpendicular_widths(self.box_of(state))
        need = 2 * (self.system.cutoff + self.system.skin)
        if widths.min() <= need:
            raise RuntimeError(f"the NPT box shrank to perpendicular widths {np.round(widths, 3).tolist()} Å, below "
                               f"2 x (cutoff + skin) = {need:.2f} Å needed by the minimum-image convention; start from "
                               "a larger supercell")

    def observe(self, md: MDState) -> dict[str, float]:
        """Log record at the current step: temperature (K), pressure (GPa), energies (eV), volume (Å³)."""
        obs = self._observe(md.state, md.neighbors)
        return {"step": md.step, "time_fs": md.step * self.settings.timestep_fs,
                "temperature_K": float(obs["temperature"]), "pressure_GPa": float(obs["pressure"]) / units.GPa,
                "potential_eV": float(obs["potential"]), "kinetic_eV": float(obs["kinetic"]),
                "total_eV": float(obs["potential"] + obs["kinetic"]), "volume_A3": float(obs["volume"]),
                "_forces": np.asarray(obs["forces"]), "_stress": np.asarray(obs["stress"])}

    def to_frame(self, md: MDState, record: dict[str, Any]) -> Any:
        """The current configuration as an ASE ``Atoms`` (input frame) with energy, forces, stress, momenta."""
        rot = self.system.rotation
        atoms = self.system.to_atoms(md.position, self.box_of(md.state), md.state.momentum)
        stress = rot.T @ record["_stress"] @ rot
        return frame(atoms, record["potential_eV"], record["_forces"] @ rot, stress,
                     step=md.step, time_fs=record["time_fs"], temperature_K=record["temperature_K"])

    def run(self, md: MDState, steps: int, block: int = 100, trajectory: str | os.PathLike | None = None,
            log: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
            callback: Callable[[dict[str, float]], None] | None = None, progress: bool = True,
            append: bool = False) -> MDState:
        """Advance ``md`` until ``md.step == steps`` (a resumed state continues), ``block`` steps per jit call.

        After every block (and once at the start unless ``append``): a log record (CSV ``log`` and
        ``callback``), a ``trajectory`` frame (extxyz) and an atomic ``checkpoint``.
        """
        if steps < md.step:
            raise ValueError(f"the state is already at step {md.step}, beyond steps={steps}")
        if block < 1:
            raise ValueError(f"block must be a positive number of steps, got {block}")
        if append and md.outputs:  # drop what was written after the checkpoint (and any partial frame or row)
            truncate_outputs(md.outputs, {"trajectory": trajectory, "log": log})
        writer = TrajectoryWriter(trajectory, append=append) if trajectory is not None else None
        csv_log = CSVLog(log, append=append) if log is not None else None
        bar = _progress(steps, md.step) if progress else None

        quiet = writer is None and csv_log is None and callback is None and bar is None

        def emit() -> None:
            if quiet:  # nothing to report: skip the observables (and their compilation)
                return
            record = self.observe(md)
            if writer is not None:
                writer.write(self.to_frame(md, record))
            public = {k: v for k, v in record.items() if not k.startswith("_")}
            if csv_log is not None:
                csv_log.write(public)
            if callback is not None:
                callback(public)
            if bar is not None:
                bar.set_postfix(T=f"{public['temperature_K']:.0f}K", Etot=f"{public['total_eV']:.4f}")

        try:
            if not append:
                emit()
            while md.step < steps:
                n = min(block, steps - md.step)
                md = self.advance(md, n)
                emit()
                if checkpoint is not None:
                    outputs = {}
                    if writer is not None:
                        outputs["trajectory"] = output_record(writer.path, writer.size)
                    if csv_log is not None:
                        outputs["log"] = output_record(csv_log.path, csv_log.size)
                    self.save_checkpoint(md, checkpoint, outputs=outputs)
                if bar is not None:
                    bar.update(n)
        finally:
            if writer is not None:
                writer.close()
            if csv_log is not None:
                csv_log.close()
            if bar is not None:
                bar.close()
        return md

    # ------------------------------------------------------------------------------- checkpoint / resume
    def save_checkpoint(self, md: MDState, path: str | os.PathLike, outputs: dict | None = None) -> Path:
        """Write everything the next step depends on to ``path`` (``.npz``) atomically; see
        :func:`~geodite_jax.simulation.md_checkpoint.save_md_checkpoint`."""
        return save_md_checkpoint(md.state, md.neighbors, md.step, path, self.settings, self.system.species, outputs)

    def resume(self, path: str | os.PathLike) -> MDState:
        """The state saved by :meth:`save_checkpoint`, neighbour list included; checks it fits this run (see
        :func:`~geodite_jax.simulation.md_checkpoint.load_md_checkpoint`)."""
        # the template is this ensemble's state pytree, the structure the saved leaves must fit
        return MDState(*load_md_checkpoint(path, self.settings, self.system, self.init().state, self.box_of))


def _progress(total: int, initial: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a convenience
        return None
    return tqdm(total=total, initial=initial, unit="step", desc="MD", leave=False)
