"""noduleflow.preprocess.resample_scan: geometry, labels in world coordinates, strict inputs."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from noduleflow.io import Geometry, InputError, read_image, voxel_to_world, write_image
from noduleflow.preprocess import resample_image, resample_scan, target_geometry
from phantom import SYNTHETIC_SCANS, cached_phantom, write_phantom, write_synthetic


@pytest.fixture(scope="module")
def phantom():
    return cached_phantom()


@pytest.fixture()
def files(phantom, tmp_path):
    return write_phantom(phantom, tmp_path / "data")


def _centroids_world(labels: np.ndarray, geometry: Geometry, n: int) -> np.ndarray:
    centres = ndi.center_of_mass(np.ones_like(labels), labels, range(1, n + 1))
    return voxel_to_world(np.asarray(centres), geometry)


def _outputs(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    return out / "scan.mha", out / "scan_nodules.mha"


@pytest.mark.parametrize("use_mask", [True, False], ids=["exact_mask", "spheres"])
def test_annotation_centres_land_on_their_nodules(phantom, files, tmp_path, use_mask):
    """After resampling to 1 mm, each nodule's label centroid is within 1 mm of its annotation
    (scan with non-zero origin, 0.8 x 0.8 x 2.5 mm voxels)."""
    assert min(phantom.geometry.origin) < 0 and len(set(phantom.geometry.spacing)) == 2
    out_image, out_labels = _outputs(tmp_path)
    summary = resample_scan(files["scan"], files["annotations"], phantom.uid, out_image, out_labels,
                            mask_path=files["mask"] if use_mask else None)
    labels, geometry = read_image(out_labels)
    assert labels.dtype == np.uint8 and geometry.spacing == (1.0, 1.0, 1.0)
    n = len(phantom.nodules)
    assert summary["n_nodules"] == n and sorted(np.unique(labels)) == list(range(n + 1))
    centroids = _centroids_world(labels, geometry, n)
    annotated = phantom.nodules[["coordX", "coordY", "coordZ"]].to_numpy()
    assert np.linalg.norm(centroids - annotated, axis=1).max() < 1.0
    # volumes agree with the annotated diameters (within a voxel layer)
    for i, d in enumerate(phantom.nodules["diameter_mm"], start=1):
        volume = np.sum(labels == i)
        ball = np.pi / 6 * d ** 3
        assert 0.5 * ball < volume < 1.6 * ball, (i, volume, ball)


def test_resampled_image_keeps_origin_extent_and_hu(phantom, files, tmp_path):
    out_image, out_labels = _outputs(tmp_path)
    resample_scan(files["scan"], files["annotations"], phantom.uid, out_image, out_labels,
                  spacing_mm=(1.0, 1.0, 1.25))
    image, geometry = read_image(out_image)
    assert image.dtype == np.int16
    assert geometry.origin == phantom.geometry.origin and geometry.spacing == (1.0, 1.0, 1.25)
    nz, ny, nx = phantom.image.shape
    sx, sy, sz = phantom.geometry.spacing
    assert image.shape == (round(nz * sz / 1.25), round(ny * sy), round(nx * sx))
    assert read_image(out_labels)[0].shape == image.shape
    # HU are kept: parenchyma about -850, soft tissue about 0
    assert abs(np.median(image[(image > -950) & (image < -700)]) + 850) < 15
    assert abs(np.median(image[(image > -60) & (image < 60)])) < 15


def test_linear_resampling_is_exact_on_a_ramp():
    """Linear interpolation reproduces a linear ramp at the new voxel centres (to the HU)."""
    geometry = Geometry((0.7, 0.7, 2.5), (-50.0, 20.0, -300.0))
    z = np.arange(16) * 2.5
    ramp = np.broadcast_to((z * 10.0)[:, None, None], (16, 8, 8)).astype(np.int16)
    out, new_geometry = resample_image(ramp, geometry, (1.0, 1.0, 1.0))
    shape, _ = target_geometry(ramp.shape, geometry, (1.0, 1.0, 1.0))
    assert out.shape == shape == (40, 6, 6)
    new_z = np.arange(out.shape[0]) * 1.0
    expected = np.rint(np.minimum(new_z, z[-1]) * 10.0)   # beyond the last slice: nearest value
    assert np.array_equal(out[:, 3, 3], expected.astype(np.int16))
    assert new_geometry.origin == geometry.origin


def test_rows_of_other_scans_are_ignored_and_ids_follow_row_order(phantom, files, tmp_path):
    rows = phantom.nodules
    other = rows.assign(seriesuid="9.9.9", coordX=rows["coordX"] + 1000)     # would be outside the scan
    mixed = pd.concat([other.iloc[:1], rows.iloc[[2]], other.iloc[1:], rows.iloc[[0, 1]]])
    table = files["annotations"].with_name("all.csv")
    mixed.to_csv(table, index=False)
    out_image, out_labels = _outputs(tmp_path)
    resample_scan(files["scan"], table, phantom.uid, out_image, out_labels)
    labels, geometry = read_image(out_labels)
    centroids = _centroids_world(labels, geometry, 3)
    expected = rows.iloc[[2, 0, 1]][["coordX", "coordY", "coordZ"]].to_numpy()
    assert np.linalg.norm(centroids - expected, axis=1).max() < 1.0


def test_scan_without_nodules_gets_an_empty_label_map(phantom, files, tmp_path):
    table = files["annotations"].with_name("none.csv")
    phantom.nodules.iloc[:0].to_csv(table, index=False)
    out_image, out_labels = _outputs(tmp_path)
    summary = resample_scan(files["scan"], table, phantom.uid, out_image, out_labels)
    assert summary["n_nodules"] == 0 and not read_image(out_labels)[0].any()


def test_sphere_min_hu_keeps_only_bright_voxels(phantom, files, tmp_path):
    out_image, out_labels = _outputs(tmp_path)
    resample_scan(files["scan"], files["annotations"], phantom.uid, out_image, out_labels, sphere_min_hu=-300)
    labels, _ = read_image(out_labels)
    image, _ = read_image(out_image)
    assert labels.any() and image[labels > 0].min() > -300
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_small_nodule_survives_thick_slices(tmp_path):
    """A 3 mm nodule on 2.5 mm slices keeps its label (never lost by resampling)."""
    geometry = Geometry((0.8, 0.8, 2.5), (-10.0, -10.0, -100.0))
    mask = np.zeros((12, 30, 30), np.uint8)
    mask[5, 14:16, 14:16] = 1                     # 1.6 x 1.6 x 2.5 mm
    image = np.where(mask > 0, 30, -850).astype(np.int16)
    write_image(image, geometry, tmp_path / "s.mhd")
    write_image(mask, geometry, tmp_path / "m.mha")
    centre = voxel_to_world([5, 14.5, 14.5], geometry)
    pd.DataFrame({"seriesuid": ["s"], "coordX": [centre[0]], "coordY": [centre[1]], "coordZ": [centre[2]],
                  "diameter_mm": [3.0]}).to_csv(tmp_path / "a.csv", index=False)
    resample_scan(tmp_path / "s.mhd", tmp_path / "a.csv", "s", tmp_path / "o.mha", tmp_path / "on.mha",
                  mask_path=tmp_path / "m.mha", spacing_mm=(2.0, 2.0, 2.0))
    labels, g = read_image(tmp_path / "on.mha")
    assert labels.max() == 1
    assert np.linalg.norm(_centroids_world(labels, g, 1)[0] - centre) < 1.5


# --------------------------------------------------------------------------- bad input


def _truncate_raw(files):
    raw = files["scan"].with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:1000])
    return raw.name, "truncated"


def _delete_raw(files):
    files["scan"].with_suffix(".raw").unlink()
    return files["scan"].name, "missing"


def _element_type(files):
    header = files["scan"]
    header.write_text(header.read_text(encoding="utf-8").replace("MET_SHORT", "MET_COMPLEX"))
    return header.name, "unsupported ElementType"


def _two_d(files):
    header = files["scan"]
    header.write_text(header.read_text(encoding="utf-8").replace("NDims = 3", "NDims = 2"))
    return header.name, "only 3-D"


def _centre_outside(files):
    table = pd.read_csv(files["annotations"], dtype={"seriesuid": str})
    table.loc[1, "coordZ"] = table["coordZ"].max() + 500.0
    table.to_csv(files["annotations"], index=False)
    return files["annotations"].name, r"nodule 2 of seriesuid 1\.2\.3\.4 at world .* lies outside"


def _zero_diameter(files):
    table = pd.read_csv(files["annotations"], dtype={"seriesuid": str})
    table.loc[0, "diameter_mm"] = 0.0
    table.to_csv(files["annotations"], index=False)
    return files["annotations"].name, "must be positive"


def _malformed_csv(files):
    with open(files["annotations"], "a") as handle:
        handle.write('1.2.3.4,1,2,"3\n')
    return files["annotations"].name, "malformed CSV"


def _mask_other_grid(files):
    labels, geometry = read_image(files["mask"])
    write_image(labels[:-1], geometry, files["mask"])
    return files["mask"].name, "differs from scan"


def _mask_extra_label(files):
    labels, geometry = read_image(files["mask"])
    labels[0, 0, 0] = 7
    write_image(labels, geometry, files["mask"])
    return files["mask"].name, "label 7 but the annotations list 3"


BREAKERS = [_truncate_raw, _delete_raw, _element_type, _two_d, _centre_outside, _zero_diameter,
            _malformed_csv, _mask_other_grid, _mask_extra_label]


@pytest.mark.parametrize("breaker", BREAKERS, ids=[b.__name__.strip("_") for b in BREAKERS])
def test_bad_input_fails_naming_the_file_and_writes_nothing(phantom, files, tmp_path, breaker):
    name, message = breaker(files)
    out_image, out_labels = _outputs(tmp_path)
    out_image.parent.mkdir()
    with pytest.raises(InputError, match=message) as info:
        resample_scan(files["scan"], files["annotations"], phantom.uid, out_image, out_labels,
                      mask_path=files["mask"])
    assert name in str(info.value)
    assert list(out_image.parent.iterdir()) == []      # no output, no temporary file


def test_bad_spacing_is_rejected(phantom, files, tmp_path):
    out_image, out_labels = _outputs(tmp_path)
    with pytest.raises(InputError, match="spacing_mm"):
        resample_scan(files["scan"], files["annotations"], phantom.uid, out_image, out_labels,
                      spacing_mm=(1.0, 0.0, 1.0))
    assert not out_image.exists() and not out_labels.exists()


@pytest.mark.parametrize("use_mask", [True, False], ids=["exact_mask", "spheres"])
@pytest.mark.parametrize("index", range(SYNTHETIC_SCANS))
def test_synthetic_annotations_land_on_their_nodules(index, use_mask, tmp_path):
    """The synthetic cohort (lobulated nodules, 2-2.5 mm slices, non-zero origins): every
    annotated centre lies within 1 mm of its nodule's centroid after resampling to 1 mm."""
    files = write_synthetic(index, tmp_path / "synthetic")
    rows = pd.read_csv(files["annotations"])
    out_image, out_labels = _outputs(tmp_path)
    resample_scan(files["scan"], files["annotations"], files["uid"], out_image, out_labels,
                  mask_path=files["mask"] if use_mask else None)
    labels, geometry = read_image(out_labels)
    centroids = _centroids_world(labels, geometry, len(rows))
    assert np.linalg.norm(centroids - rows[["coordX", "coordY", "coordZ"]].to_numpy(), axis=1).max() < 1.0
