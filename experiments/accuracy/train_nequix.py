"""Train Nequix with nequix's own training loop (``nequix.train.train``), then predict the test files.

Runs INSIDE the nequix virtualenv::

    experiments/.venvs/nequix/bin/python experiments/accuracy/train_nequix.py --train T.extxyz \
        --valid V.extxyz --test test=X.extxyz --out DIR --epochs N [--stress]

Settings: nequix's published ``configs/nequix-mp-1.yml`` (muon, lr 0.01, warm-up 0.1 epoch from 0.2 x lr,
cosine to 1e-6, grad clip 100, weight decay 1e-3, MAE loss with E:F:S = 20:20:5, layer norm, lmax 3,
4 layers, 8 Bessel functions, p = 6) with the size scaled down to the tiny budget (irreps 128/64/32/32 ->
32/16/8/8, radial MLP 64 -> 32: ~55 k parameters for one element), batch 4 and EMA 0.99 (mp-1's 128
and 0.999 are sized for 1.5 M frames), the benchmark's cutoff, E0 by least squares on the training set
(nequix's ``average_atom_energies``) and its own shift/scale statistics.

Four shims let the unmodified loop run here, none of which changes what it computes:

* ``wandb`` / ``wandb_osh`` (not installed: training-only dependencies) are replaced by no-op modules whose
  ``run.dir`` is ``--out`` (where the loop saves ``checkpoint.nqx``, the EMA model with the best validation
  loss);
* nequix's multiprocess ``DataLoader`` (16 busy-polling workers, fatal on 2 cores) is replaced by a subclass
  that builds the same dynamically batched graphs in-process;
* nequix's ``AseDBDataset`` reads fairchem's ASE-LMDB files (backend not installed): a subclass reads the
  split extxyz instead and builds the same graphs;
* ``jax.device_put_replicated`` (removed from jax 0.10) is restored as stacking every leaf once per device.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.set_thread_env()

#: nequix-mp-1 hyper-parameters, scaled as the module docstring says.
NEQUIX_SMALL: dict[str, Any] = {
    "hidden_irreps": "32x0e + 16x1o + 8x2e + 8x3o",
    "lmax": 3,
    "n_layers": 4,
    "radial_basis_size": 8,
    "radial_mlp_size": 32,
    "radial_mlp_layers": 2,
    "radial_polynomial_p": 6.0,
    "mlp_init_scale": 4.0,
    "index_weights": False,
    "layer_norm": True,
    "kernel": False,  # the OpenEquivariance kernel is GPU-only
    "optimizer": "muon",
    "learning_rate": 0.01,
    "warmup_epochs": 0.1,
    "warmup_factor": 0.2,
    "grad_clip_norm": 100.0,
    "weight_decay": 1.0e-3,
    "batch_size": 4,
    "energy_weight": 20.0,
    "force_weight": 20.0,
    "stress_weight": 5.0,
    "loss_type": "mae",
    "ema_decay": 0.99,
    "log_every": 10**9,  # no per-step logging
}


def install_shims(out: Path) -> None:
    """No-op wandb, in-process DataLoader, ``jax.device_put_replicated`` (see the module docstring)."""
    wandb = types.ModuleType("wandb")
    wandb.run = None

    def init(**_: Any) -> Any:
        wandb.run = types.SimpleNamespace(dir=str(out), summary={}, id="local")
        return wandb.run

    wandb.init = init
    wandb.log = lambda *a, **k: None
    osh = types.ModuleType("wandb_osh")
    hooks = types.ModuleType("wandb_osh.hooks")
    hooks.TriggerWandbSyncHook = lambda *a, **k: (lambda: None)
    osh.hooks = hooks
    sys.modules.update({"wandb": wandb, "wandb_osh": osh, "wandb_osh.hooks": hooks})

    import jax
    import jax.numpy as jnp
    import jraph
    import nequix.data as nd

    if not hasattr(jax, "device_put_replicated"):
        jax.device_put_replicated = lambda tree, devices: jax.tree.map(
            lambda a: jnp.stack([jnp.asarray(a)] * len(devices)), tree)

    class InProcessLoader(nd.DataLoader):
        """nequix's DataLoader with the same batching but no worker processes (graphs built once, cached)."""

        _cache: dict = {}

        def _start_workers(self) -> None:
            self._started = True

        def _graph(self, i: int) -> Any:
            key = (id(self.dataset), int(i))
            if key not in self._cache:
                self._cache[key] = self.dataset[int(i)]
            return self._cache[key]

        def make_generator(self) -> Any:
            while self.idx < len(self.dataset):
                yield self._graph(self.idxs[self.idx])
                self.idx += 1

        def __iter__(self) -> Any:
            self.idx = 0
            if self.shuffle:
                self.idxs = self.rng.permutation(len(self.dataset))
            self._generator = jraph.dynamically_batch(self.make_generator(), n_node=self.n_node,
                                                      n_edge=self.n_edge, n_graph=self.n_graph)
            return self

    class SplitDataset(nd.AseDBDataset):
        """nequix's AseDBDataset over a split extxyz (its ASE-LMDB backend, fairchem's, is not installed):
        same graphs (``nequix.data.preprocess_graph``), frames held in memory."""

        def __init__(self, file_path: str, atomic_numbers: list[int], cutoff: float = 5.0,
                     backend: str = "jax") -> None:
            nd.Dataset.__init__(self, backend=backend)
            self.atomic_indices = nd.atomic_numbers_to_indices(atomic_numbers)
            self.cutoff = cutoff
            self.frames = [labelled_atoms(a) for a in common.read_split(file_path)]

        def __len__(self) -> int:
            return len(self.frames)

        def _get_graph_dict(self, idx: int) -> dict:
            return nd.preprocess_graph(self.frames[idx], self.atomic_indices, self.cutoff, True)

    nd.DataLoader = InProcessLoader
    import nequix.train as nt

    nt.DataLoader = InProcessLoader
    nt.AseDBDataset = nd.AseDBDataset = SplitDataset


def labelled_atoms(src: Any) -> Any:
    """A split frame -> ``ase.Atoms`` whose SinglePointCalculator holds the labels (what nequix reads); a
    molecule is boxed (see below)."""
    import ase
    import numpy as np
    from ase.calculators.singlepoint import SinglePointCalculator

    energy, forces, stress = common.labels(src)
    atoms = ase.Atoms(numbers=src.numbers, positions=src.positions, cell=src.cell, pbc=src.pbc)
    if not atoms.pbc.any():
        # nequix's loss always evaluates a stress term, which fails on a cell-less graph: a molecule goes in a
        # 100 Å periodic box (no image within any cutoff, so energy and forces are those of the molecule) with
        # a zero stress label that the zero stress weight ignores.
        atoms.set_cell(np.eye(3) * 100.0)
        atoms.center()
        atoms.pbc = True
        stress = np.zeros((3, 3))
    results: dict[str, Any] = {"energy": energy, "forces": forces}
    if stress is not None:
        results["stress"] = stress
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


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
    install_shims(out)

    import equinox as eqx
    import jax
    import nequix.data as nd
    import numpy as np
    import yaml
    from nequix.calculator import NequixCalculator
    from nequix.train import train

    elements = sorted({int(z) for a in common.read_split(args.train) for z in a.numbers})
    # E0 and statistics as nequix's train() computes them, stored in the config so the saved model has them
    # (timed with the training, as they are part of it).
    sw = common.Stopwatch().__enter__()
    train_set = nd.AseDBDataset(str(Path(args.train).resolve()), elements, args.cutoff)
    e0 = nd.average_atom_energies(train_set)
    stats = nd.dataset_stats(train_set, e0)
    config = {**NEQUIX_SMALL, "cutoff": args.cutoff, "atomic_numbers": elements, "n_epochs": args.epochs,
              "atom_energies": {int(z): float(e) for z, e in zip(elements, e0, strict=True)}, **stats,
              "train_path": str(Path(args.train).resolve()),
              "valid_path": str(Path(args.valid).resolve()),
              "stress_weight": NEQUIX_SMALL["stress_weight"] if args.stress else 0.0}
    (out / "config.yml").write_text(yaml.safe_dump(config))
    train(str(out / "config.yml"))
    sw.__exit__()
    print(f"[nequix] trained {args.epochs} epochs in {sw.wall:.1f} s wall, {sw.cpu:.1f} s CPU", flush=True)

    calc = NequixCalculator(model_path=str(out / "checkpoint.nqx"), use_kernel=False)
    n_params = sum(int(p.size) for p in jax.tree.leaves(eqx.filter(calc.model, eqx.is_array)))
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
        "model": "nequix", "n_params": n_params, "epochs": args.epochs, "train_wall_s": sw.wall,
        "train_cpu_s": sw.cpu, "dtype": "float32", "settings": {k: v for k, v in config.items()
                                                                 if not k.endswith("_path")},
        "versions": {"nequix": _version("nequix"), "jax": jax.__version__}, "numpy": np.__version__})
    return 0


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


if __name__ == "__main__":
    sys.exit(main())
