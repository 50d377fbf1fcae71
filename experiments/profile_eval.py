"""Where the time of one E+F+S evaluation goes: per model block, per kind of op, forward / recompute / backward.

    python experiments/profile_eval.py                          # Cu-256, mp preset, float32, default chunks
    python experiments/profile_eval.py --structure si --chunk-edges 0   # Si-1000, one pass (no chunks)

The evaluation is the calculator's (neighbour-block layout, E + forces + stress in one jitted autodiff
pass). Two calls run under ``jax.profiler``; every XLA op event of the trace is matched to its HLO
instruction, whose metadata names the JAX source op (``op_name``). From that:

* block: the model's named scopes (``neighbour_sums``, ``edge_features``, ``messages``, ``edge_update``:
  the chunked edge work; ``fused kernels``: the whole-graph sender contractions of ``geodite_jax.fused``)
  or the Flax module around the op (geometry, norms and node projections, coupling, ZBL, ...);
* pass: ``backward`` for ops under ``transpose(...)`` (the VJP), ``recompute`` for the forward re-run
  of a checkpointed chunk inside the backward pass, ``forward`` otherwise;
* kind: ``matmul`` (dot/GEMM ops and fusions around them), ``gather/scatter`` (gather, scatter,
  dynamic slices), ``elementwise`` (other loop/reduction fusions), ``copy/other``.

Shares of summed op time are machine-independent enough to design from; the absolute figures are for
this machine (2-core CPU, quiet). Output: a Markdown table on stdout and ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import tempfile
import time
from pathlib import Path

STRUCTURES = {"nacl": ("NaCl", "rocksalt", 5.64, 3), "cu": ("Cu", "fcc", 3.61, 4), "si": ("Si", "diamond", 5.431, 5)}
BLOCK_SCOPES = ("neighbour_sums", "edge_features", "scalar_messages", "messages", "edge_update_fused", "edge_update",
                "fused_kernels")
# The fused path's chunks count with their block; its whole-graph kernel calls (geodite_jax.fused) are a block.
BLOCK_LABELS = {"scalar_messages": "messages", "edge_update_fused": "edge_update", "fused_kernels": "fused kernels"}
MODULE_BLOCKS = (("geometry", "geometry"), ("node_init", "node init (node part)"), ("coupling", "coupling"),
                 ("interaction", "norm + node projections"), ("zbl", "ZBL"))


def classify_instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """HLO instruction name -> (block, pass, kind), from the compiled module's text."""
    table = {}
    computations: dict[str, str] = {}  # fused computation name -> its body (to find dots inside fusions)
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^\s*(?:ENTRY\s+)?(%?[\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            current = head.group(1).lstrip("%")
            computations[current] = ""
            continue
        if current is not None:
            computations[current] += line + "\n"
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+(?:\[[^\]]*\])?(?:\{[^}]*\})?\s+([\w\-]+)\(", line)
        if not m:
            m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([\w\-]+)\(", line)
            if not m:
                continue
        name, opcode = m.group(1), m.group(2)
        op_name = re.search(r'op_name="([^"]*)"', line)
        op_name = op_name.group(1) if op_name else ""
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = computations.get(called.group(1), "") if called else ""
        if opcode in ("dot", "convolution") or " dot(" in body or "__ynn" in line or "ynn" in name:
            kind = "matmul"
        elif opcode in ("gather", "scatter", "dynamic-slice", "dynamic-update-slice") or re.search(
                r"\b(gather|scatter)\(", body):
            kind = "gather/scatter"
        elif opcode == "fusion" or opcode in ("reduce", "add", "multiply", "exponential", "tanh", "sine"):
            kind = "elementwise"
        else:
            kind = "copy/other"
        if "rematted_computation" in op_name:  # a checkpointed chunk's forward, re-run inside the backward pass
            stage = "recompute"
        elif "transpose(" in op_name:
            stage = "backward"
        else:
            stage = "forward"
        block = next((s for s in BLOCK_SCOPES if f"/{s}" in op_name or op_name.startswith(s)), None)
        block = BLOCK_LABELS.get(block, block)
        if block is None:
            block = next((label for key, label in MODULE_BLOCKS if key in op_name.lower()),
                         "other (head, strain, gathers of positions)")
        table[name] = (block, stage, kind)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structure", default="cu", choices=sorted(STRUCTURES))
    ap.add_argument("--preset", default="mp")
    ap.add_argument("--chunk-edges", type=int, default=None, help="edge slots per chunk (default: the model's)")
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--top", type=int, default=0, help="also list the N most expensive ops")
    ap.add_argument("--out", default=None, help="JSON file for the breakdown")
    args = ap.parse_args()
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2")

    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from ase.build import bulk
    from jax.profiler import ProfileData

    import geodite_jax as gd

    symbol, crystal, a, rep = STRUCTURES[args.structure]
    atoms = bulk(symbol, crystal, a=a, cubic=True).repeat(rep)
    atoms.rattle(0.05, seed=42)
    pot = gd.Potential.init(gd.GeoditeConfig.preset(args.preset), seed=0)
    graph = gd.atoms_to_graph(atoms, pot.config.cutoff, pot.config.num_elements, np.dtype(args.dtype))
    block = gd.bucket(gd.max_degree([graph]), 8, 2, growth=1.05)
    batch = jax.tree_util.tree_map(jnp.asarray, gd.batch_graphs(
        [graph], gd.bucket(len(atoms) + 1, 8, 8, growth=1.1), None, 2, neighbours_per_node=block))
    predict = jax.jit(gd.make_predict_fn(pot.config, neighbours_per_node=block, chunk_edges=args.chunk_edges))
    dtype = jnp.dtype(args.dtype)
    state, vacuum = pot.state(dtype), pot.vacuum_energies(dtype)
    compiled = predict.lower(state, batch, vacuum).compile()
    table = classify_instructions(compiled.as_text())
    jax.block_until_ready(compiled(state, batch, vacuum))

    trace_dir = tempfile.mkdtemp(prefix="geodite-profile-")
    t0 = time.perf_counter()
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.calls):
        jax.block_until_ready(compiled(state, batch, vacuum))
    jax.profiler.stop_trace()
    wall = (time.perf_counter() - t0) / args.calls
    data = ProfileData.from_file(sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1])
    totals: dict[tuple[str, str, str], float] = collections.defaultdict(float)
    unmatched = 0.0
    unmatched_names: dict[str, float] = collections.defaultdict(float)
    per_op: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            if "XLA" not in line.name and "Cpu" not in line.name:
                continue
            for event in line.events:
                key = table.get(event.name)
                if key is None:
                    if not event.name.startswith(("Thread", "end:", "$")):
                        unmatched += event.duration_ns
                        unmatched_names[event.name] += event.duration_ns
                    continue
                totals[key] += event.duration_ns / 1e9 / args.calls
                per_op[event.name] += event.duration_ns / 1e9 / args.calls
    op_total = sum(totals.values())
    n_edges = int(graph.n_edge[0])
    print(f"# {args.structure} ({len(atoms)} atoms, {n_edges} edges, block {block}), {args.preset} {args.dtype}, "
          f"chunk_edges={args.chunk_edges}: {wall:.3f} s per E+F+S call under the profiler, summed op time "
          f"{op_total:.3f} s (2 threads), unmatched events {unmatched / 1e9 / args.calls:.3f} s\n")
    by_block: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for (blk, stage, kind), sec in totals.items():
        by_block[blk][f"{stage}/{kind}"] += sec
        by_block[blk]["total"] += sec
    cols = [f"{s}/{k}" for s in ("forward", "recompute", "backward")
            for k in ("matmul", "gather/scatter", "elementwise", "copy/other")]
    cols = [c for c in cols if any(b.get(c, 0) > 0 for b in by_block.values())]
    print("| block | share | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for blk, row in sorted(by_block.items(), key=lambda kv: -kv[1]["total"]):
        print(f"| {blk} | {100 * row['total'] / op_total:.1f} % | "
              + " | ".join(f"{100 * row.get(c, 0) / op_total:.1f}" for c in cols) + " |")
    per_kind = collections.defaultdict(float)
    per_stage = collections.defaultdict(float)
    for (_, stage, kind), sec in totals.items():
        per_kind[kind] += sec
        per_stage[stage] += sec
    print("\nby kind: " + ", ".join(f"{k} {100 * v / op_total:.1f} %" for k, v in sorted(per_kind.items())))
    print("by pass: " + ", ".join(f"{k} {100 * v / op_total:.1f} %" for k, v in sorted(per_stage.items())))
    if args.top:
        print(f"\ntop {args.top} ops:")
        for name, sec in sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {sec:8.4f} s  {name:40s} {table[name]}")
    top = sorted(unmatched_names.items(), key=lambda kv: -kv[1])[:8]
    print("unmatched (containers such as while loops, which hold the ops above): "
          + ", ".join(f"{k} {v / 1e9 / args.calls:.3f} s" for k, v in top))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "structure": args.structure, "atoms": len(atoms), "edges": n_edges, "block": block,
            "chunk_edges": args.chunk_edges, "wall_s": wall, "op_total_s": op_total,
            "breakdown": [{"block": b, "pass": s, "kind": k, "seconds": v} for (b, s, k), v in totals.items()],
            "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}, indent=1))


if __name__ == "__main__":
    main()
