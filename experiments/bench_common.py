"""Timing protocol shared by the speed-benchmark workers (ours and the peers').

Imported by ``experiments/geodite_worker.py`` (project python) and by
``experiments/peers/peer_worker.py`` (inside a peer virtualenv), so it depends only on the
standard library, numpy and ASE. The protocol follows ``../shared/docs/stack_notes.md``
(Part 2.2): one fresh process per (model, structure); the first
``calc.calculate(atoms, ["energy", "forces", "stress"], ["positions"])`` call is timed apart;
2 untimed warm-up calls; then the median of up to 10 timed calls, stopping once 60 s have
been spent but never with fewer than 3.

Call :func:`set_thread_env` before importing jax, torch or numpy's BLAS users.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

N_THREADS = 2
PROPERTIES = ["energy", "forces", "stress"]
SYSTEM_CHANGES = ["positions"]

#: Thread settings used for every child (both cores of the 2-vCPU machine).
THREAD_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": str(N_THREADS),
    "MKL_NUM_THREADS": str(N_THREADS),
    "OPENBLAS_NUM_THREADS": str(N_THREADS),
    "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={N_THREADS}",
    "JAX_PLATFORMS": "cpu",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def set_thread_env(overwrite: bool = False) -> dict[str, str]:
    """Put :data:`THREAD_ENV` into ``os.environ`` (keeping values already set unless ``overwrite``)."""
    for key, value in THREAD_ENV.items():
        if overwrite or key not in os.environ:
            os.environ[key] = value
    return {key: os.environ[key] for key in THREAD_ENV}


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads), in seconds."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def machine_cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    total = sum(fields)
    return total - fields[3] - fields[4], total  # minus idle and iowait


def machine_busy_cores(t0: tuple[int, int] | None, t1: tuple[int, int] | None) -> float | None:
    """Cores kept busy by the whole machine between two :func:`machine_cpu_ticks` samples."""
    if t0 is None or t1 is None or t1[1] <= t0[1]:
        return None
    return (t1[0] - t0[0]) / (t1[1] - t0[1]) * (os.cpu_count() or 1)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss``, KiB on Linux) in bytes."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def count_edges(atoms: Any, cutoff: float) -> int:
    """Directed edges (ordered pairs i != j, all periodic images) within ``cutoff`` (ASE)."""
    from ase.neighborlist import neighbor_list

    return len(neighbor_list("i", atoms, float(cutoff)))


def read_structure(path: str | Path) -> Any:
    """Read the single-frame extxyz written by ``bench_speed.py``."""
    from ase.io import read

    return read(str(path), format="extxyz")


def _sync(results: dict[str, Any]) -> None:
    """Force every result onto the host (a JAX calculator could return device arrays)."""
    import numpy as np

    for key in PROPERTIES:
        if key in results:
            np.asarray(results[key])


def add_protocol_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every worker shares: input, output and the timing protocol."""
    ap.add_argument("--structure", required=True, help="single-frame extxyz file")
    ap.add_argument("--out", required=True, help="JSON record to write")
    ap.add_argument("--max-calls", type=int, default=10, help="timed calls at most (default 10)")
    ap.add_argument("--min-calls", type=int, default=3, help="timed calls at least (default 3)")
    ap.add_argument("--budget-s", type=float, default=60.0, help="stop timing after this many s")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls (default 2)")
    ap.add_argument("--seed", type=int, default=0)


def time_with_protocol(calc: Any, atoms: Any, args: argparse.Namespace,
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """:func:`time_calculator` with the limits given by :func:`add_protocol_arguments`."""
    return time_calculator(calc, atoms, max_calls=args.max_calls, min_calls=args.min_calls,
                           budget_s=args.budget_s, n_warmup=args.warmup, log=log)


def time_calculator(
    calc: Any,
    atoms: Any,
    max_calls: int = 10,
    min_calls: int = 3,
    budget_s: float = 60.0,
    n_warmup: int = 2,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time ``calc.calculate(atoms, energy/forces/stress, ["positions"])`` per the protocol.

    Returns first-call time, the timed samples and their median/min/max, busy cores (CPU time
    over wall time of the timed loop) and a summary of the last results (energy, max |F|,
    stress) so that a NaN or a wrong shape is visible in the record.
    """
    import numpy as np

    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    calc.calculate(atoms, PROPERTIES, SYSTEM_CHANGES)
    _sync(calc.results)
    first_s = time.perf_counter() - t0
    say(f"first call {first_s:.3f} s")
    for _ in range(n_warmup):
        calc.calculate(atoms, PROPERTIES, SYSTEM_CHANGES)
        _sync(calc.results)
    samples: list[float] = []
    ticks0, cpu0, wall0 = machine_cpu_ticks(), cpu_seconds(), time.perf_counter()
    for i in range(max_calls):
        t = time.perf_counter()
        calc.calculate(atoms, PROPERTIES, SYSTEM_CHANGES)
        _sync(calc.results)
        samples.append(time.perf_counter() - t)
        say(f"call {i + 1}: {samples[-1]:.4f} s")
        if len(samples) >= min_calls and sum(samples) >= budget_s:
            break
    wall = time.perf_counter() - wall0
    busy = (cpu_seconds() - cpu0) / wall if wall > 0 else float("nan")
    machine_busy = machine_busy_cores(ticks0, machine_cpu_ticks())
    # Other processes' load during the timed loop: a figure well above 0 means the timings
    # shared the cores with something else and should be rerun.
    other = None if machine_busy is None else max(0.0, machine_busy - busy)
    res = calc.results
    forces = np.asarray(res["forces"], dtype=float)
    stress = np.asarray(res["stress"], dtype=float).reshape(-1)
    return {
        "first_call_s": first_s,
        "n_warmup": n_warmup,
        "times_s": samples,
        "n_timed": len(samples),
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "busy_cores": busy,
        "machine_busy_cores": machine_busy,
        "other_busy_cores": other,
        "energy_eV": float(np.asarray(res["energy"]).reshape(-1)[0]),
        "forces_shape": list(forces.shape),
        "max_abs_force_eV_A": float(np.abs(forces).max()) if forces.size else 0.0,
        "stress_voigt_eV_A3": stress.tolist(),
        "finite": bool(np.all(np.isfinite(forces)) and np.all(np.isfinite(stress))),
    }


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """Installed versions of ``names`` (distribution names), ``"absent"`` when not installed."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def finish_record(record: dict[str, Any], out: str | Path) -> None:
    """Add per-atom/per-edge figures and peak RSS, write ``out`` as JSON and print a summary."""
    med = record["median_s"]
    record["us_per_atom_step"] = med / record["n_atoms"] * 1e6
    record["us_per_edge"] = med / record["n_edges"] * 1e6 if record["n_edges"] else None
    record["peak_rss_bytes"] = peak_rss_bytes()
    record["peak_rss_gb"] = record["peak_rss_bytes"] / 1e9
    record["python_executable"] = sys.executable
    record["thread_env"] = {key: os.environ.get(key, "") for key in THREAD_ENV}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"[{record['model']}] {record['structure']}: {record['n_atoms']} atoms, "
        f"{record['n_edges']} edges, median {med:.4f} s ({record['n_timed']} calls, "
        f"min {record['min_s']:.4f}, max {record['max_s']:.4f}), first {record['first_call_s']:.2f} s, "
        f"build {record['build_s']:.2f} s, peak RSS {record['peak_rss_gb']:.2f} GB, "
        f"params {record['n_params']:,}",
        flush=True,
    )
