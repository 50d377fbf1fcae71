"""Radial basis, the smooth polynomial cutoff envelope and the learned short-range distance weighting."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def polynomial_envelope(x: jnp.ndarray, p: int) -> jnp.ndarray:
    """u_p(x) = 1 − (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) − p(p+1)/2 x^(p+2), exactly 0 for x ≥ 1.

    Value, slope and curvature vanish at x = 1 (C^2). ``x``: any shape ``[...]``, ≥ 0; returns ``[...]``.

    Evaluated in the factored form u_p(x) = (1 − x)^3 Σ_{k<p} C(k+2, 2) x^k (the same polynomial): the
    expanded form cancels terms of size ~(p+1)(p+2)/2 near x = 1, which in float32 costs up to ~1e-3
    relative error where u_p is small (e.g. the ZBL switch between nearest neighbours).
    """
    inside = x < 1.0
    xs = jnp.where(inside, x, 0.0)  # keeps the unused branch finite for the gradient
    series = jnp.zeros_like(xs)
    for k in reversed(range(p)):  # Horner: Σ_{k<p} C(k+2, 2) x^k
        series = series * xs + (k + 1) * (k + 2) // 2
    return jnp.where(inside, (1.0 - xs) ** 3 * series, 0.0)


def bessel_basis(r: jnp.ndarray, cutoff: float, num_rbf: int) -> jnp.ndarray:
    """√(2/r_c) sin(nπ r/r_c) / (r + 1e-6), n = 1..K.

    The frequencies and prefactor are float32 values (also in float64 mode), computed as the reference
    implementation computes its float32 buffers (frequencies: float32(π) · n / r_c in float32 arithmetic,
    rounded after each operation; prefactor: √(2/r_c) rounded once): converted checkpoints match exactly.

    Args:
        r: ``[E]`` distances (> 0); cutoff: r_c in Å; num_rbf: K.

    Returns:
        ``[E, K]``.
    """
    freqs = (np.float32(math.pi) * np.arange(1, num_rbf + 1, dtype=np.float32) / np.float32(cutoff)).astype(np.float64)
    prefactor = float(np.float32(math.sqrt(2.0 / cutoff)))
    return prefactor * jnp.sin(jnp.asarray(freqs, r.dtype) * r[:, None]) / (r[:, None] + 1e-6)


def _one_plus_softplus_half(theta: jnp.ndarray) -> jnp.ndarray:
    # 1 + softplus with β = 1/2: 1 + 2 ln(1 + e^(θ/2)).
    return 1.0 + 2.0 * jax.nn.softplus(0.5 * theta)


def distance_weighting(t: jnp.ndarray, theta_kappa: jnp.ndarray, theta_lambda: jnp.ndarray) -> jnp.ndarray:
    """Learned short-range switch s(t) = A t^λ / (1 + t^(λ−κ) + A t^λ), t = r / (R_cov,i + R_cov,j).

    ≈ A t^λ → 0 as t → 0 and → 1 as t → ∞, so learned pair terms fade out where ZBL takes over.
    κ = 1 + 2 ln(1 + e^(θκ/2)), λ likewise, A = −2(κ + λ − 2κλ)/(κ² + κ + λ² + λ).

    Args:
        t: ``[E]`` reduced distances (> 0).
        theta_kappa, theta_lambda: scalars (learned).

    Returns:
        ``[E]`` switch values in [0, 1).
    """
    kappa = _one_plus_softplus_half(theta_kappa)
    lam = _one_plus_softplus_half(theta_lambda)
    a = -2.0 * (kappa + lam - 2.0 * kappa * lam) / (kappa**2 + kappa + lam**2 + lam)
    log_t = jnp.log(t)
    t_lam = jnp.exp(lam * log_t)
    t_lam_kappa = jnp.exp((lam - kappa) * log_t)
    return a * t_lam / (1.0 + t_lam_kappa + a * t_lam)
