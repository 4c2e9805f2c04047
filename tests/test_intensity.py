"""Lung ROI and HU normalisation, shared by training and inference (noduleflow.intensity)."""

import numpy as np
import pytest

from noduleflow.intensity import apply_roi, normalize_hu


def test_apply_roi_fills_outside_with_air_and_keeps_inside():
    image = np.array([[100, -850], [40, -600]], dtype=np.int16)
    roi = np.array([[0, 1], [0, 1]], dtype=np.uint8)
    out = apply_roi(image, roi)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, [[-1000, -850], [-1000, -600]])


def test_normalize_hu_clips_to_the_window_and_scales_to_unit_range():
    out = normalize_hu(np.array([-2000, -1000, -300, 400, 3000]), [-1000, 400])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="window_hu"):
        normalize_hu(np.zeros(3), [400, -1000])


def test_apply_roi_broadcasts_a_centre_mask_over_channels_and_rounds_floats():
    image = np.arange(2 * 3 * 2 * 2, dtype=np.float64).reshape(2, 3, 2, 2) + 0.6
    roi = np.zeros((2, 1, 2, 2), dtype=np.uint8)
    roi[0, 0, 0, 0] = 1
    out = apply_roi(image, roi)
    assert out.dtype == np.int16 and out.shape == image.shape
    np.testing.assert_array_equal(out[0, :, 0, 0], [1, 5, 9])
    assert (out[1] == -1000).all() and (out[0, :, 1, :] == -1000).all()
    with pytest.raises(ValueError, match="broadcast"):
        apply_roi(image, np.ones((3, 3)))


def test_ct_normalisation_uses_foreground_statistics():
    from noduleflow.intensity import ct_statistics, normalize_intensity

    values = np.linspace(-900, 300, 1001)
    stats = ct_statistics(values)
    assert stats["mode"] == "ct" and stats["clip_hu"][0] > -900 and stats["clip_hu"][1] < 300
    out = normalize_intensity(values, stats)
    assert out.dtype == np.float32
    assert abs(out.mean()) < 1e-3 and abs(out.std() - 1) < 1e-3
    window = normalize_intensity(np.array([-1000, 400]), {"window_hu": [-1000, 400]})
    np.testing.assert_allclose(window, [0, 1])
    with pytest.raises(ValueError, match="mode"):
        normalize_intensity(values, {"mode": "zscore"})


def test_the_visible_region_is_the_lung_grown_by_the_margin_in_mm_per_axis():
    from noduleflow.intensity import visible_region

    lung = np.zeros((9, 11, 11), dtype=np.uint8)
    lung[4, 5, 5] = 1
    np.testing.assert_array_equal(visible_region(lung, (2.0, 1.0, 0.5), 0), lung > 0)
    seen = visible_region(lung, (2.0, 1.0, 0.5), 2.0)        # z 2 mm, y 1 mm, x 0.5 mm voxels
    assert seen[4, 5, 5] and seen[3, 5, 5] and seen[5, 5, 5] and not seen[2, 5, 5]   # 1 voxel in z
    assert seen[4, 3, 5] and not seen[4, 2, 5]                                       # 2 voxels in y
    assert seen[4, 5, 1] and not seen[4, 5, 0]                                       # 4 voxels in x
    assert not seen[3, 4, 5]                                  # sqrt(2^2 + 1^2) mm > 2 mm: Euclidean
    # the lung is always inside, and only the band within the margin is added
    big = np.zeros((20, 30, 30), dtype=np.uint8)
    big[5:15, 10:20, 10:20] = 1
    grown = visible_region(big, (1.0, 1.0, 1.0), 3.0)
    assert grown[big > 0].all()
    assert grown[10, 15, 7] and not grown[10, 15, 6] and grown[2, 15, 15] and not grown[1, 15, 15]
    with pytest.raises(ValueError, match="must be >= 0"):
        visible_region(lung, (1.0, 1.0, 1.0), -1.0)
    assert not visible_region(np.zeros((3, 3, 3)), (1.0, 1.0, 1.0), 5.0).any()
