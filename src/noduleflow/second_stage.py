"""The second-stage workflow steps: crop each fold's held-out findings, then re-score each fold's
candidates with a crop classifier fitted on the other folds (LUNA16's false-positive reduction).

Step 1, ``candidate_crops`` (one job per fold, :func:`write_fold_crops`): for the fold's held-out
scans, the crops (:mod:`noduleflow.candidate_crops`) of every candidate ``predict`` found, on the
fold model's probability volume, and of every annotated nodule; with each candidate's LUNA16
outcome. One HDF5 file per fold (:data:`CROP_FILE_FORMAT`):

* ``candidate_crops`` uint8 (n, variants, channels, s, s, s), rows in ``candidates.csv`` order;
* ``candidate_table``: the candidates' ``seriesuid`` (bytes), ``coord`` (n, 3) world mm (x, y, z),
  ``diameter_mm``, ``probability`` and ``outcome`` (bytes of :data:`noduleflow.froc.TP`, ``FP`` or
  ``EXCLUDED``);
* ``nodule_crops`` uint8 (m, variants, channels, s, s, s) and ``nodule_diameter_mm`` (m,): the
  fold's annotated nodules (the training set's extra positives);
* attributes ``format``, ``fold``, ``variants``, ``crop_voxels``, ``seed``.

Step 2, ``rescore`` (one job per fold, :func:`rescore_fold`): fold ``k``'s candidates are scored by
a classifier (:mod:`noduleflow.candidate_classifier`) fitted on the crop files of the *other* folds:
their candidates labelled by outcome (excluded findings left out) and their nodules. Fold ``k``'s
own labels are never used, and each other fold's candidates come from a model that did not train on
their scans, so their false positives are the kind a new scan gets (the fold models that found
them did train on fold ``k``'s scans: the same cross-fitting as :mod:`noduleflow.rescore`).
The output is fold ``k``'s ``candidates.csv`` with the same rows, order and positions; only
``probability`` changes (:func:`noduleflow.candidate_classifier.combine` of the detector's and the
classifier's), the detector's kept as ``detector_probability`` and the classifier's as
``classifier_probability``. When the other folds lack a hit or a false positive, the detector's
probabilities are kept (logged). The fitted classifier is saved beside it.

The seed of fold ``k``'s crops is ``seed + k`` (their augmentation variants), of its classifier
``seed``: the same config on the same CPU gives the same crops, weights and probabilities.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from noduleflow.candidate_classifier import COMBINE, EPOCHS, WIDTH, classify, combine, fit_classifier, state_of
from noduleflow.candidate_crops import CHANNELS, CROP_VOXELS, crop_variants
from noduleflow.froc import EXCLUDED, TP, candidate_outcomes
from noduleflow.io import (InputError, atomic_path, open_h5, read_annotations, read_candidates, read_image,
                           write_csv_atomic)
from noduleflow.predict import heldout_slice_paths

log = logging.getLogger(__name__)

CROP_FILE_FORMAT = "noduleflow-candidate-crops-1"
#: the second_stage config block's keys and their defaults
DEFAULTS: dict[str, Any] = {"enabled": False, "combine": "mean", "epochs": EPOCHS, "width": WIDTH,
                            "crop_voxels": CROP_VOXELS, "variants": 4, "seed": 0}
#: the columns re-scoring adds to a candidates table (``probability`` then holds the combination)
DETECTOR_COLUMN, CLASSIFIER_COLUMN = "detector_probability", "classifier_probability"


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The second_stage block with defaults filled in; InputError naming a bad key."""
    cfg = {**DEFAULTS, **dict(settings)}
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise InputError(f"config second_stage: unknown key(s) {', '.join(unknown)}")
    if cfg["combine"] not in COMBINE:
        raise InputError(f"config second_stage.combine = {cfg['combine']!r} must be one of {', '.join(COMBINE)}")
    for key in ("epochs", "width", "variants", "crop_voxels"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"config second_stage.{key} = {value!r} must be a positive integer")
    if cfg["crop_voxels"] % 8:
        raise InputError(f"config second_stage.crop_voxels = {cfg['crop_voxels']} must be a multiple of 8 "
                         f"(the classifier halves it three times)")
    return cfg


def write_fold_crops(candidates_path: str | Path, probabilities_dir: str | Path, folds_path: str | Path,
                     fold: int, slice_files: Sequence[str | Path], annotations_path: str | Path,
                     out_path: str | Path, excluded_path: str | Path | None = None, variants: int = 4,
                     crop_voxels: int = CROP_VOXELS, seed: int = 0) -> None:
    """Step 1 for fold ``fold`` (module docstring): read its candidates, probability volumes and
    slice stores, write the crop file ``out_path`` atomically."""
    from noduleflow.slices import read_slice_store

    stores = heldout_slice_paths(folds_path, fold, slice_files)
    candidates = read_candidates(candidates_path)
    if "diameter_mm" not in candidates.columns:
        raise InputError(f"{candidates_path}: no diameter_mm column (written by an older predict: rerun it)")
    unknown = sorted(set(candidates["seriesuid"]) - set(stores))
    if unknown:
        raise InputError(f"{candidates_path}: candidates of scan(s) not held out in fold {fold}: {', '.join(unknown[:3])}")
    annotations = read_annotations(annotations_path)
    excluded = read_annotations(excluded_path, allow_unknown_diameter=True) if excluded_path else None
    nodules = annotations[annotations["seriesuid"].isin(list(stores))].reset_index(drop=True)
    outcome = candidate_outcomes(annotations, candidates, excluded)
    rng = np.random.default_rng(int(seed) + int(fold))
    shape = (variants, len(CHANNELS), crop_voxels, crop_voxels, crop_voxels)
    cand_crops = np.zeros((len(candidates), *shape), dtype=np.uint8)
    nod_crops = np.zeros((len(nodules), *shape), dtype=np.uint8)
    started = time.perf_counter()
    cand_uids = candidates["seriesuid"].to_numpy()
    nod_uids = nodules["seriesuid"].to_numpy()
    for i, (uid, store) in enumerate(stores.items(), start=1):
        ci, ni = np.flatnonzero(cand_uids == uid), np.flatnonzero(nod_uids == uid)
        if not len(ci) and not len(ni):
            continue
        image, _lung, _labels, geometry = read_slice_store(store)
        prob_path = Path(probabilities_dir) / f"{uid}.mha"
        if not prob_path.is_file():
            raise InputError(f"{prob_path}: probability volume not found (written by predict)")
        prob, _ = read_image(prob_path)
        prob = np.asarray(prob)
        if prob.dtype != np.uint8 or prob.shape != image.shape:
            raise InputError(f"{prob_path}: expected uint8 probabilities of shape {image.shape}, got "
                             f"{prob.dtype} {prob.shape}")
        for rows, table, out in ((ci, candidates, cand_crops), (ni, nodules, nod_crops)):
            if len(rows):
                out[rows] = crop_variants(image, prob, geometry, table.iloc[rows][["coordX", "coordY", "coordZ"]].to_numpy(),
                                          table.iloc[rows]["diameter_mm"].to_numpy(), variants, rng, crop_voxels)
        log.info("scan %d/%d %s: %d candidate and %d nodule crops", i, len(stores), uid, len(ci), len(ni))
    with atomic_path(out_path) as tmp:
        with open_h5(tmp, "w") as h5:
            h5.attrs.update({"format": CROP_FILE_FORMAT, "fold": int(fold), "variants": int(variants),
                             "crop_voxels": int(crop_voxels), "seed": int(seed)})
            h5.create_dataset("candidate_crops", data=cand_crops, compression="gzip", compression_opts=1)
            table = h5.create_group("candidate_table")
            table["seriesuid"] = candidates["seriesuid"].astype(str).str.encode("ascii").to_numpy(dtype="S")
            table["coord"] = candidates[["coordX", "coordY", "coordZ"]].to_numpy(dtype=np.float64)
            table["diameter_mm"] = candidates["diameter_mm"].to_numpy(dtype=np.float64)
            table["probability"] = candidates["probability"].to_numpy(dtype=np.float64)
            table["outcome"] = np.asarray([str(o) for o in outcome], dtype="S")
            h5.create_dataset("nodule_crops", data=nod_crops, compression="gzip", compression_opts=1)
            h5["nodule_diameter_mm"] = nodules["diameter_mm"].to_numpy(dtype=np.float64)
    log.info("fold %d: %d candidates (%d hits), %d nodules cropped in %.1f s -> %s", fold, len(candidates),
             int((outcome == TP).sum()), len(nodules), time.perf_counter() - started, out_path)


def read_fold_crops(path: str | Path) -> dict[str, Any]:
    """A crop file as a dict of arrays (module docstring); InputError when it is not one."""
    with open_h5(path) as h5:
        if h5.attrs.get("format") != CROP_FILE_FORMAT:
            raise InputError(f"{path}: not a candidate crop file (format {h5.attrs.get('format')!r}, "
                             f"expected {CROP_FILE_FORMAT!r})")
        t = h5["candidate_table"]
        return {"fold": int(h5.attrs["fold"]), "variants": int(h5.attrs["variants"]),
                "crop_voxels": int(h5.attrs["crop_voxels"]),
                "candidate_crops": h5["candidate_crops"][()], "seriesuid": t["seriesuid"][()].astype(str),
                "coord": t["coord"][()], "diameter_mm": t["diameter_mm"][()],
                "probability": t["probability"][()], "outcome": t["outcome"][()].astype(str),
                "nodule_crops": h5["nodule_crops"][()], "nodule_diameter_mm": h5["nodule_diameter_mm"][()]}


def training_set(crop_files: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crops, diameters, is_nodule) of the given folds' crop files: their candidates that are not
    on excluded findings (label: a hit) and their nodules (label: nodule)."""
    xs, ds, ys = [], [], []
    for f in crop_files:
        used = f["outcome"] != EXCLUDED
        xs += [f["candidate_crops"][used], f["nodule_crops"]]
        ds += [f["diameter_mm"][used], f["nodule_diameter_mm"]]
        ys += [f["outcome"][used] == TP, np.ones(len(f["nodule_crops"]), dtype=bool)]
    return np.concatenate(xs), np.concatenate(ds), np.concatenate(ys)


def with_classifier(candidates: pd.DataFrame, classifier_probability: np.ndarray | None, how: str) -> pd.DataFrame:
    """A copy of ``candidates`` (same rows, order, positions) with :data:`DETECTOR_COLUMN` (the
    detector's probability), :data:`CLASSIFIER_COLUMN` and ``probability`` the two combined
    (:func:`noduleflow.candidate_classifier.combine`); without a classifier probability (None) the
    detector's is kept and the classifier column is NaN."""
    table = candidates.copy()
    table[DETECTOR_COLUMN] = table["probability"]
    if classifier_probability is None:
        table[CLASSIFIER_COLUMN] = np.nan
    else:
        table[CLASSIFIER_COLUMN] = classifier_probability
        table["probability"] = combine(table[DETECTOR_COLUMN].to_numpy(), classifier_probability, how)
    return table


def rescore_fold(crop_paths: Sequence[str | Path], fold: int, candidates_path: str | Path, out_candidates: str | Path,
                 out_model: str | Path, settings: Mapping[str, Any], threads: int = 1) -> pd.DataFrame:
    """Step 2 for fold ``fold`` (module docstring). ``crop_paths``: the crop files of every fold
    (fold ``fold``'s included). Writes the re-scored candidates and the classifier; returns the table."""
    import torch

    cfg = check_settings(settings)
    files = {}
    for path in crop_paths:
        data = read_fold_crops(path)
        if data["fold"] in files:
            raise InputError(f"{path}: a second crop file of fold {data['fold']}")
        files[data["fold"]] = data
    if fold not in files:
        raise InputError(f"no crop file of fold {fold} among {', '.join(map(str, crop_paths))}")
    candidates = read_candidates(candidates_path)
    own = files[fold]
    if len(own["seriesuid"]) != len(candidates) or not (own["seriesuid"] == candidates["seriesuid"].astype(str).to_numpy()).all() \
            or not np.allclose(own["coord"], candidates[["coordX", "coordY", "coordZ"]].to_numpy(dtype=float)):
        raise InputError(f"{candidates_path}: its candidates are not those of fold {fold}'s crop file (rerun candidate_crops)")
    x, d, y = training_set([files[j] for j in sorted(files) if j != fold])
    log.info("fold %d: classifier on the other folds' %d crops (%d nodule, %d false positive), %d epochs",
             fold, len(y), int(y.sum()), int((~y).sum()), cfg["epochs"])
    fitted = fit_classifier(x, d, y, seed=cfg["seed"], epochs=cfg["epochs"], width=cfg["width"], threads=threads) \
        if len(y) else None
    with atomic_path(out_model) as tmp:
        if fitted is None:
            log.warning("fold %d: the other folds' crops lack nodules or false positives; the detector's "
                        "probabilities are kept", fold)
            table = with_classifier(candidates, None, cfg["combine"])
            torch.save({"fold": int(fold), "settings": cfg, "classifier": None}, tmp)
        else:
            model, summary = fitted
            log.info("fold %d: classifier fitted in %.1f s, final loss %.4f", fold, summary["seconds"], summary["final_loss"])
            q = classify(model, own["candidate_crops"][:, 0], own["diameter_mm"])
            table = with_classifier(candidates, q, cfg["combine"])
            torch.save({"fold": int(fold), "settings": cfg, "summary": summary,
                        "classifier": state_of(model, cfg["width"])}, tmp)
    write_csv_atomic(table, out_candidates)
    return table


# --------------------------------------------------------------------------- new scans (apply)


def find_classifiers(second_stage_dir: str | Path, folds: Sequence[int] | None = None) -> list[Path]:
    """``fold{k}/classifier.pt`` under a second-stage folder (``results/second_stage``): every fold's,
    or those of ``folds``; InputError when one is missing or there are none."""
    root = Path(second_stage_dir)
    if folds is None:
        found = sorted(root.glob("fold*/classifier.pt"), key=lambda p: int(p.parent.name.removeprefix("fold") or -1))
        if not found:
            raise InputError(f"{root}: no fold*/classifier.pt (run the workflow with second_stage.enabled: true)")
        return found
    paths = [root / f"fold{int(k)}" / "classifier.pt" for k in folds]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"second-stage classifier(s) not found: {', '.join(missing)}")
    return paths


def load_classifiers(paths: Sequence[str | Path]) -> tuple[list, dict[str, Any]]:
    """The fitted classifiers of ``rescore``'s ``classifier.pt`` files (folds whose classifier could
    not be fitted are skipped) and their shared settings; InputError when a file is missing or not
    one, or when their settings (crop size, combine) differ."""
    import torch

    from noduleflow.candidate_classifier import from_state

    models, settings = [], None
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: second-stage classifier not found (written by the rescore rule)")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
            cfg = check_settings(saved["settings"])
        except (KeyError, TypeError, RuntimeError, EOFError) as exc:
            raise InputError(f"{path}: not a second-stage classifier ({exc})") from exc
        shared = {"crop_voxels": cfg["crop_voxels"], "combine": cfg["combine"]}
        if settings is not None and shared != settings:
            raise InputError(f"{path}: second-stage settings {shared} differ from the other classifiers' {settings}")
        settings = shared
        if saved["classifier"] is None:
            log.warning("%s: fold %s has no fitted classifier; the others score the candidates", path, saved.get("fold"))
            continue
        models.append(from_state(saved["classifier"]))
    if settings is None:
        raise InputError("no second-stage classifier given")
    return models, settings


def rescore_candidates(classifiers: Sequence, settings: Mapping[str, Any], image_hu: np.ndarray,
                       probability_u8: np.ndarray, geometry, candidates: pd.DataFrame) -> pd.DataFrame:
    """A new scan's candidates re-scored by the mean of the fold classifiers
    (:func:`with_classifier`). ``image_hu`` int16 and ``probability_u8`` (z, y, x) on the grid
    ``geometry`` the candidates were found on."""
    if not classifiers or not len(candidates):
        return with_classifier(candidates, None, settings["combine"])
    diameters = candidates["diameter_mm"].to_numpy()
    crops = crop_variants(image_hu, probability_u8, geometry, candidates[["coordX", "coordY", "coordZ"]].to_numpy(),
                          diameters, 1, np.random.default_rng(0), settings["crop_voxels"])[:, 0]
    q = np.mean([classify(model, crops, diameters) for model in classifiers], axis=0)
    return with_classifier(candidates, q, settings["combine"])
