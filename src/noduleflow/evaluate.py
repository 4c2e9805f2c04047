"""Evaluation of one fold (or any set of scans): LUNA16 FROC/CPM, Dice per nodule and per scan,
pixel-level metrics, and the FROC plot.

:func:`evaluate_fold` is the ``evaluate`` rule: the fold's held-out scans (``folds.csv``), the
annotations restricted to them, the fold's candidates and probability volumes. It calls
:func:`evaluate_scans_detail`, which measures every scan from its probability volume and slice store.
The pooled report does not measure again: :func:`evaluate_from_tables` pools the rows the folds saved.

Segmentation metrics threshold the stored probabilities (uint8, ``p = v/255``) at ``p > t`` where
``t`` is the threshold ``predict`` used, read from ``threshold.json`` in the probabilities folder
(so candidates and Dice always share one cut); definitions in :mod:`noduleflow.segmetrics`.
Detection metrics follow :mod:`noduleflow.froc`. A nodule's id (its label in the label map) is its
order among its scan's annotation rows, from 1.

Per-scan and per-nodule rows are written beside ``metrics.json`` (``scans.csv``, ``nodules.csv``) so
that the pooled report (:func:`evaluate_from_tables`) sums them instead of reading every probability
volume and slice store a second time. So are the image crops the report's gallery may show (the
``crops/`` folder and its index ``crops.csv``, :mod:`noduleflow.crops`): drawn here, from the
volumes already in memory (and the image slices through the findings), so the report reads no
probability volume and no slice store at all.

``scans.csv`` columns (:data:`SCAN_COLUMNS`), one row per evaluated scan in the fold's order:
``seriesuid``; ``n_nodules`` (its annotation rows); ``has_label`` (it has nodule label voxels: the
scans ``dice_per_scan_mean`` averages over); ``dice`` (Dice per scan, empty when undefined);
``tp, fp, fn, tn`` (its pixel counts over its evaluated slices); ``threshold`` (the ``p > t`` cut).

``metrics.json`` keys: ``fold``; ``n_scans``, ``n_nodules`` (annotated, evaluated scans);
``n_candidates`` (candidate rows on the evaluated scans, before the 100-per-scan cut); ``cpm``,
``cpm_ci`` [lo, hi]; ``fps_per_scan`` (the seven points), ``sensitivities``, ``sensitivities_ci``;
``dice_per_nodule_mean`` (all annotated nodules, a missed one usually scoring 0),
``dice_detected_nodule_mean`` (nodules detected in the FROC sense), ``dice_per_scan_mean`` (scans
with nodule label voxels); ``pixel`` {dice, accuracy, sensitivity, specificity}; ``bootstrap``
(draws requested). Extras: ``bootstrap_used`` (draws with at least one nodule), ``seed``,
``n_detected``, ``n_false_positives``, ``threshold``, ``dice_margin_mm``, ``pixel_counts``
{tp, fp, fn, tn}. Undefined values (no nodule, empty denominators) are ``null``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from noduleflow.crops import (CANDIDATE_ROW, GALLERY_SIZE, render_crops, select_findings, with_candidate_rows,
                               write_crops)
from noduleflow.froc import FPS_POINTS, FrocResult, compute_froc, froc_figure, result_curve, write_json_atomic
from noduleflow.io import (
    Geometry,
    InputError,
    atomic_path,
    open_h5,
    read_annotations,
    read_candidates,
    read_image,
    read_uid_table,
    write_csv_atomic,
)
from noduleflow.predict import heldout_slice_paths, read_threshold
from noduleflow.segmetrics import (
    PixelCounts,
    evaluated_slices,
    nodule_dice,
    pixel_counts as count_pixels,
    scan_dice,
    threshold_mask,
)

log = logging.getLogger(__name__)

NODULE_COLUMNS = ["seriesuid", "nodule_id", "coordX", "coordY", "coordZ", "diameter_mm", "detected",
                  "probability", "dice"]
#: columns of ``scans.csv`` (and of :attr:`Evaluation.scans`)
SCAN_COLUMNS = ["seriesuid", "n_nodules", "has_label", "dice", "tp", "fp", "fn", "tn", "threshold"]
_COUNT_COLUMNS = ["tp", "fp", "fn", "tn"]
#: threshold used when a probabilities folder has no threshold.json (older outputs)
DEFAULT_THRESHOLD = 0.5


@dataclass
class Evaluation:
    """Everything :func:`evaluate_scans_detail` measures."""

    metrics: dict                 # the metrics.json numbers (without "fold")
    froc: FrocResult              # curves, intervals, per-candidate labels
    nodules: pd.DataFrame         # NODULE_COLUMNS
    scans: pd.DataFrame           # SCAN_COLUMNS, one row per scan
    pixel: PixelCounts            # summed over the scans
    #: the findings drawn (:func:`noduleflow.crops.select_findings`; None: none asked for) and
    #: their PNGs by row position
    crops: pd.DataFrame | None = None
    crop_pngs: dict[int, bytes] = field(default_factory=dict)


# --------------------------------------------------------------------------- per scan


def read_truth(slice_path: str | Path) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """(lung uint8, nodule labels uint8, Geometry) of a slice store, without reading the image."""
    path = Path(slice_path)
    with open_h5(path) as f:
        missing = [d for d in ("lung", "nodule") if d not in f]
        if missing:
            raise InputError(f"{path}: slice store lacks dataset(s) {', '.join(missing)}")
        try:
            geometry = Geometry.from_attrs(f.attrs)
        except KeyError as exc:
            raise InputError(f"{path}: slice store lacks attribute {exc}") from exc
        return f["lung"][()], f["nodule"][()], geometry


def read_probability(path: str | Path, geometry: Geometry | None = None, shape=None) -> np.ndarray:
    """A stored probability volume (uint8 0..255 or float) checked against the scan's grid."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: probability volume not found")
    array, geom = read_image(path)
    if shape is not None and array.shape != tuple(shape):
        raise InputError(f"{path}: shape {array.shape} differs from the slice store's {tuple(shape)}")
    if geometry is not None and not (np.allclose(geom.spacing, geometry.spacing, atol=1e-4)
                                     and np.allclose(geom.origin, geometry.origin, atol=1e-3)):
        raise InputError(f"{path}: grid (spacing {geom.spacing}, origin {geom.origin}) differs from the "
                         f"slice store's (spacing {geometry.spacing}, origin {geometry.origin})")
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{path}: probabilities must be uint8 (p = v/255) or float, got {array.dtype}")
    return array


def pixel_counts(probability_path: str | Path, slice_path: str | Path, threshold: float) -> PixelCounts:
    """Pixel confusion counts of one scan: ``p > threshold`` vs nodule labels over its evaluated
    slices (slices with lung or nodule voxels, every pixel; see :mod:`noduleflow.segmetrics`)."""
    lung, labels, geometry = read_truth(slice_path)
    prob = read_probability(probability_path, geometry, labels.shape)
    return count_pixels(threshold_mask(prob, threshold), labels > 0, evaluated_slices(lung, labels))


# --------------------------------------------------------------------------- a set of scans


def _nanmean(values) -> float:
    values = np.asarray(list(values), dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def evaluate_scans_detail(candidates_df: pd.DataFrame, probability_paths: Mapping[str, str | Path],
                          slice_paths: Mapping[str, str | Path], annotations_df: pd.DataFrame,
                          excluded_df: pd.DataFrame | None, uids: Sequence[str], bootstrap: int = 1000,
                          seed: int = 0, dice_margin_mm: float = 5.0,
                          threshold: float | None = None, crops: int | None = None) -> Evaluation:
    """Evaluate the scans ``uids``: FROC (annotations/candidates of other scans are ignored), Dice
    per nodule and per scan, pixel counts. ``threshold`` None: each probability volume's folder's
    ``threshold.json`` (see :func:`noduleflow.predict.read_threshold`). ``crops`` (a gallery size
    n): also draw the crops of every missed nodule and of the false positives down to the n-th
    highest probability (:func:`noduleflow.crops.select_findings`; a candidate is identified by its
    row in ``candidates_df`` unless it has a :data:`noduleflow.crops.CANDIDATE_ROW` column)."""
    uids = list(dict.fromkeys(uids))
    if not uids:
        raise InputError("evaluate: no scans to evaluate")
    for name, mapping in (("probability volume", probability_paths), ("slice store", slice_paths)):
        missing = [u for u in uids if u not in mapping]
        if missing:
            raise InputError(f"evaluate: scan {missing[0]} has no {name} ({len(missing)} missing)")
    wanted = set(uids)
    if crops is not None and CANDIDATE_ROW not in candidates_df.columns:
        candidates_df = with_candidate_rows(candidates_df)
    annotations = annotations_df[annotations_df["seriesuid"].isin(wanted)]
    candidates = candidates_df[candidates_df["seriesuid"].isin(wanted)]
    excluded = excluded_df[excluded_df["seriesuid"].isin(wanted)] if excluded_df is not None else None
    froc = compute_froc(annotations, candidates, uids, excluded=excluded, bootstrap=bootstrap, seed=seed)
    findings = (select_findings(froc.nodules, froc.candidates, crops).reset_index(drop=True)
                if crops is not None else None)
    crop_pngs: dict[int, bytes] = {}

    n_annot = annotations.groupby("seriesuid").size().to_dict()
    thresholds: dict[Path, float] = {}
    dice_by_nodule: dict[tuple[str, int], float] = {}
    scan_rows = []
    started = time.perf_counter()
    for i, uid in enumerate(uids, start=1):
        prob_path = Path(probability_paths[uid])
        if threshold is None:
            folder = prob_path.parent
            if folder not in thresholds:
                thresholds[folder] = read_threshold(folder, default=DEFAULT_THRESHOLD)
            t = thresholds[folder]
        else:
            t = float(threshold)
        lung, labels, geometry = read_truth(slice_paths[uid])
        prob = read_probability(prob_path, geometry, labels.shape)
        pred = threshold_mask(prob, t)
        ids = range(1, int(n_annot.get(uid, 0)) + 1)
        for nid, value in nodule_dice(pred, labels, geometry.spacing, dice_margin_mm, ids).items():
            dice_by_nodule[(uid, nid)] = value
        counts = count_pixels(pred, labels > 0, evaluated_slices(lung, labels))
        if findings is not None:
            mine = findings[findings["seriesuid"] == uid]
            for position, png in zip(mine.index, render_crops(mine, slice_paths[uid], labels, pred.__getitem__,
                                                              geometry)):
                crop_pngs[int(position)] = png
        scan_rows.append({"seriesuid": uid, "n_nodules": int(n_annot.get(uid, 0)),
                          "has_label": bool(labels.any()), "dice": scan_dice(pred, labels),
                          **counts.as_dict(), "threshold": t})
        if i % 10 == 0 or i == len(uids):
            log.info("segmentation metrics: %d/%d scans (%.1f s)", i, len(uids), time.perf_counter() - started)
    scans = pd.DataFrame(scan_rows, columns=SCAN_COLUMNS)
    ev = _evaluation(froc, int(len(candidates)), scans, dice_by_nodule, bootstrap, seed, dice_margin_mm)
    ev.crops, ev.crop_pngs = findings, crop_pngs
    return ev


def _evaluation(froc: FrocResult, n_candidates: int, scans: pd.DataFrame,
                dice_by_nodule: Mapping[tuple[str, int], float], bootstrap: int, seed: int,
                dice_margin_mm: float) -> Evaluation:
    """The metrics of a set of scans from its FROC result, its per-scan rows (:data:`SCAN_COLUMNS`,
    in the scans' order) and its per-nodule Dice. The one place both :func:`evaluate_scans_detail`
    (from the volumes) and :func:`evaluate_from_tables` (from saved rows) turn rows into numbers,
    so the two agree exactly on equal rows."""
    nodules = froc.nodules.copy()
    nodules["dice"] = [dice_by_nodule.get((u, int(n)), float("nan"))
                       for u, n in zip(nodules["seriesuid"], nodules["nodule_id"])]
    nodules = nodules[NODULE_COLUMNS]
    total = PixelCounts(*(int(scans[c].sum()) for c in _COUNT_COLUMNS)) if len(scans) else PixelCounts()
    labelled = scans[scans["has_label"].astype(bool)] if len(scans) else scans
    thresholds_used = sorted(set(scans["threshold"])) if len(scans) else []
    metrics = {
        "n_scans": froc.n_scans,
        "n_nodules": froc.n_nodules,
        "n_candidates": int(n_candidates),
        "cpm": froc.cpm,
        "cpm_ci": froc.cpm_ci.tolist(),
        "fps_per_scan": list(FPS_POINTS),
        "sensitivities": froc.sensitivities.tolist(),
        "sensitivities_ci": froc.sensitivities_ci.tolist(),
        "dice_per_nodule_mean": _nanmean(nodules["dice"]),
        "dice_detected_nodule_mean": _nanmean(nodules.loc[nodules["detected"].astype(bool), "dice"]),
        "dice_per_scan_mean": _nanmean(labelled["dice"]) if len(labelled) else float("nan"),
        "pixel": total.metrics(),
        "bootstrap": int(bootstrap),
        # extras beyond the contract's keys
        "bootstrap_used": froc.bootstrap_used,
        "seed": int(seed),
        "n_detected": froc.n_detected,
        "n_false_positives": froc.n_false_positives,
        "threshold": thresholds_used[0] if len(thresholds_used) == 1 else thresholds_used,
        "dice_margin_mm": float(dice_margin_mm),
        "pixel_counts": total.as_dict(),
    }
    return Evaluation(metrics=metrics, froc=froc, nodules=nodules, scans=scans, pixel=total)


# --------------------------------------------------------------------------- from saved rows


def _read_csv(path: str | Path, what: str, columns: Sequence[str]) -> pd.DataFrame:
    return read_uid_table(path, columns, not_found=f"{what} not found")


def read_scan_table(path: str | Path) -> pd.DataFrame:
    """A fold's ``scans.csv`` (:data:`SCAN_COLUMNS`), checked: one row per scan, whole non-negative
    counts, ``has_label`` true/false, numeric Dice (empty = undefined) and threshold."""
    path = Path(path)
    frame = _read_csv(path, "per-scan table (scans.csv, written by evaluate)", SCAN_COLUMNS)
    duplicated = frame["seriesuid"][frame["seriesuid"].duplicated()]
    if len(duplicated):
        raise InputError(f"{path}: scan {duplicated.iloc[0]} has more than one row")
    for column in ["n_nodules", *_COUNT_COLUMNS]:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() | (values < 0) | (values != values.round())
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{path}: line {row + 2}: {column} = {frame[column].iloc[row]!r} is not a count")
        frame[column] = values.astype(np.int64)
    flags = frame["has_label"].map(lambda v: {"true": True, "false": False}.get(str(v).strip().lower()))
    if flags.isna().any():
        row = int(np.flatnonzero(flags.isna().to_numpy())[0])
        raise InputError(f"{path}: line {row + 2}: has_label = {frame['has_label'].iloc[row]!r} is not True/False")
    frame["has_label"] = flags.astype(bool)
    for column in ("dice", "threshold"):
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() if column == "threshold" else values.isna() & frame[column].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{path}: line {row + 2}: {column} = {frame[column].iloc[row]!r} is not a number")
        frame[column] = values.astype(float)
    return frame[SCAN_COLUMNS]


def read_nodule_table(path: str | Path) -> pd.DataFrame:
    """A fold's ``nodules.csv`` (:data:`NODULE_COLUMNS`; the pooled report reads its ``dice``)."""
    path = Path(path)
    frame = _read_csv(path, "per-nodule table (nodules.csv, written by evaluate)", NODULE_COLUMNS)
    ids = pd.to_numeric(frame["nodule_id"], errors="coerce")
    dice = pd.to_numeric(frame["dice"], errors="coerce")
    if ids.isna().any() or (ids != ids.round()).any() or (dice.isna() & frame["dice"].notna()).any():
        raise InputError(f"{path}: nodule_id must be whole numbers and dice numbers (or empty)")
    frame["nodule_id"], frame["dice"] = ids.astype(np.int64), dice.astype(float)
    if frame.duplicated(["seriesuid", "nodule_id"]).any():
        raise InputError(f"{path}: a nodule (seriesuid, nodule_id) has more than one row")
    return frame


def evaluate_from_tables(candidates_df: pd.DataFrame, scans_df: pd.DataFrame, nodules_df: pd.DataFrame,
                         annotations_df: pd.DataFrame, excluded_df: pd.DataFrame | None, uids: Sequence[str],
                         bootstrap: int = 1000, seed: int = 0, dice_margin_mm: float = 5.0) -> Evaluation:
    """Evaluate the scans ``uids`` like :func:`evaluate_scans_detail`, but from rows ``evaluate``
    saved instead of the volumes: the FROC is computed from the candidates and annotations as
    there, the segmentation numbers come from ``scans_df`` (:data:`SCAN_COLUMNS`, e.g. every fold's
    ``scans.csv``) and the per-nodule Dice from ``nodules_df`` (every fold's ``nodules.csv``). No
    probability volume or slice store is read. With the rows of the same volumes, threshold and
    ``dice_margin_mm`` the result is exactly that of :func:`evaluate_scans_detail`: the same FROC
    call, the same counts summed, the same Dice averaged in the same order (:func:`_evaluation`).

    InputError when a scan has no row, or its rows disagree with the annotations (a stale table)."""
    uids = list(dict.fromkeys(uids))
    if not uids:
        raise InputError("evaluate: no scans to evaluate")
    wanted = set(uids)
    rows = scans_df[scans_df["seriesuid"].isin(wanted)]
    if rows["seriesuid"].duplicated().any():
        raise InputError(f"scans.csv: scan {rows['seriesuid'][rows['seriesuid'].duplicated()].iloc[0]} "
                         "has more than one row")
    missing = [u for u in uids if u not in set(rows["seriesuid"])]
    if missing:
        raise InputError(f"scans.csv: scan {missing[0]} has no row ({len(missing)} missing)")
    scans = rows.set_index("seriesuid").loc[uids].reset_index()[SCAN_COLUMNS]
    annotations = annotations_df[annotations_df["seriesuid"].isin(wanted)]
    n_annot = annotations.groupby("seriesuid").size().to_dict()
    stale = [(u, n) for u, n in zip(scans["seriesuid"], scans["n_nodules"]) if int(n) != int(n_annot.get(u, 0))]
    if stale:
        u, n = stale[0]
        raise InputError(f"scans.csv: scan {u} has {n} nodule(s) but the annotations {n_annot.get(u, 0)} "
                         "(evaluate's outputs are older than the annotations)")
    candidates = candidates_df[candidates_df["seriesuid"].isin(wanted)]
    excluded = excluded_df[excluded_df["seriesuid"].isin(wanted)] if excluded_df is not None else None
    froc = compute_froc(annotations, candidates, uids, excluded=excluded, bootstrap=bootstrap, seed=seed)
    mine = nodules_df[nodules_df["seriesuid"].isin(wanted)]
    dice_by_nodule = {(u, int(n)): float(d) for u, n, d in zip(mine["seriesuid"], mine["nodule_id"], mine["dice"])}
    absent = [(u, int(n)) for u, n in zip(froc.nodules["seriesuid"], froc.nodules["nodule_id"])
              if (u, int(n)) not in dice_by_nodule]
    if absent:
        raise InputError(f"nodules.csv: nodule {absent[0][1]} of scan {absent[0][0]} has no row "
                         f"({len(absent)} missing)")
    return _evaluation(froc, int(len(candidates)), scans, dice_by_nodule, bootstrap, seed, dice_margin_mm)


def evaluate_scans(candidates_df: pd.DataFrame, probability_paths: Mapping[str, str | Path],
                   slice_paths: Mapping[str, str | Path], annotations_df: pd.DataFrame,
                   excluded_df: pd.DataFrame | None, uids: Sequence[str], bootstrap: int = 1000, seed: int = 0,
                   dice_margin_mm: float = 5.0,
                   threshold: float | None = None) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """(metrics dict, froc curve frame, nodules frame) of the scans ``uids``; see
    :func:`evaluate_scans_detail` (which also returns the FROC result for plotting)."""
    ev = evaluate_scans_detail(candidates_df, probability_paths, slice_paths, annotations_df, excluded_df,
                               uids, bootstrap=bootstrap, seed=seed, dice_margin_mm=dice_margin_mm,
                               threshold=threshold)
    return ev.metrics, ev.froc.curve_frame(), ev.nodules


# --------------------------------------------------------------------------- plot


def plot_froc(out_path: str | Path, curves: Sequence[tuple[str, FrocResult]], title: str = "FROC",
              band: bool = True) -> None:
    """FROC curves (:func:`noduleflow.froc.froc_figure`: log2 FP axis 1/8..8 per scan, the seven CPM
    points marked, the bootstrap band of each curve that has one, ``band``) written atomically as PNG."""
    fig = froc_figure([result_curve(label, res, band=band, lw=2) for label, res in curves], title=title)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


# --------------------------------------------------------------------------- the rule


def evaluate_fold(candidates_path: str | Path, probabilities_dir: str | Path, folds_path: str | Path, fold: int,
                  slice_files: Sequence[str | Path], annotations_path: str | Path,
                  excluded_path: str | Path | None = None, *, out_metrics: str | Path, out_froc: str | Path,
                  out_nodules: str | Path, out_plot: str | Path, out_scans: str | Path | None = None,
                  out_crops: str | Path | None = None, out_crops_index: str | Path | None = None,
                  bootstrap: int = 1000, seed: int = 0, dice_margin_mm: float = 5.0) -> dict:
    """Evaluate fold ``fold``: writes ``metrics.json``, ``froc.csv``, ``nodules.csv``, ``scans.csv``
    (``out_scans``), ``froc.png``, and the crops the report may show: the folder ``out_crops``
    with their PNGs and its index ``out_crops_index`` (:mod:`noduleflow.crops`; the report's
    gallery size :data:`noduleflow.crops.GALLERY_SIZE`) (formats in the project contract and the
    module docstrings; ``out_scans``/``out_crops``/``out_crops_index`` None: ``scans.csv``,
    ``crops/``, ``crops.csv`` beside ``out_metrics``). Every input is read and checked before
    anything is written; ``metrics.json`` is written last."""
    stores = heldout_slice_paths(folds_path, fold, slice_files)
    uids = list(stores)
    annotations = read_annotations(annotations_path)
    excluded = None
    if excluded_path is not None and Path(excluded_path).is_file():
        excluded = read_annotations(excluded_path, allow_unknown_diameter=True)
    elif excluded_path is not None:
        raise InputError(f"{excluded_path}: excluded findings file not found")
    candidates = read_candidates(candidates_path)
    foreign = sorted(set(candidates["seriesuid"]) - set(uids))
    if foreign:
        log.warning("%s: %d candidate(s) on scans outside fold %d ignored (e.g. %s)", candidates_path,
                    int(candidates["seriesuid"].isin(foreign).sum()), fold, foreign[0])
    prob_dir = Path(probabilities_dir)
    if not prob_dir.is_dir():
        raise InputError(f"{prob_dir}: probabilities folder not found")
    threshold = read_threshold(prob_dir, default=DEFAULT_THRESHOLD)
    probabilities = {u: prob_dir / f"{u}.mha" for u in uids}
    log.info("fold %d: %d scans, %d nodules, %d candidates, threshold %s, bootstrap %d",
             fold, len(uids), int(annotations["seriesuid"].isin(uids).sum()),
             int(candidates["seriesuid"].isin(uids).sum()), threshold, bootstrap)
    ev = evaluate_scans_detail(with_candidate_rows(candidates), probabilities, stores, annotations, excluded, uids,
                               bootstrap=bootstrap, seed=seed, dice_margin_mm=dice_margin_mm, threshold=threshold,
                               crops=GALLERY_SIZE)
    metrics = {"fold": int(fold), **ev.metrics}
    write_csv_atomic(ev.froc.curve_frame(), out_froc)
    write_csv_atomic(ev.nodules, out_nodules)
    out_scans = out_scans if out_scans is not None else Path(out_metrics).parent / "scans.csv"
    write_csv_atomic(ev.scans[SCAN_COLUMNS], out_scans)
    out_crops = out_crops if out_crops is not None else Path(out_metrics).parent / "crops"
    out_crops_index = out_crops_index if out_crops_index is not None else Path(out_metrics).parent / "crops.csv"
    write_crops(ev.crops, ev.crop_pngs, out_crops, out_crops_index)
    log.info("fold %d: %d crops (missed nodules, false positives) in %s", fold, len(ev.crops), out_crops)
    plot_froc(out_plot, [(f"fold {fold}", ev.froc)], title=f"FROC, fold {fold} ({len(uids)} scans, "
                                                            f"{ev.froc.n_nodules} nodules)")
    write_json_atomic(metrics, out_metrics)
    log.info("fold %d: CPM %s, Dice per nodule %s, pixel Dice %s", fold, _fmt(metrics["cpm"]),
             _fmt(metrics["dice_per_nodule_mean"]), _fmt(metrics["pixel"]["dice"]))
    return metrics


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
