"""Reading scans in every accepted format into the canonical form (HU, identity direction), on the
real LIDC-IDRI-0001 series, and the bad inputs of real data: each named, no output left."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from noduleflow.io import Geometry, InputError, voxel_to_world, world_to_voxel
from noduleflow.preprocess import resample_scan
from noduleflow.scans import find_scans, read_canonical, to_source_grid
from realct import LIDC_0001_UID, lidc_0001_series

#: the LUNA16 nodule of LIDC-IDRI-0001 (world mm x, y, z; diameter mm)
LUNA_NODULE = (56.20840547, 86.34341278, -115.8675792, 23.35064438)


@pytest.fixture(scope="module")
def lidc_0001():
    return read_canonical(lidc_0001_series())


def _as_image(scan) -> sitk.Image:
    image = sitk.GetImageFromArray(scan.hu)
    scan.geometry.apply_to(image)
    return image


def _same_geometry(a: Geometry, b: Geometry, tol: float = 1e-3) -> bool:
    return all(np.allclose(getattr(a, k), getattr(b, k), rtol=0, atol=tol) for k in ("spacing", "origin", "direction"))


# --------------------------------------------------------------------------- the real scan


def test_lidc_0001_from_dicom_is_hu_on_the_identity_grid(lidc_0001):
    scan = lidc_0001
    assert scan.hu.dtype == np.int16 and scan.hu.shape == (133, 512, 512)
    assert np.allclose(scan.geometry.spacing, (0.703125, 0.703125, 2.5))
    assert scan.geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    # axis 0 runs feet -> head: the first slice is the lowest z (world)
    assert voxel_to_world([0, 0, 0], scan.geometry)[2] < voxel_to_world([132, 0, 0], scan.geometry)[2]
    # HU: padding -2048 outside the reconstruction circle, air near -1000 inside it, soft tissue ~ 0..100
    assert scan.hu.min() == -2048
    corner_inside_circle = scan.hu[66, 256, 20:24]  # left of the body, inside the circle: air
    assert np.all(np.abs(corner_inside_circle.astype(int) + 1000) < 100)
    # the LUNA16 nodule (23 mm, solid) is dense at its centre
    z, y, x = np.rint(world_to_voxel(LUNA_NODULE[:3], scan.geometry)).astype(int)
    assert scan.hu[z, y - 2:y + 3, x - 2:x + 3].mean() > -200


@pytest.mark.parametrize("suffix", [".mhd", ".nii.gz", ".nrrd", ".mha"])
def test_lidc_0001_written_in_another_format_reads_back_the_same(lidc_0001, tmp_path, suffix):
    path = tmp_path / f"{LIDC_0001_UID}{suffix}"
    sitk.WriteImage(_as_image(lidc_0001), str(path))
    again = read_canonical(path)
    assert np.array_equal(again.hu, lidc_0001.hu)
    assert _same_geometry(again.geometry, lidc_0001.geometry)


def test_permuted_and_flipped_axes_give_the_same_canonical_scan(lidc_0001, tmp_path):
    image = _as_image(lidc_0001)
    scrambled = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, True])
    assert scrambled.GetDirection() != image.GetDirection()
    path = tmp_path / "scrambled.nii.gz"
    sitk.WriteImage(scrambled, str(path))
    again = read_canonical(path)
    assert np.array_equal(again.hu, lidc_0001.hu)
    assert _same_geometry(again.geometry, lidc_0001.geometry)
    assert again.source_shape == tuple(scrambled.GetSize()[::-1])
    # and back onto the stored grid (what predict writes for viewers): exactly the stored voxels
    back = to_source_grid(again.hu, again.geometry, again)
    assert np.array_equal(back, sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


def test_an_oblique_scan_keeps_world_positions(tmp_path):
    """A bright ball in a volume with rotated axes lands at the same world point after reading."""
    shape = (40, 60, 60)
    zz, yy, xx = np.indices(shape)
    centre = np.array([20, 25, 35])
    hu = np.where(np.linalg.norm(np.stack([zz, yy, xx], -1) - centre, axis=-1) < 6, 40, -1000).astype(np.int16)
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    geometry = Geometry((1.0, 1.2, 2.0), (10.0, -5.0, 30.0), tuple(rot.ravel()))
    image = sitk.GetImageFromArray(hu)
    geometry.apply_to(image)
    sitk.WriteImage(image, str(tmp_path / "oblique.mha"))
    scan = read_canonical(tmp_path / "oblique.mha")
    assert scan.geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    bright = np.argwhere(scan.hu > -500).mean(axis=0)
    assert np.linalg.norm(voxel_to_world(bright, scan.geometry) - voxel_to_world(centre, geometry)) < 1.0
    assert scan.hu.min() == -2048  # corners outside the rotated volume: outside the field of view


def test_scans_of_every_layout_are_found_and_masks_are_not_scans(lidc_0001, tmp_path):
    root = tmp_path / "data"
    small = sitk.GetImageFromArray(np.full((4, 8, 8), -1000, dtype=np.int16))
    (root / "nifti").mkdir(parents=True)
    sitk.WriteImage(small, str(root / "nifti" / "1.2.3.nii.gz"))
    sitk.WriteImage(small, str(root / "1.2.4.nrrd"))
    sitk.WriteImage(small, str(root / "1.2.5.mha"))
    (root / "masks").mkdir()
    sitk.WriteImage(small, str(root / "masks" / "1.2.5.mha"))
    series = root / "LIDC-IDRI-0001" / "study" / "series"
    _copy_slices(lidc_0001_series(), series, range(60, 64))
    found = find_scans(root, skip_dirs=["masks"])
    assert set(found) == {"1.2.3", "1.2.4", "1.2.5", LIDC_0001_UID}
    assert found[LIDC_0001_UID] == series and found["1.2.5"] == root / "1.2.5.mha"
    sitk.WriteImage(small, str(root / "nifti" / "1.2.4.nii"))
    with pytest.raises(InputError, match=r"1\.2\.4.*also found"):
        find_scans(root, skip_dirs=["masks"])


# --------------------------------------------------------------------------- bad input


def _copy_slices(source: Path, dest: Path, indices, edit=None) -> list[Path]:
    """Rewrite real slices ``indices`` of the series in ``source`` into ``dest`` (int16 HU with an
    identity rescale), applying ``edit(i, image)`` to each before writing."""
    dest.mkdir(parents=True, exist_ok=True)
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(source))
    written = []
    for i in indices:
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[i])
        image = reader.Execute()
        out = sitk.Cast(image, sitk.sitkInt16)
        for key in image.GetMetaDataKeys():
            out.SetMetaData(key, image.GetMetaData(key))
        out.SetMetaData("0028|1052", "0")
        out.SetMetaData("0028|1053", "1")
        if edit is not None:
            out = edit(i, out) or out
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(dest / f"{i:06d}.dcm"))
        writer.Execute(out)
        written.append(dest / f"{i:06d}.dcm")
    return written


def _shift_z(i: int, image, at: int, by: float):
    if i == at:
        x, y, z = (float(v) for v in image.GetMetaData("0020|0032").split("\\"))
        image.SetMetaData("0020|0032", f"{x:f}\\{y:f}\\{z + by:f}")


def _other_series(i: int, image):
    if i >= 62:
        image.SetMetaData("0020|000e", LIDC_0001_UID + ".9")


def _modality_mr(i: int, image):
    image.SetMetaData("0008|0060", "MR")


def _raw_values(i: int, image):
    """Stored values without the rescale: HU + 1024 (air near 0), as a scanner stores them."""
    raw = sitk.Cast(image + 1024, sitk.sitkInt16)
    for key in image.GetMetaDataKeys():
        raw.SetMetaData(key, image.GetMetaData(key))
    return raw


def _bad_dicom(kind: str, dest: Path) -> Path:
    source = lidc_0001_series()
    series = dest / "series"
    if kind == "two series":
        _copy_slices(source, series, range(60, 65), _other_series)
    elif kind == "missing slice":
        _copy_slices(source, series, [60, 61, 63, 64])
    elif kind == "uneven slice spacing":
        _copy_slices(source, series, range(60, 65), lambda i, im: _shift_z(i, im, 63, 1.0))
    elif kind == "not CT":
        _copy_slices(source, series, range(60, 65), _modality_mr)
    elif kind == "not HU":
        _copy_slices(source, series, range(60, 65), _raw_values)
    elif kind == "unreadable file":
        _copy_slices(source, series, range(60, 65))
        (series / "000099.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    return series


BAD_DICOM = {
    "two series": r"2 DICOM series in one folder",
    "missing slice": r"missing slice: 5\.000 mm between 000061\.dcm and 000063\.dcm",
    "uneven slice spacing": r"uneven slice spacing",
    "not CT": r"modality MR, not CT",
    "not HU": r"not Hounsfield units: no air near -1000",
    "unreadable file": r"000099\.dcm: not part of the folder's DICOM series",
}


def _resample_outputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    annotations = tmp_path / "annotations.csv"
    pd.DataFrame(columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]).to_csv(annotations, index=False)
    return annotations, tmp_path / "out" / "image.mha", tmp_path / "out" / "labels.mha"


@pytest.mark.parametrize("kind", list(BAD_DICOM))
def test_bad_dicom_series_is_named_and_leaves_no_output(tmp_path, kind):
    series = _bad_dicom(kind, tmp_path)
    annotations, out_image, out_labels = _resample_outputs(tmp_path)
    with pytest.raises(InputError, match=BAD_DICOM[kind]) as err:
        resample_scan(series, annotations, LIDC_0001_UID, out_image, out_labels)
    assert str(series) in str(err.value)
    assert not out_image.exists() and not out_labels.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_good_slices_of_those_series_read_fine(tmp_path):
    """The bad-input cases above fail for their defect, not for being excerpts of a series."""
    series = _copy_slices(lidc_0001_series(), tmp_path / "series", range(60, 65))[0].parent
    scan = read_canonical(series)
    assert scan.hu.shape == (5, 512, 512)
    whole = read_canonical(lidc_0001_series())
    assert np.array_equal(scan.hu, whole.hu[60:65])


def _nifti_with_singular_affine(path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 6, 6), -1000, dtype=np.int16)), str(path), False)
    header = bytearray(path.read_bytes())
    struct.pack_into("<hh", header, 252, 0, 1)  # qform_code 0, sform_code 1 (scanner)
    for row, values in ((280, (1, 0, 0, 0)), (296, (1, 0, 0, 0)), (312, (0, 0, 0, 0))):
        struct.pack_into("<4f", header, row, *values)  # srow_x == srow_y, srow_z = 0: singular
    path.write_bytes(bytes(header))


@pytest.mark.parametrize("kind,message", [
    ("singular affine", r"singular or non-orthonormal affine"),
    ("unreadable", r"cannot read image"),
    ("not HU", r"not Hounsfield units"),
    ("not a scan", r"not a scan"),
])
def test_bad_image_files_are_named_and_leave_no_output(tmp_path, kind, message):
    if kind == "singular affine":
        path = tmp_path / "scan.nii"
        _nifti_with_singular_affine(path)
    elif kind == "unreadable":
        path = tmp_path / "scan.nii.gz"
        path.write_bytes(b"\x1f\x8b" + b"not really gzip" * 20)
    elif kind == "not HU":
        path = tmp_path / "scan.nrrd"
        values = np.random.default_rng(0).integers(0, 1400, size=(6, 32, 32)).astype(np.uint16)
        sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    else:
        path = tmp_path / "scan.png"
        path.write_bytes(b"\x89PNG")
    annotations, out_image, out_labels = _resample_outputs(tmp_path)
    with pytest.raises(InputError, match=message) as err:
        resample_scan(path, annotations, "1.2.3", out_image, out_labels)
    assert str(path) in str(err.value)
    assert not out_image.exists() and not out_labels.exists()
