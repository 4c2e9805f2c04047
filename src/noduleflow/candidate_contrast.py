"""How much denser than the lung around it a candidate is.

A nodule is seen on CT because it is denser than the parenchyma around it: a solid one by some
800 HU, a ground-glass one by 150-450 HU (-750..-400 HU against about -850). The model, taught to
find faint nodules too (the contrast augmentations scale a nodule's contrast down to a fifth), also
fires on patches of plain parenchyma where a faint nodule could be: its highest-ranked false
positives on synthetic cohorts are such near-invisible blobs, a median 40 HU above their
surroundings, while every hit is more than 150 HU above them (docs/results.md).

:func:`density_contrast` measures it per candidate: the mean HU of the candidate's voxels minus the
median HU of the lung voxels within :data:`SHELL_MM` of it that belong to no candidate.
:func:`contrast_factor` turns it into the factor a candidate's rank score is multiplied by:
``min(1, contrast / full_contrast_hu)`` (0 for no excess density), so a candidate of at least
``full_contrast_hu`` keeps its score and a fainter one ranks lower in proportion. Positions, sizes
and the segmentation do not change.

Arrays are (z, y, x); spacings (x, y, z) mm as :class:`noduleflow.io.Geometry` holds them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from noduleflow.checks import check_number

#: width (mm) of the shell around a candidate whose lung voxels give its surroundings' density
SHELL_MM = 3.0


def check_contrast_hu(full_contrast_hu: float) -> None:
    """InputError naming ``predict.contrast_hu`` unless it is a finite number >= 0."""
    check_number(full_contrast_hu, "predict.contrast_hu", 0.0, note="0 = off")


def density_contrast(image: np.ndarray, labels: np.ndarray, components: Sequence[int],
                     spacing_xyz: Sequence[float], lung: np.ndarray | None = None,
                     shell_mm: float = SHELL_MM) -> np.ndarray:
    """For each component id of ``components`` (values of ``labels``, (z, y, x), 0 = background): the
    mean HU of ``image`` (HU, same shape) over its voxels minus the median HU over its shell: the
    voxels within ``shell_mm`` (Euclidean, voxel size ``spacing_xyz`` mm) of it that are background
    in ``labels`` and, when ``lung`` is given, inside the lung. NaN where the shell is empty.
    float64 array, one value per component."""
    from scipy import ndimage

    image = np.asarray(image)
    labels = np.asarray(labels)
    spacing_zyx = np.asarray(tuple(spacing_xyz)[::-1], dtype=np.float64)
    reach = np.ceil(float(shell_mm) / spacing_zyx).astype(int) + 1
    boxes = ndimage.find_objects(labels)
    out = np.full(len(components), np.nan, dtype=np.float64)
    for row, component in enumerate(components):
        box = boxes[int(component) - 1] if 0 < int(component) <= len(boxes) else None
        if box is None:
            continue
        grown = tuple(slice(max(0, s.start - r), min(n, s.stop + r)) for s, r, n in zip(box, reach, labels.shape))
        local = labels[grown]
        inside = local == component
        near = ndimage.distance_transform_edt(~inside, sampling=spacing_zyx) <= float(shell_mm)
        shell = near & (local == 0)
        if lung is not None:
            shell &= np.asarray(lung)[grown] > 0
        if not shell.any():
            continue
        values = image[grown]
        out[row] = float(values[inside].astype(np.float64).mean()) - float(np.median(values[shell]))
    return out


def contrast_factor(contrast_hu: np.ndarray, full_contrast_hu: float) -> np.ndarray:
    """``clip(contrast_hu / full_contrast_hu, 0, 1)``; 1 where the contrast is NaN (unknown) or
    ``full_contrast_hu`` is 0 (off)."""
    contrast_hu = np.asarray(contrast_hu, dtype=np.float64)
    if float(full_contrast_hu) <= 0.0:
        return np.ones(contrast_hu.shape)
    factor = np.clip(contrast_hu / float(full_contrast_hu), 0.0, 1.0)
    return np.where(np.isnan(contrast_hu), 1.0, factor)
