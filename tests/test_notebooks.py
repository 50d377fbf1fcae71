"""The notebooks run top to bottom on a reduced budget (GEODITE_QUICK=1), in a scratch directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


# MD and training have their own tests; their notebooks (~50 s each) run with -m slow.
SLOW_NOTEBOOKS = {"md_quickstart", "train_quickstart"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_NOTEBOOKS else p
                                  for p in NOTEBOOKS], ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The scratch copy sits in <tmp>/notebooks so that relative paths (../configs) resolve like in the repo.
    work = tmp_path / "notebooks"
    work.mkdir()
    shutil.copytree(path.parents[1] / "configs", tmp_path / "configs")
    monkeypatch.setenv("GEODITE_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(work)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
