"""MD across JAX devices equals single-device jax-md: an NVE trajectory over 2 and 4 host devices
(lammps-jax's grid spatial decomposition, :mod:`geodite_jax.simulation.distributed`) against the same
trajectory from ``jax_md.simulate.nve`` on one device (:func:`geodite_jax.simulation.jaxmd.jaxmd_system`).

Usage (repository root; the script splits the CPU into host devices itself, before JAX starts)::

    python experiments/dist_md_check.py                       # Cu fcc 2,048 atoms, 100 steps, 2 and 4 devices
    python experiments/dist_md_check.py --repeat 4 --steps 10 --devices 2     # quick (256 atoms)

Untrained ``tiny`` Geodite (seed 0), float64, dt 1 fs, Maxwell-Boltzmann momenta at ``--temperature``.
Atoms sit on the tile boundaries (fcc planes at fractional 0 and 1/2), so thermal motion carries some across:
the script counts the atoms that ``redistribute`` migrated and fails if none did, or if any position
differs from the reference by more than ``--tol`` Å (default 1e-8) after the last step. Prints a markdown
table; exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _host_devices(n: int) -> None:
    """Split the host CPU into n XLA devices (must run before JAX initialises its backend)."""
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()


def reference(potential, atoms, momenta, steps: int, dt_fs: float, skin: float = 0.5) -> dict:
    """Single-device jax-md NVE (one compiled program: the first call with dt = 0 evaluates the forces)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ase import units
    from jax_md import simulate

    from geodite_jax.simulation.jaxmd import jaxmd_system

    t0 = time.perf_counter()
    system = jaxmd_system(potential, atoms, dtype="float64", skin=skin)
    _, apply_fn = simulate.nve(system.energy_fn, system.shift_fn, dt_fs * units.fs)
    mass = jnp.asarray(system.masses)[:, None]
    p0 = jnp.asarray(system.rotate_in(momenta))
    state = simulate.NVEState(system.positions, p0, jnp.zeros_like(p0), mass)

    @jax.jit
    def run(state, nbr, n, dt):
        def body(_, carry):
            state, nbr = carry
            state = apply_fn(state, neighbor=nbr, dt=dt)
            return state, nbr.update(state.position)

        return jax.lax.fori_loop(0, n, body, (state, nbr))

    nbr = system.allocate(system.positions)
    start = state
    for _ in range(6):  # an overflowing list: larger capacities, the whole run redone (as MDRunner redoes a block)
        state, nbr = run(start, nbr, 1, 0.0)  # forces at the start
        state, nbr = run(state, nbr, steps, dt_fs * units.fs)
        if not (bool(nbr.did_buffer_overflow) or bool(getattr(nbr, "tight_overflow", False))):
            break
        nbr = system.allocate(system.positions, capacity=int(nbr.capacity * 1.5) + 4,
                              extra_capacity=int(nbr.skin.idx.shape[-1] // 2) + 4)
    else:
        raise RuntimeError("the reference's neighbour list kept overflowing")
    return {"frac": np.asarray(state.position) % 1.0, "momenta": np.asarray(state.momentum) @ system.rotation,
            "wall_s": time.perf_counter() - t0}


def compare(potential, atoms, momenta, steps: int, dt_fs: float, devices: int, ref: dict, skin: float = 0.3) -> dict:
    """The distributed run on ``devices`` devices and its largest deviations from ``ref``."""
    import numpy as np

    from geodite_jax.simulation.distributed import DistributedMD

    t0 = time.perf_counter()
    md = DistributedMD(potential, atoms, devices, dtype="float64", timestep_fs=dt_fs, skin=skin)
    state = md.init(momenta)
    start = md.gather(state)
    state = md.advance(state, steps)
    end = md.gather(state)
    delta = end["frac"] - ref["frac"]
    delta -= np.round(delta)
    obs = md.observe(state)
    return {"devices": devices, "grid": "x".join(map(str, md.grid)),
            "max_dr": float(np.abs(delta @ md.cell).max()),
            "max_dp": float(np.abs(end["momenta"] - ref["momenta"]).max()),
            "migrated": obs["migrated"], "net_changed_owner": int(np.sum(start["rank"] != end["rank"])),
            "rebuilds": obs["rebuilds"], "total_eV": obs["total_eV"], "wall_s": time.perf_counter() - t0}


def build(repeat: int, rattle: float, seed: int):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(rattle, seed=seed)
    return atoms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeat", type=int, default=8, help="Cu fcc cubic cell repeated N x N x N (4 N^3 atoms)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--dt-fs", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=600.0)
    ap.add_argument("--rattle", type=float, default=0.05, help="Å, standard deviation")
    ap.add_argument("--skin", type=float, default=0.3, help="Å, Verlet skin of the distributed run (a rebuild, "
                    "with migration, once an atom has moved half of it)")
    ap.add_argument("--tol", type=float, default=1e-8, help="largest allowed position deviation, Å")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="a saved Potential directory instead of the untrained tiny one")
    args = ap.parse_args(argv)
    _host_devices(max(args.devices))

    import jax

    jax.config.update("jax_enable_x64", True)
    import geodite_jax as gd
    from geodite_jax.simulation.distributed import DistributedMD

    pot = gd.Potential.load(args.model) if args.model else gd.Potential.init(gd.GeoditeConfig.preset("tiny"), seed=0)
    name = args.model or "tiny Geodite (untrained, seed 0)"
    atoms = build(args.repeat, args.rattle, args.seed)
    momenta = DistributedMD.initial_momenta_for(atoms, args.temperature, args.seed)
    print(f"Cu fcc {len(atoms)} atoms, {name}, float64, NVE {args.steps} x {args.dt_fs} fs, "
          f"T0 {args.temperature} K, skin {args.skin} Å; {jax.device_count()} host devices, jax {jax.__version__}")
    ref = reference(pot, atoms, momenta, args.steps, args.dt_fs, skin=min(args.skin, 0.5))
    rows = [compare(pot, atoms, momenta, args.steps, args.dt_fs, n, ref, args.skin) for n in args.devices]
    print("\n| devices | grid | max abs dr (Å) | max abs dp (ASE units) | migrated (at rebuilds) | owner changed, "
          "start vs end | rebuilds | E_total end (eV) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| 1 (jax-md) | - | 0 | 0 | - | - | - | - | {ref['wall_s']:.1f} |")
    ok = True
    for r in rows:
        print(f"| {r['devices']} | {r['grid']} | {r['max_dr']:.2e} | {r['max_dp']:.2e} | {r['migrated']} | "
              f"{r['net_changed_owner']} | {r['rebuilds']} | {r['total_eV']:.8f} | {r['wall_s']:.1f} |")
        ok &= r["max_dr"] <= args.tol and r["migrated"] > 0
    print(f"\n{'PASS' if ok else 'FAIL'}: positions within {args.tol:g} Å of single-device jax-md and atoms migrated "
          "between devices")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
