"""Files: atomic directory writes (build beside the target, then rename into place), the JSON metadata files
beside them, and figures.

A reader never sees a half-written directory, and a crash while writing leaves the previous one intact.
Used by saved potentials, preprocessed datasets and training checkpoints (with
:func:`quiet_failed_orbax_reads` for the orbax parts).

The swap of ``path`` goes through named siblings, so that whatever moment a process is killed at, the next
:func:`atomic_directory` or :func:`recover_directory` on ``path`` restores a complete directory and removes
the rest:

1. ``.<name>.tmp-XXXX``: being filled (incomplete; removed on recovery);
2. renamed to ``.<name>.new-XXXX`` once filled (complete);
3. the old ``path`` renamed to ``.<name>.old-YYYY/x`` (complete), the ``.new-`` one renamed to ``path``,
   the ``.old-`` one removed.

Recovery: if ``path`` is missing, the newest ``.new-`` directory (else the old one in ``.old-*/x``) is
renamed to ``path``; every leftover sibling of ``path`` is then deleted. One writer per ``path`` at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _siblings(path: Path, kind: str) -> list[Path]:
    """``.<name>.<kind>-*`` siblings of ``path``, oldest first."""
    prefix = f".{path.name}.{kind}-"
    found = [path.parent / n for n in os.listdir(path.parent) if n.startswith(prefix)]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns)


def recover_directory(path: str | os.PathLike) -> Path:
    """Finish or undo an interrupted :func:`atomic_directory` swap of ``path`` and delete its leftovers.

    Cheap when there is nothing to do (one glob of the parent directory). Returns the absolute path.
    """
    path = Path(path).absolute()
    if not path.parent.is_dir():
        return path
    news, olds = _siblings(path, "new"), _siblings(path, "old")
    if not path.exists():
        if news:  # complete, newer than any .old- one
            os.replace(news.pop(), path)
        else:
            complete = [old / "x" for old in olds if (old / "x").is_dir()]
            if complete:
                os.replace(complete[-1], path)
    for leftover in _siblings(path, "tmp") + news + olds:
        shutil.rmtree(leftover, ignore_errors=True)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; on success it replaces ``path`` (old content removed),
    on an exception it is deleted and ``path`` is left as it was. Leftovers of an interrupted earlier write
    of ``path`` are recovered or removed first (:func:`recover_directory`)."""
    path = Path(path).absolute()
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: {path.parent} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot write the directory {path}: a file of that name exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        new = tmp.with_name(tmp.name.replace(".tmp-", ".new-", 1))
        os.replace(tmp, new)  # complete from here on: recovery may install it
        if path.exists():  # move the old one aside first, so the swap itself is two renames
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(new, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(new, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _closed_loop_callback(unraisable: Any) -> bool:
    """Is this the ``RuntimeError('Event loop is closed')`` of a tensorstore callback after a failed orbax read?"""
    err = unraisable.exc_value
    if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
        return False
    tb = unraisable.exc_traceback
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


class _UnretrievedReadErrors(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" records of failed tensorstore reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        unretrieved = str(record.msg).startswith(("Task exception was never retrieved",
                                                  "Future exception was never retrieved"))
        return not (unretrieved and isinstance(exc, ValueError) and "tensorstore_spec" in str(exc))


def quiet_failed_orbax_reads() -> None:
    """Drop the asyncio noise that follows a failed orbax read; idempotent, process-wide.

    When a restore fails (e.g. a truncated chunk), orbax closes its event loop while tensorstore reads of
    other arrays are still in flight. Each of them then either completes into ``loop.call_soon_threadsafe``
    on the closed loop (Python prints a ``RuntimeError('Event loop is closed')`` traceback through
    ``sys.unraisablehook``) or leaves its own read error in a task nobody awaits (asyncio logs "Task exception
    was never retrieved" when it is collected): one traceback per array, after the real error has been
    reported. Exactly those records are dropped here; every other unraisable exception goes to the previous
    hook and every other asyncio record is logged.
    """
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReadErrors) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedReadErrors())
    if getattr(sys.unraisablehook, "_geodite_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    hook._geodite_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in the file ``path`` (a metadata file); ``ValueError`` naming the file if it is corrupt
    or holds something else than an object."""
    import json

    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is corrupt: not a JSON object")
    return data


def save_figure(fig: Any, path: str | os.PathLike, dpi: int, title: str = "") -> Path:
    """Lay out a matplotlib figure (with ``title`` above its panels, if given), write it to ``path`` (parent
    directories created) and close it; returns the path."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
