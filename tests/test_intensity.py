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
