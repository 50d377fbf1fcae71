"""Real spherical harmonics of degree 1 and 2 of the edge directions, from which steerable features are built.

Convention (the design note's §3.2): unit norm per degree, Cartesian order for L=1, and for L=2
    Y2(u) = (√3 xz, √3 xy, y² − (x² + z²)/2, √3 yz, (√3/2)(z² − x²)).
Steerable features are stored as ``[..., 8, F]``: rows 0-2 are L=1, rows 3-7 are L=2.
Y^l(-u) = (-1)^l Y^l(u), so L=1 rows are polar vectors and L=2 rows even rank-2 tensors.
"""

from __future__ import annotations

import jax.numpy as jnp

L1 = slice(0, 3)
L2 = slice(3, 8)
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

