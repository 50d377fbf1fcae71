"""Training: recipe (:class:`TrainConfig`), data (:mod:`.datasets`), the starting potential (:mod:`.initial`),
losses, optimiser, the data-parallel step (:mod:`.step`, :mod:`.sharding`), the :class:`Trainer` loop, checkpoints,
evaluation."""

from .checkpoint import atomic_directory, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .datasets import load_datasets
from .evaluation import (
    Predictions,
    baseline_predictions,
    error_metrics,
    format_error_table,
    predict_dataset,
    predict_potential,
)
from .loss import LossNorms
from .step import TrainState, build_train_step, make_train_step
from .trainer import Trainer, TrainResult, train

# The README's main job (`geodite train` without --config): a small Geodite on the generated EMT set,
# about seven minutes on 2 CPU cores. configs/emt-demo.yaml holds the same recipe (a test checks they agree).
DEMO_RECIPE: dict = {
    "train": "emt", "emt_frames": 1200, "valid_fraction": 0.1, "test_fraction": 0.1,
    "preset": "tiny", "model": {"attention_dropout": 0.0},
    "loss": "huber", "huber_delta": 0.01, "energy_weight": 1.0, "forces_weight": 1.0, "stress_weight": 1.0,
    "lr": 3e-3, "lr_start": 3e-4, "warmup_steps": 200, "schedule": "cosine", "lr_end_factor": 0.01,
    "weight_decay": 0.0, "ema_decay": 0.99, "batch_size": 8, "epochs": 14, "max_minutes": 12.0,
    "out": "runs/emt-demo", "checkpoint_every_minutes": 2.0, "seed": 0,
}

__all__ = [
    "DEMO_RECIPE", "LossNorms", "Predictions", "TrainConfig", "TrainResult", "TrainState", "Trainer",
    "atomic_directory", "baseline_predictions", "build_train_step", "error_metrics", "format_error_table",
    "load_checkpoint", "load_datasets", "make_train_step", "predict_dataset", "predict_potential", "save_checkpoint",
    "train",
]
