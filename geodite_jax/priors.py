"""Physical priors as pure functions: ZBL-like repulsion with learnable screening, density normalisation.

The vacuum (isolated-atom) prior lives in the model, which evaluates its own layers on edgeless atoms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .radial import polynomial_envelope

COULOMB_EV_A = 14.3996  # e²/(4πε0) in eV·Å, as in the reference implementation
BOHR_A = 0.529  # Bohr radius in Å, as in the reference implementation

#: Universal ZBL (Ziegler, Biersack, Littmark 1985): α, β, c_k, d_k.
ZBL_UNIVERSAL = dict(alpha=0.8854, beta=0.23, coefs=(0.1818, 0.5099, 0.2802, 0.02817),
                     exps=(3.2, 0.9423, 0.4029, 0.2016))
#: Initial values of the authors' implementation (very repulsive).
ZBL_CODE = dict(alpha=0.4546, beta=0.0842, coefs=(0.1663,) * 4, exps=(0.0354,) * 4)


def zbl_pair_energy(r: jnp.ndarray, z_i: jnp.ndarray, z_j: jnp.ndarray, switch_length: jnp.ndarray,
                    alpha: jnp.ndarray, beta: jnp.ndarray, coefs: jnp.ndarray, exps: jnp.ndarray) -> jnp.ndarray:
    """Screened Coulomb repulsion V(r) u5(r / switch_length) of each edge (eV, before the energy scale).

    V(r) = k_e Z_i Z_j / r Σ_k c_k exp(−d_k r / a), a = α a0 / (Z_i^β + Z_j^β).

    Args:
        r: ``[E]`` distances (> 0).
        z_i, z_j: ``[E]`` atomic numbers as floats (> 0).
        switch_length: ``[E]`` R_cov,i + R_cov,j; the term is switched off (C^2) at that distance.
        alpha, beta: scalars; coefs, exps: ``[4]``.

    Returns:
        ``[E]`` pair energies.
    """
    screening = alpha * BOHR_A / (z_i**beta + z_j**beta)
    x = r / screening
    phi = (coefs * jnp.exp(-exps * x[:, None])).sum(-1)
    # k_e Z_j Z_i is evaluated in float32 (also in float64 mode), sender charge first: the reference
    # implementation multiplies the float literal by integer tensors, which gives float32, so converted
    # checkpoints reproduce it exactly (relative effect ~1e-7).
    charges = ((jnp.float32(COULOMB_EV_A) * z_j.astype(jnp.float32)) * z_i.astype(jnp.float32)).astype(r.dtype)
    v = charges / r * phi
    return v * polynomial_envelope(r / switch_length, 5)


def soft_neighbour_terms(phi: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """Per-edge terms tanh(SiLU(w·φ_ij)²) ∈ [0, 1) of the learned, smooth neighbour density ρ_i = Σ_j (…).

    Aggregated messages are divided by 1 + ρ_i; an isolated atom divides by exactly 1, and a neighbour
    contributes nothing at r_c (φ vanishes there).

    Args:
        phi: ``[E, K]`` radial embedding.
        weights: ``[K]``.

    Returns:
        ``[E]``.
    """
    return jnp.tanh(jax.nn.silu(phi @ weights) ** 2)
