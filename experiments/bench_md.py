"""MD speed: Geodite in jax-md vs the ASE driver, the cost of an MD step vs one energy+forces evaluation, and
batched-replica throughput.

Usage (repository root, project python; run it on a quiet machine)::

    python experiments/bench_md.py              # mp preset, Cu fcc 1008 atoms, float32
    python experiments/bench_md.py --quick      # tiny preset, 256 atoms, few steps (smoke run)

Figures:

* jax-md NVE (velocity Verlet, dt 1 fs, skin list + per-step tight list, neighbour-list updates included):
  ms/step, µs/atom/step, ns/day;
* one energy+forces evaluation of the same positions three ways: jitted value_and_grad of the jax-md energy
  on the MD's own skin list (its per-evaluation compaction included), jitted value_and_grad of the model on
  exactly the pairs within the cutoff (host neighbour list, neighbour-block layout, no compaction: the
  tightest baseline), and a ``GeoditeCalculator`` call (energy, forces, stress; host-side neighbour list and
  padding); target: MD step / exact-pairs evaluation <= 1.10;
* ASE ``VelocityVerlet`` driving ``GeoditeCalculator``;
* replicas: B copies of a 64-atom cell (Si diamond 2x2x2) advanced together in one vmapped block vs one at a
  time, atom-steps/s (target on a GPU: >= 5x). jax-md's minimum-image space needs cells wider than
  2 x (cutoff + skin), so the 64-atom cell runs the ``--replica-preset`` (default tiny, 5 Å); the mp preset's
  6 Å cutoff needs a 13 Å cell.

Writes ``experiments/results/bench_md_<UTC date>[_quick].{json,md}`` (or ``--out-stem``) with date, machine,
versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXP_DIR = Path(__file__).resolve().parent
RESULTS_DIR = EXP_DIR / "results"
sys.path.insert(0, str(EXP_DIR))
import bench_common as bc  # noqa: E402

bc.set_thread_env()  # before jax is imported: XLA threads = the 2 cores


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            info["cpu_model"] = line.split(":", 1)[1].strip()
    return info


def timed(fn: Any, repeats: int, budget_s: float = 60.0) -> list[float]:
    """Wall times of ``fn()`` (which must block until done): at least 3, at most ``repeats``, within budget."""
    samples: list[float] = []
    while len(samples) < repeats and (len(samples) < 3 or sum(samples) < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny preset, 256 atoms, few steps")
    ap.add_argument("--preset", default=None, help="model preset (default mp; tiny with --quick)")
    ap.add_argument("--repeat", type=int, nargs=3, default=None, help="Cu fcc conventional-cell repeats")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--md-steps", type=int, default=None, help="timed MD steps per block")
    ap.add_argument("--ase-steps", type=int, default=None)
    ap.add_argument("--replicas", type=int, default=None)
    ap.add_argument("--replica-preset", default="tiny")
    ap.add_argument("--out-stem", default=None, help="output name (default bench_md_<UTC date>[_quick]): "
                    "a second run of the day does not overwrite the first")
    ap.add_argument("--skip-ase", action="store_true")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from ase import units
    from ase.build import bulk
    from ase.md.verlet import VelocityVerlet

    import geodite_jax as gd
    from geodite_jax.graph import atoms_to_graph, batch_graphs, bucket, max_degree
    from geodite_jax.potential import make_energy_fn
    from geodite_jax.simulation import MDRunner, MDSettings, ReplicaRunner, jaxmd_system, replica_positions

    preset = args.preset or ("tiny" if args.quick else "mp")
    repeat = tuple(args.repeat or ((4, 4, 4) if args.quick else (6, 6, 7)))
    md_steps = args.md_steps or (10 if args.quick else 20)
    ase_steps = args.ase_steps or (3 if args.quick else 5)
    n_replicas = args.replicas or (8 if args.quick else 64)
    record: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "versions": bc.package_versions(["jax", "jaxlib", "jax-md", "flax", "ase", "numpy"]),
        "devices": [str(d) for d in jax.devices()], "thread_env": {k: os.environ.get(k, "") for k in bc.THREAD_ENV},
        "preset": preset, "dtype": args.dtype, "quick": args.quick}

    pot = gd.Potential.init(gd.GeoditeConfig.preset(preset), seed=0, element_energies="mptrj")
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(0.02, seed=1)
    n = len(atoms)
    record.update(n_atoms=n, structure=f"Cu fcc a=3.61 {repeat}", n_params=pot.num_params)
    print(f"{preset} ({pot.num_params:,} params), {n} atoms Cu fcc, {args.dtype}, devices {jax.devices()}", flush=True)

    # --- jax-md MD step (NVE), neighbour-list updates included ------------------------------------------
    t0 = time.perf_counter()
    system = jaxmd_system(pot, atoms, dtype=args.dtype, skin=0.5)
    runner = MDRunner(system, MDSettings("nve", temperature_K=300.0, timestep_fs=1.0))
    md = runner.init()
    md = runner.advance(md, 2)  # compile
    jax.block_until_ready(md.state.position)
    record["jaxmd_setup_compile_s"] = time.perf_counter() - t0
    holder = {"md": md}

    def md_block() -> None:
        holder["md"] = runner.advance(holder["md"], md_steps)
        jax.block_until_ready(holder["md"].state.position)

    samples = timed(md_block, repeats=5, budget_s=120.0)
    step_s = statistics.median(samples) / md_steps
    nbr = holder["md"].neighbors
    record["jaxmd_md"] = {"s_per_step": step_s, "us_per_atom_step": step_s / n * 1e6,
                          "ns_per_day": 86400.0 / step_s * 1.0e-6, "block_steps": md_steps, "samples_s": samples,
                          "skin_capacity": int(nbr.skin.max_occupancy), "tight_capacity": nbr.capacity,
                          "tight_count": int(nbr.tight_count)}
    print(f"jax-md NVE: {step_s * 1e3:.1f} ms/step, {step_s / n * 1e6:.1f} µs/atom/step, "
          f"{86400.0 / step_s * 1e-6:.4f} ns/day (tight list {nbr.capacity}/atom, skin list "
          f"{int(nbr.skin.max_occupancy)}/atom)", flush=True)

    # --- bare energy + forces on the same list ----------------------------------------------------------
    R = holder["md"].state.position
    value_and_grad = jax.jit(jax.value_and_grad(lambda r, nb: system.energy_fn(r, neighbor=nb)))
    jax.block_until_ready(value_and_grad(R, nbr))
    bare = timed(lambda: jax.block_until_ready(value_and_grad(R, nbr)), repeats=10, budget_s=60.0)
    bare_s = statistics.median(bare)
    record["bare_energy_forces"] = {"s": bare_s, "samples_s": bare}
    record["md_step_over_bare"] = step_s / bare_s
    print(f"energy+forces on the MD's skin list (jitted): {bare_s * 1e3:.1f} ms -> MD step / this = "
          f"{step_s / bare_s:.3f}", flush=True)

    # --- energy + forces on exactly the pairs within the cutoff (no skin, no compaction) --------------------
    frame = system.to_atoms(R)
    np_dtype = np.float32 if args.dtype == "float32" else np.float64
    graph = atoms_to_graph(frame, pot.config.cutoff, pot.config.num_elements, np_dtype)
    block = bucket(max_degree([graph]), 8, 2, growth=1.05)
    exact_batch = jax.tree_util.tree_map(jnp.asarray, batch_graphs([graph], bucket(n + 1, 8, 8, growth=1.1), None,
                                                                   2, neighbours_per_node=block))
    energy_fn = make_energy_fn(pot.config, neighbours_per_node=block)
    state, vacuum = pot.state(jnp.dtype(args.dtype)), pot.vacuum_energies(jnp.dtype(args.dtype))
    exact_vg = jax.jit(jax.value_and_grad(lambda r, g: energy_fn(state, r, g.globals["cell"], g, vacuum)[0]))
    jax.block_until_ready(exact_vg(exact_batch.nodes["positions"], exact_batch))
    exact = timed(lambda: jax.block_until_ready(exact_vg(exact_batch.nodes["positions"], exact_batch)),
                  repeats=10, budget_s=60.0)
    exact_s = statistics.median(exact)
    record["exact_pairs_energy_forces"] = {"s": exact_s, "samples_s": exact, "edges": int(graph.n_edge[0]),
                                           "neighbours_per_node_block": block}
    record["md_step_over_exact"] = step_s / exact_s
    print(f"exact-pairs energy+forces (jitted, {int(graph.n_edge[0])} edges, block {block}): {exact_s * 1e3:.1f} ms"
          f" -> MD step / exact = {step_s / exact_s:.3f} (target <= 1.10)", flush=True)

    calc = gd.GeoditeCalculator(pot, dtype=args.dtype)
    frame.calc = calc
    calc_rec = bc.time_calculator(calc, frame, max_calls=10 if not args.quick else 3, budget_s=60.0)
    record["calculator_energy_forces_stress"] = calc_rec
    record["md_step_over_calculator"] = step_s / calc_rec["median_s"]
    print(f"GeoditeCalculator E+F+S: {calc_rec['median_s'] * 1e3:.1f} ms (first call {calc_rec['first_call_s']:.1f} s)"
          f" -> MD step / calculator call = {step_s / calc_rec['median_s']:.3f}", flush=True)

    # --- ASE driver ---------------------------------------------------------------------------------------
    if not args.skip_ase:
        ase_atoms = system.to_atoms(R, momenta=holder["md"].state.momentum)
        ase_atoms.calc = calc
        dyn = VelocityVerlet(ase_atoms, timestep=1.0 * units.fs)
        dyn.run(1)
        t0 = time.perf_counter()
        dyn.run(ase_steps)
        ase_s = (time.perf_counter() - t0) / ase_steps
        record["ase_md"] = {"s_per_step": ase_s, "us_per_atom_step": ase_s / n * 1e6,
                            "ns_per_day": 86400.0 / ase_s * 1e-6, "steps": ase_steps}
        print(f"ASE VelocityVerlet + GeoditeCalculator: {ase_s * 1e3:.1f} ms/step, {ase_s / n * 1e6:.1f} "
              f"µs/atom/step, {86400.0 / ase_s * 1e-6:.4f} ns/day; jax-md speed-up {ase_s / step_s:.2f}x", flush=True)

    # --- replicas -----------------------------------------------------------------------------------------
    rpot = gd.Potential.init(gd.GeoditeConfig.preset(args.replica_preset), seed=0, element_energies="mptrj")
    cell = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    rsys = jaxmd_system(rpot, cell, dtype=args.dtype, skin=0.3)
    rr = ReplicaRunner(rsys, ensemble="nvt")
    steps = 40 if args.quick else 100
    positions = replica_positions(rsys, n_replicas, seed=0)
    batch = rr.run(*rr.init(positions, 300.0), 300.0, steps=steps + 10, block=10)
    single_rates = []
    for k in range(min(n_replicas, 2)):  # one at a time: the same code with a batch of one
        single_rates.append(rr.run(*rr.init(positions[k:k + 1], 300.0), 300.0, steps=steps + 10,
                                   block=10).atom_steps_per_s)
    single = statistics.median(single_rates)
    record["replicas"] = {"preset": args.replica_preset, "cell": "Si diamond 2x2x2 (64 atoms)",
                          "n_replicas": n_replicas, "batched_atom_steps_per_s": batch.atom_steps_per_s,
                          "one_at_a_time_atom_steps_per_s": single, "speedup": batch.atom_steps_per_s / single}
    print(f"replicas ({args.replica_preset}, 64-atom cell): {n_replicas} batched {batch.atom_steps_per_s:,.0f} "
          f"atom-steps/s vs one at a time {single:,.0f} -> {batch.atom_steps_per_s / single:.2f}x", flush=True)

    # --- write ------------------------------------------------------------------------------------------------
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = args.out_stem or (f"bench_md_{dt.datetime.now(dt.timezone.utc).date().isoformat()}"
                             + ("_quick" if args.quick else ""))
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    md_lines = [
        f"# MD benchmark {record['date']}", "",
        f"{record['machine'].get('cpu_model', '?')} ({record['machine']['cpu_count']} CPUs), devices "
        f"{record['devices']}, jax {record['versions']['jax']}, jax-md {record['versions']['jax-md']}", "",
        f"Model: {preset} ({pot.num_params:,} parameters), {args.dtype}; {n} atoms Cu fcc; NVE dt 1 fs.", "",
        "| path | ms/step | µs/atom/step | ns/day |", "|---|---|---|---|",
        f"| jax-md NVE | {step_s * 1e3:.1f} | {step_s / n * 1e6:.1f} | {86400 / step_s * 1e-6:.4f} |"]
    if "ase_md" in record:
        a = record["ase_md"]
        md_lines.append(f"| ASE VelocityVerlet + GeoditeCalculator | {a['s_per_step'] * 1e3:.1f} | "
                        f"{a['us_per_atom_step']:.1f} | {a['ns_per_day']:.4f} |")
    md_lines += ["", f"MD step / jitted energy+forces on exactly the pairs within the cutoff: "
                 f"**{record['md_step_over_exact']:.3f}** (target <= 1.10); / the same on the MD's skin list: "
                 f"{record['md_step_over_bare']:.3f}; / a GeoditeCalculator E+F+S call: "
                 f"{record['md_step_over_calculator']:.3f}.", "",
                 f"Replicas ({args.replica_preset}, Si 64 atoms): {n_replicas} in one vmapped block "
                 f"{batch.atom_steps_per_s:,.0f} atom-steps/s, one at a time {single:,.0f}: "
                 f"**{batch.atom_steps_per_s / single:.2f}x**.", ""]
    (RESULTS_DIR / f"{stem}.md").write_text("\n".join(md_lines))
    print(f"wrote {RESULTS_DIR / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
