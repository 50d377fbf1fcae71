"""Train Geodite (``tiny`` preset, ``configs/mlearn.yaml`` recipe) on a split, then predict the test files.

Runs in the project's python (the one that imports ``geodite_jax``), same interface as the peer drivers::

    python experiments/accuracy/train_geodite.py --train T.extxyz --valid V.extxyz --test test=X.extxyz \
        --out DIR --epochs N [--stress] [--cutoff 5.0]

Writes ``DIR/pred_<name>.npz`` per test file and ``DIR/result.json`` (parameters, epochs, training wall and
CPU seconds). The recipe is ``configs/mlearn.yaml`` unchanged except: the epoch count of the benchmark, no
time cap, the given cutoff, stress weight 0 without ``--stress``. E0 by least squares on the training set.
The potential evaluated is the EMA model with the best validation loss (``DIR/best``), as for the peers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]

import common  # noqa: E402

common.set_thread_env()

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "mlearn.yaml"


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

    import jax
    import numpy as np

    from geodite_jax.data import GraphDataset, read_frames
    from geodite_jax.potential import Potential
    from geodite_jax.training import TrainConfig, predict_potential, train

    out = Path(args.out).resolve()
    keys = {"energy_key": common.ENERGY_KEY, "forces_key": common.FORCES_KEY, "stress_key": common.STRESS_KEY}
    cfg = TrainConfig.from_yaml(RECIPE)
    cfg = cfg.replace(train=args.train, valid=args.valid, test="", format="extxyz", valid_fraction=0.0,
                      test_fraction=0.0, epochs=args.epochs, max_minutes=0.0, out=str(out), progress=False,
                      cache_dir=str(out / "data"), model={**cfg.model, "cutoff": args.cutoff},
                      stress_weight=cfg.stress_weight if args.stress else 0.0, **keys)
    with common.Stopwatch() as sw:
        result = train(cfg, overwrite=True)  # a rerun replaces the earlier run in --out
    print(f"[geodite] trained {result.steps} steps ({args.epochs} epochs) in {sw.wall:.1f} s wall, "
          f"{sw.cpu:.1f} s CPU", flush=True)

    pot = Potential.load(out / "best") if (out / "best").exists() else result.potential
    for item in args.test:
        name, path = item.split("=", 1)
        frames = list(read_frames(path, "extxyz", **keys))
        ds = GraphDataset.from_frames(frames, pot.config.cutoff, pot.config.num_elements)
        pred = predict_potential(pot, ds, dtype="float32")
        n_atoms = np.asarray(ds.n_atoms)
        offsets = np.concatenate([[0], np.cumsum(n_atoms)])
        stress = [pred.stress[k] if frames[k].pbc.all() else None for k in range(len(frames))]
        common.write_predictions(out / f"pred_{name}.npz", pred.energy,
                                 [pred.forces[offsets[k]:offsets[k + 1]] for k in range(len(frames))], stress)
    n_params = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(pot.params))
    common.write_json(out / "result.json", {
        "model": "geodite", "n_params": n_params, "epochs": args.epochs, "steps": result.steps,
        "train_wall_s": sw.wall, "train_cpu_s": sw.cpu, "dtype": cfg.dtype,
        "settings": {k: v for k, v in cfg.to_dict().items() if k not in ("train", "valid", "test", "out",
                                                                           "cache_dir")},
        "versions": {"jax": jax.__version__}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
