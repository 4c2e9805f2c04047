"""LUNA16 detection scoring: FROC curve, sensitivities at 1/8..8 false positives per scan, CPM.

The definitions follow the official LUNA16 evaluation script (``noduleCADEvaluationLUNA16.py``),
re-implemented here so the numbers agree with it on the same files:

* Only the most suspicious CAD marks of a scan are evaluated: when a scan has more than 100
  candidates, the 101st highest probability is taken as a cut and only candidates with a
  probability *strictly above* it are kept (ties at the cut are all dropped, as in the script).
* A candidate hits a finding when its squared distance (world mm) to the finding's centre is
  strictly less than the squared radius (``diameter_mm / 2``); a diameter below 0 (``-1`` in
  ``annotations_excluded.csv``) means 10 mm.
* An annotated nodule hit by one or more candidates is detected once, with the highest probability
  of the candidates on it; a missed nodule still counts in the number of nodules. A candidate on an
  excluded finding (and on no annotated nodule) counts neither way. Every other candidate is a
  false positive. One candidate may hit (and detect) two overlapping nodules.
* The FROC curve is scikit-learn's ROC curve over the detected nodules and false positives,
  rescaled: FPs per scan = FPR x number of false positives / number of evaluated scans (scans
  without nodules or candidates included), sensitivity = TPR x detected / all nodules. With no
  false positive at all the FP axis is 0 everywhere (as in the script).
* The seven sensitivities at 1/8, 1/4, 1/2, 1, 2, 4, 8 FPs per scan are ``np.interp`` on that curve
  (beyond the last point the curve's final sensitivity is used); CPM is their mean.

Where the script returns NaN or fails, this module defines the result instead:

* nodules but no detected one (or no candidate at all): sensitivity 0 at every FP rate;
* no nodule at all: sensitivities and CPM are NaN (written as ``null`` in JSON);
* bootstrap (scans resampled with replacement, ``numpy.random.default_rng(seed)``): a draw that
  contains no nodule has no sensitivity and is **skipped**; intervals use the remaining draws
  (``bootstrap_used``) with the script's order-statistic rule (sorted values at
  ``floor(0.025 n)`` and ``floor(0.975 n)``).

Command line::

    python -m noduleflow.froc --annotations A.csv --candidates C.csv [--excluded E.csv]
        [--seriesuids S.csv] [--bootstrap N] [--seed S] --out DIR

writes ``DIR/metrics.json``, ``DIR/froc.csv`` (fps_per_scan, sensitivity, threshold) and
``DIR/nodules.csv``. Without ``--seriesuids`` the evaluated scans are every scan named in the
annotations or the candidates (a scan named in neither cannot be known, so pass the list for
exact FPs per scan).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from noduleflow.io import (
    InputError,
    read_annotations,
    read_candidates,
    read_uid_list,
    write_csv_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

#: FPs per scan at which LUNA16 reads the sensitivities; CPM is the mean of the seven.
FPS_POINTS: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: the seven points as the plots and tables write them
FPS_LABELS: tuple[str, ...] = ("1/8", "1/4", "1/2", "1", "2", "4", "8")
#: candidates evaluated per scan (the official script's ``maxNumberOfCADMarks``)
MAX_CANDIDATES_PER_SCAN = 100
#: diameter used for excluded findings whose diameter is unknown (negative)
UNKNOWN_DIAMETER_MM = 10.0
#: confidence level of the bootstrap intervals
CONFIDENCE = 0.95
#: probability given to missed nodules in the FROC lists (they are removed before the ROC)
_MISSED_PROBABILITY = -1_000_000_000.0

#: candidate labels in :attr:`FrocResult.candidates`
TP, FP, EXCLUDED, DROPPED = "tp", "fp", "excluded", "dropped"


@dataclass
class FrocResult:
    """Everything :func:`compute_froc` measures. Curves are numpy arrays of equal length."""

    fps: np.ndarray                 # FROC curve, false positives per scan (non-decreasing)
    sensitivity: np.ndarray         # FROC curve, sensitivity at each point
    thresholds: np.ndarray          # candidate probability cut of each point (first is +inf)
    sensitivities: np.ndarray       # the seven sensitivities at FPS_POINTS
    cpm: float                      # their mean (NaN with no nodule)
    n_scans: int
    n_nodules: int
    n_detected: int
    n_candidates: int               # candidates of the evaluated scans kept for evaluation
    n_false_positives: int
    n_excluded_hits: int            # candidates ignored because they lie on excluded findings
    nodules: pd.DataFrame           # seriesuid, nodule_id, coordX..Z, diameter_mm, detected, probability
    candidates: pd.DataFrame        # the evaluated scans' candidates + label (tp|fp|excluded|dropped), nodule_id
    bootstrap: int = 0              # draws requested
    bootstrap_used: int = 0         # draws that contained at least one nodule
    seed: int = 0
    sensitivities_ci: np.ndarray = field(default_factory=lambda: np.full((len(FPS_POINTS), 2), np.nan))
    cpm_ci: np.ndarray = field(default_factory=lambda: np.full(2, np.nan))
    band_fps: np.ndarray | None = None      # bootstrap band for plots: FP grid (log-spaced 1/8..8)
    band_lower: np.ndarray | None = None
    band_upper: np.ndarray | None = None
    bootstrap_cpms: np.ndarray | None = None  # CPM of every used draw, in draw order

    @property
    def fps_points(self) -> list[float]:
        return list(FPS_POINTS)

    def curve_frame(self) -> pd.DataFrame:
        """The FROC curve as ``froc.csv`` holds it: fps_per_scan, sensitivity, threshold."""
        return pd.DataFrame({"fps_per_scan": self.fps, "sensitivity": self.sensitivity,
                             "threshold": self.thresholds})

    def summary(self) -> dict:
        """JSON-ready numbers (NaN -> None)."""
        return _jsonable({
            "n_scans": self.n_scans,
            "n_nodules": self.n_nodules,
            "n_detected": self.n_detected,
            "n_candidates": self.n_candidates,
            "n_false_positives": self.n_false_positives,
            "cpm": self.cpm,
            "cpm_ci": self.cpm_ci.tolist(),
            "fps_per_scan": list(FPS_POINTS),
            "sensitivities": self.sensitivities.tolist(),
            "sensitivities_ci": self.sensitivities_ci.tolist(),
            "bootstrap": self.bootstrap,
            "bootstrap_used": self.bootstrap_used,
            "seed": self.seed,
        })


# --------------------------------------------------------------------------- core


def froc_curve(is_nodule: np.ndarray, probability: np.ndarray, missed: np.ndarray,
               n_scans: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FROC curve from the script's lists: one entry per annotated nodule (``is_nodule`` 1; a
    missed one has ``missed`` True) and one per false positive (``is_nodule`` 0).

    Returns (fps per scan, sensitivity, thresholds). See the module docstring for the rules and
    for the degenerate cases this defines where the script gives NaN.
    """
    from sklearn.metrics import roc_curve

    is_nodule = np.asarray(is_nodule, dtype=float)
    probability = np.asarray(probability, dtype=float)
    keep = ~np.asarray(missed, dtype=bool)
    gt, prob = is_nodule[keep], probability[keep]
    n_lesions = float(is_nodule.sum())
    n_detected = float(gt.sum())
    n_fp = float(len(gt) - n_detected)
    if len(gt) == 0:
        # no candidate evaluated: a single point at the origin
        return np.zeros(1), np.full(1, 0.0 if n_lesions > 0 else np.nan), np.full(1, np.inf)
    if n_detected == 0 or n_fp == 0:
        # roc_curve needs both classes; build the same curve by hand for the one-class case
        thresholds = np.r_[np.inf, np.unique(prob)[::-1]]
        n_above = np.array([(prob >= t).sum() for t in thresholds], dtype=float)
        if n_detected == 0:
            fps = n_above / n_scans
            sens = np.zeros_like(fps) if n_lesions > 0 else np.full_like(fps, np.nan)
        else:
            fps = np.zeros_like(n_above)
            sens = n_above / n_lesions
        return fps, sens, thresholds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fpr, tpr, thresholds = roc_curve(gt, prob)
    fps = fpr * n_fp / n_scans
    sens = tpr * n_detected / n_lesions
    return fps, sens, thresholds


def sensitivities_at(fps: np.ndarray, sens: np.ndarray, points: Sequence[float] = FPS_POINTS) -> np.ndarray:
    """Linear interpolation of the FROC curve at ``points`` FPs per scan (``np.interp``)."""
    return np.interp(np.asarray(points, dtype=float), fps, sens)


def select_top_candidates(probabilities: np.ndarray, limit: int = MAX_CANDIDATES_PER_SCAN) -> np.ndarray:
    """Boolean mask of one scan's candidates that the script evaluates: all of them when there are
    at most ``limit``; otherwise those with a probability strictly above the (limit+1)-th highest."""
    probabilities = np.asarray(probabilities, dtype=float)
    if len(probabilities) <= limit:
        return np.ones(len(probabilities), dtype=bool)
    cut = np.sort(probabilities)[::-1][limit]
    return probabilities > cut


def _radius_squared(diameters: np.ndarray) -> np.ndarray:
    d = np.asarray(diameters, dtype=float)
    d = np.where(d < 0.0, UNKNOWN_DIAMETER_MM, d)
    return (d / 2.0) ** 2


def _hits(findings: np.ndarray, radius_sq: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(n_findings, n_points) bool: squared distance strictly below the squared radius."""
    if len(findings) == 0 or len(points) == 0:
        return np.zeros((len(findings), len(points)), dtype=bool)
    dx = findings[:, None, 0] - points[None, :, 0]
    dy = findings[:, None, 1] - points[None, :, 1]
    dz = findings[:, None, 2] - points[None, :, 2]
    dist = dx ** 2 + dy ** 2 + dz ** 2
    return dist < radius_sq[:, None]


def _scan_hits(nodules: pd.DataFrame, excluded: pd.DataFrame | None,
               points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One scan's findings against its candidate ``points`` (k, 3): the (nodules, k) hit matrix, and
    per candidate its label :data:`TP` / :data:`EXCLUDED` / :data:`FP` (a hit on a nodule wins over
    one on an excluded finding)."""
    hit_nod = _hits(nodules[_XYZ].to_numpy(dtype=float), _radius_squared(nodules["diameter_mm"].to_numpy()), points)
    if excluded is not None and len(excluded):
        hit_exc = _hits(excluded[_XYZ].to_numpy(dtype=float), _radius_squared(excluded["diameter_mm"].to_numpy()),
                        points)
    else:
        hit_exc = np.zeros((0, len(points)), dtype=bool)
    on_nodule = hit_nod.any(axis=0)
    on_excluded = hit_exc.any(axis=0) & ~on_nodule
    return hit_nod, np.where(on_nodule, TP, np.where(on_excluded, EXCLUDED, FP)).astype(object)


_XYZ = ["coordX", "coordY", "coordZ"]


def _check_frame(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"{what}: missing column(s) {', '.join(missing)}")


def candidate_outcomes(annotations: pd.DataFrame, candidates: pd.DataFrame,
                       excluded: pd.DataFrame | None = None) -> np.ndarray:
    """What each candidate row is under the LUNA16 rule, before any top-100 cut: :data:`TP` (inside
    an annotated nodule's radius), :data:`EXCLUDED` (only inside an excluded finding's) or
    :data:`FP`. The labels a second stage learns from (:mod:`noduleflow.rescore`)."""
    _check_frame(annotations, ["seriesuid", *_XYZ, "diameter_mm"], "annotations")
    _check_frame(candidates, ["seriesuid", *_XYZ], "candidates")
    out = np.full(len(candidates), FP, dtype=object)
    ann_by = {u: g for u, g in annotations.groupby("seriesuid", sort=False)}
    exc_by = {u: g for u, g in excluded.groupby("seriesuid", sort=False)} if excluded is not None else {}
    for uid, rows in candidates.groupby("seriesuid", sort=False).indices.items():
        points = candidates.iloc[rows][_XYZ].to_numpy(dtype=float)
        out[rows] = _scan_hits(ann_by.get(uid, annotations.iloc[0:0]), exc_by.get(uid), points)[1]
    return out


def compute_froc(annotations: pd.DataFrame, candidates: pd.DataFrame, seriesuids: Sequence[str],
                 excluded: pd.DataFrame | None = None, bootstrap: int = 0, seed: int = 0) -> FrocResult:
    """Score ``candidates`` against ``annotations`` on the scans ``seriesuids`` as LUNA16 does.

    ``annotations``/``excluded``: ``seriesuid,coordX,coordY,coordZ,diameter_mm`` (world mm);
    a nodule's id is its order among its scan's annotation rows, from 1. ``candidates``:
    ``seriesuid,coordX,coordY,coordZ,probability`` (extra columns are carried along). Rows of scans
    not in ``seriesuids`` are ignored. ``bootstrap`` > 0 adds 95 % intervals from that many
    seeded resamples of the scans.
    """
    _check_frame(annotations, ["seriesuid", *_XYZ, "diameter_mm"], "annotations")
    _check_frame(candidates, ["seriesuid", *_XYZ, "probability"], "candidates")
    if excluded is not None:
        _check_frame(excluded, ["seriesuid", *_XYZ, "diameter_mm"], "excluded annotations")
    uids = list(dict.fromkeys(str(u) for u in seriesuids))
    if not uids:
        raise InputError("compute_froc: no scans to evaluate (empty seriesuid list)")
    ann_by = {u: g for u, g in annotations.groupby("seriesuid", sort=False)}
    exc_by = {u: g for u, g in excluded.groupby("seriesuid", sort=False)} if excluded is not None else {}
    cand_by = {u: g for u, g in candidates.groupby("seriesuid", sort=False)}

    per_scan: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (is_nodule, prob, missed)
    nodule_rows, candidate_frames = [], []
    n_excluded_hits = 0
    for uid in uids:
        nod = ann_by.get(uid, annotations.iloc[0:0])
        exc = exc_by.get(uid)
        cand = cand_by.get(uid, candidates.iloc[0:0]).copy()
        probs = cand["probability"].to_numpy(dtype=float)
        kept = select_top_candidates(probs)
        points = cand[_XYZ].to_numpy(dtype=float)[kept]
        kept_probs = probs[kept]
        nod_xyz = nod[_XYZ].to_numpy(dtype=float)
        hit_nod, kept_labels = _scan_hits(nod, exc, points)
        on_nodule = kept_labels == TP
        false_pos = kept_labels == FP
        n_excluded_hits += int((kept_labels == EXCLUDED).sum())

        detected = hit_nod.any(axis=1)
        best = np.where(hit_nod, kept_probs[None, :], -np.inf).max(axis=1) if len(points) else \
            np.full(len(nod_xyz), -np.inf)
        is_nodule = np.r_[np.ones(len(nod_xyz)), np.zeros(int(false_pos.sum()))]
        prob = np.r_[np.where(detected, best, _MISSED_PROBABILITY), kept_probs[false_pos]]
        missed = np.r_[~detected, np.zeros(int(false_pos.sum()), dtype=bool)]
        per_scan.append((is_nodule, prob, missed))

        for i, (_, row) in enumerate(nod.iterrows()):
            nodule_rows.append({"seriesuid": uid, "nodule_id": i + 1, "coordX": float(row["coordX"]),
                                "coordY": float(row["coordY"]), "coordZ": float(row["coordZ"]),
                                "diameter_mm": float(row["diameter_mm"]), "detected": bool(detected[i]),
                                "probability": float(best[i]) if detected[i] else np.nan})
        labels = np.full(len(cand), DROPPED, dtype=object)
        labels[kept] = kept_labels
        nodule_id = np.zeros(len(cand), dtype=int)
        if len(points) and len(nod_xyz):
            first = np.where(on_nodule, hit_nod.argmax(axis=0) + 1, 0)
            nodule_id[kept] = first
        cand["label"] = labels
        cand["nodule_id"] = nodule_id
        candidate_frames.append(cand)

    is_nodule = np.concatenate([s[0] for s in per_scan])
    prob = np.concatenate([s[1] for s in per_scan])
    missed = np.concatenate([s[2] for s in per_scan])
    fps, sens, thresholds = froc_curve(is_nodule, prob, missed, len(uids))
    n_nodules = int(is_nodule.sum())
    if n_nodules:
        points7 = sensitivities_at(fps, sens)
        cpm = float(np.mean(points7))
    else:
        points7 = np.full(len(FPS_POINTS), np.nan)
        cpm = float("nan")
    nodules = pd.DataFrame(nodule_rows, columns=["seriesuid", "nodule_id", *_XYZ, "diameter_mm",
                                                 "detected", "probability"])
    cand_all = pd.concat(candidate_frames, ignore_index=True) if candidate_frames else candidates.iloc[0:0]
    result = FrocResult(
        fps=fps, sensitivity=sens, thresholds=thresholds, sensitivities=points7, cpm=cpm,
        n_scans=len(uids), n_nodules=n_nodules, n_detected=int((is_nodule.astype(bool) & ~missed).sum()),
        n_candidates=int((cand_all["label"] != DROPPED).sum()) if len(cand_all) else 0,
        n_false_positives=int((is_nodule == 0).sum()), n_excluded_hits=n_excluded_hits,
        nodules=nodules, candidates=cand_all, bootstrap=int(bootstrap), seed=int(seed))
    if bootstrap > 0:
        _bootstrap(result, per_scan, int(bootstrap), int(seed))
    log.info("FROC over %d scans: %d nodules, %d detected, %d false positives, CPM %s",
             result.n_scans, result.n_nodules, result.n_detected, result.n_false_positives,
             "n/a" if math.isnan(cpm) else f"{cpm:.4f}")
    return result


def subgroup_froc(annotations: pd.DataFrame, candidates: pd.DataFrame, seriesuids: Sequence[str],
                  groups: Sequence, excluded: pd.DataFrame | None = None) -> pd.DataFrame:
    """FROC of each subgroup of the nodules (size bins, textures, ...), the way LUNA16 analyses
    subgroups: for group ``g`` the nodules of ``g`` are the annotations, and every other nodule joins
    the excluded findings, so a candidate on a nodule of another group is neither a hit nor a false
    positive. ``groups``: one label per row of ``annotations`` (same order). False positives are
    those of the whole run, so the points are at the run's FPs per scan.

    Returns one row per group (in order of first appearance): ``group, n_nodules, n_detected``, the
    seven sensitivities ``sens_0.125 .. sens_8`` and ``cpm``.
    """
    labels = np.asarray(list(groups), dtype=object)
    if len(labels) != len(annotations):
        raise InputError(f"subgroup_froc: {len(labels)} group labels for {len(annotations)} annotations")
    others_columns = ["seriesuid", *_XYZ, "diameter_mm"]
    rows = []
    for group in dict.fromkeys(labels.tolist()):
        inside = labels == group
        others = annotations.loc[~inside, others_columns]
        excluded_here = others if excluded is None else pd.concat([excluded[others_columns], others],
                                                                  ignore_index=True)
        result = compute_froc(annotations.loc[inside].reset_index(drop=True), candidates, seriesuids,
                              excluded=excluded_here)
        rows.append({"group": group, "n_nodules": result.n_nodules, "n_detected": result.n_detected,
                     **{f"sens_{p:g}": float(s) for p, s in zip(FPS_POINTS, result.sensitivities)},
                     "cpm": result.cpm})
    return pd.DataFrame(rows)


def _order_statistic_ci(values: np.ndarray, confidence: float = CONFIDENCE) -> np.ndarray:
    """(lower, upper) along axis 0 as the script takes them: the sorted values at
    floor(p n) and floor((1 - p) n), p = (1 - confidence) / 2. NaN columns with no draw."""
    values = np.sort(values, axis=0)
    n = values.shape[0]
    if n == 0:
        return np.full((2,) + values.shape[1:], np.nan)
    p = (1.0 - confidence) / 2.0
    return np.stack([values[int(math.floor(p * n))], values[int(math.floor((1.0 - p) * n))]])


#: points of the bootstrap band drawn in plots (log-spaced, 1/8..8 FPs per scan)
BAND_FPS = np.geomspace(FPS_POINTS[0], FPS_POINTS[-1], 121)


def _bootstrap(result: FrocResult, per_scan: list, draws: int, seed: int) -> None:
    """Resample scans with replacement; fill the intervals of ``result`` in place."""
    rng = np.random.default_rng(seed)
    n = len(per_scan)
    lesions = np.array([s[0].sum() for s in per_scan])
    sens7, cpms, bands = [], [], []
    for i in range(draws):
        pick = rng.integers(0, n, size=n)
        if lesions[pick].sum() == 0:
            continue  # no nodule in this draw: sensitivity undefined, draw skipped
        gt = np.concatenate([per_scan[j][0] for j in pick])
        prob = np.concatenate([per_scan[j][1] for j in pick])
        missed = np.concatenate([per_scan[j][2] for j in pick])
        fps, sens, _ = froc_curve(gt, prob, missed, n)
        s7 = sensitivities_at(fps, sens)
        sens7.append(s7)
        cpms.append(s7.mean())
        bands.append(np.interp(BAND_FPS, fps, sens))
        if (i + 1) % 250 == 0:
            log.info("bootstrap %d/%d", i + 1, draws)
    result.bootstrap_used = len(cpms)
    if len(cpms) < draws:
        log.info("bootstrap: %d of %d draws contained no nodule and were skipped", draws - len(cpms), draws)
    if not cpms:
        return
    result.sensitivities_ci = _order_statistic_ci(np.array(sens7)).T
    result.cpm_ci = _order_statistic_ci(np.array(cpms)[:, None])[:, 0]
    result.bootstrap_cpms = np.array(cpms)
    lower, upper = _order_statistic_ci(np.array(bands))
    result.band_fps, result.band_lower, result.band_upper = BAND_FPS.copy(), lower, upper


# --------------------------------------------------------------------------- helpers, CLI


def _jsonable(value):
    """Replace NaN/inf floats by None, numpy scalars by Python ones, recursively."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def result_curve(label: str, result: FrocResult, band: bool = True, **style) -> dict:
    """A :func:`froc_figure` curve of ``result``: its FROC, its seven points, its bootstrap band (when
    it has one and ``band``), labelled ``label (CPM x.xxx)``; a result without nodules has no curve
    (``label (no nodules)`` in the legend). ``style``: keys as in froc_figure."""
    if result.n_nodules == 0 or math.isnan(result.cpm):   # no curve: in the legend only
        return {"label": label, "fps": [np.nan], "sensitivity": [np.nan], **style}
    has_band = band and result.band_fps is not None
    return {"label": f"{label} (CPM {result.cpm:.3f})", "fps": result.fps, "sensitivity": result.sensitivity,
            "points": result.sensitivities,
            "band": (result.band_fps, result.band_lower, result.band_upper) if has_band else None, **style}


def froc_figure(curves: Sequence[dict], title: str = "FROC"):
    """A matplotlib Figure of FROC curves on a log2 FP axis (1/8..8 per scan): the one FROC plot of
    every fold (``evaluate``), of the run (``report``) and of the experiments (``compare``).

    Each curve is a mapping with ``label``, ``fps`` and ``sensitivity`` (the curve's points),
    optional ``points`` (the seven sensitivities, marked), ``band`` ((fps, lower, upper) filled),
    ``lw``, ``style`` (matplotlib line style), ``color``, ``ms`` (marker size). A curve whose
    sensitivities are all NaN (no nodule) appears in the legend only. The curve is drawn as its
    linear interpolation (as the seven points are read) on a dense log-spaced grid.
    """
    from matplotlib.figure import Figure

    grid = np.geomspace(FPS_POINTS[0], FPS_POINTS[-1], 300)
    fig = Figure(figsize=(6.6, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    colors = [f"C{i}" for i in range(10)]
    for i, curve in enumerate(curves):
        color = curve.get("color", colors[i % len(colors)])
        fps = np.asarray(curve["fps"], dtype=float)
        sens = np.asarray(curve["sensitivity"], dtype=float)
        ok = ~(np.isnan(fps) | np.isnan(sens))
        if not ok.any():
            ax.plot([], [], color=color, label=f"{curve['label']} (no nodules)")
            continue
        order = np.argsort(fps[ok], kind="stable")
        y = np.interp(grid, fps[ok][order], sens[ok][order])
        if curve.get("band") is not None:
            bfps, lower, upper = (np.asarray(v, dtype=float) for v in curve["band"])
            ax.fill_between(bfps, lower, upper, color=color, alpha=0.15, lw=0)
        ax.plot(grid, y, color=color, lw=curve.get("lw", 1.5), ls=curve.get("style", "-"), label=curve["label"])
        if curve.get("points") is not None:
            ax.plot(FPS_POINTS, np.asarray(curve["points"], dtype=float), "o", color=color,
                    ms=curve.get("ms", 4))
    ax.set_xscale("log", base=2)
    ax.set_xlim(FPS_POINTS[0], FPS_POINTS[-1])
    ax.set_xticks(FPS_POINTS)
    ax.set_xticklabels(FPS_LABELS)
    ax.minorticks_off()
    ax.set_ylim(0.0, 1.02)
    ax.set_yticks(np.linspace(0, 1, 11))
    ax.grid(True, alpha=0.35)
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


def write_json_atomic(data: dict, path: str | Path) -> None:
    """Write ``data`` as indented JSON (NaN -> null) atomically."""
    write_text_atomic(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n", path)


def run(annotations_path: str | Path, candidates_path: str | Path, out_dir: str | Path,
        excluded_path: str | Path | None = None, seriesuids_path: str | Path | None = None,
        bootstrap: int = 0, seed: int = 0) -> FrocResult:
    """Read the CSVs (InputError naming a bad file), score, write ``out_dir``/metrics.json,
    froc.csv and nodules.csv."""
    annotations = read_annotations(annotations_path)
    candidates = read_candidates(candidates_path)
    excluded = read_annotations(excluded_path, allow_unknown_diameter=True) if excluded_path else None
    uids = read_uid_list(seriesuids_path) if seriesuids_path else None
    if uids is None:
        uids = list(dict.fromkeys(list(annotations["seriesuid"]) + list(candidates["seriesuid"])))
        if not uids:
            raise InputError(f"{annotations_path}, {candidates_path}: no scans named; pass --seriesuids")
    elif not uids:
        raise InputError(f"{seriesuids_path}: no seriesuids listed")
    result = compute_froc(annotations, candidates, uids, excluded=excluded, bootstrap=bootstrap, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(result.curve_frame(), out / "froc.csv")
    write_csv_atomic(result.nodules, out / "nodules.csv")
    write_json_atomic(result.summary(), out / "metrics.json")
    return result


def main(argv: Sequence[str] | None = None) -> FrocResult:
    parser = argparse.ArgumentParser(prog="python -m noduleflow.froc",
                                     description="LUNA16 FROC/CPM of a candidates CSV.")
    parser.add_argument("--annotations", required=True, help="annotations.csv (LUNA16 format)")
    parser.add_argument("--candidates", required=True, help="candidates/submission CSV")
    parser.add_argument("--excluded", help="annotations_excluded.csv (optional)")
    parser.add_argument("--seriesuids", help="scans to evaluate: one uid per line or a seriesuid column")
    parser.add_argument("--bootstrap", type=int, default=0, help="bootstrap draws (0 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error("--bootstrap must be >= 0")
    return run(args.annotations, args.candidates, args.out, excluded_path=args.excluded,
               seriesuids_path=args.seriesuids, bootstrap=args.bootstrap, seed=args.seed)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = main()
    except InputError as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(res.summary(), indent=2))
