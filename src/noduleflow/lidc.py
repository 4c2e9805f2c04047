"""LIDC-IDRI readers' XML -> LUNA16-style annotations and a reader-consensus label map.

LIDC-IDRI ships, beside each CT series, an XML file (``LidcReadMessage``) with one
``readingSession`` per radiologist (usually four). Each reader marked:

* nodules >= 3 mm (``unblindedReadNodule`` whose ROIs carry outlines): one ROI per slice, an
  ``edgeMap`` chain of pixel coordinates (``xCoord`` = column, ``yCoord`` = row) on the slice named
  by ``imageSOP_UID`` (``imageZposition`` its z in mm); ``inclusion`` FALSE marks a hole;
* nodules < 3 mm (``unblindedReadNodule`` whose ROIs are single points): a position only;
* non-nodules (``nonNodule``): a position (``locus``) only.

LIDC convention (as pylidc reads it): an outline is drawn on the first pixels *outside* the
nodule, so the nodule on a slice is the pixels strictly inside the outline, the outline pixels
excluded; holes (inclusion FALSE) remove their inside and their outline.

LUNA16 (Setio et al. 2017) merged the readers' nodules >= 3 mm whose centres are closer than the
sum of their radii, averaged positions and diameters, and kept those marked by >= 3 of the 4
readers (``annotations.csv``); what a detector should neither be credited nor blamed for went to
``annotations_excluded.csv`` (diameter -1 where unknown). This module rebuilds both for one scan
from the XML, plus a label map of the accepted nodules: voxels inside the outlines of at least
half of the readers who marked the nodule.

What goes where (:func:`derive_annotations`) reproduces the real LUNA16 lists of LIDC-IDRI-0001
row for row and in their order: the excluded list holds every reader's mark in XML order, each
small nodule and non-nodule at its point with diameter -1 (not merged: the same finding appears
once per reader), each nodule >= 3 mm with that reader's own centre and diameter, *except* the
first mark of each accepted nodule, which the annotation row stands for. (Over all of LUNA16, 1182
of the 1186 nodules have 2 or 3 individual marks within their radius in the excluded list: all
but one of their 3 or 4 readers.) Here the first mark of a cluster of fewer than ``min_readers``
readers is likewise replaced by the cluster's mean, which goes to the excluded list (the paper's
"nodules >= 3 mm marked by fewer than 3 readers"); for a lone mark that is the mark itself.

Per-reader nodule centre: the centroid of its filled voxels (world mm). Per-reader diameter:
the equivalent-sphere diameter of the filled voxels' volume (:func:`mark_diameter`), which gives
LUNA16's diameter of one LIDC-IDRI-0001 reader exactly (23.50 mm) and the others within 0.5 mm;
the largest in-plane diameter (pylidc's) is 8-11 mm larger there.

Coordinates: world mm in (x, y, z) (ITK / LUNA16 order); arrays and voxel indices (z, y, x).
The scan grid is the series as SimpleITK's ``ImageSeriesReader`` reads it with GDCM's file
order (``GetGDCMSeriesFileNames``): array slice ``k`` is the ``k``-th file of that order.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from noduleflow.io import (
    ANNOTATION_COLUMNS,
    Geometry,
    InputError,
    atomic_path,
    voxel_to_world,
    write_image,
)

log = logging.getLogger(__name__)

#: kinds of reader marks
NODULE = "nodule"  # >= 3 mm, outlined
SMALL = "small"  # < 3 mm, one point
NON_NODULE = "non-nodule"

#: per-reader diameter definitions (mm) that :func:`mark_diameter` knows
DIAMETER_METHODS = ("max_inplane", "equivalent_sphere", "equivalent_sphere_outline")
DEFAULT_DIAMETER = "equivalent_sphere"

#: extra columns written after the LUNA16 ones in the annotation CSV
EXTRA_COLUMNS = ["readers", "texture"]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Roi:
    """One outline (or point) of a reader's mark on one slice.

    ``points``: int array (n, 2) of pixel coordinates (x = column, y = row), in drawing order.
    ``z_position``: the ROI's ``imageZposition`` (mm), None when absent.
    """

    sop_uid: str
    z_position: float | None
    inclusion: bool
    points: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class ReaderMark:
    """One reader's mark: a nodule >= 3 mm (:data:`NODULE`), a nodule < 3 mm (:data:`SMALL`) or a
    non-nodule (:data:`NON_NODULE`).

    ``reader``: index of the reading session (0-based, unique over the XML files of a scan);
    ``radiologist``: its ``servicingRadiologistID``; ``mark_id``: ``noduleID`` / ``nonNoduleID``;
    ``texture``: the reader's texture rating 1 (ground glass) .. 5 (solid) when given;
    ``source``: the XML file (for error messages).
    """

    reader: int
    radiologist: str
    kind: str
    mark_id: str
    rois: tuple[Roi, ...]
    texture: int | None
    source: str


@dataclass(frozen=True)
class SeriesSlices:
    """The slices of a DICOM series in the order SimpleITK stacks them (GDCM order).

    ``sop_uids[k]`` / ``z_positions[k]`` (ImagePositionPatient z, mm) belong to array slice ``k``;
    ``shape`` is the volume's array shape (z, y, x) and ``geometry`` its Geometry, both as
    ``sitk.ImageSeriesReader`` gives them.
    """

    series_dir: Path
    series_uid: str
    files: tuple[str, ...]
    sop_uids: tuple[str, ...]
    z_positions: np.ndarray
    shape: tuple[int, int, int]
    geometry: Geometry


@dataclass(frozen=True)
class MeasuredMark:
    """A reader's nodule >= 3 mm on the scan grid.

    ``voxels``: int array (n, 3) of filled voxel indices (z, y, x); ``centre``: their centroid in
    world mm (x, y, z); ``diameter``: mm (see :func:`mark_diameter`).
    """

    mark: ReaderMark
    voxels: np.ndarray = field(repr=False)
    centre: np.ndarray
    diameter: float


# --------------------------------------------------------------------------- XML


def _local(tag: str) -> str:
    """Tag name without its ``{namespace}``."""
    return tag.rsplit("}", 1)[-1]


def _child(element: ET.Element, name: str) -> ET.Element | None:
    for child in element:
        if _local(child.tag) == name:
            return child
    return None


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ET.Element, name: str) -> str | None:
    child = _child(element, name)
    if child is None or child.text is None:
        return None
    return child.text.strip()


def _load_xml(xml_path: Path) -> ET.Element:
    """Parse an LIDC XML file and check its root. Raises InputError naming the file."""
    if not xml_path.is_file():
        raise InputError(f"{xml_path}: LIDC XML file not found")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise InputError(f"{xml_path}: not a well-formed XML file ({exc})") from exc
    if _local(root.tag) != "LidcReadMessage":
        raise InputError(f"{xml_path}: root element is <{_local(root.tag)}>, expected <LidcReadMessage> "
                         "(an LIDC-IDRI CT readers' file)")
    return root


def _header_series_uid(root: ET.Element) -> str | None:
    header = _child(root, "ResponseHeader")
    if header is None:
        return None
    for child in header:  # spelled SeriesInstanceUid in LIDC; accept any case
        if _local(child.tag).lower() == "seriesinstanceuid" and child.text:
            return child.text.strip()
    return None


def xml_series_uid(xml_path: str | Path) -> str:
    """The ``SeriesInstanceUid`` in an LIDC XML file's ``ResponseHeader``. Raises InputError."""
    xml_path = Path(xml_path)
    uid = _header_series_uid(_load_xml(xml_path))
    if not uid:
        raise InputError(f"{xml_path}: no ResponseHeader/SeriesInstanceUid")
    return uid


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(float(text)) if text else None
    except ValueError:
        return None


def _points(element: ET.Element, name: str, xml_path: Path, where: str) -> np.ndarray:
    """(n, 2) int pixel coordinates (x, y) of the ``name`` children (edgeMap / locus)."""
    points = []
    for point in _children(element, name):
        x, y = _text(point, "xCoord"), _text(point, "yCoord")
        try:
            points.append((int(round(float(x))), int(round(float(y)))))
        except (TypeError, ValueError) as exc:
            raise InputError(f"{xml_path}: {where}: {name} with bad coordinates "
                             f"xCoord={x!r} yCoord={y!r}") from exc
    return np.asarray(points, dtype=np.int64).reshape(-1, 2)


def _float_or_error(text: str | None, xml_path: Path, where: str) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError as exc:
        raise InputError(f"{xml_path}: {where}: imageZposition {text!r} is not a number") from exc


def parse_reads(xml_path: str | Path, series_uid: str | None = None,
                first_reader: int = 0) -> list[ReaderMark]:
    """Every reader's marks in one LIDC XML file, in file order.

    ``series_uid``: when given, the file's ``SeriesInstanceUid`` must equal it. Reader indices are
    ``first_reader + i`` for the ``i``-th ``readingSession``. An ``unblindedReadNodule`` is a
    nodule >= 3 mm (:data:`NODULE`) when any of its ROIs has more than one ``edgeMap`` (single-point
    ROIs in it are stray marks and dropped, as pylidc does), else a nodule < 3 mm (:data:`SMALL`).

    Raises InputError naming the file for: a missing or unparsable file, a root other than
    ``LidcReadMessage``, no ``readingSession``, a series uid mismatch, an ROI or non-nodule without
    points or slice reference, or non-numeric coordinates.
    """
    xml_path = Path(xml_path)
    root = _load_xml(xml_path)
    uid = _header_series_uid(root)
    if series_uid is not None and uid != series_uid:
        if uid is None:
            raise InputError(f"{xml_path}: no ResponseHeader/SeriesInstanceUid (expected {series_uid})")
        raise InputError(f"{xml_path}: SeriesInstanceUid {uid} is not the scan's {series_uid} "
                         "(readers' file of another series)")
    sessions = _children(root, "readingSession")
    if not sessions:
        raise InputError(f"{xml_path}: no readingSession (not a CT readers' file, or empty)")
    marks: list[ReaderMark] = []
    for index, session in enumerate(sessions):
        reader = first_reader + index
        radiologist = _text(session, "servicingRadiologistID") or str(reader)
        for element in session:  # document order: the order LUNA16's excluded list keeps
            name = _local(element.tag)
            if name == "unblindedReadNodule":
                marks.append(_nodule_mark(element, reader, radiologist, xml_path))
            elif name == "nonNodule":
                marks.append(_non_nodule_mark(element, reader, radiologist, xml_path))
    return marks


def _nodule_mark(nodule: ET.Element, reader: int, radiologist: str, xml_path: Path) -> ReaderMark:
    """An ``unblindedReadNodule``: a nodule >= 3 mm when any ROI is outlined, else < 3 mm."""
    mark_id = _text(nodule, "noduleID") or ""
    where = f"reader {radiologist} nodule {mark_id!r}"
    characteristics = _child(nodule, "characteristics")
    texture = _int_or_none(_text(characteristics, "texture")) if characteristics is not None else None
    if texture is not None and not 1 <= texture <= 5:
        texture = None  # 0 / blank: not rated
    rois = []
    for roi in _children(nodule, "roi"):
        sop = _text(roi, "imageSOP_UID") or ""
        z = _float_or_error(_text(roi, "imageZposition"), xml_path, where)
        inclusion = (_text(roi, "inclusion") or "TRUE").upper() != "FALSE"
        points = _points(roi, "edgeMap", xml_path, where)
        if len(points) == 0:
            raise InputError(f"{xml_path}: {where}: ROI without edgeMap points")
        if not sop and z is None:
            raise InputError(f"{xml_path}: {where}: ROI without imageSOP_UID and imageZposition")
        rois.append(Roi(sop, z, inclusion, points))
    if not rois:
        raise InputError(f"{xml_path}: {where}: no ROI")
    outlined = [r for r in rois if len(r.points) > 1]
    kind = NODULE if outlined else SMALL
    return ReaderMark(reader, radiologist, kind, mark_id, tuple(outlined or rois), texture, str(xml_path))


def _non_nodule_mark(element: ET.Element, reader: int, radiologist: str, xml_path: Path) -> ReaderMark:
    """A ``nonNodule``: one ``locus`` point on one slice."""
    mark_id = _text(element, "nonNoduleID") or ""
    where = f"reader {radiologist} non-nodule {mark_id!r}"
    sop = _text(element, "imageSOP_UID") or ""
    z = _float_or_error(_text(element, "imageZposition"), xml_path, where)
    points = _points(element, "locus", xml_path, where)
    if len(points) == 0:
        raise InputError(f"{xml_path}: {where}: no locus")
    if not sop and z is None:
        raise InputError(f"{xml_path}: {where}: no imageSOP_UID and imageZposition")
    return ReaderMark(reader, radiologist, NON_NODULE, mark_id, (Roi(sop, z, True, points),), None,
                      str(xml_path))


def find_series_xml(series_dir: str | Path, series_uid: str) -> list[Path]:
    """The LIDC XML files in ``series_dir`` (not recursive) whose header names ``series_uid``,
    sorted by name. No XML there -> [] (the scan has no reader annotations). XML files of other
    series or of other kinds (not ``LidcReadMessage``) are skipped; an unparsable one raises
    InputError naming it."""
    series_dir = Path(series_dir)
    if not series_dir.is_dir():
        raise InputError(f"{series_dir}: series folder not found")
    found = []
    for path in sorted(p for p in series_dir.iterdir() if p.suffix.lower() == ".xml" and p.is_file()):
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as exc:
            raise InputError(f"{path}: not a well-formed XML file ({exc})") from exc
        if _local(root.tag) == "LidcReadMessage" and _header_series_uid(root) == series_uid:
            found.append(path)
    return found


# --------------------------------------------------------------------------- DICOM series


def read_series_slices(series_dir: str | Path, series_uid: str | None = None) -> SeriesSlices:
    """The slices of a DICOM series in GDCM order, with the volume's shape and Geometry.

    ``series_uid``: which series of the folder (default: the folder's only one). Reads every
    file's header (``sitk.ImageFileReader.ReadImageInformation``: SOPInstanceUID ``0008|0018`` and
    the slice origin, i.e. ImagePositionPatient ``0020|0032``) and the volume once through
    ``sitk.ImageSeriesReader`` for its exact grid. Raises InputError naming the folder.
    """
    import SimpleITK as sitk

    series_dir = Path(series_dir)
    if not series_dir.is_dir():
        raise InputError(f"{series_dir}: series folder not found")
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(series_dir))
    if series_uid is None:
        if len(ids) != 1:
            raise InputError(f"{series_dir}: {len(ids)} DICOM series found, expected exactly one "
                             f"({', '.join(ids) or 'none'})")
        series_uid = ids[0]
    elif series_uid not in ids:
        raise InputError(f"{series_dir}: no DICOM series {series_uid} (found {', '.join(ids) or 'none'})")
    files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir), series_uid))
    reader = sitk.ImageFileReader()
    sop_uids, z_positions = [], []
    for name in files:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
            sop = reader.GetMetaData("0008|0018").strip().rstrip("\x00").strip()
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()[-1]
            raise InputError(f"{name}: cannot read DICOM header: {detail}") from exc
        sop_uids.append(sop)
        z_positions.append(float(reader.GetOrigin()[2]))
    series = sitk.ImageSeriesReader()
    series.SetFileNames(list(files))
    try:
        image = series.Execute()
    except RuntimeError as exc:
        raise InputError(f"{series_dir}: cannot read series {series_uid}: "
                         f"{str(exc).strip().splitlines()[-1]}") from exc
    size = image.GetSize()
    return SeriesSlices(series_dir, series_uid, files, tuple(sop_uids), np.asarray(z_positions, dtype=float),
                        (int(size[2]), int(size[1]), int(size[0])), Geometry.of(image))


def roi_slice_index(roi: Roi, slices: SeriesSlices, source: str | Path) -> int:
    """Array slice index (z) of an ROI: by ``imageSOP_UID``, else the slice whose z position is
    nearest ``imageZposition`` within half the slice spacing. No match -> InputError naming the
    XML file (``source``) and the uid."""
    if roi.sop_uid and roi.sop_uid in slices.sop_uids:
        return slices.sop_uids.index(roi.sop_uid)
    if roi.z_position is not None and len(slices.z_positions):
        distance = np.abs(slices.z_positions - roi.z_position)
        k = int(np.argmin(distance))
        if distance[k] <= 0.5 * abs(slices.geometry.spacing[2]) + 1e-6:
            return k
    raise InputError(f"{source}: ROI on slice imageSOP_UID {roi.sop_uid or '(none)'} "
                     f"(imageZposition {roi.z_position}) matches no slice of series {slices.series_uid} "
                     f"in {slices.series_dir}")


# --------------------------------------------------------------------------- outlines -> voxels


def polygon_inside(points_xy: np.ndarray, columns: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Which pixel centres (``rows`` x ``columns`` grid) lie inside the closed polygon through
    ``points_xy`` ((n, 2) x = column, y = row), even-odd rule. Returns bool (len(rows), len(columns))."""
    x = points_xy[:, 0].astype(float)
    y = points_xy[:, 1].astype(float)
    x2, y2 = np.roll(x, -1), np.roll(y, -1)
    py = rows.astype(float)[:, None]  # (r, 1)
    inside = np.zeros((len(rows), len(columns)), dtype=bool)
    # edges that cross each row's horizontal line (half-open rule: no double counting at vertices)
    crosses = (y[None, :] > py) != (y2[None, :] > py)  # (r, e)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x[None, :] + (py - y[None, :]) * (x2 - x)[None, :] / (y2 - y)[None, :]  # (r, e)
    for r in range(len(rows)):
        xs = np.sort(x_at[r, crosses[r]])
        if len(xs) == 0:
            continue
        # a pixel is inside when an odd number of crossings lie to its right
        count = len(xs) - np.searchsorted(xs, columns.astype(float), side="right")
        inside[r] = (count % 2) == 1
    return inside


def fill_contour(points_xy: np.ndarray, shape_yx: tuple[int, int], hole: bool = False) -> np.ndarray:
    """The region an LIDC outline encloses on a slice of ``shape_yx`` (rows, columns), bool (y, x).

    ``points_xy``: (n, 2) pixel coordinates (x = column, y = row) of the drawn outline, closed
    implicitly. LIDC convention: the outline is the first pixels *outside* the nodule, so the
    region is the pixels inside the polygon minus the outline pixels (a square outline of side
    ``n`` pixels encloses ``(n - 2)**2``). ``hole=True`` (an inclusion FALSE ROI) returns what to
    remove: the inside *and* the outline pixels. Pixels off the slice are ignored.
    """
    points = np.asarray(points_xy, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(shape_yx, dtype=bool)
    if len(points) == 0:
        return mask
    x0, y0 = max(points[:, 0].min(), 0), max(points[:, 1].min(), 0)
    x1, y1 = min(points[:, 0].max(), shape_yx[1] - 1), min(points[:, 1].max(), shape_yx[0] - 1)
    if x0 <= x1 and y0 <= y1 and len(points) > 2:
        mask[y0:y1 + 1, x0:x1 + 1] = polygon_inside(points, np.arange(x0, x1 + 1), np.arange(y0, y1 + 1))
    on = ((points[:, 0] >= 0) & (points[:, 0] < shape_yx[1])
          & (points[:, 1] >= 0) & (points[:, 1] < shape_yx[0]))
    mask[points[on, 1], points[on, 0]] = hole
    return mask


def mark_voxels(mark: ReaderMark, slices: SeriesSlices) -> np.ndarray:
    """Filled voxels of a reader's nodule >= 3 mm: int (n, 3) indices (z, y, x), sorted.

    Per slice: the union of the inclusion outlines' regions minus the holes (inclusion FALSE),
    see :func:`fill_contour`. ROIs are matched to slices by :func:`roi_slice_index`.
    """
    shape_yx = slices.shape[1:]
    by_slice: dict[int, list[Roi]] = {}
    for roi in mark.rois:
        by_slice.setdefault(roi_slice_index(roi, slices, mark.source), []).append(roi)
    parts = []
    for k in sorted(by_slice):
        rois = by_slice[k]
        region = np.zeros(shape_yx, dtype=bool)
        for roi in rois:
            if roi.inclusion:
                region |= fill_contour(roi.points, shape_yx)
        for roi in rois:
            if not roi.inclusion:
                region &= ~fill_contour(roi.points, shape_yx, hole=True)
        yy, xx = np.nonzero(region)
        parts.append(np.column_stack([np.full(len(yy), k), yy, xx]))
    if not parts:
        return np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(parts).astype(np.int64)


def mark_diameter(mark: ReaderMark, voxels: np.ndarray, slices: SeriesSlices,
                  method: str = DEFAULT_DIAMETER) -> float:
    """A reader's nodule diameter in mm.

    * ``max_inplane``: the largest distance between two outline points on one slice (pylidc's
      ``Annotation.diameter``; pixel centres, mm in-plane);
    * ``equivalent_sphere``: ``(6 V / pi)^(1/3)``, V = filled voxels x voxel volume;
    * ``equivalent_sphere_outline``: the same with the outline pixels of inclusion ROIs counted
      in V (the polygon through the pixel centres is between the two).
    """
    spacing = np.asarray(slices.geometry.spacing, dtype=float)
    if method == "max_inplane":
        best = 0.0
        for roi in mark.rois:
            if not roi.inclusion or len(roi.points) < 2:
                continue
            p = roi.points.astype(float) * spacing[:2]
            d = np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)).max()
            best = max(best, float(d))
        return best
    if method in ("equivalent_sphere", "equivalent_sphere_outline"):
        count = len(voxels)
        if method == "equivalent_sphere_outline":
            filled = {tuple(v) for v in voxels.tolist()}
            for roi in mark.rois:
                if roi.inclusion:
                    k = roi_slice_index(roi, slices, mark.source)
                    filled.update((k, int(y), int(x)) for x, y in roi.points.tolist())
            count = len(filled)
        volume = count * float(np.prod(np.abs(spacing)))
        return float((6.0 * volume / np.pi) ** (1.0 / 3.0))
    raise ValueError(f"unknown diameter method {method!r} (known: {', '.join(DIAMETER_METHODS)})")


def measure_mark(mark: ReaderMark, slices: SeriesSlices, method: str = DEFAULT_DIAMETER) -> MeasuredMark:
    """Filled voxels, centroid (world mm x, y, z) and diameter (mm) of a reader's nodule >= 3 mm.
    A nodule whose outlines enclose no voxel is centred on its outline points' mean."""
    voxels = mark_voxels(mark, slices)
    if len(voxels):
        centre_zyx = voxels.mean(axis=0)
    else:
        pts = [np.column_stack([np.full(len(r.points), roi_slice_index(r, slices, mark.source)),
                                r.points[:, 1], r.points[:, 0]]) for r in mark.rois if r.inclusion]
        centre_zyx = np.concatenate(pts).mean(axis=0)
    centre = voxel_to_world(centre_zyx, slices.geometry)
    return MeasuredMark(mark, voxels, centre, mark_diameter(mark, voxels, slices, method))


def point_position(mark: ReaderMark, slices: SeriesSlices) -> np.ndarray:
    """World position (mm x, y, z) of a small nodule or non-nodule: the mean of its points."""
    pts = [np.column_stack([np.full(len(r.points), roi_slice_index(r, slices, mark.source)),
                            r.points[:, 1], r.points[:, 0]]) for r in mark.rois]
    return voxel_to_world(np.concatenate(pts).astype(float).mean(axis=0), slices.geometry)


# --------------------------------------------------------------------------- clustering


def cluster_marks(centres: np.ndarray, diameters: Sequence[float],
                  readers: Sequence) -> list[list[int]]:
    """Group reader marks of one nodule (LUNA16 rule), deterministically.

    ``centres``: (n, 3) world mm; ``diameters``: mm; ``readers``: who made each mark. Two marks of
    different readers may belong together when their centre distance is < the sum of their radii.
    Candidate pairs are merged nearest first (ties by index; single linkage), never into a cluster
    that already has a mark of the same reader: each cluster holds at most one mark per reader.
    Returns clusters as sorted index lists, ordered by their smallest index.
    """
    centres = np.asarray(centres, dtype=float).reshape(-1, 3)
    radii = np.asarray(diameters, dtype=float) / 2.0
    n = len(centres)
    parent = list(range(n))
    members: dict[int, set] = {i: {readers[i]} for i in range(n)}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            if readers[i] == readers[j]:
                continue
            distance = float(np.linalg.norm(centres[i] - centres[j]))
            if distance < radii[i] + radii[j]:
                pairs.append((distance, i, j))
    for _, i, j in sorted(pairs):
        a, b = find(i), find(j)
        if a == b or members[a] & members[b]:
            continue
        a, b = min(a, b), max(a, b)
        parent[b] = a
        members[a] |= members.pop(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


# --------------------------------------------------------------------------- consensus


def consensus_labels(clusters: Sequence[Sequence[MeasuredMark]], shape: tuple[int, int, int],
                     fraction: float = 0.5) -> np.ndarray:
    """Label map uint8 (z, y, x): label ``i + 1`` where at least ``fraction`` of the readers of
    ``clusters[i]`` outlined the voxel. A voxel claimed by two nodules goes to the one a larger
    share of its readers agree on (on a tie, the lower label). Raises ValueError past 255 nodules."""
    if len(clusters) > 255:
        raise ValueError(f"{len(clusters)} nodules do not fit a uint8 label map")
    labels = np.zeros(shape, dtype=np.uint8)
    best = np.zeros(shape, dtype=np.float32)
    for index, marks in enumerate(clusters):
        voxels = [m.voxels for m in marks if len(m.voxels)]
        if not voxels:
            continue
        low = np.min([v.min(axis=0) for v in voxels], axis=0)
        high = np.max([v.max(axis=0) for v in voxels], axis=0) + 1
        box = tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high))
        votes = np.zeros(tuple(high - low), dtype=np.float32)
        for v in voxels:
            rel = v - low
            votes[rel[:, 0], rel[:, 1], rel[:, 2]] += 1.0
        agree = votes / len(marks)
        take = (agree >= fraction - 1e-6) & (agree > best[box])
        labels[box][take] = index + 1
        best[box][take] = agree[take]
    return labels


# --------------------------------------------------------------------------- one scan


@dataclass
class ScanAnnotations:
    """What :func:`derive_annotations` finds for one scan.

    ``annotations``: LUNA16 columns + ``readers`` (how many readers marked it) + ``texture``
    (median of the readers' texture ratings, rounded down; NaN when none), label ``i + 1`` =
    row ``i``; ``excluded``: LUNA16 columns; ``labels``: uint8 (z, y, x) on the scan grid;
    ``marks``: every reader's nodule >= 3 mm measured; ``clusters``: index lists into ``marks``.
    """

    annotations: pd.DataFrame
    excluded: pd.DataFrame
    labels: np.ndarray
    marks: list[MeasuredMark]
    clusters: list[list[int]]


def derive_annotations(marks: Sequence[ReaderMark], slices: SeriesSlices, min_readers: int = 3,
                       diameter_method: str = DEFAULT_DIAMETER) -> ScanAnnotations:
    """LUNA16-style annotations, excluded findings and consensus labels of one scan.

    ``marks``: all readers' marks of the scan in file order (:func:`parse_reads`). The readers'
    nodules >= 3 mm are measured (:func:`measure_mark`) and clustered (:func:`cluster_marks`); a
    cluster is the mean centre and mean diameter of its marks. Rows, in mark order:

    * the first mark of a cluster stands for the cluster: an annotation row when at least
      ``min_readers`` readers marked it, else an excluded row (the cluster's mean);
    * every other mark of a nodule >= 3 mm: an excluded row with its own centre and diameter;
    * a nodule < 3 mm or a non-nodule: an excluded row at its point, diameter -1.

    Label ``i + 1`` of ``labels`` is annotation row ``i`` (:func:`consensus_labels`, >= 50 %).
    """
    uid = slices.series_uid
    nodule_index = [i for i, m in enumerate(marks) if m.kind == NODULE]
    measured = [measure_mark(marks[i], slices, diameter_method) for i in nodule_index]
    clusters = cluster_marks(np.array([m.centre for m in measured]).reshape(-1, 3),
                             [m.diameter for m in measured], [m.mark.reader for m in measured])
    cluster_of = {nodule_index[j]: c for c, group in enumerate(clusters) for j in group}
    first_of = {c: nodule_index[group[0]] for c, group in enumerate(clusters)}
    position = {i: j for j, i in enumerate(nodule_index)}
    rows, excluded, accepted = [], [], []
    for i, mark in enumerate(marks):
        if mark.kind != NODULE:
            excluded.append([uid, *map(float, point_position(mark, slices)), -1.0])
            continue
        c = cluster_of[i]
        if i != first_of[c]:
            own = measured[position[i]]
            excluded.append([uid, *map(float, own.centre), float(own.diameter)])
            continue
        members = [measured[j] for j in clusters[c]]
        centre = np.mean([m.centre for m in members], axis=0)
        diameter = float(np.mean([m.diameter for m in members]))
        if len(members) >= min_readers:
            textures = sorted(m.mark.texture for m in members if m.mark.texture is not None)
            texture = float(textures[(len(textures) - 1) // 2]) if textures else np.nan
            rows.append([uid, *map(float, centre), diameter, len(members), texture])
            accepted.append(members)
        else:
            excluded.append([uid, *map(float, centre), diameter])
    annotations = pd.DataFrame(rows, columns=ANNOTATION_COLUMNS + EXTRA_COLUMNS)
    annotations["readers"] = annotations["readers"].astype(int)
    excluded_frame = pd.DataFrame(excluded, columns=ANNOTATION_COLUMNS)
    labels = consensus_labels(accepted, slices.shape)
    return ScanAnnotations(annotations, excluded_frame, labels, measured, clusters)


def lidc_annotations(series_dir: str | Path, xml_paths: Sequence[str | Path] | None,
                     out_annotations: str | Path, out_excluded: str | Path, out_mask: str | Path,
                     min_readers: int = 3, series_uid: str | None = None,
                     diameter_method: str = DEFAULT_DIAMETER,
                     slices: SeriesSlices | None = None) -> ScanAnnotations:
    """Derive one LIDC scan's annotations from its readers' XML and write three files, atomically
    and all or none:

    * ``out_annotations``: CSV ``seriesuid,coordX,coordY,coordZ,diameter_mm,readers,texture``
      (world mm), the nodules >= 3 mm marked by >= ``min_readers`` readers;
    * ``out_excluded``: CSV ``seriesuid,coordX,coordY,coordZ,diameter_mm`` (-1 = unknown);
    * ``out_mask``: uint8 label map (``.mha``) on the series' grid as SimpleITK reads it, label
      ``i`` = the ``i``-th annotation row, voxels inside >= 50 % of that nodule's readers' outlines.

    ``xml_paths=None`` finds the XML files in ``series_dir`` (:func:`find_series_xml`); none ->
    empty CSVs and an all-zero mask. Raises InputError naming the file on bad XML, a series uid
    mismatch or an ROI that matches no slice; then no output file is written.

    ``slices``: the series as :func:`read_series_slices` already read it (skips reading it again).
    Returns what was written (:class:`ScanAnnotations`).
    """
    if slices is None:
        slices = read_series_slices(series_dir, series_uid)
    if xml_paths is None:
        xml_paths = find_series_xml(series_dir, slices.series_uid)
    marks: list[ReaderMark] = []
    for path in xml_paths:
        first = 1 + max((m.reader for m in marks), default=-1)
        marks.extend(parse_reads(path, slices.series_uid, first_reader=first))
    result = derive_annotations(marks, slices, min_readers, diameter_method)
    with ExitStack() as stack:  # all three under temporary names; renamed only if all succeed
        tmp_annotations = stack.enter_context(atomic_path(out_annotations))
        tmp_excluded = stack.enter_context(atomic_path(out_excluded))
        tmp_mask = stack.enter_context(atomic_path(out_mask))
        result.annotations.to_csv(tmp_annotations, index=False)
        result.excluded.to_csv(tmp_excluded, index=False)
        write_image(result.labels, slices.geometry, tmp_mask)
    log.info("%s: %d reader mark(s) in %d XML file(s) -> %d nodule(s) of >= %d readers %s, %d excluded "
             "finding(s)", slices.series_uid, len(marks), len(xml_paths), len(result.annotations), min_readers,
             result.annotations[["diameter_mm", "readers"]].round(2).values.tolist(), len(result.excluded))
    return result


def texture_class(rating: float) -> str:
    """LIDC texture rating (1 non-solid/ground glass .. 3 part solid .. 5 solid; readers' median)
    -> the synthetic cohort's texture names (``ground_glass``, ``part_solid``, ``solid``)."""
    if not np.isfinite(rating):
        return "solid"
    return "ground_glass" if rating <= 2 else "part_solid" if rating < 4 else "solid"


def write_cohort_tables(nodule_csvs: Sequence[str | Path], excluded_csvs: Sequence[str | Path],
                        out_annotations: str | Path, out_excluded: str | Path,
                        out_strata: str | Path | None = None) -> None:
    """The data set's LUNA16 lists from the per-scan files :func:`lidc_annotations` wrote (in the
    order given): ``annotations.csv`` (five LUNA16 columns), ``annotations_excluded.csv``, and with
    ``out_strata`` the folds' ``seriesuid,stratum`` (none / solid / subsolid from the readers'
    texture ratings, as the synthetic cohort writes it)."""
    from noduleflow.io import read_annotations, write_csv_atomic
    from noduleflow.synthetic import texture_stratum

    nodules = [(Path(p), read_annotations(p)) for p in nodule_csvs]
    excluded = [read_annotations(p, allow_unknown_diameter=True) for p in excluded_csvs]
    empty = pd.DataFrame(columns=ANNOTATION_COLUMNS)
    shown = [f[ANNOTATION_COLUMNS] for _, f in nodules if len(f)]
    write_csv_atomic(pd.concat(shown, ignore_index=True) if shown else empty, out_annotations)
    shown = [f[ANNOTATION_COLUMNS] for f in excluded if len(f)]
    write_csv_atomic(pd.concat(shown, ignore_index=True) if shown else empty, out_excluded)
    if out_strata is not None:
        rows = []
        for path, frame in nodules:
            ratings = frame["texture"].astype(float) if "texture" in frame.columns else []
            rows.append((path.name[: -len(".csv")], texture_stratum([texture_class(r) for r in ratings])))
        write_csv_atomic(pd.DataFrame(rows, columns=["seriesuid", "stratum"]).sort_values("seriesuid"), out_strata)
