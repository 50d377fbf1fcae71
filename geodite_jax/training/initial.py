"""The potential a run starts from: a fresh or fine-tuned Geodite with element reference energies E0 and energy
scale chosen for the training data, and the loss normalisers derived from the same label statistics."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import GeoditeConfig
from ..elements import MPTRJ_ENERGY_SCALE, mptrj_element_energies
from ..potential import Potential
from .config import TrainConfig
from .datasets import elements_of
from .loss import LossNorms


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
