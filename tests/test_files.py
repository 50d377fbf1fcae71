"""Atomic directory writes (geodite_jax.files): a process killed at any moment of a write leaves a complete
directory behind, found by the next writer or reader, and no leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from geodite_jax.files import atomic_directory, recover_directory

# A child that writes `target` (content "new") with atomic_directory and kills itself with SIGKILL at a
# chosen moment: "fill" while the temporary directory is being filled, or "rename:N" just before the N-th
# os.replace of the swap (N=1: temporary -> .new-, N=2: old -> .old-/x, N=3: .new- -> target).
_CHILD = textwrap.dedent("""
    import importlib.util, os, signal, sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("files", sys.argv[3])  # the module alone: no jax import
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)
    target, moment = Path(sys.argv[1]), sys.argv[2]
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        calls.append(1)
        if moment == f"rename:{len(calls)}":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    files.os.replace = replace
    with files.atomic_directory(target) as tmp:
        (tmp / "content").write_text("new")
        if moment == "fill":
            os.kill(os.getpid(), signal.SIGKILL)
""")


def _write_and_kill(target: Path, moment: str) -> None:
    import geodite_jax.files

    proc = subprocess.run([sys.executable, "-c", _CHILD, str(target), moment, geodite_jax.files.__file__],
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _leftovers(target: Path) -> list[str]:
    return sorted(n for n in os.listdir(target.parent) if n.startswith(f".{target.name}."))


@pytest.mark.parametrize("moment, expected", [
    ("fill", "old"),  # the new one was incomplete: the old one stays
    ("rename:1", "old"),  # complete, but not yet marked complete: the old one stays
    ("rename:2", "old"),  # the new one is complete (.new-) but the old one is still in place: it stays
    ("rename:3", "new"),  # between the two renames of the swap: no target on disk at all
])
def test_a_kill_at_any_moment_of_a_write_is_recovered_on_the_next_open(tmp_path, moment, expected):
    target = tmp_path / "last"
    with atomic_directory(target) as tmp:
        (tmp / "content").write_text("old")
    _write_and_kill(target, moment)
    assert _leftovers(target), "the kill should have left something behind"
    if moment == "rename:3":
        assert not target.exists()  # the gap of the issue: only .old-*/x and .new-* hold the data
    recover_directory(target)  # what every reader (Potential.load, load_checkpoint_meta) does first
    assert (target / "content").read_text() == expected
    assert _leftovers(target) == []
    with atomic_directory(target) as tmp:  # and the next write works and leaves nothing either
        (tmp / "content").write_text("next")
    assert (target / "content").read_text() == "next" and _leftovers(target) == []


def test_leftovers_of_a_killed_first_write_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "best"
    _write_and_kill(target, "fill")
    assert not target.exists() and [n.split("-")[0] for n in _leftovers(target)] == [".best.tmp"]
    with atomic_directory(target) as tmp:
        (tmp / "content").write_text("fresh")
    assert (target / "content").read_text() == "fresh" and _leftovers(target) == []


def test_a_file_in_the_way_is_an_error_not_replaced(tmp_path):
    (tmp_path / "model").write_text("precious")
    with pytest.raises(ValueError, match="a file of that name exists"), atomic_directory(tmp_path / "model"):
        pass
    assert (tmp_path / "model").read_text() == "precious"


def test_resume_finds_a_checkpoint_left_between_the_two_renames(tmp_path):
    import json

    from geodite_jax.training.checkpoint import load_checkpoint_meta

    last = tmp_path / "checkpoints" / "last"
    (tmp_path / "checkpoints" / ".last.old-k1l2" / "x").mkdir(parents=True)  # the complete old checkpoint
    (tmp_path / "checkpoints" / ".last.old-k1l2" / "x" / "trainer.json").write_text(
        json.dumps({"checkpoint_version": 1, "step": 6}))
    (tmp_path / "checkpoints" / ".last.tmp-m3n4").mkdir()  # a half-written newer one
    assert load_checkpoint_meta(last)["step"] == 6  # what Trainer.restore (--resume) reads first
    assert os.listdir(tmp_path / "checkpoints") == ["last"]
