"""CPU speed benchmark: geodite_jax beside Nequix and MACE, one fresh process per run.

Usage (from the repository root, with the project's python)::

    bash experiments/peers/setup_envs.sh        # once: the peers' virtualenvs
    python experiments/bench_speed.py           # full run (many minutes, both cores)
    python experiments/bench_speed.py --quick --structures nacl   # 3 timed calls, smoke run

Each (model, structure) pair runs in its own child process, one after the other (never two at
once): ``experiments/geodite_worker.py`` for our model (project python) and
``experiments/peers/peer_worker.py`` inside ``experiments/.venvs/<peer>`` for the peers. Every
child times ``calc.calculate(atoms, ["energy", "forces", "stress"], ["positions"])`` by the
protocol of ``experiments/bench_common.py``. The orchestrator writes the structures once to
``experiments/results/structures/``, prints a Markdown table and writes
``experiments/results/bench_speed_<UTC date>.json`` and ``.md``. It also quotes, as constant
rows, the reference (PyTorch) implementation's own CPU timings from
``../shared/data/geodite-reference/SOURCE.md`` (same machine kind, not measured in the run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXP_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXP_DIR.parent
RESULTS_DIR = EXP_DIR / "results"
STRUCT_DIR = RESULTS_DIR / "structures"
VENV_DIR = EXP_DIR / ".venvs"
PEER_WORKER = EXP_DIR / "peers" / "peer_worker.py"
GEODITE_WORKER = EXP_DIR / "geodite_worker.py"
REFERENCE_SOURCE = REPO_ROOT.parent / "shared" / "data" / "geodite-reference" / "SOURCE.md"
NOT_INSTALLED = "not installed (run experiments/peers/setup_envs.sh)"
#: Other processes keeping more cores than this busy during a timed loop mark a run contended.
CONTENDED_CORES = 0.25

sys.path.insert(0, str(EXP_DIR))
import bench_common as bc  # noqa: E402


@dataclass(frozen=True)
class StructureSpec:
    """A rattled bulk supercell (ASE ``bulk(..., cubic=True).repeat(n)``)."""

    key: str
    label: str
    symbol: str
    crystal: str
    a: float
    repeat: int


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: ours (project python) or a peer (its own venv)."""

    key: str
    label: str
    kind: str  # "geodite" or "peer"
    worker_args: tuple[str, ...] = ()
    venv: str = ""


STRUCTURES: dict[str, StructureSpec] = {
    s.key: s
    for s in (
        StructureSpec("nacl", "NaCl rocksalt 3x3x3", "NaCl", "rocksalt", 5.64, 3),
        StructureSpec("cu", "Cu fcc 4x4x4", "Cu", "fcc", 3.61, 4),
        StructureSpec("si", "Si diamond 5x5x5", "Si", "diamond", 5.431, 5),
        StructureSpec("si8", "Si diamond 8x8x8", "Si", "diamond", 5.431, 8),
    )
}
RATTLE_STDEV = 0.05
RATTLE_SEED = 42

MODELS: dict[str, ModelSpec] = {
    m.key: m
    for m in (
        ModelSpec(
            "geodite32",
            "geodite_jax mp f32",
            "geodite",
            ("--preset", "mp", "--dtype", "float32"),
        ),
        ModelSpec(
            "geodite64",
            "geodite_jax mp f64",
            "geodite",
            ("--preset", "mp", "--dtype", "float64"),
        ),
        ModelSpec(
            "nequix",
            "Nequix-MP-1 arch (JAX, f32)",
            "peer",
            ("--model", "nequix"),
            "nequix",
        ),
        ModelSpec("mace", "MACE-MP-0 medium arch (f32)", "peer", ("--model", "mace"), "mace"),
        ModelSpec(
            "mace64",
            "MACE-MP-0 medium arch (f64)",
            "peer",
            ("--model", "mace64"),
            "mace",
        ),
    )
}
DEFAULT_MODELS = ("geodite32", "geodite64", "nequix", "mace")


# ----------------------------------------------------------------------------- structures


def build_structure(spec: StructureSpec) -> Any:
    """The rattled supercell of ``spec`` (deterministic)."""
    from ase.build import bulk

    atoms = bulk(spec.symbol, spec.crystal, a=spec.a, cubic=True).repeat(spec.repeat)
    atoms.rattle(stdev=RATTLE_STDEV, seed=RATTLE_SEED)
    atoms.info["name"] = spec.key
    atoms.info["note"] = f"{spec.label}, a={spec.a}, rattle stdev {RATTLE_STDEV} seed {RATTLE_SEED}"
    return atoms


def write_structures(keys: list[str]) -> dict[str, Path]:
    """Write each structure once to ``results/structures/<key>.extxyz`` (rewritten if it differs)."""
    import numpy as np
    from ase.io import read, write

    STRUCT_DIR.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key in keys:
        atoms = build_structure(STRUCTURES[key])
        path = STRUCT_DIR / f"{key}.extxyz"
        same = False
        if path.exists():
            old = read(str(path), format="extxyz")
            same = (
                len(old) == len(atoms)
                and np.array_equal(old.numbers, atoms.numbers)
                and np.allclose(old.positions, atoms.positions, atol=1e-10)
                and np.allclose(old.cell[:], atoms.cell[:], atol=1e-10)
            )
        if not same:
            write(str(path), atoms, format="extxyz")
        paths[key] = path
    return paths


# ----------------------------------------------------------------------------- running children


#: glibc settings applied to every child (ours and the peers alike) with ``--malloc thp``: transparent huge
#: pages for large allocations. XLA:CPU allocates its multi-GB temporary buffer afresh on every call, and
#: with 4 KiB pages the page faults alone cost up to a third of an evaluation.
MALLOC_ENV = {"thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "default": {}}
_MALLOC = "default"


def child_env(spec: ModelSpec) -> dict[str, str]:
    """Environment of a child: both cores, and no leakage of the project's path into a peer venv."""
    env = dict(os.environ)
    env.update(bc.THREAD_ENV)
    env.update(MALLOC_ENV[_MALLOC])
    env["PYTHONUNBUFFERED"] = "1"
    if spec.kind == "peer":
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        env["VIRTUAL_ENV"] = str(VENV_DIR / spec.venv)
    else:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def rss_bytes(pid: int) -> int:
    """Current resident set size of ``pid`` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_available_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo (0 if unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_idle(max_wait_s: float, threshold: float = CONTENDED_CORES) -> tuple[float, float | None]:
    """Wait (at most ``max_wait_s``) until the machine keeps < ``threshold`` cores busy over 3 s.

    Returns (seconds waited, busy cores last seen). Another user's job on the same 2 cores
    would otherwise inflate the timings.
    """
    t0 = time.perf_counter()
    busy: float | None = None
    while True:
        a = bc.machine_cpu_ticks()
        time.sleep(3.0)
        busy = bc.machine_busy_cores(a, bc.machine_cpu_ticks())
        waited = time.perf_counter() - t0
        if busy is None or busy < threshold or waited >= max_wait_s:
            return waited, busy


@dataclass
class RunResult:
    """Outcome of one child: its JSON record, or why there is none."""

    model: str
    structure: str
    status: str  # "ok" or a short reason
    record: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    log: str = ""


def run_child(
    spec: ModelSpec,
    structure: str,
    struct_path: Path,
    args: argparse.Namespace,
    log_path: Path,
) -> RunResult:
    """Run one (model, structure) child with a timeout and an RSS guard; parse its record."""
    if spec.kind == "peer":
        python = VENV_DIR / spec.venv / "bin" / "python"
        if not python.exists():
            return RunResult(spec.key, structure, NOT_INSTALLED)
        script = PEER_WORKER
    else:
        python, script = Path(sys.executable), GEODITE_WORKER
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        cmd = [
            str(python),
            str(script),
            *spec.worker_args,
            "--structure",
            str(struct_path),
            "--out",
            str(out),
        ]
        if args.quick:
            cmd += ["--max-calls", "3"]
        t0 = time.perf_counter()
        status = "ok"
        peak = 0
        with open(log_path, "w") as log_fh:
            log_fh.write("$ " + " ".join(cmd) + "\n")
            log_fh.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=child_env(spec),
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                while proc.poll() is None:
                    rss = rss_bytes(proc.pid)
                    peak = max(peak, rss)
                    elapsed = time.perf_counter() - t0
                    if elapsed > args.timeout:
                        status = f"timeout after {args.timeout:.0f} s"
                    elif rss > args.max_rss_gb * 1e9:
                        status = f"killed: RSS {rss / 1e9:.1f} GB > limit {args.max_rss_gb:.1f} GB"
                    if status != "ok":
                        break
                    time.sleep(0.25)
            finally:  # a limit was hit, or the orchestrator itself is interrupted
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)  # the child's own session, started above
                    proc.wait()
        wall = time.perf_counter() - t0
        text = log_path.read_text(errors="replace")
        if status == "ok":
            if proc.returncode != 0 or not out.exists():
                last = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or [""]
                sig = f" (signal {-proc.returncode})" if proc.returncode < 0 else ""
                status = f"failed rc={proc.returncode}{sig}: {last[0][:160]}"
            else:
                rec = json.loads(out.read_text())
                rec["observed_peak_rss_gb"] = peak / 1e9
                return RunResult(spec.key, structure, "ok", rec, wall, text)
        return RunResult(
            spec.key,
            structure,
            status,
            {"observed_peak_rss_gb": peak / 1e9},
            wall,
            text,
        )


# ----------------------------------------------------------------------------- reference rows


def _numbers(cell: str) -> list[float]:
    """All numbers in a Markdown cell (thousands separators removed)."""
    return [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", cell)]


def read_reference_rows(
    path: Path = REFERENCE_SOURCE,
) -> tuple[list[dict[str, Any]], str]:
    """Eager and compiled rows of SOURCE.md's "Speed of the reference implementation" table."""
    if not path.exists():
        return [], f"reference rows skipped: {path} not found"
    lines = path.read_text().splitlines()
    start = next(
        (i for i, ln in enumerate(lines) if ln.startswith("## Speed of the reference")),
        None,
    )
    if start is None:
        return (
            [],
            f"reference rows skipped: no 'Speed of the reference implementation' section in {path}",
        )
    table = []
    for ln in lines[start + 1 :]:
        if ln.startswith("## "):
            break
        if ln.startswith("|"):
            table.append([c.strip() for c in ln.strip().strip("|").split("|")])
        elif table:
            break
    if len(table) < 3:
        return [], f"reference rows skipped: no table under the speed section of {path}"
    header = [h.lower() for h in table[0]]

    def col(*words: str) -> int:
        return next(i for i, h in enumerate(header) if all(w in h for w in words))

    try:
        c_struct, c_atoms, c_edges = col("structure"), col("atoms"), col("edges")
        c_eager, c_comp = col("eager", "median"), col("compiled", "median")
        c_first, c_rss = col("first call"), col("peak rss")
    except StopIteration:
        return [], f"reference rows skipped: unexpected table header in {path}"
    rss_unit = 2**20 if "mib" in header[c_rss] else 1e9
    name_to_key = {"cu": "cu", "nacl": "nacl", "si": "si"}
    rows: list[dict[str, Any]] = []
    for cells in table[2:]:
        key = name_to_key.get(cells[c_struct].split()[0].lower())
        if key is None:
            continue
        first = _numbers(cells[c_first])
        rss = _numbers(cells[c_rss])
        for j, (mode, c_med) in enumerate((("eager", c_eager), ("compiled", c_comp))):
            med = _numbers(cells[c_med])
            rows.append(
                {
                    "model": f"ref_{mode}",
                    "label": f"reference Geodite-MP, torch {mode} (SOURCE.md, not measured here)",
                    "structure": key,
                    "n_atoms": int(_numbers(cells[c_atoms])[0]),
                    "n_edges": int(_numbers(cells[c_edges])[0]),
                    "median_s": med[0],
                    "min_s": med[1] if len(med) > 2 else None,
                    "max_s": med[2] if len(med) > 2 else None,
                    "first_call_s": first[j] if len(first) > j else None,
                    "peak_rss_gb": rss[j] * rss_unit / 1e9 if len(rss) > j else None,
                    "source": str(path),
                }
            )
    machine = "Machine: not stated"
    m_start = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("Machine:")), None)
    if m_start is not None:  # the first sentence of the "Machine:" paragraph
        para = []
        for ln in lines[m_start:]:
            if not ln.strip():
                break
            para.append(ln.strip())
        machine = " ".join(para).split(". ")[0]
    note = (
        f"reference rows: from {path} (its 'Speed of the reference implementation' table: float32, "
        "median of 7 timed calls; Si there has a = 5.43 A, here 5.431 A); same machine kind (2 vCPU), "
        f"not measured in this run; its {machine.rstrip('.')}"
    )
    return rows, note


# ----------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory and OS of this machine."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    for ln in out.splitlines():
        key, _, value = ln.partition(":")
        key = key.strip()
        if key in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket"):
            info[key] = value.strip()
        elif key == "Flags":
            info["avx512f"] = "avx512f" in value.split()
    try:
        with open("/proc/meminfo") as fh:
            info["mem_total_gb"] = int(fh.readline().split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return info


def orchestrator_versions() -> dict[str, str]:
    """Versions in the project's environment (the geodite rows' interpreter)."""
    vers = bc.package_versions(["jax", "jaxlib", "flax", "numpy", "ase", "geodite_jax"])
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        )
        vers["repo_git"] = rev.stdout.strip() or "no commit"
    except OSError:
        vers["repo_git"] = "unknown"
    return vers


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def ratios_for(rec: dict[str, Any], others: list[dict[str, Any]]) -> tuple[str, str, dict[str, Any]]:
    """Speed-up (other median / ours) and memory ratio (other peak RSS / ours) over each other row."""
    speed, mem, out = [], [], {}
    for o in others:
        if o.get("median_s") is None:
            continue
        s = o["median_s"] / rec["median_s"]
        m = (o["peak_rss_gb"] / rec["peak_rss_gb"]) if o.get("peak_rss_gb") and rec.get("peak_rss_gb") else None
        out[o["model"]] = {"speedup": s, "memory_ratio": m}
        speed.append(f"{o['model']} {s:.2f}x")
        mem.append(f"{o['model']} {_f(m, '.2f')}x")
    return ", ".join(speed) or "-", ", ".join(mem) or "-", out


def make_tables(
    results: list[RunResult], ref_rows: list[dict[str, Any]], structures: list[str]
) -> tuple[str, dict[str, Any]]:
    """The main Markdown table (plus a details table) and the ratio dictionary."""
    head = (
        "| model | structure | atoms | edges (6 A) | median s/eval | us/atom/step | us/edge | first call s | "
        "peak RSS GB | speed-up (other median / ours) | memory (other RSS / ours) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows, all_ratios = [], {}
    for s in structures:
        ok = [r.record | {"model": r.model} for r in results if r.structure == s and r.status == "ok"]
        others = [r for r in ok if MODELS[r["model"]].kind == "peer"] + [r for r in ref_rows if r["structure"] == s]
        for r in results:
            if r.structure != s:
                continue
            label = MODELS[r.model].label
            if r.status != "ok":
                rows.append(f"| {label} | {s} | | | **{r.status}** | | | | | | |")
                continue
            rec = r.record
            other = rec.get("other_busy_cores")
            flag = " (contended)" if other is not None and other > CONTENDED_CORES else ""
            sp, me = "", ""
            if MODELS[r.model].kind == "geodite":
                sp, me, all_ratios[f"{r.model}/{s}"] = ratios_for(rec, others)
            rows.append(
                f"| {label} | {s} | {rec['n_atoms']} | {rec['n_edges']} | **{rec['median_s']:.4f}**{flag} | "
                f"{rec['us_per_atom_step']:.0f} | {_f(rec.get('us_per_edge'), '.1f')} | {rec['first_call_s']:.2f} | "
                f"{rec['peak_rss_gb']:.2f} | {sp} | {me} |"
            )
        for ref in (r for r in ref_rows if r["structure"] == s):
            rows.append(
                f"| {ref['label']} | {s} | {ref['n_atoms']} | {ref['n_edges']} | {ref['median_s']:.2f} | "
                f"{ref['median_s'] / ref['n_atoms'] * 1e6:.0f} | {ref['median_s'] / ref['n_edges'] * 1e6:.1f} | "
                f"{_f(ref['first_call_s'], '.2f')} | {_f(ref['peak_rss_gb'], '.2f')} | | |"
            )
    details = [
        "| model | structure | params | build s | timed calls | min-max s | busy cores "
        "| other busy cores | energy eV | finite | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.status != "ok":
            continue
        rec = r.record
        details.append(
            f"| {MODELS[r.model].label} | {r.structure} | {rec['n_params']:,} | {rec['build_s']:.1f} | "
            f"{rec['n_timed']} | {rec['min_s']:.4f}-{rec['max_s']:.4f} | {rec['busy_cores']:.2f} | "
            f"{_f(rec.get('other_busy_cores'), '.2f')} | {rec['energy_eV']:.4f} | {rec['finite']} | {r.wall_s:.0f} |"
        )
    return head + "\n".join(rows) + "\n\n" + "\n".join(details) + "\n", all_ratios


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every (structure, model) child in turn, write the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma list of {', '.join(MODELS)}",
    )
    ap.add_argument(
        "--structures",
        default=",".join(STRUCTURES),
        help=f"comma list of {', '.join(STRUCTURES)}",
    )
    ap.add_argument("--quick", action="store_true", help="3 timed calls per run (smoke run)")
    ap.add_argument("--malloc", choices=sorted(MALLOC_ENV), default="default",
                    help="glibc allocator settings for every child: 'thp' = huge pages for large allocations")
    ap.add_argument(
        "--skip-peers",
        action="store_true",
        help="run only our model (and quote the reference)",
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child (default 1800)")
    ap.add_argument(
        "--max-rss-gb",
        type=float,
        default=None,
        help="kill a child above this RSS (default 90%% of MemAvailable at start)",
    )
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=300.0,
        help="before each child wait up to this many s for the machine to be idle "
        f"(< {CONTENDED_CORES} busy cores; default 300, 0 = do not wait)",
    )
    ap.add_argument(
        "--out-stem",
        default=None,
        help="output name (default bench_speed_<UTC date>[_quick])",
    )
    args = ap.parse_args(argv)
    global _MALLOC
    _MALLOC = args.malloc

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    structures = [s.strip() for s in args.structures.split(",") if s.strip()]
    bad = [m for m in models if m not in MODELS] + [s for s in structures if s not in STRUCTURES]
    if bad:
        ap.error(f"unknown model/structure: {', '.join(bad)}")
    if args.skip_peers:
        models = [m for m in models if MODELS[m].kind != "peer"]
    if args.max_rss_gb is None:
        args.max_rss_gb = 0.9 * mem_available_bytes() / 1e9 or 20.0

    now = dt.datetime.now(dt.timezone.utc)
    stem = args.out_stem or f"bench_speed_{now:%Y-%m-%d}" + ("_quick" if args.quick else "")
    if args.malloc == "thp" and not stem.endswith("_thp"):  # never overwrite a default-allocator run's report
        stem += "_thp"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    paths = write_structures(structures)
    print(
        f"structures in {STRUCT_DIR}: {', '.join(p.name for p in paths.values())}",
        flush=True,
    )
    print(
        f"RSS limit per child {args.max_rss_gb:.1f} GB, timeout {args.timeout:.0f} s",
        flush=True,
    )

    results: list[RunResult] = []
    for s in structures:  # one child at a time: nothing overlaps
        for m in models:
            spec = MODELS[m]
            print(f"--- {spec.label} on {s} ...", flush=True)
            if args.wait_idle > 0:
                waited, busy = wait_idle(args.wait_idle)
                if busy is not None and busy >= CONTENDED_CORES:
                    print(f"    machine still busy ({busy:.2f} cores) after {waited:.0f} s; running anyway")
            log_path = RESULTS_DIR / f"{stem}_{m}_{s}.log"
            res = run_child(spec, s, paths[s], args, log_path)
            results.append(res)
            if res.status == "ok":
                rec = res.record
                other = rec.get("other_busy_cores")
                if other is not None and other > CONTENDED_CORES:
                    print(f"    WARNING: other processes kept {other:.2f} cores busy while timing")
                print(
                    f"    median {rec['median_s']:.4f} s ({rec['n_timed']} calls), first {rec['first_call_s']:.2f} s, "
                    f"peak RSS {rec['peak_rss_gb']:.2f} GB, {rec['n_params']:,} params, wall {res.wall_s:.0f} s",
                    flush=True,
                )
            else:
                print(f"    {res.status} (log: {log_path})", flush=True)

    ref_rows, ref_note = read_reference_rows()
    ref_rows = [r for r in ref_rows if r["structure"] in structures]
    table, ratios = make_tables(results, ref_rows, structures)
    machine = machine_info()
    versions: dict[str, Any] = {"orchestrator": orchestrator_versions()}
    for r in results:
        if r.status == "ok":
            versions.setdefault(r.model, r.record.get("versions", {}))
    notes = [
        (
            "median of up to 10 timed calc.calculate(atoms, energy/forces/stress) calls "
            "after the first call and 2 warm-ups, capped at 60 s (min 3); "
            "--quick: 3 timed calls"
        ),
        (
            "peers: random weights of the published architectures (speed does not "
            "depend on weight values); Nequix kernel=False, MACE without cuEquivariance"
        ),
        ("edges = directed pairs within 6 A (ASE neighbor_list); GB = 1e9 bytes; peak RSS = ru_maxrss of the child"),
        (
            "(contended): other processes kept more than "
            f"{CONTENDED_CORES} cores busy during the timed calls (/proc/stat); rerun those"
        ),
        ("speed-up = other's median / ours (>1: ours faster); memory = other's peak RSS / ours (>1: ours smaller)"),
        ref_note,
    ]
    header = (
        f"# Speed benchmark (CPU), {now:%Y-%m-%d %H:%M} UTC\n\n"
        f"Machine: {machine.get('Model name', '?')}, {machine.get('cpu_count')} CPUs, "
        f"{machine.get('mem_total_gb', 0):.1f} GB RAM, {machine.get('platform')}\n\n"
        + "".join(f"* {n}\n" for n in notes)
        + "\n"
    )
    vers_md = "\n## Versions\n\n```\n" + json.dumps(versions, indent=1) + "\n```\n"
    md = header + table + vers_md
    print("\n" + table)
    print(ref_note)
    report = {
        "date_utc": now.isoformat(timespec="seconds"),
        "machine": machine,
        "versions": versions,
        "settings": {
            "models": models,
            "structures": structures,
            "quick": args.quick,
            "malloc": {"mode": args.malloc, "env": MALLOC_ENV[args.malloc]},
            "timeout_s": args.timeout,
            "max_rss_gb": args.max_rss_gb,
            "wait_idle_s": args.wait_idle,
            "thread_env": bc.THREAD_ENV,
            "rattle": {"stdev": RATTLE_STDEV, "seed": RATTLE_SEED},
            "structure_specs": {k: STRUCTURES[k].__dict__ for k in structures},
        },
        "notes": notes,
        "runs": [
            {
                **r.record,
                "model": r.model,
                "structure": r.structure,
                "status": r.status,
                "wall_s": r.wall_s,
            }
            for r in results
        ],
        "reference_rows": ref_rows,
        "ratios": ratios,
    }
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS_DIR / f"{stem}.md").write_text(md)
    print(f"wrote {RESULTS_DIR / (stem + '.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
