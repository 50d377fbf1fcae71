"""How far one evaluation scales on this machine: peak memory of E+F+S against the number of edges.

    python experiments/bench_scale.py                       # diamond Si 4,096 / 8,000 / 27,000 atoms
    python experiments/bench_scale.py --repeats 8 10 15 20  # add 64,000 atoms

Each cell (``bulk("Si", "diamond", cubic=True).repeat(n)``, rattled 0.05 Å) is evaluated once through
``GeoditeCalculator`` (``mp`` preset, float32, energy + forces + stress) in a fresh process, so the peak
RSS printed is that of a whole process that built the graph, compiled and evaluated (python, JAX and the
compiled program included). A least-squares line through (edges, peak RSS) gives the memory per edge;
the largest cell that fits in this machine's memory follows from it. The first call includes the
compile; a second call is timed where ``--timed`` is given. Results: a Markdown table on stdout and
``experiments/results/bench_scale_<date>_<dtype>.json`` (or ``--out-stem``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def child(repeat: int, dtype: str, timed: bool, chunk_edges: int | None) -> dict:
    """Evaluate one cell in this process and return its figures."""
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import numpy as np
    from ase.build import bulk

    import geodite_jax as gd

    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=42)
    calc = gd.GeoditeCalculator(gd.Potential.init(gd.GeoditeConfig.preset("mp"), seed=0), dtype=dtype,
                                chunk_edges=chunk_edges)
    t0 = time.perf_counter()
    calc.calculate(atoms, ["energy", "forces", "stress"], ["positions"])
    first = time.perf_counter() - t0
    record = {"repeat": repeat, "atoms": len(atoms), "first_call_s": first}
    if timed:
        t0 = time.perf_counter()
        calc.calculate(atoms, ["energy", "forces", "stress"], ["positions"])
        record["call_s"] = time.perf_counter() - t0
    graph = gd.atoms_to_graph(atoms, 6.0, 100)
    record["edges"] = int(graph.n_edge[0])
    record["finite"] = bool(np.isfinite(calc.results["forces"]).all() and np.isfinite(calc.results["energy"]))
    record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, nargs="+", default=[8, 10, 15])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--chunk-edges", type=int, default=None)
    ap.add_argument("--timed", action="store_true", help="time a second call too")
    ap.add_argument("--out-stem", default=None, help="output name (default bench_scale_<date>_<dtype>)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2")
    if args.child is not None:
        print(json.dumps(child(args.child, args.dtype, args.timed, args.chunk_edges)))
        return

    rows = []
    for repeat in args.repeats:
        cmd = [sys.executable, __file__, "--child", str(repeat), "--dtype", args.dtype]
        cmd += ["--timed"] if args.timed else []
        cmd += ["--chunk-edges", str(args.chunk_edges)] if args.chunk_edges is not None else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"repeat": repeat, "atoms": 8 * repeat**3, "error": proc.stderr.strip().splitlines()[-1:]})
            print(f"Si x{repeat}: failed ({rows[-1]['error']})", flush=True)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)

    ok = [r for r in rows if "peak_rss_gb" in r]
    fit = None
    if len(ok) >= 2:
        import numpy as np

        slope, intercept = np.polyfit([r["edges"] for r in ok], [r["peak_rss_gb"] for r in ok], 1)
        total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        fit = {"kb_per_edge": slope * 1e6, "intercept_gb": intercept, "machine_gb": total_gb,
               "edges_that_fit": int((total_gb - intercept) / slope)}
    print("\n| Si cell | atoms | directed edges | peak RSS (GB) | first call (s) | call (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| x{r['repeat']} | {r['atoms']:,} | | failed: {r['error']} | | |")
        else:
            print(f"| x{r['repeat']} | {r['atoms']:,} | {r['edges']:,} | {r['peak_rss_gb']:.2f} | "
                  f"{r['first_call_s']:.1f} | {r.get('call_s', float('nan')):.1f} |")
    if fit:
        print(f"\npeak RSS ≈ {fit['intercept_gb']:.2f} GB + {fit['kb_per_edge']:.2f} KB x edges; "
              f"{fit['machine_gb']:.1f} GB hold ≈ {fit['edges_that_fit']:,} edges "
              f"(≈ {fit['edges_that_fit'] / 44.6:,.0f} Si atoms at 44.6 edges/atom)")
    RESULTS.mkdir(exist_ok=True)
    import jax

    out = RESULTS / f"{args.out_stem or f'bench_scale_{dt.date.today()}_{args.dtype}'}.json"
    out.write_text(json.dumps({"date": str(dt.datetime.now(dt.timezone.utc)), "machine": platform.processor()
                               or platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
                               "dtype": args.dtype, "rows": rows, "fit": fit}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
