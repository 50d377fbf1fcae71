"""Li6PS5Cl argyrodite: SevenNet-0 labels -> Geodite -> jax-md NVT at 500 K -> RDF / Li MSD vs AIMD.

One command, four resumable stages (issue 6 part 5; protocol ``../shared/docs/data_and_benchmarks.md`` §2.5)::

    python experiments/argyrodite/run.py [--stages label,train,md,analyse] [--out DIR] [--work DIR] [--quick]

1. ``label``: AIMD frames of the runs that are NOT the MD start run (0p run2-4, 50p run1, 100p run1 for
   training; 0p run5 held out as the test set) plus rattled/strained copies, labelled by SevenNet-0 in its own
   virtualenv (``experiments/peers/sevennet_label.py``). SevenNet's speed on one 416-atom frame is measured
   first and the set sized to fit ``--label-minutes``.
2. ``train``: ``configs/argyrodite.yaml`` through the project's trainer; test errors vs the SevenNet labels.
3. ``md``: jax-md NVT (Nose-Hoover chain, τ = 100 fs) at 500 K, 2 fs, float32, from frame 0 of 0p/run1,
   a frame every 100 fs (as the AIMD), checkpoint after every frame; the length is chosen from the measured
   ms/step to fit ``--md-minutes`` (at most ``--steps``, default the AIMD's 7000).
4. ``analyse``: RDFs (total and partials) and Li MSD / diffusivity vs 0p run1 and vs the five 0p runs pooled
   (first 1 ps discarded in both), stability report, plots, Markdown/JSON tables.

Small results (tables, plots, the trained potential, logs) go to ``--out``; big files (labelled extxyz,
training checkpoints, the MD trajectory) to ``--work`` (default ``runs/argyrodite_<date>``, git-ignored).
A stage whose outputs exist is skipped; an interrupted stage resumes (labelling, training and MD all do).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from geodite_jax.benchmarks import shared_data_dir, write_tables  # noqa: E402
from geodite_jax.benchmarks import trajectory as mda  # noqa: E402

STAGES = ("label", "train", "md", "analyse")
DATA_NAME = "argyrodite-Li6PS5Cl-aimd"
START_RUN = "0p/run1"
TRAIN_RUNS = ("0p/run2", "0p/run3", "0p/run4", "50p/run1", "100p/run1")
TEST_RUNS = ("0p/run5",)
REFERENCE_RUNS = ("0p/run1", "0p/run2", "0p/run3", "0p/run4", "0p/run5")
FRAME_PS = 0.1  # AIMD: one frame every 50 steps of 2 fs
EQUILIBRATION_PS = 1.0
HEADLINE_PAIRS = ("total", "Li-Li", "Li-S", "P-S", "Li-Cl")
ELEMENT_ORDER = ("Li", "P", "S", "Cl")  # pair names A-B follow it: Li-S, P-S, S-Cl, ...
ALL_PAIRS = tuple((a, b) for k, a in enumerate(ELEMENT_ORDER) for b in ELEMENT_ORDER[k:])
TEMPERATURE_K = 500.0
TIMESTEP_FS = 2.0
STEPS_PER_FRAME = 50
SEVENNET_PYTHON = REPO / "experiments" / ".venvs" / "sevennet" / "bin" / "python"
LABELLER = REPO / "experiments" / "peers" / "sevennet_label.py"


def log(message: str) -> None:
    print(f"[argyrodite {time.strftime('%H:%M:%S')}] {message}", flush=True)


def xdatcar(run: str, data_dir: Path | None = None) -> Path:
    path = (data_dir or shared_data_dir() / DATA_NAME) / run / "actual_XDATCAR.gz"
    if not path.is_file():
        raise FileNotFoundError(f"AIMD trajectory {path} not found (set GEODITE_SHARED_DATA or pass --data)")
    return path


def write_json(path: Path, data: Any) -> None:
    from geodite_jax.benchmarks import to_jsonable

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=1))


# ============================================================================================== label
def _run_labeller(inp: Path, out: Path, chunk: int = 10) -> float:
    """SevenNet-0 labels ``inp`` -> ``out`` in its own venv (resumable); returns the wall time in s."""
    if not SEVENNET_PYTHON.exists():
        raise FileNotFoundError(f"SevenNet venv not found at {SEVENNET_PYTHON}; build it with "
                                "bash experiments/peers/setup_envs.sh sevennet")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run([str(SEVENNET_PYTHON), str(LABELLER), str(inp), str(out), "--chunk", str(chunk)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"SevenNet labelling of {inp} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("labelled")]
    if lines:
        log(f"  {lines[-1]}")
    return time.perf_counter() - t0


def _perturbed(atoms: Any, rng: np.random.Generator) -> Any:
    """A rattled (σ 0.03-0.12 Å) and strained (symmetric, components ±3 %) copy: off-trajectory forces/stress."""
    out = atoms.copy()
    strain = rng.uniform(-0.03, 0.03, (3, 3))
    strain = 0.5 * (strain + strain.T)
    out.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    out.positions += rng.normal(0.0, rng.uniform(0.03, 0.12), out.positions.shape)
    out.wrap()
    return out


def build_label_sets(plan: dict[str, int], data_dir: Path | None, seed: int = 0) -> tuple[list, list]:
    """Training / test configurations (unlabelled ASE Atoms) for ``plan`` = {n_train, n_test}.

    80 % AIMD frames evenly spaced over each run, 20 % perturbed copies of (other) frames of the same runs.
    """
    rng = np.random.default_rng(seed)

    def from_runs(runs: tuple[str, ...], n: int, kind: str) -> list:
        n_pert = int(round(0.2 * n)) if n >= 3 else 0
        n_aimd = n - n_pert
        frames = []
        for k, run in enumerate(runs):
            traj = mda.read_xdatcar(xdatcar(run, data_dir))
            m = n_aimd // len(runs) + (k < n_aimd % len(runs))
            take = np.unique(np.linspace(0, len(traj) - 1, m + 2)[1:-1].round().astype(int)) if m else []
            for i in take:
                a = traj[int(i)]
                a.info.update(config_type=f"aimd {run}", source_frame=int(i))
                frames.append(a)
            p = n_pert // len(runs) + (k < n_pert % len(runs))
            for i in rng.choice(len(traj), size=p, replace=False):
                a = _perturbed(traj[int(i)], rng)
                a.info.update(config_type=f"perturbed {run}", source_frame=int(i))
                frames.append(a)
        log(f"  {kind}: {len(frames)} configurations ({n_pert} perturbed) from {', '.join(runs)}")
        return frames

    return from_runs(TRAIN_RUNS, plan["n_train"], "train"), from_runs(TEST_RUNS, plan["n_test"], "test")


def stage_label(args: argparse.Namespace) -> None:
    from ase.io import write

    labels = args.work / "labels"
    train_out, test_out = labels / "train.extxyz", labels / "test.extxyz"
    if train_out.exists() and test_out.exists():
        log(f"label: {train_out} and {test_out} exist; skipped")
        return
    labels.mkdir(parents=True, exist_ok=True)
    plan_path = labels / "plan.json"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
    else:
        # Speed first: 3 frames (1 in --quick) of the test run, timed as the labeller reports each one.
        probe_in, probe_out = labels / "probe_in.extxyz", labels / "probe_out.extxyz"
        n_probe = 1 if args.quick else 3
        write(probe_in, mda.read_xdatcar(xdatcar(TEST_RUNS[0], args.data), index=f":{n_probe}"), format="extxyz")
        for stale in (probe_out, Path(str(probe_out) + ".partial")):
            stale.unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONWARNINGS": "ignore"}
        t0 = time.perf_counter()
        stamps = []  # wall time at which each probe frame was reported done
        with subprocess.Popen([str(SEVENNET_PYTHON), str(LABELLER), str(probe_in), str(probe_out), "--chunk", "1"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                if line.startswith("labelled"):
                    stamps.append(time.perf_counter() - t0)
            err = proc.stderr.read()
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not stamps:
            raise RuntimeError(f"SevenNet probe failed (exit {proc.returncode}):\n{err[-3000:]}")
        # Steady seconds per frame from frames 2..n (frame 1 carries the model's first-call warm-up).
        s_per_frame = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else stamps[0]
        overhead = max(wall - n_probe * s_per_frame, 0.0)
        budget = args.label_minutes * 60.0 - wall - 2 * overhead  # the probe, then two labeller start-ups
        n_total = 6 if args.quick else max(12, int(0.95 * budget / s_per_frame))
        n_test = max(2, int(round(0.15 * n_total)))
        plan = {"seconds_per_frame": s_per_frame, "startup_seconds": overhead, "probe_frames": n_probe,
                "probe_wall_s": wall,
                "label_minutes": args.label_minutes, "n_train": n_total - n_test, "n_test": n_test,
                "atoms_per_frame": 416, "threads": int(env["OMP_NUM_THREADS"])}
        write_json(plan_path, plan)
        log(f"label: SevenNet-0 takes {s_per_frame:.2f} s per 416-atom frame (+{overhead:.1f} s start-up) -> "
            f"{plan['n_train']} train + {plan['n_test']} test frames for {args.label_minutes} min")
    for name, frames in zip(("train", "test"), build_label_sets(plan, args.data), strict=True):
        inp = labels / f"{name}_in.extxyz"
        if not inp.exists():  # the labeller's partial file refers to this exact input
            write(inp, frames, format="extxyz")
        wall = _run_labeller(inp, labels / f"{name}.extxyz")
        plan[f"{name}_wall_s"] = round(wall, 1)
        log(f"label: {name} set labelled in {wall:.0f} s -> {labels / f'{name}.extxyz'}")
    write_json(plan_path, plan)
    write_json(args.out / "labels.json", plan)


# ============================================================================================== train
def stage_train(args: argparse.Namespace) -> None:
    from geodite_jax.training import TrainConfig, train

    dest = args.out / "potential"
    if dest.exists() and (args.out / "test_errors.json").exists():
        log(f"train: {dest} exists; skipped")
        return
    labels = args.work / "labels"
    overrides: dict[str, Any] = {"train": str(labels / "train.extxyz"), "test": str(labels / "test.extxyz"),
                                 "out": str(args.work / "train"), "progress": False}
    if args.quick:
        overrides.update(max_minutes=0.3, epochs=2, valid_fraction=0.25, checkpoint_every_minutes=1)
    if args.train_minutes is not None:
        overrides["max_minutes"] = args.train_minutes
    cfg = TrainConfig.from_yaml(args.config, **overrides)
    resume = (args.work / "train" / "checkpoints" / "last").exists()
    log(f"train: {args.config} ({'resuming' if resume else 'fresh'}), max {cfg.max_minutes} min -> {cfg.out}")
    t0 = time.perf_counter()
    result = train(cfg, resume=resume)
    chosen = result.best if result.best is not None else result.potential
    if dest.exists():
        shutil.rmtree(dest)
    chosen.save(dest)
    for name in ("test_errors.md", "test_errors.json"):
        if (result.out / name).exists():
            shutil.copy(result.out / name, args.out / name)
    shutil.copy(result.out / "log.jsonl", args.out / "train_log.jsonl")
    write_json(args.out / "train_summary.json", {
        "steps": result.steps, "wall_seconds": result.wall_seconds, "epochs_done": len(result.history),
        "this_call_seconds": time.perf_counter() - t0, "config": str(args.config), "potential": "best (EMA)"
        if result.best is not None else "final (EMA)", "test_metrics": result.test_metrics,
        "baseline_metrics": result.baseline_metrics})
    m = (result.test_metrics or {}).get("all", {})
    log(f"train: {result.steps} steps in {result.wall_seconds / 60:.1f} min; test "  # error_metrics: meV, GPa
        f"E {m.get('energy_mae', float('nan')):.2f} meV/atom, F {m.get('forces_mae', float('nan')):.1f} meV/Å, "
        f"S {m.get('stress_mae', float('nan')):.3f} GPa -> {dest}")


# ================================================================================================= md
THERMO_FIELDS = ("step", "time_ps", "temperature_K", "potential_eV", "kinetic_eV", "total_eV", "conserved_eV",
                 "max_force_eV_A", "pressure_GPa", "wall_s")


def _conserved(state: Any, potential_eV: float, kinetic_eV: float, kT: float) -> float:
    """Nose-Hoover chain invariant (jax-md's ``nvt_nose_hoover_invariant``) from logged energies (no recompile)."""
    c = state.chain
    pos, mom, mass = (np.asarray(x, np.float64) for x in (c.position, c.momentum, c.mass))
    dof = int(np.prod(np.shape(state.position)))
    value = potential_eV + kinetic_eV + mom[0] ** 2 / (2 * mass[0]) + dof * kT * pos[0]
    return float(value + np.sum(mom[1:] ** 2 / (2 * mass[1:]) + kT * pos[1:]))


def _truncate(traj: Path, thermo: Path, step: int) -> None:
    """Drop frames/rows written after the checkpoint at ``step`` (a kill between frame and checkpoint)."""
    from ase.io import read, write

    if thermo.exists():
        rows = list(csv.DictReader(thermo.open()))
        keep = [r for r in rows if int(r["step"]) <= step]
        with thermo.open("w", newline="") as fh:
            w = csv.DictWriter(fh, THERMO_FIELDS)
            w.writeheader()
            w.writerows(keep)
    if traj.exists():
        frames = read(traj, index=":")
        keep_frames = [a for a in frames if int(a.info.get("step", 0)) <= step]
        if len(keep_frames) != len(frames):
            write(traj, keep_frames, format="extxyz")


def run_md(potential: Any, atoms: Any, work: Path, steps: int | None, budget_s: float, quick: bool = False,
           seed: int = 0) -> dict[str, Any]:
    """NVT (Nose-Hoover) MD of ``atoms`` with ``potential`` into ``work`` (traj.extxyz, thermo.csv,
    checkpoint.npz, plan.json); resumes from the checkpoint; returns the plan (ms/step, steps, ps)."""
    from geodite_jax.simulation import MDRunner, MDSettings, TrajectoryWriter, jaxmd_system

    work.mkdir(parents=True, exist_ok=True)
    traj, thermo, ckpt, plan_path = (work / n for n in ("traj.extxyz", "thermo.csv", "checkpoint.npz", "plan.json"))
    t_setup = time.perf_counter()
    system = jaxmd_system(potential, atoms, dtype="float32")
    settings = MDSettings("nvt", temperature_K=TEMPERATURE_K, timestep_fs=TIMESTEP_FS, thermostat="nose-hoover",
                          tau_fs=100.0, seed=seed)
    runner = MDRunner(system, settings)
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    resumed = ckpt.exists()
    if resumed:
        md = runner.resume(ckpt)
        _truncate(traj, thermo, md.step)
        log(f"md: resumed at step {md.step} from {ckpt}")
    else:
        md = runner.init()
        for stale in (traj, thermo):
            stale.unlink(missing_ok=True)
    writer = TrajectoryWriter(traj, append=True)
    new_log = not thermo.exists()
    fh = thermo.open("a", newline="")
    table = csv.DictWriter(fh, THERMO_FIELDS)
    if new_log:
        table.writeheader()
    kT = settings.kT
    started = time.perf_counter()

    def emit(wall: float) -> dict[str, Any]:
        rec = runner.observe(md)
        writer.write(runner.to_frame(md, rec))
        row = {"step": md.step, "time_ps": md.step * TIMESTEP_FS / 1000.0, "temperature_K": rec["temperature_K"],
               "potential_eV": rec["potential_eV"], "kinetic_eV": rec["kinetic_eV"], "total_eV": rec["total_eV"],
               "conserved_eV": _conserved(md.state, rec["potential_eV"], rec["kinetic_eV"], kT),
               "max_force_eV_A": float(np.linalg.norm(rec["_forces"], axis=1).max()),
               "pressure_GPa": rec["pressure_GPa"], "wall_s": round(wall, 3)}
        table.writerow(row)
        fh.flush()
        return row

    try:
        if not resumed:
            emit(0.0)
        if "steps" not in plan:
            # Timing: the first block compiles; the second is the steady ms/step.
            t0 = time.perf_counter()
            md = runner.advance(md, STEPS_PER_FRAME)
            first_block = time.perf_counter() - t0
            emit(first_block)
            runner.save_checkpoint(md, ckpt)
            t0 = time.perf_counter()
            md = runner.advance(md, STEPS_PER_FRAME)
            ms = 1000.0 * (time.perf_counter() - t0) / STEPS_PER_FRAME
            emit(time.perf_counter() - t0)
            runner.save_checkpoint(md, ckpt)
            left = budget_s - (time.perf_counter() - t_setup)
            fit = int(md.step + max(left, 0.0) * 1000.0 / ms / 1.05)  # 5 % for observables and I/O
            target = steps if steps else 7000
            chosen = max(md.step, min(target, fit) // STEPS_PER_FRAME * STEPS_PER_FRAME)
            plan = {"ms_per_step": ms, "steps": chosen, "simulated_ps": chosen * TIMESTEP_FS / 1000.0,
                    "target_steps": target, "budget_s": budget_s,
                    "first_block_incl_compile_s": first_block, "thermostat": "nose-hoover tau 100 fs",
                    "temperature_K": TEMPERATURE_K,
                    "timestep_fs": TIMESTEP_FS, "dtype": "float32", "frame_every_steps": STEPS_PER_FRAME}
            write_json(plan_path, plan)
            log(f"md: {ms:.1f} ms/step (416 atoms, float32) -> {chosen} steps = {plan['simulated_ps']:.2f} ps "
                f"(target {target}, budget {budget_s / 60:.1f} min)")
        last = time.perf_counter()
        while md.step < plan["steps"]:
            md = runner.advance(md, STEPS_PER_FRAME)
            now = time.perf_counter()
            row = emit(now - last)
            last = now
            runner.save_checkpoint(md, ckpt)
            if md.step % (10 * STEPS_PER_FRAME) == 0 or quick:
                log(f"md: step {md.step}/{plan['steps']} T {row['temperature_K']:.0f} K, E_tot "
                    f"{row['total_eV']:.3f} eV, conserved {row['conserved_eV']:.3f} eV, |F|max "
                    f"{row['max_force_eV_A']:.2f} eV/Å")
    finally:
        fh.close()
    plan["run_wall_s"] = plan.get("run_wall_s", 0.0) + time.perf_counter() - started
    write_json(plan_path, plan)
    return plan


def stage_md(args: argparse.Namespace) -> None:
    from geodite_jax import Potential

    md_dir = args.work / "md"
    plan_path = md_dir / "plan.json"
    if plan_path.exists() and (md_dir / "checkpoint.npz").exists():
        plan = json.loads(plan_path.read_text())
        if "run_wall_s" in plan and _last_step(md_dir / "thermo.csv") >= plan["steps"]:
            log(f"md: {md_dir} holds a finished run of {plan['steps']} steps; skipped")
            return
    potential = Potential.load(args.potential or args.out / "potential")
    atoms = mda.read_xdatcar(xdatcar(START_RUN, args.data), index=0)
    steps = 150 if args.quick else args.steps
    plan = run_md(potential, atoms, md_dir, steps, 60.0 * args.md_minutes, quick=args.quick)
    shutil.copy(md_dir / "thermo.csv", args.out / "md_thermo.csv")
    write_json(args.out / "md_plan.json", plan)


def _last_step(thermo: Path) -> int:
    if not thermo.exists():
        return -1
    rows = list(csv.DictReader(thermo.open()))
    return int(rows[-1]["step"]) if rows else -1


# ============================================================================================ analyse
def _after_equilibration(frames: list, frame_ps: float, equilibration_ps: float) -> list:
    skip = int(round(equilibration_ps / frame_ps))
    if len(frames) - skip < 3:
        raise ValueError(f"only {len(frames)} frames: fewer than 3 left after discarding {equilibration_ps} ps")
    return frames[skip:]


def analyse(ours: list, thermo: list[dict[str, float]], references: dict[str, list], out: Path,
            extra_summary: dict[str, Any] | None = None, plots: bool = True,
            equilibration_ps: float = EQUILIBRATION_PS) -> dict[str, Any]:
    """RDF overlaps, Li MSD/D and stability of ``ours`` (frames from t = 0, times in ``thermo``) against the
    AIMD ``references`` ({run: frames every 0.1 ps}, the start run first), the first ``equilibration_ps``
    discarded in all; writes tables and plots into ``out``; returns the summary."""
    from geodite_jax.benchmarks import environment_summary

    out.mkdir(parents=True, exist_ok=True)
    t_ours = np.array([float(r["time_ps"]) for r in thermo])
    frame_ps = float(np.median(np.diff(t_ours))) if len(t_ours) > 1 else FRAME_PS
    ours_eq = _after_equilibration(ours, frame_ps, equilibration_ps)
    refs_eq = {run: _after_equilibration(frames, FRAME_PS, equilibration_ps) for run, frames in references.items()}
    start = next(iter(references))
    others = [r for r in references if r != start]
    pooled = [a for frames in refs_eq.values() for a in frames]

    # ------------------------------------------------------------------------------------- RDFs
    g_ours = mda.rdf(ours_eq, ALL_PAIRS)
    g_start = mda.rdf(refs_eq[start], ALL_PAIRS)
    g_pool = mda.rdf(pooled, ALL_PAIRS)
    g_others = mda.rdf([a for r in others for a in refs_eq[r]], ALL_PAIRS) if others else None
    # The same AIMD run cut to our number of analysed frames: the noise floor at our sampling.
    g_start_short = mda.rdf(refs_eq[start][:len(ours_eq)], ALL_PAIRS)
    rows = []
    for pair in ["total", *g_ours.partial]:
        row = {"pair": pair, f"overlap_vs_{start}": mda.rdf_overlap(g_start.get(pair), g_ours.get(pair), g_ours.edges),
               "overlap_vs_pooled": mda.rdf_overlap(g_pool.get(pair), g_ours.get(pair), g_ours.edges)}
        if g_others is not None:  # the AIMD's own run-to-run noise floor, full length and at our length
            row[f"aimd_{start}_vs_other_runs"] = mda.rdf_overlap(g_others.get(pair), g_start.get(pair), g_ours.edges)
            row[f"aimd_{start}_{len(ours_eq)}_frames_vs_other_runs"] = mda.rdf_overlap(
                g_others.get(pair), g_start_short.get(pair), g_ours.edges)
        row["headline"] = pair in HEADLINE_PAIRS
        rows.append(row)
    rdf_cols = ["pair", f"overlap_vs_{start}", "overlap_vs_pooled"] + (
        [f"aimd_{start}_vs_other_runs", f"aimd_{start}_{len(ours_eq)}_frames_vs_other_runs"]
        if g_others is not None else []) + ["headline"]

    # -------------------------------------------------------------------------------------- MSD
    def li_msd(frames: list, dt: float) -> tuple[np.ndarray, np.ndarray]:
        m = mda.msd_by_species(frames, dt)
        return m.t_ps, m.per_species["Li"]

    t_o, msd_o = li_msd(ours_eq, frame_ps)
    t_s, msd_s = li_msd(refs_eq[start], FRAME_PS)
    ref_msds = [li_msd(f, FRAME_PS)[1] for f in refs_eq.values()]
    n_common = min(len(m) for m in ref_msds)
    msd_p = np.mean([m[:n_common] for m in ref_msds], axis=0)
    t_p = t_s[:n_common]
    fit_hi = min(t_o[-1], t_p[-1])
    fit_lo = min(1.0, fit_hi / 3.0)  # skip the ballistic/caging part (the first ps) when the run allows
    window = (fit_lo, fit_hi)
    d_o = mda.diffusivity(t_o, msd_o, window)
    d_s = mda.diffusivity(t_s, msd_s, window)
    d_p = mda.diffusivity(t_p, msd_p, window)

    # -------------------------------------------------------------------------------- stability
    energy = np.array([float(r["total_eV"]) for r in thermo])
    conserved = np.array([float(r["conserved_eV"]) for r in thermo])
    temps = np.array([float(r["temperature_K"]) for r in thermo])
    stab = mda.stability_report(ours, t_ours, energy, temps, conserved_energy=conserved)
    stab_ref = mda.stability_report(references[start], np.arange(len(references[start])) * FRAME_PS)
    eq = t_ours >= equilibration_ps

    headline = {r["pair"]: r for r in rows}
    summary: dict[str, Any] = {
        **(extra_summary or {}),
        "simulated_ps": float(t_ours[-1]), "frames_analysed_ours": len(ours_eq),
        "frames_analysed_aimd_start_run": len(refs_eq[start]), "aimd_runs_pooled": len(references),
        "equilibration_discarded_ps": equilibration_ps,
        **{f"rdf_overlap_{p}_vs_{start}": headline[p][f"overlap_vs_{start}"] for p in HEADLINE_PAIRS},
        **{f"rdf_overlap_{p}_vs_pooled": headline[p]["overlap_vs_pooled"] for p in HEADLINE_PAIRS},
        "min_headline_overlap_vs_pooled": min(headline[p]["overlap_vs_pooled"] for p in HEADLINE_PAIRS),
        **({f"noise_floor_total_{len(ours_eq)}_frames": headline["total"][
            f"aimd_{start}_{len(ours_eq)}_frames_vs_other_runs"]} if g_others is not None else {}),
        "D_Li_ours_cm2_s": d_o.D_cm2_s, f"D_Li_aimd_{start}_cm2_s": d_s.D_cm2_s,
        "D_Li_aimd_pooled_cm2_s": d_p.D_cm2_s, "D_fit_window_ps": f"{window[0]:.2f}-{window[1]:.2f}",
        "stable": stab.stable, "energy_drift_meV_atom_ps": stab.energy_drift_meV_atom_ps,
        "conserved_drift_meV_atom_ps": stab.conserved_drift_meV_atom_ps,
        "temperature_mean_K_after_equilibration": float(temps[eq].mean()) if eq.any() else float("nan"),
        "temperature_std_K_after_equilibration": float(temps[eq].std()) if eq.any() else float("nan"),
        "max_force_eV_A": float(max(float(r["max_force_eV_A"]) for r in thermo)),
        "min_distance_A": stab.min_distance_A, f"min_distance_A_aimd_{start}": stab_ref.min_distance_A,
        "max_step_per_frame_A": stab.max_step_A, f"max_step_per_frame_A_aimd_{start}": stab_ref.max_step_A,
        "too_close_frames": len(stab.too_close_frames), "jumping_atoms": len(stab.jumping_atoms),
        "isolated_atoms": len(stab.isolated_atoms),
    }
    env = environment_summary()
    summary.update({f"env_{k}": v for k, v in env.items()})
    notes = [f"RDF overlap = 1 − rdf_error/100, rdf_error = 100·min(1, ∫|g_ref − g_pred| dr / ∫|g_ref − 1| dr), "
             f"500 bins to {g_ours.edges[-1]:.3f} Å (half the shortest perpendicular cell width); first "
             f"{equilibration_ps} ps discarded in every trajectory.",
             f"'pooled' = the {len(references)} AIMD runs {', '.join(references)} together; "
             f"'aimd_{start}_vs_other_runs' compares the AIMD start run with the other runs (the noise floor); "
             f"'..._{len(ours_eq)}_frames_...' uses only its first {len(ours_eq)} analysed frames, as many as ours.",
             "D from a linear fit of the Li MSD (time-origin averaged, centre-of-mass drift removed) over the "
             "stated window, D = slope / 6."]
    write_tables(out, "argyrodite_rdf", summary, rows, rdf_cols, "Li6PS5Cl 500 K: RDF overlap, Geodite vs AIMD",
                 notes)
    write_json(out / "argyrodite_stability.json", {"ours": stab.summary(), f"aimd_{start}": stab_ref.summary()})
    np.savez(out / "argyrodite_curves.npz", r=g_ours.r, **{f"g_ours_{k}": g_ours.get(k) for k in rows_pairs(rows)},
             **{f"g_start_{k}": g_start.get(k) for k in rows_pairs(rows)},
             **{f"g_pooled_{k}": g_pool.get(k) for k in rows_pairs(rows)},
             t_ours=t_o, msd_li_ours=msd_o, t_aimd=t_p, msd_li_aimd_pooled=msd_p, msd_li_aimd_start=msd_s[:n_common])
    if plots:
        _plots(out, g_ours, g_start, g_pool, start, (t_o, msd_o, d_o), (t_s, msd_s, d_s), (t_p, msd_p, d_p),
               thermo)
    return summary


def rows_pairs(rows: list[dict[str, Any]]) -> list[str]:
    return [r["pair"] for r in rows]


def _plots(out: Path, g_ours: Any, g_start: Any, g_pool: Any, start: str, ours: tuple, aimd: tuple, pooled: tuple,
           thermo: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(HEADLINE_PAIRS), 1, figsize=(6.5, 2.1 * len(HEADLINE_PAIRS)), sharex=True)
    for ax, pair in zip(axes, HEADLINE_PAIRS, strict=True):
        ax.plot(g_pool.r, g_pool.get(pair), color="0.6", lw=2.5, label="AIMD 0p pooled")
        ax.plot(g_start.r, g_start.get(pair), color="k", lw=1, label=f"AIMD {start}")
        ax.plot(g_ours.r, g_ours.get(pair), color="C3", lw=1, ls="--", label="Geodite (jax-md)")
        ax.set_ylabel(f"g(r) {pair}")
        ov = mda.rdf_overlap(g_pool.get(pair), g_ours.get(pair), g_ours.edges)
        ax.text(0.98, 0.85, f"overlap vs pooled {ov:.3f}", transform=ax.transAxes, ha="right", fontsize=8)
    axes[0].legend(fontsize=8, loc="center right")
    axes[-1].set_xlabel("r (Å)")
    fig.tight_layout()
    fig.savefig(out / "argyrodite_rdf.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for (t, m, d), label, style in ((pooled, "AIMD 0p pooled", dict(color="0.6", lw=2.5)),
                                    (aimd, f"AIMD {start}", dict(color="k", lw=1)),
                                    (ours, "Geodite (jax-md)", dict(color="C3", lw=1.2, ls="--"))):
        ax.plot(t, m, label=f"{label}: D = {d.D_cm2_s:.2e} cm²/s", **style)
    lo, hi = ours[2].window_ps
    ax.axvspan(lo, hi, color="C0", alpha=0.07, label="fit window")
    ax.set_xlabel("lag t (ps)")
    ax.set_ylabel("Li MSD (Å²)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "argyrodite_msd.png", dpi=120)
    plt.close(fig)

    t = np.array([float(r["time_ps"]) for r in thermo])
    n = 416
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6.5, 5), sharex=True)
    a1.plot(t, [float(r["temperature_K"]) for r in thermo], color="C0")
    a1.axhline(TEMPERATURE_K, color="k", lw=0.8, ls=":")
    a1.set_ylabel("T (K)")
    for key, label in (("total_eV", "E_pot + E_kin"), ("conserved_eV", "Nose-Hoover invariant"),
                       ("potential_eV", "E_pot")):
        e = np.array([float(r[key]) for r in thermo])
        a2.plot(t, 1000 * (e - e[0]) / n, label=label)
    a2.set_ylabel("E − E(0) (meV/atom)")
    a2.set_xlabel("t (ps)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "argyrodite_thermo.png", dpi=120)
    plt.close(fig)


def stage_analyse(args: argparse.Namespace) -> None:
    from ase.io import read

    md_dir = args.work / "md"
    traj = md_dir / "traj.extxyz"
    if not traj.exists():
        raise FileNotFoundError(f"no MD trajectory at {traj}: run the md stage first")
    ours = read(traj, index=":")
    thermo = list(csv.DictReader((md_dir / "thermo.csv").open()))
    if len(ours) != len(thermo):
        raise ValueError(f"{traj} has {len(ours)} frames but thermo.csv {len(thermo)} rows")
    runs = REFERENCE_RUNS[:2] if args.quick else REFERENCE_RUNS
    references = {run: mda.read_xdatcar(xdatcar(run, args.data)) for run in runs}
    extra: dict[str, Any] = {}
    for name, key in (("labels.json", "label"), ("md_plan.json", "md"), ("train_summary.json", "train")):
        path = args.out / name
        if path.exists():
            data = json.loads(path.read_text())
            if key == "label":
                extra.update(sevennet_s_per_frame=data.get("seconds_per_frame"), n_train_frames=data.get("n_train"),
                             n_test_frames=data.get("n_test"))
            elif key == "md":
                extra.update(md_ms_per_step=data.get("ms_per_step"), md_steps=data.get("steps"),
                             md_wall_s=data.get("run_wall_s"))
            else:
                m = (data.get("test_metrics") or {}).get("all", {})
                extra.update(train_steps=data.get("steps"), train_minutes=data.get("wall_seconds", 0) / 60,
                             test_E_mae_meV_atom=m.get("energy_mae", float("nan")),  # already meV / GPa
                             test_F_mae_meV_A=m.get("forces_mae", float("nan")),
                             test_S_mae_GPa=m.get("stress_mae", float("nan")))
    summary = analyse(ours, thermo, references, args.out, extra,
                      equilibration_ps=0.0 if args.quick else EQUILIBRATION_PS)
    log("analyse: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                                if not k.startswith("env_")))


# =============================================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    today = datetime.date.today().isoformat()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--out", type=Path, default=None, help="small results (default experiments/results/"
                                                          "argyrodite_<date>[_quick])")
    p.add_argument("--work", type=Path, default=None, help="big files (default runs/argyrodite_<date>[_quick])")
    p.add_argument("--data", type=Path, default=None, help=f"the {DATA_NAME} folder (default shared data)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "argyrodite.yaml")
    p.add_argument("--potential", type=Path, default=None, help="saved potential for the MD (default <out>/potential)")
    p.add_argument("--label-minutes", type=float, default=8.0)
    p.add_argument("--train-minutes", type=float, default=None, help="override the recipe's max_minutes")
    p.add_argument("--md-minutes", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=7000, help="MD length cap (the AIMD's 14 ps)")
    p.add_argument("--quick", action="store_true", help="shrink every stage for a smoke run")
    args = p.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    args.out = args.out or REPO / "experiments" / "results" / f"argyrodite_{today}{suffix}"
    args.work = args.work or REPO / "runs" / f"argyrodite_{today}{suffix}"
    if args.quick:
        args.label_minutes = min(args.label_minutes, 1.0)
        args.md_minutes = min(args.md_minutes, 2.0)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        p.error(f"unknown stage(s) {bad}; choose from {','.join(STAGES)}")
    args.stage_list = [s for s in STAGES if s in stages]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    log(f"stages {','.join(args.stage_list)}; results -> {args.out}; big files -> {args.work}")
    runners = {"label": stage_label, "train": stage_train, "md": stage_md, "analyse": stage_analyse}
    for stage in args.stage_list:
        t0 = time.perf_counter()
        runners[stage](args)
        log(f"{stage}: done in {time.perf_counter() - t0:.0f} s")
    for path in sorted(args.out.iterdir()):
        log(f"artefact: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
