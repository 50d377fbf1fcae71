"""Real spherical harmonics of degree 1 and 2, and the inner products that couple steerable features.

Convention (the design note's §3.2): unit norm per degree, Cartesian order for L=1, and for L=2
    Y2(u) = (√3 xz, √3 xy, y² − (x² + z²)/2, √3 yz, (√3/2)(z² − x²)).
Steerable features are stored as ``[..., 8, F]``: rows 0-2 are L=1, rows 3-7 are L=2.
Y^l(-u) = (-1)^l Y^l(u), so L=1 rows are polar vectors and L=2 rows even rank-2 tensors.
"""

from __future__ import annotations

import jax.numpy as jnp

L1 = slice(0, 3)
L2 = slice(3, 8)
NUM_STEERABLE = 8
_SQRT3 = 3.0**0.5


def spherical_harmonics(unit: jnp.ndarray) -> jnp.ndarray:
    """Y^1 and Y^2 of unit vectors.

    Args:
        unit: ``[..., 3]`` unit vectors.

    Returns:
        ``[..., 8]``: three L=1 then five L=2 components, each degree of unit norm.
    """
    x, y, z = unit[..., 0], unit[..., 1], unit[..., 2]
    return jnp.stack(
        [x, y, z,
         _SQRT3 * x * z, _SQRT3 * x * y, y * y - 0.5 * (x * x + z * z), _SQRT3 * y * z,
         0.5 * _SQRT3 * (z * z - x * x)],
        axis=-1,
    )


def degree_dot(a: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-degree inner products over the m index of two steerable arrays.

    Args:
        a, b: ``[..., 8, C]`` (broadcastable).

    Returns:
        ``([..., C], [..., C])``: the L=1 and L=2 dot products (rotation and reflection invariant).
    """
    prod = a * b
    return prod[..., L1, :].sum(-2), prod[..., L2, :].sum(-2)


def project_out(features: jnp.ndarray, sh: jnp.ndarray) -> jnp.ndarray:
    """Remove the component of each degree along the edge harmonics: X - Y (Y·X), per degree and channel.

    Args:
        features: ``[E, 8, C]`` steerable features.
        sh: ``[E, 8]`` edge harmonics (unit norm per degree).

    Returns:
        ``[E, 8, C]``.
    """
    along1 = (sh[:, L1, None] * features[:, L1, :]).sum(1, keepdims=True)
    along2 = (sh[:, L2, None] * features[:, L2, :]).sum(1, keepdims=True)
    along = jnp.concatenate([jnp.broadcast_to(along1, features[:, L1].shape),
                             jnp.broadcast_to(along2, features[:, L2].shape)], axis=1)
    return features - sh[:, :, None] * along
