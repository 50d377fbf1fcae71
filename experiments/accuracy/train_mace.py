"""Train MACE with mace's own trainer (``mace_run_train``'s ``run``), then predict the test files.

Runs INSIDE the mace virtualenv::

    experiments/.venvs/mace/bin/python experiments/accuracy/train_mace.py --train T.extxyz --valid V.extxyz \
        --test test=X.extxyz --out DIR --epochs N [--stress]

Settings: MACE's small-data recipe (the README's training example and the MACE paper's rMD17/BOTNet runs):
``MACE`` model, 2 interactions, correlation 3, messages up to L = 1, 8 Bessel functions, polynomial cutoff
p = 5, radial MLP 64x3, AMSGrad Adam at lr 0.01 with ReduceLROnPlateau, weight decay 5e-7, weighted loss
E:F = 1:100 (+ stress 1 with ``--stress``), EMA 0.99, stage two (SWA-style: E weight 1000, F 100, lr 1e-3)
for the last quarter of the epochs (mace's default start). Scaled: float32 (mace's default float64 is
~2x slower on CPU; the other two train in float32 too), channels 128 -> 24 (``24x0e + 24x1o``: ~56 k
parameters for one element), batch 4 as for the other models, the benchmark's cutoff, E0 by least squares
on the training set (``--E0s average``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.set_thread_env()

HIDDEN_IRREPS = "24x0e + 24x1o"


class TrainingEnd(logging.Handler):
    """Notes the wall and CPU clocks when mace logs "Training complete" (the end of its epoch loop)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.wall: float | None = None
        self.cpu: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.wall is None and record.getMessage().startswith("Training complete"):
            self.wall, self.cpu = time.perf_counter(), common.cpu_seconds()


def mace_arguments(args: argparse.Namespace, out: Path) -> list[str]:
    """The ``mace_run_train`` command line of this benchmark."""
    argv = [
        "--name", "mace", "--seed", "0", "--device", "cpu", "--default_dtype", "float32",
        "--work_dir", str(out), "--train_file", args.train, "--valid_file", args.valid,
        "--energy_key", common.ENERGY_KEY, "--forces_key", common.FORCES_KEY, "--stress_key", common.STRESS_KEY,
        "--E0s", "average", "--model", "MACE", "--hidden_irreps", HIDDEN_IRREPS, "--r_max", str(args.cutoff),
        "--num_interactions", "2", "--correlation", "3", "--num_radial_basis", "8", "--num_cutoff_basis", "5",
        "--radial_MLP", "[64, 64, 64]", "--batch_size", "4", "--valid_batch_size", "8",
        "--max_num_epochs", str(args.epochs), "--lr", "0.01", "--weight_decay", "5e-7", "--amsgrad",
        "--ema", "--ema_decay", "0.99", "--swa", "--energy_weight", "1.0", "--forces_weight", "100.0",
        "--eval_interval", "1", "--num_workers", "0", "--restart_latest", "--save_cpu", "--plot", "False",
        "--skip_evaluate_heads", "Default",  # mace's own train/valid error tables: not needed, minutes on CPU
    ]
    if args.stress:
        argv += ["--loss", "stress", "--stress_weight", "1.0", "--compute_stress", "True",
                 "--error_table", "PerAtomMAEstressvirials"]
    else:
        argv += ["--loss", "weighted", "--error_table", "PerAtomMAE"]
    return argv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--test", action="append", default=[], help="NAME=PATH (repeatable)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--cutoff", type=float, default=5.0)
    ap.add_argument("--stress", action="store_true", help="train on stress (periodic data with stress labels)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import mace  # noqa: F401  (before e3nn: e3nn 0.4.4 + torch 2.13 weights_only issue)
    import torch
    from mace import tools
    from mace.calculators import MACECalculator
    from mace.cli.run_train import run

    torch.set_num_threads(common.N_THREADS)
    torch.set_num_interop_threads(1)
    mace_argv = mace_arguments(args, out)
    (out / "mace_args.json").write_text(json.dumps(mace_argv, indent=1))
    end = TrainingEnd()
    logging.getLogger().addHandler(end)
    with common.Stopwatch() as sw:
        run(tools.build_default_arg_parser().parse_args(mace_argv))
    # Training time = up to mace's "Training complete" (what follows is saving, TorchScript export, reports).
    wall, cpu = (end.wall - sw._wall, end.cpu - sw._cpu) if end.wall is not None else (sw.wall, sw.cpu)
    print(f"[mace] trained {args.epochs} epochs in {wall:.1f} s wall, {cpu:.1f} s CPU "
          f"(run() total {sw.wall:.1f} s)", flush=True)

    model_path = out / "mace_stagetwo.model"
    if not model_path.exists():  # stage two never started (too few epochs)
        model_path = out / "mace.model"
    calc = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float32")
    n_params = sum(int(p.numel()) for p in calc.models[0].parameters())
    for item in args.test:
        name, path = item.split("=", 1)
        energy, forces, stress = [], [], []
        for src in common.read_split(path):
            atoms = src.copy()
            atoms.calc = calc
            energy.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
            stress.append(atoms.get_stress(voigt=False) if atoms.pbc.all() else None)
        common.write_predictions(out / f"pred_{name}.npz", energy, forces, stress)
    common.write_json(out / "result.json", {
        "model": "mace", "n_params": n_params, "epochs": args.epochs, "train_wall_s": wall,
        "train_cpu_s": cpu, "run_wall_s": sw.wall, "dtype": "float32", "model_file": model_path.name,
        "settings": mace_argv,
        "versions": {"mace-torch": _version("mace-torch"), "torch": torch.__version__}})
    return 0


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


if __name__ == "__main__":
    sys.exit(main())
