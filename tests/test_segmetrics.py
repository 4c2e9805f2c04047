"""Dice per nodule / per scan and pixel-level counts on small volumes with hand-counted answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from noduleflow.segmetrics import (
    PixelCounts,
    dice,
    evaluated_slices,
    nodule_dice,
    pixel_counts,
    scan_dice,
    threshold_mask,
)


def test_dice_of_masks_and_the_empty_case():
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2, :2] = True   # 4 voxels
    b[0, :2, :1] = True   # 2 voxels, both inside a
    assert dice(a, b) == pytest.approx(2 * 2 / (4 + 2))
    assert dice(a, a) == 1.0
    assert math.isnan(dice(np.zeros(3, bool), np.zeros(3, bool)))
    assert dice(a, np.zeros_like(a)) == 0.0


def test_stored_uint8_probabilities_are_thresholded_as_v_over_255():
    v = np.array([0, 127, 128, 255], dtype=np.uint8)   # 127/255 = 0.498, 128/255 = 0.502
    assert threshold_mask(v, 0.5).tolist() == [False, False, True, True]
    assert threshold_mask(v.astype(np.float32) / 255, 0.5).tolist() == [False, False, True, True]
    assert threshold_mask(np.array([0.5, 0.51]), 0.5).tolist() == [False, True]  # strictly above


def test_nodule_dice_uses_a_box_with_a_margin_in_mm_and_ignores_the_neighbour():
    labels = np.zeros((20, 30, 30), np.uint8)
    labels[8:12, 5:9, 5:9] = 1       # 64 voxels
    labels[8:12, 5:9, 12:16] = 2     # 64 voxels, 3 voxels away in x
    spacing = (1.0, 1.0, 2.5)        # x, y, z mm: a 5 mm margin is 5 voxels in-plane, 2 in z
    pred = labels == 1               # nodule 1 perfect, nodule 2 not predicted
    pred = pred | (labels == 2)      # ...now nodule 2 perfect too: it sits in nodule 1's box
    result = nodule_dice(pred, labels, spacing, margin_mm=5.0)
    assert result == {1: 1.0, 2: 1.0}  # the neighbour's voxels do not count against nodule 1

    fp_near = pred.copy()
    fp_near[13, 10, 6] = True        # z 13 is within 2 slices of 8:12 -> in nodule 1's box
    fp_far = pred.copy()
    fp_far[15, 10, 6] = True         # z 15 is 4 slices away (10 mm) -> outside the box
    assert nodule_dice(fp_near, labels, spacing, 5.0)[1] == pytest.approx(2 * 64 / (65 + 64))
    assert nodule_dice(fp_far, labels, spacing, 5.0)[1] == 1.0

    half = labels == 1
    half[8:10] = False               # half of nodule 1 found, nodule 2 missed
    out = nodule_dice(half, labels, spacing, 5.0, ids=[1, 2, 3])
    assert out[1] == pytest.approx(2 * 32 / (32 + 64))
    assert out[2] == 0.0
    assert math.isnan(out[3])        # id 3 has no label voxels


def test_scan_dice_over_the_whole_volume():
    labels = np.zeros((4, 5, 5), np.uint8)
    labels[1, 1:3, 1:3] = 1
    labels[2, 3, 3] = 2
    pred = labels > 0
    assert scan_dice(pred, labels) == 1.0
    pred[0, 0, 0] = True
    assert scan_dice(pred, labels) == pytest.approx(2 * 5 / (6 + 5))
    assert math.isnan(scan_dice(np.zeros_like(pred), np.zeros_like(labels)))


def test_pixel_counts_cover_every_pixel_of_lung_slices_and_accumulate():
    lung = np.zeros((4, 3, 3), np.uint8)
    lung[1:3, 1, 1] = 1              # slices 1 and 2 contain lung
    labels = np.zeros((4, 3, 3), np.uint8)
    labels[1, 0, 0] = 1              # nodule pixel outside the lung mask, on a lung slice
    labels[3, 2, 2] = 1              # nodule on slice 3 (no lung): its slice is evaluated too
    pred = np.zeros((4, 3, 3), bool)
    pred[1, 0, 0] = True             # TP
    pred[2, 2, 2] = True             # FP
    pred[0, 1, 1] = True             # on slice 0 (no lung, no nodule): not evaluated
    slices = evaluated_slices(lung, labels)
    assert slices.tolist() == [False, True, True, True]
    counts = pixel_counts(pred, labels > 0, slices)
    assert counts == PixelCounts(tp=1, fp=1, fn=1, tn=27 - 3)   # 3 slices x 9 pixels
    m = counts.metrics()
    assert m["dice"] == pytest.approx(2 / 4)
    assert m["accuracy"] == pytest.approx(25 / 27)
    assert m["sensitivity"] == pytest.approx(1 / 2)
    assert m["specificity"] == pytest.approx(24 / 25)
    # counts are summed over scans, not averaged
    both = counts + PixelCounts(tp=3, fp=0, fn=0, tn=6)
    assert both.metrics()["dice"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))
    assert both.total == 36
    assert math.isnan(PixelCounts().metrics()["sensitivity"])
