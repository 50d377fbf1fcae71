"""The training recipe: one frozen, validated dataclass, read from YAML or flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..config import GeoditeConfig
from ..precision import DTYPE_NAMES

_LOSSES = ("huber", "mse", "mae")
_SCHEDULES = ("linear", "cosine", "constant")

#: Options that may change between an interrupted run and its resumption (they do not alter the trajectory).
RESUMABLE_OPTIONS = frozenset({"epochs", "max_steps", "max_minutes", "progress", "checkpoint_every_steps",
                               "checkpoint_every_minutes", "valid_every_epochs", "out", "cache_dir"})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the data files' contents.

    Data: ``train`` is a file (any format :func:`geodite_jax.data.read_frames` reads), a preprocessed store
    directory, or ``"emt"`` (the embedded EMT set, generated on the fly). ``valid``/``test`` are files, or
    empty to split ``valid_fraction``/``test_fraction`` off the training data (by frame, seeded).

    Loss (per the Geodite recipe): energy per atom / ``energy_scale``, force components / force RMS, stress
    components / stress std, each a Huber (``huber_delta`` in those normalised units), MSE or MAE, weighted
    ``energy_weight : forces_weight : stress_weight``.

    Optimiser: AdamW; learning rate ``lr_start`` -> ``lr`` by linear warm-up over ``warmup_steps``, then
    ``schedule`` down to ``lr * lr_end_factor`` at ``decay_steps`` (0: the end of the run) and held; ZClip
    adaptive gradient clipping (z-score ``zclip_z``) and a hard cap ``max_grad_norm``; EMA of the weights
    with decay ``ema_decay`` (used for validation and the saved potentials).
    """

    # data
    train: str = "emt"
    valid: str = ""
    test: str = ""
    format: str = ""  # "" = detect from the file
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str = "stress"
    energy_label: str = "uncorrected"  # MPtrj JSON: "uncorrected" (raw VASP) or "corrected" (MP2020)
    on_error: str = "raise"  # malformed frames: "raise" or "skip"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    emt_frames: int = 1200  # size of the generated EMT set when train == "emt"
    cache_dir: str = ""  # where to keep preprocessed stores ("" = <out>/data)
    # model
    preset: str = "tiny"
    model: dict = dataclasses.field(default_factory=dict)  # GeoditeConfig overrides, e.g. {"cutoff": 5.0}
    finetune_from: str = ""  # a saved Potential to start from
    element_energies: str = "fit"  # "fit" (least squares on train), "mptrj", or "keep" (fine-tuning)
    # loss
    loss: str = "huber"
    huber_delta: float = 0.01
    energy_weight: float = 1.0
    forces_weight: float = 1.0
    stress_weight: float = 1.0
    # optimiser
    lr: float = 4.5e-4
    lr_start: float = 1e-4
    warmup_steps: int = 2000
    schedule: str = "linear"
    decay_steps: int = 0
    lr_end_factor: float = 0.0
    weight_decay: float = 0.01
    zclip_z: float = 2.5
    max_grad_norm: float = 1.0
    ema_decay: float = 0.995
    # batches and run length
    batch_size: int = 6  # structures per device per step (typical; the node/edge budget is sized for it)
    # padded shapes per run: each step is padded to the smallest of this many budgets that holds it (one
    # compilation each); 1 = every step padded to the full budget. Runs shorter than
    # trainer.MIN_STEPS_FOR_BUCKETS steps use 1 (the compilations would cost more than the padding saves).
    batch_buckets: int = 4
    epochs: int = 100
    max_steps: int = 0  # 0 = no cap
    max_minutes: float = 0.0  # 0 = no cap; stops after the step that passes it and saves
    seed: int = 0
    dtype: str = "float32"
    # bookkeeping
    out: str = "runs/geodite"
    checkpoint_every_steps: int = 500
    checkpoint_every_minutes: float = 10.0
    valid_every_epochs: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.loss in _LOSSES, f"loss must be one of {_LOSSES}, got {self.loss!r}"),
            (self.schedule in _SCHEDULES, f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}"),
            (self.dtype in DTYPE_NAMES, f"dtype must be one of {list(DTYPE_NAMES)}, got {self.dtype!r}"),
            (self.on_error in ("raise", "skip"), f"on_error must be 'raise' or 'skip', got {self.on_error!r}"),
            (self.energy_label in ("uncorrected", "corrected"),
             f"energy_label must be 'uncorrected' or 'corrected', got {self.energy_label!r}"),
            (self.element_energies in ("fit", "mptrj", "keep"),
             f"element_energies must be 'fit', 'mptrj' or 'keep', got {self.element_energies!r}"),
            (0.0 <= self.valid_fraction < 1 and 0.0 <= self.test_fraction < 1
             and self.valid_fraction + self.test_fraction < 1, "valid_fraction + test_fraction must be in [0, 1)"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.batch_buckets >= 1, f"batch_buckets must be >= 1, got {self.batch_buckets}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0 and self.lr_start >= 0, "lr must be > 0 and lr_start >= 0"),
            (0.0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (min(self.energy_weight, self.forces_weight, self.stress_weight) >= 0, "loss weights must be >= 0"),
            (self.huber_delta > 0, "huber_delta must be > 0"),
            (self.emt_frames >= 20, "emt_frames must be >= 20"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.element_energies == "keep" and not self.finetune_from:
            raise ValueError("element_energies='keep' needs finetune_from (a saved potential)")
        self.model_config()  # validates preset and overrides early

    def model_config(self) -> GeoditeConfig:
        try:
            return GeoditeConfig.preset(self.preset, **self.model)
        except TypeError as err:
            raise ValueError(f"model overrides {self.model} do not fit GeoditeConfig: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def trajectory_options(self) -> dict[str, Any]:
        """The options that define the trajectory of a run: all but :data:`RESUMABLE_OPTIONS`."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_OPTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a (YAML) dict; sections (``data:``, ``loss:``, ...) are flattened, unknown keys refused."""
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict) and key != "model":
                flat.update(value)
            else:
                flat[key] = value
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - set(known))
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: _coerce(known[k], v) for k, v in flat.items()})

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not a valid YAML recipe: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of options, got {type(data).__name__}")
        merged = cls.from_dict(data).to_dict()
        merged.update(overrides)
        return cls.from_dict(merged)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    """YAML/CLI strings to the field's type (``"1e-4"`` -> float), with a clear error."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    try:
        if kind == "float":
            return float(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind == "str":
            return "" if value is None else str(value)
        if kind == "dict":
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {field.name}: cannot read {value!r} as {kind}") from None
    return value
