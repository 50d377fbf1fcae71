"""The potential bundle: config + parameters + element reference energies + energy scale, saved and loaded.

What it computes is :mod:`geodite_jax.energy` (E_i = E0(Z_i) + s_E · (E_i^NN + E_i^ZBL), forces, stress);
:meth:`Potential.state` is the pytree those functions take.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import GeoditeConfig
from .elements import MAX_Z, mptrj_element_energies
from .energy import PotentialState, as_dtype, make_energy_fn, make_predict_fn  # noqa: F401 (re-exported)
from .files import atomic_directory, quiet_failed_orbax_reads, read_json_object, recover_directory
from .graph import check_atomic_numbers, validate_atoms
from .model import Geodite, count_params, init_params
from .priors import ZBL_UNIVERSAL

FORMAT_VERSION = 1
_META_FILE = "geodite.json"
_PARAMS_DIR = "params"


def _as_numpy_float32(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x, np.float32) if np.issubdtype(np.asarray(x).dtype, np.floating) else np.asarray(x),
        tree)


class Potential:
    """A Geodite potential: ``config``, ``params`` and the data-derived ``element_energies`` and ``energy_scale``.

    >>> pot = Potential.init(GeoditeConfig.preset("tiny"), seed=0)
    >>> pot.save("my_model"); pot = Potential.load("my_model")
    """

    def __init__(self, config: GeoditeConfig, params: Any, element_energies: np.ndarray | None = None,
                 energy_scale: float = 1.0, metadata: dict[str, Any] | None = None) -> None:
        self.config = config
        self.params = _as_numpy_float32(params)  # stored in float32; cast per evaluation (see state())
        e0 = np.zeros(MAX_Z + 1) if element_energies is None else np.asarray(element_energies, np.float64)
        if e0.shape != (MAX_Z + 1,) or not np.all(np.isfinite(e0)):
            raise ValueError(f"element_energies must be {MAX_Z + 1} finite numbers indexed by atomic number, "
                             f"got shape {e0.shape}")
        if not (np.isfinite(energy_scale) and energy_scale > 0):
            raise ValueError(f"energy_scale must be a positive number, got {energy_scale}")
        self.element_energies = e0
        self.energy_scale = float(energy_scale)
        self.metadata = dict(metadata or {})
        self._check_params()

    @classmethod
    def init(cls, config: GeoditeConfig, seed: int = 0, element_energies: np.ndarray | str | None = None,
             energy_scale: float | None = None) -> Potential:
        """Freshly initialised (untrained) potential.

        ``element_energies="mptrj"`` takes Geodite-MP's isolated-atom energies (and its energy scale
        unless ``energy_scale`` is given); an array gives your own ([119], eV, indexed by Z).
        """
        from .elements import MPTRJ_ENERGY_SCALE

        if isinstance(element_energies, str):
            if element_energies != "mptrj":
                raise ValueError(f"unknown element energy table {element_energies!r}; known: 'mptrj'")
            element_energies = mptrj_element_energies()
            energy_scale = MPTRJ_ENERGY_SCALE if energy_scale is None else energy_scale
        energy_scale = 1.0 if energy_scale is None else float(energy_scale)
        params = init_params(config, seed)
        if config.zbl and config.zbl_init == "universal":
            # s_E multiplies (E_NN + E_ZBL): start from s_E · V = universal ZBL.
            coefs = np.asarray(ZBL_UNIVERSAL["coefs"]) / energy_scale
            params = jax.tree_util.tree_map(lambda x: x, params)
            params["params"]["zbl_coefs"] = np.asarray(coefs, np.float32)
        return cls(config, params, element_energies, energy_scale, {"seed": seed})

    @property
    def model(self) -> Geodite:
        return Geodite(self.config)

    @property
    def num_params(self) -> int:
        return count_params(self.params)

    def state(self, dtype: Any = jnp.float32) -> PotentialState:
        """The pytree the energy functions take: params, element energies and scale cast to ``dtype``."""
        return PotentialState.create(self.params, self.element_energies, self.energy_scale, dtype)

    def vacuum_energies(self, dtype: Any = jnp.float32) -> jnp.ndarray:
        """Per-layer isolated-atom readouts ``[num_elements, T]`` (fixed while the parameters are)."""
        model = self.model
        fn = jax.jit(lambda params: model.apply(params, dtype, method=Geodite.vacuum_energies))
        return fn(as_dtype(self.params, dtype))

    def check_elements(self, numbers: Any) -> None:
        """``ValueError`` naming any atomic number in ``numbers`` (``[n_atoms]``) that is not a valid element
        (1..118), lies beyond the model's ``config.num_elements``, or that the potential was not trained on:
        the one answer to "can this potential evaluate these elements".

        The trained set is ``metadata["elements"]`` (recorded by the trainer); without it every element
        below ``config.num_elements`` is accepted (an untrained or converted potential).
        """
        check_atomic_numbers(numbers, self.config.num_elements)
        numbers = np.asarray(numbers).reshape(-1)
        known = self.metadata.get("elements")
        if known is None:
            return
        known_set = {int(z) for z in known}
        missing = sorted({int(z) for z in np.unique(numbers)} - known_set)
        if missing:
            from ase.data import chemical_symbols

            names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
            trained = ", ".join(chemical_symbols[z] for z in sorted(known_set) if 1 <= z <= MAX_Z)
            raise ValueError(f"{names}: not an element this potential was trained on ({trained}); fine-tune it first")

    def check_atoms(self, atoms: Any) -> None:
        """``ValueError`` naming the problem if this potential cannot evaluate ``atoms`` (an ASE ``Atoms``): an
        empty structure, NaN or inf positions or cell, a singular cell (:func:`~geodite_jax.graph.validate_atoms`),
        or an element it does not know (:meth:`check_elements`)."""
        validate_atoms(atoms, self.config.num_elements)
        self.check_elements(atoms.numbers)

    def _check_params(self) -> None:
        expected = jax.eval_shape(lambda: init_params(self.config, 0))
        exp_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
        got_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(self.params)}
        missing, extra = sorted(set(exp_flat) - set(got_flat)), sorted(set(got_flat) - set(exp_flat))
        if missing or extra:
            raise ValueError(f"parameters do not fit the config: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, spec in exp_flat.items():
            if tuple(np.shape(got_flat[key])) != tuple(spec.shape):
                raise ValueError(f"parameter {key} has shape {tuple(np.shape(got_flat[key]))}, but the config "
                                 f"needs {tuple(spec.shape)}")

    # ----------------------------------------------------------------------------------- persistence
    def checksum(self) -> str:
        """``"sha256:<hex>"`` of the parameters (every leaf's path, dtype, shape and bytes, in path order), the
        element energies and the energy scale: what :meth:`save` stores and :meth:`load` verifies."""
        return _checksum(self.params, self.element_energies, self.energy_scale)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle to directory ``path`` atomically (a temporary sibling renamed into place), with a
        checksum of the parameters, element energies and energy scale in ``geodite.json``."""
        import orbax.checkpoint as ocp

        quiet_failed_orbax_reads()
        path = Path(path).absolute()
        meta = {"format_version": FORMAT_VERSION, "kind": "geodite_jax.Potential",
                "config": self.config.to_dict(), "element_energies": self.element_energies.tolist(),
                "energy_scale": self.energy_scale, "num_params": self.num_params, "metadata": self.metadata,
                "checksum": self.checksum()}
        with atomic_directory(path) as tmp:
            with ocp.StandardCheckpointer() as ckpt:
                ckpt.save(tmp / _PARAMS_DIR, jax.tree_util.tree_map(np.asarray, self.params))
                ckpt.wait_until_finished()
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, config: GeoditeConfig | None = None) -> Potential:
        """Read a bundle written by :meth:`save`. ``config``, if given, must equal the stored one.

        The stored checksum is verified (a ``ValueError`` naming the directory if the parameters, element
        energies or energy scale changed after saving). Format-version-1 bundles written before checksums
        were stored (no ``"checksum"`` key) load without the check.
        """
        import orbax.checkpoint as ocp

        quiet_failed_orbax_reads()
        given = path
        path = Path(path).absolute()
        recover_directory(path)  # a save interrupted between its two renames
        if not path.exists():
            raise FileNotFoundError(f"no such directory: {given}")
        if not path.is_dir():
            raise ValueError(f"{given} is not a directory (a saved potential is a directory)")
        meta_file = path / _META_FILE
        if not meta_file.is_file():
            raise ValueError(f"{path} is not a geodite_jax potential: {_META_FILE} is missing")
        meta = read_json_object(meta_file)
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {version!r}; this geodite_jax reads version {FORMAT_VERSION}")
        stored = GeoditeConfig.from_dict(meta["config"])
        if config is not None and config != stored:
            diff = {k: (v, getattr(stored, k)) for k, v in config.to_dict().items() if getattr(stored, k) != v}
            raise ValueError(f"the given config does not fit the checkpoint at {path}: (given, stored) = {diff}")
        target = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                        jax.eval_shape(lambda: init_params(stored, 0)))
        try:
            with ocp.StandardCheckpointer() as ckpt:
                params = ckpt.restore(path / _PARAMS_DIR, target)
        except Exception as err:  # orbax raises many types for a damaged directory
            raise ValueError(f"cannot read the parameters of {path}: {type(err).__name__}: {err}") from None
        params = jax.tree_util.tree_map(np.asarray, params)
        pot = cls(stored, params, np.asarray(meta["element_energies"]), meta["energy_scale"], meta.get("metadata"))
        if "checksum" in meta and pot.checksum() != meta["checksum"]:
            raise ValueError(f"{path}: the parameters, element energies or energy scale do not match the checksum "
                             f"stored in {_META_FILE} at save time: the files were changed or damaged after "
                             "saving")
        return pot


def _checksum(params: Any, element_energies: np.ndarray, energy_scale: float) -> str:
    digest = hashlib.sha256()
    leaves = sorted((jax.tree_util.keystr(k), np.ascontiguousarray(v))
                    for k, v in jax.tree_util.tree_leaves_with_path(params))
    for key, value in leaves:
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    digest.update(np.ascontiguousarray(element_energies, np.float64).tobytes())
    digest.update(np.float64(energy_scale).tobytes())
    return "sha256:" + digest.hexdigest()
