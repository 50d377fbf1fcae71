"""Optimiser pieces of the Geodite recipe: learning-rate schedule, ZClip gradient clipping, AdamW, EMA."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up ``lr_start -> lr`` over ``warmup_steps``, then linear/cosine decay to ``lr·lr_end_factor``
    at step ``decay_steps`` (0: ``total_steps``), held after that; ``schedule="constant"`` keeps ``lr``."""
    warmup = max(0, min(cfg.warmup_steps, total_steps // 2 if cfg.decay_steps == 0 else cfg.warmup_steps))
    end = cfg.lr * cfg.lr_end_factor
    decay_until = cfg.decay_steps or total_steps
    span = max(1, decay_until - warmup)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, end, span)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, span, alpha=cfg.lr_end_factor)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(cfg.lr_start, cfg.lr, warmup), after], [warmup])


class ZClipState(NamedTuple):
    mean: jax.Array  # running mean of the global gradient norm
    var: jax.Array  # running variance
    count: jax.Array  # steps seen


def zclip(z_threshold: float = 2.5, alpha: float = 0.97, warmup: int = 25, max_norm: float = 1.0,
          ) -> optax.GradientTransformation:
    """Adaptive clipping by the z-score of the global gradient norm (ZClip), then a hard cap at ``max_norm``.

    An exponential moving mean/variance (``alpha``) of the norm is tracked; after ``warmup`` steps a norm
    with z > ``z_threshold`` is scaled down to ``mean + z_threshold·std / (z / z_threshold)`` (a spike is
    cut harder the further out it is). Statistics are updated with the clipped norm, so one spike does not
    inflate them. ``z_threshold <= 0`` disables the adaptive part.
    """

    def init(params: Any) -> ZClipState:
        del params
        return ZClipState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

    def update(updates: Any, state: ZClipState, params: Any = None) -> tuple[Any, ZClipState]:
        del params
        norm = optax.global_norm(updates).astype(jnp.float32)
        std = jnp.sqrt(jnp.maximum(state.var, 0.0))
        z = (norm - state.mean) / jnp.maximum(std, 1e-12)
        active = (z_threshold > 0) & (state.count >= warmup) & (z > z_threshold)
        target = jnp.where(active, state.mean + z_threshold * std / jnp.maximum(z / z_threshold, 1.0), norm)
        target = jnp.minimum(target, max_norm) if max_norm > 0 else target
        scale = jnp.where(norm > target, target / jnp.maximum(norm, 1e-12), 1.0)
        updates = jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), updates)
        first = state.count == 0
        mean = jnp.where(first, target, alpha * state.mean + (1 - alpha) * target)
        var = jnp.where(first, 0.0, alpha * state.var + (1 - alpha) * (target - state.mean) ** 2)
        return updates, ZClipState(mean, var, state.count + 1)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``chain(zclip, adamw)`` with the recipe's schedule; weight decay on all parameters, as the authors do."""
    schedule = learning_rate_schedule(cfg, total_steps)
    opt = optax.chain(zclip(cfg.zclip_z, max_norm=cfg.max_grad_norm),
                      optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=cfg.weight_decay))
    return opt, schedule


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """``ema <- d·ema + (1-d)·params`` with ``d = min(decay, (1+step)/(10+step))``: the short warm-up keeps the
    average from being dominated by the random initialisation in short runs."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree_util.tree_map(lambda e, p: (d * e + (1 - d) * p).astype(e.dtype), ema, params)
