"""noduleflow.slices: the HDF5 slice store gives back exactly what was resampled, in world mm."""

import h5py
import numpy as np
import pytest
from scipy import ndimage as ndi

from noduleflow.io import Geometry, InputError, read_image, voxel_to_world, world_to_voxel, write_image
from noduleflow.lungmask import lung_mask_file
from noduleflow.preprocess import resample_scan
from noduleflow.slices import (extract_slices, read_geometry, read_slice_range, read_slice_store, read_slices,
                               slice_table, store_info)
from phantom import cached_phantom, write_phantom


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Phantom -> resample (exact mask) -> lung mask -> slice store; returns paths and the phantom."""
    ph = cached_phantom()
    root = tmp_path_factory.mktemp("slices")
    files = write_phantom(ph, root / "data")
    image, labels = root / "resampled" / f"{ph.uid}.mha", root / "resampled" / f"{ph.uid}_nodules.mha"
    resample_scan(files["scan"], files["annotations"], ph.uid, image, labels, mask_path=files["mask"])
    lung = root / "lungmask" / f"{ph.uid}.mha"
    lung_mask_file(image, lung)
    out = root / "slices" / f"{ph.uid}.h5"
    extract_slices(image, lung, labels, ph.uid, out)
    return {"image": image, "labels": labels, "lung": lung, "h5": out, "phantom": ph}


def test_slices_equal_the_resampled_arrays(store):
    image, lung, nodule, geometry = read_slice_store(store["h5"])
    expected_image, expected_geometry = read_image(store["image"])
    assert image.dtype == np.int16 and lung.dtype == np.uint8 and nodule.dtype == np.uint8
    assert np.array_equal(image, expected_image)
    assert np.array_equal(lung, read_image(store["lung"])[0])
    assert np.array_equal(nodule, read_image(store["labels"])[0])
    assert geometry == expected_geometry


def test_layout_one_compressed_chunk_per_axial_slice_and_contract_attributes(store):
    with h5py.File(store["h5"], "r", locking=False) as f:
        for name in ("image", "lung", "nodule"):
            assert f[name].chunks == (1,) + f[name].shape[1:]
            assert f[name].compression in ("gzip", "lzf")
        assert f.attrs["seriesuid"] == store["phantom"].uid
        geometry = read_image(store["image"])[1]
        for key, value in geometry.as_attrs().items():
            assert list(f.attrs[key]) == value


def test_world_coordinates_from_the_attributes_give_back_the_annotations(store):
    ph = store["phantom"]
    geometry = read_geometry(store["h5"])
    _, _, nodule, _ = read_slice_store(store["h5"])
    annotated = ph.nodules[["coordX", "coordY", "coordZ"]].to_numpy()
    # the voxel an annotation maps to, mapped back, is the annotation (no drift through the file)
    assert np.allclose(voxel_to_world(world_to_voxel(annotated, geometry), geometry), annotated)
    # and each stored nodule's centroid lies within 1 mm of its annotation
    centroids = ndi.center_of_mass(np.ones_like(nodule), nodule, range(1, len(annotated) + 1))
    assert np.linalg.norm(voxel_to_world(np.asarray(centroids), geometry) - annotated, axis=1).max() < 1.0
    # the annotated centre voxel itself carries the nodule's id (solid spheres)
    for label, centre in enumerate(world_to_voxel(annotated, geometry), start=1):
        assert nodule[tuple(np.rint(centre).astype(int))] == label


def test_slice_table_counts_lung_and_nodule_pixels(store):
    _, lung, nodule, _ = read_slice_store(store["h5"])
    table = slice_table(store["h5"])
    assert list(table["z"]) == list(range(lung.shape[0]))
    assert np.array_equal(table["lung_pixels"], (lung > 0).sum(axis=(1, 2)))
    assert np.array_equal(table["nodule_pixels"], (nodule > 0).sum(axis=(1, 2)))
    for z in np.flatnonzero(table["nodule_pixels"].to_numpy()):
        ids = {i for i in range(1, 65) if int(table["nodule_ids"][z]) >> (i - 1) & 1}
        assert ids == set(np.unique(nodule[z])) - {0}


def test_cheap_readers(store):
    image, lung, nodule, geometry = read_slice_store(store["h5"])
    part = read_slice_range(store["h5"], 10, 14, datasets=("image", "nodule"))
    assert set(part) == {"image", "nodule"} and np.array_equal(part["image"], image[10:14])
    assert read_slice_range(store["h5"], -5, 2)["lung"].shape[0] == 2
    picked = read_slices(store["h5"], [7, 3, 7])
    assert np.array_equal(picked["nodule"], nodule[[7, 3, 7]])
    info = store_info(store["h5"])
    assert info["seriesuid"] == store["phantom"].uid and info["shape"] == image.shape
    assert info["geometry"] == geometry


def test_readers_do_not_lock_the_file(store, monkeypatch):
    seen = []
    original = h5py.File

    def spy(*args, **kwargs):
        seen.append(kwargs.get("locking"))
        return original(*args, **kwargs)

    monkeypatch.setattr(h5py, "File", spy)
    read_slice_store(store["h5"])
    slice_table(store["h5"])
    read_slice_range(store["h5"], 0, 1)
    assert seen and all(flag is False for flag in seen)


def test_inputs_on_different_grids_fail_before_writing(store, tmp_path):
    lung, geometry = read_image(store["lung"])
    shifted = Geometry(geometry.spacing, (geometry.origin[0] + 2.0, *geometry.origin[1:]), geometry.direction)
    write_image(lung, shifted, tmp_path / "lung.mha")
    out = tmp_path / "out" / "x.h5"
    with pytest.raises(InputError, match=r"lung\.mha: origin"):
        extract_slices(store["image"], tmp_path / "lung.mha", store["labels"], "x", out)
    assert not out.exists() and not out.parent.exists() or list(out.parent.iterdir()) == []


def test_missing_store_names_the_file(tmp_path):
    with pytest.raises(InputError, match="nothere.h5"):
        read_slice_store(tmp_path / "nothere.h5")
