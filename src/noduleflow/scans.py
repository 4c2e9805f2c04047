"""Every CT scan, whatever its format, into one canonical in-memory form.

Accepted inputs (one scan each):

* an image file: MetaImage (``.mhd`` + data file, ``.mha``), NRRD (``.nrrd``), NIfTI (``.nii``,
  ``.nii.gz``); its ``seriesuid`` is the file name without the suffix (the LUNA16 convention);
* a DICOM series folder (``*.dcm`` files of exactly one series, read with SimpleITK in GDCM's
  slice order); its ``seriesuid`` is the SeriesInstanceUID (for LIDC-IDRI: the LUNA16 uid).

The canonical form (:class:`CanonicalScan`):

* values in Hounsfield units, int16 (DICOM rescale slope/intercept applied by the reader);
  a scan whose values are clearly not HU (no air near -1000) is rejected;
* a grid with the **identity direction**: array axis 0 runs feet -> head, 1 anterior -> posterior,
  2 right -> left (numpy (z, y, x) of an LPS world, as the LUNA16 tools assume). A scan whose
  axes are permuted or flipped is reordered without interpolation; an oblique one is resampled
  (linear) onto the identity-direction grid that covers it, voxels outside it set to
  :data:`OUTSIDE_FOV_HU`. World coordinates (mm, x-y-z) of every point are unchanged, so
  annotations and candidates need no conversion.

No stage after reading knows which format a scan came in. Arrays are (z, y, x); spacing, origin
and world coordinates are (x, y, z) mm (see :mod:`noduleflow.io`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from noduleflow.io import Geometry, InputError, check_same_grid, validate_mhd

log = logging.getLogger(__name__)

#: image file suffixes read as scans (lower case; ``.nii.gz`` before ``.nii``)
SCAN_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
#: suffix of DICOM files in a series folder
DICOM_SUFFIX = ".dcm"
#: value of voxels outside the scanned field of view after an oblique scan is resampled (as the
#: padding of real scanners, below any tissue or air)
OUTSIDE_FOV_HU = -2048
#: a direction matrix counts as a signed permutation when each entry is within this of 0 or +-1
_AXIS_TOLERANCE = 1e-4
#: HU sanity check: among the voxels above padding, this low percentile must be air ...
_AIR_PERCENTILE = 1.0
_AIR_MAX_HU = -800.0
#: air in HU
_AIR_HU = -1000.0
#: ... and nothing in a CT may be below this (padding excluded, see _PADDING_MAX_HU)
_PADDING_MAX_HU = -1500.0
#: relative tolerance of the slice spacing of a DICOM series (gaps beyond it: missing or uneven)
_SPACING_TOLERANCE = 0.1

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class CanonicalScan:
    """A scan in HU on an identity-direction grid, with where it came from.

    ``hu`` is int16 (z, y, x); ``geometry`` its grid (identity direction). ``source_shape`` (z, y, x)
    and ``source_geometry`` describe the grid as stored in ``source`` (needed to bring outputs
    back onto it, or to check a label map drawn on it).
    """

    hu: np.ndarray
    geometry: Geometry
    source: Path
    source_shape: tuple[int, int, int]
    source_geometry: Geometry


# --------------------------------------------------------------------------- discovery


def scan_suffix(path: str | Path) -> str | None:
    """The scan suffix of an image file name (``.nii.gz``, ``.mhd``, ...) or None."""
    name = Path(path).name.lower()
    return next((s for s in SCAN_SUFFIXES if name.endswith(s)), None)


def _dicom_header(path: Path) -> dict[str, str]:
    """A few tags of one DICOM file (without reading its pixels). Raises InputError."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable DICOM file ({_last_line(exc)})") from exc
    tags = {"series": "0020|000e", "modality": "0008|0060"}
    return {name: reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else "" for name, tag in tags.items()}


def find_scans(root: str | Path, skip_dirs: Iterable[str | Path] = ()) -> dict[str, Path]:
    """seriesuid -> scan path (an image file or a DICOM series folder) under ``root``, any depth.

    Image files are named by their uid (``{uid}.mhd``, ``{uid}.nii.gz``, ...); a folder holding
    ``*.dcm`` files is one DICOM series named by its SeriesInstanceUID (read from one file). When
    ``root`` has ``subset*`` folders (the LUNA16 layout) only those are searched.
    Folders in ``skip_dirs`` (paths relative to ``root``, e.g. the label map folder) and hidden
    folders are not searched. DICOM folders of another modality than CT (a chest radiograph beside
    the CT in a LIDC-IDRI download) are skipped with a warning. Raises InputError for a missing
    root or a uid found twice.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: data set folder not found (config dataset.root)")
    skip = {(root / Path(s)).resolve() for s in skip_dirs}
    found: dict[str, Path] = {}
    subsets = sorted(p for p in root.glob("subset*") if p.is_dir())
    starts = subsets if subsets else [root]

    def add(uid: str, path: Path) -> None:
        if uid in found:
            raise InputError(f"{path}: seriesuid {uid} also found at {found[uid]}")
        found[uid] = path

    walks = (walk for start in starts for walk in os.walk(start, followlinks=True))
    for folder, dirs, files in walks:
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in skip)
        dicoms = sorted(f for f in files if f.lower().endswith(DICOM_SUFFIX))
        if dicoms:
            header = _dicom_header(here / dicoms[0])
            if header["modality"] and header["modality"] != "CT":
                log.warning("%s: DICOM series of modality %s, not CT: skipped", here, header["modality"])
            elif not header["series"]:
                raise InputError(f"{here / dicoms[0]}: DICOM file without a SeriesInstanceUID (0020,000e)")
            else:
                add(header["series"], here)
        for name in sorted(files):
            suffix = scan_suffix(name)
            if suffix is not None:
                add(name[: -len(suffix)], here / name)
    return found


# --------------------------------------------------------------------------- reading


def _last_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def read_image_file(path: str | Path):
    """A SimpleITK image from a scan file, the file validated first. Raises InputError naming it."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: scan not found")
    if scan_suffix(path) == ".mhd":
        validate_mhd(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        message = _last_line(exc)
        if "orthonormal" in message or "singular" in message.lower():
            raise InputError(f"{path}: singular or non-orthonormal affine (voxel axes do not span "
                             f"3-D space): {message}") from exc
        raise InputError(f"{path}: cannot read image: {message}") from exc
    return image


def _floats(text: str, count: int, path: Path, tag: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in text.replace("\\", " ").split()], dtype=float)
    except ValueError as exc:
        raise InputError(f"{path}: DICOM tag {tag} = {text!r} is not numeric") from exc
    if values.size != count:
        raise InputError(f"{path}: DICOM tag {tag} = {text!r} does not hold {count} numbers")
    return values


def read_dicom_series(folder: str | Path):
    """A SimpleITK image (HU) from a folder that holds exactly one CT series.

    Checks before trusting GDCM's volume: one series in the folder, every ``*.dcm`` file part of
    it, modality CT, one orientation, slice positions along the slice normal (no gantry tilt),
    evenly spaced (no missing slice, no uneven spacing, no duplicate position). Raises InputError
    naming the folder (or file) and the problem.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: DICOM series folder not found")
    dcm_files = sorted(p for p in folder.iterdir() if p.name.lower().endswith(DICOM_SUFFIX))
    if not dcm_files:
        raise InputError(f"{folder}: no {DICOM_SUFFIX} files")
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series) == 0:
        raise InputError(f"{folder}: no readable DICOM series ({len(dcm_files)} {DICOM_SUFFIX} files)")
    if len(series) > 1:
        raise InputError(f"{folder}: {len(series)} DICOM series in one folder ({', '.join(series)}); "
                         f"put each series in its own folder")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    in_series = {Path(f).resolve() for f in files}
    stray = [p for p in dcm_files if p.resolve() not in in_series]
    if stray:
        raise InputError(f"{stray[0]}: not part of the folder's DICOM series {series[0]} "
                         f"(unreadable or not an image; {len(stray)} such file(s))")
    if len(files) < 2:
        raise InputError(f"{folder}: a series of {len(files)} slice; a CT volume needs at least 2")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: cannot read DICOM series: {_last_line(exc)}") from exc

    def tag(i: int, key: str) -> str:
        return reader.GetMetaData(i, key).strip() if reader.HasMetaDataKey(i, key) else ""

    modalities = {tag(i, "0008|0060") for i in range(len(files))}
    if modalities != {"CT"}:
        raise InputError(f"{folder}: modality {'/'.join(sorted(modalities)) or 'missing'}, not CT "
                         f"(tag 0008,0060)")
    orientations = {tag(i, "0020|0037") for i in range(len(files))}
    if len(orientations) != 1 or "" in orientations:
        raise InputError(f"{folder}: slices with {len(orientations)} different orientations "
                         f"(ImageOrientationPatient 0020,0037)")
    cosines = _floats(orientations.pop(), 6, folder, "0020,0037")
    normal = np.cross(cosines[:3], cosines[3:])
    positions = np.array([_floats(tag(i, "0020|0032"), 3, Path(files[i]), "0020,0032") for i in range(len(files))])
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    gap = float(np.median(np.abs(along)))
    if gap <= 0:
        raise InputError(f"{folder}: slices share one position (ImagePositionPatient 0020,0032)")
    sideways = np.linalg.norm(steps - np.outer(along, normal), axis=1)
    if np.any(sideways > _SPACING_TOLERANCE * gap):
        raise InputError(f"{folder}: slice positions are not along the slice normal (gantry tilt "
                         f"or sheared series, {sideways.max():.2f} mm off); resample it first")
    uneven = np.flatnonzero(np.abs(np.abs(along) - gap) > _SPACING_TOLERANCE * gap)
    if uneven.size:
        i = int(uneven[0])
        kind = ("missing slice" if abs(along[i]) > 1.5 * gap else
                "duplicate slice position" if abs(along[i]) < _SPACING_TOLERANCE * gap else "uneven slice spacing")
        raise InputError(f"{folder}: {kind}: {abs(along[i]):.3f} mm between {Path(files[i]).name} and "
                         f"{Path(files[i + 1]).name}, {gap:.3f} mm elsewhere")
    return image


def read_sitk(path: str | Path):
    """A SimpleITK image from a scan file or a DICOM series folder (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if scan_suffix(path) is None:
        raise InputError(f"{path}: not a scan (expected a DICOM series folder or one of "
                         f"{', '.join(SCAN_SUFFIXES)})")
    return read_image_file(path)


def check_hu(array: np.ndarray, source: str | Path) -> None:
    """Raise InputError unless ``array`` looks like a CT in Hounsfield units: among the voxels
    above padding (> -1500 HU, and above the scan's minimum value when that lies below air), the
    1st percentile is air
    (<= -800 HU). Raw stored values without the rescale (air near 0 or +24), or a scan of no air,
    fail."""
    values = np.asarray(array)
    sample = values.ravel()[:: max(1, values.size // 2_000_000)]
    # padding outside the field of view is the scan's minimum, below air (-2048, -3024, or -1024
    # when the stored values lack the rescale); it says nothing about the scale of the values
    padding = sample.min() if sample.min() < _AIR_HU - 10 else None
    inside = sample[(sample > _PADDING_MAX_HU) & ((sample > padding) if padding is not None else True)]
    if inside.size == 0:
        raise InputError(f"{source}: every value is below {_PADDING_MAX_HU:g}: not a CT in HU")
    low = float(np.percentile(inside, _AIR_PERCENTILE))
    if low > _AIR_MAX_HU:
        raise InputError(f"{source}: values are not Hounsfield units: no air near -1000 (1st "
                         f"percentile {low:.0f}, range {float(inside.min()):.0f}..{float(inside.max()):.0f}); "
                         f"stored without the rescale slope/intercept, or not a chest CT")


# --------------------------------------------------------------------------- canonical grid


def _axis_permutation(direction: np.ndarray) -> np.ndarray | None:
    """For a signed-permutation direction matrix, the world axis of each image axis; else None."""
    rounded = np.round(direction)
    if not np.allclose(direction, rounded, atol=_AXIS_TOLERANCE):
        return None
    if sorted(np.abs(rounded).sum(axis=0).tolist()) != [1, 1, 1] or not np.allclose(np.abs(rounded).sum(axis=1), 1):
        return None
    return np.argmax(np.abs(rounded), axis=0)


def canonical_grid(size_xyz: Iterable[int], geometry: Geometry) -> tuple[tuple[int, int, int], Geometry]:
    """The identity-direction grid (size x-y-z, Geometry) covering an oblique grid: per world axis
    the spacing of the image axis most aligned with it, the box around all voxel centres."""
    size = np.asarray(list(size_xyz), dtype=float)
    direction = geometry.direction_matrix
    spacing_in = np.asarray(geometry.spacing, dtype=float)
    spacing = np.array([spacing_in[int(np.argmax(np.abs(direction[j])))] for j in range(3)])
    corners = np.array([[(size[i] - 1) * bit for i, bit in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
    world = (direction @ (corners * spacing_in).T).T + np.asarray(geometry.origin, dtype=float)
    low, high = world.min(axis=0), world.max(axis=0)
    new_size = tuple(int(n) for n in np.floor((high - low) / spacing + 1e-6).astype(int) + 1)
    return new_size, Geometry(tuple(map(float, spacing)), tuple(map(float, low)), _IDENTITY)


def to_canonical(image, labels: bool = False):
    """The SimpleITK image on an identity-direction grid covering the same world points.

    Permuted/flipped axes: voxels reordered exactly (DICOM orient). Oblique: resampled, linear for
    images (outside the input: :data:`OUTSIDE_FOV_HU`), nearest neighbour for ``labels`` (outside: 0).
    """
    import SimpleITK as sitk

    geometry = Geometry.of(image)
    if np.allclose(geometry.direction_matrix, np.eye(3), atol=_AXIS_TOLERANCE):
        out = sitk.Image(image)
        out.SetDirection(_IDENTITY)
        return out
    if _axis_permutation(geometry.direction_matrix) is not None:
        out = sitk.DICOMOrient(image, "LPS")
        out.SetDirection(_IDENTITY)  # exact, not 1e-17 off
        return out
    size, grid = canonical_grid(image.GetSize(), geometry)
    log.info("oblique scan (direction %s): resampled onto the identity-direction grid %s",
             np.round(geometry.direction_matrix, 4).tolist(), size)
    return sitk.Resample(image, [int(s) for s in size], sitk.Transform(),
                         sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                         grid.origin, grid.spacing, grid.direction,
                         0.0 if labels else float(OUTSIDE_FOV_HU), image.GetPixelID())


def read_canonical(path: str | Path) -> CanonicalScan:
    """Read a scan (file or DICOM series folder), check it is HU, bring it to the canonical grid.

    Raises InputError naming the scan for any unreadable, inconsistent or non-HU input."""
    import SimpleITK as sitk

    path = Path(path)
    image = read_sitk(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: expected a 3-D scalar image, got {image.GetDimension()}-D "
                         f"with {image.GetNumberOfComponentsPerPixel()} components")
    source_geometry = Geometry.of(image)
    if not np.all(np.isfinite(source_geometry.spacing)) or min(source_geometry.spacing) <= 0:
        raise InputError(f"{path}: voxel size {source_geometry.spacing} mm is not positive")
    direction = source_geometry.direction_matrix
    if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
        raise InputError(f"{path}: singular or non-orthonormal direction cosines {direction.round(4).tolist()}")
    source_shape = tuple(int(n) for n in image.GetSize()[::-1])
    canonical = to_canonical(image)
    values = sitk.GetArrayFromImage(canonical)
    if values.dtype != np.int16:
        if np.issubdtype(values.dtype, np.floating):
            values = np.rint(values)
        values = np.clip(values, -32768, 32767).astype(np.int16)
    check_hu(values, path)
    return CanonicalScan(values, Geometry.of(canonical), path, source_shape, source_geometry)


def canonical_labels(path: str | Path, scan: CanonicalScan, what: str = "the scan") -> np.ndarray:
    """A label map drawn on the scan's stored grid, brought to its canonical grid (uint8-able
    integer array (z, y, x)). Raises InputError unless the map lies on the scan's stored grid."""
    import SimpleITK as sitk

    image = read_image_file(path)
    check_same_grid(scan.source_shape, scan.source_geometry, image.GetSize()[::-1], Geometry.of(image),
                    path, what=what)
    # the label map's own header may differ from the scan by rounding: give it the scan's grid
    scan.source_geometry.apply_to(image)
    return sitk.GetArrayFromImage(to_canonical(image, labels=True))


def to_source_grid(array_zyx: np.ndarray, geometry: Geometry, scan: CanonicalScan, labels: bool = False,
                   default: float = 0.0) -> np.ndarray:
    """An array on any identity-direction grid (e.g. the resampled 1 mm grid), brought back onto
    the scan's stored grid (``scan.source_shape``/``source_geometry``) for viewers: nearest
    neighbour for ``labels``, linear otherwise; ``default`` outside. Returns (z, y, x) in stored
    order (to be written with ``scan.source_geometry``)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    geometry.apply_to(image)
    target = scan.source_geometry
    out = sitk.Resample(image, [int(n) for n in scan.source_shape[::-1]], sitk.Transform(),
                        sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, target.origin,
                        target.spacing, target.direction, float(default), image.GetPixelID())
    return sitk.GetArrayFromImage(out)
