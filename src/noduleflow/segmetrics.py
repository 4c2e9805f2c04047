"""Segmentation metrics: Dice per nodule, Dice per scan, and pixel-level counts over whole slices.

All arrays are numpy (z, y, x) on the resampled grid; ``spacing`` is (x, y, z) in mm as everywhere
in noduleflow. A prediction is a boolean mask (thresholded probabilities, see
:func:`threshold_mask`); truth is a label map (0 background, nodule ``i`` = label ``i``).

Definitions (the numbers written to ``metrics.json``):

* **Dice per nodule**: inside the bounding box of the nodule's label voxels grown by ``margin_mm``
  on every side (clipped to the volume), the prediction against ``label == id``. Voxels of *other*
  nodules inside the box are left out of the comparison, so a neighbour does not count against
  this nodule. A nodule with no label voxels has no Dice (NaN).
* **Dice per scan**: the whole volume, prediction against ``label > 0``. Undefined (NaN) when the
  scan has neither label nor predicted voxels; the mean per scan is taken over scans that contain
  nodule label voxels (false positives on nodule-free scans are measured by FROC and by the
  pixel specificity).
* **Pixel-level** Dice, accuracy, sensitivity, specificity (as in Chiu, Tsai & Su 2021, Table 2):
  TP/FP/FN/TN counted over **every pixel of every evaluated slice** of a scan and summed over scans
  (counts accumulated, not per-slice or per-scan averages). The evaluated slices are the axial
  slices that contain lung (lung mask) or nodule label voxels — the same slices whether or not the
  model was restricted to the lung, so experiments with and without lung ROI are scored on the same
  pixels. ``dice = 2TP/(2TP+FP+FN)``, ``accuracy = (TP+TN)/N``, ``sensitivity = TP/(TP+FN)``,
  ``specificity = TN/(TN+FP)``; NaN when a denominator is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


def threshold_mask(probability: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask ``p > threshold``. A uint8 volume is read as ``p = v / 255`` (exactly, via a
    lookup table, without a float copy of the volume); a float volume is compared directly."""
    probability = np.asarray(probability)
    if probability.dtype == np.uint8:
        lut = (np.arange(256, dtype=np.float64) / 255.0) > threshold
        return lut[probability]
    return probability > threshold


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    denom = int(pred.sum()) + int(truth.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, truth).sum()) / denom


def nodule_boxes(labels: np.ndarray, spacing: Sequence[float], margin_mm: float = 5.0,
                 ids: Iterable[int] | None = None) -> dict[int, tuple[slice, slice, slice]]:
    """Each nodule's Dice box: the bounding box (z, y, x slices) of its label voxels grown by
    ``margin_mm`` on every side, clipped to the volume. ``labels`` integer (z, y, x), ``spacing``
    (x, y, z) mm. ``ids``: the nodules wanted (default every label present); an id absent from
    ``labels`` has no box (it is left out of the result)."""
    from scipy import ndimage

    labels = np.asarray(labels)
    objects = ndimage.find_objects(labels.astype(np.int32, copy=False)) if labels.any() else []
    present = {i + 1 for i, box in enumerate(objects) if box is not None}
    grow = [int(math.ceil(margin_mm / float(s))) for s in tuple(spacing)[::-1]]  # z, y, x voxels
    wanted = sorted(present) if ids is None else [int(i) for i in ids]
    return {nid: tuple(slice(max(0, sl.start - g), min(n, sl.stop + g))
                       for sl, g, n in zip(objects[nid - 1], grow, labels.shape))
            for nid in wanted if nid in present}


def nodule_dice(pred: np.ndarray, labels: np.ndarray, spacing: Sequence[float], margin_mm: float = 5.0,
                ids: Iterable[int] | None = None) -> dict[int, float]:
    """Dice of each nodule in its box (:func:`nodule_boxes`); see module docstring.

    ``pred`` bool (z, y, x), ``labels`` integer (z, y, x), ``spacing`` (x, y, z) mm. ``ids``: the
    nodule ids to score (default: every label present); an id absent from ``labels`` gets NaN.
    """
    pred = np.asarray(pred, dtype=bool)
    labels = np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"prediction shape {pred.shape} != label shape {labels.shape}")
    boxes = nodule_boxes(labels, spacing, margin_mm, ids)
    out: dict[int, float] = {}
    for nid in (sorted(boxes) if ids is None else [int(i) for i in ids]):
        if nid not in boxes:
            out[nid] = float("nan")
            continue
        lab = labels[boxes[nid]]
        truth = lab == nid
        other = (lab > 0) & ~truth
        out[nid] = dice(pred[boxes[nid]] & ~other, truth)
    return out


def scan_dice(pred: np.ndarray, labels: np.ndarray) -> float:
    """Dice of the whole volume against ``labels > 0`` (NaN when both are empty)."""
    return dice(pred, np.asarray(labels) > 0)


def evaluated_slices(lung: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Bool (z,): axial slices that contain lung, or nodule label voxels."""
    keep = np.asarray(lung).reshape(lung.shape[0], -1).any(axis=1)
    if labels is not None:
        keep |= np.asarray(labels).reshape(labels.shape[0], -1).any(axis=1)
    return keep


@dataclass
class PixelCounts:
    """Pixel confusion counts; add them up over scans with ``+``."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: "PixelCounts") -> "PixelCounts":
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}

    def metrics(self) -> dict[str, float]:
        """Pixel-level dice, accuracy, sensitivity, specificity (NaN for a zero denominator)."""
        def ratio(num: int, den: int) -> float:
            return num / den if den else float("nan")

        return {"dice": ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn),
                "accuracy": ratio(self.tp + self.tn, self.total),
                "sensitivity": ratio(self.tp, self.tp + self.fn),
                "specificity": ratio(self.tn, self.tn + self.fp)}


def pixel_counts(pred: np.ndarray, truth: np.ndarray, slices: np.ndarray | None = None) -> PixelCounts:
    """Confusion counts of bool masks ``pred`` vs ``truth`` (z, y, x) over the slices selected by
    the bool (z,) ``slices`` (all slices when None), every pixel of each selected slice."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    if slices is not None:
        pred, truth = pred[slices], truth[slices]
    tp = int(np.count_nonzero(pred & truth))
    n_pred = int(np.count_nonzero(pred))
    n_true = int(np.count_nonzero(truth))
    fp, fn = n_pred - tp, n_true - tp
    return PixelCounts(tp=tp, fp=fp, fn=fn, tn=int(pred.size) - tp - fp - fn)
