"""The coarse inference pass for large nodules (noduleflow.coarse_pass): what it adds, what it never
changes, and how its settings are checked."""

import math

import numpy as np
import pytest

from noduleflow.coarse_pass import (check_coarse_settings, coarse_volumes, large_objects, to_shape,
                                    with_coarse_pass)
from noduleflow.io import InputError

SHAPE = (48, 64, 64)
SPACING = (1.0, 1.0, 1.0)


def ball(shape, centre, radius):
    z, y, x = np.ogrid[tuple(slice(0, n) for n in shape)]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2


def scan_with_balls():
    """Air with a 30 mm ball (radius 15 voxels) and a 6 mm ball (radius 3), 40 HU; the lung everywhere."""
    image = np.full(SHAPE, -850, dtype=np.int16)
    large = ball(SHAPE, (24, 22, 22), 15)
    small = ball(SHAPE, (24, 50, 50), 3)
    image[large | small] = 40
    return image, np.ones(SHAPE, dtype=np.uint8), large, small


def rim_model(calls):
    """A stand-in for a U-Net that has only learnt objects up to ~16 voxels across: p = 1 on the
    bright objects whose centre is at most 8 voxels deep; of larger ones only the rim (at most 3
    voxels deep) gets p = 1, as a model sees a nodule larger than any it was trained on. The lung
    mask is not used to find the objects (it is the test's cut, not the image's)."""
    from scipy import ndimage

    def probability_map(image, lung, spacing_zyx):
        calls.append((image.shape, tuple(spacing_zyx)))
        bright = image > -300
        depth = ndimage.distance_transform_edt(bright)
        labels, n = ndimage.label(bright)
        deepest = np.concatenate([[0.0], ndimage.maximum(depth, labels, np.arange(1, n + 1))])
        # 0 outside the lung, as predict_volume with a lung ROI
        return (bright & ((deepest[labels] <= 8) | (depth <= 3)) & (lung > 0)).astype(np.float32)

    return probability_map


def test_the_coarse_pass_fills_a_nodule_the_fine_pass_sees_only_at_its_rim():
    image, lung, large, small = scan_with_balls()
    calls = []
    fine = rim_model([])(image, lung, SPACING)
    assert fine[large].mean() < 0.6   # the fine pass alone: the rim only
    merged = with_coarse_pass(rim_model(calls), image, lung, SPACING, scale=2.0, min_diameter_mm=20.0,
                              threshold=0.5, lung_roi=True)
    assert [c[0] for c in calls] == [SHAPE, (24, 32, 32)]
    assert calls[1][1] == pytest.approx((2.0, 2.0, 2.0))
    assert (merged[large] > 0.5).mean() > 0.95
    # the maximum of the two: never below the fine map, and the small ball is the fine pass's alone
    assert np.all(merged >= fine)
    assert np.array_equal(merged[small], fine[small])
    outside = ~ball(SHAPE, (24, 22, 22), 17)
    assert np.array_equal(merged[outside], fine[outside])


def test_scale_one_is_the_fine_pass_unchanged_and_runs_once():
    image, lung, _, _ = scan_with_balls()
    calls = []
    merged = with_coarse_pass(rim_model(calls), image, lung, SPACING, scale=1.0, min_diameter_mm=20.0,
                              threshold=0.5, lung_roi=True)
    assert len(calls) == 1
    assert np.array_equal(merged, rim_model([])(image, lung, SPACING))


def test_small_objects_of_the_coarse_map_are_not_added():
    """The coarse pass's small findings (vessel pieces at half the resolution) never enter the map."""
    image, lung, _, _ = scan_with_balls()
    blob = ball((24, 32, 32), (6, 6, 26), 2)          # 5 coarse voxels across = 10 mm: below 20 mm

    def coarse_only_blob(image_grid, lung_grid, spacing_zyx):
        prob = np.zeros(image_grid.shape, dtype=np.float32)
        if image_grid.shape != SHAPE:
            prob[blob] = 0.9
        return prob

    merged = with_coarse_pass(coarse_only_blob, image, lung, SPACING, scale=2.0, min_diameter_mm=20.0,
                              threshold=0.5, lung_roi=True)
    assert not merged.any()
    kept = with_coarse_pass(coarse_only_blob, image, lung, SPACING, scale=2.0, min_diameter_mm=5.0,
                            threshold=0.5, lung_roi=True)
    assert kept.max() == pytest.approx(0.9, abs=1e-3)


def test_with_a_lung_roi_the_coarse_map_stays_inside_the_lung():
    image, lung, large, _ = scan_with_balls()
    lung[:, :, :20] = 0                                # the mask cuts the large ball
    merged = with_coarse_pass(rim_model([]), image, lung, SPACING, scale=2.0, min_diameter_mm=20.0,
                              threshold=0.5, lung_roi=True)
    assert not merged[:, :, :20].any()
    assert (merged[large & (lung > 0)] > 0.5).mean() > 0.95


def test_large_objects_keeps_components_by_their_equivalent_diameter_in_mm():
    prob = np.zeros((20, 40, 40), dtype=np.float32)
    prob[ball(prob.shape, (10, 10, 10), 6)] = 0.8      # ~12 voxels across
    prob[ball(prob.shape, (10, 30, 30), 2)] = 0.8      # ~4 voxels across
    volume = ball(prob.shape, (10, 10, 10), 6).sum()
    diameter_1mm = (6 * volume / math.pi) ** (1 / 3)
    kept = large_objects(prob, (1.0, 1.0, 1.0), 0.5, diameter_1mm - 0.1)
    assert kept[10, 10, 10] == pytest.approx(0.8) and kept[10, 30, 30] == 0
    assert not large_objects(prob, (1.0, 1.0, 1.0), 0.5, diameter_1mm + 0.1).any()
    # the same voxels at 2 mm are twice as large
    assert large_objects(prob, (2.0, 2.0, 2.0), 0.5, diameter_1mm + 0.1)[10, 10, 10] == pytest.approx(0.8)
    assert not large_objects(prob, (1.0, 1.0, 1.0), 0.9, 0.0).any()


@pytest.mark.parametrize("shape", [(48, 64, 64), (37, 51, 66), (5, 9, 3)])
def test_coarse_volumes_and_back_keep_the_grid(shape):
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 400, size=shape).astype(np.int16)
    lung = (rng.random(shape) > 0.5).astype(np.uint8)
    coarse_image, coarse_lung = coarse_volumes(image, lung, 2.0)
    expected = tuple(max(1, round(n / 2)) for n in shape)
    assert coarse_image.shape == expected and coarse_lung.shape == expected
    assert coarse_image.dtype == np.int16 and coarse_lung.dtype == np.uint8
    assert set(np.unique(coarse_lung)) <= {0, 1}
    assert coarse_image.min() >= -1000 and coarse_image.max() <= 400
    back = to_shape(coarse_image.astype(np.float32), shape)
    assert back.shape == shape and back.dtype == np.float32


def test_a_constant_map_survives_the_round_trip():
    back = to_shape(np.full((12, 16, 16), 0.7, dtype=np.float32), (24, 31, 33))
    assert np.allclose(back, 0.7)


@pytest.mark.parametrize("scale, diameter, key", [(0.5, 20.0, "coarse_scale"), (float("nan"), 20.0, "coarse_scale"),
                                                  ("two", 20.0, "coarse_scale"), (5.0, 20.0, "coarse_scale"),
                                                  (2.0, -1.0, "coarse_min_diameter_mm"),
                                                  (2.0, float("inf"), "coarse_min_diameter_mm")])
def test_invalid_settings_are_refused_naming_the_key(scale, diameter, key):
    with pytest.raises(InputError, match=f"predict.{key}"):
        check_coarse_settings(scale, diameter)
    image, lung, _, _ = scan_with_balls()
    with pytest.raises(InputError, match=f"predict.{key}"):
        with_coarse_pass(rim_model([]), image, lung, SPACING, scale, diameter, 0.5, True)
