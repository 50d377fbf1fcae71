"""Does the neighbour-block edge layout speed up the training step? (issue 13, part 3)

Times the parameter gradient of an energy + forces + stress loss (the work of one training step, without
the optimiser) on the same MPtrj-like batches of 6 structures in the sparse layout (what training uses) and
in the neighbour-block layout (what inference uses), one pass, single-threaded CPU time so that the ratio
holds on a busy machine.

    python experiments/probe_train_layout.py            # mp preset, 3 batches
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mp", choices=["mp", "tiny"])
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    sys.path.insert(0, str(Path(__file__).parent))

    import jax
    import jax.numpy as jnp
    from ase import Atoms
    from bench_train import mptrj_like_frames

    import geodite_jax as gd
    from geodite_jax.graph import bucket, max_degree

    cfg = gd.GeoditeConfig.preset(args.preset)
    state = gd.Potential.init(cfg, seed=0).state(jnp.float32)
    frames = mptrj_like_frames(6 * args.batches, 0)
    print("| batch | real edges | sparse slots | sparse CPU s | block slots | block CPU s | block / sparse |")
    print("|---|---|---|---|---|---|---|")
    for k in range(args.batches):
        sel = frames[6 * k:6 * (k + 1)]
        graphs = [gd.atoms_to_graph(Atoms(f.numbers, f.positions, cell=f.cell, pbc=f.pbc), cfg.cutoff) for f in sel]
        n_real = sum(int(g.n_edge.sum()) for g in graphs)
        n_node = bucket(sum(len(f.numbers) for f in sel) + 1, 8, 8)
        block = bucket(max_degree(graphs), 8, 2, growth=1.05)
        row = []
        for batch, npn in ((gd.batch_graphs(graphs, n_node, bucket(n_real, 256, 64), 8), None),
                           (gd.batch_graphs(graphs, n_node, None, 8, neighbours_per_node=block), block)):
            batch = jax.tree_util.tree_map(jnp.asarray, batch)
            predict = gd.make_predict_fn(cfg, neighbours_per_node=npn, chunk_edges=0)

            def loss(params, batch=batch, predict=predict):
                out = predict(state.replace(params=params), batch)
                return (jnp.sum(out["energy"] ** 2) + jnp.sum(out["forces"] ** 2)
                        + jnp.sum(jnp.nan_to_num(out["stress"]) ** 2))

            grad = jax.jit(jax.value_and_grad(loss))
            jax.block_until_ready(grad(state.params))
            t0 = time.process_time()
            for _ in range(args.repeats):
                jax.block_until_ready(grad(state.params))
            row += [batch.senders.shape[0], (time.process_time() - t0) / args.repeats]
        print(f"| {k} | {n_real} | {row[0]} | {row[1]:.2f} | {row[2]} | {row[3]:.2f} | {row[3] / row[1]:.2f} |")


if __name__ == "__main__":
    main()
