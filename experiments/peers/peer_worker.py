"""Time one peer model on one structure through the peer's own ASE calculator.

Runs INSIDE the peer's virtualenv (``experiments/.venvs/<peer>``, see ``setup_envs.sh``)::

    experiments/.venvs/nequix/bin/python experiments/peers/peer_worker.py \
        --model nequix --structure experiments/results/structures/nacl.extxyz --out r.json

Models (random weights of the published architectures; speed does not depend on the values,
and the weight files are downloads this machine cannot make):

* ``nequix``: Nequix-MP-1 (``configs/nequix-mp-1.yml`` of nequix: 128x0e+64x1o+32x2e+32x3o,
  lmax 3, 4 layers, cutoff 6 A, radial MLP 64x2, layer norm), ``kernel=False`` (the
  OpenEquivariance kernel is GPU-only), float32; 707,658 parameters.
* ``mace`` / ``mace64``: MACE-MP-0 medium (ScaleShiftMACE, 128x0e+128x1o, max_ell 3,
  correlation 3, two RealAgnosticResidual interactions, r_max 6 A, 10 Bessel, p=5, radial
  MLP 64x3, 89 elements), float32 / float64; 4,688,656 parameters.

The timing protocol lives in ``experiments/bench_common.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/, for bench_common

import bench_common as bc

bc.set_thread_env()  # before jax / torch are imported

CUTOFF = 6.0
#: The 89 elements of MPtrj as both peers list them (Z = 1-83 and 89-94).
MP_ELEMENTS: list[int] = list(range(1, 84)) + list(range(89, 95))

#: Nequix-MP-1 hyper-parameters (values of nequix's configs/nequix-mp-1.yml; shift, scale and
#: avg_n_neighbors are its dataset statistics, which only scale the output).
NEQUIX_MP1: dict[str, Any] = {
    "atomic_numbers": MP_ELEMENTS,
    "cutoff": CUTOFF,
    "hidden_irreps": "128x0e + 64x1o + 32x2e + 32x3o",
    "lmax": 3,
    "n_layers": 4,
    "radial_basis_size": 8,
    "radial_mlp_size": 64,
    "radial_mlp_layers": 2,
    "radial_polynomial_p": 6.0,
    "mlp_init_scale": 4.0,
    "index_weights": False,
    "layer_norm": True,
    "shift": 0.16502578765761478,
    "scale": 0.8066479563713074,
    "avg_n_neighbors": 57.413687022442645,
}

#: MACE-MP-0 medium hyper-parameters (avg_num_neighbors and the scale only scale the output).
MACE_MP0_MEDIUM: dict[str, Any] = {
    "r_max": CUTOFF,
    "num_bessel": 10,
    "num_polynomial_cutoff": 5,
    "max_ell": 3,
    "num_interactions": 2,
    "hidden_irreps": "128x0e + 128x1o",
    "MLP_irreps": "16x0e",
    "correlation": 3,
    "radial_MLP": [64, 64, 64],
    "interaction": "RealAgnosticResidualInteractionBlock",
    "avg_num_neighbors": 61.96,
    "atomic_inter_scale": 0.8,
    "atomic_inter_shift": 0.0,
}


def log(msg: str) -> None:
    """Print a progress line (the orchestrator keeps it in the child's log)."""
    print(f"[peer_worker] {msg}", flush=True)


def build_nequix(tmpdir: Path, seed: int) -> tuple[Any, int, dict[str, Any]]:
    """Nequix-MP-1 with random weights, loaded through nequix's own calculator."""
    import equinox as eqx
    import jax

    jax.config.update("jax_platforms", "cpu")
    from nequix.calculator import NequixCalculator
    from nequix.model import Nequix, save_model

    cfg = dict(NEQUIX_MP1)
    model = Nequix(
        jax.random.key(seed),
        n_species=len(cfg["atomic_numbers"]),
        **{k: v for k, v in cfg.items() if k != "atomic_numbers"},
        kernel=False,
    )
    # The calculator loads from a file: write the random model in nequix's own .nqx format.
    path = tmpdir / "nequix-mp-1-random.nqx"
    save_model(str(path), model, cfg)
    calc = NequixCalculator(model_path=str(path), use_kernel=False)
    n_params = sum(int(p.size) for p in jax.tree.leaves(eqx.filter(calc.model, eqx.is_array)))
    extra = {
        "dtype": "float32",
        "kernel": False,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "jax_devices": [str(d) for d in jax.devices()],
        "architecture": "Nequix-MP-1 (nequix configs/nequix-mp-1.yml), random weights",
        "hyperparameters": {k: v for k, v in cfg.items() if k != "atomic_numbers"},
    }
    return calc, n_params, extra


def build_mace(dtype: str, seed: int) -> tuple[Any, int, dict[str, Any]]:
    """MACE-MP-0 medium with random weights, wrapped in mace's own MACECalculator."""
    import mace  # noqa: F401  (must precede e3nn: e3nn 0.4.4 + torch 2.13 weights_only issue)
    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules
    from mace.calculators import MACECalculator

    torch.set_num_threads(bc.N_THREADS)
    torch.set_num_interop_threads(1)
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float64 if dtype == "float64" else torch.float32)
    h = MACE_MP0_MEDIUM
    interaction = modules.interaction_classes[h["interaction"]]
    model = modules.ScaleShiftMACE(
        r_max=h["r_max"],
        num_bessel=h["num_bessel"],
        num_polynomial_cutoff=h["num_polynomial_cutoff"],
        max_ell=h["max_ell"],
        interaction_cls=interaction,
        interaction_cls_first=interaction,
        num_interactions=h["num_interactions"],
        num_elements=len(MP_ELEMENTS),
        hidden_irreps=o3.Irreps(h["hidden_irreps"]),
        MLP_irreps=o3.Irreps(h["MLP_irreps"]),
        atomic_energies=np.zeros(len(MP_ELEMENTS)),
        avg_num_neighbors=h["avg_num_neighbors"],
        atomic_numbers=MP_ELEMENTS,
        correlation=h["correlation"],
        gate=torch.nn.functional.silu,
        radial_MLP=h["radial_MLP"],
        atomic_inter_scale=h["atomic_inter_scale"],
        atomic_inter_shift=h["atomic_inter_shift"],
        use_reduced_cg=False,  # as the published MP-0 models (and mace's CLI default)
    )
    model.eval()
    n_params = sum(int(p.numel()) for p in model.parameters())
    calc = MACECalculator(models=[model], device="cpu", default_dtype=dtype)
    extra = {
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "architecture": "MACE-MP-0 medium (ScaleShiftMACE), random weights, no cuEquivariance",
        "hyperparameters": dict(h),
    }
    return calc, n_params, extra


VERSION_PACKAGES = {
    "nequix": [
        "nequix",
        "jax",
        "jaxlib",
        "equinox",
        "e3nn-jax",
        "jraph",
        "matscipy",
        "numpy",
        "ase",
    ],
    "mace": ["mace-torch", "torch", "e3nn", "matscipy", "numpy", "ase"],
}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the peer, time it and write the JSON record."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["nequix", "mace", "mace64"])
    bc.add_protocol_arguments(ap)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    atoms = bc.read_structure(args.structure)
    structure = Path(args.structure).stem
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "nequix":
            calc, n_params, extra = build_nequix(Path(tmp), args.seed)
        else:
            calc, n_params, extra = build_mace("float64" if args.model == "mace64" else "float32", args.seed)
        build_s = time.perf_counter() - t_start
        log(f"{args.model}: {n_params:,} parameters, built in {build_s:.2f} s")
        n_edges = bc.count_edges(atoms, CUTOFF)
        timing = bc.time_with_protocol(calc, atoms, args, log)
    record: dict[str, Any] = {
        "model": args.model,
        "structure": structure,
        "structure_file": str(args.structure),
        "n_atoms": len(atoms),
        "n_edges": n_edges,
        "edge_cutoff_A": CUTOFF,
        "n_params": n_params,
        "build_s": build_s,
        **timing,
        **extra,
        "versions": bc.package_versions(VERSION_PACKAGES["nequix" if args.model == "nequix" else "mace"]),
    }
    bc.finish_record(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
