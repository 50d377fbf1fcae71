"""Converting checkpoints of the authors' PyTorch implementation: the converted bundle, and clear errors.

Bad checkpoints are corrupted copies of the small reference checkpoint written to ``tmp_path``. Needs
``../shared/data/geodite-reference`` and torch (skipped without them), except the missing-torch test.
"""

from __future__ import annotations

import copy
import json
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from geodite_jax.convert import config_from_hyper_parameters, potential_from_reference_checkpoint

REF_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "geodite-reference"
SMALL = REF_DIR / "geodite-small-perturbed.ckpt"
MP = REF_DIR / "geodite-mp-perturbed.ckpt"


@pytest.fixture
def torch():
    if not SMALL.is_file():
        pytest.skip(f"reference checkpoints not found at {REF_DIR} (../shared/data/geodite-reference next to the repo)")
    return pytest.importorskip("torch")


@cache
def _small_checkpoint() -> dict:
    import torch

    return torch.load(SMALL, map_location="cpu", weights_only=True)


def _small_copy() -> dict:
    return copy.deepcopy(_small_checkpoint())


def _write(torch, tmp_path: Path, ckpt: dict) -> Path:
    path = tmp_path / "bad.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("path,cutoff,features,layers,heads,rbf,params", [
    (SMALL, 5.0, 32, 2, 4, 8, 55_396), (MP, 6.0, 192, 4, 8, 12, 3_623_112)])
def test_converted_bundle(torch, path, cutoff, features, layers, heads, rbf, params):
    pot = potential_from_reference_checkpoint(path)
    cfg = pot.config
    assert (cfg.cutoff, cfg.num_features, cfg.num_layers, cfg.num_heads, cfg.num_rbf) == (
        cutoff, features, layers, heads, rbf)
    assert (cfg.edge_features, cfg.edge_mlp_features, cfg.num_elements, cfg.norm_eps) == (features, features, 100, 1e-6)
    assert cfg.distance_weighting and cfg.zbl and cfg.vacuum and cfg.attention_dropout == 0.2
    assert pot.num_params == params  # = sum(p.numel()) of the reference, shared modules counted once
    # E0 (float32 values, indexed by Z) and s_E from the decoder's serialised MPtrj constants.
    assert pot.element_energies[26] == -3.5200493335723877 and pot.element_energies[8] == -3.0967757701873779 / 2
    assert pot.element_energies[0] == 0.0 and pot.energy_scale == 0.6859245200012877
    assert pot.metadata["dataset_context"] == "MPtrj_"
    json.dumps(pot.metadata)  # stored in the bundle's JSON


def test_converted_bundle_roundtrip(torch, tmp_path):
    from geodite_jax import Potential

    pot = potential_from_reference_checkpoint(SMALL)
    again = Potential.load(pot.save(tmp_path / "geodite-small"))
    assert again.config == pot.config and again.energy_scale == pot.energy_scale
    np.testing.assert_array_equal(again.element_energies, pot.element_energies)
    for (key, a), (_, b) in zip(_leaves(pot.params), _leaves(again.params), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=key)


def _leaves(tree: dict, prefix: str = "") -> list:
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in _leaves(tree[key], f"{prefix}/{key}")]
    return [(prefix, np.asarray(tree))]


def test_missing_key(torch, tmp_path):
    ckpt = _small_copy()
    del ckpt["state_dict"]["encoder.interaction_list.1.W_q.weight"]
    with pytest.raises(ValueError, match=r"'encoder\.interaction_list\.1\.W_q\.weight' is missing"):
        potential_from_reference_checkpoint(_write(torch, tmp_path, ckpt))


def test_missing_constants(torch, tmp_path):
    ckpt = _small_copy()
    del ckpt["state_dict"]["SnapshotDecoder.constants"]
    with pytest.raises(ValueError, match=r"'SnapshotDecoder\.constants' is missing"):
        potential_from_reference_checkpoint(_write(torch, tmp_path, ckpt))


def test_wrong_shape(torch, tmp_path):
    ckpt = _small_copy()
    ckpt["state_dict"]["encoder.A_na.weight"] = torch.zeros(100, 31)
    with pytest.raises(ValueError, match=r"'encoder\.A_na\.weight' has shape \(100, 31\), expected \(100, 32\)"):
        potential_from_reference_checkpoint(_write(torch, tmp_path, ckpt))


def test_non_finite_weight(torch, tmp_path):
    ckpt = _small_copy()
    ckpt["state_dict"]["SnapshotDecoder.repulsion_term.screen_exps"][2] = float("nan")
    with pytest.raises(ValueError, match=r"'SnapshotDecoder\.repulsion_term\.screen_exps' contains NaN"):
        potential_from_reference_checkpoint(_write(torch, tmp_path, ckpt))


def test_duplicate_copies_disagree(torch, tmp_path):
    ckpt = _small_copy()
    key = "encoder.node_init.W_nrd_nru.dense_layers.1.weight"
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1.0  # a new tensor: the two keys share storage
    with pytest.raises(ValueError, match=r"dense_layers\.1\.weight' and .*should hold the same tensor"):
        potential_from_reference_checkpoint(_write(torch, tmp_path, ckpt))


def test_unknown_key(torch, tmp_path):
    ckpt = _small_copy()
    ckpt["state_dict"]["encoder.interaction_list.0.extra_gate.weight"] = torch.zeros(32, 32)
    with pytest.raises(ValueError, match=r"does not know .*extra_gate"):
        potential_from_reference_checkpoint(_write(torch, tmp_path, ckpt))


def test_altered_radial_buffer(torch, tmp_path):
    ckpt = _small_copy()
    ckpt["state_dict"]["encoder.radial_basis.freqs"] *= 1.01  # e.g. trained Bessel frequencies
    with pytest.raises(ValueError, match=r"'encoder\.radial_basis\.freqs' is not n·π/r_c"):
        potential_from_reference_checkpoint(_write(torch, tmp_path, ckpt))


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file(torch, tmp_path, keep):
    data = SMALL.read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        potential_from_reference_checkpoint(path)


def test_not_a_checkpoint(torch, tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        potential_from_reference_checkpoint(path)
    with pytest.raises(ValueError, match="needs the keys 'state_dict' and 'hyper_parameters'"):
        potential_from_reference_checkpoint(_write(torch, tmp_path, {"model": {}}))
    with pytest.raises(FileNotFoundError):
        potential_from_reference_checkpoint(tmp_path / "absent.ckpt")


def test_unsupported_hyper_parameter_in_file(torch, tmp_path):
    ckpt = _small_copy()
    ckpt["hyper_parameters"]["encoder"]["args"]["lmax"] = 3
    with pytest.raises(ValueError, match=r"unsupported hyper-parameter encoder\.args\.lmax=3"):
        potential_from_reference_checkpoint(_write(torch, tmp_path, ckpt))


@pytest.mark.parametrize("section,key,value,message", [
    ("args", "edge_updates", "linw_mlp_ln", r"encoder\.args\.edge_updates='linw_mlp_ln'"),
    ("args", "activation", "relu", r"encoder\.args\.activation='relu'"),
    ("args", "radial_basis", "gaussian", r"encoder\.args\.radial_basis='gaussian'"),
    ("args", "distance_weighting", False, r"encoder\.args\.distance_weighting=False"),
    ("args", "edge_ln", "layer", r"encoder\.args\.edge_ln='layer'"),
    ("args", "aggr", "mean", r"encoder\.args\.aggr='mean'"),
    ("args", "num_heads", 5, r"num_heads=5 must divide"),
    ("args", "lmax", None, r"encoder\.args\.lmax=1"),  # absent: the reference's default lmax=1
    ("encoder", "arch", "GotenNet", r"encoder\.arch='GotenNet'"),
    ("decoder", "num_residues", 3, r"decoder\.num_residues=3"),
    ("decoder", "combine_decoders", False, r"decoder\.combine_decoders=False"),
])
def test_unsupported_hyper_parameters(torch, section, key, value, message):
    hp = copy.deepcopy(_small_checkpoint()["hyper_parameters"])
    target = hp["encoder"]["args"] if section == "args" else hp[section]
    if value is None:
        del target[key]
    else:
        target[key] = value
    with pytest.raises(ValueError, match=message):
        config_from_hyper_parameters(hp)


def test_equivalent_spellings_are_accepted(torch):
    hp = copy.deepcopy(_small_checkpoint()["hyper_parameters"])
    hp["encoder"]["args"].update(activation="SiLU", radial_basis="BesselBasis", edge_updates="mlpa_linw_ln",
                                 trainable_radial=True)  # ignored by the reference encoder
    assert config_from_hyper_parameters(hp) == config_from_hyper_parameters(_small_checkpoint()["hyper_parameters"])


def test_unknown_fidelity(torch):
    with pytest.raises(ValueError, match=r"no constants for fidelity 'OMat' \(known: \['MPtrj'\]\)"):
        potential_from_reference_checkpoint(SMALL, fidelity="OMat")


def test_missing_torch_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r"geodite-jax\[convert\]"):
        potential_from_reference_checkpoint(tmp_path / "any.ckpt")
