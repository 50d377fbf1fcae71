"""``geodite md`` and ``geodite relax``: molecular dynamics in jax-md and structure relaxation."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """(potential, atoms) from ``--model`` and ``INPUT``, with the model's element check and ``--repeat``."""
    from ..potential import Potential
    from ..simulation import read_structure

    model = Path(args.model)
    if not model.exists():
        raise FileNotFoundError(f"model directory not found: {model}")
    atoms = read_structure(args.input)
    if getattr(args, "repeat", None):
        if any(n < 1 for n in args.repeat):
            raise ValueError(f"--repeat needs three positive integers, got {args.repeat}")
        atoms = atoms.repeat(tuple(args.repeat))
    pot = Potential.load(model)
    pot.check_atoms(atoms)
    return pot, atoms


def _md(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        # jax-md's thermostats and barostat ask for float64 sums (util.high_precision_sum); in a float32 run JAX
        # sums in float32 and warns at each trace. The run's precision is the one the user chose: say nothing.
        warnings.filterwarnings("ignore", message="Explicitly requested dtype float64", category=UserWarning)
        return _run_md(args)


def _run_md(args: argparse.Namespace) -> int:
    if args.devices is not None:  # one run over several JAX devices (lammps-jax spatial decomposition)
        from ..simulation.distributed import run_md_cli

        return run_md_cli(args, _load)
    from ..simulation import MDRunner, MDSettings, jaxmd_system

    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    if args.ensemble != "npt" and args.pressure is not None:
        raise ValueError("--pressure applies to --ensemble npt only")
    pot, atoms = _load(args)
    settings = MDSettings(ensemble=args.ensemble, temperature_K=args.temperature, timestep_fs=args.timestep_fs,
                          thermostat=args.thermostat, friction_per_fs=args.friction, tau_fs=args.tau_fs,
                          pressure_GPa=0.0 if args.pressure is None else args.pressure,
                          barostat_tau_fs=args.barostat_tau_fs, seed=args.seed)
    system = jaxmd_system(pot, atoms, dtype=args.dtype, skin=args.skin)
    runner = MDRunner(system, settings)
    if args.resume:
        if args.checkpoint is None:
            raise ValueError("--resume needs --checkpoint PATH")
        md = runner.resume(args.checkpoint)
        print(f"resumed from {args.checkpoint} at step {md.step}")
    else:
        md = runner.init()
    print(f"{args.ensemble.upper()} MD of {len(atoms)} atoms ({atoms.get_chemical_formula()}), {args.steps} steps of "
          f"{args.timestep_fs} fs at {args.temperature} K, {system.dtype.__name__}, jax-md "
          f"{system.neighbor_format} neighbour list (skin {args.skin} Å)")

    def report(rec: dict[str, float]) -> None:
        if args.quiet:
            return
        print(f"step {rec['step']:>8d}  T {rec['temperature_K']:8.1f} K  P {rec['pressure_GPa']:8.3f} GPa  "
              f"Epot {rec['potential_eV']:14.6f}  Etot {rec['total_eV']:14.6f} eV  V {rec['volume_A3']:.2f} Å³")

    md = runner.run(md, args.steps, block=args.traj_every, trajectory=args.output, log=args.log,
                    checkpoint=args.checkpoint, callback=report, progress=not args.quiet, append=args.resume)
    print(f"wrote {args.output}" + (f" and {args.log}" if args.log else ""))
    return 0


def _relax(args: argparse.Namespace) -> int:
    from ase.io import write

    from ..calculator import GeoditeCalculator
    from ..simulation import jaxmd_system, relax_ase, relax_jaxmd

    pot, atoms = _load(args)
    if args.cell and not atoms.pbc.all():
        raise ValueError("--cell needs a fully periodic structure")
    if args.engine == "jaxmd":
        if args.cell:
            raise ValueError("--engine jaxmd relaxes positions only; use the default --engine ase with --cell")
        result = relax_jaxmd(jaxmd_system(pot, atoms, dtype=args.dtype), fmax=args.fmax, max_steps=args.max_steps)
    else:
        result = relax_ase(atoms, GeoditeCalculator(pot, dtype=args.dtype), fmax=args.fmax, cell=args.cell,
                           max_steps=args.max_steps, pressure_GPa=args.pressure)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write(args.output, result.atoms, format="extxyz")
    smax = f", max |σ + p| {result.smax:.2e} eV/Å³" if args.cell else ""
    print(f"{'converged' if result.converged else 'NOT converged'} after {result.steps} steps: E = "
          f"{result.energy:.6f} eV, max |F| = {result.fmax:.4f} eV/Å{smax}; wrote {args.output}")
    return 0 if result.converged else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``md`` and ``relax``."""
    md = sub.add_parser("md", help="molecular dynamics in jax-md (NVE, NVT, NPT)")
    md.add_argument("input", help="structure file ASE reads (CIF, POSCAR, extxyz, ...)")
    md.add_argument("--model", required=True, help="directory of a saved Potential")
    md.add_argument("--ensemble", choices=["nve", "nvt", "npt"], default="nvt")
    md.add_argument("--temperature", type=float, default=300.0, help="K (target, and the initial momenta)")
    md.add_argument("--pressure", type=float, default=None, help="GPa, NPT target (default 0)")
    md.add_argument("--timestep-fs", type=float, default=1.0)
    md.add_argument("--steps", type=int, required=True)
    md.add_argument("--output", required=True, help="extxyz trajectory (positions, cell, momenta, energies)")
    md.add_argument("--log", default=None, help="CSV log (step, T, P, energies, volume)")
    md.add_argument("--traj-every", type=int, default=100,
                    help="steps per compiled block: one log line, frame and checkpoint each (default 100)")
    md.add_argument("--thermostat", choices=["langevin", "nose-hoover"], default="langevin", help="NVT thermostat")
    md.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    md.add_argument("--tau-fs", type=float, default=100.0, help="Nose-Hoover thermostat time constant")
    md.add_argument("--barostat-tau-fs", type=float, default=1000.0, help="NPT barostat time constant")
    md.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    md.add_argument("--skin", type=float, default=0.5, help="neighbour-list skin, Å")
    md.add_argument("--repeat", type=int, nargs=3, metavar="N", help="build an N1 x N2 x N3 supercell first")
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("--checkpoint", default=None, help="write an .npz checkpoint after every block")
    md.add_argument("--resume", action="store_true", help="continue from --checkpoint, appending to the outputs")
    md.add_argument("--quiet", action="store_true", help="no progress bar or per-block lines")
    md.add_argument("--devices", type=int, default=None, metavar="N",
                    help="spread one NVE run over N JAX devices (lammps-jax grid decomposition; on a CPU set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    md.set_defaults(func=_md)

    rx = sub.add_parser("relax", help="relax positions (and with --cell the cell) with FIRE")
    rx.add_argument("input", help="structure file ASE reads (CIF, POSCAR, extxyz, ...)")
    rx.add_argument("--model", required=True, help="directory of a saved Potential")
    rx.add_argument("--cell", action="store_true", help="relax the cell too (ASE FrechetCellFilter)")
    rx.add_argument("--fmax", type=float, default=0.02, help="force criterion, eV/Å")
    rx.add_argument("--pressure", type=float, default=0.0, help="GPa, with --cell")
    rx.add_argument("--max-steps", type=int, default=500)
    rx.add_argument("--output", required=True, help="extxyz of the relaxed structure")
    rx.add_argument("--engine", choices=["ase", "jaxmd"], default="ase")
    rx.add_argument("--repeat", type=int, nargs=3, metavar="N", help="build an N1 x N2 x N3 supercell first")
    rx.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    rx.set_defaults(func=_relax)
