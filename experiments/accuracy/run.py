"""Accuracy at equal budget: Geodite, Nequix and MACE trained on the same real DFT splits, same epochs.

One command (from the repository root, with the project's python)::

    python experiments/accuracy/run.py [--datasets Si,Mo,Li,Ge,acac] [--models geodite,nequix,mace]
        [--epochs N] [--acac-epochs M] [--quick] [--out DIR]

Per dataset, one deterministic split is written once to extxyz (``<out>/splits/<dataset>/``): train and
valid (10 % of the dataset's training file, seeded) and the dataset's own test file(s). Each model is trained
by its driver (``train_<model>.py``; the peers' inside ``experiments/.venvs/<peer>``) with the same number of
epochs, writes its test predictions to ``.npz``, and its training wall and CPU seconds. One function here
(:func:`score`, on :func:`geodite_jax.training.error_metrics`) scores all three on the same frames; the table
goes to ``<out>/accuracy.{md,json}`` and the parity plots to ``<out>/parity_<dataset>_<test>.png``.
A finished (model, dataset) pair (its ``result.json``) is skipped on rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]  # common.py; geodite_jax from a checkout

import common  # noqa: E402

MODELS = ("geodite", "nequix", "mace")
CUTOFF = 5.0  # Å, all models, all datasets (the tiny preset's cutoff; MACE's BOTNet/acac r_max)
VALID_FRACTION = 0.1
SPLIT_SEED = 0
QUICK_SIZES = (12, 3, 5)  # --quick: train, valid, test frames


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark dataset: training file and named test files under the shared data folder."""

    name: str
    train: str  # path relative to shared/data
    tests: tuple[tuple[str, str], ...]  # (test name, path relative to shared/data)
    format: str
    stress: bool  # periodic with stress labels


DATASETS: dict[str, DatasetSpec] = {
    **{el: DatasetSpec(el, f"mlearn-zuo2020/{el}/training.json", (("test", f"mlearn-zuo2020/{el}/test.json"),),
                       "mlearn-json", True) for el in ("Si", "Mo", "Li", "Ge")},
    "acac": DatasetSpec("acac", "botnet-acac/train_300K.xyz",
                        (("300K", "botnet-acac/test_MD_300K.xyz"), ("600K", "botnet-acac/test_MD_600K.xyz")),
                        "extxyz", False),
}


def shared_data() -> Path:
    """``$GEODITE_SHARED_DATA`` or ``<checkout>/../shared/data``."""
    from geodite_jax.benchmarks import shared_data_dir

    return shared_data_dir()


# ------------------------------------------------------------------------------------------------ split
def split_indices(n_frames: int, valid_fraction: float = VALID_FRACTION,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/valid split of ``n_frames`` frames: ``(train [n - k], valid [k])`` sorted indices,
    ``k = max(1, round(valid_fraction * n))``; a function of (n, fraction, seed) only."""
    if n_frames < 2:
        raise ValueError(f"need at least 2 frames to split off a validation set, got {n_frames}")
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    k = min(n_frames - 1, max(1, int(round(valid_fraction * n_frames))))
    order = np.random.default_rng(seed).permutation(n_frames)
    return np.sort(order[k:]), np.sort(order[:k])


def write_split_file(frames: Sequence[Any], path: Path) -> Path:
    """Frames -> extxyz with the labels under the ``REF_*`` keys (stress as ASE Voigt-6, periodic only)."""
    import ase.io
    from ase import Atoms
    from ase.stress import full_3x3_to_voigt_6_stress

    images = []
    for f in frames:
        atoms = Atoms(numbers=f.numbers, positions=f.positions, cell=f.cell, pbc=f.pbc)
        atoms.info[common.ENERGY_KEY] = float(f.energy)
        atoms.arrays[common.FORCES_KEY] = np.asarray(f.forces, np.float64)
        if f.stress is not None and f.pbc.all():
            atoms.info[common.STRESS_KEY] = full_3x3_to_voigt_6_stress(f.stress)
        if f.group:
            atoms.info["group"] = f.group
        if f.id:
            atoms.info["frame_id"] = f.id
        images.append(atoms)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    ase.io.write(tmp, images, format="extxyz")
    tmp.replace(path)
    return path


def make_split(spec: DatasetSpec, out: Path, data_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Write (once) and describe the split of ``spec``: ``{"train", "valid", "tests": {name: path}, ...}``."""
    from geodite_jax.data import read_frames

    folder = out / "splits" / spec.name
    meta_path = folder / "split.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("quick") == quick and all(Path(p).is_file() for p in [meta["train"], meta["valid"],
                                                                          *meta["tests"].values()]):
            return meta
    source = data_dir / spec.train
    if not source.is_file():
        raise FileNotFoundError(f"{spec.name}: training file {source} not found")
    frames = list(read_frames(source, spec.format))
    if quick:
        frames = frames[:QUICK_SIZES[0] + QUICK_SIZES[1]]
    train_idx, valid_idx = split_indices(len(frames))
    meta = {"dataset": spec.name, "source": str(source), "quick": quick, "seed": SPLIT_SEED,
            "valid_fraction": VALID_FRACTION, "train_indices": train_idx.tolist(), "valid_indices": valid_idx.tolist(),
            "train": str(write_split_file([frames[i] for i in train_idx], folder / "train.extxyz")),
            "valid": str(write_split_file([frames[i] for i in valid_idx], folder / "valid.extxyz")),
            "tests": {}, "counts": {"train": len(train_idx), "valid": len(valid_idx)}}
    for name, rel in spec.tests:
        test = list(read_frames(data_dir / rel, spec.format))
        if quick:
            test = test[:QUICK_SIZES[2]]
        meta["tests"][name] = str(write_split_file(test, folder / f"test_{name}.extxyz"))
        meta["counts"][f"test_{name}"] = len(test)
    common.write_json(meta_path, meta)
    return meta


# ----------------------------------------------------------------------------------------------- training
def driver_command(model: str, venvs: Path) -> list[str]:
    """Interpreter + driver script of ``model`` (FileNotFoundError when a peer's venv is missing)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {MODELS}")
    if model == "geodite":
        return [sys.executable, str(HERE / "train_geodite.py")]
    python = venvs / model / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{model}: virtualenv {python.parent.parent} not found "
                                "(build it with experiments/peers/setup_envs.sh)")
    return [str(python), str(HERE / f"train_{model}.py")]


def train_model(model: str, spec: DatasetSpec, split: dict[str, Any], out: Path, epochs: int,
                venvs: Path) -> dict[str, Any]:
    """Train ``model`` on ``split`` in its own process unless its ``result.json`` already holds this run."""
    run_dir = out / "runs" / spec.name / model
    result_path = run_dir / "result.json"
    if result_path.is_file():
        done = json.loads(result_path.read_text())
        if done.get("epochs") == epochs and all((run_dir / f"pred_{n}.npz").is_file() for n in split["tests"]):
            print(f"  {model} on {spec.name}: done before, skipped", flush=True)
            return done
    cmd = driver_command(model, venvs) + ["--train", split["train"], "--valid", split["valid"], "--out",
                                          str(run_dir), "--epochs", str(epochs), "--cutoff", str(CUTOFF)]
    cmd += [item for name, path in split["tests"].items() for item in ("--test", f"{name}={path}")]
    if spec.stress:
        cmd.append("--stress")
    if run_dir.exists():  # an unfinished run: start it again from scratch
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    env = {**os.environ, **common.THREAD_ENV, "PYTHONPATH": str(REPO)}
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    print(f"  {model} on {spec.name}: training {epochs} epochs (log: {run_dir / 'train.log'})", flush=True)
    with (run_dir / "train.log").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0 or not result_path.is_file():
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"{model} on {spec.name} failed (exit {proc.returncode}); log tail:\n{tail}")
    done = json.loads(result_path.read_text())
    done.update({"loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
                 "process_wall_s": time.perf_counter() - t0})
    common.write_json(result_path, done)
    return done


# ----------------------------------------------------------------------------------------------- scoring
def load_predictions(path: str | Path, n_atoms: Sequence[int]) -> Any:
    """A driver's ``.npz`` -> :class:`geodite_jax.training.Predictions` (checks the shapes against the test)."""
    from geodite_jax.training import Predictions

    data = np.load(path)
    n_atoms = np.asarray(n_atoms)
    shapes = {"energy": (len(n_atoms),), "forces": (int(n_atoms.sum()), 3), "stress": (len(n_atoms), 3, 3)}
    for key, shape in shapes.items():
        if data[key].shape != shape:
            raise ValueError(f"{path}: {key} has shape {list(data[key].shape)}, the test set needs {list(shape)}")
    return Predictions(np.arange(len(n_atoms)), data["energy"], data["forces"], data["stress"])


def test_dataset(path: str | Path) -> Any:
    """A split test file as a :class:`geodite_jax.data.GraphDataset` (the labels the scores use)."""
    from geodite_jax.data import GraphDataset, read_frames

    frames = list(read_frames(path, "extxyz", energy_key=common.ENERGY_KEY, forces_key=common.FORCES_KEY,
                              stress_key=common.STRESS_KEY))
    return GraphDataset.from_frames(frames, CUTOFF)


def score(pred: Any, ds: Any) -> dict[str, float]:
    """The table's numbers for one model on one test set: E (meV/atom), F (meV/Å), S (GPa) MAE and RMSE.

    The single scoring function of the benchmark (all models go through it, on the same frames).
    """
    from geodite_jax.training import error_metrics

    return error_metrics(pred, ds, groups=False)["all"]


TABLE_COLUMNS = ["dataset", "test", "model", "params", "epochs", "frames", "E MAE", "E RMSE", "F MAE", "F RMSE",
                 "S MAE", "S RMSE", "train wall (min)", "train CPU (min)"]


def table_row(dataset: str, test: str, model: str, result: dict[str, Any], metrics: dict[str, float]) -> dict:
    """One row of the accuracy table (units: meV/atom, meV/Å, GPa, minutes)."""
    return {"dataset": dataset, "test": test, "model": model, "params": result.get("n_params"),
            "epochs": result.get("epochs"), "frames": int(metrics.get("frames", 0)),
            "E MAE": metrics.get("energy_mae"), "E RMSE": metrics.get("energy_rmse"),
            "F MAE": metrics.get("forces_mae"), "F RMSE": metrics.get("forces_rmse"),
            "S MAE": metrics.get("stress_mae"), "S RMSE": metrics.get("stress_rmse"),
            "train wall (min)": result["train_wall_s"] / 60 if "train_wall_s" in result else None,
            "train CPU (min)": result["train_cpu_s"] / 60 if "train_cpu_s" in result else None}


def parity_figure(ds: Any, preds: dict[str, Any], path: Path, title: str) -> Path:
    """Parity plots, one column per model, rows energy per atom / force components / stress (if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from geodite_jax.training.evaluation import EV_PER_A3_TO_GPA

    n_atoms = np.asarray(ds.n_atoms)
    labs = [ds.labels(i) for i in range(len(ds))]
    ref = {"energy": np.array([lab["energy"] for lab in labs]) / n_atoms,
           "forces": np.concatenate([np.ravel(lab["forces"]) for lab in labs])}
    if all(lab["has_stress"] for lab in labs):
        ref["stress"] = np.concatenate([np.ravel(lab["stress"]) for lab in labs]) * EV_PER_A3_TO_GPA
    units = {"energy": "eV/atom", "forces": "eV/Å", "stress": "GPa"}
    fig, axes = plt.subplots(len(ref), len(preds), figsize=(3.6 * len(preds), 3.4 * len(ref)), squeeze=False)
    for col, (model, pred) in enumerate(preds.items()):
        got = {"energy": pred.energy / n_atoms, "forces": pred.forces.ravel(),
               "stress": pred.stress.ravel() * EV_PER_A3_TO_GPA}
        for row, term in enumerate(ref):
            ax, x, y = axes[row, col], ref[term], got[term]
            shift = float(np.mean(x)) if term == "energy" else 0.0  # per-atom energies sit far from 0
            ax.scatter(x - shift, y - shift, s=3, alpha=0.4)
            lo = float(min(x.min(), np.nanmin(y))) - shift
            hi = float(max(x.max(), np.nanmax(y))) - shift
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
            mae = float(np.nanmean(np.abs(y - x)))
            ax.set_title(f"{model}: {term} MAE {mae * (1e3 if term != 'stress' else 1):.3g} "
                         f"{'m' if term != 'stress' else ''}{units[term]}", fontsize=9)
            label = f"{term} ({units[term]})" + (f" − {shift:.3f}" if shift else "")
            ax.set_xlabel(f"DFT {label}", fontsize=8)
            ax.set_ylabel(f"predicted {label}", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------------- main
def run(datasets: Sequence[str], models: Sequence[str], epochs: int, acac_epochs: int, out: Path, quick: bool,
        venvs: Path, data_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Split, train (resumably), score and tabulate; returns the table rows and the failures."""
    from geodite_jax.benchmarks import environment_summary, write_tables

    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    summaries: dict[str, Any] = {}
    for name in datasets:
        spec = DATASETS[name]
        split = make_split(spec, out, data_dir, quick)
        print(f"{name}: {split['counts']}", flush=True)
        n_epochs = acac_epochs if name == "acac" else epochs
        results: dict[str, dict[str, Any]] = {}
        for model in models:
            try:
                results[model] = train_model(model, spec, split, out, n_epochs, venvs)
            except (RuntimeError, FileNotFoundError) as err:
                failures.append(f"{model} on {name}: {err}")
                print(f"  FAILED: {failures[-1]}", flush=True)
        for test, path in split["tests"].items():
            ds = test_dataset(path)
            preds = {}
            for model, result in results.items():
                pred = load_predictions(out / "runs" / name / model / f"pred_{test}.npz", ds.n_atoms)
                preds[model] = pred
                rows.append(table_row(name, test, model, result, score(pred, ds)))
                summaries[f"{name}/{model}"] = {k: result.get(k) for k in ("n_params", "train_wall_s", "train_cpu_s",
                                                                           "loadavg_start", "loadavg_end", "dtype")}
            if preds:
                parity_figure(ds, preds, out / f"parity_{name}_{test}.png",
                              f"{name} {test} ({len(ds)} frames; {n_epochs} epoch{'s' * (n_epochs != 1)} each)")
    summary = {**environment_summary(), "cpu_count": os.cpu_count(), "epochs (mlearn)": epochs,
               "epochs (acac)": acac_epochs, "cutoff (Å)": CUTOFF, "quick": quick, "runs": summaries}
    notes = ["E: energy per atom, meV/atom; F: force components, meV/Å; S: stress components, GPa (mlearn only). "
             "Train wall/CPU: the training call of each driver (data preparation, compilation, epochs, "
             "validation), CPU = process user+system time of all threads; the 2 cores were shared with other "
             "jobs, so wall time overstates the cost when CPU/wall < 2."]
    write_tables(out, "accuracy", summary, rows, TABLE_COLUMNS,
                 "Accuracy at equal budget: Geodite vs Nequix vs MACE", notes + failures)
    return rows, failures


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="Si,Mo,Li,Ge,acac", help="comma list of " + ",".join(DATASETS))
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of " + ",".join(MODELS))
    ap.add_argument("--epochs", type=int, default=None, help="epochs of every model on the mlearn sets")
    ap.add_argument("--acac-epochs", type=int, default=None, help="epochs on acac (default: --epochs)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: {QUICK_SIZES} train/valid/test frames, 1 epoch, default out runs/accuracy-quick")
    ap.add_argument("--out", default=None, help="work and result folder (default runs/accuracy)")
    ap.add_argument("--venvs", default=str(REPO / "experiments" / ".venvs"), help="folder of the peers' venvs")
    args = ap.parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for d in datasets:
        if d not in DATASETS:
            raise SystemExit(f"run.py: error: unknown dataset {d!r}; known: {', '.join(DATASETS)}")
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"run.py: error: unknown model {m!r}; known: {', '.join(MODELS)}")
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 30)
    if epochs < 1:
        raise SystemExit("run.py: error: --epochs must be >= 1")
    acac_epochs = args.acac_epochs if args.acac_epochs is not None else epochs
    out = Path(args.out or (REPO / "runs" / ("accuracy-quick" if args.quick else "accuracy"))).resolve()
    data_dir = shared_data()
    if not data_dir.is_dir():
        raise SystemExit(f"run.py: error: shared data folder {data_dir} not found (set GEODITE_SHARED_DATA)")
    t0 = time.perf_counter()
    rows, failures = run(datasets, models, epochs, acac_epochs, out, args.quick, Path(args.venvs), data_dir)
    print((out / "accuracy.md").read_text())
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min; results in {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
