"""Opening data files: gzip-transparent binary handles and the short file names frame ids are made of."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import IO


def open_source(path: Path) -> IO[bytes]:
    """``path`` opened for binary reading, decompressed if its name ends in ``.gz``."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def short_name(path: Path) -> str:
    """``parent/name``: the file part of frame ids (``Si/test.json:12``)."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name
