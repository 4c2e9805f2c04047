"""Stage ``split_folds``: cross-validation folds by scan (or by patient), stratified by nodule presence
(and by a user-given stratum of each scan, when there is one).

Output ``folds.csv``: ``seriesuid,fold`` (fold 0..K-1), one row per scan, sorted by seriesuid.

The split is scikit-learn's ``StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)``:

* groups are the scans themselves, or the patients of a ``seriesuid,patient`` CSV (``dataset.groups``),
  so all scans of one patient land in one fold and no slice of a scan is ever on both sides;
* the class of a scan is whether it has at least one row in ``annotations.csv``, so nodule-bearing
  scans are spread evenly over the folds (with scans as groups: within one scan per fold);
* with a strata file (``dataset.strata``, a ``seriesuid,stratum`` CSV) the class is the pair
  (nodule presence, stratum), so each stratum is spread evenly too: e.g. the scans holding the
  cohort's few ground-glass nodules (the synthetic cohort writes ``strata.csv`` with the texture class
  of each scan's nodules; for LUNA16, LIDC's texture ratings give the same), which otherwise can
  land in one fold by chance, leaving that fold's model almost none to learn from.

The scans are sorted by seriesuid before splitting, so the folds depend only on the set of scans,
the annotations, ``folds`` and ``seed`` — not on the order the scans are listed in.
When every class has fewer scans than ``folds`` (scikit-learn refuses, e.g. 7 scans in 5 folds with
3 nodule-bearing ones) a seeded greedy assignment with the same goal is used instead (logged).

A user-supplied split (``cv.split_file``, a ``seriesuid,fold`` CSV) wins: it is validated against
the scan list and copied (sorted by seriesuid).

:func:`read_folds` and :func:`read_fold_uids` read ``folds.csv`` back for every later stage (train,
predict, evaluate, report): one reader, one set of checks.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from noduleflow.io import InputError, read_annotations, read_uid_table, write_csv_atomic

log = logging.getLogger(__name__)


def split_folds(annotations_path: str | Path, uids: Sequence[str], out_csv: str | Path,
                groups_path: str | Path | None = None, folds: int = 5, seed: int = 0,
                split_file: str | Path | None = None,
                strata_path: str | Path | None = None) -> pd.DataFrame:
    """Assign every scan of ``uids`` to one of ``folds`` folds and write ``out_csv`` (atomically).

    ``annotations_path``: LUNA16 ``annotations.csv`` (world mm; only its ``seriesuid`` column is used
    here; rows of scans not in ``uids`` are ignored). ``groups_path``: optional CSV
    ``seriesuid,patient`` (every scan of ``uids`` must be listed). ``split_file``: optional
    user-supplied ``seriesuid,fold`` CSV that replaces the computed split. ``strata_path``: optional
    ``seriesuid,stratum`` CSV (every scan of ``uids`` listed; other rows ignored): the folds are then
    stratified by nodule presence and stratum together.

    Returns the written frame (``seriesuid`` str, ``fold`` int), sorted by seriesuid.
    Raises InputError (naming the file or config key) before anything is written.
    """
    uids = _check_uids(uids)
    folds = int(folds)
    if folds < 2:
        raise InputError(f"cv.folds = {folds}: at least 2 folds are needed")
    if split_file is not None:
        frame = read_split_file(split_file, uids, folds)
        log.info("using the user-supplied split %s (%d scans, %d folds)", split_file, len(frame), folds)
    else:
        annotations = read_annotations(annotations_path)
        annotated = set(annotations["seriesuid"])
        has_nodule = np.array([u in annotated for u in uids], dtype=int)
        groups = read_groups(groups_path, uids) if groups_path is not None else list(uids)
        strata = read_strata(strata_path, uids) if strata_path is not None else None
        frame = pd.DataFrame({"seriesuid": uids,
                              "fold": assign_folds(has_nodule, groups, folds, int(seed), strata=strata)})
        if groups_path is not None:
            log.info("folds grouped by patient (%s): %d patients", groups_path, len(set(groups)))
        if strata is not None:
            log.info("folds stratified by nodule presence and stratum (%s): %s", strata_path,
                     ", ".join(f"{s} {n}" for s, n in zip(*np.unique(strata, return_counts=True))))
        _log_balance(frame, has_nodule, folds, strata)
    write_csv_atomic(frame, out_csv)
    log.info("wrote %s (%d scans, %d folds)", out_csv, len(frame), folds)
    return frame


def assign_folds(has_nodule: np.ndarray, groups: Sequence, folds: int, seed: int,
                 strata: Sequence[str] | None = None) -> np.ndarray:
    """Fold (0..folds-1) of each item: StratifiedGroupKFold over ``groups``, stratified by
    ``has_nodule`` (0/1 per item), or by the pair (``has_nodule``, ``strata``) when strata (one label
    per item) are given. Raises InputError naming ``cv.folds`` when there are fewer groups than
    folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(has_nodule, dtype=int)
    if strata is None:
        classes = y
    else:
        if len(strata) != len(y):
            raise ValueError(f"{len(strata)} strata for {len(y)} items")
        classes = np.unique([f"{h}|{s}" for h, s in zip(y, strata)], return_inverse=True)[1]
    group_ids = np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1]
    n_groups = int(group_ids.max()) + 1 if len(group_ids) else 0
    what = "scans" if n_groups == len(y) else "patients (dataset.groups)"
    if n_groups < folds:
        raise InputError(f"cv.folds = {folds}, but there are only {n_groups} {what}: "
                         f"every fold needs at least one; lower cv.folds")
    counts = np.bincount(y, minlength=2)
    out = np.full(len(y), -1, dtype=int)
    if np.all(counts[counts > 0] < folds):
        log.info("fewer than cv.folds = %d scans in each class (%d with nodules, %d without): "
                 "seeded greedy stratified assignment instead of StratifiedGroupKFold", folds,
                 counts[1], counts[0])
        return _greedy_folds(y, group_ids, folds, seed, None if strata is None else classes)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (_, test) in enumerate(splitter.split(np.zeros(len(y)), classes, group_ids)):
            out[test] = k
    return out


def _greedy_folds(y: np.ndarray, group_ids: np.ndarray, folds: int, seed: int,
                  classes: np.ndarray | None = None) -> np.ndarray:
    """Groups in a seeded random order, larger (more nodule-bearing) groups first; each goes to the
    fold with the fewest nodule-bearing items, then the fewest items, then the lowest index. With
    ``classes`` (a class index per item: presence and stratum), first the fold with the fewest items
    of the group's most frequent class."""
    rng = np.random.default_rng(seed)
    n_groups = int(group_ids.max()) + 1
    pos = np.bincount(group_ids, weights=y, minlength=n_groups)
    size = np.bincount(group_ids, minlength=n_groups)
    n_classes = int(classes.max()) + 1 if classes is not None else 1
    per_class = np.zeros((n_groups, n_classes))
    if classes is not None:
        np.add.at(per_class, (group_ids, classes), 1)
    main_class = per_class.argmax(axis=1)
    order = rng.permutation(n_groups)
    order = order[np.lexsort((-size[order], -pos[order]))]
    fold_pos, fold_size = np.zeros(folds), np.zeros(folds)
    fold_class = np.zeros((folds, n_classes))
    fold_of_group = np.empty(n_groups, dtype=int)
    for g in order:
        k = int(np.lexsort((np.arange(folds), fold_size, fold_pos if pos[g] else fold_size,
                            fold_class[:, main_class[g]]))[0])
        fold_of_group[g] = k
        fold_pos[k] += pos[g]
        fold_size[k] += size[g]
        fold_class[k] += per_class[g]
    return fold_of_group[group_ids]


def read_groups(path: str | Path, uids: Sequence[str]) -> list[str]:
    """Patient of each of ``uids`` from a ``seriesuid,patient`` CSV. Raises InputError naming the file
    for a missing file or column, a scan listed twice or a scan of ``uids`` that is not listed."""
    path = Path(path)
    frame = _read_csv(path, ("seriesuid", "patient"), "dataset.groups")
    return _value_per_scan(path, frame, "patient", uids)


def read_strata(path: str | Path, uids: Sequence[str]) -> list[str]:
    """Stratum of each of ``uids`` from a ``seriesuid,stratum`` CSV (any labels: a nodule texture
    class, a scanner, a site). Raises InputError naming the file for a missing file or column, a scan
    listed twice, an empty stratum or a scan of ``uids`` that is not listed."""
    path = Path(path)
    frame = _read_csv(path, ("seriesuid", "stratum"), "dataset.strata")
    empty = frame["stratum"].isna() | (frame["stratum"].astype(str).str.strip() == "")
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise InputError(f"{path}: line {row + 2}: empty stratum for {frame['seriesuid'].iloc[row]}")
    return _value_per_scan(path, frame, "stratum", uids)


def _value_per_scan(path: Path, frame: pd.DataFrame, column: str, uids: Sequence[str]) -> list[str]:
    """``column`` (as stripped text) of each of ``uids`` in ``frame`` (read from ``path``, one row per
    scan); InputError naming the file when a scan of ``uids`` is not listed."""
    values = dict(zip(frame["seriesuid"], frame[column].astype(str).str.strip()))
    missing = [u for u in uids if u not in values]
    if missing:
        raise InputError(f"{path}: {len(missing)} scan(s) have no {column}, e.g. {missing[0]}")
    return [values[u] for u in uids]


def read_split_file(path: str | Path, uids: Sequence[str], folds: int) -> pd.DataFrame:
    """A user-supplied ``seriesuid,fold`` CSV, validated against ``uids`` and ``folds``; sorted by uid.

    Raises InputError naming the file when: it or a column is missing, a scan is listed twice, a
    scan of ``uids`` is missing, it lists an unknown scan, a fold is not an integer in 0..folds-1,
    or a fold has no scan.
    """
    path = Path(path)
    frame = _read_csv(path, ("seriesuid", "fold"), "cv.split_file")
    frame["fold"] = _fold_numbers(path, frame, folds)
    known = set(uids)
    unknown = sorted(set(frame["seriesuid"]) - known)
    if unknown:
        raise InputError(f"{path}: {len(unknown)} seriesuid(s) are not scans of the data set, e.g. {unknown[0]}")
    missing = sorted(known - set(frame["seriesuid"]))
    if missing:
        raise InputError(f"{path}: {len(missing)} scan(s) of the data set have no fold (not listed), "
                         f"e.g. {missing[0]}")
    empty = sorted(set(range(folds)) - set(frame["fold"]))
    if empty:
        raise InputError(f"{path}: fold {empty[0]} has no scan (cv.folds = {folds}: folds 0..{folds - 1} "
                         f"must all be used)")
    return frame[["seriesuid", "fold"]].sort_values("seriesuid", kind="stable").reset_index(drop=True)


def read_folds(path: str | Path, fold: int | None = None) -> pd.DataFrame:
    """``folds.csv`` -> frame with ``seriesuid`` (str, stripped) and ``fold`` (int), in file order.

    InputError naming the file when it is missing, not CSV, lacks a column, has an empty seriesuid, a
    seriesuid twice or a fold that is not an integer >= 0, or (``fold`` given) has no scan in ``fold``."""
    path = Path(path)
    frame = _read_csv(path, ("seriesuid", "fold"), "folds file")
    frame["fold"] = _fold_numbers(path, frame)
    if fold is not None and not (frame["fold"] == int(fold)).any():
        raise InputError(f"{path}: fold {fold} has no scans (folds: {sorted(set(frame['fold']))})")
    return frame[["seriesuid", "fold"]]


def read_fold_uids(path: str | Path, fold: int) -> list[str]:
    """Seriesuids of fold ``fold`` in ``folds.csv``, in file order (checks as :func:`read_folds`)."""
    frame = read_folds(path, fold)
    return frame.loc[frame["fold"] == int(fold), "seriesuid"].tolist()


def _read_csv(path: Path, columns: Sequence[str], key: str) -> pd.DataFrame:
    frame = read_uid_table(path, columns, not_found=f"file not found ({key})")
    duplicated = frame["seriesuid"].duplicated()
    if duplicated.any():
        raise InputError(f"{path}: seriesuid {frame['seriesuid'][duplicated].iloc[0]} is listed twice")
    return frame


def _fold_numbers(path: Path, frame: pd.DataFrame, folds: int | None = None) -> pd.Series:
    """The ``fold`` column as int: InputError naming the line when one is not an integer >= 0 (below
    ``folds`` when given)."""
    values = pd.to_numeric(frame["fold"], errors="coerce")
    bad = values.isna() | (values != values.round()) | (values < 0)
    if folds is not None:
        bad |= values >= folds
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        where = f" in 0..{folds - 1} (cv.folds = {folds})" if folds is not None else " >= 0"
        raise InputError(f"{path}: line {row + 2}: fold = {frame['fold'].astype(str).iloc[row]} is not an "
                         f"integer{where}")
    return values.astype(int)


def _check_uids(uids: Sequence[str]) -> list[str]:
    uids = [str(u).strip() for u in uids]
    if not uids:
        raise InputError("split_folds: the scan list is empty")
    if len(set(uids)) != len(uids):
        seen: set[str] = set()
        twice = next(u for u in uids if u in seen or seen.add(u))
        raise InputError(f"split_folds: seriesuid {twice} is listed twice in the scan list")
    return sorted(uids)


def _log_balance(frame: pd.DataFrame, has_nodule: np.ndarray, folds: int,
                 strata: Sequence[str] | None = None) -> None:
    fold = frame["fold"].to_numpy()
    labels = np.asarray(strata if strata is not None else [], dtype=str)
    for k in range(folds):
        in_k = fold == k
        per_stratum = ""
        if strata is not None:
            names, counts = np.unique(labels[in_k], return_counts=True)
            per_stratum = " (" + ", ".join(f"{s} {n}" for s, n in zip(names, counts)) + ")"
        log.info("fold %d: %d scans, %d with nodules%s", k, int(in_k.sum()), int(has_nodule[in_k].sum()),
                 per_stratum)
