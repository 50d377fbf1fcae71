"""``geodite export-lammps``: a saved potential as a lammps-jax bundle for LAMMPS's ``pair_style jax/kk``."""

from __future__ import annotations

import argparse


def _export_lammps(args: argparse.Namespace) -> int:
    from ..lammps import DEFAULT_MARGIN, export_lammps, require_lammps_jax

    require_lammps_jax()  # before loading anything: the one missing piece is named first
    from ..potential import Potential

    pot = Potential.load(args.model)
    result = export_lammps(pot, args.output, args.types, max_atoms=args.max_atoms, max_edges=args.max_edges,
                           sample=args.sample, dtype=args.dtype, platform=args.platform, scheme=args.scheme,
                           skin=args.skin, margin=DEFAULT_MARGIN)
    if result.needed is not None:
        n = result.needed
        print(f"sample {args.sample}: {n.owned} owned + {n.ghosts} ghost atoms, {n.edges} neighbour pairs "
              f"(cutoff {pot.config.cutoff:g} + skin {args.skin:g} Å) on one rank")
    hops = f", ghost shell {result.n_hops} cutoffs" if result.scheme == "ghost" else \
        f", {len(result.comm_widths)} feature exchanges per evaluation"
    print(f"wrote {result.path}: {result.dtype}, {result.platform}, scheme {result.scheme}{hops}, "
          f"max_atoms {result.max_atoms}, max_edges {result.max_edges}, metal units")
    print("LAMMPS input:\n  units metal\n  newton on\n  pair_style jax/kk /path/to/pjrt_plugin.so\n"
          f"  pair_coeff * * {result.path}\n  # types 1..{len(result.types)} = {' '.join(result.types)}\n"
          "run with: lmp -k on ... -sf kk -pk kokkos newton on neigh half -in in.lammps")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``export-lammps``."""
    p = sub.add_parser(
        "export-lammps", help="export a saved potential for LAMMPS (pair_style jax/kk of lammps-jax)",
        description="Write a lammps-jax bundle (JSON of StableHLO programs) of a saved potential for LAMMPS's "
                    "pair_style jax/kk: pair_coeff * * OUT.json. Needs pip install -e \".[lammps]\".")
    p.add_argument("model", metavar="MODEL_DIR", help="a saved potential (Potential.save, geodite train)")
    p.add_argument("output", metavar="OUT.json", help="the bundle to write")
    p.add_argument("--types", nargs="+", required=True, metavar="ELEMENT",
                   help="element of each LAMMPS atom type, in type order (e.g. --types Cu Ni Al)")
    p.add_argument("--max-atoms", type=int, default=None,
                   help="capacity: owned + ghost atoms of one MPI domain (default: from --sample)")
    p.add_argument("--max-edges", type=int, default=None,
                   help="capacity: neighbour pairs of one domain, skin included (default: from --sample)")
    p.add_argument("--sample", default=None, metavar="FILE",
                   help="a structure (any ASE format) whose one-rank domain sizes the capacities (x 1.25)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="precision of the bundle")
    p.add_argument("--platform", default="cuda", choices=["cpu", "cuda"],
                   help="PJRT plugin the bundle will run on (cuda: GPUs; cpu: lammps-jax-pjrt-cpu)")
    p.add_argument("--scheme", default="comm", choices=["comm", "ghost"],
                   help="message passing across MPI domains: comm (one-cutoff ghost shell, per-layer feature "
                        "exchange; default) or ghost (num_layers + 1 cutoffs of ghosts, no exchange)")
    p.add_argument("--skin", type=float, default=2.0,
                   help="LAMMPS neighbor skin in Å the capacities are sized for (metal default 2.0)")
    p.set_defaults(func=_export_lammps)
