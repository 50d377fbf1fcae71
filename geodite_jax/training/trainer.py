"""The training loop: data -> padded batches -> data-parallel optax step -> EMA -> validation -> checkpoints.

Data parallelism: every step takes ``D`` packed sub-batches of the same padded shape (``D`` = all devices of
all processes), laid out ``[D, ...]`` and sharded over a one-axis ``Mesh("data")``. Inside ``shard_map`` each
device computes loss sums and gradients of its sub-batch; gradients and sums are ``psum``-ed and divided by
the global label counts, so the step equals the single-device step on the same global batch.

Exact resume: the data order is a function of (seed, epoch), dropout keys of (seed, step, sub-batch), and the
checkpoint holds params, EMA, optimiser and clipping state, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import GeoditeConfig
from ..elements import MPTRJ_ENERGY_SCALE, mptrj_element_energies
from ..energy import PotentialState, as_dtype, make_predict_fn
from ..files import recover_directory
from ..potential import Potential
from ..precision import resolve_dtype
from .checkpoint import load_checkpoint, load_checkpoint_meta, save_checkpoint
from .config import TrainConfig
from .evaluation import (
    Predictions,
    baseline_predictions,
    error_metrics,
    format_error_table,
    predict_dataset,
)
from .loss import LossNorms, combine, counts, loss_sums
from .optim import ema_update, make_optimizer

# Options that may change between an interrupted run and its resumption (they do not alter the trajectory).
_RESUMABLE_CHANGES = {"epochs", "max_steps", "max_minutes", "progress", "checkpoint_every_steps",
                      "checkpoint_every_minutes", "valid_every_epochs", "out", "cache_dir"}


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # optimiser steps taken
    params: Any
    ema: Any  # exponential moving average of params (validated and saved)
    opt_state: Any


@dataclasses.dataclass
class Datasets:
    train: Any
    valid: Any | None
    test: Any | None


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


# ------------------------------------------------------------------------------------------ run directory
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


# --------------------------------------------------------------------------------------------- labels
_LABEL_OPTIONS = {"energy": ("energy_key", "--energy-key"), "forces": ("forces_key", "--forces-key"),
                  "stress": ("stress_key", "--stress-key")}


def check_labels(ds: Any, cfg: TrainConfig) -> list[str]:
    """Refuse training data without the labels the loss needs; return warnings for partly labelled data.

    Errors: no frame with an energy (needed by the energy loss and the least-squares E0), or no frame with
    forces / stress while ``forces_weight`` / ``stress_weight`` > 0 (stress only if a frame is periodic:
    molecules have none). The message names the key looked for, the option that selects it, and the keys
    found in the file.
    """
    flags = ds.label_flags()
    n = len(ds)
    weights = {"energy": cfg.energy_weight, "forces": cfg.forces_weight, "stress": cfg.stress_weight}
    needed = {"energy": cfg.energy_weight > 0 or cfg.element_energies == "fit", "forces": cfg.forces_weight > 0,
              "stress": cfg.stress_weight > 0 and bool(np.asarray(ds.pbc).any())}
    warnings = []
    for label, have in flags.items():
        count = int(np.sum(have))
        field, flag = _LABEL_OPTIONS[label]
        key = getattr(cfg, field)
        if count == 0 and needed[label]:
            source = cfg.train
            found = ""
            if source != "emt" and Path(source).is_file():
                from ..data.readers import describe_label_keys

                keys = describe_label_keys(source, cfg.format or None)
                found = f"; keys found in the file: {keys}" if keys else ""
            hint = (f"select the key with {flag} (or {field}: in the recipe)"
                    + (f", or set {label}_weight: 0 to train without it" if label != "energy" else ""))
            raise ValueError(f"training data {source}: none of its {n} frames has the {label} label (looked for "
                             f"the key {key!r}; {hint}){found}")
        if 0 < count < n and (weights[label] > 0 or label == "energy"):
            warnings.append(f"{n - count} of {n} training frames have no {label} label (key {key!r}); they "
                            f"are trained without it")
    return warnings


# ----------------------------------------------------------------------------------------------- data
def _cache_key(path: Path, cfg: TrainConfig, cutoff: float) -> str:
    stat = path.stat()
    key = json.dumps([str(path.absolute()), stat.st_size, stat.st_mtime_ns, cutoff, cfg.format, cfg.energy_key,
                      cfg.forces_key, cfg.stress_key, cfg.energy_label, cfg.on_error])
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def open_dataset(source: str, cfg: TrainConfig, cutoff: float, num_elements: int, cache: Path) -> Any:
    """A :class:`GraphDataset` from a preprocessed store directory or from any data file (preprocessed once
    into ``cache``, keyed by the file's path, size, mtime, the cutoff and the reading options)."""
    from ..data import GraphDataset, preprocess, read_frames

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"training data {source} not found")
    if path.is_dir() and (path / "dataset.json").is_file():
        ds = GraphDataset.open(path)
        ds.require_cutoff(cutoff)
        return ds
    store = cache / f"{path.stem}-{_cache_key(path, cfg, cutoff)}"
    if (store / "dataset.json").is_file():
        return GraphDataset.open(store)
    frames = read_frames(path, cfg.format or None, energy_key=cfg.energy_key, forces_key=cfg.forces_key,
                         stress_key=cfg.stress_key, energy=cfg.energy_label, on_error=cfg.on_error)
    return preprocess(frames, store, cutoff=cutoff, num_elements=num_elements, progress=cfg.progress)


def load_datasets(cfg: TrainConfig, model_config: GeoditeConfig) -> Datasets:
    """Train/valid/test datasets as the config says (files, stores, or ``"emt"``; splits by frame, seeded)."""
    from ..data import GraphDataset, generate_emt_frames

    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out) / "data"
    cutoff, ne = model_config.cutoff, model_config.num_elements
    if cfg.train == "emt":
        train = GraphDataset.from_frames(generate_emt_frames(cfg.emt_frames, seed=cfg.seed), cutoff, ne)
    else:
        train = open_dataset(cfg.train, cfg, cutoff, ne, cache)
    valid = open_dataset(cfg.valid, cfg, cutoff, ne, cache) if cfg.valid else None
    test = open_dataset(cfg.test, cfg, cutoff, ne, cache) if cfg.test else None
    fractions = (0.0 if valid is not None else cfg.valid_fraction, 0.0 if test is not None else cfg.test_fraction)
    if any(fractions):
        order = np.random.default_rng(cfg.seed).permutation(len(train))
        n_valid, n_test = (int(round(f * len(train))) for f in fractions)
        if len(train) - n_valid - n_test < 1:
            raise ValueError(f"{len(train)} frames are too few to split off validation and test sets")
        if n_valid:
            valid = train.subset(np.sort(order[:n_valid]))
        if n_test:
            test = train.subset(np.sort(order[n_valid:n_valid + n_test]))
        train = train.subset(np.sort(order[n_valid + n_test:]))
    if len(train) == 0:
        raise ValueError("the training set is empty")
    return Datasets(train, valid, test)


def label_statistics(ds: Any, max_frames: int = 20_000, seed: int = 0) -> dict[str, float]:
    """Force RMS (eV/Å) and stress std (eV/Å³) of (a seeded sample of) the training labels.

    Computed on ``ds`` itself rather than read from the store's :class:`DatasetStats`, which cover every
    frame of the store, validation frames included, and hold no stress statistic.
    """
    idx = np.arange(len(ds))
    if len(idx) > max_frames:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_frames, replace=False))
    forces, stresses = [], []
    for i in idx:
        lab = ds.labels(int(i))
        if lab["has_forces"]:
            forces.append(np.asarray(lab["forces"]).ravel())
        if lab["has_stress"]:
            stresses.append(np.asarray(lab["stress"]).ravel())
    force_rms = float(np.sqrt(np.mean(np.concatenate(forces) ** 2))) if forces else 0.0
    stress_std = float(np.std(np.concatenate(stresses))) if stresses else 0.0
    return {"force_rms": force_rms, "stress_std": stress_std}


def elements_of(ds: Any) -> list[int]:
    return sorted(int(z) for z in ds.stats.elements)


# ---------------------------------------------------------------------------------------------- model
def initial_potential(cfg: TrainConfig, train: Any, stats: dict[str, float]) -> Potential:
    """Fresh or fine-tuned potential with element energies and energy scale chosen for the training data.

    Fresh: E0 by least squares on the training energies ("fit") or Geodite-MP's table ("mptrj"); energy
    scale = force RMS of the data (as MACE and Nequix do; "mptrj" keeps Geodite-MP's s_E). Fine-tuning keeps
    the loaded model's energy scale; "keep" keeps its E0 and fits only elements it has not seen.
    """
    from ..data import fit_element_energies

    if cfg.finetune_from:
        base = Potential.load(cfg.finetune_from)
        if cfg.model and GeoditeConfig.from_dict({**base.config.to_dict(), **cfg.model}) != base.config:
            raise ValueError(f"model overrides {cfg.model} do not fit the potential at {cfg.finetune_from} "
                             f"(its config: {base.config.to_dict()})")
        e0 = base.element_energies.copy()
        if cfg.element_energies == "fit":
            e0 = fit_element_energies(train)
        elif cfg.element_energies == "mptrj":
            e0 = mptrj_element_energies()
        else:  # keep the known references, fit the new elements' on what the old ones leave unexplained
            new = sorted(set(elements_of(train)) - set(base.metadata.get("elements", np.flatnonzero(e0))))
            if new:
                fitted = fit_element_energies(train, fixed={int(z): float(e0[z]) for z in np.flatnonzero(e0)})
                e0[new] = fitted[new]
        elements = sorted(set(base.metadata.get("elements", [])) | set(elements_of(train)))
        return Potential(base.config, base.params, e0, base.energy_scale,
                         {**base.metadata, "elements": elements, "finetuned_from": str(cfg.finetune_from)})
    model_config = cfg.model_config()
    if cfg.element_energies == "mptrj":
        pot = Potential.init(model_config, cfg.seed, "mptrj", MPTRJ_ENERGY_SCALE)
    else:
        scale = stats["force_rms"] if stats["force_rms"] > 0 else 1.0
        pot = Potential.init(model_config, cfg.seed, fit_element_energies(train), scale)
    return Potential(pot.config, pot.params, pot.element_energies, pot.energy_scale,
                     {"seed": cfg.seed, "elements": elements_of(train)})


def loss_norms(pot: Potential, stats: dict[str, float]) -> LossNorms:
    """Normalisers of the loss: energy per atom by the potential's energy scale, forces by their RMS, stress
    by its std (the Geodite recipe); 1 where the data have no such label."""
    return LossNorms(energy=pot.energy_scale, forces=stats["force_rms"] or 1.0, stress=stats["stress_std"] or 1.0)


# ----------------------------------------------------------------------------------------------- step
def make_mesh(devices: list | None = None) -> Mesh:
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def make_train_step(model_config: GeoditeConfig, optimizer: optax.GradientTransformation, norms: LossNorms,
                    cfg: TrainConfig, mesh: Mesh) -> Callable[..., tuple[TrainState, dict]]:
    """``step(state, batch [D, ...], consts, key) -> (state, metrics)``, jitted and sharded over ``mesh``.

    ``consts``: a :class:`PotentialState` without params (E0 and s_E, not trained); ``key`` seeds dropout.
    """
    predict = make_predict_fn(model_config)
    weights = {"energy": cfg.energy_weight, "forces": cfg.forces_weight, "stress": cfg.stress_weight}
    dropout = model_config.attention_dropout > 0

    def device_step(state: TrainState, batch: Any, consts: PotentialState, key: jax.Array) -> tuple[TrainState, dict]:
        n_local = batch.energy.shape[0]
        first = jax.lax.axis_index("data") * n_local  # global index of this device's first sub-batch
        total = jax.lax.psum(counts(batch), "data")  # counts are sums: the [L, ...] axis needs no loop

        def local_loss(params: Any) -> tuple[jax.Array, dict]:
            model_state = consts.replace(params=params)

            def one(sub: Any, i: jax.Array) -> dict:
                rng = jax.random.fold_in(jax.random.fold_in(key, state.step), first + i) if dropout else None
                pred = predict(model_state, sub.graph, None, rng)
                return loss_sums(pred, sub, norms, cfg.loss, cfg.huber_delta)

            # A static loop, not vmap: batched scatters of a vmapped model are several times slower on CPU.
            parts = [one(jax.tree_util.tree_map(lambda x, i=i: x[i], batch), jnp.asarray(i)) for i in range(n_local)]
            sums = jax.tree_util.tree_map(lambda *xs: sum(xs[1:], xs[0]), *parts)
            loss, _ = combine(sums, total, weights)
            return loss, sums

        (_, sums), grads = jax.value_and_grad(local_loss, has_aux=True)(state.params)
        grads, sums = jax.lax.psum((grads, sums), "data")
        _, metrics = combine(sums, total, weights)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["structures"] = total["energy"]
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema, params, state.step, cfg.ema_decay)
        return TrainState(state.step + 1, params, ema, opt_state), metrics

    # check_vma=False: differentiation inside treats params and the strain as per-device values (no implicit
    # psum of their cotangents); the one reduction over devices is the explicit psum above.
    sharded = jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P("data"), P(), P()), out_specs=(P(), P()),
                            check_vma=False)
    return jax.jit(sharded, donate_argnums=(0,))


@functools.lru_cache(maxsize=8)
def _compiled_step(model_config: GeoditeConfig, recipe: str, norms: LossNorms, total_steps: int,
                   mesh: Mesh) -> Callable[..., tuple[TrainState, dict]]:
    # Runs with the same trajectory-defining options share one jitted step (and so one compilation):
    # a resumed run, or the runs of a test, do not compile again.
    cfg = TrainConfig.from_dict(json.loads(recipe))
    optimizer, _ = make_optimizer(cfg, total_steps)
    return make_train_step(model_config, optimizer, norms, cfg, mesh)


@functools.lru_cache(maxsize=8)
def _compiled_predict(model_config: GeoditeConfig) -> Callable[..., dict]:
    return jax.jit(make_predict_fn(model_config))


def host_copy(tree: Any) -> Any:
    """NumPy copy of a replicated pytree from this process's first device (works with several processes,
    where a global array is not fully addressable by any one of them)."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree on every device of ``mesh`` (the step's outputs live there too: same types, no recompile)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def put_batch(batch: Any, mesh: Mesh, dtype: Any) -> Any:
    """Host batch ``[D, ...]`` (numpy) -> global arrays sharded over the mesh's data axis; floats to ``dtype``.

    With several processes, each passes the same global batch and contributes the rows of its own devices.
    """
    sharding = NamedSharding(mesh, P("data"))

    def convert(x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            x = x.astype(dtype)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        per = x.shape[0] // jax.process_count()
        local = x[jax.process_index() * per:(jax.process_index() + 1) * per]
        return jax.make_array_from_process_local_data(sharding, local, x.shape)

    return jax.tree_util.tree_map(convert, batch)


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
        self.optimizer, self.schedule = make_optimizer(cfg, self.total_steps)
        self.consts = self.potential.state(self.dtype).replace(params=None)
        recipe = {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE_CHANGES}
        self.step_fn = _compiled_step(self.config, json.dumps(recipe, sort_keys=True), self.norms,
                                      self.total_steps, self.mesh)
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
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, self.dtype), self.potential.params)
        ema = jax.tree_util.tree_map(jnp.copy, params)  # own buffers: the step donates its input state
        return TrainState(jnp.zeros((), jnp.int32), params, ema, self.optimizer.init(params))

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
                if k not in _RESUMABLE_CHANGES and saved.get(k) != v}
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
        for batch in iterate_batches(ds, np.arange(len(ds)), self.budget, shuffle=False):
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
                                          start=self.batch_in_epoch)
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
