"""Training: recipe parsing, loss and optimiser pieces, a run that learns, exact resume after a kill,
fine-tuning with a new element, data parallelism (2 devices = 1 device), and the train/eval CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from ase.io import write

import geodite_jax as gd
from geodite_jax.cli import main as cli_main
from geodite_jax.data import GraphDataset, generate_emt_frames
from geodite_jax.training import DEMO_RECIPE, TrainConfig, Trainer, train
from geodite_jax.training.datasets import check_labels, label_statistics, open_dataset
from geodite_jax.training.initial import initial_potential
from geodite_jax.training.loss import penalty
from geodite_jax.training.optim import learning_rate_schedule, zclip
from geodite_jax.training.rundir import prepare_run_directory

ROOT = Path(__file__).resolve().parents[1]
# A small model and data set: every run below shares one compiled step (same trajectory-defining options).
SMALL = dict(train="emt", emt_frames=48, valid_fraction=0.15, test_fraction=0.15, preset="tiny",
             model={"num_layers": 1, "num_features": 16, "attention_dropout": 0.1}, dtype="float64",
             lr=5e-3, lr_start=5e-4, warmup_steps=4, schedule="cosine", batch_size=6, epochs=3,
             checkpoint_every_minutes=0, checkpoint_every_steps=0, progress=False, seed=3)


# --------------------------------------------------------------------------------------- pieces
def test_huber_penalty_by_hand():
    x = jnp.asarray([0.0, 0.005, -0.01, 0.03, -1.0])
    got = penalty(x, "huber", 0.01)
    want = [0.0, 0.5 * 0.005**2, 0.5 * 0.01**2, 0.01 * (0.03 - 0.005), 0.01 * (1.0 - 0.005)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(penalty(x, "mse", 0.01), np.asarray(x) ** 2)
    np.testing.assert_allclose(penalty(x, "mae", 0.01), np.abs(np.asarray(x)))


def test_zclip_cuts_a_spike_and_caps_the_norm():
    tx = zclip(z_threshold=2.5, alpha=0.9, warmup=20, max_norm=10.0)
    state = tx.init(None)
    for k in range(40):  # steady norms 0.95, 1.05, 0.95, ...: within one std, never clipped
        g = {"w": jnp.asarray([1.0 + 0.05 * (-1) ** k, 0.0])}
        out, state = tx.update(g, state)
        np.testing.assert_allclose(optax.global_norm(out), optax.global_norm(g), rtol=1e-6)
    mean, std = float(state.mean), float(np.sqrt(state.var))
    spike = {"w": jnp.asarray([8.0, 0.0])}  # z ≫ 2.5 but below the hard cap
    out, _ = tx.update(spike, state)
    z = (8.0 - mean) / std
    np.testing.assert_allclose(optax.global_norm(out), mean + 2.5 * std / (z / 2.5), rtol=1e-5)
    huge, _ = zclip(z_threshold=0.0, max_norm=1.0).update({"w": jnp.asarray([3.0, 4.0])}, tx.init(None))
    np.testing.assert_allclose(optax.global_norm(huge), 1.0, rtol=1e-6)  # hard cap alone


def test_learning_rate_schedule_shape():
    cfg = TrainConfig(lr=1e-3, lr_start=1e-4, warmup_steps=10, schedule="linear", lr_end_factor=0.1)
    sched = learning_rate_schedule(cfg, total_steps=110)
    np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(60), sched(110), sched(500)],
                               [1e-4, 5.5e-4, 1e-3, 5.5e-4, 1e-4, 1e-4], rtol=1e-5)
    const = learning_rate_schedule(TrainConfig(lr=3e-5, warmup_steps=0, schedule="constant"), 100)
    assert float(const(0)) == float(const(99)) == pytest.approx(3e-5)


def test_recipes_parse_and_agree():
    demo = TrainConfig.from_yaml(ROOT / "configs" / "emt-demo.yaml")
    assert demo == TrainConfig.from_dict(DEMO_RECIPE)  # `geodite train` without --config == the YAML
    mp = TrainConfig.from_yaml(ROOT / "configs" / "geodite-mp.yaml")
    assert (mp.preset, mp.lr, mp.lr_start, mp.warmup_steps, mp.decay_steps) == ("mp", 4.5e-4, 1e-4, 2000, 800000)
    assert (mp.huber_delta, mp.ema_decay, mp.weight_decay, mp.batch_size) == (0.01, 0.995, 0.01, 6)
    assert mp.element_energies == "mptrj" and mp.energy_label == "uncorrected"
    stage2 = TrainConfig.from_yaml(ROOT / "configs" / "geodite-mp-stage2.yaml")
    assert (stage2.forces_weight, stage2.lr, stage2.element_energies) == (5.0, 3e-5, "keep")


@pytest.mark.parametrize("bad, message", [
    ({"lossy": 1}, "unknown training option"),
    ({"loss": "l3"}, "loss must be one of"),
    ({"lr": "fast"}, "cannot read 'fast' as float"),
    ({"model": {"num_featuresss": 8}}, "do not fit GeoditeConfig"),
    ({"valid_fraction": 0.6, "test_fraction": 0.5}, "valid_fraction"),
    ({"element_energies": "keep"}, "needs finetune_from"),
])
def test_bad_recipes_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(bad)


def test_missing_training_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.extxyz"):
        Trainer(TrainConfig(train=str(tmp_path / "nowhere.extxyz"), out=str(tmp_path / "run")))


# --------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run of the SMALL recipe (float64, attention dropout on)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = train(TrainConfig.from_dict({**SMALL, "out": str(out)}))
    return result


def test_training_learns_far_below_the_baseline(reference_run):
    res = reference_run
    model, base = res.test_metrics["all"], res.baseline_metrics["all"]
    # Three short epochs already bring forces well under the per-element-mean baseline (zero forces).
    assert model["forces_mae"] < 0.6 * base["forces_mae"], (model, base)
    assert res.history and all(np.isfinite(r["valid_loss"]) for r in res.history)
    losses = [json.loads(x)["train_loss"] for x in (res.out / "log.jsonl").read_text().splitlines()
              if "train_loss" in x]
    assert losses[-1] < losses[0]
    for name in ("final", "best"):  # saved potentials load and know their elements
        pot = gd.Potential.load(res.out / name)
        assert sorted(pot.metadata["elements"]) == [13, 28, 29]
    assert (res.out / "test_errors.md").read_text().count("|") > 10


def test_kill_and_resume_repeats_the_uninterrupted_run(reference_run, tmp_path):
    cfg = TrainConfig.from_dict({**SMALL, "out": str(tmp_path), "checkpoint_every_steps": 3})

    class Killed(Exception):
        pass

    def kill_at_7(trainer, metrics):
        if trainer.step >= 7:
            raise Killed

    with pytest.raises(Killed):
        Trainer(cfg, hooks=[kill_at_7]).run()
    meta = json.loads((tmp_path / "checkpoints" / "last" / "trainer.json").read_text())
    assert meta["step"] == 6  # the last save before the kill
    resumed = Trainer(cfg).run(resume=True)  # from step 6: one step of work lost, not more
    assert resumed.steps == reference_run.steps
    ref = jax.tree_util.tree_leaves(reference_run.potential.params)
    got = jax.tree_util.tree_leaves(resumed.potential.params)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # float32-stored copies of identical float64 runs


def test_resume_refuses_a_changed_recipe(reference_run):
    cfg = TrainConfig.from_dict({**SMALL, "out": str(reference_run.out), "lr": 1e-2})
    with pytest.raises(ValueError, match="lr"):
        Trainer(cfg).run(resume=True)


def test_finetuning_keeps_known_references_and_fits_new_elements(reference_run, tmp_path):
    base = gd.Potential.load(reference_run.out / "final")
    frames = generate_emt_frames(30, seed=11, elements=("Cu", "Ni", "Al", "Pt"))
    ds = GraphDataset.from_frames(frames, base.config.cutoff, base.config.num_elements)
    cfg = TrainConfig(finetune_from=str(reference_run.out / "final"), element_energies="keep", train="emt")
    pot = initial_potential(cfg, ds, label_statistics(ds))
    for z in (13, 28, 29):
        assert pot.element_energies[z] == base.element_energies[z]
    assert pot.element_energies[78] != 0.0 and 78 in pot.metadata["elements"]
    assert pot.energy_scale == base.energy_scale
    for a, b in zip(jax.tree_util.tree_leaves(pot.params), jax.tree_util.tree_leaves(base.params), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="do not fit the potential"):
        initial_potential(TrainConfig(finetune_from=str(reference_run.out / "final"), model={"num_layers": 3}),
                          ds, label_statistics(ds))


def test_eval_cli_table_groups_and_errors(reference_run, tmp_path, capsys):
    frames = generate_emt_frames(12, seed=5)
    path = tmp_path / "emt.extxyz"
    write(path, [f.to_atoms() for f in frames])
    model = str(reference_run.out / "final")
    assert cli_main(["eval", str(path), "--model", model, "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "| all |" in printed and "meV/atom" in printed
    errors = json.loads((tmp_path / "ev" / "errors.json").read_text())["model"]
    assert errors["all"]["frames"] == 12 and len(errors) > 1  # per-group rows
    assert cli_main(["eval", str(tmp_path / "missing.extxyz"), "--model", model]) == 2
    pt = generate_emt_frames(3, seed=1, elements=("Pt",))
    write(tmp_path / "pt.extxyz", [f.to_atoms() for f in pt])
    assert cli_main(["eval", str(tmp_path / "pt.extxyz"), "--model", model]) == 2
    assert "Pt (Z=78): not an element this potential was trained on" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- data parallel
_TWO_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 2, jax.devices()
    from geodite_jax.data import GraphDataset, budget_for, generate_emt_frames, iterate_batches
    from geodite_jax.training import TrainConfig
    from geodite_jax.training.datasets import label_statistics
    from geodite_jax.training.initial import initial_potential, loss_norms
    from geodite_jax.training.sharding import make_mesh, put_batch, replicate
    from geodite_jax.training.step import build_train_step
    cfg = TrainConfig(model={"num_layers": 1, "num_features": 16, "attention_dropout": 0.1}, dtype="float64",
                      warmup_steps=2, lr=1e-2)
    mc = cfg.model_config()
    ds = GraphDataset.from_frames(generate_emt_frames(24, seed=2), mc.cutoff)
    stats = label_statistics(ds)
    pot = initial_potential(cfg, ds, stats)
    budget = budget_for(ds, 4)
    batch = next(iterate_batches(ds, None, budget, shuffle=True, seed=0, epoch=0, num_shards=2))
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = make_mesh(devices)
        step, state, consts = build_train_step(pot, cfg, mesh, loss_norms(pot, stats), total_steps=100)
        key = replicate(jax.random.PRNGKey(0), mesh)
        for _ in range(2):
            state, metrics = step(state, put_batch(batch, mesh, jnp.float64), consts, key)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p2, m2) = results
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(p1),
                                                               jax.tree_util.tree_leaves(p2)))
    moved = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(jax.tree_util.tree_leaves(p1),
                                                                        jax.tree_util.tree_leaves(pot.params)))
    print("WORST", worst, "MOVED", moved, "LOSS", float(m1["loss"]), float(m2["loss"]))
    assert moved > 1e-4, moved
    assert worst < 1e-10, worst
    assert abs(float(m1["loss"]) - float(m2["loss"])) < 1e-12
""")


@pytest.mark.slow  # default-suite time (CI 15 min on the slowest 2-vCPU hosts)
def test_two_device_step_equals_one_device_step():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "WORST" in proc.stdout


# --------------------------------------------------------------------------------------- run directories
def test_a_new_run_into_a_used_out_is_refused_or_overwritten(reference_run, tmp_path):
    cfg = TrainConfig.from_dict({**SMALL, "out": str(reference_run.out)})
    for start in (lambda: train(cfg), lambda: Trainer(cfg).run()):  # the CLI's path and the lower-level one
        with pytest.raises(ValueError, match=r"already holds a run \(.*best.*\); pass --resume to continue it, "
                                             r"--overwrite to delete it"):
            start()
    out = tmp_path / "run"
    shutil.copytree(reference_run.out, out)
    (out / "data").mkdir()
    (out / "data" / "store").write_text("cache")
    with pytest.raises(ValueError, match="give one of them"):
        prepare_run_directory(out, resume=True, overwrite=True)
    prepare_run_directory(out, resume=False, overwrite=True)  # --overwrite: the old outputs go, the cache stays
    assert os.listdir(out) == ["data"] and (out / "data" / "store").read_text() == "cache"
    assert not [n for n in os.listdir(tmp_path) if n != "run"]  # nothing left beside it either


def test_a_run_never_reports_another_runs_best(reference_run, tmp_path):
    cfg = TrainConfig.from_dict({**SMALL, "out": str(tmp_path / "run"), "max_steps": 2})

    def plant_old_best(trainer, metrics):  # an old run's best/ appears in --out (copied in, left over, ...)
        if trainer.step == 1:
            shutil.copytree(reference_run.out / "best", trainer.out / "best")

    result = Trainer(cfg, hooks=[plant_old_best]).run()  # 2 steps: no validation, so no best of its own
    assert result.best is None and result.steps == 2
    assert result.test_metrics["all"] != reference_run.test_metrics["all"]  # errors of this run's final model
    assert gd.Potential.load(result.out / "final").metadata["run_id"] != \
        gd.Potential.load(reference_run.out / "best").metadata["run_id"]


def test_resume_after_a_kill_while_checkpointing_logs_every_step_once(reference_run, tmp_path, monkeypatch):
    cfg = TrainConfig.from_dict({**SMALL, "out": str(tmp_path)})  # checkpoints at the ends of epochs only

    class Killed(Exception):
        pass

    save = Trainer.save

    def save_or_die(self, state):  # dies writing the checkpoint of epoch 2, after logging that epoch
        if self.epoch == 2:
            raise Killed
        save(self, state)

    monkeypatch.setattr(Trainer, "save", save_or_die)
    with pytest.raises(Killed):
        Trainer(cfg).run()
    monkeypatch.undo()
    checkpoint_step = json.loads((tmp_path / "checkpoints" / "last" / "trainer.json").read_text())["step"]
    assert max(json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()) > checkpoint_step
    resumed = Trainer(cfg).run(resume=True)
    assert resumed.steps == reference_run.steps and resumed.steps_run == reference_run.steps - checkpoint_step

    def steps(out, kind):
        return [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines() if kind in x]

    for kind in ("train_loss", "valid_loss"):  # each step logged once, as by the uninterrupted run
        assert steps(tmp_path, kind) == steps(reference_run.out, kind)
    from geodite_jax.training.plots import _resumed_series

    doubled = [{"step": s} for s in (10, 20, 30, 20, 30, 40)]  # a log of a resumed run before this fix
    assert [r["step"] for r in _resumed_series(doubled)] == [10, 20, 30, 40]


def test_resuming_a_finished_run_says_it_ran_no_step(reference_run, tmp_path, capsys):
    out = tmp_path / "done"
    shutil.copytree(reference_run.out, out)
    recipe = tmp_path / "small.yaml"
    recipe.write_text(yaml.safe_dump({**SMALL, "out": str(out)}))
    assert cli_main(["train", "--config", str(recipe), "--resume", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert f"\n0 steps ({reference_run.steps} in all, with the resumed run's)" in printed, printed
    assert json.loads((out / "summary.json").read_text())["steps_this_run"] == 0


# --------------------------------------------------------------------------------------- labels
def _write_emt(path, n, labels):
    """EMT frames as extxyz with the given labels only: energy/forces/stress under their standard keys, or
    'REF' for REF_energy / REF_forces."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for k, f in enumerate(generate_emt_frames(n, seed=4)):
        atoms = Atoms(numbers=f.numbers, positions=f.positions, cell=f.cell, pbc=f.pbc)
        if labels == "REF":
            atoms.info["REF_energy"] = f.energy
            atoms.arrays["REF_forces"] = f.forces
        else:
            results = {"energy": f.energy, "forces": f.forces, "stress": f.stress.ravel()[[0, 4, 8, 5, 2, 1]]}
            chosen = {key: v for key, v in results.items() if key in labels(k)}
            atoms.calc = SinglePointCalculator(atoms, **chosen)
        out.append(atoms)
    write(path, out, format="extxyz")
    return path


def test_missing_labels_are_errors_naming_the_keys_found_and_the_option(tmp_path, capsys):
    ref = _write_emt(tmp_path / "ref.extxyz", 20, "REF")
    small = dict(preset="tiny", progress=False, valid_fraction=0.0, test_fraction=0.0)
    with pytest.raises(ValueError, match=r"ref\.extxyz: none of its 20 frames has the energy label \(looked for the "
                                         r"key 'energy'; select the key with --energy-key.*keys found in the file: "
                                         r"info: REF_energy; per-atom arrays: REF_forces"):
        Trainer(TrainConfig(train=str(ref), out=str(tmp_path / "a"), **small))
    no_forces = _write_emt(tmp_path / "no_forces.extxyz", 20, lambda k: ("energy", "stress"))
    with pytest.raises(ValueError, match=r"none of its 20 frames has the forces label \(looked for the key "
                                         r"'forces'; select the key with --forces-key .*forces_weight: 0"):
        Trainer(TrainConfig(train=str(no_forces), out=str(tmp_path / "b"), **small))
    assert cli_main(["train", "--train", str(no_forces), "--out", str(tmp_path / "c")]) == 2
    assert "has the forces label" in capsys.readouterr().err
    # The key options select the labels; a partly labelled set says how many frames lack what.
    cfg = TrainConfig(train=str(ref), energy_key="REF_energy", forces_key="REF_forces", stress_weight=0.0,
                      out=str(tmp_path / "d"), **small)
    assert check_labels(open_dataset(cfg.train, cfg, 5.0, 100, tmp_path / "cache"), cfg) == []
    partial = _write_emt(tmp_path / "partial.extxyz", 20,
                         lambda k: ("energy", "stress") if k % 4 == 0 else ("energy", "forces", "stress"))
    cfg = TrainConfig(train=str(partial), out=str(tmp_path / "e"), **small)
    assert check_labels(open_dataset(cfg.train, cfg, 5.0, 100, tmp_path / "cache"), cfg) == [
        "5 of 20 training frames have no forces label (key 'forces'); they are trained without it"]


@pytest.mark.slow  # ~40 s: several padded shapes compiled for the step and the validation
def test_bucketed_run_resumes_exactly_and_matches_the_padded_run(reference_run, tmp_path, monkeypatch):
    """Steps padded to a few shapes (``batch_buckets``) train the same weights as steps padded to the full budget,
    and a killed bucketed run resumes to them too."""
    import geodite_jax.training.trainer as trainer_module
    from geodite_jax.data import iterate_batches

    monkeypatch.setattr(trainer_module, "MIN_STEPS_FOR_BUCKETS", 1)
    cfg = TrainConfig.from_dict({**SMALL, "out": str(tmp_path), "checkpoint_every_steps": 3, "batch_buckets": 3})

    class Killed(Exception):
        pass

    def kill_at_5(trainer, metrics):
        if trainer.step >= 5:
            raise Killed

    first = Trainer(cfg, hooks=[kill_at_5])
    assert first.buckets == 3
    shapes = {b.graph.senders.shape for e in range(SMALL["epochs"]) for b in iterate_batches(
        first.data.train, first.train_indices, first.budget, seed=cfg.seed, epoch=e, num_shards=first.num_shards,
        buckets=3)}
    assert len(shapes) >= 2  # the run really pads to several shapes
    with pytest.raises(Killed):
        first.run()
    resumed = Trainer(cfg).run(resume=True)
    assert resumed.steps == reference_run.steps
    for a, b in zip(jax.tree_util.tree_leaves(reference_run.potential.params),
                    jax.tree_util.tree_leaves(resumed.potential.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
