"""The command line with bad input: one ``geodite <command>: error: ...`` line and exit status 2 for a user
error, a traceback and a request to report it for a bug; no option abbreviations; help on every option."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from geodite_jax import cli
from geodite_jax.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {parser.prog: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found.update(_parsers(child))
    return found


def test_options_are_never_abbreviated(capsys):
    parsers = _parsers(build_parser())
    assert len(parsers) > 10 and all(not p.allow_abbrev for p in parsers.values()), \
        [name for name, p in parsers.items() if p.allow_abbrev]
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--epoch", "3"])  # was taken for --epochs
    assert exit_.value.code == 2 and "unrecognized arguments: --epoch" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "info", "convert"])
def test_every_option_of_the_core_commands_has_help(command):
    parser = _parsers(build_parser())[f"geodite {command}"]
    undocumented = [a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not undocumented


def test_info_takes_model_like_every_other_command(tiny, tmp_path, capsys):
    path = tiny.save(tmp_path / "model")
    assert main(["info", "--model", str(path)]) == 0
    assert f"parameters: {tiny.num_params:,}" in capsys.readouterr().out
    assert main(["info", str(path)]) == 0  # the positional form still works
    assert f"parameters: {tiny.num_params:,}" in capsys.readouterr().out
    assert main(["info"]) == 2 and "geodite info --model" in capsys.readouterr().err


def test_a_missing_model_is_no_such_directory(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    for argv in (["info", "--model", missing], ["eval", missing, "--model", missing]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"no such directory: {missing}" in err and "geodite.json" not in err, err


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train: [emt,\nepochs 3\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (["train", "--config", str(bad)], f"{bad}: not a valid YAML recipe"),  # was a yaml ParserError
        (["train", "--out", str(a_file)], f"--out {a_file} exists and is not a directory"),  # was FileExistsError
        (["train", "--set", "lr=[1,"], "option lr: cannot read"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"geodite train: error: {message}" in err and "Traceback" not in err, err


def test_a_bug_prints_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    for bug in (ZeroDivisionError("division by zero"), KeyError("energy")):
        def broken(args, bug=bug):
            raise bug

        monkeypatch.setattr(cli.core, "_info", broken)
        assert main(["info", "--model", "x"]) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "please report it" in err, err


def test_a_truncated_parameter_chunk_is_one_line_without_asyncio_noise(tiny, tmp_path):
    path = tiny.save(tmp_path / "model")
    chunk = next(f for f in sorted((path / "params" / "d").iterdir()) if f.is_file())
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    # The noise comes from reads still in flight when orbax gives up, so it varies from run to run: three tries,
    # each followed by a pause for the late callbacks (without the fix, one try in four or five is silent).
    child = ("import sys, time; from geodite_jax.cli import main\n"
             "codes = []\n"
             "for _ in range(3):\n"
             "    codes.append(main(sys.argv[1:])); time.sleep(0.5)\n"
             "sys.exit(max(codes))")
    proc = subprocess.run([sys.executable, "-c", child, "info", "--model", str(path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 3 and all(x.startswith(f"geodite info: error: cannot read the parameters of {path}")
                                   for x in lines), proc.stderr[-3000:]


def test_truncated_extxyz_in_train_and_eval_names_file_and_frame(tiny, tmp_path, capsys):
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from geodite_jax.training import TrainConfig
    from geodite_jax.training.datasets import open_dataset

    frames = []
    for k in range(3):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.05, seed=k)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 - k, forces=atoms.positions * 0.0)
        frames.append(atoms)
    write(tmp_path / "whole.extxyz", frames, format="extxyz")
    lines = (tmp_path / "whole.extxyz").read_text().splitlines(keepends=True)
    path = tmp_path / "truncated.extxyz"
    path.write_text("".join(lines[:-2]))  # the last frame loses two atom lines
    message = f"{path}: frame 2 (line 13): the file ends after 2 of its 4 atom lines (truncated)"
    model = str(tiny.save(tmp_path / "model"))
    for argv in (["train", "--train", str(path), "--format", "extxyz", "--out", str(tmp_path / "run")],
                 ["eval", str(path), "--model", model]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    cfg = TrainConfig(train=str(path), format="extxyz", on_error="skip", out=str(tmp_path / "run"))
    # --on-error skip: the trainer's reading path keeps the two whole frames (eval passes the same option to
    # the same reader; running it would only add a compilation here).
    assert len(open_dataset(cfg.train, cfg, 5.0, 100, tmp_path / "cache")) == 2
