"""Batching: greedy packing into fixed budgets, epoch plans, resume, device shards, labels, prefetch."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import geodite_jax as gd
from geodite_jax.data import (
    BatchBudget,
    Frame,
    GraphDataset,
    budget_for,
    collate,
    generate_emt_frames,
    iterate_batches,
    num_batches,
    plan_batches,
    prefetch,
)
from geodite_jax.energy import padding_masks

CUTOFF = 5.0


@pytest.fixture(scope="module")
def ds():
    frames = generate_emt_frames(40, seed=7)
    rng = np.random.default_rng(2)
    for k in range(3):  # unlabelled, energy-only molecule, periodic frame without stress
        frames.append(Frame([8, 1, 1], [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], np.zeros((3, 3)),
                            [False] * 3, energy=-14.0 - k, id=f"water{k}", group="water"))
    fcc = np.array([[0, 0, 0], [1.8, 1.8, 0], [1.8, 0, 1.8], [0, 1.8, 1.8]])
    frames.append(Frame([29] * 4, fcc + rng.normal(scale=0.1, size=(4, 3)), np.eye(3) * 3.6, [True] * 3,
                        forces=rng.normal(size=(4, 3)), id="nostress", group="x"))
    frames.append(Frame([13] * 2, [[0, 0, 0], [2.0, 2.0, 0]], np.eye(3) * 4.0, [True] * 3, id="bare", group="x"))
    return GraphDataset.from_frames(frames, CUTOFF)


def _real_graphs(batch):
    return int((np.asarray(batch.graph.n_node)[:-1] > 0).sum())


def _check_batch(ds, batch, indices, budget):
    """Shapes are the budget's; graphs, labels and weights sit where ds says."""
    g = batch.graph
    assert g.nodes["positions"].shape == (budget.n_node, 3) and g.senders.shape == (budget.n_edge,)
    assert g.n_node.shape == (budget.n_graph,) and batch.energy.shape == (budget.n_graph,)
    assert batch.forces.shape == (budget.n_node, 3) and batch.stress.shape == (budget.n_graph, 3, 3)
    assert np.all(np.diff(g.receivers) >= 0)
    node_mask, edge_mask, graph_mask = padding_masks(g)
    np.testing.assert_array_equal(batch.indices, list(indices) + [-1] * (budget.n_graph - len(indices)))
    assert graph_mask.sum() == len(indices) and edge_mask.sum() == ds.n_edges[indices].sum()
    node_off = edge_off = 0
    for k, i in enumerate(indices):
        ref, lab, n, e = ds.graph(i), ds.labels(i), int(ds.n_atoms[i]), int(ds.n_edges[i])
        np.testing.assert_array_equal(g.nodes["positions"][node_off:node_off + n], ref.nodes["positions"])
        np.testing.assert_array_equal(g.nodes["species"][node_off:node_off + n], ref.nodes["species"])
        np.testing.assert_array_equal(g.senders[edge_off:edge_off + e], ref.senders + node_off)
        np.testing.assert_array_equal(g.edges["shifts"][edge_off:edge_off + e], ref.edges["shifts"])
        np.testing.assert_array_equal(g.globals["cell"][k], ref.globals["cell"][0])
        assert batch.energy_weight[k] == lab["has_energy"] and batch.energy[k] == lab["energy"] * lab["has_energy"]
        assert batch.stress_weight[k] == (lab["has_stress"] and lab["pbc"].all())
        np.testing.assert_array_equal(batch.stress[k], lab["stress"])
        np.testing.assert_array_equal(batch.forces_weight[node_off:node_off + n], float(lab["has_forces"]))
        np.testing.assert_array_equal(batch.forces[node_off:node_off + n], lab["forces"])
        node_off, edge_off = node_off + n, edge_off + e
    # Nothing counts on padding.
    assert not batch.forces_weight[~node_mask].any() and not batch.forces[~node_mask].any()
    assert not batch.energy_weight[~graph_mask].any() and not batch.stress_weight[~graph_mask].any()


def test_epoch_covers_every_structure_once(ds):
    budget = budget_for(ds, 6)
    plan = plan_batches(ds, None, budget, seed=3, epoch=0)
    order = np.concatenate([step[0] for step in plan])
    np.testing.assert_array_equal(np.sort(order), np.arange(len(ds)))
    batches = list(iterate_batches(ds, None, budget, seed=3, epoch=0))
    assert len(batches) == len(plan) == num_batches(ds, None, budget, seed=3, epoch=0)
    for step, batch in zip(plan, batches, strict=True):
        _check_batch(ds, batch, step[0], budget)
    assert sum(_real_graphs(b) for b in batches) == len(ds)
    # Greedy packing: no batch could have taken the next structure.
    for step, nxt in zip(plan[:-1], plan[1:], strict=True):
        i = nxt[0][0]
        assert (ds.n_atoms[step[0]].sum() + ds.n_atoms[i] + 1 > budget.n_node
                or ds.n_edges[step[0]].sum() + ds.n_edges[i] > budget.n_edge or len(step[0]) + 2 > budget.n_graph)


def test_subset_indices_and_order(ds):
    budget = budget_for(ds, 4)
    idx = np.arange(0, len(ds), 3)
    plan = plan_batches(ds, idx, budget, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([s[0] for s in plan]), idx)  # no shuffle: given order
    same = plan_batches(ds, idx, budget, seed=1, epoch=4)
    again = plan_batches(ds, idx, budget, seed=1, epoch=4)
    other = plan_batches(ds, idx, budget, seed=1, epoch=5)
    flat = [np.concatenate([s[0] for s in p]) for p in (same, again, other)]
    np.testing.assert_array_equal(flat[0], flat[1])
    assert not np.array_equal(flat[0], flat[2])
    assert not np.array_equal(flat[0], np.concatenate([s[0] for s in plan_batches(ds, idx, budget, seed=2,
                                                                                  epoch=4)]))


def test_start_equals_skipping(ds):
    budget = budget_for(ds, 5)
    full = list(iterate_batches(ds, None, budget, seed=0, epoch=2))
    resumed = list(iterate_batches(ds, None, budget, seed=0, epoch=2, start=3))
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed, strict=True):
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_shards_stack_and_pad(ds):
    budget = budget_for(ds, 4)
    single = list(iterate_batches(ds, None, budget, seed=5, epoch=1))
    d = next(k for k in (3, 5, 7, 11) if len(single) % k)  # so that the last step has padding sub-batches
    stacked = list(iterate_batches(ds, None, budget, seed=5, epoch=1, num_shards=d))
    assert len(stacked) == -(-len(single) // d)
    for batch in stacked:
        assert batch.graph.nodes["positions"].shape == (d, budget.n_node, 3)
        assert batch.energy.shape == (d, budget.n_graph) and batch.forces_weight.shape == (d, budget.n_node)
    subs = [jax.tree_util.tree_map(lambda x, k=k: x[k], b) for b in stacked for k in range(d)]
    for a, b in zip(single, subs, strict=False):  # same greedy sequence, cut into groups of d
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    padding = subs[len(single):]
    assert len(padding) == d * len(stacked) - len(single) > 0
    for p in padding:  # all-padding sub-batches: nothing real, zero weights, same layout conventions
        node_mask, edge_mask, graph_mask = padding_masks(p.graph)
        assert not (node_mask.any() or edge_mask.any() or graph_mask.any())
        assert not (p.energy_weight.any() or p.forces_weight.any() or p.stress_weight.any())
        assert (p.indices == -1).all()
        assert p.graph.n_node[-1] == budget.n_node and p.graph.n_edge[-1] == budget.n_edge
    dropped = list(iterate_batches(ds, None, budget, seed=5, epoch=1, num_shards=d, drop_last=True))
    assert len(dropped) == len(single) // d
    assert num_batches(ds, None, budget, seed=5, epoch=1, drop_last=True) == len(single) - 1
    one = next(iterate_batches(ds, None, budget, seed=5, epoch=1, num_shards=1))  # one device: axis of 1
    assert one.graph.senders.shape == (1, budget.n_edge) and one.indices.shape == (1, budget.n_graph)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(lambda x: x[0], one), single[0])


def test_budgets(ds):
    budget = budget_for(ds, 8)
    assert budget.n_graph == 9 and budget.n_node % 8 == 0 and budget.n_edge % 64 == 0
    assert budget.n_node >= 8 * ds.n_atoms.mean() + 1 and budget.n_edge >= ds.n_edges.max()
    plan = plan_batches(ds, None, budget, seed=0)
    assert np.mean([len(s[0]) for s in plan[:-1]]) > 6  # most batches reach (nearly) 8 structures
    by_nodes = budget_for(ds, target_nodes=100)
    assert 101 <= by_nodes.n_node <= 108 and by_nodes.n_graph > 100 / ds.n_atoms.mean()
    tiny = budget_for(ds, 1)
    assert tiny.n_node >= ds.n_atoms.max() + 1 and tiny.n_edge >= ds.n_edges.max()  # biggest one fits
    biggest = ds.ids[int(np.argmax(ds.n_atoms))]
    with pytest.raises(ValueError, match=f"structure '{biggest}'.*does not fit max_nodes=20"):
        budget_for(ds, 4, max_nodes=20)
    with pytest.raises(ValueError, match=r"does not fit the batch budget"):
        plan_batches(ds, None, BatchBudget(20, 100000, 8))
    with pytest.raises(ValueError, match="exactly one"):
        budget_for(ds)


def test_batch_evaluates_like_single_structures(ds, tiny):
    """The padded layout is what the model expects: a structure's energy does not depend on its batch-mates,
    and an all-padding sub-batch evaluates to zeros (one compilation: every batch has the budget's shape)."""
    budget = budget_for(ds, 3)
    step = plan_batches(ds, None, budget, seed=0)[0][0]
    batch = next(iterate_batches(ds, None, budget, seed=0))
    predict = jax.jit(gd.make_predict_fn(tiny.config))
    state = tiny.state(jnp.float64)

    def run(graph):
        return jax.tree_util.tree_map(np.asarray, predict(state, jax.tree_util.tree_map(jnp.asarray, graph)))

    out = run(batch.graph)
    offset = 0
    for k, i in enumerate(step):
        alone = run(collate(ds, [i], budget).graph)
        n = int(ds.n_atoms[i])
        assert out["energy"][k] == pytest.approx(alone["energy"][0], abs=1e-9)
        np.testing.assert_allclose(out["forces"][offset:offset + n], alone["forces"][:n], atol=1e-9)
        np.testing.assert_allclose(out["stress"][k], alone["stress"][0], atol=1e-11)
        offset += n
    padding = run(collate(ds, [], budget).graph)
    assert not np.any(padding["energy"]) and np.all(np.isfinite(padding["forces"]))


def test_prefetch():
    assert list(prefetch(iter(range(50)), size=3)) == list(range(50))

    def broken():
        yield 1
        raise KeyError("boom")

    it = prefetch(broken())
    assert next(it) == 1
    with pytest.raises(KeyError, match="boom"):
        next(it)

    produced = []

    def endless():
        k = 0
        while True:
            produced.append(k)
            yield k
            k += 1

    before = threading.active_count()
    it = prefetch(endless(), size=2)
    assert [next(it) for _ in range(5)] == list(range(5))
    it.close()  # consumer stops early: the producer thread must end
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before
    assert len(produced) <= 5 + 2 + 2  # bounded read-ahead


def test_bucketed_batches(ds, tiny):
    """``buckets=K``: the same plan, each step padded to the smallest of K budgets that holds it, and the same
    energies, forces and stress as with the full budget."""
    budget = budget_for(ds, 6)
    ladder = budget.ladder(4)
    assert ladder[-1] == budget and budget.ladder(1) == (budget,) and len(ladder) >= 2
    assert all(a.n_node <= b.n_node and a.n_edge < b.n_edge for a, b in zip(ladder, ladder[1:], strict=False))
    assert all(b.n_node % 8 == 0 and b.n_edge % 64 == 0 and b.n_graph == budget.n_graph for b in ladder[:-1])
    with pytest.raises(ValueError, match="levels >= 1"):
        budget.ladder(0)
    full = list(iterate_batches(ds, None, budget, seed=1, epoch=3))
    bucketed = list(iterate_batches(ds, None, budget, seed=1, epoch=3, buckets=4))
    assert len(bucketed) == len(full)
    shapes = set()
    for a, b in zip(full, bucketed, strict=True):
        np.testing.assert_array_equal(a.indices, b.indices)
        n, e = int(a.graph.n_node[:-1].sum()), int(a.graph.n_edge[:-1].sum())
        size = next(lv for lv in ladder if lv.n_edge == b.graph.senders.shape[0])
        assert size.fits(n, e, _real_graphs(a)) and b.graph.nodes["positions"].shape[0] == size.n_node
        smaller = [lv for lv in ladder if lv.n_edge < size.n_edge]
        assert not any(lv.fits(n, e) for lv in smaller)  # the smallest level that holds it
        np.testing.assert_array_equal(a.graph.senders[:e], b.graph.senders[:e])
        np.testing.assert_array_equal(a.graph.nodes["positions"][:n], b.graph.nodes["positions"][:n])
        for name in ("energy", "stress", "energy_weight", "stress_weight"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(a.forces[:n], b.forces[:n])
        assert not b.forces_weight[n:].any()
        shapes.add(size)
    assert len(shapes) >= 2  # the point: smaller batches get smaller shapes
    for step in iterate_batches(ds, None, budget, seed=1, epoch=3, num_shards=3, buckets=4):  # one shape a step
        real_n = max(int(step.graph.n_node[k, :-1].sum()) for k in range(3))
        real_e = max(int(step.graph.n_edge[k, :-1].sum()) for k in range(3))
        size = next(lv for lv in ladder if lv.n_edge == step.graph.senders.shape[1])
        assert size.fits(real_n, real_e)
        assert not any(lv.fits(real_n, real_e) for lv in ladder if lv.n_edge < size.n_edge)

    predict = jax.jit(gd.make_predict_fn(tiny.config))
    state = tiny.state(jnp.float64)
    k = next(i for i, b in enumerate(bucketed) if b.graph.senders.shape[0] < budget.n_edge)
    outs = [jax.tree_util.tree_map(np.asarray, predict(state, jax.tree_util.tree_map(jnp.asarray, b.graph)))
            for b in (full[k], bucketed[k])]
    n = int(full[k].graph.n_node[:-1].sum())
    np.testing.assert_allclose(outs[0]["energy"], outs[1]["energy"], atol=1e-9)
    np.testing.assert_allclose(outs[0]["forces"][:n], outs[1]["forces"][:n], atol=1e-9)
    np.testing.assert_allclose(outs[0]["stress"], outs[1]["stress"], atol=1e-11)
