"""``geodite demo | info | convert``: the core commands."""

from __future__ import annotations

import argparse
import time


def _demo(args: argparse.Namespace) -> int:
    """Geodite-MP-size potential (untrained) on a few crystals: energy, forces, stress, timing, checks."""
    import numpy as np
    from ase.build import bulk

    import geodite_jax as gd

    config = gd.GeoditeConfig.preset(args.preset)
    pot = gd.Potential.init(config, seed=args.seed, element_energies="mptrj")
    print(f"Geodite preset {args.preset!r}: {pot.num_params:,} parameters, cutoff {config.cutoff} Å, "
          f"{config.num_layers} layers x {config.num_features} channels (untrained weights, MPtrj E0)")
    calc = gd.GeoditeCalculator(pot, dtype=args.dtype)
    structures = {"NaCl rocksalt 2x2x2 (64)": bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(2),
                  "Cu fcc 3x3x3 (108)": bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3),
                  "Si diamond 2x2x2 (64)": bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)}
    print(f"{'structure':28s} {'E (eV)':>12s} {'max|F| eV/Å':>12s} {'|ΣF|':>9s} {'p (GPa)':>9s} "
          f"{'first s':>8s} {'eval ms':>8s}")
    for name, atoms in structures.items():
        atoms.rattle(0.05, seed=42)
        atoms.calc = calc
        t0 = time.perf_counter()
        calc.calculate(atoms, ["energy", "forces", "stress"])
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            calc.calculate(atoms, ["energy", "forces", "stress"])
        per_eval = (time.perf_counter() - t0) / args.repeats
        r = calc.results
        pressure = -np.mean(r["stress"][:3]) * 160.21766
        print(f"{name:28s} {r['energy']:12.4f} {np.abs(r['forces']).max():12.4f} "
              f"{np.abs(r['forces'].sum(0)).max():9.1e} {pressure:9.3f} {first:8.2f} {1e3 * per_eval:8.1f}")
    print("Forces are -dE/dr and stress (1/V) dE/dε by autodiff; the sum of forces vanishes by construction.")
    return 0


def _info(args: argparse.Namespace) -> int:
    import jax

    import geodite_jax as gd

    if args.model_flag and args.model and args.model_flag != args.model:
        raise ValueError(f"two models given: --model {args.model_flag} and {args.model}; give one (--model)")
    model = args.model_flag or args.model
    if not model:
        raise ValueError("no model given: geodite info --model DIR")
    pot = gd.Potential.load(model)
    print(f"model: {model}\nparameters: {pot.num_params:,}\nconfig: {pot.config}\n"
          f"energy scale: {pot.energy_scale}\nmetadata: {pot.metadata}\njax {jax.__version__} on {jax.devices()}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ..convert import potential_from_reference_checkpoint

    pot = potential_from_reference_checkpoint(args.checkpoint)
    path = pot.save(args.output)
    print(f"converted {args.checkpoint} -> {path} ({pot.num_params:,} parameters, cutoff {pot.config.cutoff} Å)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``demo``, ``info`` and ``convert``."""
    demo = sub.add_parser("demo", help="evaluate an untrained Geodite-MP-size model on a few crystals")
    demo.add_argument("--preset", default="mp", choices=["mp", "tiny"],
                      help="model size: mp (Geodite-MP, the default) or tiny (55 k parameters)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="evaluation precision")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random (untrained) weights")
    demo.add_argument("--repeats", type=int, default=3, help="evaluations per structure for the timing")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="describe a saved potential",
                          description="Describe a saved potential: parameters, config, energy scale, metadata.")
    info.add_argument("--model", dest="model_flag", metavar="MODEL", default=None,
                      help="saved potential directory (as in every other command)")
    info.add_argument("model", nargs="?", default=None,
                      help="the same, as a positional argument (kept for old scripts; --model is preferred)")
    info.set_defaults(func=_info)
    conv = sub.add_parser("convert", help="convert a checkpoint of the authors' PyTorch Geodite (needs torch)")
    conv.add_argument("checkpoint", help="the authors' PyTorch checkpoint (.ckpt / .pt)")
    conv.add_argument("output", help="directory to write the converted potential to (geodite_jax format)")
    conv.set_defaults(func=_convert)
