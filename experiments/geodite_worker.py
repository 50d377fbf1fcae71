"""Time geodite_jax on one structure through its ASE calculator (same protocol as the peers).

Run with the project's own python, from the repository root::

    python experiments/geodite_worker.py --preset mp --dtype float32 \
        --structure experiments/results/structures/nacl.extxyz --out r.json

Builds ``gd.Potential.init(gd.GeoditeConfig.preset(preset), seed=0)`` (random weights),
wraps it in ``gd.GeoditeCalculator(pot, dtype=...)`` and times
``calc.calculate(atoms, ["energy", "forces", "stress"], ["positions"])`` by the protocol of
``experiments/bench_common.py``. For ``--dtype float64`` the worker switches on
``jax_enable_x64`` before importing geodite_jax (for float32 it is left off, so that no float64
work leaks into the float32 timing).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

EXP_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(EXP_DIR))  # bench_common
sys.path.insert(1, str(EXP_DIR.parent))  # the repository root, for geodite_jax

import bench_common as bc  # noqa: E402

bc.set_thread_env()  # before jax is imported

DEFAULT_CUTOFF = 6.0


def log(msg: str) -> None:
    """Print a progress line (the orchestrator keeps it in the child's log)."""
    print(f"[geodite_worker] {msg}", flush=True)


def config_cutoff(cfg: Any) -> tuple[float, str]:
    """The model cutoff from the config (first attribute found), else 6 A."""
    for path in ("cutoff", "r_cut", "rcut", "r_max", "encoder.cutoff", "model.cutoff"):
        obj = cfg
        try:
            for part in path.split("."):
                obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
            return float(obj), f"config.{path}"
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
    return DEFAULT_CUTOFF, "default 6 A (no cutoff attribute found on the config)"


def config_dict(cfg: Any) -> Any:
    """Return a JSON-friendly view of the config (dataclass fields, else its repr)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        try:
            return {
                k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                for k, v in dataclasses.asdict(cfg).items()
            }
        except TypeError:
            pass
    return repr(cfg)[:4000]


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build our model, time it and write the JSON record."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mp", help="GeoditeConfig preset (default mp)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    bc.add_protocol_arguments(ap)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    atoms = bc.read_structure(args.structure)
    import jax

    jax.config.update("jax_platforms", "cpu")
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    try:
        import geodite_jax as gd
    except ImportError as exc:
        log(f"cannot import geodite_jax ({exc}); run from the repository root with the project's python")
        return 2

    cfg = gd.GeoditeConfig.preset(args.preset)
    pot = gd.Potential.init(cfg, seed=args.seed)
    calc = gd.GeoditeCalculator(pot, dtype=args.dtype)
    n_params = int(gd.count_params(pot.params))
    build_s = time.perf_counter() - t_start
    log(f"geodite {args.preset} {args.dtype}: {n_params:,} parameters, built in {build_s:.2f} s")

    cutoff, cutoff_src = config_cutoff(cfg)
    n_edges = bc.count_edges(atoms, cutoff)
    timing = bc.time_with_protocol(calc, atoms, args, log)
    versions = bc.package_versions(["jax", "jaxlib", "flax", "numpy", "ase", "geodite_jax"])
    versions["jax.__version__"] = jax.__version__
    versions["geodite_jax.__version__"] = str(getattr(gd, "__version__", "unknown"))
    record: dict[str, Any] = {
        "model": f"geodite_{args.preset}_{args.dtype}",
        "structure": Path(args.structure).stem,
        "structure_file": str(args.structure),
        "n_atoms": len(atoms),
        "n_edges": n_edges,
        "edge_cutoff_A": cutoff,
        "edge_cutoff_source": cutoff_src,
        "n_params": n_params,
        "build_s": build_s,
        **timing,
        "dtype": args.dtype,
        "preset": args.preset,
        "seed": args.seed,
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "jax_devices": [str(d) for d in jax.devices()],
        # geodite_jax.host_memory: glibc keeps freed memory in the process (no per-call page faults).
        "host_memory_kept": gd.host_memory.APPLIED,
        "config": config_dict(cfg),
        "versions": versions,
    }
    bc.finish_record(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
