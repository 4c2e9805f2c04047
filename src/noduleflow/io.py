"""Files in and out: MetaImage scans, label maps, annotation CSVs, atomic writes, world <-> voxel.

Conventions used everywhere in noduleflow:

* world coordinates are millimetres in ITK/LUNA16 order **(x, y, z)**;
* arrays are numpy **(z, y, x)**; voxel indices returned here are (z, y, x) floats;
* a :class:`Geometry` holds ``spacing`` (mm, x-y-z), ``origin`` (mm, x-y-z, the centre of voxel 0)
  and ``direction`` (row-major 3x3 cosines, as SimpleITK gives them).

This module is the only place that converts between the two orders.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

ANNOTATION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
CANDIDATE_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]

#: MetaImage element types a CT scan may have, with their numpy dtypes.
MET_TYPES = {
    "MET_CHAR": np.int8,
    "MET_UCHAR": np.uint8,
    "MET_SHORT": np.int16,
    "MET_USHORT": np.uint16,
    "MET_INT": np.int32,
    "MET_UINT": np.uint32,
    "MET_FLOAT": np.float32,
    "MET_DOUBLE": np.float64,
}


class InputError(ValueError):
    """A bad input file or value. The message always names the file (or config key) and the problem."""


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffix (``.mha``, ``.h5``, ``.csv``) so writers that pick
    the format from the extension still work. An interrupted or failed write leaves no file
    under the final name and removes the temporary one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # seriesuids are full of dots: only a known double suffix counts as one
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else (path.suffix or ".tmp")
    # The name is chosen before the file exists, so a SIGTERM that lands while the file is being
    # created (the moment it becomes visible) still finds the name in ``finally`` and removes it.
    tmp = path.parent / f".{secrets.token_hex(6)}.part{suffix}"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` only if the block succeeds.

    A folder already at ``path`` is replaced whole. An interrupted or failed block leaves ``path``
    as it was and removes the temporary folder (named before it is created, as in :func:`atomic_path`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.part"
    try:
        tmp.mkdir()
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_csv_atomic(frame: pd.DataFrame, path: str | Path, **kwargs) -> None:
    """Write ``frame`` to CSV (no index) atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, **kwargs)


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid sits in the world. All tuples in ITK order (x, y, z), millimetres."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @classmethod
    def of(cls, image) -> "Geometry":
        """Geometry of a SimpleITK image."""
        return cls(tuple(map(float, image.GetSpacing())), tuple(map(float, image.GetOrigin())),
                   tuple(map(float, image.GetDirection())))

    def apply_to(self, image) -> None:
        """Set spacing, origin and direction of a SimpleITK image in place."""
        image.SetSpacing(tuple(map(float, self.spacing)))
        image.SetOrigin(tuple(map(float, self.origin)))
        image.SetDirection(tuple(map(float, self.direction)))

    def as_attrs(self) -> dict:
        """Plain lists for HDF5 attributes / JSON."""
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_attrs(cls, attrs) -> "Geometry":
        return cls(tuple(float(v) for v in attrs["spacing"]), tuple(float(v) for v in attrs["origin"]),
                   tuple(float(v) for v in attrs["direction"]))


def world_to_voxel(world_xyz: np.ndarray | Sequence, geometry: Geometry) -> np.ndarray:
    """World mm (x, y, z), shape (n, 3) or (3,) -> continuous voxel indices (z, y, x), same shape."""
    world = np.asarray(world_xyz, dtype=float)
    single = world.ndim == 1
    world = np.atleast_2d(world)
    rel = world - np.asarray(geometry.origin, dtype=float)
    # world = origin + D @ (spacing * index)  =>  index = (D^-1 @ rel) / spacing
    index_xyz = np.linalg.solve(geometry.direction_matrix, rel.T).T / np.asarray(geometry.spacing, dtype=float)
    index_zyx = index_xyz[:, ::-1]
    return index_zyx[0] if single else index_zyx


def voxel_to_world(index_zyx: np.ndarray | Sequence, geometry: Geometry) -> np.ndarray:
    """Voxel indices (z, y, x), shape (n, 3) or (3,) -> world mm (x, y, z), same shape."""
    index = np.asarray(index_zyx, dtype=float)
    single = index.ndim == 1
    index = np.atleast_2d(index)
    index_xyz = index[:, ::-1] * np.asarray(geometry.spacing, dtype=float)
    world = (geometry.direction_matrix @ index_xyz.T).T + np.asarray(geometry.origin, dtype=float)
    return world[0] if single else world


# --------------------------------------------------------------------------- MetaImage scans


def read_mhd_header(path: str | Path) -> dict[str, str]:
    """Key/value pairs of a ``.mhd`` header (values as strings). Raises InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: scan header not found")
    header: dict[str, str] = {}
    try:
        text = path.read_text(errors="strict")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a MetaImage text header ({exc})") from exc
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "=" not in line:
            raise InputError(f"{path}: line {line_no} is not 'Key = Value': {line!r}")
        key, value = line.split("=", 1)
        header[key.strip()] = value.strip()
    return header


def validate_mhd(path: str | Path) -> None:
    """Check a ``.mhd``/``.raw`` pair before reading it: 3-D, supported element type, data file
    present and exactly as large as the header says (uncompressed data). Raises InputError."""
    path = Path(path)
    header = read_mhd_header(path)
    ndims = header.get("NDims")
    if ndims is None or ndims.strip() != "3":
        raise InputError(f"{path}: NDims = {ndims!r}, only 3-D scans are supported")
    element_type = header.get("ElementType")
    if element_type not in MET_TYPES:
        raise InputError(f"{path}: unsupported ElementType {element_type!r} "
                         f"(supported: {', '.join(sorted(MET_TYPES))})")
    try:
        dims = [int(v) for v in header.get("DimSize", "").split()]
    except ValueError as exc:
        raise InputError(f"{path}: DimSize {header.get('DimSize')!r} is not three integers") from exc
    if len(dims) != 3 or min(dims) < 1:
        raise InputError(f"{path}: DimSize {header.get('DimSize')!r} is not three positive integers")
    channels = header.get("ElementNumberOfChannels", "1").strip()
    if channels != "1":
        raise InputError(f"{path}: ElementNumberOfChannels = {channels!r}, only scalar scans are supported")
    for key, count, positive in (("ElementSpacing", 3, True), ("ElementSize", 3, True),
                                 ("Offset", 3, False), ("Origin", 3, False), ("Position", 3, False),
                                 ("TransformMatrix", 9, False), ("Orientation", 9, False),
                                 ("Rotation", 9, False)):
        if key in header:
            _check_numbers(path, key, header[key], count, positive)
    data_file = header.get("ElementDataFile")
    if not data_file:
        raise InputError(f"{path}: header has no ElementDataFile")
    if data_file.upper() == "LOCAL":
        return
    raw = path.parent / data_file
    if not raw.is_file():
        raise InputError(f"{path}: data file {raw} is missing")
    compressed = header.get("CompressedData", "False").lower() == "true"
    try:
        header_size = int(header.get("HeaderSize", "0"))
    except ValueError as exc:
        raise InputError(f"{path}: HeaderSize {header.get('HeaderSize')!r} is not an integer") from exc
    if not compressed:
        expected = int(np.prod(dims)) * np.dtype(MET_TYPES[element_type]).itemsize
        actual = raw.stat().st_size
        if header_size == -1:  # "skip to the last <expected> bytes": any leading header is fine
            if actual < expected:
                raise InputError(f"{raw}: truncated data file: {actual} bytes, header {path.name} "
                                 f"expects at least {expected} ({'x'.join(map(str, dims))} {element_type})")
            return
        expected += max(header_size, 0)
        if actual != expected:
            raise InputError(f"{raw}: truncated or oversized data file: {actual} bytes, header "
                             f"{path.name} expects {expected} ({'x'.join(map(str, dims))} {element_type})")


def _check_numbers(path: Path, key: str, value: str, count: int, positive: bool) -> None:
    """A header field must hold ``count`` finite numbers (all > 0 when ``positive``)."""
    try:
        numbers = [float(v) for v in value.split()]
    except ValueError as exc:
        raise InputError(f"{path}: {key} = {value!r} is not {count} numbers") from exc
    if len(numbers) != count or not all(np.isfinite(numbers)):
        raise InputError(f"{path}: {key} = {value!r} is not {count} finite numbers")
    if positive and min(numbers) <= 0:
        raise InputError(f"{path}: {key} = {value!r} must be positive (voxel size in mm)")


def read_image(path: str | Path, dtype=None) -> tuple[np.ndarray, Geometry]:
    """Read any ITK image (``.mha``, ``.mhd``, ``.nii.gz``) -> (array (z, y, x), Geometry).

    A ``.mhd`` is validated first (see :func:`validate_mhd`). ``dtype`` casts the array.
    """
    import SimpleITK as sitk

    path = Path(path)
    if path.suffix.lower() == ".mhd":
        validate_mhd(path)
    elif not path.is_file():
        raise InputError(f"{path}: image not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read image: {str(exc).strip().splitlines()[-1]}") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: expected a 3-D scalar image, got {image.GetDimension()}-D "
                         f"with {image.GetNumberOfComponentsPerPixel()} components")
    array = sitk.GetArrayFromImage(image)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return array, Geometry.of(image)


def read_scan(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a CT scan -> (int16 HU array (z, y, x), Geometry). Values outside int16 are clipped."""
    array, geometry = read_image(path)
    if array.dtype != np.int16:
        array = np.clip(np.rint(array), -32768, 32767).astype(np.int16)
    return array, geometry


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path, compress: bool = True,
                compression_level: int = -1) -> None:
    """Write array (z, y, x) with ``geometry`` as an ITK image, atomically (``.mha``/``.mhd``).

    ``compression_level`` (zlib, 1 fastest .. 9 smallest; -1 the library default, 6) applies when
    ``compress``: level 1 writes a full-size int16 CT about 4x faster than the default and only
    ~1.5x larger.
    """
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.apply_to(image)
    path = Path(path)
    if path.suffix.lower() == ".mhd":
        # a header + .raw pair: write both under temporary names, then rename the data first
        # (the inner context exits first), so a header never points at a missing data file
        raw = path.with_suffix(".raw")
        with atomic_path(path) as tmp_mhd, atomic_path(raw) as tmp_raw:
            tmp_base = tmp_mhd.with_name(tmp_mhd.name[: -len(".mhd")])
            sitk.WriteImage(image, str(tmp_base) + ".mhd", False)
            os.replace(str(tmp_base) + ".raw", tmp_raw)
            text = Path(str(tmp_base) + ".mhd").read_text(encoding="utf-8")
            lines = [f"ElementDataFile = {raw.name}" if ln.startswith("ElementDataFile") else ln
                     for ln in text.splitlines()]
            tmp_mhd.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress, int(compression_level))


def check_same_grid(shape_a: Sequence[int], geometry_a: Geometry, shape_b: Sequence[int],
                    geometry_b: Geometry, path_b: str | Path, what: str = "the scan",
                    tolerance_mm: float = 1e-3) -> None:
    """Raise InputError naming ``path_b`` unless image b lies on the same voxel grid as image a
    (same array shape (z, y, x), spacing, origin and direction within ``tolerance_mm``)."""
    if tuple(shape_a) != tuple(shape_b):
        raise InputError(f"{path_b}: size {'x'.join(map(str, shape_b))} (z,y,x) differs from {what} "
                         f"({'x'.join(map(str, shape_a))})")
    for name in ("spacing", "origin", "direction"):
        a = np.asarray(getattr(geometry_a, name), dtype=float)
        b = np.asarray(getattr(geometry_b, name), dtype=float)
        if not np.allclose(a, b, rtol=0, atol=tolerance_mm):
            raise InputError(f"{path_b}: {name} {tuple(np.round(b, 4))} differs from {what} "
                             f"{tuple(np.round(a, 4))}")


# --------------------------------------------------------------------------- CSVs


def read_annotations(path: str | Path, allow_unknown_diameter: bool = False) -> pd.DataFrame:
    """Read a LUNA16 annotation CSV (``seriesuid,coordX,coordY,coordZ,diameter_mm``; world mm).

    Raises InputError naming the file for: a missing file, missing columns, non-numeric or missing
    coordinates, non-positive diameters (``allow_unknown_diameter`` lets -1 through, which
    ``annotations_excluded.csv`` uses for "unknown"). Row order is preserved: a nodule's label id
    is its order among its scan's rows, starting at 1.
    """
    return _read_table(path, ANNOTATION_COLUMNS, "diameter_mm", allow_unknown_diameter)


def read_candidates(path: str | Path) -> pd.DataFrame:
    """Read a LUNA16 submission CSV (``seriesuid,coordX,coordY,coordZ,probability``, extra columns ok)."""
    return _read_table(path, CANDIDATE_COLUMNS, None, False)


def read_uid_table(path: str | Path, columns: Sequence[str], not_found: str = "file not found") -> pd.DataFrame:
    """A CSV with a ``seriesuid`` column and at least ``columns``; ``seriesuid`` as stripped strings.

    InputError naming the file when it is missing (``"{path}: {not_found}"``), malformed (a row with
    more fields than the header included), lacks one of ``columns`` or has an empty seriesuid (its
    line number)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {not_found}")
    try:
        # index_col=False: rows with more fields than the header must not silently shift the
        # columns (pandas would otherwise turn the first fields into an index)
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(path, dtype={"seriesuid": str}, index_col=False)
    except (pd.errors.ParserError, pd.errors.ParserWarning, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: malformed CSV: {str(exc).strip()}") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; expected header "
                         f"{','.join(columns)} (found {','.join(map(str, frame.columns))})")
    if frame["seriesuid"].isna().any():
        row = int(np.flatnonzero(frame["seriesuid"].isna().to_numpy())[0]) + 2
        raise InputError(f"{path}: line {row}: empty seriesuid")
    frame["seriesuid"] = frame["seriesuid"].str.strip()
    return frame


def _read_table(path: str | Path, columns: list[str], diameter: str | None, allow_unknown: bool) -> pd.DataFrame:
    path = Path(path)
    frame = read_uid_table(path, columns)
    for column in columns[1:]:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{path}: line {row + 2}: {column} = {frame[column].iloc[row]!r} is not a number")
        frame[column] = values.astype(float)
    if diameter is not None:
        d = frame[diameter].to_numpy()
        bad = (d <= 0) & ~((d == -1) if allow_unknown else np.zeros_like(d, dtype=bool))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(f"{path}: line {row + 2}: diameter_mm = {d[row]} must be positive "
                             f"(seriesuid {frame['seriesuid'].iloc[row]})")
    frame["seriesuid"] = frame["seriesuid"].str.strip()
    return frame


def read_uid_list(value: str | Path | Sequence[str] | None) -> list[str] | None:
    """A list of seriesuids from a list, or from a file with one uid per line or a ``seriesuid``
    column (CSV). ``None`` stays ``None`` (no restriction)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    path = Path(value)
    if not path.is_file():
        raise InputError(f"{path}: seriesuid list not found")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if lines and "seriesuid" in lines[0].split(","):
        frame = pd.read_csv(path, dtype={"seriesuid": str})
        return frame["seriesuid"].str.strip().tolist()
    return [ln.split(",")[0] for ln in lines]


# --------------------------------------------------------------------------- HDF5


def open_h5(path: str | Path, mode: str = "r"):
    """Open an HDF5 file; readers open without file locking (cluster file systems)."""
    import h5py

    path = Path(path)
    if mode == "r":
        if not path.is_file():
            raise InputError(f"{path}: HDF5 file not found")
        return h5py.File(path, "r", locking=False)
    return h5py.File(path, mode)
