"""The run directory (``--out``): refuse or clear another run's outputs, keep the data cache, and cut the log
back to the checkpoint a run resumes from."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# Entries of a run directory that belong to no run: the preprocessed-data cache, keyed by the data files'
# content and the reading options. Everything else in ``--out`` is some run's output.
_SHARED_ENTRIES = ("data",)


def run_outputs(out: Path) -> list[str]:
    """Names of the entries of ``out`` that some run wrote (all but the data cache); [] if none."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in _SHARED_ENTRIES)


def prepare_run_directory(out: str | os.PathLike, resume: bool, overwrite: bool, clear: bool = True) -> None:
    """Refuse or clear a non-empty ``out`` for a new run.

    A new run (not ``resume``) needs an ``out`` without another run's outputs, or ``overwrite``: the old
    outputs are then moved aside in one rename (the data cache is kept) and deleted, so nothing of the old
    run (best/, checkpoints, logs, error tables) can be taken for the new one's. ``clear=False`` only checks.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; give a directory for the run")
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    found = [] if resume else run_outputs(out)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise ValueError(f"--out {out} already holds a run ({shown}); pass --resume to continue it, --overwrite "
                         "to delete it and start afresh, or another --out")
    if not clear:
        return
    out = out.absolute()
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.overwritten-", dir=out.parent))
    os.replace(out, trash / "run")  # one rename: the old run is gone from --out at once
    out.mkdir()
    for name in _SHARED_ENTRIES:
        if (trash / "run" / name).exists():
            os.replace(trash / "run" / name, out / name)
    shutil.rmtree(trash, ignore_errors=True)


def truncate_log(log_file: Path, step: int) -> None:
    """Keep the records of ``log_file`` up to ``step`` (the checkpoint a run resumes from), so that the
    steps after it, which the resumed run repeats, are not logged twice. Rewritten atomically."""
    if not log_file.is_file():
        return
    kept = []
    for line in log_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    tmp = log_file.with_name(f".{log_file.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, log_file)
