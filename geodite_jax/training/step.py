"""The data-parallel train step: one optax update of a :class:`TrainState` from a sharded global batch, and a
public builder of a step with its initial state for scripts (``experiments/bench_train.py``).

Every step takes ``D`` packed sub-batches of the same padded shape (``D`` = all devices of all processes), laid
out ``[D, ...]`` and sharded over a one-axis ``Mesh("data")``. Inside ``shard_map`` each device computes loss
sums and gradients of its sub-batch; gradients and sums are ``psum``-ed and divided by the global label counts,
so the step equals the single-device step on the same global batch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..config import GeoditeConfig
from ..energy import PotentialState, make_predict_fn
from ..potential import Potential
from ..precision import resolve_dtype
from .config import TrainConfig
from .loss import LossNorms, combine, counts, loss_sums
from .optim import ema_update, make_optimizer
from .sharding import replicate


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # optimiser steps taken
    params: Any
    ema: Any  # exponential moving average of params (validated and saved)
    opt_state: Any


def initial_train_state(params: Any, optimizer: optax.GradientTransformation, dtype: Any) -> TrainState:
    """Step 0: ``params`` cast to ``dtype``, the EMA a copy of them, the optimiser's initial state."""
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    ema = jax.tree_util.tree_map(jnp.copy, params)  # own buffers: the step donates its input state
    return TrainState(jnp.zeros((), jnp.int32), params, ema, optimizer.init(params))


def make_train_step(model_config: GeoditeConfig, optimizer: optax.GradientTransformation, norms: LossNorms,
                    cfg: TrainConfig, mesh: Mesh, fused: bool | None = None) -> Callable[..., tuple[TrainState, dict]]:
    """``step(state, batch [D, ...], consts, key) -> (state, metrics)``, jitted and sharded over ``mesh``.

    ``consts``: a :class:`PotentialState` without params (E0 and s_E, not trained); ``key`` seeds dropout.
    ``fused``: the fused CPU kernels (see :class:`~geodite_jax.model.Geodite`; None: where available).
    """
    predict = make_predict_fn(model_config, fused=fused)
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
                   mesh: Mesh, fused: bool | None) -> Callable[..., tuple[TrainState, dict]]:
    # Runs with the same trajectory-defining options share one jitted step (and so one compilation):
    # a resumed run, or the runs of a test, do not compile again.
    cfg = TrainConfig.from_dict(json.loads(recipe))
    optimizer, _ = make_optimizer(cfg, total_steps)
    return make_train_step(model_config, optimizer, norms, cfg, mesh, fused)


def compiled_train_step(model_config: GeoditeConfig, cfg: TrainConfig, norms: LossNorms, total_steps: int,
                        mesh: Mesh, fused: bool | None = None) -> Callable[..., tuple[TrainState, dict]]:
    """:func:`make_train_step` with ``cfg``'s optimiser scheduled over ``total_steps``, shared by every run with
    the same trajectory-defining options (:meth:`TrainConfig.trajectory_options`)."""
    recipe = json.dumps(cfg.trajectory_options(), sort_keys=True)
    return _compiled_step(model_config, recipe, norms, total_steps, mesh, fused)


def build_train_step(potential: Potential, cfg: TrainConfig, mesh: Mesh, norms: LossNorms,
                     total_steps: int, fused: bool | None = None
                     ) -> tuple[Callable[..., tuple[TrainState, dict]], TrainState, PotentialState]:
    """``(step, state, consts)`` of a run of ``cfg`` from ``potential``, ready for ``step(state, batch, consts,
    key)``: the jitted sharded step (:func:`compiled_train_step`), step 0 of the training state in ``cfg.dtype``
    and the untrained constants (E0, s_E), both replicated over ``mesh``. Batches come from
    :func:`~geodite_jax.training.sharding.put_batch`, ``key`` from ``replicate(jax.random.PRNGKey(seed), mesh)``.
    """
    dtype = resolve_dtype(cfg.dtype)
    optimizer, _ = make_optimizer(cfg, total_steps)
    step = compiled_train_step(potential.config, cfg, norms, total_steps, mesh, fused)
    state = replicate(initial_train_state(potential.params, optimizer, dtype), mesh)
    consts = replicate(potential.state(dtype).replace(params=None), mesh)
    return step, state, consts

