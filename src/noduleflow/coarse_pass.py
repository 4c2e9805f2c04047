"""A second, coarse inference pass for nodules larger than the model has learnt to see whole.

The 2.5D U-Net learns nodules at the sizes of its training cohort (LIDC-like: median 9 mm, 95th
percentile 28 mm; the zoom augmentation magnifies up to 2x). A solid nodule of 30 mm that is larger
than every nodule of the training folds is then found only at its rim, if at all: from the inside it
is a uniform bright region, like the thick vessels the hard negatives teach the model to reject.
The same model run on the scan resampled to ``scale`` times the voxel size (2: a 30 mm nodule spans
15 voxels, a size it knows well) segments it whole.

The coarse map is brought back to the scan's grid (linear interpolation) and kept only inside its
own connected components (26-connectivity, ``p > threshold``) of at least ``min_diameter_mm``
equivalent-sphere diameter; the scan's probability is the voxel-wise maximum of the fine map and
that. Small objects therefore keep the fine pass's probability: at the coarse scale a small nodule
is a few voxels, and the vessel pieces that survive it are the false positives of the coarse pass.
The default ``min_diameter_mm`` of 25 mm sits between the two on the tuning cohorts
(docs/results.md): the coarse pass's false positives (hilar vessel bundles seen at half the
resolution) measure 15-23.5 mm, the large nodules it recovers 25-31 mm, and the fine pass alone
finds nodules up to about 23 mm whole. At 20 mm the false positives get in and CPM falls.

Cost: a coarse pass of scale 2 runs on 1/8 of the voxels. On 20-scan synthetic cohorts (2 cores)
the ``predict`` rule takes 17-23 s per fold of 4 scans with it and with the candidates' contrast
(:mod:`noduleflow.candidate_contrast`), against 13-15 s before: about a third more. ``scale`` 1
turns it off (the fine map unchanged).

Arrays are (z, y, x); spacings here are (z, y, x) in mm, as :func:`noduleflow.predict.predict_volume`
takes them.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from noduleflow.checks import check_number

#: a model (or an ensemble) on one grid: (image int16 HU, lung uint8, spacing (z, y, x) mm) ->
#: probability float32 of the image's shape
ProbabilityMap = Callable[[np.ndarray, np.ndarray, Sequence[float]], np.ndarray]


def check_coarse_settings(scale: float, min_diameter_mm: float) -> None:
    """InputError naming ``predict.coarse_scale`` / ``predict.coarse_min_diameter_mm`` unless the scale
    is a finite number in [1, 4] and the diameter a finite number >= 0."""
    check_number(scale, "predict.coarse_scale", 1.0, 4.0, note="1 = no coarse pass")
    check_number(min_diameter_mm, "predict.coarse_min_diameter_mm", 0.0)


def coarse_volumes(image: np.ndarray, lung: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(image int16 HU, lung uint8) resampled to ``scale`` times the voxel size along every axis:
    the image by linear interpolation, the mask by nearest neighbour; each axis ``round(n / scale)``
    voxels (at least 1)."""
    from scipy import ndimage

    image = np.asarray(image)
    shape = tuple(max(1, int(round(n / float(scale)))) for n in image.shape)
    zoom = [m / n for m, n in zip(shape, image.shape)]
    coarse_image = ndimage.zoom(image.astype(np.float32), zoom, order=1, mode="nearest", output=np.float32)
    coarse_image = np.clip(np.rint(coarse_image), -32768, 32767).astype(np.int16)
    coarse_lung = ndimage.zoom((np.asarray(lung) > 0).astype(np.uint8), zoom, order=0, mode="nearest")
    return _fit(coarse_image, shape), _fit(coarse_lung, shape)


def to_shape(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``volume`` (float) interpolated linearly to ``shape`` (the grid it was made from), float32."""
    from scipy import ndimage

    volume = np.asarray(volume, dtype=np.float32)
    zoom = [m / n for m, n in zip(shape, volume.shape)]
    return _fit(ndimage.zoom(volume, zoom, order=1, mode="nearest", output=np.float32), tuple(shape))


def _fit(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``volume`` cropped or edge-padded to exactly ``shape`` (``ndimage.zoom`` may round an axis
    one voxel off)."""
    volume = volume[tuple(slice(0, n) for n in shape)]
    pad = [(0, n - m) for n, m in zip(shape, volume.shape)]
    return np.pad(volume, pad, mode="edge") if any(p for _, p in pad) else volume


def large_objects(probability: np.ndarray, spacing_zyx: Sequence[float], threshold: float,
                  min_diameter_mm: float) -> np.ndarray:
    """``probability`` (float, (z, y, x)) kept inside its connected components (26-connectivity) of
    ``p > threshold`` whose volume is that of a sphere of at least ``min_diameter_mm`` (voxel size
    ``spacing_zyx`` mm); 0 elsewhere. float32."""
    from scipy import ndimage

    probability = np.asarray(probability, dtype=np.float32)
    labels, n = ndimage.label(probability > threshold, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return np.zeros(probability.shape, dtype=np.float32)
    voxel_mm3 = float(np.prod([float(s) for s in spacing_zyx]))
    volumes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64) * voxel_mm3
    diameters = np.cbrt(6.0 * volumes / math.pi)
    keep = diameters >= float(min_diameter_mm)
    keep[0] = False
    return np.where(keep[labels], probability, np.float32(0.0)).astype(np.float32, copy=False)


def with_coarse_pass(probability_map: ProbabilityMap, image: np.ndarray, lung: np.ndarray,
                     spacing_zyx: Sequence[float], scale: float, min_diameter_mm: float, threshold: float,
                     lung_roi: bool) -> np.ndarray:
    """The scan's probability (float32, (z, y, x)): ``probability_map`` on the scan, and, when
    ``scale`` > 1, the voxel-wise maximum of that and the :func:`large_objects` of the same map run on
    :func:`coarse_volumes` (at ``scale`` times the voxel size ``spacing_zyx``, mm) and brought back by
    :func:`to_shape`. With ``lung_roi`` the coarse map is 0 outside the lung mask, as the fine one."""
    check_coarse_settings(scale, min_diameter_mm)
    fine = probability_map(image, lung, tuple(float(s) for s in spacing_zyx))
    if float(scale) <= 1.0:
        return fine
    coarse_image, coarse_lung = coarse_volumes(image, lung, scale)
    coarse_spacing = tuple(float(s) * n / m for s, n, m in zip(spacing_zyx, np.shape(image), coarse_image.shape))
    coarse = to_shape(probability_map(coarse_image, coarse_lung, coarse_spacing), np.shape(image))
    if lung_roi:
        coarse[np.asarray(lung) == 0] = 0.0
    return np.maximum(fine, large_objects(coarse, spacing_zyx, threshold, min_diameter_mm))
