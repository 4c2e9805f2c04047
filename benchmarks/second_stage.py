"""The crop classifier (second stage) measured on finished runs (not part of the test suite).

For every run (a folder ``benchmarks/quality.py --keep DIR`` left), every fold's held-out
candidates and nodules are cropped (:mod:`noduleflow.candidate_crops`) from the slice stores and the
stored probability volumes; then each fold's candidates are scored by a classifier
(:mod:`noduleflow.candidate_classifier`) trained on the *other* folds' crops (cross-fitted, as the
workflow's ``rescore`` stage does), and the pooled CPM of the run is printed for the detector alone
and for each way of combining the two probabilities, with mean +- sd and the worst run.

Usage::

    .venv/bin/python benchmarks/second_stage.py RUN_DIR [RUN_DIR ...] [--epochs 30] [--variants 4]
        [--width 16] [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _workflow import REPO

sys.path.insert(0, str(REPO / "src"))
from noduleflow.candidate_classifier import COMBINE, classify, combine, fit_classifier  # noqa: E402
from noduleflow.candidate_crops import crop_variants  # noqa: E402
from noduleflow.froc import EXCLUDED, TP, candidate_outcomes, compute_froc  # noqa: E402
from noduleflow.io import read_image  # noqa: E402
from noduleflow.slices import read_slice_store  # noqa: E402


def fold_crops(run: Path, fold: int, variants: int, seed: int, size: int) -> dict:
    """Crops of one fold's held-out candidates and nodules, with labels."""
    pred = run / "results" / "predictions" / f"fold{fold}"
    cands = pd.read_csv(pred / "candidates.csv", dtype={"seriesuid": str})
    nodules = pd.read_csv(run / "results" / "reports" / f"fold{fold}" / "nodules.csv", dtype={"seriesuid": str})
    outcome = candidate_outcomes(nodules, cands)
    uids = sorted(set(cands["seriesuid"]) | set(nodules["seriesuid"]))
    rng = np.random.default_rng(seed)
    c_crops = np.zeros((len(cands), variants, 2, size, size, size), np.uint8)
    n_crops = np.zeros((len(nodules), variants, 2, size, size, size), np.uint8)
    for uid in uids:
        image, _lung, _lab, geometry = read_slice_store(run / "results" / "slices" / f"{uid}.h5")
        prob, _ = read_image(pred / "probabilities" / f"{uid}.mha")
        prob = np.asarray(prob)
        ci = np.flatnonzero(cands["seriesuid"].to_numpy() == uid)
        ni = np.flatnonzero(nodules["seriesuid"].to_numpy() == uid)
        if len(ci):
            c_crops[ci] = crop_variants(image, prob, geometry, cands.iloc[ci][["coordX", "coordY", "coordZ"]].to_numpy(),
                                        cands.iloc[ci]["diameter_mm"].to_numpy(), variants, rng, size)
        if len(ni):
            n_crops[ni] = crop_variants(image, prob, geometry, nodules.iloc[ni][["coordX", "coordY", "coordZ"]].to_numpy(),
                                        nodules.iloc[ni]["diameter_mm"].to_numpy(), variants, rng, size)
    return {"candidates": cands, "nodules": nodules, "outcome": outcome, "c_crops": c_crops, "n_crops": n_crops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-nodule-crops", action="store_true")
    args = parser.parse_args()

    rows = []
    for run in args.runs:
        folds_table = pd.read_csv(run / "results" / "folds.csv", dtype={"seriesuid": str})
        folds = sorted(folds_table["fold"].unique())
        t0 = time.perf_counter()
        data = {k: fold_crops(run, k, args.variants, args.seed, args.size) for k in folds}
        t_crop = time.perf_counter() - t0
        scored = {how: [] for how in ("detector", *COMBINE)}
        t_fit = 0.0
        for k in folds:
            others = [j for j in folds if j != k]
            xs, ds, ys = [], [], []
            for j in others:
                used = data[j]["outcome"] != EXCLUDED
                xs.append(data[j]["c_crops"][used])
                ds.append(data[j]["candidates"]["diameter_mm"].to_numpy()[used])
                ys.append(data[j]["outcome"][used] == TP)
                if not args.no_nodule_crops:
                    xs.append(data[j]["n_crops"])
                    ds.append(data[j]["nodules"]["diameter_mm"].to_numpy())
                    ys.append(np.ones(len(data[j]["nodules"]), bool))
            t1 = time.perf_counter()
            fitted = fit_classifier(np.concatenate(xs), np.concatenate(ds), np.concatenate(ys), seed=args.seed,
                                    epochs=args.epochs, width=args.width, threads=args.threads)
            t_fit += time.perf_counter() - t1
            cands = data[k]["candidates"]
            q = classify(fitted[0], data[k]["c_crops"][:, 0], cands["diameter_mm"].to_numpy())
            p = cands["probability"].to_numpy()
            scored["detector"].append(cands)
            for how in COMBINE:
                scored[how].append(cands.assign(probability=combine(p, q, how)))
        nodules = pd.concat([data[k]["nodules"] for k in folds], ignore_index=True)
        uids = folds_table["seriesuid"].tolist()
        row = {"run": run.name, "crop_s": round(t_crop, 1), "fit_s": round(t_fit, 1)}
        for how, frames in scored.items():
            row[how] = compute_froc(nodules, pd.concat(frames, ignore_index=True), uids).cpm
        rows.append(row)
        print(row, flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    for how in ("detector", *COMBINE):
        v = table[how].to_numpy()
        print(f"{how:>10}: CPM {v.mean():.3f} +- {v.std(ddof=1) if len(v) > 1 else 0:.3f}, worst {v.min():.3f}")


if __name__ == "__main__":
    main()
