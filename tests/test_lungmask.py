"""noduleflow.lungmask: classical lung mask — close to the true lungs, every nodule inside, no airways."""

import inspect

import numpy as np
import pytest
import yaml
from scipy import ndimage as ndi

from noduleflow.io import Geometry, read_image, world_to_voxel, write_image
from noduleflow.lungmask import (closing_additions, find_airways, lung_mask_file, nodule_concavities,
                                 outside_fov, segment_lungs, superior_is_last)
from noduleflow.slices import nodule_inside_share
from noduleflow.preprocess import resample_image, resample_labels, resample_scan
from phantom import SYNTHETIC_SCANS, cached_phantom, write_synthetic
from realct import realct_root

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
    config = yaml.safe_load((repo_root / "config.yaml").read_text(encoding="utf-8"))["lungmask"]
    schema = yaml.safe_load((repo_root / "workflow" / "schemas" / "config.schema.yaml").read_text(encoding="utf-8"))
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


# --------------------------------------------------------------------------- what real CT has

#: world mm (x, y, z) of the real-CT phantom: body, lungs, trachea, bowel gas, table, field of view
BODY_AXES = (110.0, 80.0)                                       # elliptic cylinder, centre (0, 0)
LUNG_CENTRES, LUNG_AXES = ((-55.0, 0.0, 125.0), (55.0, 0.0, 125.0)), (40.0, 55.0, 50.0)   # 2 x 461 ml
TRACHEA = (0.0, -15.0, 8.0, 150.0)                              # x, y, radius, from z up to the top
BOWEL_CENTRE, BOWEL_AXES = (-5.0, -10.0, 33.0), (55.0, 50.0, 28.0)   # 323 ml of gas below the lungs
TABLE_Y, TABLE_CORE_Y = (92.0, 104.0), (95.0, 101.0)            # under the back, hollow
FOV_CENTRE, FOV_RADIUS = (-30.0, 0.0), 108.0                    # cuts 17 mm off the right-hand lung


def _real_ct_parts(x: np.ndarray, y: np.ndarray, z: np.ndarray, circle: bool = True,
                   joined: bool = False) -> dict[str, np.ndarray]:
    """Boolean parts of the real-CT phantom at world mm x, y, z (broadcastable). ``joined``: the
    lungs touch in front of the heart (anterior junction) and the back lies on the table."""
    parts = {"body": (x / BODY_AXES[0]) ** 2 + (y / BODY_AXES[1]) ** 2 <= 1}
    for i, centre in enumerate(LUNG_CENTRES):
        parts[f"lung{i}"] = sum(((c - m) / a) ** 2 for c, m, a in zip((x, y, z), centre, LUNG_AXES)) <= 1
    if joined:
        bridge = (np.abs(x) <= 25) & (np.abs(y + 40) <= 6) & (np.abs(z - 125) <= 15)
        parts["lung0"] = parts["lung0"] | (bridge & (x < 0))
        parts["lung1"] = parts["lung1"] | (bridge & (x >= 0))
        parts["body"] = parts["body"] | ((np.abs(x) <= 60) & (y > 0) & (y < TABLE_Y[0] + 1))
    tx, ty, tr, tz = TRACHEA
    parts["trachea"] = ((x - tx) ** 2 + (y - ty) ** 2 <= tr ** 2) & (z >= tz)
    parts["bowel"] = sum(((c - m) / a) ** 2 for c, m, a in zip((x, y, z), BOWEL_CENTRE, BOWEL_AXES)) <= 1
    parts["table"] = (y >= TABLE_Y[0]) & (y <= TABLE_Y[1]) & (np.abs(x) <= 125) & (z > -np.inf)
    parts["table_core"] = (y >= TABLE_CORE_Y[0]) & (y <= TABLE_CORE_Y[1]) & (np.abs(x) <= 115) & (z > -np.inf)
    inside = (x - FOV_CENTRE[0]) ** 2 + (y - FOV_CENTRE[1]) ** 2 <= FOV_RADIUS ** 2
    parts["fov"] = inside if circle else np.ones_like(inside)
    return parts


def real_ct_phantom(circle: bool = True, joined: bool = False, spacing_xyz=(0.75, 0.75, 2.5),
                    seed: int = 0) -> tuple[np.ndarray, Geometry]:
    """A chest with what real CT has and the synthetic cohort does not: -2048 HU padding outside a
    reconstruction circle that cuts through the right-hand lung, bowel gas below the lungs as large
    as a lung, a hollow table under the back. Scanned at ``spacing_xyz`` (mm), int16 HU (z, y, x),
    280 x 240 x 180 mm with the body axis at x = y = 0; z from 0 mm (abdomen) to 180 mm (neck)."""
    sx, sy, sz = spacing_xyz
    x = -140 + (np.arange(int(280 / sx)) + 0.5) * sx
    y = -120 + (np.arange(int(240 / sy)) + 0.5) * sy
    z = (np.arange(int(180 / sz)) + 0.5) * sz
    p = _real_ct_parts(x[None, None, :], y[None, :, None], z[:, None, None], circle, joined)
    shape = (z.size, y.size, x.size)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[np.broadcast_to(p["body"], shape)] = 40
    hu[np.broadcast_to(p["table"], shape)] = 300
    hu[np.broadcast_to(p["table_core"], shape)] = -1000
    for part, value in (("lung0", -850), ("lung1", -850), ("trachea", -1000), ("bowel", -1000)):
        hu[np.broadcast_to(p[part], shape)] = value
    hu += np.random.default_rng(seed).normal(0, 15, shape).astype(np.float32)
    hu[~np.broadcast_to(p["fov"], shape)] = -2048
    return np.rint(hu).astype(np.int16), Geometry(tuple(spacing_xyz), (float(x[0]), float(y[0]), float(z[0])))


def parts_on_grid(shape: tuple[int, int, int], geometry: Geometry, circle: bool = True,
                  joined: bool = False) -> dict[str, np.ndarray]:
    """The phantom's parts on a (resampled) grid, full (z, y, x) boolean arrays."""
    (ox, oy, oz), (sx, sy, sz) = geometry.origin, geometry.spacing
    x, y, z = (o + np.arange(n) * s for o, n, s in zip((ox, oy, oz), shape[::-1], (sx, sy, sz)))
    parts = _real_ct_parts(x[None, None, :], y[None, :, None], z[:, None, None], circle, joined)
    return {k: np.broadcast_to(v, shape) for k, v in parts.items()}


@pytest.fixture(scope="module")
def real_ct_like():
    """The phantom scanned at 0.75 x 0.75 x 2.5 mm, resampled to 1.5 mm as the pipeline does:
    (image, geometry, parts, mask)."""
    image, geometry = resample_image(*real_ct_phantom(), (1.5, 1.5, 1.5))
    parts = parts_on_grid(image.shape, geometry)
    return image, geometry, parts, segment_lungs(image, geometry.spacing)


def test_a_lung_touching_the_reconstruction_circle_is_kept(real_ct_like):
    """Padding outside the circle is outside the field of view, not air joining the lung to the
    air around the body (the old rule dropped every air component touching a side face)."""
    image, _, parts, mask = real_ct_like
    for name in ("lung0", "lung1"):
        lung = parts[name] & parts["fov"]
        assert np.mean(mask[lung] > 0) >= 0.95, name
    cut = parts["lung1"] & ~parts["fov"]
    assert cut.any() and np.mean(image[cut] < -1500) == 1.0    # the circle cuts that lung
    assert dice(mask, (parts["lung0"] | parts["lung1"]) & parts["fov"]) >= 0.95


def test_bowel_gas_as_large_as_a_lung_is_not_lung(real_ct_like):
    _, geometry, parts, mask = real_ct_like
    assert parts["bowel"].sum() * np.prod(geometry.spacing) / 1000 > 300
    assert not mask[parts["bowel"]].any()
    assert np.mean(mask[parts["trachea"]] > 0) < 0.05


def test_the_table_and_the_air_around_the_body_are_never_inside(real_ct_like):
    _, _, parts, mask = real_ct_like
    assert not mask[parts["table"]].any()
    assert not mask[~parts["body"]].any()


def test_joined_lungs_take_no_second_component_the_hollow_table_neither():
    """Lungs that touch (one component) and a back lying on a hollow table: the table's air core
    lies inside the outline of body and table, runs the whole height, and is larger than
    ``min_component_ml``; it must not become the 'second lung'."""
    image, geometry = resample_image(*real_ct_phantom(circle=False, joined=True), (1.5, 1.5, 1.5))
    parts = parts_on_grid(image.shape, geometry, circle=False, joined=True)
    assert parts["table_core"].sum() * np.prod(geometry.spacing) / 1000 > 100
    mask = segment_lungs(image, geometry.spacing)
    assert not mask[parts["table"]].any() and not mask[parts["bowel"]].any()
    assert dice(mask, parts["lung0"] | parts["lung1"]) >= 0.95


def test_a_lung_cut_by_the_array_border_is_kept():
    """A field of view cut square through a lung (no circle): the lung touches the side face."""
    image, geometry = resample_image(*real_ct_phantom(circle=False), (1.5, 1.5, 1.5))
    parts = parts_on_grid(image.shape, geometry, circle=False)
    keep = int(np.searchsorted(geometry.origin[0] + np.arange(image.shape[2]) * 1.5, 80.0))
    image, parts = image[:, :, :keep], {k: v[:, :, :keep] for k, v in parts.items()}
    assert (image[:, :, -1] == image[:, :, -1]).all() and (image[:, :, -1] < -400).sum() > 1000
    mask = segment_lungs(image, geometry.spacing)
    for name in ("lung0", "lung1"):
        assert np.mean(mask[parts[name]] > 0) >= 0.95, name
    assert not mask[parts["bowel"]].any()


def test_outside_fov_takes_in_the_ring_resampling_leaves():
    """Tissue against -2048 padding, 0.7 mm pixels resampled to 1 mm: the mixed voxels between
    them (-1500 to -400 HU, air to a threshold) are outside the field of view; the tissue is not."""
    n, s = 300, 0.7
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - n / 2, xx - n / 2) * s
    native = np.where(r <= 90.0, 40, -2048).astype(np.int16)[None].repeat(4, axis=0)
    image, geometry = resample_image(native, Geometry((s, s, 2.5), (0.0, 0.0, 0.0)), (1.0, 1.0, 1.0))
    beyond = outside_fov(image, geometry.spacing)
    ring = (image < -400) & (image >= -1500)
    assert ring.any() and not (ring & ~beyond).any()
    yy, xx = np.mgrid[: image.shape[1], : image.shape[2]]   # 1 mm voxels, circle centre at 105 mm
    assert not beyond[:, np.hypot(yy - 105.0, xx - 105.0) < 90.0 - 3.5].any()   # a ~2 mm rim at most
    assert np.array_equal(outside_fov(np.full((3, 9, 9), -1000), (1.0, 1.0, 1.0)), np.zeros((3, 9, 9), bool))


def test_airways_start_at_the_superior_end_only():
    """A chain of small gas pockets at the inferior end (bowel) is not an airway."""
    air = np.zeros((60, 80, 80), bool)
    air[10:50, 10:70, 5:35] = air[10:50, 10:70, 45:75] = True       # two lungs
    air[40:, 38:44, 38:44] = True                                     # trachea to the top slice
    air[:15, 38:44, 30:36] = True                                     # a gas pocket from the bottom slice
    airway = find_airways(air, (1.0, 1.0, 1.0))
    assert airway[55, 40, 40] and not airway[5, 40, 32]
    either = find_airways(air, (1.0, 1.0, 1.0), superior_last=None)
    assert either[55, 40, 40] and either[5, 40, 32]
    flipped = find_airways(air[::-1], (1.0, 1.0, 1.0), superior_last=False)
    assert flipped[4, 40, 40] and not flipped[54, 40, 32]


def test_superior_is_last_reads_the_slice_direction():
    assert superior_is_last(Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))) is True
    assert superior_is_last(Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, -1.0))) is False
    assert superior_is_last(Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0, 0, 1, 1, 0, 0, 0, 1, 0.0))) is None


def test_nodule_inside_share_per_label():
    mask = np.zeros((4, 10, 10), np.uint8)
    mask[:, :, :5] = 1
    labels = np.zeros((4, 10, 10), np.uint8)
    labels[1, 1, 1:3] = 1                     # inside
    labels[2, 2, 3:7] = 2                     # half inside
    labels[3, 3, 8] = 4                       # outside; label 3 absent
    assert nodule_inside_share(mask, labels) == {1: 1.0, 2: 0.5, 4: 0.0}
    assert nodule_inside_share(mask, np.zeros_like(labels)) == {}
    with pytest.raises(ValueError):
        nodule_inside_share(mask, labels[:2])


# --------------------------------------------------------------------------- a real scan: LIDC-IDRI-0001
# 133 axial slices of 512 x 512, 0.703 x 0.703 x 2.5 mm, -2048 HU outside the reconstruction circle,
# the whole chest with the table and the upper abdomen; resampled to 1 mm as the pipeline does.

#: its one LUNA16 nodule: centre (x, y, z) world mm, diameter mm
LIDC1_NODULE, LIDC1_DIAMETER = (56.21, 86.34, -115.87), 23.35
#: the gas in its stomach (world mm, x y z), where a distended stomach is drawn
LIDC1_STOMACH = (50.5, -75.3, -303.1)


@pytest.fixture(scope="module")
def lidc1_native() -> tuple[np.ndarray, Geometry]:
    """LIDC-IDRI-0001 as read from its DICOM series: (HU int16 z, y, x; geometry)."""
    import SimpleITK as sitk

    folders = sorted({p.parent for p in (realct_root() / "LIDC-IDRI-0001").glob("*/*/*.dcm")})
    assert folders, f"no DICOM series under {realct_root() / 'LIDC-IDRI-0001'}"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folders[0])))
    image = reader.Execute()
    return sitk.GetArrayFromImage(image).astype(np.int16), Geometry.of(image)


@pytest.fixture(scope="module")
def lidc1(lidc1_native) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """LIDC-IDRI-0001 at 1 mm and its lung mask: (image, geometry, mask)."""
    image, geometry = resample_image(*lidc1_native, (1.0, 1.0, 1.0))
    return image, geometry, segment_lungs(image, geometry.spacing, superior_last=superior_is_last(geometry))


def ball_labels(shape: tuple[int, int, int], geometry: Geometry, centre_xyz, diameter_mm: float) -> np.ndarray:
    """Label map (uint8 z, y, x): 1 inside a ball (world mm centre, diameter mm)."""
    c = world_to_voxel(np.asarray(centre_xyz, dtype=float), geometry)
    sz, sy, sx = geometry.spacing[::-1]
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    inside = ((zz - c[0]) * sz) ** 2 + ((yy - c[1]) * sy) ** 2 + ((xx - c[2]) * sx) ** 2 <= (diameter_mm / 2) ** 2
    return inside.astype(np.uint8)


def nodule_share(mask: np.ndarray, geometry: Geometry) -> float:
    return nodule_inside_share(mask, ball_labels(mask.shape, geometry, LIDC1_NODULE, LIDC1_DIAMETER))[1]


def volume_l(mask: np.ndarray, geometry: Geometry) -> float:
    return float(np.count_nonzero(mask)) * float(np.prod(geometry.spacing)) / 1e6


def bowel_gas(image: np.ndarray, geometry: Geometry, min_ml: float = 1.0) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """Gas in the stomach and bowel, found without the lung mask: the air components (-1500 to
    -400 HU) that touch no side face (the air around the body does), other than the largest (lungs
    and airways), of ``min_ml`` or more, lying wholly in the lower half of the largest's z range
    (below the carina, where only the oesophagus, stomach and bowel hold gas). (box, voxels) each."""
    labels, _ = ndi.label((image < -400) & (image >= -1500))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    sizes[np.unique(np.concatenate([labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]))] = 0
    boxes = ndi.find_objects(labels)
    lungs = int(np.argmax(sizes))
    half = (boxes[lungs - 1][0].start + boxes[lungs - 1][0].stop) / 2
    voxel_ml = float(np.prod(geometry.spacing)) / 1000
    return [(box, labels[box] == k) for k, box in enumerate(boxes, start=1)
            if k != lungs and sizes[k] * voxel_ml >= min_ml and box[0].stop <= half]


def below_table_top(image: np.ndarray) -> np.ndarray:
    """Voxels (z, y, x) at or behind the table's upper surface in every (z, x) column: the table is
    the second largest tissue component (-400 HU or more, padding excluded), under the body's back."""
    labels, _ = ndi.label((image >= -400))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body, table = np.argsort(sizes)[::-1][:2]
    ys = np.arange(image.shape[1])[None, :, None]
    assert np.mean(np.nonzero(labels == table)[1]) > np.mean(np.nonzero(labels == body)[1])   # posterior
    top = np.where((labels == table).any(axis=1), np.argmax(labels == table, axis=1), image.shape[1])
    return ys >= top[:, None, :]


def test_real_scan_nodule_inside_and_lung_volume_plausible(lidc1):
    image, geometry, mask = lidc1
    assert nodule_share(mask, geometry) >= 0.97
    assert 3.0 <= volume_l(mask, geometry) <= 7.0          # adult lungs: 4-6 L at full inspiration
    x_mid = image.shape[2] // 2
    assert volume_l(mask[:, :, :x_mid], geometry) >= 1.0 and volume_l(mask[:, :, x_mid:], geometry) >= 1.0


def test_real_scan_no_bowel_gas_no_table_no_outside_air(lidc1):
    image, geometry, mask = lidc1
    gas = bowel_gas(image, geometry)
    assert len(gas) >= 5                                    # stomach, colon: ~50 ml in all
    for box, pocket in gas:
        assert np.mean(mask[box][pocket] > 0) < 0.01, box
    table = below_table_top(image)
    assert table.any() and not mask[table].any()
    outside, _ = ndi.label(image < -400)
    around = np.isin(outside, np.unique(outside[:, :, 0]))   # the air around the body and the padding
    assert around.sum() > 1e6 and not mask[around & (outside > 0)].any()


def test_real_scan_small_field_of_view_and_5_mm_slices(lidc1_native, lidc1):
    """A 230 mm reconstruction circle cuts both lungs (and the body all round), 5 mm slices."""
    native, geometry = lidc1_native
    ny, nx = native.shape[1:]
    yy, xx = np.ogrid[:ny, :nx]
    sx, sy, sz = geometry.spacing
    small = native.copy()
    small[:, ((yy - (ny - 1) / 2) * sy) ** 2 + ((xx - (nx - 1) / 2) * sx) ** 2 > 115.0 ** 2] = -2048
    n = small.shape[0] // 2 * 2
    thick = np.rint(small[:n].reshape(n // 2, 2, ny, nx).mean(axis=1, dtype=np.float32)).astype(np.int16)
    origin = (geometry.origin[0], geometry.origin[1], geometry.origin[2] + sz / 2)
    image, g = resample_image(thick, Geometry((sx, sy, 2 * sz), origin, geometry.direction), (1.0, 1.0, 1.0))
    mask = segment_lungs(image, g.spacing, superior_last=superior_is_last(g))
    assert nodule_share(mask, g) >= 0.97
    assert 3.0 <= volume_l(mask, g) <= 7.0
    full = lidc1[2][: mask.shape[0]]
    inside = image > -1500
    assert dice(mask, full & inside) >= 0.95
    cut = (full > 0) & ~inside
    assert cut[:, :, : nx // 2].any() and cut[:, :, nx // 2:].any()    # both lungs reach the circle


def test_real_scan_lungs_cut_by_the_array_border(lidc1):
    """A square field of view 230 mm wide: both lungs touch a side face of the array."""
    image, geometry, full = lidc1
    x0, x1 = 70, 300                                          # 1 mm voxels
    g = Geometry(geometry.spacing, (geometry.origin[0] + x0, *geometry.origin[1:]), geometry.direction)
    mask = segment_lungs(image[:, :, x0:x1], g.spacing, superior_last=superior_is_last(g))
    assert mask[:, :, 0].any() and mask[:, :, -1].any()
    assert nodule_share(mask, g) >= 0.97
    assert dice(mask, full[:, :, x0:x1]) >= 0.98


def test_real_scan_a_distended_stomach_is_not_lung(lidc1):
    """170 ml of gas in the stomach (after a fizzy drink, or a hiatus): as large as a lobe, but it
    lies below the diaphragm. The lungs of this scan are joined (through the main bronchi) after the
    airway removal, so a rule 'the two largest air components' took the stomach as the second lung."""
    image, geometry, full = lidc1
    c = world_to_voxel(np.asarray(LIDC1_STOMACH), geometry)
    zz, yy, xx = np.ogrid[: image.shape[0], : image.shape[1], : image.shape[2]]
    stomach = ((zz - c[0]) / 30) ** 2 + ((yy - c[1]) / 30) ** 2 + ((xx - c[2]) / 45) ** 2 <= 1   # 1 mm voxels
    distended = np.where(stomach, np.int16(-1000), image)
    mask = segment_lungs(distended, geometry.spacing, superior_last=superior_is_last(geometry))
    assert stomach.sum() > 150_000 and not mask[stomach].any()
    assert dice(mask, full) >= 0.99
