"""The fused CPU kernels (geodite_jax.fused): the XLA reference numbers, derivatives to second order, and the
same model numbers as the chunked XLA path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk

import geodite_jax as gd
from geodite_jax import fused

pytestmark = pytest.mark.skipif(not fused.available(),
                                reason=f"fused kernels unavailable: {fused.unavailable_reason()}")

N, M, S, F = 7, 5, 8, 6
E = N * M
#: Output rows and node arguments beyond the arrays, per kernel (receiver rows, sender rows).
ROWS = {"gather_sum": (N,), "edge_dot": (), "scatter_sum": (N,), "proj": (), "proj_dc": (), "proj_dx": (N,),
        "outer_sum": (N,), "outer_do": (), "outer_dy": ()}


def indices(rng: np.random.Generator, layout: str) -> tuple[jax.Array, jax.Array]:
    """``(senders, receivers)``: blocks of M (receiver e // M), or sorted receivers of varying degree with an
    empty row (the sparse layout)."""
    senders = jnp.asarray(rng.integers(0, N, E), jnp.int32)
    if layout == "block":
        return senders, jnp.arange(E, dtype=jnp.int32) // M
    rows = np.sort(rng.choice([r for r in range(N) if r != 2], E))
    return senders, jnp.asarray(rows, jnp.int32)


def operands(name: str, rng: np.random.Generator) -> tuple[jax.Array, jax.Array]:
    shapes = {"gather_sum": ((E, F), (N, S, F)), "edge_dot": ((N, S, F), (N, S, F)),
              "scatter_sum": ((E, F), (N, S, F)), "proj": ((E, S), (N, S, F)),
              "proj_dc": ((E, 2, F), (N, S, F)), "proj_dx": ((E, S), (E, 2, F)), "outer_sum": ((E, F), (E, S)),
              "outer_do": ((N, S, F), (E, S)), "outer_dy": ((N, S, F), (E, F))}[name]
    return tuple(jnp.asarray(rng.normal(size=shape)) for shape in shapes)


def kernel_fn(name: str, senders: jax.Array, receivers: jax.Array):
    op = getattr(fused, name)
    if name.startswith("proj"):
        return lambda a, b: op(a, b, senders, *ROWS[name])
    if name.startswith("outer"):
        return lambda a, b: op(a, b, receivers, *ROWS[name])
    return lambda a, b: op(a, b, senders, receivers, *ROWS[name])


@pytest.mark.parametrize("layout", ["block", "sparse"])
@pytest.mark.parametrize("name", sorted(ROWS))
def test_kernels_match_xla_to_second_order(name, layout):
    rng = np.random.default_rng(0)
    senders, receivers = indices(rng, layout)
    a, b = operands(name, rng)
    kernel = kernel_fn(name, senders, receivers)
    ref = lambda a, b: fused.reference(name, a, b, senders, receivers, N)  # noqa: E731
    np.testing.assert_allclose(jax.jit(kernel)(a, b), ref(a, b), rtol=0, atol=1e-13)

    def first(fn, a, b):  # a force-like derivative
        return jax.grad(lambda a, b: jnp.sum(jnp.sin(fn(a, b))), argnums=(0, 1))(a, b)

    def second(fn, a, b):  # a force-loss parameter gradient
        return jax.grad(lambda a, b: sum(jnp.sum(g**2) for g in first(fn, a, b)), argnums=(0, 1))(a, b)

    for got, want in zip(first(kernel, a, b) + second(kernel, a, b), first(ref, a, b) + second(ref, a, b),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-11)


@pytest.mark.parametrize("layout", ["block", "sparse"])
def test_projected_dot_matches_xla_to_second_order(layout):
    rng = np.random.default_rng(2)
    senders, receivers = indices(rng, layout)
    q, k = (jnp.asarray(rng.normal(size=(N, S, F))) for _ in range(2))
    y = jnp.asarray(rng.normal(size=(E, S)))
    block = M if layout == "block" else None
    kernel = lambda q, k, y: fused.projected_dot(q, k, y, senders, receivers, block)  # noqa: E731
    ref = lambda q, k, y: fused.reference_projected_dot(q, k, y, senders, receivers)  # noqa: E731
    np.testing.assert_allclose(jax.jit(kernel)(q, k, y), ref(q, k, y), rtol=0, atol=1e-13)

    def first(fn, *args):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))(*args)

    def second(fn, *args):
        return jax.grad(lambda *a: sum(jnp.sum(g**2) for g in first(fn, *a)), argnums=(0, 1, 2))(*args)

    for got, want in zip(first(kernel, q, k, y) + second(kernel, q, k, y), first(ref, q, k, y) + second(ref, q, k, y),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


def test_float32_and_vmap():
    rng = np.random.default_rng(1)
    senders, receivers = indices(rng, "sparse")
    w, x = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, E, F), (N, S, F)))
    out = jax.vmap(lambda w: fused.gather_sum(w, x, senders, receivers, N))(w)
    assert out.dtype == jnp.float32 and out.shape == (2, N, S, F)
    np.testing.assert_allclose(out[1], fused.reference("gather_sum", w[1], x, senders, receivers, N),
                               rtol=1e-5, atol=1e-5)


def test_unsorted_or_out_of_range_indices_are_refused():
    rng = np.random.default_rng(3)
    senders, receivers = indices(rng, "sparse")
    w, x = jnp.ones((E, F)), jnp.ones((N, S, F))
    with pytest.raises(Exception, match="receivers not sorted"):
        jax.block_until_ready(fused.gather_sum(w, x, senders, receivers[::-1], N))
    with pytest.raises(Exception, match="receiver index out of range"):
        jax.block_until_ready(fused.gather_sum(w, x, senders, receivers, N - 2))
    with pytest.raises(Exception, match="sender index out of range"):
        jax.block_until_ready(fused.gather_sum(w, x, senders + N, receivers, N))


@pytest.fixture(scope="module")
def block_batch(tiny):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 1))
    atoms.numbers[::3] = 28
    atoms.rattle(0.08, seed=4)
    graph = gd.atoms_to_graph(atoms, tiny.config.cutoff, tiny.config.num_elements, np.float64)
    block = gd.max_degree([graph]) + 2
    return jax.tree_util.tree_map(jnp.asarray, gd.batch_graphs([graph], 17, None, 2, neighbours_per_node=block)), block


@pytest.mark.parametrize("chunk_edges", [pytest.param(0, marks=pytest.mark.slow), 96])  # 0: -m slow (suite time)
def test_model_numbers_equal_the_xla_path_in_float64(tiny, block_batch, chunk_edges):
    batch, block = block_batch
    state = tiny.state(jnp.float64)
    out = {f: jax.jit(gd.make_predict_fn(tiny.config, neighbours_per_node=block, chunk_edges=chunk_edges,
                                         fused=f))(state, batch) for f in (False, True)}
    for key in ("energy", "forces", "stress", "nn_per_layer"):
        np.testing.assert_allclose(out[True][key], out[False][key], rtol=0, atol=1e-10, err_msg=key)


@pytest.mark.slow  # 16 s; training uses the sparse layout (tested above), the kernels' second derivatives too
def test_force_loss_parameter_gradients_equal_the_xla_path(tiny, block_batch):
    batch, block = block_batch

    def grads(f):
        fn = gd.make_predict_fn(tiny.config, neighbours_per_node=block, chunk_edges=0, fused=f)

        def loss(params):
            out = fn(tiny.state(jnp.float64).replace(params=params), batch)
            return out["energy"][0] ** 2 + jnp.sum(out["forces"] ** 2) + jnp.sum(out["stress"] ** 2)

        return jax.jit(jax.grad(loss))(tiny.state(jnp.float64).params)

    for a, b in zip(jax.tree_util.tree_leaves(grads(True)), jax.tree_util.tree_leaves(grads(False)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


@pytest.fixture(scope="module")
def sparse_batch(tiny):
    """Two structures in the sparse layout of training batches (receivers sorted, padding at the end)."""
    cu = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    cu.numbers[::3] = 28
    cu.rattle(0.08, seed=5)
    nacl = bulk("NaCl", "rocksalt", a=5.64)
    nacl.rattle(0.05, seed=6)
    graphs = [gd.atoms_to_graph(a, tiny.config.cutoff, tiny.config.num_elements, np.float64) for a in (cu, nacl)]
    n_edge = sum(int(g.n_edge[0]) for g in graphs) + 40
    return jax.tree_util.tree_map(jnp.asarray, gd.batch_graphs(graphs, 16, n_edge, 3))


def test_sparse_layout_numbers_equal_the_xla_path_in_float64(tiny, sparse_batch):
    state = tiny.state(jnp.float64)
    out = {f: jax.jit(gd.make_predict_fn(tiny.config, fused=f))(state, sparse_batch) for f in (False, True)}
    for key in ("energy", "forces", "stress", "nn_per_layer"):
        np.testing.assert_allclose(out[True][key], out[False][key], rtol=0, atol=1e-10, err_msg=key)


@pytest.mark.slow  # default-suite time (CI 15 min): the kernels' second-order unit tests run by default
def test_sparse_force_loss_parameter_gradients_with_dropout_equal_the_xla_path(tiny, sparse_batch):
    """The training step's work: second derivatives through the kernels, attention dropout on."""
    import dataclasses

    config = dataclasses.replace(tiny.config, attention_dropout=0.2)
    state = tiny.state(jnp.float64)
    rng = jax.random.PRNGKey(3)

    def grads(f):
        fn = gd.make_predict_fn(config, fused=f)

        def loss(params):
            out = fn(state.replace(params=params), sparse_batch, None, rng)
            return jnp.sum(out["energy"][:2] ** 2) + jnp.sum(out["forces"] ** 2) + jnp.sum(out["stress"][:2] ** 2)

        return jax.jit(jax.grad(loss))(state.params)

    for a, b in zip(jax.tree_util.tree_leaves(grads(True)), jax.tree_util.tree_leaves(grads(False)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_fused_true_needs_sorted_receivers(tiny, sparse_batch):
    fn = gd.make_predict_fn(tiny.config, sorted_receivers=False, fused=True)
    with pytest.raises(ValueError, match="fused=True needs receiver-sorted edges"):
        fn(tiny.state(jnp.float64), sparse_batch)


def test_plan_keeps_the_extra_memory_within_budget(monkeypatch):
    cfg = gd.GeoditeConfig.preset("mp")
    assert fused.plan(46_552, cfg, jnp.float32) == (True, True)  # Si-1000: 250 MB
    assert fused.plan(46_552, cfg, jnp.float64) == (True, True)  # 500 MB
    assert fused.plan(190_000, cfg, jnp.float32) == (True, True)  # Si-4096: 1.0 GB
    assert fused.plan(260_000, cfg, jnp.float32) == (True, False)  # the messages first
    assert fused.plan(368_000, cfg, jnp.float32) == (False, False)  # Si-8000: the chunked XLA path
    assert fused.plan(368_000, cfg, jnp.float32, chunked=False) == (True, True)  # sparse: no chunked path
    monkeypatch.setenv("GEODITE_FUSED", "0")
    assert fused.plan(100, cfg, jnp.float32) == (False, False)
    with pytest.raises(RuntimeError, match="GEODITE_FUSED=0"):
        fused.plan(100, cfg, jnp.float32, force=True)
    monkeypatch.delenv("GEODITE_FUSED")
    assert fused.available()


def test_other_dtypes_are_refused_not_reinterpreted():
    senders, receivers = indices(np.random.default_rng(4), "block")
    w, x = jnp.ones((E, F), jnp.float16), jnp.ones((N, S, F), jnp.float16)
    with pytest.raises(Exception, match="float32 or float64"):
        jax.block_until_ready(fused.gather_sum(w, x, senders, receivers, N))


def _count_dots(jaxpr) -> int:
    """Matrix products in a jaxpr, sub-jaxprs (loop bodies, checkpoints) included."""
    from jax.extend.core import jaxprs_in_params

    return sum((eqn.primitive.name == "dot_general") + sum(_count_dots(sub) for sub in jaxprs_in_params(eqn.params))
               for eqn in jaxpr.eqns)


def test_chunks_keep_their_matmul_outputs_within_budget_with_the_same_numbers(tiny, block_batch, monkeypatch):
    from geodite_jax import model

    cfg = gd.GeoditeConfig.preset("mp")
    assert model.saved_matmul_bytes(19_968, cfg, jnp.float32) <= model.SAVED_MATMUL_BUDGET_BYTES  # Cu-256: 383 MB
    assert model.saved_matmul_bytes(48_000, cfg, jnp.float32) > model.SAVED_MATMUL_BUDGET_BYTES  # Si-1000: 0.9 GB
    batch, block = block_batch
    state = tiny.state(jnp.float64)
    out, dots, default = {}, {}, model.SAVED_MATMUL_BUDGET_BYTES
    # Counted at float32 size: this float64 evaluation keeps its outputs within a budget of half their bytes.
    f32_size = model.saved_matmul_bytes(batch.senders.shape[0], tiny.config, jnp.float32)
    for budget in (default, f32_size, 0):
        monkeypatch.setattr(model, "SAVED_MATMUL_BUDGET_BYTES", budget)
        fn = gd.make_predict_fn(tiny.config, neighbours_per_node=block, chunk_edges=96, fused=True)
        dots[budget] = _count_dots(jax.make_jaxpr(fn)(state, batch).jaxpr)
        if budget != f32_size:
            out[budget] = jax.jit(fn)(state, batch)
    # Kept: the backward pass recomputes none of the tagged products: 3 + 4 in the messages, 3 in the edge update.
    assert dots[0] - dots[default] == 3 + 4 + 3, dots
    assert dots[f32_size] == dots[default], dots
    for key in ("energy", "forces", "stress", "nn_per_layer"):
        np.testing.assert_allclose(out[0][key], out[default][key], rtol=0, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("fused_path", [False, pytest.param(True, marks=pytest.mark.slow)])  # True: suite time
def test_first_layer_skips_the_zero_steerable_messages_with_the_same_numbers(tiny, block_batch, monkeypatch,
                                                                             fused_path):
    """Layer 0's steerable input is zero: both paths skip its o_x part (fewer FLOPs), the numbers stay equal."""
    from geodite_jax import model

    batch, block = block_batch
    state = tiny.state(jnp.float64)
    flops, out, original = {}, {}, model.Interaction
    for skip in (True, False):
        if not skip:  # every layer built as a later one: layer 0 computes (and multiplies by zero) its o_x part
            monkeypatch.setattr(model, "Interaction",
                                lambda config, last, first, name: original(config, last, False, name=name))
        fn = gd.make_predict_fn(tiny.config, neighbours_per_node=block, chunk_edges=96, fused=fused_path)
        compiled = jax.jit(fn).lower(state, batch).compile()
        flops[skip], out[skip] = compiled.cost_analysis()["flops"], compiled(state, batch)
    assert flops[True] < 0.98 * flops[False], flops
    for key in ("energy", "forces", "stress", "nn_per_layer"):
        np.testing.assert_allclose(out[True][key], out[False][key], rtol=0, atol=1e-12, err_msg=key)
