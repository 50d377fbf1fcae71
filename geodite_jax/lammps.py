"""Export a saved :class:`~geodite_jax.potential.Potential` for LAMMPS's ``pair_style jax/kk`` (lammps-jax).

The bundle is a JSON file of StableHLO programs written by ``lammps_jax.export.export_model``; the pair style
hands them, every step, the owned atoms of its MPI domain (rows ``0..nlocal-1``), then its ghost atoms (image
coordinates, so edge vectors are plain differences), then padding up to ``max_atoms``, and a sparse edge list
(``senders`` = the atom whose LAMMPS neighbour-list row it is, ``receivers`` = the listed neighbour, padding
index ``max_atoms``, ``edge_mask``) holding every pair of the list, skin included (up to ``max_edges``).

The energy is the project's one energy head, :func:`geodite_jax.energy.atom_energies`, on those edges (a
LAMMPS row atom *receives* the messages of its listed neighbours; pairs beyond the cutoff are masked).
Two schemes carry the message passing across domains:

* ``"comm"`` (default): a one-cutoff ghost shell; the node features of the ghost rows are replaced by
  their owners' rows through lammps-jax's ``Comm.forward_comm`` (LAMMPS forward communication) wherever a
  layer reads them (the model's ``exchange`` hook, see :meth:`geodite_jax.model.Geodite.__call__`); autodiff
  turns it into the reverse communication of the force pass. Per-atom energies count on owned rows only.
* ``"ghost"``: no exchange; the ghost shell is ``n_hops`` cutoffs deep and every feature is recomputed on
  the ghosts. Geodite's receptive field is ``num_layers + 1`` hops (node initialisation sees one hop, the
  initial edge features read the sender's initial features, each layer adds one), so ``n_hops`` is that.

Units are LAMMPS ``metal`` (Å, eV, eV/Å); the LAMMPS type ``t`` is the element ``types[t - 1]``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .potential import Potential
from .precision import check_dtype_name

SCHEMES = ("comm", "ghost")
PLATFORMS = ("cpu", "cuda")
#: LAMMPS's default neighbour skin in metal units (Å): the pair style packs every listed pair, skin included.
DEFAULT_SKIN = 2.0
#: Default head room of capacities derived from a sample structure (density fluctuations, MD).
DEFAULT_MARGIN = 1.25
INSTALL_HINT = 'pip install -e ".[lammps]"'


def require_lammps_jax() -> Any:
    """The ``lammps_jax.export`` module, or an ``ImportError`` that says how to install it."""
    try:
        from lammps_jax import export
    except ImportError as err:
        raise ImportError(f"LAMMPS export needs the lammps-jax package ({err}); install it with {INSTALL_HINT}") \
            from None
    return export


def type_numbers(potential: Potential, types: Sequence[str]) -> list[int]:
    """Atomic numbers of the LAMMPS types ``1..len(types)`` given as element symbols.

    ``ValueError`` naming the type for an unknown symbol, an element the model does not know or was not
    trained on (:meth:`Potential.check_elements`), or an empty map.
    """
    from ase.data import atomic_numbers

    if not types:
        raise ValueError("empty LAMMPS type map: give one element symbol per LAMMPS atom type (e.g. Cu Ni Al)")
    numbers = []
    for t, symbol in enumerate(types, start=1):
        if symbol not in atomic_numbers or atomic_numbers[symbol] == 0:
            raise ValueError(f"LAMMPS type {t}: {symbol!r} is not an element symbol")
        z = atomic_numbers[symbol]
        if z >= potential.config.num_elements:
            raise ValueError(f"LAMMPS type {t}: element {symbol} (Z={z}) is not known to this model, which covers "
                             f"Z=1..{potential.config.num_elements - 1}")
        try:
            potential.check_elements([z])  # elements it was not trained on
        except ValueError as err:
            raise ValueError(f"LAMMPS type {t}: {err}") from None
        numbers.append(z)
    return numbers


def n_hops(potential: Potential) -> int:
    """Ghost-shell depth in cutoffs that the ghost scheme needs: ``num_layers + 1``."""
    return potential.config.num_layers + 1


def make_lammps_energy(potential: Potential, numbers: Sequence[int], dtype: str = "float32",
                       scheme: str = "comm") -> Callable[..., Any]:
    """Per-atom energies in the form ``export_model`` takes: ``fn(positions, species, graph[, comm]) -> [rows]``.

    ``positions [rows, 3]``: owned, ghost and padding rows; ``species``: LAMMPS type − 1; ``graph``: lammps-jax's
    ``LammpsNeighborList``; ``comm`` (scheme ``"comm"``): its ``Comm``, whose ``forward_comm`` is the model's
    ghost-row exchange. Energies of ghost and padding rows are meaningless (the exporter counts owned rows).
    """
    import jax.numpy as jnp

    from .energy import atom_energies
    from .model import Geodite
    from .precision import resolve_dtype

    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    jdtype = resolve_dtype(dtype)
    config = potential.config
    model = Geodite(config, chunk_edges=0)  # the sparse edge layout: one pass, no chunks
    state = potential.state(jdtype)
    vacuum = potential.vacuum_energies(jdtype) if config.vacuum else None
    table = np.asarray(numbers, np.int32)
    cutoff_sq = config.cutoff**2

    def energies(positions: Any, species: Any, graph: Any, comm: Any = None) -> Any:
        mask = graph.edge_mask
        # The LAMMPS row atom receives, its listed neighbour sends; padding slots point at row 0 (masked).
        receivers = jnp.where(mask, graph.senders, 0)
        senders = jnp.where(mask, graph.receivers, 0)
        vectors = positions[senders] - positions[receivers]
        # The list holds pairs out to cutoff + skin: only those within the cutoff are edges.
        real = mask & (jnp.sum(vectors * vectors, axis=-1) < cutoff_sq)
        z = jnp.asarray(table)[jnp.clip(species, 0, len(table) - 1)]
        exchange = None if comm is None else comm.forward_comm
        e, _ = atom_energies(model, state, vectors, z, senders, receivers, edge_mask=real, vacuum=vacuum,
                             exchange=exchange)
        return e

    if scheme == "comm":
        def comm_energies(positions: Any, species: Any, graph: Any, comm: Any) -> Any:
            return energies(positions, species, graph, comm)

        return comm_energies

    def ghost_energies(positions: Any, species: Any, graph: Any) -> Any:
        return energies(positions, species, graph)

    return ghost_energies


# ----------------------------------------------------------------------------------------- capacities
@dataclasses.dataclass(frozen=True)
class Capacities:
    """What one LAMMPS domain of a structure needs: atoms (owned + ghost rows) and packed edges."""

    atoms: int
    edges: int
    owned: int
    ghosts: int

    def with_margin(self, margin: float) -> tuple[int, int]:
        """``(max_atoms, max_edges)``: these times ``margin``, rounded up to multiples of 64."""
        def up(n: float) -> int:
            return int(64 * math.ceil(n * margin / 64))

        return up(self.atoms), up(self.edges)


def estimate_capacities(atoms: Any, cutoff: float, scheme: str = "comm", hops: int = 1,
                        skin: float = DEFAULT_SKIN) -> Capacities:
    """Rows and edges that ``pair_style jax/kk`` packs for ``atoms`` (ASE) on one MPI rank.

    Ghosts: every periodic image whose fractional coordinates lie within the communication cutoff
    (``cutoff + skin`` for ``"comm"``, ``hops · cutoff + skin`` for ``"ghost"``) of the box, as LAMMPS makes
    them on one rank. Edges: the full neighbour list out to ``cutoff + skin`` of the owned rows (``"comm"``),
    or of every row, ghosts included (``"ghost"``; ghosts at the rim of the shell have fewer neighbours, so
    this is an upper bound). A spatial decomposition into several ranks needs no more per rank than this.
    """
    from .graph import neighbour_list, validate_atoms

    validate_atoms(atoms)
    pbc = np.asarray(atoms.pbc, bool)
    cell = np.asarray(atoms.cell.array, np.float64)
    positions = np.asarray(atoms.positions, np.float64)
    list_cutoff = cutoff + skin
    shell = (hops * cutoff if scheme == "ghost" else cutoff) + skin
    images = np.ones(len(atoms))
    if pbc.any():
        frac = np.linalg.solve(cell.T, positions.T).T if pbc.all() else positions @ np.linalg.pinv(cell)
        recip = np.linalg.pinv(cell).T  # rows: reciprocal vectors, |b_k| = 1 / plane spacing
        for k in np.flatnonzero(pbc):
            reach = shell * np.linalg.norm(recip[k])
            s = frac[:, k] - np.floor(frac[:, k])
            lo, hi = -reach, 1.0 + reach
            # images s + n with lo <= s + n < hi
            images = images * (np.ceil(hi - s) - np.ceil(lo - s))
    receivers, _, _, _ = neighbour_list(positions, cell if pbc.any() else np.zeros((3, 3)), pbc, list_cutoff)
    degree = np.bincount(receivers, minlength=len(atoms)).astype(np.float64)
    n_all = int(images.sum())
    edges = int(degree.sum()) if scheme == "comm" else int((degree * images).sum())
    return Capacities(atoms=n_all, edges=edges, owned=len(atoms), ghosts=n_all - len(atoms))


# ------------------------------------------------------------------------------------------------ export
@dataclasses.dataclass(frozen=True)
class LammpsExport:
    """What :func:`export_lammps` wrote: the bundle path and its contract."""

    path: Path
    types: tuple[str, ...]
    max_atoms: int
    max_edges: int
    scheme: str
    n_hops: int
    dtype: str
    platform: str
    comm_widths: tuple[int, ...]
    needed: Capacities | None

    def pair_lines(self, plugin: str = "/path/to/pjrt_plugin.so") -> str:
        """The LAMMPS input lines for this bundle."""
        return (f"units metal\npair_style jax/kk {plugin}\npair_coeff * * {self.path}\n"
                f"# LAMMPS types 1..{len(self.types)} = {' '.join(self.types)}")


def export_lammps(potential: Potential | str | os.PathLike, path: str | os.PathLike, types: Sequence[str], *,
                  max_atoms: int | None = None, max_edges: int | None = None, sample: Any = None,
                  dtype: str = "float32", platform: str = "cpu", scheme: str = "comm", skin: float = DEFAULT_SKIN,
                  margin: float = DEFAULT_MARGIN) -> LammpsExport:
    """Write a lammps-jax bundle of ``potential`` (a :class:`Potential` or its directory) to ``path``.

    ``types``: element symbol of each LAMMPS type, in order. Capacities: ``max_atoms`` (owned + ghost rows of
    one MPI domain) and ``max_edges`` (packed neighbour pairs, skin included); each one not given is
    ``margin`` times what ``sample`` (ASE ``Atoms`` or a structure file) needs on one rank
    (:func:`estimate_capacities`); given ones smaller than the sample needs are an error. LAMMPS aborts a run
    whose domain outgrows them ("capacity exceeded"): re-export with larger ones.

    Every check (type map, capacities, dtype, platform, scheme, lammps-jax present) runs before any tracing.
    """
    export = require_lammps_jax()
    check_dtype_name(dtype)
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {list(PLATFORMS)}, got {platform!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    if not (skin >= 0 and math.isfinite(skin)):
        raise ValueError(f"skin must be a non-negative length in Å, got {skin}")
    if not margin >= 1:
        raise ValueError(f"margin must be at least 1, got {margin}")
    if not isinstance(potential, Potential):
        potential = Potential.load(potential)
    numbers = type_numbers(potential, types)
    hops = n_hops(potential) if scheme == "ghost" else 1
    for name, value in (("max_atoms", max_atoms), ("max_edges", max_edges)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    needed = None
    if sample is not None:
        if isinstance(sample, (str, os.PathLike)):
            import ase.io

            if not Path(sample).is_file():
                raise FileNotFoundError(2, "No such file (sample structure)", str(sample))
            sample = ase.io.read(sample)
        missing = sorted(set(sample.get_chemical_symbols()) - set(types))
        if missing:
            raise ValueError(f"the sample structure holds {', '.join(missing)}, which the LAMMPS type map "
                             f"{' '.join(types)} lacks")
        needed = estimate_capacities(sample, potential.config.cutoff, scheme, hops, skin)
        default_atoms, default_edges = needed.with_margin(margin)
        if max_atoms is not None and max_atoms < needed.atoms:
            raise ValueError(f"max_atoms={max_atoms} is smaller than the sample structure needs on one rank: "
                             f"{needed.owned} owned + {needed.ghosts} ghost atoms = {needed.atoms}")
        if max_edges is not None and max_edges < needed.edges:
            raise ValueError(f"max_edges={max_edges} is smaller than the sample structure needs on one rank: "
                             f"{needed.edges} neighbour pairs within cutoff + skin = "
                             f"{potential.config.cutoff + skin:g} Å")
        max_atoms = default_atoms if max_atoms is None else max_atoms
        max_edges = default_edges if max_edges is None else max_edges
    if max_atoms is None or max_edges is None:
        raise ValueError("capacities unknown: give max_atoms and max_edges, or a sample structure to derive them")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(2, "No such directory", str(path.parent))

    if dtype == "float64":
        from .precision import enable_float64

        enable_float64()
    energy_fn = make_lammps_energy(potential, numbers, dtype, scheme)
    bundle = export.export_model(
        energy_fn=energy_fn, path=path, max_atoms=int(max_atoms), max_edges=int(max_edges),
        cutoff=potential.config.cutoff, unit_style="metal", precision=dtype, newton="on", n_hops=hops,
        comm=scheme == "comm", n_species=len(numbers), platform=platform)
    # Our record beside lammps-jax's contract. The pair style's loader takes the first occurrence of each
    # key it reads anywhere in the file, so none of these names may be one of its keys (cutoff, max_*, ...).
    bundle["geodite"] = {"elements": list(types), "atomic_numbers": numbers, "scheme": scheme,
                         "model_checksum": potential.checksum(), "skin_sized_for": skin}
    path.write_text(json.dumps(bundle, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return LammpsExport(path=path, types=tuple(types), max_atoms=int(max_atoms), max_edges=int(max_edges),
                        scheme=scheme, n_hops=hops, dtype=dtype, platform=platform,
                        comm_widths=tuple(bundle["contract"]["comm_widths"]), needed=needed)
