"""Scale-normalised 3-D crops around candidates: what the second stage (:mod:`noduleflow.candidate_classifier`) sees.

A false positive the detector ranks high is typically the rounded end of a thick tube (a hilar
vessel or bronchus leaving the lung ROI): round in every axial slice, a tube in 3-D. What tells it
from a nodule is the structure *around* the candidate, at the candidate's own scale. So a crop here
is a cube of :data:`CROP_VOXELS`\\ :sup:`3` samples whose side is :data:`CONTEXT` times the
candidate's diameter (clipped to :data:`FOV_MM`): a nodule of any size fills the central third with
parenchyma around it, a tube end shows the tube running to the crop's border.

Each crop has the channels :data:`CHANNELS`, sampled with trilinear interpolation on the slice
store's grid (world mm (x, y, z) -> voxel (z, y, x) by :func:`noduleflow.io.world_to_voxel`), axis
order (channel, z, y, x) in the world's axes (not the crop's):

* ``image``: HU windowed to :data:`WINDOW_HU` -> [0, 1]; outside the scan air
  (:data:`noduleflow.intensity.AIR_HU`);
* ``probability``: the detector's probability volume (``predict``'s uint8 / 255); outside 0.

Crops are stored as uint8 (value * 255) to keep a cohort's crops small (16^3 x 2 bytes each by
default).

A crop's *variants* are the same candidate seen with the centre moved by up to
:data:`JITTER_FRACTION` of the side and the side scaled by up to :data:`SCALE_JITTER` either way:
variant 0 is always the exact crop (the one scored), the others are the training set's
augmentation. Their offsets come from ``numpy.random.default_rng(seed)`` in candidate order, so the
crops of a file are a pure function of its inputs and the seed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from noduleflow.intensity import AIR_HU, normalize_hu
from noduleflow.io import Geometry, world_to_voxel

#: samples per side of a crop (the second_stage.crop_voxels default)
CROP_VOXELS = 16
#: crop side = CONTEXT x the candidate's diameter ...
CONTEXT = 3.0
#: ... clipped to this range (mm): small candidates still get 24 mm of context, huge ones at most 96 mm
FOV_MM = (24.0, 96.0)
#: HU window of the image channel (mapped to [0, 1])
WINDOW_HU = (-1000.0, 400.0)
#: channel order of a crop
CHANNELS = ("image", "probability")
#: training variants: the centre moves up to this fraction of the side in each axis ...
JITTER_FRACTION = 0.08
#: ... and the side is scaled by a factor in [1 / SCALE_JITTER, SCALE_JITTER]
SCALE_JITTER = 1.2


def crop_side_mm(diameter_mm: float) -> float:
    """The side (mm) of a candidate's crop: CONTEXT x its diameter within FOV_MM (NaN/<=0: the minimum)."""
    d = float(diameter_mm)
    if not np.isfinite(d) or d <= 0:
        return FOV_MM[0]
    return float(np.clip(CONTEXT * d, *FOV_MM))


def sample_cube(volume: np.ndarray, geometry: Geometry, centre_xyz: Sequence[float], side_mm: float,
                outside: float, size: int = CROP_VOXELS) -> np.ndarray:
    """A (size, size, size) float32 cube of ``volume`` (z, y, x) centred on world mm ``centre_xyz``,
    axes (z, y, x) along the world's axes, side ``side_mm``; trilinear, ``outside`` beyond the grid."""
    centre_zyx = world_to_voxel(np.asarray(centre_xyz, dtype=float), geometry)
    step_zyx = side_mm / size / np.asarray(geometry.spacing, dtype=float)[::-1]
    offsets = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0)
    axes = [centre_zyx[a] + offsets * step_zyx[a] for a in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=0).reshape(3, -1)
    values = ndimage.map_coordinates(volume, grid, order=1, mode="constant", cval=outside, prefilter=False)
    return values.reshape(size, size, size).astype(np.float32)


def candidate_crop(image_hu: np.ndarray, probability_u8: np.ndarray, geometry: Geometry,
                   centre_xyz: Sequence[float], side_mm: float, size: int = CROP_VOXELS) -> np.ndarray:
    """One crop, uint8 (len(CHANNELS), size, size, size): see the module docstring.

    ``image_hu``: int16 HU (z, y, x); ``probability_u8``: uint8 probabilities x 255 on the same grid."""
    if image_hu.shape != probability_u8.shape:
        raise ValueError(f"image {image_hu.shape} and probability {probability_u8.shape} grids differ")
    image = sample_cube(image_hu.astype(np.float32, copy=False), geometry, centre_xyz, side_mm, AIR_HU, size)
    image = normalize_hu(image, WINDOW_HU)
    prob = sample_cube(probability_u8.astype(np.float32, copy=False), geometry, centre_xyz, side_mm, 0.0, size)
    prob = np.clip(prob / 255.0, 0.0, 1.0)
    return np.round(np.stack([image, prob]) * 255.0).astype(np.uint8)


def crop_variants(image_hu: np.ndarray, probability_u8: np.ndarray, geometry: Geometry,
                  centres_xyz: np.ndarray, diameters_mm: np.ndarray, variants: int,
                  rng: np.random.Generator, size: int = CROP_VOXELS) -> np.ndarray:
    """Crops of n findings of one scan, uint8 (n, variants, len(CHANNELS), size, size, size).

    ``centres_xyz`` (n, 3) world mm; ``diameters_mm`` (n,). Variant 0 is the exact crop; the others
    move the centre and scale the side at random (module docstring), drawn from ``rng`` in row order."""
    centres = np.asarray(centres_xyz, dtype=float).reshape(-1, 3)
    diameters = np.asarray(diameters_mm, dtype=float).reshape(-1)
    if len(centres) != len(diameters):
        raise ValueError(f"{len(centres)} centres but {len(diameters)} diameters")
    if variants < 1:
        raise ValueError(f"variants = {variants} must be >= 1")
    # float copies once per scan, not per crop
    image = image_hu.astype(np.float32)
    prob = probability_u8.astype(np.float32)
    out = np.zeros((len(centres), variants, len(CHANNELS), size, size, size), dtype=np.uint8)
    for i, (centre, diameter) in enumerate(zip(centres, diameters)):
        side = crop_side_mm(diameter)
        for v in range(variants):
            if v == 0:
                c, s = centre, side
            else:
                c = centre + rng.uniform(-JITTER_FRACTION, JITTER_FRACTION, 3) * side
                s = side * float(np.exp(rng.uniform(-np.log(SCALE_JITTER), np.log(SCALE_JITTER))))
            out[i, v] = candidate_crop(image, prob, geometry, c, s, size)
    return out
