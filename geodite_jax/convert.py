"""Convert a checkpoint of the authors' PyTorch implementation (e.g. the released ``Geodite-MP.ckpt``).

Reading the file needs torch (``pip install geodite-jax[convert]``); the model itself never does.
Every tensor is mapped to our parameter tree (PyTorch ``[out, in]`` -> our ``[in, out]``), duplicates
registered twice by the reference are checked to agree, and anything our model does not reproduce
exactly is refused with a ``ValueError`` naming the checkpoint key or hyper-parameter.

The converted potential reproduces the reference implementation to float64 round-off (see
``tests/test_parity.py``): the reference's float32-held constants (Bessel frequencies, covalent radii,
norm degree weights, the ZBL charge product) are rounded the same way in our model.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .config import GeoditeConfig
from .elements import COVALENT_RADII, MAX_Z
from .potential import Potential

# Defaults of the reference ``Geodite`` encoder for arguments absent from ``encoder.args`` (a missing
# argument means the reference used this value, so it is checked like a given one).
_ENCODER_DEFAULTS: dict[str, Any] = {
    "hidden_channels": 128, "num_layers": 4, "radial_basis": "besselbasis", "n_rbf": 12, "cutoff": 5.0,
    "activation": "silu", "max_z": 100, "epsilon": 1e-8, "num_heads": 8, "attn_dropout": 0.0,
    "edge_updates": True, "lmax": 1, "aggr": "add", "evec_dim": None, "emlp_dim": None, "edge_ln": "",
    "distance_weighting": False,
}
_EDGE_UPDATE_PARTS = {"linw", "mlpa", "ln"}  # "linw_mlpa_ln" (Geodite-MP); the reference ignores the order
_DECODER = "SnapshotDecoder."
_BLOBS = (_DECODER + "constants", _DECODER + "context")


def _normalize(name: Any) -> str:
    # The reference's own normalisation of option strings (case, '-', '_' and spaces ignored).
    return str(name).lower().replace("-", "").replace("_", "").replace(" ", "")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError("reading a PyTorch Geodite checkpoint needs torch: pip install 'geodite-jax[convert]' "
                          "(on this machine: pip install torch==2.13.0)") from None
    return torch


def _load_torch_checkpoint(path: Path) -> dict[str, Any]:
    torch = _import_torch()
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        # weights_only: plain containers and tensors only, never arbitrary pickled code (the authors'
        # own loader reads the file the same way).
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                         f"{type(err).__name__}: {err}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        found = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a Geodite Lightning checkpoint: it needs the keys 'state_dict' and "
                         f"'hyper_parameters' (found {found})")
    if not isinstance(ckpt["state_dict"], dict) or not isinstance(ckpt["hyper_parameters"], dict):
        raise ValueError(f"{path}: 'state_dict' and 'hyper_parameters' must be dicts")
    return ckpt


def config_from_hyper_parameters(hp: dict[str, Any]) -> GeoditeConfig:
    """Our config from the reference's ``hyper_parameters``; raises ``ValueError`` for options we do not reproduce."""
    encoder = hp.get("encoder")
    if not isinstance(encoder, dict) or not isinstance(encoder.get("args"), dict):
        raise ValueError("checkpoint hyper_parameters lack encoder.args (the encoder's hyper-parameters)")
    if encoder.get("arch") != "Geodite":
        raise ValueError(f"unsupported hyper-parameter encoder.arch={encoder.get('arch')!r}: only 'Geodite' converts")
    args = {**_ENCODER_DEFAULTS, **encoder["args"]}

    def refuse(key: str, supported: str) -> None:
        raise ValueError(f"unsupported hyper-parameter encoder.args.{key}={args[key]!r}: geodite_jax reproduces "
                         f"only {supported}")

    if _normalize(args["radial_basis"]) != "besselbasis":
        refuse("radial_basis", "'besselbasis'")
    if _normalize(args["activation"]) not in ("silu", "swish"):
        refuse("activation", "'silu'")
    if not isinstance(args["edge_updates"], str) or set(args["edge_updates"].split("_")) != _EDGE_UPDATE_PARTS:
        refuse("edge_updates", "'linw_mlpa_ln'")
    if args["lmax"] != 2:
        refuse("lmax", "2")
    if args["aggr"] not in ("add", "sum"):
        refuse("aggr", "'add'")
    if args["edge_ln"]:
        refuse("edge_ln", "'' (no norm inside the edge MLP)")
    if args["distance_weighting"] is not True:
        refuse("distance_weighting", "True")
    for key in ("hidden_channels", "num_layers", "num_heads", "n_rbf", "max_z"):
        if not isinstance(args[key], int) or isinstance(args[key], bool):
            refuse(key, "an integer")
    features = args["hidden_channels"]
    edge_features = features if args["evec_dim"] is None else args["evec_dim"]
    edge_mlp_features = features if args["emlp_dim"] is None else args["emlp_dim"]

    decoder = hp.get("decoder", {})
    if not decoder.get("combine_decoders", True):
        raise ValueError("unsupported hyper-parameter decoder.combine_decoders=False (one decoder per dataset); "
                         "geodite_jax converts the single shared SnapshotDecoder")
    for key, want in (("in_channels", features), ("num_residues", args["num_layers"])):
        if decoder.get(key, want) != want:
            raise ValueError(f"unsupported hyper-parameter decoder.{key}={decoder.get(key)!r}: it must equal the "
                             f"encoder's {'hidden_channels' if key == 'in_channels' else 'num_layers'}={want}")
    try:
        return GeoditeConfig(
            cutoff=float(args["cutoff"]), num_features=features, num_layers=args["num_layers"],
            num_heads=args["num_heads"], num_rbf=args["n_rbf"], edge_features=edge_features,
            edge_mlp_features=edge_mlp_features, num_elements=args["max_z"], norm_eps=float(args["epsilon"]),
            distance_weighting=True, zbl=True, zbl_init="code", vacuum=True,
            attention_dropout=float(args["attn_dropout"]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"unsupported hyper-parameters in encoder.args: {err}") from None


class _StateDict:
    """Typed access to the reference state dict with errors that name the key."""

    def __init__(self, sd: dict[str, Any], source: Path) -> None:
        self.sd, self.source, self.used = sd, source, set()

    def _array(self, key: str) -> np.ndarray:
        torch = _import_torch()
        value = self.sd[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{self.source}: checkpoint key {key!r} holds {kind}, expected a float tensor")
        return value.detach().cpu().double().numpy()

    def get(self, key: str, shape: tuple[int, ...], *aliases: str) -> np.ndarray:
        if key not in self.sd:
            raise ValueError(f"{self.source}: checkpoint key {key!r} is missing")
        value = self._array(key)
        if value.shape != shape:
            raise ValueError(f"{self.source}: checkpoint key {key!r} has shape {value.shape}, expected {shape}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{self.source}: checkpoint key {key!r} contains NaN or inf")
        self.used.add(key)
        for alias in aliases:  # the same module registered twice: both copies must agree
            if alias in self.sd:
                self.used.add(alias)
                if not np.array_equal(self._array(alias), value):
                    raise ValueError(f"{self.source}: checkpoint keys {alias!r} and {key!r} should hold the same "
                                     "tensor but differ")
        return value

    def linear(self, key: str, n_in: int, n_out: int, *aliases: str) -> np.ndarray:
        return self.get(key, (n_out, n_in), *aliases).T


def params_from_state_dict(sd: dict[str, Any], cfg: GeoditeConfig, source: Path) -> dict[str, Any]:
    """Our parameter tree (float32 numpy) from the reference ``state_dict``."""
    s = _StateDict(sd, source)
    f, k, fe, fm, z = cfg.num_features, cfg.num_rbf, cfg.edge_features, cfg.edge_mlp_features, cfg.num_elements
    enc = "encoder."
    params: dict[str, Any] = {
        "geometry": {"theta_kappa": s.get(enc + "distance_weighting_fn.p", ()),
                     "theta_lambda": s.get(enc + "distance_weighting_fn.q", ())},
        "node_init": {
            "embed_self": s.get(enc + "A_na.weight", (z, f)),
            "embed_nbr": s.get(enc + "node_init.A_nbr.weight", (z, f)),
            "W_phi": s.linear(enc + "node_init.W_ndp.layers.0.weight", k, f,
                              enc + "node_init.W_ndp.dense_layers.0.weight"),
            "W_1": s.linear(enc + "node_init.W_nrd_nru.layers.0.weight", 2 * f, f,
                            enc + "node_init.W_nrd_nru.dense_layers.0.weight"),
            "W_2": s.linear(enc + "node_init.W_nrd_nru.layers.1.weight", f, f,
                            enc + "node_init.W_nrd_nru.dense_layers.1.weight"),
            "w_density": s.linear(enc + "node_init.density_fn.weight", k, 1),
            "W_e": s.linear(enc + "edge_init.W_erp.weight", k, f),
        },
    }
    for layer in range(cfg.num_layers):
        pre = f"{enc}interaction_list.{layer}."
        inter = {
            "norm_scale": np.stack([s.get(f"{pre}tensor_layernorm.affine_weights.{d}", (f,)) for d in range(3)]),
            "W_q": s.linear(pre + "W_q.weight", f, f), "W_k": s.linear(pre + "W_k.weight", f, f),
            "W_x1": s.linear(pre + "gamma_s.0.weight", f, f), "W_x2": s.linear(pre + "gamma_s.1.weight", f, 3 * f),
            "W_v1": s.linear(pre + "gamma_v.0.weight", f, f), "W_v2": s.linear(pre + "gamma_v.1.weight", f, 3 * f),
            "W_a": s.linear(pre + "W_re.weight", f, f), "W_f": s.linear(pre + "W_rs.weight", f, 3 * f),
            "w_density": s.linear(pre + "density_fn.weight", k, 1),
        }
        key = pre + "tensor_layernorm.balance_degree_weight"
        balance = s.get(key, (9, 1))[:, 0]
        if not np.allclose(balance, [1] + [1 / 3] * 3 + [1 / 5] * 5, rtol=1e-6):
            raise ValueError(f"{source}: checkpoint key {key!r} is {balance.tolist()}, expected 1, 1/3 x3, 1/5 x5")
        if layer < cfg.num_layers - 1:
            inter.update({
                "W_t1": s.linear(pre + "gamma_t.layers.0.weight", f, fm, pre + "gamma_t.dense_layers.0.weight"),
                "W_t2": s.linear(pre + "gamma_t.layers.1.weight", fm, f, pre + "gamma_t.dense_layers.1.weight"),
                "W_Q": s.linear(pre + "W_vq.weight", f, fe),
                "W_K1": s.linear(pre + "W_vk.0.weight", f, fe), "W_K2": s.linear(pre + "W_vk.1.weight", f, fe),
                "W_w": s.linear(pre + "W_edp.weight", fe, f, pre + "gamma_w.1.weight"),
                "ln_scale": s.get(pre + "gamma_w.0.weight", (fe,)), "ln_bias": s.get(pre + "gamma_w.0.bias", (fe,)),
            })
        cpl = f"{enc}ec_list.{layer}."
        coupling = {"W_u": s.linear(cpl + "W_vu.weight", f, f), "W_c1": s.linear(cpl + "gamma_m.0.weight", 2 * f, f),
                    "W_c2": s.linear(cpl + "gamma_m.1.weight", f, 2 * f)}
        params[f"layers_{layer}"] = {"interaction": inter, "coupling": coupling}
    dec = _DECODER
    params["readout"] = np.stack([s.get(f"{dec}readout.linears.{i}.weight", (1, f))[0] for i in range(cfg.num_layers)])
    params["zbl_alpha"] = s.get(dec + "repulsion_term.a_factor", ())
    params["zbl_beta"] = s.get(dec + "repulsion_term.Z_power", ())
    params["zbl_coefs"] = s.get(dec + "repulsion_term.screen_coefs", (4,))
    params["zbl_exps"] = s.get(dec + "repulsion_term.screen_exps", (4,))

    # Buffers our model computes itself must match what the reference used.
    key = enc + "radial_basis.freqs"
    freqs = s.get(key, (k,))
    if not np.allclose(freqs, np.arange(1, k + 1) * math.pi / cfg.cutoff, rtol=1e-6):
        raise ValueError(f"{source}: checkpoint key {key!r} is not n·π/r_c, n = 1..{k} (trainable or altered "
                         "radial basis), which geodite_jax does not reproduce")
    key = enc + "radial_basis.prefactor"
    if not np.isclose(s.get(key, ()), math.sqrt(2.0 / cfg.cutoff), rtol=1e-6):
        raise ValueError(f"{source}: checkpoint key {key!r} is not √(2/r_c)")
    for key in (enc + "distance_weighting_fn.covalent_radii", dec + "repulsion_term.covalent_radii"):
        if not np.allclose(s.get(key, (MAX_Z + 1,)), COVALENT_RADII, rtol=0, atol=1e-6):
            raise ValueError(f"{source}: checkpoint key {key!r} differs from ASE's covalent radii, which geodite_jax "
                             "uses")
    unused = sorted(set(sd) - s.used - set(_BLOBS))
    if unused:
        raise ValueError(f"{source}: checkpoint keys that geodite_jax does not know (a different architecture?): "
                         f"{unused[:8]}{' ...' if len(unused) > 8 else ''}")
    return {"params": _to_float32(params)}


def _to_float32(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _to_float32(value) for key, value in tree.items()}
    return np.asarray(tree, np.float32)


def _unpickle_blob(sd: dict[str, Any], key: str, source: Path) -> Any:
    """The Python object a reference decoder stores as a uint8 tensor (bytes of a ``torch.save``)."""
    torch = _import_torch()
    if key not in sd:
        raise ValueError(f"{source}: checkpoint key {key!r} is missing")
    blob = sd[key]
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"{source}: checkpoint key {key!r} should be a 1-D uint8 tensor (a serialised object)")
    try:
        return torch.load(io.BytesIO(blob.numpy().tobytes()), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{source}: checkpoint key {key!r} cannot be read: {type(err).__name__}: {err}") from None


def _scalar(consts: dict[str, Any], name: str, key: str, source: Path) -> float:
    if name not in consts:
        raise ValueError(f"{source}: checkpoint key {key!r} lacks the constant {name!r}")
    value = np.asarray(consts[name], np.float64)
    if value.size != 1 or not np.isfinite(value).all():
        raise ValueError(f"{source}: constant {name!r} in {key!r} must be one finite number, got {consts[name]!r}")
    return float(value.reshape(()))


def _dataset_constants(sd: dict[str, Any], fidelity: str | None, num_elements: int,
                       source: Path) -> tuple[str, np.ndarray, float, dict[str, Any]]:
    """``(context name, E0 [119] with the energy shift folded in, s_E, other statistics)``."""
    key = _BLOBS[0]
    constants = _unpickle_blob(sd, key, source)
    if not isinstance(constants, dict) or not constants:
        raise ValueError(f"{source}: checkpoint key {key!r} does not hold a dict of dataset constants")
    if fidelity is None:  # the authors' calculator defaults to fidelity "MPtrj"
        if "MPtrj_" in constants or len(constants) > 1:
            fidelity = "MPtrj"
        else:
            fidelity = str(next(iter(constants))).removesuffix("_")
    name = f"{fidelity}_"
    if name not in constants or not isinstance(constants[name], dict):
        raise ValueError(f"{source}: {key!r} has no constants for fidelity {fidelity!r} (known: "
                         f"{sorted(str(c).removesuffix('_') for c in constants)})")
    consts = constants[name]
    if "e0" not in consts:
        raise ValueError(f"{source}: checkpoint key {key!r} lacks the element energies 'e0'")
    e0 = np.asarray(consts["e0"], np.float64).reshape(-1)
    if e0.size < num_elements or not np.isfinite(e0[:num_elements]).all():
        raise ValueError(f"{source}: 'e0' in {key!r} must hold ≥ {num_elements} finite energies indexed by atomic "
                         f"number, got {e0.size}")
    element_energies = np.zeros(MAX_Z + 1)
    element_energies[: min(e0.size, MAX_Z + 1)] = e0[: MAX_Z + 1]
    element_energies[1:] += _scalar(consts, "e_shift", key, source) if "e_shift" in consts else 0.0
    scale = _scalar(consts, "e_scale", key, source)
    if scale <= 0:
        raise ValueError(f"{source}: energy scale 'e_scale' in {key!r} must be positive, got {scale}")
    stats = {stat: np.asarray(consts[stat], np.float64).tolist()
             for stat in ("force_std", "stress_mean", "stress_std") if stat in consts}
    return name, element_energies, scale, stats


def potential_from_reference_checkpoint(path: str | os.PathLike, fidelity: str | None = None) -> Potential:
    """A :class:`~geodite_jax.potential.Potential` from a checkpoint of the authors' implementation.

    Args:
        path: the Lightning checkpoint (``.ckpt``), e.g. the released ``Geodite-MP.ckpt``.
        fidelity: which dataset's normalisation constants to use, as the authors' calculator's
            ``fidelity`` argument (default ``"MPtrj"``, or the only one stored).

    The element reference energies E0 and the energy scale s_E come from the decoder's serialised
    constants (a nonzero energy shift μ_E is folded into E0, which gives the same energies).

    Raises:
        ImportError: torch is not installed (``pip install geodite-jax[convert]``).
        FileNotFoundError: no file at ``path``.
        ValueError: an unreadable file, a missing or misshapen key, or a hyper-parameter that geodite_jax
            does not reproduce (the message names it).
    """
    path = Path(path)
    ckpt = _load_torch_checkpoint(path)
    config = config_from_hyper_parameters(ckpt["hyper_parameters"])
    sd = ckpt["state_dict"]
    params = params_from_state_dict(sd, config, path)
    name, element_energies, scale, stats = _dataset_constants(sd, fidelity, config.num_elements, path)
    metadata = {"source": "converted from the authors' PyTorch checkpoint", "checkpoint": path.name,
                "dataset_context": name, "stats": stats}
    return Potential(config, params, element_energies, scale, metadata)
