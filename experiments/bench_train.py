"""Training throughput of Geodite on MPtrj-like batches (structures/s, atoms/s) and the projected MPtrj epoch.

MPtrj itself cannot be downloaded here, so the batches are MPtrj-like: rattled and strained crystals of the
common MPtrj prototypes (rocksalt, fluorite, perovskite, spinel-like supercells, elemental metals) with the
size distribution of MPtrj (mean ≈ 31 atoms per frame), random elements, cutoff of the preset. Labels are
random (speed only). Each step is the real training step: energy, forces and stress, their parameter
gradient (double backward), ZClip, AdamW and the EMA, each step padded to the smallest of the config's
``batch_buckets`` budgets that holds it (``--buckets 1``: one full budget), every shape compiled before timing.

    python experiments/bench_train.py                 # mp preset, 6 structures per step, CPU or GPU
    python experiments/bench_train.py --preset tiny --steps 20
    python experiments/bench_train.py --paired        # also each step padded to the full budget: the ratio
    python experiments/bench_train.py --paired fused  # also each step without the fused CPU kernels: the ratio
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

MPTRJ_FRAMES = 1_580_395
MPTRJ_TRAIN_FRAMES = int(0.9 * MPTRJ_FRAMES)


def mptrj_like_frames(n: int, seed: int) -> list:
    """Random crystals with an MPtrj-like size distribution (sizes 2-96, mean ≈ 31 atoms)."""
    import numpy as np
    from ase.build import bulk

    from geodite_jax.data import Frame

    rng = np.random.default_rng(seed)
    metals = ["Li", "Na", "Mg", "Al", "K", "Ca", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Zr", "Nb",
              "Mo", "Ag", "Sn", "Ba", "La", "W", "Pt"]
    anions = ["O", "S", "F", "Cl", "N", "Se", "P"]
    protos = [("rocksalt", 4.4), ("zincblende", 5.6), ("fluorite", 5.4), ("fcc", 3.9), ("bcc", 3.1)]
    frames = []
    while len(frames) < n:
        kind, a = protos[rng.integers(len(protos))]
        a *= rng.uniform(0.95, 1.1)
        if kind in ("fcc", "bcc"):
            atoms = bulk(str(rng.choice(metals)), kind, a=a, cubic=True)
        else:
            atoms = bulk("NaCl" if kind != "fluorite" else "CaF2", kind, a=a, cubic=True)
            numbers = atoms.numbers.copy()
            cation, anion = rng.choice(metals), rng.choice(anions)
            from ase.data import atomic_numbers

            atoms.numbers = np.where(numbers == numbers[0], atomic_numbers[cation], atomic_numbers[anion])
        reps = [(1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2)][rng.choice(4, p=[0.15, 0.3, 0.35, 0.2])]
        atoms = atoms.repeat(reps)
        if len(atoms) > 96:
            continue
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.03 * rng.standard_normal((3, 3))), scale_atoms=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        n_at = len(atoms)
        frames.append(Frame(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc,
                            energy=float(rng.normal(-5 * n_at, n_at)), forces=rng.normal(0, 0.8, (n_at, 3)),
                            stress=0.01 * rng.standard_normal((3, 3)), id=f"synthetic-{len(frames)}"))
    return frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mp", choices=["mp", "tiny"])
    ap.add_argument("--batch-size", type=int, default=6, help="structures per device per step (paper: 6)")
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--steps", type=int, default=10, help="timed steps after the compile")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--paired", nargs="?", const="buckets", choices=["buckets", "fused"],
                    help="also time every step padded to the full budget (buckets, the default) or with the model on "
                         "XLA alone, without the fused CPU kernels (fused), alternating with the measured one (ratio)")
    ap.add_argument("--buckets", type=int, default=None,
                    help="padded batch shapes (TrainConfig.batch_buckets; default the config's, 1: one full budget)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2")

    import jax
    import numpy as np

    import geodite_jax
    from geodite_jax import fused
    from geodite_jax.data import GraphDataset, budget_for, iterate_batches
    from geodite_jax.precision import resolve_dtype
    from geodite_jax.training import TrainConfig, build_train_step
    from geodite_jax.training.datasets import label_statistics
    from geodite_jax.training.initial import initial_potential, loss_norms
    from geodite_jax.training.sharding import make_mesh, put_batch, replicate

    cfg = TrainConfig(preset=args.preset, batch_size=args.batch_size, dtype=args.dtype)
    if args.buckets is not None:
        cfg = cfg.replace(batch_buckets=args.buckets)
    dtype = resolve_dtype(cfg.dtype)  # float64 switches JAX to 64-bit mode before anything is built
    model_config = cfg.model_config()
    t0 = time.perf_counter()
    ds = GraphDataset.from_frames(mptrj_like_frames(args.frames, 0), model_config.cutoff)
    prep = time.perf_counter() - t0
    stats = label_statistics(ds)
    pot = initial_potential(cfg, ds, stats)
    mesh = make_mesh()
    devices = int(mesh.devices.size)
    budget = budget_for(ds, args.batch_size)
    step, state, consts = build_train_step(pot, cfg, mesh, loss_norms(pot, stats), total_steps=100_000)
    key = replicate(jax.random.PRNGKey(0), mesh)
    host_batches = [b for _, b in zip(range(args.steps), iterate_batches(
        ds, None, budget, shuffle=True, seed=0, epoch=0, num_shards=devices, buckets=cfg.batch_buckets),
        strict=False)]
    batches = [put_batch(b, mesh, dtype) for b in host_batches]
    edges_real = float(np.mean([np.asarray(b.graph.n_edge)[..., :-1].sum() for b in host_batches]))
    edges_padded = float(np.mean([b.graph.senders.size for b in host_batches]))
    shapes = sorted({b.graph.senders.shape[-1] for b in host_batches})
    # Compile every padded shape of the timed steps first (one step on the first batch of each shape).
    t0 = time.perf_counter()
    for n_edge in shapes:
        state, metrics = step(state, next(b for b in batches if b.graph.senders.shape[-1] == n_edge), consts, key)
        jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    structures = atoms = 0
    t0 = time.perf_counter()
    for b in batches:
        state, metrics = step(state, b, consts, key)
        structures += int(np.asarray(b.energy_weight).sum())
        atoms += int(np.asarray(b.forces_weight).sum())
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    n = len(batches)
    paired = None
    if args.paired:  # the same steps another way, timed alternately: a ratio robust to drift
        other_step, other_batches = step, batches
        if args.paired == "buckets":  # padded to the full budget
            other_batches = [put_batch(b, mesh, dtype) for _, b in zip(range(args.steps), iterate_batches(
                ds, None, budget, shuffle=True, seed=0, epoch=0, num_shards=devices), strict=False)]
            state, metrics = step(state, other_batches[0], consts, key)
            jax.block_until_ready(metrics)
        else:  # the model on XLA alone
            other_step = build_train_step(pot, cfg, mesh, loss_norms(pot, stats), total_steps=100_000, fused=False)[0]
            for n_edge in shapes:
                state, metrics = other_step(state, next(b for b in batches if b.graph.senders.shape[-1] == n_edge),
                                            consts, key)
                jax.block_until_ready(metrics)
        times: dict[str, list[float]] = {"this": [], "other": []}
        for k, (b, o) in enumerate(zip(batches, other_batches, strict=True)):
            runs = (("this", step, b), ("other", other_step, o))
            for name, fn, batch in runs if k % 2 == 0 else runs[::-1]:
                t1 = time.perf_counter()
                state, metrics = fn(state, batch, consts, key)
                jax.block_until_ready(metrics)
                times[name].append(time.perf_counter() - t1)
        ratios = [o / t for t, o in zip(times["this"], times["other"], strict=True)]
        paired = {"other": "padded to the full budget" if args.paired == "buckets" else
                  "on XLA alone (no fused kernels)",
                  "this_s_per_step": float(np.mean(times["this"])), "other_s_per_step": float(np.mean(times["other"])),
                  "speedup_median": float(np.median(ratios)), "speedup_min": float(min(ratios)),
                  "speedup_max": float(max(ratios))}
    result = {
        "date": datetime.date.today().isoformat(), "machine": _machine(), "devices": [str(d) for d in jax.devices()],
        "versions": {"geodite_jax": geodite_jax.__version__, "jax": jax.__version__},
        "preset": args.preset, "params": pot.num_params, "dtype": args.dtype, "structures_per_device_step":
        args.batch_size, "budget": budget._asdict(), "mean_atoms_per_frame": float(np.mean(ds.n_atoms)),
        "mean_neighbours": float(ds.stats.mean_neighbours), "preprocess_s": prep, "compile_s": compile_s,
        "fused_kernels": fused.enabled(), "batch_buckets": cfg.batch_buckets, "edge_shapes": shapes,
        "mean_real_edges": edges_real, "mean_padded_edges": edges_padded,
        "steps": n, "s_per_step": seconds / n, "structures_per_s": structures / seconds, "atoms_per_s": atoms / seconds,
        "projected_mptrj_epoch_h": MPTRJ_TRAIN_FRAMES / (structures / seconds) / 3600, "paired": paired,
    }
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_train_{result['date']}_{args.preset}_{jax.devices()[0].platform}_buckets{cfg.batch_buckets}"
    if args.paired == "fused":
        stem += "_paired_fused"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(
        f"# Training throughput, {args.preset} preset ({pot.num_params:,} parameters), {args.dtype}\n\n"
        f"{result['date']}, {result['machine']}, {len(result['devices'])} device(s) ({result['devices'][0]}), "
        f"jax {jax.__version__}\n\n| structures/step/device | mean atoms | batch shapes | edges real / padded | "
        f"s/step | structures/s | atoms/s | compile s (all shapes) | projected MPtrj epoch (1.42 M frames) |\n"
        f"|---|---|---|---|---|---|---|---|---|\n"
        f"| {args.batch_size} | {result['mean_atoms_per_frame']:.1f} | {len(shapes)} of {cfg.batch_buckets} | "
        f"{edges_real:.0f} / {edges_padded:.0f} | {result['s_per_step']:.3f} | "
        f"{result['structures_per_s']:.2f} | {result['atoms_per_s']:.0f} | {compile_s:.0f} | "
        f"{result['projected_mptrj_epoch_h']:.1f} h |\n" + ("" if paired is None else
        f"\nPaired (each step also run {paired['other']}, the two timed alternately): as above "
        f"{paired['this_s_per_step']:.3f} s/step, {paired['other']} {paired['other_s_per_step']:.3f} s/step, "
        f"speed-up {paired['speedup_median']:.2f}x (median of the per-step ratios; {paired['speedup_min']:.2f}-"
        f"{paired['speedup_max']:.2f})\n"))


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
