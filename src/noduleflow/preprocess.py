"""Stage ``resample``: a scan and its nodules onto one isotropic (or any) voxel grid.

* The scan is read by :mod:`noduleflow.scans` in any accepted format (MetaImage, NRRD, NIfTI,
  DICOM series) into HU on an identity-direction grid; an exact label map drawn on the stored
  grid is brought to the same canonical grid.
* The image is resampled with SimpleITK's linear interpolation onto a grid that keeps the
  canonical origin (centre of voxel 0) and covers the same physical extent:
  ``new_size = round(size * spacing / spacing_mm)`` per axis. Voxels past the last input voxel
  centre take the nearest input value (no artificial -1000 HU rim). Output: int16 HU.
* Nodule labels (uint8, 0 = background, nodule ``i`` = its row order among the scan's rows of the
  annotations file, from 1):

  - from an exact label map when the data set has one: each label is resampled on its own with
    linear interpolation of its 0/1 indicator and kept where the interpolated value is >= 0.5
    (a voxel claimed by two labels goes to the larger value). This follows the surface more
    closely than nearest-neighbour when slices are thick (nnU-Net resamples segmentations the
    same way, one-hot + linear), and a nodule that would vanish keeps at least its strongest
    voxel, so no annotated nodule is ever lost;
  - otherwise a ball of the annotated diameter around the annotated centre (voxel centres within
    the radius, in mm), optionally only voxels above ``sphere_min_hu``. A voxel inside two balls
    goes to the one whose centre is nearer relative to its radius.

World coordinates are mm in (x, y, z); arrays are (z, y, x).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from noduleflow.io import (
    Geometry,
    InputError,
    atomic_path,
    read_annotations,
    voxel_to_world,
    world_to_voxel,
    write_image,
)
from noduleflow.scans import canonical_labels, read_canonical

log = logging.getLogger(__name__)

#: zlib level of the written ``.mha`` files: level 1 is ~4x faster than the default at ~1.5x size
MHA_COMPRESSION_LEVEL = 1


# --------------------------------------------------------------------------- annotations


def scan_nodules(annotations_path: str | Path, uid: str) -> pd.DataFrame:
    """The annotation rows of one scan, in file order (index 0..n-1; label id = index + 1).

    ``annotations_path`` is the whole data set's CSV or a per-scan CSV; rows of other scans are
    ignored. Raises InputError (naming the file) for a malformed CSV or a non-positive diameter.
    """
    table = read_annotations(annotations_path)
    rows = table[table["seriesuid"] == uid].reset_index(drop=True)
    if len(rows) > 255:
        raise InputError(f"{annotations_path}: {len(rows)} nodules for seriesuid {uid}; "
                         f"label maps are uint8 (at most 255)")
    return rows


def check_centres_inside(nodules: pd.DataFrame, shape_zyx: Sequence[int], geometry: Geometry,
                         annotations_path: str | Path, uid: str, scan_path: str | Path) -> None:
    """Raise InputError unless every nodule centre lies inside the scan's physical extent
    (voxel index within [-0.5, n - 0.5] on every axis)."""
    if nodules.empty:
        return
    centres = nodules[["coordX", "coordY", "coordZ"]].to_numpy(dtype=float)
    index = world_to_voxel(centres, geometry)
    upper = np.asarray(shape_zyx, dtype=float) - 0.5
    outside = np.any((index < -0.5 - 1e-6) | (index > upper + 1e-6), axis=1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        lo = voxel_to_world(np.full(3, -0.5), geometry)
        hi = voxel_to_world(upper, geometry)
        extent = ", ".join(f"{a} {min(l, h):.1f}..{max(l, h):.1f}" for a, l, h in zip("xyz", lo, hi))
        x, y, z = centres[i]
        raise InputError(f"{annotations_path}: nodule {i + 1} of seriesuid {uid} at world "
                         f"({x:.2f}, {y:.2f}, {z:.2f}) mm lies outside its scan {scan_path} "
                         f"({extent} mm)")


# --------------------------------------------------------------------------- grids


def target_geometry(shape_zyx: Sequence[int], geometry: Geometry,
                    spacing_mm: Sequence[float]) -> tuple[tuple[int, int, int], Geometry]:
    """Shape (z, y, x) and Geometry of the grid with ``spacing_mm`` (x, y, z) that keeps the
    origin and direction of ``geometry`` and covers the same extent (size * spacing per axis)."""
    spacing = tuple(float(s) for s in spacing_mm)
    size_xyz = np.asarray(shape_zyx[::-1], dtype=float)
    new_xyz = [max(1, int(round(n * old / new))) for n, old, new in zip(size_xyz, geometry.spacing, spacing)]
    return (new_xyz[2], new_xyz[1], new_xyz[0]), Geometry(spacing, geometry.origin, geometry.direction)


def _sitk_image(array: np.ndarray, geometry: Geometry):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.apply_to(image)
    return image


def _resample(image, shape_zyx: Sequence[int], geometry: Geometry, interpolator, pixel_type,
              default_value: float = 0.0, extrapolate: bool = False) -> np.ndarray:
    """Resample a SimpleITK image onto the grid (shape, geometry); returns the array (z, y, x)."""
    import SimpleITK as sitk

    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(v) for v in shape_zyx[::-1]])
    resampler.SetOutputSpacing(tuple(map(float, geometry.spacing)))
    resampler.SetOutputOrigin(tuple(map(float, geometry.origin)))
    resampler.SetOutputDirection(tuple(map(float, geometry.direction)))
    resampler.SetInterpolator(interpolator)
    resampler.SetOutputPixelType(pixel_type)
    resampler.SetDefaultPixelValue(float(default_value))
    resampler.SetUseNearestNeighborExtrapolator(bool(extrapolate))
    return sitk.GetArrayFromImage(resampler.Execute(image))


def resample_image(image_zyx: np.ndarray, geometry: Geometry,
                   spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[np.ndarray, Geometry]:
    """Linear resampling of a HU array (z, y, x) to ``spacing_mm`` (x, y, z) -> (int16 array, Geometry).

    Interpolates in float32 and rounds to the nearest HU (a plain cast would truncate).
    """
    import SimpleITK as sitk

    shape, new_geometry = target_geometry(image_zyx.shape, geometry, spacing_mm)
    values = _resample(_sitk_image(image_zyx, geometry), shape, new_geometry, sitk.sitkLinear,
                       sitk.sitkFloat32, extrapolate=True)
    np.rint(values, out=values)  # linear interpolation stays within the input's int16 range
    return values.astype(np.int16), new_geometry


def _sub_grid(geometry: Geometry, start_zyx: Sequence[int]) -> Geometry:
    """Geometry of the part of a grid that starts at voxel ``start_zyx``."""
    origin = voxel_to_world(np.asarray(start_zyx, dtype=float), geometry)
    return Geometry(geometry.spacing, tuple(map(float, origin)), geometry.direction)


def _new_box(box_old: tuple[slice, ...], old: Geometry, new: Geometry,
             new_shape: Sequence[int], margin: float = 1.0) -> tuple[slice, ...] | None:
    """Voxel box of the new grid covering the world extent of ``box_old`` (a box of the old grid),
    grown by ``margin`` new voxels; None when it misses the new grid."""
    corners = np.array([[b.start - 0.5 if k else b.stop - 0.5 for k, b in zip(bits, box_old)]
                        for bits in np.ndindex(2, 2, 2)], dtype=float)
    index = world_to_voxel(voxel_to_world(corners, old), new)
    lo = np.floor(index.min(axis=0) - margin).astype(int)
    hi = np.ceil(index.max(axis=0) + margin).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.asarray(new_shape))
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


# --------------------------------------------------------------------------- labels


def resample_labels(labels_zyx: np.ndarray, geometry: Geometry, shape_zyx: Sequence[int],
                    new_geometry: Geometry, n_labels: int | None = None) -> np.ndarray:
    """Resample a label map (z, y, x; 0 = background) onto the grid (shape_zyx, new_geometry).

    Each label's 0/1 indicator is resampled with linear interpolation inside its own bounding box
    and kept where >= 0.5; overlaps go to the larger interpolated value. A label that would
    vanish keeps its single strongest voxel. Returns uint8 (z, y, x).
    """
    import SimpleITK as sitk

    out = np.zeros(tuple(shape_zyx), dtype=np.uint8)
    best = np.zeros(tuple(shape_zyx), dtype=np.float32)
    boxes = ndi.find_objects(labels_zyx, max_label=n_labels or 0)
    for label, box in enumerate(boxes, start=1):
        if box is None:
            continue
        box = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(box, labels_zyx.shape))
        target = _new_box(box, geometry, new_geometry, shape_zyx)
        if target is None:
            log.warning("label %d lies outside the resampled grid", label)
            continue
        indicator = (labels_zyx[box] == label).astype(np.float32)
        source = _sitk_image(indicator, _sub_grid(geometry, [b.start for b in box]))
        sub_shape = [b.stop - b.start for b in target]
        values = _resample(source, sub_shape, _sub_grid(new_geometry, [b.start for b in target]),
                           sitk.sitkLinear, sitk.sitkFloat32, default_value=0.0)
        keep = (values >= 0.5) & (values > best[target])
        if not keep.any():
            peak = np.unravel_index(int(np.argmax(values)), values.shape)
            if values[peak] <= 0:
                log.warning("label %d has no voxel on the resampled grid", label)
                continue
            log.warning("label %d is smaller than half a resampled voxel: kept its strongest voxel", label)
            keep = np.zeros_like(keep)
            keep[peak] = True
        out[target][keep] = label
        best[target][keep] = values[keep]
    return out


def sphere_labels(nodules: pd.DataFrame, image_zyx: np.ndarray, geometry: Geometry,
                  min_hu: float | None = None) -> np.ndarray:
    """Label map (uint8, z, y, x) with a ball of ``diameter_mm`` around each nodule centre (world
    mm), id = row order + 1. With ``min_hu`` only ball voxels above it are kept (a nodule with no
    such voxel keeps its whole ball, with a warning). Every nodule keeps at least the voxel
    nearest its centre."""
    shape = image_zyx.shape
    out = np.zeros(shape, dtype=np.uint8)
    best = np.full(shape, np.inf, dtype=np.float32)
    centres = nodules[["coordX", "coordY", "coordZ"]].to_numpy(dtype=float)
    for i, (centre, diameter) in enumerate(zip(centres, nodules["diameter_mm"].to_numpy(dtype=float))):
        label = i + 1
        radius = diameter / 2.0
        corners = np.array([centre + radius * (2 * np.array(bits) - 1) for bits in np.ndindex(2, 2, 2)])
        index = world_to_voxel(corners, geometry)
        lo = np.maximum(np.floor(index.min(axis=0)).astype(int) - 1, 0)
        hi = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 2, np.asarray(shape))
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        grid = np.stack(np.meshgrid(*[np.arange(b.start, b.stop) for b in box], indexing="ij"), axis=-1)
        world = voxel_to_world(grid.reshape(-1, 3), geometry)
        score = (np.linalg.norm(world - centre, axis=1) / radius).reshape(grid.shape[:3]).astype(np.float32)
        inside = score <= 1.0
        if min_hu is not None:
            bright = inside & (image_zyx[box] > min_hu)
            if bright.any():
                inside = bright
            else:
                log.warning("nodule %d: no voxel above sphere_min_hu=%s inside its %.1f mm ball; "
                            "keeping the whole ball", label, min_hu, diameter)
        if not inside.any():
            inside = score == score.min()
        keep = inside & (score < best[box])
        out[box][keep] = label
        best[box][keep] = score[keep]
    return out


def _labels_from_mask(mask: np.ndarray, nodules: pd.DataFrame, geometry: Geometry,
                      mask_path: str | Path, uid: str) -> np.ndarray:
    """Check an exact label map against the scan's annotation rows; a 0/1 mask of several nodules
    is split by nearest annotated centre (distance relative to radius)."""
    n = len(nodules)
    if np.issubdtype(mask.dtype, np.floating) and not np.all(np.mod(mask, 1) == 0):
        raise InputError(f"{mask_path}: label map of seriesuid {uid} holds fractional values")
    if mask.min() < 0:
        raise InputError(f"{mask_path}: label map of seriesuid {uid} holds negative values")
    if mask.dtype != np.uint8:
        if mask.max() > 255:
            raise InputError(f"{mask_path}: label {int(mask.max())} does not fit uint8 label maps")
        mask = mask.astype(np.uint8)
    top = int(mask.max())
    if top > n:
        raise InputError(f"{mask_path}: label {top} but the annotations list {n} nodule(s) for "
                         f"seriesuid {uid} (label id = row order among the scan's rows, from 1)")
    if top == 1 and n > 1:
        log.info("%s: a 0/1 mask of %d nodules: splitting it by nearest annotated centre", mask_path, n)
        index = np.argwhere(mask > 0)
        world = voxel_to_world(index, geometry)
        centres = nodules[["coordX", "coordY", "coordZ"]].to_numpy(dtype=float)
        radii = nodules["diameter_mm"].to_numpy(dtype=float) / 2
        score = np.linalg.norm(world[:, None, :] - centres[None], axis=2) / radii[None]
        split = np.zeros(mask.shape, dtype=np.uint8)
        split[tuple(index.T)] = np.argmin(score, axis=1) + 1
        mask = split
    return mask


def resample_scan(scan_path: str | Path, annotations_path: str | Path, uid: str,
                  out_image: str | Path, out_labels: str | Path, mask_path: str | Path | None = None,
                  spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
                  sphere_min_hu: float | None = None) -> dict:
    """Resample one scan and its nodule labels to ``spacing_mm`` (x, y, z, mm).

    Reads and validates the scan (any format of :mod:`noduleflow.scans`), the scan's rows of ``annotations_path`` (the
    data set's CSV or a per-scan CSV) and, when given, the exact label map ``mask_path`` (same grid
    as the scan). Every check runs before any output is written; both outputs are written under
    temporary names and renamed together at the end.

    Writes ``out_image`` (int16 HU) and ``out_labels`` (uint8, nodule id = row order from 1) on the
    same grid. Returns a summary dict (shape (z, y, x), spacing, number of nodules, voxels per label).
    """
    spacing = [float(s) for s in spacing_mm]
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputError(f"preprocess.spacing_mm = {list(spacing_mm)!r}: expected three positive mm (x, y, z)")
    scan = read_canonical(scan_path)
    image, geometry = scan.hu, scan.geometry
    nodules = scan_nodules(annotations_path, uid)
    check_centres_inside(nodules, image.shape, geometry, annotations_path, uid, scan_path)
    mask = None
    if mask_path is not None:
        mask = canonical_labels(mask_path, scan, what=f"scan {scan_path}")
        mask = _labels_from_mask(mask, nodules, geometry, mask_path, uid)

    resampled, new_geometry = resample_image(image, geometry, spacing)
    log.info("%s: %s (z,y,x) at %s mm -> %s at %s mm", uid, image.shape, geometry.spacing,
             resampled.shape, new_geometry.spacing)
    if mask is not None:
        labels = resample_labels(mask, geometry, resampled.shape, new_geometry, n_labels=len(nodules))
        present = np.bincount(mask.ravel(), minlength=len(nodules) + 1)
        missing = [i + 1 for i in range(len(nodules)) if present[i + 1] == 0]
        if missing:
            log.warning("%s: nodule(s) %s have no voxel in %s: using balls of the annotated diameter",
                        uid, missing, mask_path)
            balls = sphere_labels(nodules, resampled, new_geometry, sphere_min_hu)
            for label in missing:
                labels[(balls == label) & (labels == 0)] = label
    else:
        labels = sphere_labels(nodules, resampled, new_geometry, sphere_min_hu)
    counts = np.bincount(labels.ravel(), minlength=len(nodules) + 1)[1:]
    log.info("%s: %d nodule(s), voxels per label %s (%s)", uid, len(nodules), counts.tolist(),
             "exact mask" if mask is not None else "annotated balls")

    with atomic_path(out_image) as tmp_image, atomic_path(out_labels) as tmp_labels:
        write_image(resampled, new_geometry, tmp_image, compression_level=MHA_COMPRESSION_LEVEL)
        write_image(labels, new_geometry, tmp_labels, compression_level=MHA_COMPRESSION_LEVEL)
    return {"shape": tuple(resampled.shape), "spacing": new_geometry.spacing, "n_nodules": len(nodules),
            "label_voxels": counts.tolist()}
