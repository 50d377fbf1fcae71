"""κ_SRME and diatomics of a Geodite trained on SevenNet-0 labels of a few κ-reference materials.

One command, resumable stages (each skips work whose output already exists)::

    python experiments/kappa_teacher/run.py [--out DIR] [--work DIR] [--stages select,configs,label,train,...]

1. ``select``: the κ materials whose primitive cell has ≤ 2 atoms and whose elements all lie in ``--elements``
   (default Li, Na, K, F, Cl: the 3 × 2 rocksalt alkali-halide grid, 6 materials) -> ``materials.json``.
2. ``configs``: per material, the FC3 supercell (64 atoms) rattled at several amplitudes, strained, and "hot"
   -> ``<work>/configs.extxyz``; ``label``: SevenNet-0 labels via ``experiments/peers/sevennet_label.py`` in
   its venv (subprocess, resumable) -> ``<work>/labels.extxyz``.
3. ``train``: one Geodite (``configs/kappa-teacher.yaml``) with the project's trainer -> ``<work>/train/``.
4. ``kappa``: the κ_SRME protocol (``benchmarks.phonons.kappa_for_material``) per material with the trained
   model -> ``kappa.{md,json}``, ``kappa_parity.png``; ``diatomics``: ``geodite bench diatomics --hetero``
   -> ``diatomics/``, ``diatomics_overview.png``. ``report.md`` gathers the figures and the command.

``--out`` (default ``experiments/results/kappa_teacher_<date>``) receives only small files (tables, plots);
``--work`` (default ``runs/<name of --out>``, git-ignored) the cells, labels and the training run.
``--quick`` is a smoke run without SevenNet: one material, a random-weight tiny potential instead of the
trained one, identity supercells, a 2×2×2 q-mesh and 3 relaxation steps (numbers meaningless; minutes -> s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

ROOT = Path(__file__).resolve().parents[2]
SEVENNET_PYTHON = ROOT / "experiments" / ".venvs" / "sevennet" / "bin" / "python"
LABEL_SCRIPT = ROOT / "experiments" / "peers" / "sevennet_label.py"
TRAIN_CONFIG = ROOT / "configs" / "kappa-teacher.yaml"
if str(ROOT) not in sys.path:  # run as a script from anywhere: import this checkout's geodite_jax
    sys.path.insert(0, str(ROOT))
STAGES = ("select", "configs", "label", "train", "kappa", "diatomics")
DEFAULT_ELEMENTS = ("Li", "Na", "K", "F", "Cl")

#: Gaussian rattles (Å, per Cartesian component) of the unstrained supercell, ``RATTLE_COPIES`` each: the
#: 0.01 Å of the finite displacements up to the anharmonic range the FC3 sees.
RATTLE_AMPLITUDES = (0.01, 0.02, 0.03, 0.05, 0.08)
RATTLE_COPIES = 4
#: Isotropic strains (fractional change of every lattice vector), each with a 0.02 Å rattle: the relaxation
#: moves the cell to the student's own lattice constant, which needs the stress near equilibrium.
ISOTROPIC_STRAINS = (-0.03, -0.02, -0.01, 0.01, 0.02, 0.03)
#: Random symmetric strains (max |ε_ij|) with a 0.02 Å rattle: shear stiffness.
SHEAR_STRAINS = (0.015, 0.015, 0.015, 0.015)
STRAIN_RATTLE = 0.02
#: "Higher-T-like" rattles (Å): room-temperature mean-square displacements of alkali halides are
#: ~0.01-0.04 Å² per component (Debye-Waller factors), i.e. σ ≈ 0.1-0.2 Å.
HOT_AMPLITUDES = (0.10, 0.10, 0.13, 0.13, 0.16, 0.16, 0.20, 0.20)
#: Displacement components are truncated at this many σ (no rare huge kicks).
TRUNCATE_SIGMA = 3.0
#: A rattled cell is redrawn if its shortest distance falls below this fraction of the unrattled one.
MIN_DISTANCE_FRACTION = 0.6


# ------------------------------------------------------------------------------------------------ selection
def primitive_size(atoms: Atoms, symprec: float = 1e-5) -> int:
    """Atoms in the spglib primitive cell of ``atoms`` (``len(atoms)`` if spglib finds none)."""
    import spglib

    cell = (atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers)
    prim = spglib.find_primitive(cell, symprec=symprec)
    return len(atoms) if prim is None else len(prim[2])


def select_materials(frames: Sequence[Atoms], elements: Sequence[str] = DEFAULT_ELEMENTS,
                     max_primitive_atoms: int = 2) -> list[Atoms]:
    """The rule: materials whose elements are all in ``elements`` and whose primitive cell has at most
    ``max_primitive_atoms`` atoms, ordered by (elements' atomic numbers, mp-id).

    Small primitive cells keep the κ calculation cheap (6 bands); a closed element set makes every element
    appear in several training materials. ``ValueError`` if nothing matches.
    """
    from ase.data import atomic_numbers

    bad = [e for e in elements if e not in atomic_numbers]
    if bad:
        raise ValueError(f"unknown element symbols: {', '.join(bad)}")
    if max_primitive_atoms < 1:
        raise ValueError(f"max_primitive_atoms must be >= 1, got {max_primitive_atoms}")
    allowed = set(elements)
    chosen = [a for a in frames if set(a.get_chemical_symbols()) <= allowed
              and primitive_size(a) <= max_primitive_atoms]
    if not chosen:
        raise ValueError(f"no κ material has only the elements {sorted(allowed)} and a primitive cell of at "
                         f"most {max_primitive_atoms} atoms")
    return sorted(chosen, key=lambda a: (sorted(set(a.numbers)), str(a.info.get("mp_id", ""))))


# ------------------------------------------------------------------------------------------ configurations
def _material_seed(atoms: Atoms, seed: int) -> int:
    """Seed from the material's id (stable across processes, unlike ``hash``) and the run seed."""
    key = str(atoms.info.get("mp_id", atoms.get_chemical_formula()))
    return zlib.crc32(key.encode()) ^ (seed * 2654435761 % 2**32)


def truncated_rattle(n_atoms: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian displacements ``[n_atoms, 3]`` (Å) of std ``sigma``, components clipped to ±3σ."""
    if sigma < 0:
        raise ValueError(f"rattle amplitude must be >= 0, got {sigma}")
    return np.clip(rng.normal(0.0, sigma, (n_atoms, 3)), -TRUNCATE_SIGMA * sigma, TRUNCATE_SIGMA * sigma)


def _min_distance(atoms: Atoms) -> float:
    from ase.geometry import get_distances

    _, d = get_distances(atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    return float(d[~np.eye(len(atoms), dtype=bool)].min())


def _rattled(base: Atoms, sigma: float, rng: np.random.Generator, d_min: float) -> Atoms:
    """``base`` rattled by :func:`truncated_rattle`, redrawn (≤ 20 times) while atoms come too close."""
    for _ in range(20):
        atoms = base.copy()
        atoms.positions += truncated_rattle(len(atoms), sigma, rng)
        if _min_distance(atoms) >= MIN_DISTANCE_FRACTION * d_min:
            return atoms
    raise ValueError(f"{base.get_chemical_formula()}: no rattle of σ = {sigma} Å keeps atoms apart")


def training_configurations(atoms: Atoms, supercell: Any, seed: int = 0) -> list[Atoms]:
    """Training cells of one material: its ``supercell`` (3×3 integer matrix) rattled, strained and "hot".

    Returns ``len(RATTLE_AMPLITUDES)·RATTLE_COPIES + len(ISOTROPIC_STRAINS) + len(SHEAR_STRAINS) +
    len(HOT_AMPLITUDES)`` cells of ``det(supercell)·len(atoms)`` atoms, each with ``info`` ``config_type``
    (``rattle``, ``strain``, ``shear``, ``hot``), ``amplitude`` (Å), ``strain`` and the material's
    ``mp_id``/``name``. Deterministic in (material id, ``seed``).
    """
    from ase.build import make_supercell

    matrix = np.asarray(supercell, int)
    if matrix.shape != (3, 3) or round(abs(np.linalg.det(matrix))) < 1:
        raise ValueError(f"supercell must be a non-singular 3×3 integer matrix, got {matrix.tolist()}")
    base = make_supercell(atoms, matrix)
    base.info = {k: atoms.info[k] for k in ("mp_id", "name") if k in atoms.info}
    rng = np.random.default_rng(_material_seed(atoms, seed))
    d_min = _min_distance(base)
    plan: list[tuple[str, float, np.ndarray]] = []
    plan += [("rattle", s, np.zeros((3, 3))) for s in RATTLE_AMPLITUDES for _ in range(RATTLE_COPIES)]
    plan += [("strain", STRAIN_RATTLE, e * np.eye(3)) for e in ISOTROPIC_STRAINS]
    for limit in SHEAR_STRAINS:
        eps = rng.uniform(-limit, limit, (3, 3))
        plan.append(("shear", STRAIN_RATTLE, (eps + eps.T) / 2))
    plan += [("hot", s, np.zeros((3, 3))) for s in HOT_AMPLITUDES]
    out = []
    for kind, sigma, eps in plan:
        strained = base.copy()
        strained.set_cell(base.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        cell = _rattled(strained, sigma, rng, d_min * (1 + min(0.0, float(np.linalg.eigvalsh(eps).min()))))
        cell.info.update(config_type=kind, amplitude=float(sigma), strain=float(np.abs(eps).max()))
        out.append(cell)
    return out


# ------------------------------------------------------------------------------------------------- helpers
def _log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _write_json(path: Path, data: Any) -> None:
    from geodite_jax.benchmarks import to_jsonable

    path.write_text(json.dumps(to_jsonable(data), indent=1))


def _symbols(atoms: Atoms) -> list[str]:
    """Element symbols of ``atoms``, by atomic number."""
    from ase.data import atomic_numbers

    return sorted(set(atoms.get_chemical_symbols()), key=atomic_numbers.__getitem__)


# -------------------------------------------------------------------------------------------------- stages
def stage_select(out: Path, elements: Sequence[str], quick: bool) -> list[Atoms]:
    from geodite_jax.benchmarks import phonons as ph

    frames = ph.load_kappa_structures()
    chosen = select_materials(frames, elements)[: 1 if quick else None]
    reference = ph.load_kappa_reference()
    rows = [{"mp_id": a.info["mp_id"], "name": a.info["name"], "space_group": int(a.info.get("symm.no", 0)),
             "n_atoms": len(a), "primitive_atoms": primitive_size(a), "elements": _symbols(a),
             "fc2_supercell": a.info["fc2_supercell"], "fc3_supercell": a.info["fc3_supercell"],
             "q_mesh": a.info["q_mesh"], "kappa_dft": reference[a.info["mp_id"]]["kappa_tot_avg"]} for a in chosen]
    _write_json(out / "materials.json", {"rule": f"elements ⊆ {sorted(elements)}, primitive cell ≤ 2 atoms",
                                         "materials": rows})
    _log(f"selected {len(chosen)}: " + ", ".join(f"{r['name']} ({r['mp_id']}, κ_DFT {r['kappa_dft']:.3g})"
                                                  for r in rows))
    return chosen


def stage_configs(work: Path, materials: Sequence[Atoms], seed: int) -> Path:
    import ase.io

    path = work / "configs.extxyz"
    if path.exists():
        _log(f"configs: {path} exists, kept")
        return path
    cells = [c for a in materials for c in training_configurations(a, a.info["fc3_supercell"], seed)]
    tmp = path.with_suffix(".tmp.extxyz")
    ase.io.write(tmp, cells, format="extxyz")
    os.replace(tmp, path)
    _log(f"configs: {len(cells)} cells of {sorted({len(c) for c in cells})} atoms -> {path}")
    return path


def stage_label(work: Path, configs: Path) -> tuple[Path, float | None]:
    """SevenNet-0 labels (subprocess in its venv, resumable); returns the labels and this call's seconds."""
    labels, timing = work / "labels.extxyz", work / "labels_timing.json"
    if labels.exists():
        _log(f"label: {labels} exists, kept")
        return labels, _read_json(timing)["seconds"] if timing.exists() else None
    if not SEVENNET_PYTHON.exists():
        raise FileNotFoundError(f"{SEVENNET_PYTHON} not found: bash experiments/peers/setup_envs.sh sevennet")
    t0 = time.perf_counter()
    cmd = [str(SEVENNET_PYTHON), str(LABEL_SCRIPT), str(configs), str(labels), "--chunk", "6"]
    _log("label: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0  # of this call only, if it resumed a partial file
    timing.write_text(json.dumps({"seconds": seconds}))
    return labels, seconds


def stage_train(work: Path, labels: Path) -> Path:
    from geodite_jax.cli import main as cli

    run_dir = work / "train"
    final = run_dir / "final"
    if (final / "geodite.json").exists():
        _log(f"train: {final} exists, kept")
        return final
    args = ["train", "--config", str(TRAIN_CONFIG), "--train", str(labels), "--out", str(run_dir), "--no-progress"]
    if (run_dir / "checkpoints").exists():
        args.append("--resume")
    _log("train: geodite " + " ".join(args))
    if cli(args) != 0:
        raise RuntimeError("training failed")
    return final


def _train_summary(run_dir: Path, out: Path) -> dict[str, Any]:
    """Steps, time and test errors of the training run; its small plots and tables are copied to ``out``."""
    import shutil

    summary = _read_json(run_dir / "summary.json")
    for name in ("test_errors.md", "test_errors.json", "learning_curves.png", "parity_test.png"):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, out / f"train_{name}")
    table = (run_dir / "test_errors.md").read_text() if (run_dir / "test_errors.md").exists() else ""
    return {"steps": summary.get("steps"), "train_seconds_total": summary.get("train_seconds_total"),
            "test": summary.get("test"), "baseline": summary.get("baseline"), "table": table}


def random_potential(work: Path, elements: Sequence[str]) -> Path:
    """A random-weight tiny potential (the ``--quick`` stand-in) saved under ``work/random_model``."""
    from ase.data import atomic_numbers

    import geodite_jax as gd

    path = work / "random_model"
    pot = gd.Potential.init(gd.GeoditeConfig.preset("tiny"), seed=0, element_energies="mptrj")
    pot = gd.Potential(pot.config, pot.params, pot.element_energies, pot.energy_scale,
                       {"elements": sorted(atomic_numbers[e] for e in elements)})
    pot.save(path)
    return path


def stage_kappa(out: Path, model: Path, materials: Sequence[Atoms], quick: bool,
                q_mesh: Sequence[int] | None, max_steps: int) -> dict[str, Any]:
    """The κ protocol per material (resumable: ``kappa_rows.jsonl``), tables and a parity plot."""
    import geodite_jax as gd
    from geodite_jax.benchmarks import environment_summary, write_tables
    from geodite_jax.benchmarks import phonons as ph

    if not ph.phono3py_available():
        raise ImportError("the kappa stage needs phono3py (pip install phono3py)")
    reference = ph.load_kappa_reference()
    calc = gd.GeoditeCalculator(gd.Potential.load(model), dtype="float64")
    rows_path = out / "kappa_rows.jsonl"
    done = {json.loads(line)["mp_id"]: json.loads(line) for line in rows_path.read_text().splitlines()} \
        if rows_path.exists() else {}
    for atoms in materials:
        mp_id = atoms.info["mp_id"]
        if mp_id in done:
            continue
        atoms = atoms.copy()
        if quick:  # smallest cells: the smoke run only checks that the stage runs end to end
            atoms.info["fc2_supercell"] = atoms.info["fc3_supercell"] = np.eye(3, dtype=int).tolist()
        t = time.perf_counter()
        row = ph.kappa_for_material(atoms, calc, reference.get(mp_id), q_mesh, max_steps=max_steps)
        row["wall_s"] = time.perf_counter() - t
        done[mp_id] = row
        with rows_path.open("a") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")
        _log(f"kappa: {row['name']} κ {row.get('kappa_tot_avg')} (DFT {row.get('kappa_dft'):.3g}) "
             f"SRME {row.get('SRME')} {row['failure'] or ''} [{row['wall_s']:.0f} s]")
    rows = [done[a.info["mp_id"]] for a in materials]
    srme = [r["SRME"] for r in rows]
    summary = {"model": str(model), "n_materials": len(rows),
               "kappa_SRME": float(np.mean(srme)) if not any(s is None or math.isnan(s) for s in srme) else None,
               "mean_SRE": float(np.mean([r["SRE"] for r in rows])),
               "failure_rate": float(np.mean([r["failure"] is not None for r in rows])),
               "q_mesh": "reference" if q_mesh is None else "x".join(map(str, q_mesh)),
               "max_relax_steps": max_steps, "wall_s": float(sum(r["wall_s"] for r in rows)),
               **environment_summary()}
    cols = ["mp_id", "name", "n_atoms", "space_group", "steps", "converged", "kappa_tot_avg", "kappa_p_avg",
            "kappa_c_avg", "kappa_dft", "SRD", "SRME", "failure", "wall_s"]
    write_tables(out, "kappa", summary, rows, cols, "κ_SRME of the SevenNet-0-taught Geodite (PhononDB-PBE, 300 K)",
                 notes=["κ in W/mK; SRME = 2 for failures (broken symmetry, imaginary modes). Mean over the "
                        "materials here only; the model was trained on these materials' own (rattled) cells."])
    _kappa_plot(rows, out / "kappa_parity.png")
    return summary


def _jsonable(row: dict[str, Any]) -> Any:
    from geodite_jax.benchmarks import to_jsonable

    return to_jsonable(row)


def _kappa_plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("kappa_tot_avg") and r["failure"] is None]
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for r in ok:
        ax.scatter(r["kappa_dft"], r["kappa_tot_avg"], color="C0")
        ax.annotate(r["name"], (r["kappa_dft"], r["kappa_tot_avg"]), fontsize=8, xytext=(3, 3),
                    textcoords="offset points")
    vals = [v for r in ok for v in (r["kappa_dft"], r["kappa_tot_avg"])] or [1.0, 10.0]
    lim = (min(vals) / 2, max(vals) * 2)
    ax.plot(lim, lim, "k--", lw=0.8)
    from matplotlib.ticker import NullFormatter

    ax.set(xscale="log", yscale="log", xlim=lim, ylim=lim, xlabel="κ PBE (PhononDB) W/mK",
           ylabel="κ Geodite (SevenNet-0 labels) W/mK", title=f"300 K, {len(ok)}/{len(rows)} without failure")
    for axis in (ax.xaxis, ax.yaxis):  # minor-tick labels of a narrow log range overlap
        axis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def stage_diatomics(out: Path, model: Path) -> dict[str, Any]:
    from geodite_jax.cli import main as cli

    target = out / "diatomics"
    args = ["bench", "diatomics", "--model", str(model), "--hetero", "--out", str(target)]
    _log("diatomics: geodite " + " ".join(args))
    if cli(args) != 0:
        raise RuntimeError("geodite bench diatomics failed")
    result = _read_json(target / "diatomics.json")
    _overview_plot(target, out / "diatomics_overview.png")
    return result["summary"]


def _overview_plot(target: Path, path: Path) -> None:
    """All dimer energy curves on one grid (E − E(6 Å)), PBE dashed where there is a reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from geodite_jax.benchmarks import diatomics as di

    curves = _read_json(target / "curves.json")
    try:
        reference = di.load_reference_curves()
    except FileNotFoundError:
        reference = {}
    n = len(curves)
    ncol = min(5, n)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.2 * nrow), squeeze=False)
    for ax, (name, c) in zip(axes.flat, curves.items(), strict=False):
        r = np.asarray(c["distances"], float)
        e = np.asarray([np.nan if v is None else v for v in c["energies"]], float)
        lo, _ = di.evaluation_window(name)
        ok = np.isfinite(e) & (r >= 0.8 * lo)
        ax.plot(r[ok], e[ok] - e[ok][-1], label="Geodite")
        a, _, b = name.partition("-")
        if a == b and a in reference:
            ref = reference[a]
            ax.plot(ref["distances"], ref["energies"] - ref["energies"][-1], "k--", lw=0.8, label="PBE")
        ax.axvspan(lo, 6.0, color="0.93", zorder=0)
        ax.axhline(0, color="0.6", lw=0.5)
        ax.set_ylim(-6, 8)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("distance (Å)", fontsize=9)
    fig.supylabel("E − E(6 Å) (eV)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- report
def write_report(out: Path, info: dict[str, Any]) -> Path:
    """``report.md`` / ``report.json``: every figure of this run next to the command that produced it."""
    _write_json(out / "report.json", info)
    lines = ["# κ_SRME and diatomics of a SevenNet-0-taught Geodite", "",
             f"Command: `{info['command']}`", ""]
    if "materials" in info:
        lines += ["## Materials (rule: " + info["materials"]["rule"] + ")", "",
                  "| mp_id | name | SG | atoms | κ_DFT (W/mK) |", "|---|---|---|---|---|"]
        lines += [f"| {m['mp_id']} | {m['name']} | {m['space_group']} | {m['n_atoms']} | {m['kappa_dft']:.3g} |"
                  for m in info["materials"]["materials"]]
        lines.append("")
    if "labels" in info:
        lab = info["labels"]
        lines += ["## Teacher labels", "", f"{lab['frames']} cells ({lab['atoms']} atoms in all) labelled by "
                  f"SevenNet-0" + (f" in {lab['seconds']:.0f} s" if lab.get("seconds") else "") + ".", ""]
    if "train" in info:
        t = info["train"]
        lines += ["## Student vs teacher (test split of the labels)", "", f"{t.get('steps')} steps, "
                  f"{(t.get('train_seconds_total') or 0) / 60:.1f} min; errors vs the SevenNet-0 labels "
                  "(`train_test_errors.md`, plots `train_*.png`):", "", t.get("table", ""), ""]
    if "kappa" in info:
        k = info["kappa"]
        srme = "–" if k["kappa_SRME"] is None else f"{k['kappa_SRME']:.3f}"
        lines += ["## κ", "", f"κ_SRME (mean over {k['n_materials']}) = **{srme}**, mean SRE = {k['mean_SRE']:.3f}, "
                  f"failure rate {k['failure_rate']:.2f}; q-mesh {k['q_mesh']}. Table: `kappa.md`; "
                  "plot: `kappa_parity.png`.", ""]
    if "diatomics" in info:
        d = info["diatomics"]
        lines += ["## Diatomics", "", f"{d['n_pairs']} pairs; homonuclear means: minima {d['mean_n_minima']:.2f}, "
                  f"energy jump {d['mean_energy_jump']:.3g} eV, tortuosity {d['mean_tortuosity']:.3f}, force flips "
                  f"{d['mean_force_flips']:.2f}, PBE energy MAE {d['mean_pbe_energy_mae']:.3g} eV. Table: "
                  "`diatomics/diatomics.md`; plots: `diatomics/plots/`, `diatomics_overview.png`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    date = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help=f"tables and plots (small files); default experiments/results/kappa_teacher_{date}")
    parser.add_argument("--work", default=None,
                        help="cells, labels, training run (large files); default runs/<name of --out> (git-ignored)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--elements", nargs="+", default=list(DEFAULT_ELEMENTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="use this saved potential instead of training one")
    parser.add_argument("--q-mesh", type=int, nargs=3, default=None, help="override the reference q-mesh")
    parser.add_argument("--max-relax-steps", type=int, default=300)
    parser.add_argument("--kappa-materials", type=int, default=None,
                        help="κ for the first N selected materials only (each takes minutes on 2 cores)")
    parser.add_argument("--quick", action="store_true", help="smoke run: no SevenNet, random tiny potential")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    suffix = "_quick" if args.quick else ""
    out = Path(args.out or ROOT / "experiments" / "results" / f"kappa_teacher_{date}{suffix}")
    work = Path(args.work) if args.work else ROOT / "runs" / out.name
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    q_mesh = args.q_mesh or ([2, 2, 2] if args.quick else None)
    max_steps = 3 if args.quick else args.max_relax_steps
    report_path = out / "report.json"
    info: dict[str, Any] = _read_json(report_path) if report_path.exists() else {}
    info["command"] = "python experiments/kappa_teacher/run.py " + " ".join(argv if argv is not None else sys.argv[1:])

    materials = stage_select(out, args.elements, args.quick)  # cheap; every later stage needs it
    info["materials"] = _read_json(out / "materials.json")
    configs = stage_configs(work, materials, args.seed) if "configs" in stages or "label" in stages else None
    model = Path(args.model) if args.model else None
    if args.quick:
        model = model or random_potential(work, sorted({s for a in materials for s in a.get_chemical_symbols()}))
    else:
        if "label" in stages and configs is not None:
            labels, seconds = stage_label(work, configs)
            import ase.io

            frames = ase.io.read(labels, index=":")
            info["labels"] = {"frames": len(frames), "atoms": int(sum(len(f) for f in frames)),
                              "seconds": seconds if seconds is not None else info.get("labels", {}).get("seconds")}
        if "train" in stages and model is None:
            model = stage_train(work, work / "labels.extxyz")
            info["train"] = _train_summary(work / "train", out)
        model = model or work / "train" / "final"
    if "kappa" in stages:
        info["kappa"] = stage_kappa(out, model, materials[: args.kappa_materials], args.quick, q_mesh, max_steps)
    if "diatomics" in stages:
        info["diatomics"] = stage_diatomics(out, model)
    _log(f"report: {write_report(out, info)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
