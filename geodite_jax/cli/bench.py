"""``geodite bench <name>``: benchmark commands, each writing ``<name>.md``, ``<name>.json`` and plots to ``--out``.

Subcommands register themselves in ``BENCHMARKS``; another module can add one with :func:`register`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: ``name -> (help, add_arguments(parser), run(args) -> int)``
BENCHMARKS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def register(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int]) -> None:
    """Add ``geodite bench <name>`` (the lead's ``accuracy`` and ``md`` can register the same way)."""
    BENCHMARKS[name] = (help_text, add_arguments, run)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The potential of ``--model`` and its ASE calculator."""
    import geodite_jax as gd

    if not Path(args.model).exists():
        raise FileNotFoundError(f"model directory {args.model} not found")
    pot = gd.Potential.load(args.model)
    return pot, gd.GeoditeCalculator(pot, dtype=args.dtype)


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--model", required=True, help="directory of a saved Potential")
    p.add_argument("--out", default=out, help=f"output directory (default {out})")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                   help="precision of the model evaluation (the protocols use float64)")


def _report(out: str | Path, name: str, summary: dict[str, Any], rows: list[dict[str, Any]], columns: list[str],
            title: str, note: str, line: str) -> int:
    """Write ``<name>.md`` / ``<name>.json`` (the summary with the environment appended), print ``line`` with
    the table's path; the command's exit status 0."""
    from ..benchmarks import environment_summary, write_tables

    md, _ = write_tables(out, name, {**summary, **environment_summary()}, rows, columns, title, notes=[note])
    print(f"{line}; tables: {md}")
    return 0


# --------------------------------------------------------------------------------------------- discovery
def _discovery_args(p: argparse.ArgumentParser) -> None:
    _common(p, "bench-results/discovery")
    p.add_argument("structures", nargs="+", help="ASE-readable structure files (ids from info['material_id'] etc.)")
    p.add_argument("--references", default=None,
                   help="pymatgen entries JSON(.gz) for the hull (default: the MP elemental references)")
    p.add_argument("--fmax", type=float, default=0.05, help="force threshold of the relaxation, eV/Å")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--no-mp2020", action="store_true", help="model predicts MP2020-corrected energies already")
    p.add_argument("--limit", type=int, default=None, help="first N structures only")


def _discovery(args: argparse.Namespace) -> int:
    from ..benchmarks import discovery as disc

    structures = disc.read_structures(args.structures)[: args.limit]
    refs = disc.load_reference_entries(args.references)
    _, calc = _load(args)
    out = Path(args.out)
    t0 = time.perf_counter()
    records = disc.relax_and_predict(structures, calc, out / "predictions.jsonl", refs, args.fmax, args.max_steps,
                                     apply_mp2020=not args.no_mp2020)
    ids = {sid for sid, _ in structures}
    records = [r for r in records if r["id"] in ids]
    summary = {"model": args.model, **disc.summarize(records), "fmax": args.fmax, "max_steps": args.max_steps,
               "wall_s_this_run": time.perf_counter() - t0}
    cols = ["id", "formula", "n_atoms", "steps", "converged", "energy_per_atom", "e_form_per_atom", "e_hull_pred",
            "e_hull_true", "failure"]
    rows = [{k: r.get(k) for k in cols} for r in records]
    return _report(out, "discovery", summary, rows, cols, "Matbench-Discovery-style relax-then-predict",
                   "Stable ⇔ hull distance ≤ 0 eV/atom; a failed prediction counts as unstable. Hull: fixed DFT hull "
                   "formula where WBM columns exist, else pymatgen PhaseDiagram of the reference entries. Energies "
                   "MP2020-corrected unless --no-mp2020.",
                   f"{len(records)} structures, {summary['n_failed']} flagged; "
                   f"F1 {summary.get('F1', float('nan')):.3f}")


register("discovery", "relax-then-predict structures, hull distances and discovery metrics", _discovery_args,
         _discovery)


# ------------------------------------------------------------------------------------------------ kappa
def _kappa_args(p: argparse.ArgumentParser) -> None:
    _common(p, "bench-results/kappa")
    p.add_argument("--materials", type=int, default=None, help="first N of the 103 reference materials")
    p.add_argument("--ids", nargs="*", default=None, help="mp-ids to run (default: all)")
    p.add_argument("--q-mesh", type=int, nargs=3, default=None,
                   help="override the reference q-mesh (faster; SRME then undefined, SRD still reported)")
    p.add_argument("--fmax", type=float, default=1e-4)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--fc3-pair-cutoff", type=float, default=None, help="Å; fewer FC3 displacements (not protocol)")
    p.add_argument("--structures", default=None, help="reference structures extxyz (default: shared data)")
    p.add_argument("--reference", default=None, help="reference κ json.gz (default: shared data)")


def _kappa(args: argparse.Namespace) -> int:
    import math

    import numpy as np

    from ..benchmarks import phonons as ph

    if not ph.phono3py_available():
        raise ImportError("geodite bench kappa needs the optional phono3py extra (pip install phono3py)")
    frames = ph.load_kappa_structures(args.structures)
    reference = ph.load_kappa_reference(args.reference)
    if args.ids:
        unknown = sorted(set(args.ids) - {a.info["mp_id"] for a in frames})
        if unknown:
            raise ValueError(f"unknown mp-ids: {', '.join(unknown)}")
        frames = [a for a in frames if a.info["mp_id"] in set(args.ids)]
    frames = frames[: args.materials]
    _, calc = _load(args)
    rows = []
    t0 = time.perf_counter()
    for atoms in frames:
        t = time.perf_counter()
        row = ph.kappa_for_material(atoms, calc, reference.get(atoms.info["mp_id"]), args.q_mesh, args.fmax,
                                    args.max_steps, args.fc3_pair_cutoff)
        row["wall_s"] = time.perf_counter() - t
        rows.append(row)
        print(f"{row['name']:>10s} κ {row.get('kappa_tot_avg')} (DFT {row.get('kappa_dft'):.3g}) "
              f"SRME {row.get('SRME')} {row['failure'] or ''}")
    srme = [r["SRME"] for r in rows]
    summary = {"model": args.model, "n_materials": len(rows),
               "kappa_SRME": float(np.mean(srme)) if rows and not any(math.isnan(s) for s in srme) else math.nan,
               "mean_SRE": float(np.mean([r["SRE"] for r in rows])) if rows else math.nan,
               "failure_rate": float(np.mean([r["failure"] is not None for r in rows])) if rows else math.nan,
               "q_mesh": "reference" if args.q_mesh is None else "x".join(map(str, args.q_mesh)),
               "wall_s": time.perf_counter() - t0}
    cols = ["mp_id", "name", "n_atoms", "space_group", "kappa_tot_avg", "kappa_dft", "SRD", "SRME", "failure",
            "wall_s"]
    return _report(args.out, "kappa", summary, rows, cols, "κ_SRME (PhononDB-PBE, 300 K, Wigner RTA)",
                   "SRME = 2 for failures (broken symmetry, imaginary modes). κ_SRME is the mean over the materials "
                   "run here, not over all 103 unless all were run.",
                   f"κ_SRME {summary['kappa_SRME']:.3f} over {len(rows)} materials")


register("kappa", "κ_SRME on the PhononDB-PBE-103 reference materials (needs phono3py)", _kappa_args, _kappa)


# ---------------------------------------------------------------------------------------------- phonons
def _phonons_args(p: argparse.ArgumentParser) -> None:
    _common(p, "bench-results/phonons")
    p.add_argument("structures", nargs="+", help="ASE-readable unit cells")
    p.add_argument("--supercell", type=int, nargs=3, default=[2, 2, 2])
    p.add_argument("--mesh", type=int, nargs=3, default=[8, 8, 8])
    p.add_argument("--temperature", type=float, default=300.0)
    p.add_argument("--relax-steps", type=int, default=0, help="symmetric relaxation steps before phonons")


def _phonons(args: argparse.Namespace) -> int:
    import numpy as np

    from ..benchmarks import phonons as ph
    from ..benchmarks.discovery import read_structures

    _, calc = _load(args)
    rows = []
    for sid, atoms in read_structures(args.structures):
        row: dict[str, Any] = {"id": sid, "formula": atoms.get_chemical_formula(), "failure": None}
        try:
            if args.relax_steps > 0:
                atoms, rinfo = ph.relax_symmetric(atoms, calc, fmax=1e-3, max_steps=args.relax_steps)
                row["space_group"] = rinfo["space_group"]
            phonon = ph.harmonic_phonons(atoms, calc, np.diag(args.supercell))
            props = ph.phonon_properties(phonon, args.mesh, [args.temperature])
            row.update(max_frequency_THz=props["max_frequency"], imaginary=props["imaginary"],
                       free_energy_kJ_mol=float(props["free_energy"][0]), entropy_J_K_mol=float(props["entropy"][0]),
                       heat_capacity_J_K_mol=float(props["heat_capacity"][0]))
        except Exception as err:  # noqa: BLE001 - report and go on with the next structure
            row["failure"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    cols = ["id", "formula", "max_frequency_THz", "imaginary", "free_energy_kJ_mol", "entropy_J_K_mol",
            "heat_capacity_J_K_mol", "failure"]
    summary = {"model": args.model, "supercell": "x".join(map(str, args.supercell)),
               "mesh": "x".join(map(str, args.mesh)), "temperature_K": args.temperature}
    return _report(args.out, "phonons", summary, rows, cols, "Harmonic phonons (phonopy)",
                   "Per mole of primitive cells; finite displacements of 0.01 Å.", f"{len(rows)} structures")


register("phonons", "harmonic phonons: frequencies, free energy, entropy, heat capacity", _phonons_args, _phonons)


# -------------------------------------------------------------------------------------------- diatomics
def _diatomics_args(p: argparse.ArgumentParser) -> None:
    _common(p, "bench-results/diatomics")
    p.add_argument("--elements", nargs="*", default=None, help="symbols (default: the elements the model knows)")
    p.add_argument("--hetero", action="store_true", help="also every heteronuclear pair of the elements")
    p.add_argument("--reference", default=None, help="diatomics-dft.json.gz (default: shared data, if present)")
    p.add_argument("--no-plots", action="store_true")


def _diatomics(args: argparse.Namespace) -> int:
    import itertools
    import json
    import math

    import numpy as np
    from ase.data import atomic_numbers

    from ..batched import dimer_curves, known_elements
    from ..benchmarks import diatomics as di
    from ..benchmarks import to_jsonable

    pot, _ = _load(args)
    elements = args.elements or known_elements(pot)
    bad = [e for e in elements if e not in atomic_numbers]
    if bad:
        raise ValueError(f"unknown element symbols: {', '.join(bad)}")
    try:
        reference = di.load_reference_curves(args.reference)
    except FileNotFoundError:
        if args.reference:
            raise
        reference = {}
    pairs = [(e, e) for e in elements]
    if args.hetero:
        pairs += list(itertools.combinations(elements, 2))
    t0 = time.perf_counter()
    curves = dimer_curves(pot, pairs, di.DISTANCES, di.BOX, dtype=args.dtype)
    rows = [di.curve_metrics(name, c, reference) for name, c in curves.items()]
    out = Path(args.out)
    if not args.no_plots:
        for name, c in curves.items():
            a, _, b = name.partition("-")
            di.plot_curve(name, c, out / "plots" / f"{name}.png", reference.get(a) if a == b else None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps(to_jsonable(curves)))

    def mean(key: str, homo: bool = True) -> float:
        vals = [r[key] for r in rows if key in r and (r["pair"].split("-")[0] == r["pair"].split("-")[1]) == homo
                and r[key] is not None and math.isfinite(r[key])]
        return float(np.mean(vals)) if vals else math.nan

    keys = ["n_minima", "energy_jump", "tortuosity", "force_flips", "pbe_energy_mae", "pbe_force_mae",
            "pbe_wall_dist_mae"]
    summary = {"model": args.model, "n_pairs": len(rows), "n_with_reference": sum("pbe_energy_mae" in r for r in rows),
               **{f"mean_{k}": mean(k) for k in keys}, "wall_s": time.perf_counter() - t0}
    cols = ["pair", "n_minima", "energy_diff_flips", "energy_jump", "tortuosity", "force_flips", "force_jump",
            "wall_energy", "wall_monotone", "pbe_energy_mae", "pbe_force_mae", "pbe_wall_dist_mae",
            "pbe_bond_length_error"]
    return _report(out, "diatomics", summary, rows, cols, "Diatomic curves: smoothness and PBE comparison",
                   "Window [0.9·r_cov, 6 Å]; means over homonuclear pairs. Ideal: 1 minimum, energy_jump ≈ 0, "
                   "tortuosity 1, force_flips 1.",
                   f"{len(rows)} dimers; mean tortuosity {summary['mean_tortuosity']:.3f}")


register("diatomics", "dimer curves, smoothness metrics, PBE comparison, plots", _diatomics_args, _diatomics)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` with one subcommand per entry of :data:`BENCHMARKS`."""
    bench = sub.add_parser("bench", help="benchmarks: discovery, kappa, phonons, diatomics")
    inner = bench.add_subparsers(dest="benchmark", required=True)
    for name, (help_text, add_arguments, run) in BENCHMARKS.items():
        p = inner.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(func=run)
