"""Per-step cost of MD across JAX devices (lammps-jax's grid spatial decomposition,
:mod:`geodite_jax.simulation.distributed`) on 1, 2 and 4 devices: weak and strong scaling on Cu fcc cells.

Usage (repository root, project python; run it on a quiet machine, nothing else running)::

    python experiments/bench_dist.py            # tiny preset, float32: weak 2,048 atoms/device, strong 4,096 atoms
    python experiments/bench_dist.py --quick    # smoke run: 256 atoms/device, strong 1,024 atoms, 2 steps
    python experiments/bench_dist.py --per-device 4096 --strong-atoms 16384    # the 4k-16k series (~3x longer)

The default set (2,048-8,192 atoms, 5 timed steps per point) is sized to finish in about 10 minutes on the
2-vCPU Xeon this project's figures come from.

Every (devices, atoms) point is a fresh process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=<devices>`` (on a CPU the host is split into that many XLA
devices; on a GPU machine the real devices are used and ``--devices`` must not exceed them). In each, the
``DistributedMD`` run is built, one step is taken (compilation), ``--warmup`` more steps, then ``--steps``
steps are timed in one compiled block (velocity Verlet, neighbour rebuilds and migrations included). The
single-device jax-md path (``jaxmd_system`` + ``jax_md.simulate.nve``, dense neighbour-block layout) is timed
the same way on the 1-device sizes as the baseline a user has without lammps-jax.

Host devices share the machine's cores: on a 2-core CPU, 2 and 4 "devices" cannot be faster than one device
using both cores, so the CPU table measures the overhead of the decomposition (ghost atoms computed twice,
ppermute copies, rebuilds), not a speed-up. The speed-up needs real devices (GPUs) or hosts.

Writes ``experiments/results/bench_dist_<UTC date>[_quick].{json,md}`` with date, machine and versions, and
prints the markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPEATS = {256: (4, 4, 4), 512: (4, 4, 8), 1024: (4, 8, 8), 2048: (8, 8, 8), 4096: (8, 8, 16), 8192: (8, 16, 16),
           16384: (16, 16, 16)}


# --------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One point, in this process (its device count was fixed by the parent's XLA_FLAGS)."""
    import jax
    import numpy as np
    from ase.build import bulk

    import geodite_jax as gd

    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_common import cpu_seconds, machine_busy_cores, machine_cpu_ticks, peak_rss_bytes

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(REPEATS[args.atoms])
    atoms.rattle(0.02, seed=0)
    pot = gd.Potential.init(gd.GeoditeConfig.preset(args.preset), seed=0)
    momenta = None
    record: dict[str, Any] = {"atoms": len(atoms), "devices": args.devices, "engine": args.engine,
                              "preset": args.preset, "dtype": args.dtype, "steps": args.steps,
                              "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend()}
    t0 = time.perf_counter()
    if args.engine == "distributed":
        from geodite_jax.simulation.distributed import DistributedMD

        md = DistributedMD(pot, atoms, args.devices, dtype=args.dtype, timestep_fs=1.0, skin=args.skin)
        state = md.init(momenta, temperature_K=300.0, seed=0)
        state = md.advance(state, 1)
        record["first_s"] = time.perf_counter() - t0
        state = md.advance(state, args.warmup)
        before = md.observe(state)
        cpu0, ticks0, t1 = cpu_seconds(), machine_cpu_ticks(), time.perf_counter()
        state = md.advance(state, args.steps)
        elapsed = time.perf_counter() - t1
        cpu1, ticks1 = cpu_seconds(), machine_cpu_ticks()
        after = md.observe(state)
        record.update(grid="x".join(map(str, md.grid)), max_owned=md.config.max_owned, max_ghost=md.config.max_ghost,
                      max_edges=md.subgraph["max_edges"], rebuilds=after["rebuilds"] - before["rebuilds"],
                      migrated=after["migrated"] - before["migrated"], temperature_K=after["temperature_K"])
    else:
        import jax.numpy as jnp
        from ase import units
        from jax_md import simulate

        from geodite_jax.simulation.jaxmd import jaxmd_system

        system = jaxmd_system(pot, atoms, dtype=args.dtype, skin=args.skin)
        _, apply_fn = simulate.nve(system.energy_fn, system.shift_fn, 1.0 * units.fs)
        nbr = system.allocate(system.positions)
        from geodite_jax.simulation.distributed import DistributedMD

        p0 = jnp.asarray(system.rotate_in(DistributedMD.initial_momenta_for(atoms, 300.0, 0)), system.dtype)
        mass = jnp.asarray(system.masses, system.dtype)[:, None]
        state = simulate.NVEState(system.positions, p0, jnp.zeros_like(p0), mass)

        @jax.jit
        def run(state, nbr, n, step):
            def body(_, carry):
                s, nb = carry
                s = apply_fn(s, neighbor=nb, dt=step)
                return s, nb.update(s.position)

            return jax.lax.fori_loop(0, n, body, (state, nbr))

        def advance(state, nbr, n, step=1.0 * units.fs):
            state, nbr = run(state, nbr, n, jnp.asarray(step, system.dtype))
            jax.block_until_ready(state.position)
            if bool(nbr.did_buffer_overflow):
                raise RuntimeError("jax-md neighbour list overflowed during the benchmark; rerun")
            return state, nbr

        state, nbr = advance(state, nbr, 1, 0.0)
        state, nbr = advance(state, nbr, 1)
        record["first_s"] = time.perf_counter() - t0
        state, nbr = advance(state, nbr, args.warmup)
        cpu0, ticks0, t1 = cpu_seconds(), machine_cpu_ticks(), time.perf_counter()
        state, nbr = advance(state, nbr, args.steps)
        elapsed = time.perf_counter() - t1
        cpu1, ticks1 = cpu_seconds(), machine_cpu_ticks()
        record.update(grid="-", finite=bool(np.all(np.isfinite(np.asarray(state.position)))))
    record.update(s_per_step=elapsed / args.steps, cpu_s_per_step=(cpu1 - cpu0) / args.steps,
                  machine_busy_cores=machine_busy_cores(ticks0, ticks1), peak_rss_gb=peak_rss_bytes() / 1e9)
    return record


# --------------------------------------------------------------------------------------------- driver
def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return info


def versions() -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_common import package_versions

    out = package_versions(["jax", "jaxlib", "jax-md", "lammps-jax", "flax"])
    try:
        out["geodite_jax commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                   capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        pass
    return out


def run_point(args: argparse.Namespace, engine: str, devices: int, atoms: int) -> dict[str, Any]:
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)
    env["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={devices}").strip()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--devices", str(devices), "--atoms", str(atoms),
           "--preset", args.preset, "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--skin", str(args.skin)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.point_timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-2000:]
        print(f"  {engine} {devices} device(s), {atoms} atoms FAILED:\n{tail}", flush=True)
        return {"engine": engine, "devices": devices, "atoms": atoms, "error": tail[-500:]}
    record = json.loads(lines[-1][len("RESULT "):])
    record["process_s"] = time.perf_counter() - t0
    print(f"  {engine:11s} {devices} device(s) {atoms:6d} atoms: {record['s_per_step'] * 1e3:9.1f} ms/step "
          f"(first step {record['first_s']:.1f} s, process {record['process_s']:.0f} s)", flush=True)
    return record


def table(records: list[dict[str, Any]], per_device: int, strong_atoms: int) -> str:
    ok = [r for r in records if "error" not in r]

    def find(engine: str, devices: int, atoms: int) -> dict[str, Any] | None:
        return next((r for r in ok if (r["engine"], r["devices"], r["atoms"]) == (engine, devices, atoms)), None)

    lines = ["| scaling | engine | devices | grid | atoms | atoms/device | ms/step | µs/atom/step | efficiency | "
             "rebuilds | peak RSS (GB) | busy cores |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in ("weak", "strong"):
        base = find("distributed", 1, per_device if mode == "weak" else strong_atoms)
        for r in records:
            if "error" in r:
                if r.get("mode") == mode:
                    lines.append(f"| {mode} | {r['engine']} | {r['devices']} | - | {r['atoms']} | - | failed | - | - | "
                                 "- | - | - |")
                continue
            if r.get("mode") != mode:
                continue
            eff = "-"
            if base is not None and r["engine"] == "distributed":
                t1, tn = base["s_per_step"], r["s_per_step"]
                eff = f"{t1 / tn:.2f}" if mode == "weak" else f"{t1 / (r['devices'] * tn):.2f}"
            busy = "-" if r.get("machine_busy_cores") is None else f"{r['machine_busy_cores']:.1f}"
            lines.append(f"| {mode} | {r['engine']} | {r['devices']} | {r['grid']} | {r['atoms']} | "
                         f"{r['atoms'] // r['devices']} | {r['s_per_step'] * 1e3:.1f} | "
                         f"{r['s_per_step'] / r['atoms'] * 1e6:.1f} | {eff} | {r.get('rebuilds', '-')} | "
                         f"{r['peak_rss_gb']:.2f} | {busy} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 atoms/device, strong 1,024, 2 steps")
    ap.add_argument("--preset", default="tiny", help="GeoditeConfig preset (default tiny; mp is ~50x slower)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--per-device", type=int, default=2048, choices=sorted(REPEATS),
                    help="atoms per device of the weak-scaling series (1, 2, 4 devices)")
    ap.add_argument("--strong-atoms", type=int, default=4096, choices=sorted(REPEATS),
                    help="atoms of the strong-scaling series (1, 2, 4 devices)")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per point")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    ap.add_argument("--skin", type=float, default=0.5, help="Verlet skin, Å")
    ap.add_argument("--no-jaxmd", action="store_true", help="skip the single-device jax-md baseline")
    ap.add_argument("--point-timeout", type=float, default=900.0, help="s per point before it counts as failed")
    ap.add_argument("--out", default=None, help="output stem (default experiments/results/bench_dist_<date>)")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="distributed", help=argparse.SUPPRESS)
    ap.add_argument("--atoms", type=int, default=2048, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        (args.devices,) = args.devices  # one point: one device count
        if args.dtype == "float64":
            import jax

            jax.config.update("jax_enable_x64", True)
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    if args.quick:
        args.per_device, args.strong_atoms, args.steps, args.warmup = 256, 1024, 2, 1
    date = dt.datetime.now(dt.timezone.utc)
    head = {"date_utc": date.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "versions": versions(),
            "preset": args.preset, "dtype": args.dtype, "steps": args.steps, "skin": args.skin}
    print(f"bench_dist {head['date_utc']} UTC, {head['machine'].get('cpu', '?')} ({os.cpu_count()} CPUs); "
          f"{args.preset} preset, {args.dtype}, {args.steps} timed steps per point", flush=True)
    records = []
    points = [("weak", n, args.per_device * n) for n in args.devices] + \
             [("strong", n, args.strong_atoms) for n in args.devices]
    done: dict[tuple[int, int], dict[str, Any]] = {}
    for mode, devices, atoms in points:
        if atoms not in REPEATS:
            print(f"  skipped: {atoms} atoms (no Cu cell of that size in REPEATS)")
            continue
        key = (devices, atoms)
        rec = done.get(key) or run_point(args, "distributed", devices, atoms)
        done[key] = rec
        records.append({**rec, "mode": mode})
        if devices == 1 and not args.no_jaxmd and ("jaxmd", atoms) not in done:
            done[("jaxmd", atoms)] = run_point(args, "jaxmd", 1, atoms)
            records.append({**done[("jaxmd", atoms)], "mode": mode})
    md = table(records, args.per_device, args.strong_atoms)
    v = head["versions"]
    text = (f"## MD across JAX devices: {head['date_utc']} UTC\n\n"
            f"Machine: {head['machine'].get('cpu', '?')}, {os.cpu_count()} CPUs, {head['machine']['platform']}. "
            f"Versions: jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, jax-md {v.get('jax-md')}, lammps-jax "
            f"{v.get('lammps-jax')}, flax {v.get('flax')}, geodite_jax {v.get('geodite_jax commit')}.\n"
            f"Geodite `{args.preset}` (untrained), {args.dtype}, Cu fcc (rattled 0.02 Å), NVE dt 1 fs from 300 K, "
            f"skin {args.skin} Å; {args.steps} timed steps per point after {args.warmup + 1} untimed. Efficiency: weak "
            "t(1)/t(N), strong t(1)/(N t(N)), against the 1-device `distributed` run. `jaxmd`: the single-device "
            "jax-md path (dense neighbour blocks), for reference. Host devices share the CPU's cores.\n\n" + md + "\n")
    print("\n" + text)
    stem = Path(args.out) if args.out else ROOT / "experiments" / "results" / (
        f"bench_dist_{date.strftime('%Y-%m-%d')}" + ("_quick" if args.quick else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({**head, "records": records}, indent=2) + "\n")
    print(f"wrote {stem.with_suffix('.md')} and .json")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
