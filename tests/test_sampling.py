"""Balanced patch sampling (noduleflow.sampling) on small hand-built slice stores."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from noduleflow.io import Geometry
from noduleflow.patchplan import patch_counts
from noduleflow.sampling import load_patches, sample_balanced_patches, thick_structures
from noduleflow.slices import slice_table_of

SPACING = (1.0, 1.0, 1.0)


def make_store(path: Path, uid: str, seed: int, nodules: list[tuple[int, int, int, int]]) -> Path:
    """A 24x96x96 scan: body ~40 HU, one lung box -850 HU with bright 'vessels', spherical nodules
    (z, y, x, radius) labelled 1, 2, ..."""
    rng = np.random.default_rng(seed)
    shape = (24, 96, 96)
    image = np.full(shape, 40, dtype=np.int16)
    image[:, :4, :] = -1000  # outside air
    lung = np.zeros(shape, dtype=np.uint8)
    lung[:, 12:84, 10:86] = 1
    image[lung > 0] = -850
    for _ in range(12):  # vessels: bright short tubes along z
        y, x = rng.integers(16, 80, size=2)
        image[:, y - 1:y + 2, x - 1:x + 2] = 30
    image = (image + rng.normal(0, 15, shape)).astype(np.int16)
    nodule = np.zeros(shape, dtype=np.uint8)
    zz, yy, xx = np.indices(shape)
    for label, (z, y, x, r) in enumerate(nodules, 1):
        ball = (zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= r * r
        nodule[ball] = label
        image[ball] = 20
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image, chunks=(1, 96, 96))
        f.create_dataset("lung", data=lung, chunks=(1, 96, 96))
        f.create_dataset("nodule", data=nodule, chunks=(1, 96, 96))
        f.create_dataset("slice_table", data=slice_table_of(lung, nodule))
        f.attrs.update({"seriesuid": uid, **Geometry(SPACING, (-100.0, -120.0, -300.0)).as_attrs()})
    return path


@pytest.fixture()
def stores(tmp_path):
    return [
        make_store(tmp_path / "a.h5", "1.1", 0, [(10, 40, 40, 4), (15, 70, 70, 2)]),
        make_store(tmp_path / "b.h5", "1.2", 1, []),
        make_store(tmp_path / "c.h5", "1.3", 2, [(5, 30, 60, 3)]),
        make_store(tmp_path / "d.h5", "1.4", 3, []),
    ]


def sample(stores, out, **kwargs):
    cfg = dict(patch_size=32, context=1, context_step=1, patches_per_scan=60, positive_fraction=0.5,
               hard_negative_fraction=0.5, hard_negative_min_hu=-500, jitter_fraction=0.35, seed=3)
    cfg.update(kwargs)
    sample_balanced_patches(stores, out, lung_roi=cfg.pop("lung_roi", True), **cfg)
    return load_patches(out)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_realised_positive_fraction_matches_config_despite_scans_without_nodules(stores, tmp_path, fraction):
    patches = sample(stores, tmp_path / "p.h5", positive_fraction=fraction)
    realised = np.mean(patches["kind"] == "positive")
    assert abs(realised - fraction) <= 0.02


def test_positive_patches_hold_nodule_pixels_and_negatives_none(stores, tmp_path):
    patches = sample(stores, tmp_path / "p.h5")
    has_nodule = patches["mask"].reshape(len(patches["mask"]), -1).any(axis=1)
    positive = patches["kind"] == "positive"
    assert positive.any() and has_nodule[positive].all()
    assert not has_nodule[~positive].any()
    # positives are not always centred: the jitter moves centres off the nodule
    centre = patches["mask"][:, 16, 16]
    assert (centre[positive] == 0).any()


def test_hard_negatives_are_centred_on_bright_lung_voxels(stores, tmp_path):
    patches = sample(stores, tmp_path / "p.h5", hard_negative_min_hu=-500)
    hard = np.flatnonzero(patches["kind"] == "hard_negative")
    assert len(hard) > 0
    by_uid = {}
    for path in stores:
        with h5py.File(path, "r") as f:
            by_uid[f.attrs["seriesuid"]] = (f["image"][...], f["lung"][...])
    for i in hard:
        image, lung = by_uid[patches["seriesuid"][i]]
        z, y, x = patches["z"][i], patches["y"][i], patches["x"][i]
        assert lung[z, y, x] == 1 and image[z, y, x] >= -500


def _store_with_a_ball(tmp_path, radius=5):
    """A scan without nodules: thin vessels (3x3 voxels) and one ball of soft tissue (a lymph node)."""
    path = make_store(tmp_path / "ball.h5", "3.1", 0, [])
    with h5py.File(path, "r+") as f:
        image, lung = f["image"][...], f["lung"][...] > 0
        image[lung] = np.random.default_rng(0).normal(-850, 15, int(lung.sum())).astype(np.int16)
        for y, x in ((20, 20), (20, 76), (76, 20), (76, 76), (48, 20)):  # separate vessels along z
            image[:, y - 1:y + 2, x - 1:x + 2] = 30
        zz, yy, xx = np.indices(image.shape)
        ball = (zz - 12) ** 2 + (yy - 48) ** 2 + (xx - 48) ** 2 <= radius ** 2
        image[ball] = 40
        f["image"][...] = image
    return path, ball


def test_thick_structures_keep_a_lymph_node_and_drop_thin_vessels(tmp_path):
    path, ball = _store_with_a_ball(tmp_path)
    with h5py.File(path, "r") as f:
        image, lung = f["image"][...], f["lung"][...]
    thick = thick_structures(image, lung, SPACING, sigma_mm=2.0, min_hu=-500)
    vessels = (lung > 0) & (image > -500) & ~ball
    assert thick[ball].mean() > 0.5  # the ball's core
    assert not thick[vessels].any()  # thin vessels smooth away
    assert not (thick & ~ball).any()
    # a finer sigma keeps the vessels too; the voxel size counts in mm
    assert thick_structures(image, lung, SPACING, sigma_mm=0.5, min_hu=-500)[vessels].mean() > 0.5
    assert thick_structures(image, lung, (4.0, 4.0, 4.0), sigma_mm=2.0, min_hu=-500)[vessels].mean() > 0.5


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_a_share_of_hard_negatives_is_centred_inside_thick_structures(tmp_path, share):
    path, ball = _store_with_a_ball(tmp_path)
    patches = sample([path], tmp_path / "p.h5", patches_per_scan=60, thick_negative_fraction=share,
                     thick_negative_sigma_mm=2.0)
    hard = patches["kind"] == "hard_negative"
    assert hard.sum() == 30  # the share changes where hard negatives go, not how many
    on_ball = ball[patches["z"][hard], patches["y"][hard], patches["x"][hard]]
    if share == 1.0:
        assert on_ball.all()
    elif share == 0.5:
        assert on_ball.sum() >= 15
    else:
        assert on_ball.mean() < 0.5  # uniform over bright voxels: mostly vessels


@pytest.mark.parametrize("step", [1, 3])
def test_context_channels_are_the_neighbouring_slices_with_roi_applied(stores, tmp_path, step):
    patches = sample(stores, tmp_path / "p.h5", context=2, context_step=step)
    assert patches["image"].shape[1:] == (5, 32, 32)
    with h5py.File(stores[0], "r") as f:
        image, lung = f["image"][...], f["lung"][...]
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert (f.attrs["context"], f.attrs["context_step"]) == (2, step)
    i = int(np.flatnonzero((patches["seriesuid"] == "1.1") & (patches["plane"] == "axial"))[0])
    z, y, x = patches["z"][i], patches["y"][i], patches["x"][i]
    for channel, dz in enumerate(range(-2 * step, 2 * step + 1, step)):
        zz = min(max(z + dz, 0), image.shape[0] - 1)
        expected = np.full((32, 32), -1000, dtype=np.int16)
        y0, x0 = y - 16, x - 16
        ys, xs = slice(max(y0, 0), min(y0 + 32, 96)), slice(max(x0, 0), min(x0 + 32, 96))
        window = np.where(lung[zz, ys, xs] > 0, image[zz, ys, xs], -1000)
        expected[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = window
        np.testing.assert_array_equal(patches["image"][i, channel], expected)


def test_without_lung_roi_the_whole_body_is_seen(stores, tmp_path):
    patches = sample(stores, tmp_path / "p.h5", lung_roi=False)
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert not f.attrs["lung_roi"]
    # body pixels outside the lung keep their HU (no -1000 fill) and count as ROI
    assert (patches["image"] > -500).any()
    assert patches["roi"].mean() > 0.5


def test_sampling_is_deterministic_and_independent_of_file_order(stores, tmp_path):
    first = sample(stores, tmp_path / "p1.h5")
    second = sample(list(reversed(stores)), tmp_path / "p2.h5")
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    other = sample(stores, tmp_path / "p3.h5", seed=4)
    assert not np.array_equal(first["y"], other["y"])


def test_load_patches_restricts_to_uids(stores, tmp_path):
    sample(stores, tmp_path / "p.h5")
    some = load_patches(tmp_path / "p.h5", uids=["1.2"])
    assert set(some["seriesuid"]) == {"1.2"} and len(some["image"]) == len(some["z"]) > 0


def test_patch_counts_spread_positives_over_nodule_scans():
    counts = patch_counts([True, False, True, False], patches_per_scan=10, positive_fraction=0.5)
    assert counts == [(10, 5), (0, 5), (10, 5), (0, 5)]
    positives = sum(p for p, _ in counts)
    assert positives / sum(p + n for p, n in counts) == 0.5


# --------------------------------------------------------------------------- the pieces


def test_nodule_windows_match_a_brute_force_search():
    from noduleflow.sampling import nodule_windows, window_bounds

    rng = np.random.default_rng(0)
    nodule = np.zeros((3, 23, 19), dtype=np.uint8)
    nodule[1][rng.random((23, 19)) > 0.985] = 2
    for p in (6, 7):
        blocked = nodule_windows(nodule, p)
        assert set(blocked) == {1}
        for y in range(23):
            for x in range(19):
                (ya, yb), (xa, xb) = window_bounds(y, p), window_bounds(x, p)
                expect = nodule[1, max(ya, 0):yb, max(xa, 0):xb].any()
                assert blocked[1][y, x] == expect


def test_border_patches_are_padded_with_air_and_context_slices_clamp():
    from noduleflow.sampling import cut_patches

    image = (np.arange(3 * 6 * 6).reshape(3, 6, 6) - 50).astype(np.int16)
    lung = np.ones((3, 6, 6), dtype=np.uint8)
    lung[1, 0, 0] = 0
    nodule = np.zeros((3, 6, 6), dtype=np.uint8)
    nodule[0, 0, 1] = 1
    out = cut_patches(image, lung, nodule, np.array([[0, 0, 0]]), patch_size=4, context=1, lung_roi=True,
                      context_step=1)
    img, mask, roi = out["image"][0], out["mask"][0], out["roi"][0]
    # window rows/cols -2..1: the first two are outside the volume
    assert (img[:, :2, :] == -1000).all() and (img[:, :, :2] == -1000).all()
    assert not mask[:2].any() and not roi[:2].any() and not roi[:, :2].any()
    np.testing.assert_array_equal(img[0, 2:, 2:], image[0, :2, :2])  # channel z-1 clamps to slice 0
    np.testing.assert_array_equal(img[1, 2:, 2:], image[0, :2, :2])
    np.testing.assert_array_equal(img[2, 2:, 2:], np.where(lung[1, :2, :2] > 0, image[1, :2, :2], -1000))
    assert mask[2, 3] == 1 and mask.sum() == 1
    plain = cut_patches(image, lung, nodule, np.array([[0, 0, 0]]), patch_size=4, context=1,
                        lung_roi=False, context_step=1)
    assert (plain["roi"] == 1).all()
    np.testing.assert_array_equal(plain["image"][0, 2, 2:, 2:], image[1, :2, :2])  # no ROI fill


def test_small_nodules_get_as_many_positives_as_large_ones_and_jitter_is_bounded():
    from noduleflow.sampling import positive_centres

    shape = (30, 80, 80)
    zz, yy, xx = np.indices(shape)
    nodule = np.zeros(shape, dtype=np.uint8)
    nodule[(zz - 15) ** 2 + (yy - 30) ** 2 + (xx - 30) ** 2 <= 49] = 1   # ~1400 voxels
    nodule[(zz - 10) ** 2 + (yy - 60) ** 2 + (xx - 60) ** 2 <= 1] = 2    # 7 voxels
    rng = np.random.default_rng(0)
    centres = positive_centres(nodule, rng, 400, patch_size=32, jitter_fraction=0.0)
    labels = nodule[tuple(centres.T)]
    assert (labels > 0).all()
    assert 0.4 < np.mean(labels == 2) < 0.6
    # every slice that shows a nodule is eligible: all 3 slices of the small one, nearly all 15 of the big one
    assert set(centres[labels == 2, 0]) == {9, 10, 11}
    assert len(np.unique(centres[labels == 1, 0])) >= 13
    jittered = positive_centres(nodule, np.random.default_rng(1), 400, patch_size=32, jitter_fraction=0.35)
    j = int(0.35 * 32 / 2)
    for z, y, x in jittered:
        assert nodule[z, y - j:y + j + 1, x - j:x + j + 1].any()
    assert (nodule[tuple(jittered.T)] == 0).any()


def test_patch_counts_without_nodule_scans_give_only_negatives_and_round_globally():
    counts = patch_counts([False, False], patches_per_scan=7, positive_fraction=0.5)
    assert counts == [(0, 7), (0, 7)]
    counts = patch_counts([True, False, False], patches_per_scan=5, positive_fraction=0.3)
    assert sum(p for p, _ in counts) == round(15 * 0.3) and sum(n for _, n in counts) == 15 - round(15 * 0.3)
    assert max(n for _, n in counts) - min(n for _, n in counts) <= 1


def test_a_scan_without_bright_lung_voxels_fills_hard_negatives_with_plain_ones(tmp_path):
    path = make_store(tmp_path / "a.h5", "2.1", 0, [(10, 40, 40, 3)])
    with h5py.File(path, "r+") as f:
        image = f["image"][...]
        image[(f["lung"][...] > 0) & (f["nodule"][...] == 0)] = -850
        f["image"][...] = image
    patches = sample([path], tmp_path / "p.h5", patches_per_scan=40)
    assert len(patches["kind"]) == 40 and np.sum(patches["kind"] == "positive") == 20
    assert np.sum(patches["kind"] == "negative") == 20


# --------------------------------------------------------------------------- the file


def test_patches_file_layout_and_identical_bytes(stores, tmp_path):
    import hashlib

    sample(stores, tmp_path / "p1.h5")
    sample(stores, tmp_path / "p2.h5")
    digests = [hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in ("p1.h5", "p2.h5")]
    assert digests[0] == digests[1]
    with h5py.File(tmp_path / "p1.h5", "r") as f:
        n = f["image"].shape[0]
        assert f["image"].dtype == np.int16 and f["image"].shape == (n, 3, 32, 32)
        assert f["image"].chunks == (1, 3, 32, 32) and f["image"].compression == "gzip"
        assert f["mask"].dtype == np.uint8 and f["roi"].shape == (n, 32, 32)
        for key in ("seriesuid", "z", "y", "x", "kind"):
            assert f[key].shape == (n,)
        assert f["kind"].dtype.kind == "S" and f["seriesuid"].dtype.kind == "S"
        assert (f.attrs["context"], f.attrs["patch_size"], bool(f.attrs["lung_roi"]), f.attrs["seed"]) == (1, 32, True, 3)
    patches = load_patches(tmp_path / "p1.h5")
    assert set(np.unique(patches["mask"])) <= {0, 1} and set(np.unique(patches["roi"])) <= {0, 1}
    # the ROI is applied: every pixel outside it is air
    assert (patches["image"][:, 1][patches["roi"] == 0] == -1000).all()


def test_load_patches_subset_equals_the_rows_of_the_full_load(stores, tmp_path):
    full = sample(stores, tmp_path / "p.h5")
    some = load_patches(tmp_path / "p.h5", uids=["1.3", "1.1", "7.7"])
    rows = np.isin(full["seriesuid"], ["1.1", "1.3"])
    for key in full:
        np.testing.assert_array_equal(some[key], full[key][rows])
    none = load_patches(tmp_path / "p.h5", uids=[])
    assert none["image"].shape == (0, 3, 32, 32) and len(none["seriesuid"]) == 0


def test_bad_inputs_raise_before_writing(stores, tmp_path):
    from noduleflow.io import InputError

    out = tmp_path / "p.h5"
    with pytest.raises(InputError, match="b.h5.*1.1"):
        sample([stores[0], make_store(tmp_path / "b.h5", "1.1", 5, [])], out)
    with pytest.raises(InputError, match="missing.h5"):
        sample([stores[0], tmp_path / "missing.h5"], out)
    with pytest.raises(ValueError, match="sampling.positive_fraction"):
        sample(stores, out, positive_fraction=1.5)
    with pytest.raises(ValueError, match="sampling.thick_negative_fraction"):
        sample(stores, out, thick_negative_fraction=-0.1)
    with pytest.raises(ValueError, match="sampling.thick_negative_sigma_mm"):
        sample(stores, out, thick_negative_sigma_mm=0)
    with pytest.raises(ValueError, match="sampling.context_step"):
        sample(stores, out, context_step=0)
    assert not out.exists()


def test_sampling_through_the_slice_store_writer(tmp_path):
    """End to end from .mha volumes through noduleflow.slices.extract_slices."""
    from noduleflow.io import write_image
    from noduleflow.slices import extract_slices

    make_store(tmp_path / "src.h5", "3.1", 0, [(12, 50, 50, 4)])
    with h5py.File(tmp_path / "src.h5", "r") as f:
        arrays = {name: f[name][...] for name in ("image", "lung", "nodule")}
    geometry = Geometry(SPACING, (-100.0, -120.0, -300.0))
    for name, array in arrays.items():
        write_image(array, geometry, tmp_path / f"{name}.mha")
    extract_slices(tmp_path / "image.mha", tmp_path / "lung.mha", tmp_path / "nodule.mha", "3.1",
                   tmp_path / "3.1.h5")
    via_writer = sample([tmp_path / "3.1.h5"], tmp_path / "p.h5", patches_per_scan=30)
    direct = sample([tmp_path / "src.h5"], tmp_path / "q.h5", patches_per_scan=30)
    for key in direct:
        np.testing.assert_array_equal(via_writer[key], direct[key])
    assert np.sum(via_writer["kind"] == "positive") == 15


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_off_axial_patches_are_cut_across_their_own_plane(stores, tmp_path, plane):
    patches = sample(stores, tmp_path / "p.h5", planes=["axial", "coronal", "sagittal"])
    assert set(patches["plane"]) == {"axial", "coronal", "sagittal"}
    with h5py.File(stores[0], "r") as f:
        image, lung, nodule = f["image"][...], f["lung"][...], f["nodule"][...]
    rows = np.flatnonzero((patches["seriesuid"] == "1.1") & (patches["plane"] == plane))
    assert len(rows) > 0
    for i in rows[:5]:
        z, y, x = patches["z"][i], patches["y"][i], patches["x"][i]
        for channel, d in enumerate((-1, 0, 1)):
            if plane == "coronal":   # slice y + d, rows z, columns x
                s = min(max(y + d, 0), 95)
                img, lng, nod, r, c = image[:, s, :], lung[:, s, :], nodule[:, s, :], z, x
            else:                    # slice x + d, rows z, columns y
                s = min(max(x + d, 0), 95)
                img, lng, nod, r, c = image[:, :, s], lung[:, :, s], nodule[:, :, s], z, y
            expected = np.full((32, 32), -1000, dtype=np.int16)
            r0, c0 = r - 16, c - 16
            rs = slice(max(r0, 0), min(r0 + 32, img.shape[0]))
            cs = slice(max(c0, 0), min(c0 + 32, img.shape[1]))
            expected[rs.start - r0:rs.stop - r0, cs.start - c0:cs.stop - c0] = np.where(
                lng[rs, cs] > 0, img[rs, cs], -1000)
            np.testing.assert_array_equal(patches["image"][i, channel], expected)
            if d == 0:
                mask = np.zeros((32, 32), dtype=np.uint8)
                mask[rs.start - r0:rs.stop - r0, cs.start - c0:cs.stop - c0] = nod[rs, cs] > 0
                np.testing.assert_array_equal(patches["mask"][i], mask)


def test_planes_split_every_kind_evenly_and_keep_the_positive_fraction(stores, tmp_path):
    patches = sample(stores, tmp_path / "p.h5", planes=["axial", "coronal", "sagittal"], patches_per_scan=90)
    for plane in ("axial", "coronal", "sagittal"):
        share = np.mean(patches["kind"][patches["plane"] == plane] == "positive")
        assert abs(share - 0.5) <= 0.03
    assert abs(np.mean(patches["kind"] == "positive") - 0.5) <= 0.02
    axial = sample(stores, tmp_path / "a.h5", planes=["axial"])
    assert set(axial["plane"]) == {"axial"}
    with pytest.raises(ValueError, match="sampling.planes"):
        sample(stores, tmp_path / "bad.h5", planes=["oblique"])
    assert not (tmp_path / "bad.h5").exists()


# --------------------------------------------------------------------------- one job per scan


def test_per_scan_files_hold_exactly_the_patches_of_the_cohort_file(stores, tmp_path):
    """The pipeline samples one file per scan from the cohort's plan; read as one sequence they are
    the single-file sampling, patch for patch (so training on them gives the same model)."""
    from noduleflow.patchdata import PatchFile
    from noduleflow.patchplan import plan_patches, read_plan
    from noduleflow.sampling import sample_scan_file

    settings = dict(patch_size=32, context=1, context_step=1, hard_negative_fraction=0.5, hard_negative_min_hu=-500,
                    jitter_fraction=0.35, seed=3)
    sample(stores, tmp_path / "whole.h5", patches_per_scan=60, positive_fraction=0.5)
    plan = plan_patches(list(reversed(stores)), tmp_path / "plan.csv", patches_per_scan=60, positive_fraction=0.5)
    counts = read_plan(tmp_path / "plan.csv")
    assert list(plan["seriesuid"]) == ["1.1", "1.2", "1.3", "1.4"]  # seriesuid order, whatever the input order
    assert counts == {"1.1": (60, 30), "1.2": (0, 30), "1.3": (60, 30), "1.4": (0, 30)}
    per_scan = tmp_path / "scans"
    for store in stores:
        uid = h5py.File(store, "r").attrs["seriesuid"]
        sample_scan_file(store, per_scan / f"{uid}.h5", lung_roi=True, n_positive=counts[uid][0],
                         n_negative=counts[uid][1], patches_per_scan=60, positive_fraction=0.5, **settings)
    whole, split = PatchFile(tmp_path / "whole.h5"), PatchFile(per_scan)
    assert len(split.paths) == 4 and len(whole) == len(split) == 240
    assert list(split.seriesuid) == list(whole.seriesuid) and split.attrs == whole.attrs
    everything = np.arange(len(whole))
    for a, b in zip(whole.take(everything), split.take(everything)):
        np.testing.assert_array_equal(a, b)
    shuffled = np.random.default_rng(0).permutation(len(whole))[:50]
    for a, b in zip(whole.take(shuffled), split.take(shuffled)):
        np.testing.assert_array_equal(a, b)


def test_patch_files_sampled_with_other_settings_are_refused(stores, tmp_path):
    from noduleflow.io import InputError
    from noduleflow.patchdata import PatchFile

    sample(stores[:1], tmp_path / "a.h5", jitter_fraction=0.35)
    sample(stores[1:2], tmp_path / "b.h5", jitter_fraction=0.1)
    with pytest.raises(InputError, match=r"b\.h5: sampled with other settings .*jitter_fraction"):
        PatchFile([tmp_path / "a.h5", tmp_path / "b.h5"])
    with pytest.raises(InputError, match=r"missing\.h5: patches file not found"):
        PatchFile([tmp_path / "a.h5", tmp_path / "missing.h5"])


def test_a_malformed_plan_is_an_error_naming_it(tmp_path):
    from noduleflow.io import InputError
    from noduleflow.patchplan import read_plan

    bad = tmp_path / "plan.csv"
    bad.write_text("seriesuid,n_positive\n1.1,3\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"plan\.csv: missing column\(s\) has_nodule"):
        read_plan(bad)
    for row in ("1.1,True,-1,3", "1.1,True,two,3", "1.1,True,1.5,3"):
        bad.write_text(f"seriesuid,has_nodule,n_positive,n_negative\n{row}\n", encoding="utf-8")
        with pytest.raises(InputError, match=r"plan\.csv: patch counts"):
            read_plan(bad)


def test_draws_give_fresh_centres_with_the_same_counts_and_draw_0_is_the_single_draw(stores, tmp_path):
    single = sample(stores, tmp_path / "one.h5")
    three = sample(stores, tmp_path / "three.h5", draws=3)
    assert set(np.unique(three["draw"])) == {0, 1, 2}
    first = three["draw"] == 0
    for key in ("image", "mask", "y", "x", "kind", "seriesuid", "plane"):   # draw 0 = what draws: 1 gives
        np.testing.assert_array_equal(three[key][first], single[key])
    for uid in np.unique(three["seriesuid"]):
        per_draw = [three["kind"][(three["seriesuid"] == uid) & (three["draw"] == d)] for d in range(3)]
        assert all(np.array_equal(kinds, per_draw[0]) for kinds in per_draw)   # same kinds, same order
    centres = [np.stack([three[a][three["draw"] == d] for a in ("z", "y", "x")], axis=1) for d in range(3)]
    for d in (1, 2):                                                   # new centres, not a shuffled copy
        assert np.mean(np.all(centres[d] == centres[0], axis=1)) < 0.2
    positives = three["kind"] == "positive"                            # every draw's positives show a nodule
    assert three["mask"][positives].reshape(positives.sum(), -1).any(axis=1).all()
    again = sample(list(reversed(stores)), tmp_path / "again.h5", draws=3)
    for key in three:
        np.testing.assert_array_equal(three[key], again[key])
    with h5py.File(tmp_path / "three.h5", "r") as f:
        assert f.attrs["draws"] == 3


@pytest.mark.parametrize("draws", [0, 1.5, True])
def test_an_invalid_number_of_draws_is_refused_before_writing(stores, tmp_path, draws):
    with pytest.raises(ValueError, match="sampling.draws"):
        sample(stores, tmp_path / "p.h5", draws=draws)
    assert not (tmp_path / "p.h5").exists()


def test_a_roi_margin_shows_the_image_around_the_lung_but_the_loss_stays_in_the_lung():
    from noduleflow.sampling import cut_patches

    image = np.full((3, 8, 8), 40, dtype=np.int16)          # soft tissue
    lung = np.zeros((3, 8, 8), dtype=np.uint8)
    lung[:, :, :4] = 1
    image[lung > 0] = -850
    visible = np.zeros_like(lung)
    visible[:, :, :6] = 1                                    # the lung and two columns of tissue
    nodule = np.zeros_like(lung)
    centre = np.array([[1, 4, 4]])
    plain = cut_patches(image, lung, nodule, centre, patch_size=8, context=1, lung_roi=True, context_step=1)
    shown = cut_patches(image, lung, nodule, centre, patch_size=8, context=1, lung_roi=True, context_step=1,
                        visible=visible)
    assert (plain["image"][0][:, :, 4:] == -1000).all()     # the lung alone: tissue becomes air
    assert (shown["image"][0][:, :, 4:6] == 40).all() and (shown["image"][0][:, :, 6:] == -1000).all()
    np.testing.assert_array_equal(shown["roi"], plain["roi"])
    np.testing.assert_array_equal(shown["roi"][0], lung[1])


def test_sampling_with_a_roi_margin_records_it_for_inference(tmp_path):
    from noduleflow.patchdata import PatchFile
    from noduleflow.sampling import check_settings

    store = make_store(tmp_path / "a.h5", "A", 0, [(12, 40, 40, 4)])
    out = {}
    for margin in (0.0, 6.0):
        path = tmp_path / f"p{margin}.h5"
        sample_balanced_patches([store], path, lung_roi=True, patches_per_scan=12, patch_size=32,
                                roi_margin_mm=margin)
        patches = PatchFile(path)
        assert patches.meta()["roi_margin_mm"] == margin
        patches.close()
        out[margin] = load_patches(path)
    # same centres and loss masks; only pixels outside the lung (within 6 mm of it) differ
    np.testing.assert_array_equal(out[0.0]["roi"], out[6.0]["roi"])
    np.testing.assert_array_equal(out[0.0]["mask"], out[6.0]["mask"])
    changed = out[0.0]["image"] != out[6.0]["image"]
    assert changed.any()
    assert (out[0.0]["image"][changed] == -1000).all()
    with pytest.raises(ValueError, match="sampling.roi_margin_mm"):
        check_settings(roi_margin_mm=-2)


def _store_with_an_edge_ball(tmp_path):
    """The ball scan plus a second ball of soft tissue bulging from the lung's edge (x = 10)."""
    path, ball = _store_with_a_ball(tmp_path)
    with h5py.File(path, "r+") as f:
        image = f["image"][...]
        zz, yy, xx = np.indices(image.shape)
        bulge = (zz - 12) ** 2 + (yy - 30) ** 2 + (xx - 12) ** 2 <= 36
        image[bulge] = 40
        f["image"][...] = image
    return path, ball, bulge


def test_edge_structures_are_the_thick_structures_at_the_lung_edge_only(tmp_path):
    from noduleflow.sampling import edge_structures

    path, ball, bulge = _store_with_an_edge_ball(tmp_path)
    with h5py.File(path, "r") as f:
        image, lung = f["image"][...], f["lung"][...]
    thick = thick_structures(image, lung, SPACING, sigma_mm=2.0, min_hu=-500)
    edge = edge_structures(thick, lung, SPACING, distance_mm=5.0)
    assert thick[ball].any() and not edge[ball].any()       # 38 mm from the edge
    assert edge[bulge & (lung > 0)].mean() > 0.5             # the bulge's part inside the lung
    assert not (edge & ~bulge).any()
    assert not edge_structures(thick, lung, SPACING, distance_mm=0.5)[bulge & (lung > 0)].all()


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_a_share_of_hard_negatives_is_centred_on_structures_at_the_lung_edge(tmp_path, share):
    path, ball, bulge = _store_with_an_edge_ball(tmp_path)
    patches = sample([path], tmp_path / "p.h5", patches_per_scan=60, thick_negative_fraction=0.0,
                     edge_negative_fraction=share)
    hard = patches["kind"] == "hard_negative"
    assert hard.sum() == 30
    on_bulge = bulge[patches["z"][hard], patches["y"][hard], patches["x"][hard]]
    if share == 1.0:
        assert on_bulge.all()
    else:
        assert on_bulge.mean() < 0.5                          # uniform over bright voxels
