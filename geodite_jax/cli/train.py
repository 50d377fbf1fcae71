"""``geodite train`` and ``geodite eval``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

# Flags that map one-to-one onto TrainConfig fields (flag name with dashes -> field).
_FIELD_FLAGS: dict[str, tuple[type, str]] = {
    "train": (str, "training data: a file (extxyz, MPtrj JSON, mlearn JSON, ASE db), a preprocessed store, "
                   "or 'emt' (generated EMT set)"),
    "valid": (str, "validation data (default: split off the training data)"),
    "test": (str, "test data (default: split off the training data)"),
    "format": (str, "data format (default: detect): extxyz, mptrj-json, mlearn-json, ase-db"),
    "energy_key": (str, "extxyz/ASE key of the energy"),
    "forces_key": (str, "extxyz/ASE key of the forces"),
    "stress_key": (str, "extxyz/ASE key of the stress"),
    "energy_label": (str, "MPtrj energy: uncorrected (raw VASP) or corrected (MP2020)"),
    "on_error": (str, "malformed frames: raise or skip"),
    "out": (str, "run directory"),
    "preset": (str, "model preset: tiny or mp"),
    "finetune_from": (str, "start from this saved potential"),
    "epochs": (int, "number of epochs"),
    "max_steps": (int, "stop after this many steps (0: no cap)"),
    "max_minutes": (float, "stop after this many minutes (0: no cap)"),
    "batch_size": (int, "structures per device per step"),
    "batch_buckets": (int, "padded batch shapes (one compilation each; 1: every step padded to the full budget)"),
    "lr": (float, "peak learning rate"),
    "seed": (int, "random seed (init, splits, shuffling, dropout)"),
    "dtype": (str, "float32 or float64"),
}


def _train(args: argparse.Namespace) -> int:
    from ..training import DEMO_RECIPE, TrainConfig, format_error_table, train

    overrides: dict[str, Any] = {k: getattr(args, k) for k in _FIELD_FLAGS if getattr(args, k) is not None}
    for item in args.set or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = _parse_value(value)
    if args.no_progress:
        overrides["progress"] = False
    if args.config:
        cfg = TrainConfig.from_yaml(args.config, **overrides)
    else:
        cfg = TrainConfig.from_dict({**DEMO_RECIPE, **overrides})
    if cfg.train == "emt":
        print("Training data: generated with ASE's EMT calculator (an effective-medium model of Cu, Ni, Al; "
              "labels are EMT, not DFT).")
    if args.distributed:
        import jax

        # One process per host; the cluster (SLURM, Open MPI, ...) is detected, or given by the three flags.
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local devices, "
              f"{jax.device_count()} in all")
    t0 = time.perf_counter()
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if not result.is_main:
        return 0  # another process of a multi-host run: process 0 reports
    wall = time.perf_counter() - t0
    steps = result.steps if result.steps_run is None else result.steps_run
    total = f" ({result.steps} in all, with the resumed run's)" if steps != result.steps else ""
    print(f"\n{steps} step{'s' if steps != 1 else ''}{total} in {wall / 60:.1f} min (this process); "
          f"potential saved to {result.out / 'final'}"
          + (f", best (lowest validation loss) to {result.out / 'best'}" if result.best is not None else ""))
    if result.test_metrics is not None:
        print("\n" + format_error_table(result.test_metrics, result.baseline_metrics,
                                        "Test-set errors (model: EMA weights with the best validation loss; "
                                        "baseline: per-element mean energy, zero forces, mean stress)"))
    if not args.no_plots:
        _plots(result)
    (result.out / "summary.json").write_text(json.dumps(
        {"steps": result.steps, "steps_this_run": result.steps_run,
         "wall_seconds_this_process": wall, "train_seconds_total": result.wall_seconds,
         "test": result.test_metrics, "baseline": result.baseline_metrics}, indent=1))
    return 0


def _plots(result: Any) -> None:
    try:
        from ..training.plots import learning_curves, parity_plot

        written = [learning_curves(result.out / "log.jsonl", result.out / "learning_curves.png")]
        if result.test_predictions is not None:
            written.append(parity_plot(result.test_predictions, result.data.test, result.out / "parity_test.png",
                                       title="test set"))
    except ImportError as err:  # matplotlib missing: say so, keep the trained model
        print(f"(no plots: {err})")
        return
    print("plots: " + ", ".join(str(p) for p in written))


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not YAML (e.g. "a:b[c"): the option's own check reads it as a string


def _eval(args: argparse.Namespace) -> int:
    from ..data import GraphDataset, read_frames
    from ..potential import Potential
    from ..training import baseline_predictions, error_metrics, format_error_table, predict_potential

    pot = Potential.load(args.model)
    path = Path(args.data)
    if not path.exists():
        raise FileNotFoundError(f"data {args.data} not found")

    def dataset(source: Path) -> Any:
        if source.is_dir() and (source / "dataset.json").is_file():
            return GraphDataset.open(source)
        frames = read_frames(source, args.format, energy_key=args.energy_key, forces_key=args.forces_key,
                             stress_key=args.stress_key, energy=args.energy_label, on_error=args.on_error)
        return GraphDataset.from_frames(list(frames), pot.config.cutoff, pot.config.num_elements)

    ds = dataset(path)
    pred = predict_potential(pot, ds, dtype=args.dtype, progress=True)
    metrics = error_metrics(pred, ds)
    baseline = None
    if args.baseline_train:
        train_ds = dataset(Path(args.baseline_train))
        baseline = error_metrics(baseline_predictions(train_ds, ds), ds)
    print(format_error_table(metrics, baseline, f"{args.model} on {args.data}"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "errors.json").write_text(json.dumps({"model": metrics, "baseline": baseline}, indent=1))
        (out / "errors.md").write_text(format_error_table(metrics, baseline) + "\n")
        try:
            from ..training.plots import parity_plot

            parity_plot(pred, ds, out / "parity.png", title=f"{Path(args.model).name} on {path.name}")
        except ImportError as err:
            print(f"(no plot: {err})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``eval``."""
    tr = sub.add_parser("train", help="train a Geodite potential (default: the EMT demo, no download)",
                        description="Train a Geodite potential. Without --config, the built-in EMT demo recipe is "
                                    "used (configs/emt-demo.yaml): ~8 minutes on 2 CPU cores.")
    tr.add_argument("--config", help="YAML training recipe (e.g. configs/geodite-mp.yaml); flags override it")
    for field, (kind, text) in _FIELD_FLAGS.items():
        tr.add_argument("--" + field.replace("_", "-"), dest=field, type=kind, default=None, help=text)
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other training option (repeatable)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--overwrite", action="store_true",
                    help="delete the run already in --out (its models, checkpoints, logs) and start afresh; without "
                         "it (or --resume) a non-empty --out is refused")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    tr.add_argument("--distributed", action="store_true",
                    help="multi-host data parallelism: call jax.distributed.initialize (one process per host)")
    tr.add_argument("--coordinator", default=None, help="with --distributed: host:port of process 0")
    tr.add_argument("--num-processes", type=int, default=None, help="with --distributed: number of processes")
    tr.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's index")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="error table of a saved potential on a dataset (per configuration group)")
    ev.add_argument("data", help="data file (extxyz, MPtrj JSON, mlearn JSON, ASE db) or preprocessed store")
    ev.add_argument("--model", required=True, help="saved potential directory")
    ev.add_argument("--format", default=None)
    ev.add_argument("--energy-key", default="energy")
    ev.add_argument("--forces-key", default="forces")
    ev.add_argument("--stress-key", default="stress")
    ev.add_argument("--energy-label", default="uncorrected", choices=["uncorrected", "corrected"])
    ev.add_argument("--on-error", default="raise", choices=["raise", "skip"])
    ev.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ev.add_argument("--baseline-train", help="training data for the per-element-mean baseline column")
    ev.add_argument("--out", help="write errors.json, errors.md and parity.png here")
    ev.set_defaults(func=_eval)
