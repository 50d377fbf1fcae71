"""Label structures with the pretrained SevenNet-0 (MPtrj) as a teacher.

Runs INSIDE the SevenNet virtualenv (``bash experiments/peers/setup_envs.sh sevennet``)::

    experiments/.venvs/sevennet/bin/python experiments/peers/sevennet_label.py \
        IN.extxyz OUT.extxyz [--model 7net-0] [--chunk 20]

Reads every frame of ``IN.extxyz`` (ASE), computes energy (eV, raw VASP-like convention, as
MPtrj's uncorrected energies), forces (eV/Å) and, for fully periodic cells, the stress (eV/Å³,
ASE sign: positive = tensile), and writes them as extxyz with ``energy`` / ``forces`` /
``stress`` keys that ``geodite_jax.data.read_frames(..., format="extxyz")`` reads. The frames'
``info`` (e.g. ``config_type``) is kept. The SevenNet-0 weights ship inside the ``sevenn`` wheel,
so nothing is downloaded.

Resumable: labelled frames are appended to ``OUT.extxyz.partial`` in chunks; a rerun skips the
frames already there, and the finished file is renamed into place (atomic on one file system).
Teacher labels carry the teacher's own error (SevenNet-0: ~30-45 meV/atom on WBM hull
distances); they serve pipeline, stability and student-vs-teacher comparisons, never DFT claims.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inp")
    parser.add_argument("out")
    parser.add_argument("--model", default="7net-0")
    parser.add_argument("--chunk", type=int, default=20, help="frames per append to the partial file")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from sevenn.calculator import SevenNetCalculator

    frames = read(args.inp, index=":")
    partial = args.out + ".partial"
    done = len(read(partial, index=":")) if os.path.exists(partial) and os.path.getsize(partial) else 0
    if done > len(frames):
        print(f"error: {partial} has {done} frames but {args.inp} only {len(frames)}", file=sys.stderr)
        return 2
    calc = SevenNetCalculator(args.model, device="cpu")
    t0 = time.perf_counter()
    buffer = []
    for i in range(done, len(frames)):
        atoms = frames[i]
        atoms.calc = calc
        energy = float(atoms.get_potential_energy())
        forces = np.asarray(atoms.get_forces(), dtype=np.float64)
        results = {"energy": energy, "forces": forces}
        if all(atoms.pbc):
            results["stress"] = np.asarray(atoms.get_stress(voigt=True), dtype=np.float64)
        if not (np.isfinite(energy) and np.isfinite(forces).all()):
            print(f"error: frame {i} got a non-finite label", file=sys.stderr)
            return 1
        labelled = atoms.copy()
        labelled.calc = SinglePointCalculator(labelled, **results)
        buffer.append(labelled)
        if len(buffer) >= args.chunk or i == len(frames) - 1:
            write(partial, buffer, format="extxyz", append=True)
            buffer = []
            rate = (i + 1 - done) / (time.perf_counter() - t0)
            print(f"labelled {i + 1}/{len(frames)} ({rate:.2f} frames/s)", flush=True)
    os.replace(partial, args.out)
    print(f"wrote {args.out}: {len(frames)} frames, model {args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
