"""Slicing planes (noduleflow.planes): reordering a (z, y, x) volume and mapping indices back."""

import numpy as np
import pytest

from noduleflow.planes import PLANES, check_planes, from_plane, indices_from_plane, split_count, to_plane


@pytest.mark.parametrize("plane", PLANES)
def test_plane_round_trip_and_index_mapping(plane):
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # (z, y, x), every value distinct
    slices = to_plane(volume, plane)
    np.testing.assert_array_equal(from_plane(slices, plane), volume)
    rng = np.random.default_rng(0)
    index = np.stack([rng.integers(0, n, size=20) for n in slices.shape], axis=1)
    zyx = indices_from_plane(index, plane)
    np.testing.assert_array_equal(volume[zyx[:, 0], zyx[:, 1], zyx[:, 2]],
                                  slices[index[:, 0], index[:, 1], index[:, 2]])


def test_slices_of_each_plane_are_what_a_radiologist_calls_them():
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # (z, y, x)
    np.testing.assert_array_equal(to_plane(volume, "axial")[2], volume[2])          # fixed z: (y, x)
    np.testing.assert_array_equal(to_plane(volume, "coronal")[3], volume[:, 3, :])  # fixed y: (z, x)
    np.testing.assert_array_equal(to_plane(volume, "sagittal")[1], volume[:, :, 1])  # fixed x: (z, y)


def test_check_planes_orders_and_rejects_bad_lists():
    assert check_planes(["sagittal", "axial"], "k") == ("axial", "sagittal")
    for bad in ([], ["axial", "axial"], ["oblique"]):
        with pytest.raises(ValueError, match="sampling.planes"):
            check_planes(bad, "sampling.planes")


def test_split_count_is_even_and_complete():
    assert split_count(10, PLANES) == [4, 3, 3]
    assert split_count(2, PLANES) == [1, 1, 0]
    assert sum(split_count(161, PLANES)) == 161
