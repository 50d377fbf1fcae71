"""The training loop: data -> padded batches -> data-parallel optax step -> EMA -> validation -> checkpoints.

The pieces live by idea: :mod:`.datasets` (data assembly, labels, label statistics), :mod:`.initial` (the
potential a run starts from, E0 fit, loss normalisers), :mod:`.sharding` (mesh, replicated and sharded
arrays), :mod:`.step` (the data-parallel train step and :class:`~.step.TrainState`), :mod:`.rundir` (the
``--out`` directory); this module runs them as one :class:`Trainer`.

Exact resume: the data order is a function of (seed, epoch), dropout keys of (seed, step, sub-batch), and the
checkpoint holds params, EMA, optimiser and clipping state, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GeoditeConfig
from ..energy import as_dtype, make_predict_fn
from ..files import recover_directory
from ..potential import Potential
from ..precision import resolve_dtype
from .checkpoint import load_checkpoint, load_checkpoint_meta, save_checkpoint
from .config import RESUMABLE_OPTIONS, TrainConfig
from .datasets import Datasets, check_labels, label_statistics, load_datasets
from .evaluation import (
    Predictions,
    baseline_predictions,
    error_metrics,
    format_error_table,
    predict_dataset,
)
from .initial import initial_potential, loss_norms
from .loss import combine, counts, loss_sums
from .optim import make_optimizer
from .rundir import prepare_run_directory, truncate_log
from .sharding import host_copy, make_mesh, put_batch, replicate
from .step import TrainState, compiled_train_step, initial_train_state

#: Runs of fewer steps pad every step to the full budget (``TrainConfig.batch_buckets`` is used from here on):
#: each extra padded shape is a compilation (~10 s for a small model, ~25 s for Geodite-MP on a CPU), which a
#: short run does not earn back.
MIN_STEPS_FOR_BUCKETS = 1000


@dataclasses.dataclass
class TrainResult:
    potential: Potential  # EMA weights at the end of the run
    best: Potential | None  # EMA weights with the lowest validation loss
    history: list[dict[str, Any]]
    test_metrics: dict[str, dict[str, float]] | None
    baseline_metrics: dict[str, dict[str, float]] | None
    steps: int
    wall_seconds: float
    out: Path
    data: Datasets
    test_predictions: Predictions | None = None
    is_main: bool = True  # False on the other processes of a multi-host run (they write nothing)
    steps_run: int | None = None  # steps taken by this call (``steps`` counts the resumed ones too)


@functools.lru_cache(maxsize=8)
def _compiled_predict(model_config: GeoditeConfig) -> Callable[..., dict]:
    return jax.jit(make_predict_fn(model_config))


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One training run. ``Trainer(cfg).run(resume=False)``; ``hooks`` are called as ``hook(trainer, metrics)``
    after every step (a hook may raise to stop the run, e.g. to test recovery from a kill)."""

    def __init__(self, cfg: TrainConfig, hooks: list[Callable[[Trainer, dict], None]] | None = None) -> None:
        self.dtype = resolve_dtype(cfg.dtype)
        self.cfg = cfg
        self.hooks = list(hooks or [])
        self.out = Path(cfg.out)
        self.is_main = jax.process_index() == 0  # with several hosts, one writes logs, checkpoints, models
        model_config = (Potential.load(cfg.finetune_from).config if cfg.finetune_from else cfg.model_config())
        self.data = load_datasets(cfg, model_config)
        for warning in check_labels(self.data.train, cfg):
            print(f"warning: {warning}", file=sys.stderr)
        self.stats = label_statistics(self.data.train, seed=cfg.seed)
        self.potential = initial_potential(cfg, self.data.train, self.stats)
        self.config = self.potential.config
        self.norms = loss_norms(self.potential, self.stats)
        self.mesh = make_mesh()
        self.num_shards = int(self.mesh.devices.size)
        from ..data import budget_for, num_batches

        self.budget = budget_for(self.data.train, cfg.batch_size)
        self.train_indices = np.arange(len(self.data.train))
        self.steps_per_epoch = num_batches(self.data.train, self.train_indices, self.budget, shuffle=True,
                                           seed=cfg.seed, epoch=0, num_shards=self.num_shards)
        # Packing follows the shuffled order, so epochs differ by ~1 % in length: the schedule's length is
        # epoch 0's count times the number of epochs (an estimate; the run ends when the epochs do).
        self.total_steps = self.steps_per_epoch * cfg.epochs
        # Each padded shape is a compilation: only a run long enough to earn it back uses several.
        self.buckets = cfg.batch_buckets if self.total_steps >= MIN_STEPS_FOR_BUCKETS else 1
        self.optimizer, self.schedule = make_optimizer(cfg, self.total_steps)
        self.consts = self.potential.state(self.dtype).replace(params=None)
        self.step_fn = compiled_train_step(self.config, cfg, self.norms, self.total_steps, self.mesh)
        self.predict = _compiled_predict(self.config)
        self.history: list[dict[str, Any]] = []
        self.epoch = 0
        self.batch_in_epoch = 0
        self.step = 0  # optimiser steps taken (mirrors state.step on the host)
        self.best_valid = math.inf
        self.elapsed = 0.0
        self.start_step = 0  # the step this run started (or resumed) at
        # Identifies the run across resumptions: stored in its checkpoints and in the potentials it saves, so
        # that a run never reports a best/ written by another run.
        self.run_id = uuid.uuid4().hex

    # ------------------------------------------------------------------------------------ state
    def initial_state(self) -> TrainState:
        return initial_train_state(self.potential.params, self.optimizer, self.dtype)

    def _meta(self) -> dict[str, Any]:
        return {"train_config": self.cfg.to_dict(), "model_config": self.config.to_dict(), "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "best_valid": self.best_valid, "elapsed": self.elapsed,
                "element_energies": self.potential.element_energies.tolist(),
                "energy_scale": self.potential.energy_scale, "norms": self.norms._asdict(),
                "steps_per_epoch": self.steps_per_epoch, "history": self.history, "run_id": self.run_id}

    def save(self, state: TrainState) -> None:
        if self.is_main:
            save_checkpoint(self.out / "checkpoints" / "last", host_copy(state), self._meta())

    def restore(self) -> TrainState:
        path = self.out / "checkpoints" / "last"
        try:
            meta = load_checkpoint_meta(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}: nothing to resume in {self.out}; start afresh with --overwrite "
                                    "(or without --resume into a new --out)") from None
        saved = meta["train_config"]
        diff = {k: (saved.get(k), v) for k, v in self.cfg.to_dict().items()
                if k not in RESUMABLE_OPTIONS and saved.get(k) != v}
        if diff:
            raise ValueError(f"cannot resume {path}: the config differs from the run that wrote it in "
                             f"{sorted(diff)} (saved, given) = {diff}")
        if meta["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"cannot resume {path}: the training data changed ({meta['steps_per_epoch']} steps "
                             f"per epoch then, {self.steps_per_epoch} now)")
        state, meta = load_checkpoint(path, self.initial_state())
        # The data-derived constants are taken from the checkpoint, not re-derived.
        self.potential = Potential(self.config, self.potential.params, np.asarray(meta["element_energies"]),
                                   meta["energy_scale"], self.potential.metadata)
        self.epoch, self.batch_in_epoch = meta["epoch"], meta["batch_in_epoch"]
        self.best_valid, self.elapsed, self.history = meta["best_valid"], meta["elapsed"], meta["history"]
        self.step = meta["step"]
        self.run_id = meta.get("run_id")  # None: a checkpoint written before run ids were stored
        return jax.tree_util.tree_map(jnp.asarray, state)

    def export(self, state: TrainState, use_ema: bool = True) -> Potential:
        params = host_copy(state.ema if use_ema else state.params)
        meta = {**self.potential.metadata, "trained_steps": int(state.step), "train_config": self.cfg.to_dict(),
                "run_id": self.run_id}
        return Potential(self.config, params, self.potential.element_energies, self.potential.energy_scale, meta)

    # ------------------------------------------------------------------------------------ evaluation
    def validate(self, state: TrainState) -> dict[str, float]:
        """Validation metrics of the EMA weights and the validation loss (same normalised loss as training)."""
        from ..data import iterate_batches

        ds = self.data.valid
        model_state = self.consts.replace(params=host_copy(state.ema))
        weights = {"energy": self.cfg.energy_weight, "forces": self.cfg.forces_weight,
                   "stress": self.cfg.stress_weight}
        sums_total: dict[str, float] = {}
        count_total: dict[str, float] = {}
        for batch in iterate_batches(ds, np.arange(len(ds)), self.budget, shuffle=False,
                                     buckets=self.buckets):
            dev = as_dtype(batch, self.dtype)
            pred = self.predict(model_state, dev.graph)
            sums = jax.device_get(loss_sums(pred, dev, self.norms, self.cfg.loss, self.cfg.huber_delta))
            for k, v in sums.items():
                sums_total[k] = sums_total.get(k, 0.0) + float(v)
            for k, v in jax.device_get(counts(dev)).items():
                count_total[k] = count_total.get(k, 0.0) + float(v)
        _, metrics = combine({k: jnp.asarray(v) for k, v in sums_total.items()},
                             {k: jnp.asarray(v) for k, v in count_total.items()}, weights)
        return {f"valid_{k}": float(v) for k, v in metrics.items()}

    # ------------------------------------------------------------------------------------ loop
    def run(self, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Train from scratch into an ``out`` without another run's outputs (``overwrite``: delete them
        first), or ``resume`` the run in ``out`` from its last checkpoint."""
        from ..data import iterate_batches, num_batches, prefetch

        cfg = self.cfg
        if self.is_main:
            prepare_run_directory(self.out, resume, overwrite)
            for name in ("best", "final"):  # a save of them killed mid-swap: restore, drop leftovers
                recover_directory(self.out / name)
        self.out.mkdir(parents=True, exist_ok=True)
        state = replicate(self.restore() if resume else self.initial_state(), self.mesh)
        self.start_step = self.step
        if self.is_main:
            if resume:
                truncate_log(self.out / "log.jsonl", self.step)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        log = (self.out / "log.jsonl").open("a") if self.is_main else open(os.devnull, "w")  # noqa: SIM115
        key = replicate(jax.random.PRNGKey(cfg.seed), self.mesh)
        consts = replicate(self.consts, self.mesh)
        start = time.perf_counter() - self.elapsed
        last_save_time = time.perf_counter()
        last_save_step = self.step
        stop = bool(cfg.max_steps and self.step >= cfg.max_steps)  # a resumed run already at its step cap
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=int(state.step), unit="step", dynamic_ncols=True)
        try:
            while self.epoch < cfg.epochs and not stop:
                batches = iterate_batches(self.data.train, self.train_indices, self.budget, shuffle=True,
                                          seed=cfg.seed, epoch=self.epoch, num_shards=self.num_shards,
                                          start=self.batch_in_epoch, buckets=self.buckets)
                epoch_steps = num_batches(self.data.train, self.train_indices, self.budget, shuffle=True,
                                          seed=cfg.seed, epoch=self.epoch, num_shards=self.num_shards)
                window: list[dict] = []
                t_window = time.perf_counter()
                for batch in prefetch(batches, size=2):
                    state, metrics = self.step_fn(state, put_batch(batch, self.mesh, self.dtype), consts, key)
                    self.batch_in_epoch += 1
                    window.append(metrics)
                    step = self.step = self.step + 1
                    for hook in self.hooks:
                        hook(self, metrics)
                    if len(window) >= 10 or self.batch_in_epoch == epoch_steps:
                        self._log_window(log, bar, window, step, t_window)
                        window, t_window = [], time.perf_counter()
                    self.elapsed = time.perf_counter() - start
                    if (cfg.max_steps and step >= cfg.max_steps) or (
                            cfg.max_minutes and self.elapsed >= 60 * cfg.max_minutes):
                        stop = True
                        break
                    due_steps = cfg.checkpoint_every_steps and step - last_save_step >= cfg.checkpoint_every_steps
                    due_time = (cfg.checkpoint_every_minutes
                                and time.perf_counter() - last_save_time >= 60 * cfg.checkpoint_every_minutes)
                    if due_steps or due_time:
                        self.save(state)
                        last_save_time, last_save_step = time.perf_counter(), step
                if window:
                    self._log_window(log, bar, window, self.step, t_window)
                if stop:
                    break
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if self.data.valid is not None and (self.epoch % cfg.valid_every_epochs == 0
                                                    or self.epoch == cfg.epochs):
                    record = {"epoch": self.epoch, "step": self.step, **self.validate(state),
                              "lr": float(self.schedule(self.step)), "time": self.elapsed}
                    self.history.append(record)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    if bar is not None:
                        bar.write(_epoch_line(record))
                    if record["valid_loss"] < self.best_valid:
                        self.best_valid = record["valid_loss"]
                        if self.is_main:
                            self.export(state).save(self.out / "best")
                self.elapsed = time.perf_counter() - start
                self.save(state)
                last_save_time, last_save_step = time.perf_counter(), self.step
            self.elapsed = time.perf_counter() - start
            self.save(state)
        finally:
            log.close()
            if bar is not None:
                bar.close()
        return self._finish(state)

    def _log_window(self, log: Any, bar: Any, window: list[dict], step: int, started: float) -> None:
        host = host_copy(window)  # waits for the window's steps (dispatch is asynchronous)
        seconds = time.perf_counter() - started
        mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        structures = float(np.sum([m["structures"] for m in host]))
        record = {"epoch": self.epoch, "step": step, "lr": float(self.schedule(step)),
                  "structures_per_s": structures / max(seconds, 1e-9), **{f"train_{k}": v for k, v in mean.items()
                                                                          if k != "structures"}}
        log.write(json.dumps(record) + "\n")
        log.flush()
        if bar is not None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{mean['loss']:.4g}", E=f"{1e3 * mean['energy_mae']:.1f}meV/at",
                            F=f"{1e3 * mean['forces_mae']:.0f}meV/Å", struct_s=f"{record['structures_per_s']:.0f}",
                            epoch=self.epoch)

    def _finish(self, state: TrainState) -> TrainResult:
        final = self.export(state)
        if not self.is_main:
            return TrainResult(final, None, self.history, None, None, self.step, self.elapsed, self.out, self.data,
                               is_main=False, steps_run=self.step - self.start_step)
        final.save(self.out / "final")
        best_dir = self.out / "best"
        best = Potential.load(best_dir) if best_dir.exists() else None
        if best is not None and best.metadata.get("run_id") != self.run_id:
            print(f"warning: ignoring {best_dir}: another run wrote it", file=sys.stderr)
            best = None
        test_metrics = baseline = pred = None
        if self.data.test is not None and int(state.step) > 0:
            chosen = best if best is not None else final
            model_state = self.consts.replace(params=as_dtype(chosen.params, self.dtype))
            pred = predict_dataset(model_state, self.config, self.data.test, dtype=self.dtype, predict=self.predict)
            test_metrics = error_metrics(pred, self.data.test)
            baseline = error_metrics(baseline_predictions(self.data.train, self.data.test), self.data.test)
            table = format_error_table(test_metrics, baseline, "test set errors (baseline: per-element mean)")
            (self.out / "test_errors.md").write_text(table + "\n")
            (self.out / "test_errors.json").write_text(json.dumps({"model": test_metrics, "baseline": baseline},
                                                                  indent=1))
            np.savez(self.out / "test_predictions.npz", energy=pred.energy, forces=pred.forces, stress=pred.stress,
                     indices=pred.indices)
        return TrainResult(final, best, self.history, test_metrics, baseline, int(state.step), self.elapsed,
                           self.out, self.data, pred, steps_run=self.step - self.start_step)


def _epoch_line(record: dict[str, Any]) -> str:
    return (f"epoch {record['epoch']:4d} step {record['step']:7d}  valid: loss {record['valid_loss']:.4g}  "
            f"E {1e3 * record['valid_energy_mae']:.2f} meV/atom  F {1e3 * record['valid_forces_mae']:.1f} meV/Å  "
            f"S {record['valid_stress_mae'] * 160.21766:.4f} GPa  lr {record['lr']:.2e}")


def train(cfg: TrainConfig, resume: bool = False, hooks: list | None = None, overwrite: bool = False) -> TrainResult:
    """Run ``cfg`` to the end (or its ``max_steps`` / ``max_minutes``); see :class:`Trainer` and
    :func:`prepare_run_directory` (checked before the data are read)."""
    if jax.process_index() == 0:
        prepare_run_directory(cfg.out, resume, overwrite, clear=False)
    return Trainer(cfg, hooks).run(resume=resume, overwrite=overwrite)
