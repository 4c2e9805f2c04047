"""Real CT through the pipeline: LIDC-IDRI-0001 as TCIA ships it, with no hand conversion, and the
same scan stored with permuted and flipped axes."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from noduleflow.io import read_annotations, voxel_to_world
from noduleflow.lidc import lidc_annotations
from noduleflow.lungmask import lung_mask_file
from noduleflow.preprocess import resample_scan
from noduleflow.slices import extract_slices, read_slice_store
from realct import LIDC_0001_UID, lidc_0001_series, realct_root
from workflow_helpers import copy_workflow, snakemake, write_config

#: the LUNA16 row of LIDC-IDRI-0001 (world mm x, y, z; diameter mm)
LUNA_NODULE = np.array([56.20840547, 86.34341278, -115.8675792])
LUNA_DIAMETER = 23.35064438


def _nodule_centroid(labels: np.ndarray, geometry, label: int = 1) -> np.ndarray:
    return voxel_to_world(np.argwhere(labels == label).mean(axis=0), geometry)


@pytest.mark.e2e
def test_the_lidc_download_is_preprocessed_without_conversion(tmp_path):
    """dataset.root = the realct folder (LIDC-IDRI layout): the slice store of LIDC-IDRI-0001 is built
    with the readers' consensus as its nodule label, which lies >= 97 % inside the lung mask."""
    root = realct_root()
    workdir = copy_workflow(tmp_path / "wf")
    write_config(workdir, {"dataset": {"root": str(root)}})
    snakemake(workdir, "preprocess", "results/lidc/annotations.csv", "--cores", "2", "--configfile", "tiny.yaml")
    table = read_annotations(workdir / "results/lidc/annotations.csv")
    assert table["seriesuid"].tolist() == [LIDC_0001_UID]
    excluded = read_annotations(workdir / "results/lidc/annotations_excluded.csv", allow_unknown_diameter=True)
    luna_excluded = read_annotations(root / "luna16/annotations_excluded.csv", allow_unknown_diameter=True)
    assert len(excluded) == int((luna_excluded["seriesuid"] == LIDC_0001_UID).sum())
    image, lung, nodule, geometry = read_slice_store(workdir / f"results/slices/{LIDC_0001_UID}.h5")
    assert geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert set(np.unique(nodule)) == {0, 1}
    # the consensus outline, not a ball: a 23 mm ball would hold ~6 700 voxels of 1 mm^3, and the
    # consensus is the readers' shape (within 2 mm of equivalent diameter of the LUNA16 row)
    volume = np.count_nonzero(nodule) * np.prod(geometry.spacing)
    assert abs((6 * volume / np.pi) ** (1 / 3) - LUNA_DIAMETER) < 2.0
    assert np.linalg.norm(_nodule_centroid(nodule, geometry) - LUNA_NODULE) < 1.5
    share = np.count_nonzero(nodule & lung) / np.count_nonzero(nodule)
    assert share >= 0.97
    logged = (workdir / f"results/logs/extract_slices/{LIDC_0001_UID}.log").read_text(encoding="utf-8")
    assert re.search(r"nodule 1: \d+\.\d % of its voxels inside the lung mask", logged)
    assert "exact mask" in (workdir / f"results/logs/resample/{LIDC_0001_UID}.log").read_text(encoding="utf-8")


def _preprocess(scan, mask, work, spacing):
    """resample -> lung mask -> slice store of one scan in ``work``; returns the store's arrays."""
    work.mkdir()
    annotations = work / "nodules.csv"
    frame = pd.read_csv(mask.parent / "nodules.csv", dtype={"seriesuid": str})
    frame.to_csv(annotations, index=False)
    resample_scan(scan, annotations, LIDC_0001_UID, work / "image.mha", work / "labels.mha", mask_path=mask,
                  spacing_mm=spacing)
    lung_mask_file(work / "image.mha", work / "lung.mha")
    extract_slices(work / "image.mha", work / "lung.mha", work / "labels.mha", LIDC_0001_UID, work / "slices.h5")
    return read_slice_store(work / "slices.h5")


def test_a_scan_with_permuted_and_flipped_axes_preprocesses_the_same(tmp_path, caplog):
    """The same scan stored with its axes permuted and flipped (and its consensus mask with it):
    the same lung volume (within 1 %) and the nodule at the same world position (within 1 mm)."""
    caplog.set_level(logging.INFO)
    series = lidc_0001_series()
    (tmp_path / "lidc").mkdir()
    lidc_annotations(series, None, tmp_path / "lidc/nodules.csv", tmp_path / "lidc/excluded.csv",
                     tmp_path / "lidc/mask.mha")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    scrambled_dir = tmp_path / "scrambled"
    scrambled_dir.mkdir()

    def scramble(image):
        return sitk.Flip(sitk.PermuteAxes(image, [1, 2, 0]), [True, True, False])

    sitk.WriteImage(scramble(sitk.Cast(reader.Execute(), sitk.sitkInt16)), str(scrambled_dir / "scan.nii.gz"))
    sitk.WriteImage(scramble(sitk.ReadImage(str(tmp_path / "lidc/mask.mha"))), str(scrambled_dir / "mask.mha"))
    (scrambled_dir / "nodules.csv").write_text((tmp_path / "lidc/nodules.csv").read_text(encoding="utf-8"))
    spacing = (1.5, 1.5, 1.5)
    original = _preprocess(series, tmp_path / "lidc/mask.mha", (tmp_path / "a"), spacing)
    again = _preprocess(scrambled_dir / "scan.nii.gz", scrambled_dir / "mask.mha", (tmp_path / "b"), spacing)
    lung_a, lung_b = np.count_nonzero(original[1]), np.count_nonzero(again[1])
    assert abs(lung_b - lung_a) <= 0.01 * lung_a
    centre_a = _nodule_centroid(original[2], original[3])
    centre_b = _nodule_centroid(again[2], again[3])
    assert np.linalg.norm(centre_a - centre_b) < 1.0
    assert np.linalg.norm(centre_a - LUNA_NODULE) < 1.5
