"""A second stage that re-scores candidates from their features, cross-fitted over the folds.

The detector's probability ranks a round nodule and a bright vessel piece of the same mean
probability alike; their shape and size tell them apart. This stage learns, with a logistic
regression on a few features of each candidate (:data:`FEATURES`), how likely a candidate is a
nodule, and replaces its probability by that. It never moves, adds or removes a candidate: only the
``probability`` column changes (the detector's is kept as ``detector_probability``).

Cross-fitting keeps the held-out folds honest: the candidates of fold ``k`` are scored by a model
fitted on the candidates of the *other* folds' held-out scans (each found by a model that never
trained on them, so their false positives are the kind a new scan gets), with their LUNA16 outcome
(:func:`noduleflow.froc.candidate_outcomes`) as the label; fold ``k``'s annotations are never used.
Candidates on excluded findings are left out of the fit. Where the other folds lack either class
(no hit or no false positive), fold ``k`` keeps the detector's probabilities.

Everything is deterministic: the features are plain functions of the candidate table, and the
logistic regression (scikit-learn, L-BFGS, L2 penalty ``C``, classes weighted to balance) has no
random state.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import pandas as pd

from noduleflow.froc import EXCLUDED, TP, candidate_outcomes
from noduleflow.io import InputError

log = logging.getLogger(__name__)

#: candidate features, in this order: the detector's mean and maximum probability over the
#: component, log10 of its volume (mm^3) and its elongation (noduleflow.predict.elongation)
FEATURES: tuple[str, ...] = ("mean_probability", "max_probability", "log10_volume_mm3", "elongation")
#: inverse L2 strength of the logistic regression
C = 1.0


def candidate_features(candidates: pd.DataFrame) -> np.ndarray:
    """(n, len(FEATURES)) float64 features of the candidate rows; InputError when a column the
    features need is missing (candidates written before ``elongation`` existed: rerun predict)."""
    needed = ["mean_probability", "max_probability", "volume_mm3", "elongation"]
    missing = [c for c in needed if c not in candidates.columns]
    if missing:
        raise InputError(f"candidates: missing column(s) {', '.join(missing)} that re-scoring needs "
                         f"(written by an older predict: rerun it)")
    volume = np.maximum(candidates["volume_mm3"].to_numpy(dtype=np.float64), 1e-3)
    return np.column_stack([candidates["mean_probability"].to_numpy(dtype=np.float64),
                            candidates["max_probability"].to_numpy(dtype=np.float64),
                            np.log10(volume), candidates["elongation"].to_numpy(dtype=np.float64)])


def fit_rescorer(features: np.ndarray, is_nodule: np.ndarray) -> dict | None:
    """A logistic regression on standardised features as a plain mapping (``mean``, ``scale``,
    ``coef``, ``intercept``: lists of floats, JSON-able); None when ``is_nodule`` lacks a class."""
    from sklearn.linear_model import LogisticRegression

    features = np.asarray(features, dtype=np.float64)
    is_nodule = np.asarray(is_nodule, dtype=bool)
    if is_nodule.all() or not is_nodule.any():
        return None
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    fit = LogisticRegression(C=C, class_weight="balanced", max_iter=1000).fit((features - mean) / scale, is_nodule)
    return {"features": list(FEATURES), "mean": mean.tolist(), "scale": scale.tolist(),
            "coef": fit.coef_[0].tolist(), "intercept": float(fit.intercept_[0]),
            "n_nodule": int(is_nodule.sum()), "n_false_positive": int((~is_nodule).sum())}


def apply_rescorer(model: Mapping, features: np.ndarray) -> np.ndarray:
    """P(nodule) in (0, 1) of each feature row under a :func:`fit_rescorer` model."""
    z = (np.asarray(features, dtype=np.float64) - np.asarray(model["mean"])) / np.asarray(model["scale"])
    logit = z @ np.asarray(model["coef"]) + float(model["intercept"])
    return 1.0 / (1.0 + np.exp(-logit))


def rescore_folds(candidates_by_fold: Mapping[int, pd.DataFrame], annotations: pd.DataFrame,
                  excluded: pd.DataFrame | None = None) -> dict[int, pd.DataFrame]:
    """Each fold's candidates re-scored by a model fitted on the other folds' candidates (see the
    module docstring). Returns fold -> a copy of its table with ``probability`` replaced and the
    detector's in ``detector_probability``; rows, their order and positions are unchanged."""
    folds = sorted(candidates_by_fold)
    features = {k: candidate_features(candidates_by_fold[k]) for k in folds}
    outcomes = {k: candidate_outcomes(annotations, candidates_by_fold[k], excluded) for k in folds}
    out = {}
    for k in folds:
        others = [j for j in folds if j != k]
        x = np.concatenate([features[j] for j in others]) if others else np.zeros((0, len(FEATURES)))
        y = np.concatenate([outcomes[j] for j in others]) if others else np.zeros(0, dtype=object)
        used = y != EXCLUDED
        model = fit_rescorer(x[used], y[used] == TP) if used.any() else None
        table = candidates_by_fold[k].copy()
        table["detector_probability"] = table["probability"]
        if model is None:
            log.warning("fold %d: the other folds' candidates lack hits or false positives; the detector's "
                        "probabilities are kept", k)
        elif len(table):
            table["probability"] = apply_rescorer(model, features[k])
        out[k] = table
    return out
