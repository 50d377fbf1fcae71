"""The model's hyper-parameters: one frozen, validated dataclass.

The config describes the architecture only. Data-derived numbers (element reference energies, the
energy scale) live in the :class:`~geodite_jax.potential.Potential` bundle beside the parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

ZBLInit = Literal["universal", "code"]


@dataclasses.dataclass(frozen=True)
class GeoditeConfig:
    """Hyper-parameters of a Geodite model (symbols as in the design note).

    Attributes:
        cutoff: radial cutoff r_c in Å.
        num_features: hidden channels F: invariant features ``h [N, F]``, steerable ``x [N, 8, F]``, edge
            state ``t [E, F]``.
        num_layers: interaction layers T (each followed by a coupling block and a readout head).
        num_heads: attention heads H; must divide ``num_features`` (``F / H`` channels a head).
        num_rbf: size K of the Bessel radial basis ``phi [E, K]``.
        edge_features: width F_e of the inner-product edge features ``[E, F_e]``.
        edge_mlp_features: hidden width F_m of the edge-update MLP.
        num_elements: rows of the element tables ``[num_elements, ...]``; atomic numbers 1 .. num_elements-1
            are known.
        envelope_p: exponent p of the polynomial cutoff envelope (C^2 at r_c).
        norm_eps: epsilon of the joint RMS norm.
        distance_weighting: learned short-range switch s(r / (R_cov,i + R_cov,j)) on the basis.
        zbl: ZBL-like screened Coulomb repulsion with learnable screening.
        zbl_init: "universal" (s_E * V equals universal ZBL at init) or "code" (the authors' values).
        vacuum: subtract the isolated-atom features, so an atom without neighbours has E = E0(Z).
        attention_dropout: dropout rate on the attention weights during training.
        remat: wrap each layer in ``jax.checkpoint`` (recompute its activations in the backward pass).
            Same numbers. It matters for the sparse edge layout only (training batches, irregular graphs):
            the neighbour-block layout already checkpoints every chunk of receivers (see
            :class:`~geodite_jax.model.Geodite`), and there whole-layer remat only adds a recomputation.
            Off by default: on XLA:CPU it cost 13 % of the time and did not lower peak memory.
        lmax: degree of the steerable features; Geodite uses 2 (fixed).
    """

    cutoff: float = 6.0
    num_features: int = 192
    num_layers: int = 4
    num_heads: int = 8
    num_rbf: int = 12
    edge_features: int = 192
    edge_mlp_features: int = 192
    num_elements: int = 100
    envelope_p: int = 6
    norm_eps: float = 1e-6
    distance_weighting: bool = True
    zbl: bool = True
    zbl_init: ZBLInit = "universal"
    vacuum: bool = True
    attention_dropout: float = 0.2
    remat: bool = False
    lmax: int = 2

    def __post_init__(self) -> None:
        positive = ("num_features", "num_layers", "num_heads", "num_rbf", "edge_features",
                    "edge_mlp_features", "envelope_p")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GeoditeConfig.{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.cutoff, (int, float)) and 0.5 <= float(self.cutoff) <= 30.0):
            raise ValueError(f"GeoditeConfig.cutoff must be a length in Å in [0.5, 30], got {self.cutoff!r}")
        object.__setattr__(self, "cutoff", float(self.cutoff))
        if self.num_features % self.num_heads:
            raise ValueError(
                f"GeoditeConfig.num_heads={self.num_heads} must divide num_features={self.num_features}")
        if not 2 <= self.num_elements <= 119:
            raise ValueError(f"GeoditeConfig.num_elements must be in [2, 119], got {self.num_elements}")
        if self.lmax != 2:
            raise ValueError(f"Geodite uses steerable features of degree 1 and 2 only: lmax must be 2, got {self.lmax}")
        if self.zbl_init not in ("universal", "code"):
            raise ValueError(f"GeoditeConfig.zbl_init must be 'universal' or 'code', got {self.zbl_init!r}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"GeoditeConfig.attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if not self.norm_eps > 0:
            raise ValueError(f"GeoditeConfig.norm_eps must be positive, got {self.norm_eps}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GeoditeConfig:
        """A named size: ``"mp"`` (Geodite-MP, 3,623,112 parameters, 6 Å) or ``"tiny"`` (tests)."""
        presets: dict[str, dict[str, Any]] = {
            "mp": {},
            "tiny": dict(num_features=32, num_layers=2, num_heads=4, num_rbf=8, edge_features=32,
                         edge_mlp_features=32, cutoff=5.0),
        }
        if name not in presets:
            raise ValueError(f"unknown GeoditeConfig preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (JSON-able; what a saved potential stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeoditeConfig:
        """Inverse of :meth:`to_dict`; unknown fields are refused by name, missing ones take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GeoditeConfig fields {unknown}; this geodite_jax knows {sorted(known)}")
        return cls(**data)
