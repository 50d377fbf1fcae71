"""Model-independent benchmark tools: Matbench Discovery metrics and relax driver, phonons and κ_SRME, diatomics,
trajectory analysis against reference MD (RDF overlap, MSD and diffusivity, stability: :mod:`.trajectory`).

Every metric is a pure NumPy function of predictions and references, re-implemented from the published
definitions (``../shared/docs/data_and_benchmarks.md`` §2) and unit-tested on hand-computed cases. The
drivers take any ASE calculator (normally :class:`geodite_jax.GeoditeCalculator`) so that peers can be run
through the same code; nothing here imports Geodite (its batched dimer curves are
:func:`geodite_jax.batched.dimer_curves`). Optional heavy dependencies (pymatgen, phonopy, phono3py,
matplotlib, tqdm) are imported inside the functions that need them.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

#: Environment variable that points at a ``shared/data`` folder (overrides the checkout-relative default).
SHARED_DATA_ENV = "GEODITE_SHARED_DATA"


def shared_data_dir() -> Path:
    """``$GEODITE_SHARED_DATA`` or ``<checkout>/../shared/data`` (may not exist: callers check)."""
    env = os.environ.get(SHARED_DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_file(*parts: str) -> Path:
    """A file under :func:`shared_data_dir`; ``FileNotFoundError`` naming the path and the override if absent."""
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"reference file {path} not found; pass its path explicitly or set "
                                f"{SHARED_DATA_ENV} to the folder holding the shared data")
    return path


def read_reference_json(path: str | os.PathLike | None, default: tuple[str, ...], what: str) -> tuple[Path, Any]:
    """``(path, JSON)`` of a reference file, plain or gzipped (``.gz``): ``path``, or the shared-data file
    ``default`` (:func:`shared_file`) when ``path`` is None; ``FileNotFoundError`` naming ``what`` and the path
    if absent."""
    path = Path(path) if path is not None else shared_file(*default)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found")
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
        return path, json.load(f)


def to_jsonable(value: Any) -> Any:
    """Plain JSON types: arrays to lists, NumPy scalars to Python, NaN/inf to ``None``."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def write_tables(out_dir: str | os.PathLike, name: str, summary: dict[str, Any], rows: list[dict[str, Any]],
                 columns: list[str], title: str, notes: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``<name>.json`` (summary + rows) and ``<name>.md`` (summary list + table of ``columns``).

    Floats are printed with 4 significant digits in Markdown; the JSON keeps full precision.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(to_jsonable({"summary": summary, "rows": rows}), indent=1))

    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "–" if not math.isfinite(float(v)) else f"{float(v):.4g}"
        return "–" if v is None else str(v)

    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {fmt(v)}" for k, v in summary.items() if not isinstance(v, (dict, list))]
    lines += [""] + [f"> {n}" for n in notes or []] + ([""] if notes else [])
    if rows:
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, json_path


def environment_summary() -> dict[str, str]:
    """Date, machine and library versions for the benchmark tables."""
    import datetime
    import platform

    import jax

    versions = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
                "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                "jax": jax.__version__, "devices": ", ".join(str(d) for d in jax.devices())}
    for name in ("geodite-jax", "phonopy", "phono3py", "pymatgen", "ase"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
