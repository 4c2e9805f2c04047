"""Stage ``lung_mask``: a classical, weight-free lung mask of a (resampled) chest CT.

Steps (all distances in mm, so the result does not depend on the voxel size):

1. **threshold**: air/lung is ``HU < threshold_hu``. Padding outside the reconstruction circle
   (``HU < padding_hu``, -2048 or -3024 on real scanners; no tissue or air is that low) is neither
   air nor tissue: it is "outside the field of view", grown in-plane by ``padding_margin_mm`` to
   take in the ring of mixed values that resampling leaves where it meets the body. Air never
   connects through it, so a lung that touches the reconstruction circle is not joined to the air
   around the body;
2. **outside air**: the body is the largest 3-D component of tissue (``HU >= threshold_hu``, no
   padding); its **outline** is its convex hull in every axial slice (the ribcage is convex, so
   the outline holds both lungs even where the field of view or the array border cuts the chest
   wall). A 3-D air component of which less than half lies inside the outline is outside the
   body: the air around the patient, under and inside the table. A lung that touches the edge of
   the field of view (the circle or a side face of the array) lies inside the outline and is kept.
   The top and bottom faces play no role: a chest scan or slab cuts through the lungs there;
3. **trachea and main bronchi**: in every axial slice the air components of at most
   ``trachea_max_area_mm2`` are "small"; the 3-D chains of small cross-sections that start at the
   superior end of the air region (either end when the orientation is unknown) near the left-right
   midline are the airways (the trachea enters the chest from the neck; growth stops where a
   bronchus opens into a large lung cross-section, as in the classic region-growing airway
   extraction). They are removed;
4. **lungs, not bowel gas**: of what is left, the lungs are the (at most two) largest components of
   ``min_component_ml`` or more that reach up to the airways' lowest slice. Both lungs rise beside
   the trachea up to the apices, above the clavicles; gas in the stomach and colon lies below the
   diaphragm, many centimetres below the carina, however large it is (and it is not connected to
   the airways). Without a trachea in the scan (a slab below the carina) the two largest are kept.
   When the largest already holds both lungs (a fifth of it or more on either side of the body's
   midline) it is the only one: the next largest would be air in the table, in a fold of skin or
   in the bowel. Lungs still joined (a bronchus opening into both lungs within one slice, touching
   lungs) are split left/right by erosion on a coarse grid (:func:`split_lungs`);
5. **holes**: enclosed holes (vessels, nodules) are filled slice by slice;
6. **closing** of each lung on its own (closing both at once would bridge the mediastinum where
   the lungs come closer than the ball) with a ball of ``closing_mm``: concavities of the lung
   surface narrower than the ball are added (the hilum, a nodule on a vessel that leads to the
   hilum, small juxta-pleural nodules);
7. **nodule-sized dents**: a second closing with a large ball of ``nodule_closing_mm`` rolls over
   juxta-pleural nodules of 1-3 cm, which hold a 12 mm ball; of what it adds, only pieces of at
   most ``nodule_max_ml`` are kept (not the heart's or the diaphragm's large concavities).
   The additions of 6 and 7 are grown by ``closing_margin_mm`` (the base of a juxta-pleural
   nodule, where no ball reaches). Both closings run on coarse grids (2 mm in-plane with the
   slices kept, and 3 mm) with Maurer distance maps and come back by nearest neighbour, so the
   lung boundary itself keeps full detail; a 12 mm ball closing of a whole full-size volume at
   full resolution would take tens of seconds;
8. **dilation** by ``dilation_mm`` (ellipsoidal element in voxels), an optional margin around
   the whole mask (off by default: each mm costs 2-3 % Dice against the true lungs).

On the synthetic cohort (20 default scans, 3 full-size): Dice 0.965-0.98 against the true lung
masks, and every nodule (3-32 mm, juxta-pleural included) at least 97 % inside but one (a 7 mm
juxta-pleural ground-glass nodule, 96 %); steps 1, 2 and 4 change none of it. On a real scan,
LIDC-IDRI-0001 at 1 mm: 3.95 L, its 23 mm nodule wholly inside, no bowel gas, no table; the same
with a 230 mm reconstruction circle and 5 mm slices, cut by the array's side faces, or with
170 ml of gas in the stomach (see tests/test_lungmask.py). :func:`noduleflow.slices.nodule_inside_share` gives, per
annotated nodule, the share of it inside the mask.

Arrays are (z, y, x); spacing is (x, y, z) mm. The mask is uint8 0/1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from noduleflow.io import Geometry, read_image, write_image

log = logging.getLogger(__name__)

#: in-plane 8-connectivity, no connection across slices: labels every axial slice on its own
_SLICEWISE = np.zeros((3, 3, 3), dtype=bool)
_SLICEWISE[1] = True
#: in-plane 4-neighbourhood
_SLICEWISE_CROSS = ndi.generate_binary_structure(3, 1) & _SLICEWISE


def _labels(mask: np.ndarray) -> np.ndarray:
    """6-connected 3-D components of a boolean array (uint32 labels; SimpleITK, multi-threaded)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(image, False))


def _components(mask: np.ndarray, min_voxels: float = 0) -> tuple[np.ndarray, np.ndarray]:
    """6-connected 3-D components of a boolean array -> (labels uint32, voxel count per label;
    counts[0] = 0). Components whose bounding box holds fewer than ``min_voxels`` voxels are not
    counted (count 0): they cannot be that large. SimpleITK's connected components with counts
    taken inside each component's box: several times faster than scipy's label + bincount (or a
    relabelling by size) on a full-size volume."""
    labels = _labels(mask)
    boxes = ndi.find_objects(labels)
    counts = np.zeros(len(boxes) + 1, dtype=np.int64)
    for label, box in enumerate(boxes, start=1):
        if box is not None and np.prod([b.stop - b.start for b in box]) >= max(min_voxels, 1):
            counts[label] = np.count_nonzero(labels[box] == label)
    return labels, counts


def _face_labels(labels: np.ndarray) -> np.ndarray:
    """Labels present on the four side faces (y and x borders) of a (z, y, x) label array."""
    faces = [labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]]
    found = np.unique(np.concatenate([f.ravel() for f in faces]))
    return found[found > 0]


def _bounding_box(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...]:
    """Box (z, y, x slices) around the True voxels of ``mask`` grown by ``margin`` voxels."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin[axis], 0), min(int(hits[-1]) + 1 + margin[axis], mask.shape[axis])))
    return tuple(box)


def _grow_inplane(mask: np.ndarray, spacing_xyz: Sequence[float], margin_mm: float) -> np.ndarray:
    """``mask`` (bool, 2-D y, x or 3-D z, y, x) grown in-plane by a square of half-width
    ``margin_mm`` (at least one voxel; spacing x, y, z in mm)."""
    sx, sy = float(spacing_xyz[0]), float(spacing_xyz[1])
    ry, rx = (max(1, int(np.ceil(margin_mm / s - 1e-6))) for s in (sy, sx))
    grown = ndi.maximum_filter1d(np.ascontiguousarray(mask).view(np.uint8), 2 * rx + 1, axis=-1)
    return ndi.maximum_filter1d(grown, 2 * ry + 1, axis=-2).view(bool)


def outside_fov(image_zyx_hu: np.ndarray, spacing_xyz: Sequence[float], padding_hu: float = -1500,
                margin_mm: float = 2.0) -> np.ndarray:
    """Voxels (z, y, x) outside the scanner's field of view: the padding outside the reconstruction
    circle (``HU < padding_hu``; scanners write -2048 or -3024 there, below any air or tissue),
    grown in-plane by ``margin_mm`` (a square of that half-width; spacing x, y, z in mm). Linear
    resampling mixes padding and tissue into a ring of values that look like air (-1500 to
    -400 HU) one or two voxels wide; without the margin that ring would join a lung touching the
    circle to the air around the body.
    """
    padding = np.asarray(image_zyx_hu) < padding_hu
    if margin_mm <= 0 or not padding.any():
        return padding
    # the circle is almost always the same in every slice, up to the odd pixel where padding
    # meets the air around the body (-1500 HU give or take the noise, not worth growing): grow it once
    common = _grow_inplane(padding.all(axis=0), spacing_xyz, margin_mm)
    if np.count_nonzero(padding.any(axis=0) & ~common) <= 1e-3 * common.size:
        return padding | common
    return _grow_inplane(padding, spacing_xyz, margin_mm)


def _hull_rows(body: np.ndarray) -> np.ndarray:
    """Filled convex hull (y, x) of the True pixels of a 2-D mask (pixel centres as points)."""
    from scipy.spatial import ConvexHull, QhullError

    out = np.zeros(body.shape, dtype=bool)
    rows = np.flatnonzero(body.any(axis=1))
    if rows.size == 0:
        return out
    sub = body[rows]
    left = np.argmax(sub, axis=1)
    right = body.shape[1] - 1 - np.argmax(sub[:, ::-1], axis=1)
    xs = np.arange(body.shape[1], dtype=float)
    points = np.concatenate([np.stack([left, rows], 1), np.stack([right, rows], 1)]).astype(float)
    try:
        equations = ConvexHull(points).equations          # a_x x + a_y y + b <= 0 inside
    except (QhullError, ValueError):                      # a line or a point: its rows' spans
        out[rows] = (xs >= left[:, None]) & (xs <= right[:, None])
        return out
    ys = np.arange(rows[0], rows[-1] + 1, dtype=float)
    lo, hi = np.full(ys.shape, -np.inf), np.full(ys.shape, np.inf)
    valid = np.ones(ys.shape, dtype=bool)
    eps = 1e-6
    for ax, ay, b in equations:
        if ax > eps:
            hi = np.minimum(hi, (-b - ay * ys) / ax)
        elif ax < -eps:
            lo = np.maximum(lo, (-b - ay * ys) / ax)
        else:
            valid &= ay * ys + b <= eps
    out[rows[0]: rows[-1] + 1] = valid[:, None] & (xs >= lo[:, None] - eps) & (xs <= hi[:, None] + eps)
    return out


def body_outline(tissue: np.ndarray, spacing_xyz: Sequence[float],
                 coarse_mm: float = 2.0) -> tuple[np.ndarray, tuple[int, int]]:
    """Outline of the body: the convex hull, in every axial slice, of the largest 3-D component of
    ``tissue`` (bool z, y, x: voxels at or above the air threshold, padding excluded), on every
    ``fy``-th row and ``fx``-th column (a grid of about ``coarse_mm`` in-plane; spacing x, y, z in
    mm) -> (outline bool (z, y / fy, x / fx), (fy, fx)). It only decides which side of the skin an
    air component lies on; the coarse grid is 4 times cheaper.

    The largest tissue component is the body (chest wall, mediastinum, abdomen, arms that touch
    it); the table and the scanner's pads lie apart from it. The chest wall is convex around the
    lungs, so its hull holds them even where the field of view or the array border cuts it; the
    air around the body lies outside the hull except in the body's few concavities.
    """
    import SimpleITK as sitk

    sx, sy, _ = map(float, spacing_xyz)
    fy, fx = (max(1, int(np.floor(coarse_mm / s + 1e-6))) for s in (sy, sx))
    low = np.ascontiguousarray(tissue[:, ::fy, ::fx]).view(np.uint8)
    ranked = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(low), False))
    body = sitk.GetArrayViewFromImage(ranked) == 1          # label 1: the largest component
    hull = np.zeros(body.shape, dtype=bool)
    for z in np.flatnonzero(body.any(axis=(1, 2))):
        hull[z] = _hull_rows(body[z])
    return hull, (fy, fx)


def drop_outside_air(air: np.ndarray, outline: np.ndarray, step: tuple[int, int] = (1, 1),
                     inside_fraction: float = 0.5) -> np.ndarray:
    """The air (bool z, y, x) inside the body: 3-D components of ``air`` of which at least
    ``inside_fraction`` lies inside the body ``outline``, given on every ``step``-th row and column
    (see :func:`body_outline`); the fractions are counted on those voxels."""
    labels = _labels(air)
    sample = labels[:, :: step[0], :: step[1]]
    total = np.bincount(sample.ravel())
    inside = np.bincount(sample[outline], minlength=total.size)
    keep = np.zeros(int(labels.max()) + 1, dtype=bool)
    keep[: total.size] = inside >= inside_fraction * np.maximum(total, 1)
    keep[0] = False
    return keep[labels]


def select_lungs(candidates: np.ndarray, airway: np.ndarray, spacing_xyz: Sequence[float],
                 min_voxels: float, max_components: int = 2, midline_x: float | None = None,
                 both_sides_fraction: float = 0.2) -> np.ndarray:
    """The lungs among the air components (z, y, x) left after removing the airways.

    Components of at least ``min_voxels`` voxels whose z range reaches the airways' z range (the
    lungs rise beside the trachea to the apices; stomach and colon gas lies below the diaphragm,
    far below the carina, whatever its size); of those, the ``max_components`` largest. Without
    airways (a slab below the carina), or when no component reaches them (anatomy this rule does
    not know), the size rule alone decides. When the largest already holds both lungs (at least
    ``both_sides_fraction`` of it on either side of the body's midline ``midline_x``, a voxel x
    index), it is the only one: there is no second lung to find, and the next largest would be the
    air in a table, a fold of skin or the bowel. ``spacing_xyz`` is in mm and only used for the log.
    """
    labels, counts = _components(candidates, min_voxels)
    large = counts >= max(min_voxels, 1)
    eligible = large.copy()
    if airway.any():
        zs = np.flatnonzero(airway.any(axis=(1, 2)))
        for label, box in enumerate(ndi.find_objects(labels), start=1):
            if box is not None and large[label] and (box[0].stop <= zs[0] or box[0].start > zs[-1]):
                eligible[label] = False
                log.info("air component of %.0f ml (slices %d-%d) is not lung: it does not reach the "
                         "airways (slices %d-%d); bowel gas", counts[label] * np.prod(spacing_xyz) / 1000.0,
                         box[0].start, box[0].stop - 1, zs[0], zs[-1])
        if large.any() and not eligible.any():
            log.warning("no air component reaches the airways (slices %d-%d): the largest are kept", zs[0], zs[-1])
            eligible = large
    order = np.argsort(np.where(eligible, counts, -1))[::-1][:max_components]
    order = order[eligible[order]]
    if midline_x is not None and len(order) > 1:
        box = ndi.find_objects(labels, max_label=int(order[0]))[order[0] - 1]
        xs = box[2].start + np.nonzero(labels[box] == order[0])[2]
        left = float(np.mean(xs < midline_x))
        if min(left, 1.0 - left) >= both_sides_fraction:
            log.info("the largest air component holds both lungs (%.0f%% of it left of the midline): the "
                     "next one (%.0f ml) is not lung", 100 * left, counts[order[1]] * np.prod(spacing_xyz) / 1000.0)
            order = order[:1]
    keep = np.zeros(len(counts), dtype=bool)
    keep[order] = True
    return keep[labels]


def find_airways(air: np.ndarray, spacing_xyz: Sequence[float], trachea_max_area_mm2: float = 700,
                 midline_fraction: float = 0.15, min_length_mm: float = 10.0,
                 superior_last: bool | None = True) -> np.ndarray:
    """Trachea and main bronchi in an inside-body air mask (z, y, x) -> boolean mask.

    In every axial slice, air components of at most ``trachea_max_area_mm2`` are "small"; chains of
    small cross-sections connected from slice to slice are followed (the classic region growing
    of the airway from the neck, which stops where a bronchus opens into a large lung section).
    A chain is an airway when it reaches the superior end of the air region (the last slice when
    ``superior_last`` is True, the first when False, either when None: orientation unknown), runs
    at least ``min_length_mm`` along z and lies within ``midline_fraction`` of the region's width
    from its left-right middle (lung apices and bases are lateral, the trachea central). The
    inferior end does not count: a chain of small gas pockets there is bowel, not an airway.
    """
    sx, sy, sz = map(float, spacing_xyz)
    if not air.any():
        return np.zeros(air.shape, dtype=bool)
    slice_labels, _ = ndi.label(air, structure=_SLICEWISE)
    area = np.bincount(slice_labels.ravel()) * (sx * sy)
    small_lut = area <= trachea_max_area_mm2
    small_lut[0] = False
    small = small_lut[slice_labels]
    del slice_labels
    if not small.any():
        return small
    chains, _ = ndi.label(small)
    zs = np.flatnonzero(air.any(axis=(1, 2)))
    xs = np.flatnonzero(air.any(axis=(0, 1)))
    mid_x, width = (xs[0] + xs[-1]) / 2.0, xs[-1] - xs[0] + 1
    airway = np.zeros(air.shape, dtype=bool)
    for label, box in enumerate(ndi.find_objects(chains), start=1):
        if box is None:
            continue
        z0, z1 = box[0].start, box[0].stop - 1
        at_top, at_bottom = z1 >= zs[-1], z0 <= zs[0]
        at_end = at_top if superior_last else at_bottom if superior_last is False else at_top or at_bottom
        if not at_end or (z1 - z0 + 1) * sz < min_length_mm:
            continue
        inside = chains[box] == label
        x_centre = box[2].start + np.nonzero(inside)[2].mean()
        if abs(x_centre - mid_x) > midline_fraction * width:
            continue
        airway[box] |= inside
        log.info("airway: slices %d-%d, %.1f ml, %.1f mm from the midline", z0, z1,
                 inside.sum() * sx * sy * sz / 1000.0, (x_centre - mid_x) * sx)
    if not airway.any():
        log.info("no trachea found (a scan or slab below the carina?)")
    return airway


def split_lungs(mask: np.ndarray, spacing_xyz: Sequence[float], min_voxels: float,
                coarse_mm: float = 3.0, max_erosion_mm: float = 20.0) -> np.ndarray:
    """Labels (uint8 z, y, x; 0 background, 1 and 2 the lungs) of a lung mask.

    Two components on either side of the midline are the two lungs. When the lungs are still
    joined (a bronchus opening into both in one axial slice, touching lungs), the mask is eroded
    on a ~``coarse_mm`` grid, step by step up to ``max_erosion_mm``, until it falls apart into a
    left and a right part; every voxel then goes to the nearer part. Otherwise one label.
    """
    labels, n = ndi.label(mask)
    if n != 1:
        return labels.astype(np.uint8)
    spacing_zyx = np.asarray(spacing_xyz, dtype=float)[::-1]
    factors = [max(1, int(np.floor(coarse_mm / s))) for s in spacing_zyx]
    low_spacing = spacing_zyx * factors
    low = _block_mean(mask, factors) >= 0.5
    depth = _distance_to(~low, low_spacing)  # mm from the nearest non-lung voxel inside the mask
    xs = np.flatnonzero(low.any(axis=(0, 1)))
    if xs.size == 0:
        return labels.astype(np.uint8)
    mid_x = (xs[0] + xs[-1]) / 2.0
    min_low = min_voxels / float(np.prod(factors)) / 8.0
    for erosion in np.arange(low_spacing.min(), max_erosion_mm + 1e-6, low_spacing.min()):
        parts, n_parts = ndi.label(depth > erosion)
        if n_parts < 2:
            if n_parts == 0:
                break
            continue
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        first, second = np.argsort(sizes)[::-1][:2]
        if sizes[second] < min_low:
            continue
        centres = [np.nonzero(parts == k)[2].mean() for k in (first, second)]
        if (centres[0] - mid_x) * (centres[1] - mid_x) >= 0:
            continue
        seeds = np.zeros(low.shape, dtype=np.uint8)
        seeds[parts == first] = 1
        seeds[parts == second] = 2
        _, nearest = ndi.distance_transform_edt(seeds == 0, sampling=low_spacing, return_indices=True)
        owner = _upsample(seeds[tuple(nearest)], factors, mask.shape)
        log.info("lungs joined: split left/right after a %.1f mm erosion", erosion)
        return np.where(mask, owner, 0).astype(np.uint8)
    return labels.astype(np.uint8)


def _fill_holes_slicewise(mask: np.ndarray) -> np.ndarray:
    """Fill, in every axial slice, background regions not connected to that slice's border."""
    background, _ = ndi.label(~mask, structure=_SLICEWISE)
    border = np.zeros(int(background.max()) + 1, dtype=bool)
    border[_face_labels(background)] = True
    border[0] = True  # label 0 is the mask itself
    return mask | ~border[background]


def _block_mean(mask: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Fraction of True voxels of ``mask`` in blocks of ``factors`` voxels (partial blocks at the
    end padded by repeating the last voxel), float32 (z, y, x)."""
    pad = [(0, (-n) % f) for n, f in zip(mask.shape, factors)]
    padded = np.pad(mask.astype(bool, copy=False), pad, mode="edge").view(np.uint8)
    fz, fy, fx = factors
    z, y, x = padded.shape
    counts = padded.reshape(z // fz, fz, y // fy, fy, x // fx, fx).sum(axis=(1, 3, 5), dtype=np.uint32)
    return counts.astype(np.float32) / float(fz * fy * fx)


def _distance_to(region: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Distance (mm) of every voxel to the nearest True voxel of ``region`` (<= 0 inside it);
    SimpleITK's Maurer transform, multi-threaded and several times faster than scipy's EDT."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(region.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    dist = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                        useImageSpacing=True)
    return sitk.GetArrayFromImage(dist)


def _closing_added(mask: np.ndarray, spacing_zyx: Sequence[float], radius_mm: float,
                   slack_mm: float = 0.0) -> np.ndarray:
    """Voxels a closing with a ball of ``radius_mm`` adds to ``mask``; beyond the array the mask
    continues as at its faces (a scan cut through the lungs). ``slack_mm`` > 0 erodes a little
    more, which drops the one-voxel notches a discrete ball leaves on oblique surfaces."""
    pad = [int(np.ceil(radius_mm / s)) + 2 for s in spacing_zyx]
    padded = np.pad(mask, [(p, p) for p in pad], mode="edge")
    dilated = _distance_to(padded, spacing_zyx) <= radius_mm
    closed = _distance_to(~dilated, spacing_zyx) > radius_mm + slack_mm
    inner = tuple(slice(p, p + n) for p, n in zip(pad, mask.shape))
    return closed[inner] & ~mask


def _upsample(low: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a coarse array by integer ``factors``, cropped to ``shape``."""
    up = low
    for axis, f in enumerate(factors):
        if f > 1:
            up = np.repeat(up, f, axis=axis)
    return up[: shape[0], : shape[1], : shape[2]]


def _coarse_closing(mask: np.ndarray, spacing_zyx: np.ndarray, radius_mm: float,
                    coarse_zyx_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray, list[int], np.ndarray]:
    """Closing additions on a grid of about ``coarse_zyx_mm``: (pieces labels, piece sizes in coarse
    voxels, integer factors, coarse spacing (z, y, x)). A half-voxel slack drops the one-voxel
    staircase notches a discrete ball leaves on oblique surfaces."""
    factors = [max(1, int(np.floor(c / s + 1e-6))) for c, s in zip(coarse_zyx_mm, spacing_zyx)]
    low_spacing = spacing_zyx * factors
    low = _block_mean(mask, factors) >= 0.5
    added = _closing_added(low, low_spacing, radius_mm, slack_mm=0.5 * float(low_spacing.min()))
    pieces, _ = ndi.label(added)
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    return pieces, sizes, factors, low_spacing


def closing_additions(mask: np.ndarray, spacing_xyz: Sequence[float], radius_mm: float,
                      margin_mm: float = 0.0, coarse_zyx_mm: Sequence[float] = (1.0, 2.0, 2.0)) -> np.ndarray:
    """Voxels (z, y, x) that a 3-D closing with a ball of ``radius_mm`` adds to ``mask``, grown by
    ``margin_mm``.

    The closing runs on a grid of about ``coarse_zyx_mm`` (default: 2 mm in-plane, the slices
    kept: a nodule's thin cap where it touches a vessel is lost on a grid coarse in z) with two
    Maurer distance maps; pieces of a single coarse voxel (staircase notches, not concavities)
    are dropped, the rest is grown by ``margin_mm`` on the coarse grid and brought back by
    nearest neighbour. The coarse grid misses up to a coarse voxel at the base of a concavity;
    the margin covers it. Beyond the volume the mask continues as at its faces. A 12 mm closing of
    a full-size scan takes well under a second this way (tens of seconds at full resolution).
    """
    if radius_mm <= 0 or not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    spacing_zyx = np.asarray(spacing_xyz, dtype=float)[::-1]
    pieces, sizes, factors, low_spacing = _coarse_closing(mask, spacing_zyx, radius_mm, coarse_zyx_mm)
    added = (sizes >= (2 if np.prod(factors) > 1 else 1))[pieces]
    if not added.any():
        return np.zeros(mask.shape, dtype=bool)
    if margin_mm > 0:
        # grown into the coarse lung voxels too: the tissue part of a mixed block at the base
        # of a concavity (a juxta-pleural nodule's flank) is exactly what the coarse grid misses
        added = _distance_to(added, low_spacing) <= margin_mm
    return _upsample(added, factors, mask.shape) & ~mask


def nodule_concavities(mask: np.ndarray, spacing_xyz: Sequence[float], radius_mm: float, max_ml: float,
                       margin_mm: float = 0.0, coarse_mm: float = 3.0) -> np.ndarray:
    """Nodule-sized dents of the lung surface (z, y, x): the pieces a closing with a large ball of
    ``radius_mm`` adds that are at most ``max_ml`` each, grown by ``margin_mm``, on a grid of about
    ``coarse_mm``.

    A nodule of 2-3 cm sunk into the chest wall holds a 12 mm ball, so the ordinary closing leaves
    it out; a ball much larger than the nodule rolls over it. The same ball would also fill the
    large concavities (heart, diaphragm dome, hilum): those pieces are larger than any nodule and
    are dropped.
    """
    if radius_mm <= 0 or max_ml <= 0 or not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    spacing_zyx = np.asarray(spacing_xyz, dtype=float)[::-1]
    pieces, sizes, factors, low_spacing = _coarse_closing(mask, spacing_zyx, radius_mm, (coarse_mm,) * 3)
    volume_ml = sizes * float(np.prod(low_spacing)) / 1000.0
    keep = (sizes >= 2) & (volume_ml <= max_ml)
    if not keep.any():
        return np.zeros(mask.shape, dtype=bool)
    log.info("%d nodule-sized dent(s) of the lung surface filled (%s ml)", int(keep.sum()),
             ", ".join(f"{v:.1f}" for v in volume_ml[keep]))
    added = keep[pieces]
    if margin_mm > 0:
        added = _distance_to(added, low_spacing) <= margin_mm
    return _upsample(added, factors, mask.shape) & ~mask


def _ellipsoid(radius_mm: float, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Boolean structuring element: voxel offsets within ``radius_mm`` (a 3x3x3 cross at least)."""
    r = [max(1, int(np.floor(radius_mm / s))) for s in spacing_zyx]
    grid = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    dist2 = sum((g * s) ** 2 for g, s in zip(grid, spacing_zyx))
    element = dist2 <= radius_mm ** 2 + 1e-9
    centre = tuple(r)
    element[centre] = True
    for axis in range(3):  # never smaller than the 6-neighbourhood
        for step in (-1, 1):
            idx = list(centre)
            idx[axis] += step
            element[tuple(idx)] = True
    return element


def segment_lungs(image_zyx_hu: np.ndarray, spacing_xyz: Sequence[float], threshold_hu: float = -400,
                  min_component_ml: float = 30, trachea_max_area_mm2: float = 700, closing_mm: float = 12,
                  closing_margin_mm: float = 5, nodule_closing_mm: float = 40, nodule_max_ml: float = 25,
                  dilation_mm: float = 0, padding_hu: float = -1500, padding_margin_mm: float = 2.0,
                  superior_last: bool | None = True) -> np.ndarray:
    """Lung mask (uint8 0/1, z, y, x) of a CT volume in HU with voxel size ``spacing_xyz`` (mm).

    See the module docstring for the steps. Parameters are in HU, ml, mm^2 and mm.
    ``superior_last``: whether the last slice is the most superior one (True for an identity
    direction in ITK's LPS world, as SimpleITK reads LUNA16 MetaImages and axial DICOM series),
    False for the first, None when unknown (see :func:`lung_mask_file`).
    """
    image = np.asarray(image_zyx_hu)
    if image.ndim != 3:
        raise ValueError(f"segment_lungs: expected a 3-D (z, y, x) array, got shape {image.shape}")
    sx, sy, sz = map(float, spacing_xyz)
    spacing_zyx = (sz, sy, sx)
    voxel_ml = sx * sy * sz / 1000.0
    min_voxels = min_component_ml / voxel_ml
    out = np.zeros(image.shape, dtype=np.uint8)

    beyond = outside_fov(image, spacing_xyz, padding_hu, padding_margin_mm)
    air = image < threshold_hu
    outline, step = body_outline(~air & ~beyond, spacing_xyz)
    xs = np.flatnonzero(outline.any(axis=(0, 1))) * step[1]
    midline_x = (xs[0] + xs[-1]) / 2.0 if xs.size else None   # of the body (voxel x index)
    rim = beyond & air & (image >= padding_hu)      # air-like voxels of the margin along the circle
    air &= ~beyond
    del beyond
    # outside air: components mostly outside the body's outline (sizes are checked later, on the crop)
    candidates = drop_outside_air(air, outline, step)
    del air, outline
    if not candidates.any():
        log.warning("no air region of %s ml or more inside the body: empty lung mask", min_component_ml)
        return out

    # closings add only inside a lung's bounding box (beyond the volume's faces the mask is taken
    # to continue, see closing_additions); only the margins and the dilation reach further
    margin = [int(np.ceil((closing_margin_mm + dilation_mm) / s)) + 2 for s in spacing_zyx]
    box = _bounding_box(candidates, margin)
    cand = candidates[box]
    airway = find_airways(cand, spacing_xyz, trachea_max_area_mm2, superior_last=superior_last)
    lungs = select_lungs(cand & ~airway, airway, spacing_xyz, min_voxels, max_components=2,
                         midline_x=None if midline_x is None else midline_x - box[2].start)
    if not lungs.any():
        log.warning("nothing left after removing the airways: empty lung mask")
        return out
    rim = rim[box]
    near = _grow_inplane(lungs.any(axis=0), spacing_xyz, padding_margin_mm)   # cheap first look, in 2-D
    if (rim.any(axis=0) & near).any() and (rim & _grow_inplane(lungs, spacing_xyz, padding_margin_mm)).any():
        # a lung cut by the circle reaches its edge again: grown in-plane, voxel by voxel, over the
        # air-like voxels of the margin it touches (never into the padding itself)
        steps = max(1, int(np.ceil(padding_margin_mm / min(sx, sy) - 1e-6)))
        lungs = ndi.binary_dilation(lungs, structure=_SLICEWISE_CROSS, iterations=steps, mask=lungs | rim)
    del rim
    log.info("lungs: %.0f ml in %s, airways removed: %.1f ml", lungs.sum() * voxel_ml,
             "x".join(str(b.stop - b.start) for b in box), airway.sum() * voxel_ml)
    lungs = _fill_holes_slicewise(lungs)
    # close each lung on its own: a ball closing of both at once would bridge the mediastinum
    # wherever the lungs come closer than the ball's diameter
    labels = split_lungs(lungs, spacing_xyz, min_voxels)
    for label, lung_box in enumerate(ndi.find_objects(labels), start=1):
        outer = tuple(slice(max(b.start - m, 0), min(b.stop + m, n))
                      for b, m, n in zip(lung_box, margin, lungs.shape))
        lung = labels[outer] == label
        added = closing_additions(lung, spacing_xyz, closing_mm, margin_mm=closing_margin_mm)
        added |= nodule_concavities(lung, spacing_xyz, nodule_closing_mm, nodule_max_ml,
                                    margin_mm=closing_margin_mm)
        lungs[outer] |= added
    if dilation_mm > 0:
        lungs = ndi.binary_dilation(lungs, structure=_ellipsoid(dilation_mm, spacing_zyx))
    out[box] = lungs
    return out


def superior_is_last(geometry: Geometry) -> bool | None:
    """Whether the last slice (highest z index) of a grid is its most superior one: ITK's world z
    (LPS) points to the head, so it is when the slice axis points along +z. None when the slice
    axis is more than 60 degrees away from the z axis (not an axial series)."""
    dz = float(geometry.direction_matrix[2, 2])
    return True if dz > 0.5 else False if dz < -0.5 else None


def lung_mask_file(image_path: str | Path, out_mask: str | Path, threshold_hu: float = -400,
                   min_component_ml: float = 30, trachea_max_area_mm2: float = 700, closing_mm: float = 12,
                   closing_margin_mm: float = 5, nodule_closing_mm: float = 40, nodule_max_ml: float = 25,
                   dilation_mm: float = 0) -> np.ndarray:
    """Read a resampled scan (int16 HU), segment its lungs, write ``out_mask`` (uint8 0/1, same grid)
    atomically. Returns the mask (z, y, x)."""
    image, geometry = read_image(image_path)
    mask = segment_lungs(image, geometry.spacing, threshold_hu=threshold_hu, min_component_ml=min_component_ml,
                         trachea_max_area_mm2=trachea_max_area_mm2, closing_mm=closing_mm,
                         closing_margin_mm=closing_margin_mm, nodule_closing_mm=nodule_closing_mm,
                         nodule_max_ml=nodule_max_ml, dilation_mm=dilation_mm,
                         superior_last=superior_is_last(geometry))
    volume_ml = float(mask.sum()) * float(np.prod(geometry.spacing)) / 1000.0
    log.info("%s: lung mask %.0f ml (%.1f%% of the volume)", image_path, volume_ml, 100.0 * mask.mean())
    write_image(mask, geometry, out_mask, compression_level=1)
    return mask
