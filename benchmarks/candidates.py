"""Candidate extraction settings compared on finished runs (not part of the test suite).

Inference is the costly part of ``predict``; turning probability volumes into candidates is cheap.
This script re-extracts the candidates of finished runs (for instance the folders that
``benchmarks/quality.py --keep DIR`` leaves) from their stored probability volumes
(``results/predictions/fold*/probabilities/*.mha``, uint8 as ``predict`` wrote them, so the
setting a run was made with gives exactly that run's candidates) under a grid of settings:

* ``--thresholds``: the probability above which voxels form candidates (``predict.threshold``; a
  lower one adds faint candidates, which only count at the higher FP rates of the FROC);
* ``--scores``: a candidate's probability, the mean or the maximum over its component
  (``predict.candidate_score``);
* ``--elongation-exponents``: a candidate's probability divided by its elongation to this power
  (``predict.elongation_exponent``, whose default is this option's; 0 = the mean or maximum alone,
  as runs made before that key existed scored their candidates);
* ``--contrast-hus``: a candidate's probability multiplied by min(1, its density contrast to the lung
  around it / this many HU) (``predict.contrast_hu``, whose default is this option's; 0 = off, as
  runs made before that key existed scored their candidates);
* ``--merge-mm``: candidates closer than this to a more probable one are dropped
  (:func:`noduleflow.predict.merge_close_candidates`; 0 = off);
* ``--rescore``: the candidates' probabilities replaced by the cross-fitted second stage
  (:mod:`noduleflow.rescore`: a logistic regression on their features, fitted on the other folds);

and scores each run's candidates against the nodules its evaluation listed
(``results/reports/fold*/nodules.csv``; excluded findings are not used: the synthetic cohort has
none). For every setting it prints the pooled CPM per run, their mean +- sd and the worst run, and
the sensitivity at 8 FPs per scan of 6-10 mm nodules pooled over the runs. The threshold is also
the segmentation's cut (evaluate's Dice uses ``predict.threshold``), so a second table gives, per
threshold, the mean per-nodule Dice of each run (exactly as ``evaluate``: every annotated nodule, a
missed one scoring about 0, :func:`noduleflow.segmetrics.nodule_dice` with a 5 mm box margin), per
size bin pooled over the runs, the ratio of predicted to true voxels inside the nodules' boxes
(below 1: the model under-segments), and the pixel Dice of each run pooled over its scans
(evaluate's: every pixel of the slices with lung or nodule, so false-positive pixels anywhere count).

Compare settings on runs of tuning seeds (``benchmarks/quality.py --seeds 101 102 103``), then
confirm on the report seeds; never choose on the default cohort alone.

Usage::

    .venv/bin/python benchmarks/candidates.py RUN_DIR [RUN_DIR ...] [--thresholds 0.5 0.3 0.2]
        [--scores mean max] [--elongation-exponents 0 0.5 1] [--contrast-hus 0 100] [--merge-mm 0 5 10]
        [--min-volume-mm3 10]
        [--rescore]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from _workflow import REPO
from quality import size_bin

sys.path.insert(0, str(REPO / "src"))
from noduleflow.froc import compute_froc, subgroup_froc  # noqa: E402
from noduleflow.io import read_image  # noqa: E402
from noduleflow.predict import (PREDICT_DEFAULTS, THRESHOLD_FILE, candidates_from_probability,  # noqa: E402
                                merge_close_candidates)
from noduleflow.rescore import rescore_folds  # noqa: E402
from noduleflow.segmetrics import (  # noqa: E402
    PixelCounts, evaluated_slices, nodule_boxes, nodule_dice, pixel_counts, threshold_mask)
from noduleflow.slices import read_slice_store  # noqa: E402

#: box margin of the per-nodule Dice, as evaluate.dice_margin_mm's default
DICE_MARGIN_MM = 5.0


def run_nodules(run: Path) -> pd.DataFrame:
    """The nodules a run's evaluation scored (every fold), as annotations."""
    tables = sorted((run / "results" / "reports").glob("fold*/nodules.csv"))
    if not tables:
        raise SystemExit(f"{run}: no results/reports/fold*/nodules.csv (run the workflow to its reports first)")
    nodules = pd.concat([pd.read_csv(t, dtype={"seriesuid": str}) for t in tables], ignore_index=True)
    return nodules[["seriesuid", "nodule_id", "coordX", "coordY", "coordZ", "diameter_mm"]]


def segmentation_rows(run: Path, uid: str, stored: np.ndarray, nodules: pd.DataFrame,
                      thresholds: list[float], lung: np.ndarray, labels: np.ndarray,
                      geometry) -> tuple[list[dict], list[dict]]:
    """For scan ``uid`` and each threshold, from the stored probability volume (uint8, (z, y, x)):
    per nodule its Dice (as evaluate) and its predicted and true voxel counts inside its Dice box,
    and the scan's pixel counts over evaluate's slices (``lung``, nodule ``labels`` and ``geometry``
    from the scan's slice store). Returns (nodule rows, scan rows)."""
    slices = evaluated_slices(lung, labels)
    mine = nodules[nodules["seriesuid"] == uid]
    ids = mine["nodule_id"].astype(int).tolist()
    boxes = nodule_boxes(labels, geometry.spacing, DICE_MARGIN_MM, ids)
    nodule_rows, scan_rows = [], []
    for threshold in thresholds:
        pred = threshold_mask(stored, threshold)
        dices = nodule_dice(pred, labels, geometry.spacing, DICE_MARGIN_MM, ids)
        counts = pixel_counts(pred, labels > 0, slices)
        scan_rows.append({"run": run.name, "threshold": threshold, **counts.as_dict()})
        for nid, diameter in zip(ids, mine["diameter_mm"]):
            predicted = true = 0
            if nid in boxes:
                lab = labels[boxes[nid]]
                counted = (lab == 0) | (lab == nid)  # other nodules' voxels count for neither
                predicted, true = int((pred[boxes[nid]] & counted).sum()), int((lab == nid).sum())
            nodule_rows.append({"run": run.name, "threshold": threshold, "size": size_bin(float(diameter)),
                                "dice": dices[nid], "predicted": predicted, "true": true})
    return nodule_rows, scan_rows


def run_maps(run: Path) -> dict[str, tuple[int, Path]]:
    """seriesuid -> (fold, stored probability volume) of every held-out scan of the run."""
    maps = {p.stem: (int(p.parent.parent.name.removeprefix("fold")), p)
            for p in sorted((run / "results" / "predictions").glob("fold*/probabilities/*.mha"))}
    if not maps:
        raise SystemExit(f"{run}: no results/predictions/fold*/probabilities/*.mha")
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.3, 0.2, 0.1])
    parser.add_argument("--scores", nargs="+", choices=["mean", "max"], default=["mean", "max"])
    parser.add_argument("--elongation-exponents", type=float, nargs="+",
                        default=[PREDICT_DEFAULTS["elongation_exponent"]])
    parser.add_argument("--contrast-hus", type=float, nargs="+", default=[PREDICT_DEFAULTS["contrast_hu"]])
    parser.add_argument("--merge-mm", type=float, nargs="+", default=[0.0, 5.0, 10.0])
    parser.add_argument("--min-volume-mm3", type=float, default=10.0)
    parser.add_argument("--rescore", action="store_true",
                        help="score the candidates with the cross-fitted second stage (noduleflow.rescore)")
    args = parser.parse_args()

    settings = list(itertools.product(args.thresholds, args.scores, args.elongation_exponents, args.contrast_hus,
                                      args.merge_mm))
    results = {s: [] for s in settings}
    seg_rows: list[dict] = []
    pixel_rows: list[dict] = []
    for run in args.runs:
        nodules = run_nodules(run)
        folds = pd.read_csv(run / "results" / "folds.csv", dtype={"seriesuid": str})
        uids = folds["seriesuid"].tolist()
        per_setting = {s: [] for s in settings}
        fold_of = {}
        lung_roi: dict[int, bool] = {}
        for uid, (fold, path) in run_maps(run).items():
            fold_of[uid] = fold
            stored, geometry = read_image(path)
            stored = np.asarray(stored)
            image, lung, labels, _ = read_slice_store(run / "results" / "slices" / f"{uid}.h5")
            if fold not in lung_roi:   # as predict_fold: the contrast's shell is the lung's only with a lung ROI
                settings_file = path.parent / THRESHOLD_FILE
                lung_roi[fold] = (json.loads(settings_file.read_text()).get("lung_roi", True)
                                  if settings_file.is_file() else True)
            nodule_part, scan_part = segmentation_rows(run, uid, stored, nodules, args.thresholds, lung, labels,
                                                       geometry)
            seg_rows += nodule_part
            pixel_rows += scan_part
            for threshold, score, exponent, contrast in itertools.product(args.thresholds, args.scores,
                                                                          args.elongation_exponents, args.contrast_hus):
                found = candidates_from_probability(stored, geometry, threshold, args.min_volume_mm3,
                                                    seriesuid=uid, score=score, elongation_exponent=exponent,
                                                    image=image, lung=lung if lung_roi[fold] else None,
                                                    contrast_hu=contrast)
                for merge in args.merge_mm:
                    per_setting[(threshold, score, exponent, contrast, merge)].append(
                        merge_close_candidates(found, merge))
        small = [size_bin(float(d)) for d in nodules["diameter_mm"]]
        for setting, frames in per_setting.items():
            candidates = pd.concat(frames, ignore_index=True)
            if args.rescore:
                fold = candidates["seriesuid"].map(fold_of)
                rescored = rescore_folds({int(k): candidates[fold == k].reset_index(drop=True)
                                          for k in sorted(fold.unique())}, nodules)
                candidates = pd.concat(rescored.values(), ignore_index=True)
            froc = compute_froc(nodules, candidates, uids)
            groups = subgroup_froc(nodules, candidates, uids, small).set_index("group")
            n_small = int(groups.loc["6-10", "n_nodules"]) if "6-10" in groups.index else 0
            sens_small = float(groups.loc["6-10", "sens_8"]) if n_small else float("nan")
            results[setting].append({"run": run.name, "cpm": froc.cpm, "fps_max": float(froc.fps.max()),
                                     "n_small": n_small, "sens8_small": sens_small})
        print(f"{run}: {len(uids)} scans, {len(nodules)} nodules", flush=True)

    names = [r["run"] for r in results[settings[0]]]
    print("\n| threshold | score | elongation exponent | contrast HU | merge mm | " + " | ".join(names)
          + " | mean ± sd | worst | 6-10 mm sens@8 |")
    print("|" + "---|" * (len(names) + 8))
    for (threshold, score, exponent, contrast, merge), rows in results.items():
        cpm = np.array([r["cpm"] for r in rows])
        n = np.array([r["n_small"] for r in rows], dtype=float)
        s = np.array([r["sens8_small"] for r in rows], dtype=float)
        have = n > 0
        pooled_small = float(np.sum(n[have] * s[have]) / np.sum(n[have])) if have.any() else float("nan")
        sd = float(np.std(cpm, ddof=1)) if len(cpm) > 1 else float("nan")
        print(f"| {threshold:g} | {score} | {exponent:g} | {contrast:g} | {merge:g} | "
              + " | ".join(f"{v:.3f}" for v in cpm)
              + f" | {cpm.mean():.3f} ± {sd:.3f} | {cpm.min():.3f} | {pooled_small:.3f} |")
    print_segmentation(pd.DataFrame(seg_rows), pd.DataFrame(pixel_rows), names)


def print_segmentation(rows: pd.DataFrame, pixels: pd.DataFrame, names: list[str]) -> None:
    """Per threshold: mean per-nodule Dice per run (``rows``: one per nodule), mean +- sd and worst,
    Dice per size bin pooled over the runs, predicted / true voxels inside the nodules' boxes, and
    each run's pixel Dice from its scans' counts (``pixels``: one row per scan)."""
    bins = [b for b in ("<6", "6-10", "10-20", ">=20") if b in set(rows["size"])]
    print("\n| threshold | " + " | ".join(names) + " | mean ± sd | worst | "
          + " | ".join(f"Dice {b} mm" for b in bins) + " | predicted / true | pixel Dice per run | pixel Dice mean |")
    print("|" + "---|" * (len(names) + 6 + len(bins)))
    for threshold, group in rows.groupby("threshold", sort=False):
        summed = pixels[pixels["threshold"] == threshold].groupby("run", sort=False)[["tp", "fp", "fn", "tn"]].sum()
        pixel = np.array([PixelCounts(**{k: int(v) for k, v in summed.loc[name].items()}).metrics()["dice"]
                          for name in names])
        per_run = group.groupby("run", sort=False)["dice"].mean().reindex(names).to_numpy()
        sd = float(np.std(per_run, ddof=1)) if len(per_run) > 1 else float("nan")
        by_bin = group.groupby("size")["dice"].mean()
        ratio = group["predicted"].sum() / max(group["true"].sum(), 1)
        print(f"| {threshold:g} | " + " | ".join(f"{v:.3f}" for v in per_run)
              + f" | {per_run.mean():.3f} ± {sd:.3f} | {per_run.min():.3f} | "
              + " | ".join(f"{by_bin.get(b, float('nan')):.3f}" for b in bins) + f" | {ratio:.2f} | "
              + " ".join(f"{v:.3f}" for v in pixel) + f" | {pixel.mean():.3f} |")


if __name__ == "__main__":
    main()
