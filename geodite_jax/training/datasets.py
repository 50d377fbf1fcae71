"""Training data: the train/valid/test datasets a recipe names (files, preprocessed stores or the generated EMT
set, split by frame), the labels the loss needs, and the label statistics that set the loss normalisers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GeoditeConfig
from .config import TrainConfig


@dataclasses.dataclass
class Datasets:
    train: Any
    valid: Any | None
    test: Any | None


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
    """Sorted atomic numbers present in ``ds``."""
    return sorted(int(z) for z in ds.stats.elements)
