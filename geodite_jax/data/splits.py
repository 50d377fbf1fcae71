"""Random train/valid/test splits of frames, by frame or with whole groups (materials) kept together."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .frames import Frame


def split_indices(n: int, fractions: Sequence[float], seed: int = 0,
                  groups: Sequence[str] | None = None) -> list[np.ndarray]:
    """Random split of ``range(n)`` into ``len(fractions)`` sorted index arrays of those sizes.

    With ``groups`` (``[n]`` labels, e.g. MPtrj mp-ids), whole groups go to one split so that frames of one
    material never land in both training and test sets; sizes are then approximate.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or fractions.size == 0 or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions.tolist()}")
    rng = np.random.default_rng(seed)
    bounds = np.cumsum(fractions) * n
    if groups is None:
        order = rng.permutation(n)
        cuts = np.round(bounds).astype(np.int64)
        cuts[-1] = n
        return [np.sort(part) for part in np.split(order, cuts[:-1])]
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} items")
    names, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    sizes = np.bincount(codes, minlength=len(names))
    perm = rng.permutation(len(names))
    ends = np.cumsum(sizes[perm])
    middles = ends - sizes[perm] / 2.0  # a group goes to the split its middle falls into
    split_of_group = np.empty(len(names), np.int64)
    split_of_group[perm] = np.minimum(np.searchsorted(bounds, middles, side="right"), len(fractions) - 1)
    assignment = split_of_group[codes]
    return [np.flatnonzero(assignment == k) for k in range(len(fractions))]


def split_frames(frames: Iterable[Frame], fractions: Sequence[float], seed: int = 0, *,
                 by_group: bool = False) -> list[list[Frame]]:
    """Split frames at random into lists of the given fractions (whole groups together if ``by_group``)."""
    frames = list(frames)
    parts = split_indices(len(frames), fractions, seed, [f.group for f in frames] if by_group else None)
    return [[frames[i] for i in part] for part in parts]
