"""Chunked evaluation over receiver nodes: the same numbers as one pass, and bounded intermediates."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk

import geodite_jax as gd
from geodite_jax import fused
from geodite_jax.edges import chunk_nodes


@pytest.fixture(scope="module")
def block_batch(tiny):
    """A rattled 16-atom Si cell in the neighbour-block layout, padded to a prime node count (17)."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((1, 1, 2))
    atoms.rattle(0.08, seed=3)
    graph = gd.atoms_to_graph(atoms, tiny.config.cutoff, tiny.config.num_elements, np.float64)
    block = gd.max_degree([graph]) + 2
    batch = gd.batch_graphs([graph], 17, None, 2, neighbours_per_node=block)
    return jax.tree_util.tree_map(jnp.asarray, batch), block


def predict(pot, batch, block, chunk_edges, **kwargs):
    fn = jax.jit(gd.make_predict_fn(pot.config, neighbours_per_node=block, chunk_edges=chunk_edges))
    return fn(pot.state(jnp.float64), batch, **kwargs)


@pytest.mark.parametrize("nodes_per_chunk", [pytest.param(1, marks=pytest.mark.slow), 5])  # 1: -m slow (suite time)
def test_chunked_equals_one_pass_in_float64(tiny, block_batch, nodes_per_chunk):
    batch, block = block_batch
    chunk = chunk_nodes(17, block, nodes_per_chunk * block)
    assert chunk is not None and chunk <= nodes_per_chunk
    whole = predict(tiny, batch, block, 0)
    chunked = predict(tiny, batch, block, nodes_per_chunk * block)
    for key in ("energy", "forces", "stress", "node_energies", "nn_per_layer"):
        np.testing.assert_allclose(chunked[key], whole[key], rtol=0, atol=1e-10, err_msg=key)


def test_chunk_sizes_balance_and_pad_little():
    assert chunk_nodes(1000, 40, 40 * 1000) is None  # fits one chunk
    assert chunk_nodes(1000, 40, None) is None and chunk_nodes(1000, 40, 0) is None  # chunking off
    assert chunk_nodes(1000, None, 64) is None  # sparse layout: one pass
    assert chunk_nodes(1000, 40, 1024) == 25  # a divisor: no padding
    size = chunk_nodes(67, 10, 50)  # prime node count: padded by less than one chunk
    assert size <= 5 and math.ceil(67 / size) * size - 67 < size


@pytest.mark.slow  # training batches use the sparse layout today (one pass); ~25 s of compilation
def test_parameter_gradients_of_a_force_loss_match(tiny, block_batch):
    """Training differentiates forces with respect to the parameters: chunks must not change that either."""
    batch, block = block_batch

    def loss(chunk_edges):
        fn = gd.make_predict_fn(tiny.config, neighbours_per_node=block, chunk_edges=chunk_edges)

        def value(params):
            out = fn(tiny.state(jnp.float64).replace(params=params), batch)
            return out["energy"][0] ** 2 + jnp.sum(out["forces"] ** 2) + jnp.sum(out["stress"] ** 2)

        return jax.jit(jax.value_and_grad(value))(tiny.state(jnp.float64).params)

    (v0, g0), (v1, g1) = loss(0), loss(4 * block)
    np.testing.assert_allclose(v1, v0, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.slow  # dropout is a training feature (sparse layout today)
def test_attention_dropout_does_not_depend_on_chunks(tiny, block_batch):
    batch, block = block_batch
    rng = jax.random.PRNGKey(5)
    whole = predict(tiny, batch, block, 0, dropout_rng=rng)
    chunked = predict(tiny, batch, block, 3 * block, dropout_rng=rng)
    deterministic = predict(tiny, batch, block, 0)
    assert abs(float(whole["energy"][0] - deterministic["energy"][0])) > 1e-6  # dropout did act
    np.testing.assert_allclose(chunked["forces"], whole["forces"], atol=1e-10)
    np.testing.assert_allclose(chunked["energy"], whole["energy"], atol=1e-10)


def _largest_intermediate(jaxpr) -> int:
    """Largest number of elements of any value produced anywhere in a (closed) jaxpr, sub-jaxprs included."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            subs = param if isinstance(param, (tuple, list)) else (param,)
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_intermediate(inner))
    return largest


def test_no_edge_steerable_array_exists_whole(tiny, block_batch):
    """Forces and stress never build an [E, 8, F] (or larger) array, forward or backward: chunked in XLA, or
    with the fused kernels (which contract the sender gathers without forming one, chunks or not)."""
    batch, block = block_batch
    n_edges, f = batch.senders.shape[0], tiny.config.num_features
    state = tiny.state(jnp.float64)
    sizes = {}
    variants = [(0, False), (4 * block, False)] + [(0, True), (4 * block, True)] * fused.available()
    for chunk_edges, use_fused in variants:
        fn = gd.make_predict_fn(tiny.config, neighbours_per_node=block, chunk_edges=chunk_edges, fused=use_fused)
        sizes[chunk_edges, use_fused] = _largest_intermediate(jax.make_jaxpr(fn)(state, batch).jaxpr)
    assert sizes.pop((0, False)) >= n_edges * 8 * f  # the one-pass XLA model does (so the check can fail)
    for variant, size in sizes.items():
        assert size <= 3 * n_edges * f, variant  # at most a few [E, F]-sized arrays (chunk padding included)


def test_memory_oriented_scheduler_is_set_at_import_unless_the_user_chose(monkeypatch):
    import os
    import subprocess
    import sys

    from geodite_jax.xla_setup import SCHEDULER_FLAG, apply_default_xla_flags

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GEODITE_XLA_FLAGS")}
    code = "import os, geodite_jax; print(os.environ.get('XLA_FLAGS', ''))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == SCHEDULER_FLAG  # importing geodite_jax sets it
    for given, opt_out, expected in [("--xla_foo=1 threads=2", None, f"{SCHEDULER_FLAG} --xla_foo=1 threads=2"),
                                     ("--xla_cpu_enable_concurrency_optimized_scheduler=true", None,
                                      "--xla_cpu_enable_concurrency_optimized_scheduler=true"),
                                     ("", "0", "")]:
        monkeypatch.setenv("XLA_FLAGS", given)
        if opt_out is None:
            monkeypatch.delenv("GEODITE_XLA_FLAGS", raising=False)
        else:
            monkeypatch.setenv("GEODITE_XLA_FLAGS", opt_out)
        apply_default_xla_flags()
        assert os.environ["XLA_FLAGS"] == expected
