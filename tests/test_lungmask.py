"""noduleflow.lungmask: classical lung mask — close to the true lungs, every nodule inside, no airways."""

import inspect

import numpy as np
import pytest
import yaml

from noduleflow.io import read_image, write_image
from noduleflow.lungmask import closing_additions, lung_mask_file, nodule_concavities, segment_lungs
from noduleflow.preprocess import resample_image, resample_labels, resample_scan
from phantom import SYNTHETIC_SCANS, cached_phantom, write_synthetic

#: a chest slab with a realistic field of view: 250 mm, 1.3 x 1.3 x 2.5 mm voxels, 100 mm tall
PHANTOM = dict(shape_zyx=(40, 192, 192), spacing_xyz=(1.3, 1.3, 2.5), origin_xyz=(-120.0, -80.5, -412.5),
               z_supersample=2)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def resampled():
    """The phantom resampled to 1 mm: (image, true lung, nodule labels, geometry, phantom)."""
    ph = cached_phantom(**PHANTOM)
    image, geometry = resample_image(ph.image, ph.geometry, (1.0, 1.0, 1.0))
    lung = resample_labels(ph.lung, ph.geometry, image.shape, geometry, 1)
    nodules = resample_labels(ph.labels, ph.geometry, image.shape, geometry, len(ph.nodules))
    return image, lung, nodules, geometry, ph


@pytest.fixture(scope="module")
def mask(resampled):
    image, _, _, geometry, _ = resampled
    return segment_lungs(image, geometry.spacing)


def test_mask_matches_the_true_lungs(resampled, mask):
    _, lung, _, _, _ = resampled
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert dice(mask, lung) >= 0.95


def test_every_nodule_stays_inside_including_juxta_pleural(resampled, mask):
    _, _, nodules, _, ph = resampled
    assert "juxta_pleural" in ph.kinds
    for label, kind in enumerate(ph.kinds, start=1):
        voxels = nodules == label
        assert voxels.any()
        assert np.mean(mask[voxels] > 0) >= 0.97, kind


def test_trachea_is_not_lung_and_the_lungs_are_not_bridged(resampled, mask):
    image, lung, _, geometry, _ = resampled
    nz, ny, nx = image.shape
    # the trachea: a central air column in the top slices (above the carina)
    top = slice(int(0.85 * nz), nz)
    trachea = (image[top] < -900) & ~(lung[top] > 0)
    trachea[:, :, : nx // 2 - 20] = False
    trachea[:, :, nx // 2 + 20:] = False
    assert trachea.sum() > 500
    assert np.mean(mask[top][trachea] > 0) < 0.05
    # the mediastinum between the lungs, at mid height, stays outside
    mid = int(0.4 * nz)
    column = mask[mid, ny // 2 - 5: ny // 2 + 5, nx // 2 - 2: nx // 2 + 3]
    assert not column.any()


def test_distances_are_in_mm_not_voxels(resampled):
    """The same lungs segmented on the original anisotropic grid agree with the truth too."""
    _, _, _, _, ph = resampled
    mask = segment_lungs(ph.image, ph.geometry.spacing)
    assert dice(mask, ph.lung) >= 0.93
    for label in range(1, len(ph.nodules) + 1):
        assert np.mean(mask[ph.labels == label] > 0) >= 0.9


def test_closing_fills_a_dent_but_not_a_flat_wall():
    spacing = (1.0, 1.0, 1.0)
    block = np.zeros((40, 60, 60), bool)
    block[5:35, 10:50, 10:50] = True
    assert not closing_additions(block, spacing, 12.0).any()           # a box is already closed
    for start in (15, 16):  # both alignments with the coarse grid
        dented = block.copy()
        bump = (slice(start, start + 10), slice(start + 10, start + 20), slice(10, 16))
        dented[bump] = False                       # a 10 x 10 x 6 mm bump of the wall into the lung
        added = closing_additions(dented, spacing, 12.0, margin_mm=3.0)
        assert added[bump].mean() > 0.95
        assert added.sum() - added[bump].sum() < 0.2 * added[bump].size   # nothing far from it


def test_no_lungs_gives_an_empty_mask():
    body = np.full((20, 40, 40), 40, np.int16)
    body[:, :, :3] = -1000
    assert not segment_lungs(body, (1.0, 1.0, 1.0)).any()


def test_lung_mask_file_writes_a_mask_on_the_same_grid(resampled, tmp_path):
    image, lung, _, geometry, _ = resampled
    write_image(image, geometry, tmp_path / "scan.mha")
    out = tmp_path / "lungmask" / "scan.mha"
    lung_mask_file(tmp_path / "scan.mha", out)
    written, g = read_image(out)
    assert written.dtype == np.uint8 and written.shape == image.shape and g == geometry
    assert dice(written, lung) >= 0.95
    assert sorted(p.name for p in out.parent.iterdir()) == ["scan.mha"]


def test_config_block_matches_the_function(repo_root):
    """Every key under lungmask: in config.yaml is a parameter of lung_mask_file and vice versa."""
    config = yaml.safe_load((repo_root / "config.yaml").read_text())["lungmask"]
    schema = yaml.safe_load((repo_root / "workflow" / "schemas" / "config.schema.yaml").read_text())
    params = set(inspect.signature(lung_mask_file).parameters) - {"image_path", "out_mask"}
    assert set(config) == params == set(schema["properties"]["lungmask"]["properties"])
    for key, value in config.items():
        assert inspect.signature(lung_mask_file).parameters[key].default == value, key


def test_large_closing_fills_a_nodule_sized_dent_but_not_a_big_concavity():
    spacing = (1.0, 1.0, 1.0)
    zz, yy, xx = np.mgrid[:70, :90, :90]
    lung = (zz >= 5) & (zz < 65) & (xx >= 10) & (xx < 80) & (yy >= 10) & (yy < 80)
    nodule = (zz - 35) ** 2 + (yy - 45) ** 2 + (xx - 14) ** 2 <= 12 ** 2       # 24 mm, sunk into a wall
    heart = (zz - 35) ** 2 + (yy - 45) ** 2 + (xx - 125) ** 2 <= 60 ** 2      # a wide dent (35 ml) opposite
    mask = lung & ~nodule & ~heart
    added = nodule_concavities(mask, spacing, radius_mm=40, max_ml=25, margin_mm=5)
    assert added[nodule & lung].mean() > 0.97
    assert added[heart & lung].mean() < 0.05


# --------------------------------------------------------------------------- the synthetic cohort

@pytest.mark.parametrize("index", range(SYNTHETIC_SCANS))
def test_synthetic_scans_lung_dice_and_every_nodule_inside(index, tmp_path):
    """Scan -> resample (1 mm) -> lung mask, against the cohort's true lung mask (lungs/{uid}.mha)."""
    files = write_synthetic(index, tmp_path / "synthetic")
    out = tmp_path / "results"
    resample_scan(files["scan"], files["annotations"], files["uid"], out / "resampled" / "s.mha",
                  out / "resampled" / "s_nodules.mha", mask_path=files["mask"])
    mask = lung_mask_file(out / "resampled" / "s.mha", out / "lungmask" / "s.mha")
    image, geometry = read_image(out / "resampled" / "s.mha")
    truth, truth_geometry = read_image(files["lungs"])
    truth = resample_labels(truth, truth_geometry, image.shape, geometry, 1)
    assert dice(mask, truth) >= 0.95
    nodules, _ = read_image(out / "resampled" / "s_nodules.mha")
    for label, location in enumerate(files["locations"], start=1):
        assert np.mean(mask[nodules == label] > 0) >= 0.97, (label, location)


def test_synthetic_test_scans_include_juxta_pleural_nodules():
    from phantom import cached_synthetic_scan

    locations = [n.location for i in range(SYNTHETIC_SCANS) for n in cached_synthetic_scan(i)[1].nodules]
    assert locations.count("juxta_pleural") >= 3
