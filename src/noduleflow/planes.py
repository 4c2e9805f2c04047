"""Slicing planes of a (z, y, x) volume: axial, coronal, sagittal.

A 2D network sees one plane at a time. A nodule is round in every plane, while a vessel or airway
that crosses an axial slice (round there, like a nodule) is a tube in the coronal and sagittal
planes, and the blunt end of a tube is a cap sitting on that tube. So training on patches cut in
all three planes, and averaging the three planes' probability maps at inference, suppresses most
false positives a purely axial 2.5D model makes (the multi-view idea of Setio et al., IEEE TMI
2016, for the LUNA16 false-positive reduction). Non-axial planes need (near) isotropic voxels:
the preprocess stage resamples to ``preprocess.spacing_mm``, 1 mm in every axis by default.

:func:`to_plane` reorders a volume so that axis 0 walks across the plane's slices:

============  ======================  ===========
plane          array axes (0, 1, 2)    slice rows
============  ======================  ===========
axial          (z, y, x)               y
coronal        (y, z, x)               z
sagittal       (x, z, y)               z
============  ======================  ===========
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

PLANES = ("axial", "coronal", "sagittal")
_ORDER = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}


def check_planes(planes: Iterable[str], key: str) -> tuple[str, ...]:
    """``planes`` as a tuple in :data:`PLANES` order; ValueError naming ``key`` if empty, repeated or unknown."""
    planes = list(planes)
    unknown = [p for p in planes if p not in PLANES]
    if unknown or not planes or len(set(planes)) != len(planes):
        raise ValueError(f"{key} = {planes}: must be a non-empty list of distinct planes from {list(PLANES)}")
    return tuple(p for p in PLANES if p in planes)


def to_plane(volume: np.ndarray, plane: str) -> np.ndarray:
    """``volume`` (z, y, x) reordered so axis 0 indexes the ``plane``'s slices (a contiguous copy
    unless axial, which returns ``volume`` itself)."""
    if plane == "axial":
        return volume
    return np.ascontiguousarray(np.transpose(volume, _ORDER[plane]))


def from_plane(volume: np.ndarray, plane: str) -> np.ndarray:
    """The inverse of :func:`to_plane`: a plane-ordered volume back to (z, y, x) (a view)."""
    if plane == "axial":
        return volume
    return np.transpose(volume, np.argsort(_ORDER[plane]))


def indices_from_plane(indices: np.ndarray, plane: str) -> np.ndarray:
    """Voxel indices (k, 3) in the ``plane``'s axis order -> (k, 3) in (z, y, x) order."""
    indices = np.asarray(indices)
    out = np.empty_like(indices)
    out[:, list(_ORDER[plane])] = indices
    return out


def split_count(n: int, parts: Sequence) -> list[int]:
    """``n`` split into ``len(parts)`` near-equal integers (the first ones get the remainder)."""
    base, extra = divmod(int(n), len(parts))
    return [base + (1 if i < extra else 0) for i in range(len(parts))]


def context_offsets(context: int, context_step: int) -> np.ndarray:
    """Slice offsets of the ``2 * context + 1`` input channels around the centre slice:
    ``-context * context_step .. context * context_step`` in steps of ``context_step`` (int64).
    Shared by sampling and inference, so both see the same neighbours."""
    return np.arange(-int(context), int(context) + 1, dtype=np.int64) * int(context_step)
