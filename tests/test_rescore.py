"""The second stage: candidates re-scored from their features, cross-fitted over the folds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from noduleflow.froc import EXCLUDED, FP, TP, candidate_outcomes, compute_froc
from noduleflow.io import InputError
from noduleflow.rescore import candidate_features, rescore_folds

XYZ = ["coordX", "coordY", "coordZ"]


def cohort(seed: int, n_scans: int = 12):
    """Scans with one nodule each (round, 300-3000 mm3) and three vessel pieces (long): the detector's
    probability does not tell them apart (both uniform in 0.5..1), the shape does."""
    rng = np.random.default_rng(seed)
    annotations, candidates = [], []
    for s in range(n_scans):
        uid = f"{seed}.{s}"
        centre = rng.uniform(-100, 100, 3)
        annotations.append((uid, *centre, 10.0))
        p = rng.uniform(0.5, 1.0)
        candidates.append((uid, *(centre + rng.normal(0, 0.5, 3)), p, rng.uniform(300, 3000), 1.0 + rng.uniform(0, 0.4)))
        for _ in range(3):
            where = rng.uniform(-100, 100, 3) + 200.0
            p = rng.uniform(0.5, 1.0)
            candidates.append((uid, *where, p, rng.uniform(30, 300), 3.0 + rng.uniform(0, 3)))
    ann = pd.DataFrame(annotations, columns=["seriesuid", *XYZ, "diameter_mm"])
    cand = pd.DataFrame(candidates, columns=["seriesuid", *XYZ, "probability", "volume_mm3", "elongation"])
    cand["mean_probability"] = cand["probability"]
    cand["max_probability"] = np.minimum(1.0, cand["probability"] + 0.1)
    return ann, cand


def by_fold(candidates: pd.DataFrame, n_folds: int = 3) -> dict[int, pd.DataFrame]:
    fold = candidates["seriesuid"].str.split(".").str[1].astype(int) % n_folds
    return {k: candidates[fold == k].reset_index(drop=True) for k in range(n_folds)}


def test_rescoring_moves_nothing_and_ranks_round_candidates_first():
    ann, cand = cohort(1)
    folds = by_fold(cand)
    rescored = rescore_folds(folds, ann)
    for k, table in rescored.items():
        pd.testing.assert_frame_equal(table[XYZ + ["seriesuid"]], folds[k][XYZ + ["seriesuid"]])   # same rows, same places
        np.testing.assert_array_equal(table["detector_probability"], folds[k]["probability"])
        assert table["probability"].between(0, 1).all()
    pooled = pd.concat(rescored.values(), ignore_index=True)
    uids = ann["seriesuid"].tolist()
    before = compute_froc(ann, cand, uids).cpm
    after = compute_froc(ann, pooled, uids).cpm
    assert before < 0.6 and after > 0.95


def test_a_folds_own_annotations_never_reach_its_scores():
    ann, cand = cohort(2)
    folds = by_fold(cand)
    first = rescore_folds(folds, ann)[0]
    # move fold 0's nodules away: its candidates become "false positives", but fold 0 is scored by a
    # model of folds 1 and 2 only, so its scores cannot change
    moved = ann.copy()
    in_fold0 = moved["seriesuid"].isin(folds[0]["seriesuid"])
    moved.loc[in_fold0, "coordX"] += 500.0
    again = rescore_folds(folds, moved)[0]
    np.testing.assert_array_equal(first["probability"], again["probability"])


def test_outcomes_follow_the_luna16_radius_and_excluded_findings():
    ann = pd.DataFrame([("a", 0.0, 0.0, 0.0, 10.0)], columns=["seriesuid", *XYZ, "diameter_mm"])
    exc = pd.DataFrame([("a", 50.0, 0.0, 0.0, -1.0), ("a", 2.0, 0.0, 0.0, 10.0)], columns=["seriesuid", *XYZ, "diameter_mm"])
    cand = pd.DataFrame([("a", 4.9, 0.0, 0.0), ("a", 5.0, 0.0, 0.0), ("a", 54.0, 0.0, 0.0), ("b", 0.0, 0.0, 0.0)],
                        columns=["seriesuid", *XYZ])
    # 4.9 mm: inside the nodule (and an excluded finding): TP; 5.0 mm: on the radius, not inside it,
    # but inside the excluded finding at 2 mm: excluded; 54 mm: inside the -1 (10 mm) finding; scan b: FP
    assert candidate_outcomes(ann, cand, exc).tolist() == [TP, EXCLUDED, EXCLUDED, FP]


def test_without_both_classes_elsewhere_the_detector_scores_stay_and_old_tables_are_named():
    ann, cand = cohort(3, n_scans=6)
    folds = by_fold(cand, 2)
    no_nodules = ann.iloc[0:0]
    kept = rescore_folds(folds, no_nodules)
    for k in kept:
        np.testing.assert_array_equal(kept[k]["probability"], folds[k]["probability"])
    with pytest.raises(InputError, match="elongation"):
        candidate_features(cand.drop(columns="elongation"))
