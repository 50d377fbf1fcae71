"""Per-element data: covalent radii and the MPtrj isolated-atom reference energies."""

from __future__ import annotations

import numpy as np
from ase.data import chemical_symbols, covalent_radii

#: Covalent radii in Å indexed by atomic number (ASE's table, Cordero 2008), [119], rounded to float32 as
#: the reference implementation stores them (so converted checkpoints match it exactly).
COVALENT_RADII = np.asarray(covalent_radii, dtype=np.float32).astype(np.float64)
MAX_Z = 118

# DFT (VASP PBE) isolated-atom energies in eV used by Geodite-MP (design note §6.3); 0 where MPtrj has none.
_MPTRJ_E0 = {
    "H": -1.1173, "He": 0.0010, "Li": -0.2975, "Be": -0.0178, "B": -0.2689, "C": -1.2617, "N": -3.1244,
    "O": -1.5484, "F": -0.5188, "Ne": -0.0124, "Na": -0.2288, "Mg": -0.0095, "Al": -0.2163, "Si": -0.8264,
    "P": -1.8882, "S": -0.8916, "Cl": -0.2583, "Ar": -0.0493, "K": -0.2270, "Ca": -0.0928, "Sc": -2.1140,
    "Ti": -2.5005, "V": -3.7048, "Cr": -5.6026, "Mn": -5.3254, "Fe": -3.5200, "Co": -1.9356, "Ni": -0.9352,
    "Cu": -0.6003, "Zn": -0.1651, "Ga": -0.3299, "Ge": -0.7797, "As": -1.6837, "Se": -0.7694, "Br": -0.2221,
    "Kr": -0.0336, "Rb": -0.1882, "Sr": -0.0683, "Y": -2.1708, "Zr": -2.2858, "Nb": -3.1343, "Mo": -4.6021,
    "Tc": -3.4520, "Ru": -2.3807, "Rh": -1.4686, "Pd": -1.4773, "Ag": -0.3395, "Cd": -0.1684, "In": -0.3547,
    "Sn": -0.8364, "Sb": -1.4110, "Te": -0.6574, "I": -0.1896, "Xe": -0.0086, "Cs": -0.1377, "Ba": -0.0346,
    "La": -0.4558, "Ce": -1.3309, "Pr": -0.2967, "Nd": -0.3039, "Pm": -0.3090, "Sm": -0.2547, "Eu": -8.3800,
    "Gd": -10.3890, "Tb": -0.3060, "Dy": -0.3068, "Ho": -0.3087, "Er": -0.3161, "Tm": -0.2519, "Yb": -0.0643,
    "Lu": -0.3200, "Hf": -3.5277, "Ta": -3.5449, "W": -4.6566, "Re": -4.7011, "Os": -2.8826, "Ir": -1.4678,
    "Pt": -0.5027, "Au": -0.2880, "Hg": -0.1245, "Tl": -0.3174, "Pb": -0.7764, "Bi": -1.3263, "Ac": -0.2683,
    "Th": -0.9082, "Pa": -2.4765, "U": -4.9044, "Np": -7.6338, "Pu": -10.7724,
}

#: MPtrj energy scale s_E (eV) of Geodite-MP.
MPTRJ_ENERGY_SCALE = 0.6859245200012877


def mptrj_element_energies() -> np.ndarray:
    """Geodite-MP's isolated-atom energies E0 in eV, indexed by atomic number, [119]."""
    e0 = np.zeros(MAX_Z + 1)
    for symbol, energy in _MPTRJ_E0.items():
        e0[chemical_symbols.index(symbol)] = energy
    return e0
