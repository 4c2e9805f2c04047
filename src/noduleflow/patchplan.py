"""The patch plan: how many positive and negative patches each scan of the cohort gives.

The counts of one scan depend on the whole cohort (:func:`patch_counts`: the positives are spread
over the scans that have nodules so that the cohort's positive fraction is the configured one), so
they are decided once, by a cheap pass over every slice store's slice table (stage
``plan_patches``, ``patches/plan.csv``), before the per-scan sampling jobs
(:mod:`noduleflow.sampling`) cut the patches. This module does not import what cuts patches: a
change there does not change the plan.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from noduleflow.io import InputError, open_h5, read_uid_table, write_csv_atomic

log = logging.getLogger(__name__)

#: columns of the patch plan (:func:`plan_patches`)
PLAN_COLUMNS = ("seriesuid", "has_nodule", "n_positive", "n_negative")


def _check_counts(patches_per_scan: int, positive_fraction: float) -> None:
    if int(patches_per_scan) < 1:
        raise ValueError(f"sampling.patches_per_scan = {patches_per_scan}: must be >= 1")
    if not 0.0 <= float(positive_fraction) <= 1.0:
        raise ValueError(f"sampling.positive_fraction = {positive_fraction}: must be in [0, 1]")


def plan_counts(slice_files: Sequence[str | Path], patches_per_scan: int,
                positive_fraction: float) -> pd.DataFrame:
    """The cohort's patch plan: a frame ``seriesuid, path, has_nodule, n_positive, n_negative``, one
    row per slice store in seriesuid order (:func:`survey_slice_stores`, :func:`patch_counts`)."""
    scans = survey_slice_stores(slice_files)
    counts = patch_counts([s["has_nodule"] for s in scans], patches_per_scan, positive_fraction)
    plan = pd.DataFrame({"seriesuid": [s["seriesuid"] for s in scans], "path": [str(s["path"]) for s in scans],
                         "has_nodule": [bool(s["has_nodule"]) for s in scans],
                         "n_positive": [p for p, _ in counts], "n_negative": [q for _, q in counts]})
    n_total = int(plan["n_positive"].sum() + plan["n_negative"].sum())
    log.info("plan: %d patches from %d scans (%d with nodules); planned positive fraction %.4f", n_total,
             len(plan), int(plan["has_nodule"].sum()), plan["n_positive"].sum() / max(n_total, 1))
    return plan


def plan_patches(slice_files: Sequence[str | Path], out_csv: str | Path, patches_per_scan: int,
                 positive_fraction: float) -> pd.DataFrame:
    """Stage ``plan_patches``: :func:`plan_counts` written to ``out_csv`` (atomically) as
    ``seriesuid,has_nodule,n_positive,n_negative`` (:data:`PLAN_COLUMNS`). A cheap pass: it reads
    each store's slice table, no volume. The per-scan jobs read their counts from it."""
    _check_counts(patches_per_scan, positive_fraction)
    plan = plan_counts(slice_files, patches_per_scan, positive_fraction)
    write_csv_atomic(plan[list(PLAN_COLUMNS)], out_csv)
    return plan


def read_plan(path: str | Path) -> dict[str, tuple[int, int]]:
    """seriesuid -> (n_positive, n_negative) from a plan file; InputError naming the file if it is
    malformed."""
    plan = read_uid_table(path, PLAN_COLUMNS, not_found="patch plan not found")
    counts = plan[["n_positive", "n_negative"]].apply(pd.to_numeric, errors="coerce")
    if (counts.isna().any().any() or (counts < 0).any().any() or (counts != counts.round()).any().any()
            or plan["seriesuid"].duplicated().any()):
        raise InputError(f"{path}: patch counts must be non-negative integers, one row per seriesuid")
    return {str(u): (int(p), int(q)) for u, p, q in zip(plan["seriesuid"], counts["n_positive"], counts["n_negative"])}


def survey_slice_stores(slice_files: Iterable[str | Path]) -> list[dict]:
    """One cheap pass over the slice stores (no volumes read when a ``slice_table`` is present):
    ``[{"seriesuid", "path", "has_nodule"}]`` sorted by seriesuid. Raises InputError naming the file
    for a missing store or attribute, or a seriesuid found in two stores."""
    scans: dict[str, dict] = {}
    for path in slice_files:
        path = Path(path)
        with open_h5(path) as store:
            missing = [n for n in ("image", "lung", "nodule") if n not in store]
            if missing or "seriesuid" not in store.attrs:
                what = ", ".join(missing + ([] if "seriesuid" in store.attrs else ["attribute seriesuid"]))
                raise InputError(f"{path}: not a noduleflow slice store (missing {what})")
            uid = store.attrs["seriesuid"]
            uid = uid.decode() if isinstance(uid, bytes) else str(uid)
            has_nodule = _has_nodule(store)
        if uid in scans:
            raise InputError(f"{path}: seriesuid {uid} is also in {scans[uid]['path']}")
        scans[uid] = {"seriesuid": uid, "path": path, "has_nodule": has_nodule}
    if not scans:
        raise InputError("sample_patches: no slice stores given")
    return [scans[u] for u in sorted(scans)]


def _has_nodule(store) -> bool:
    table = store.get("slice_table")
    try:
        if table is not None and "nodule_pixels" in (table.dtype.names or ()):
            return bool(np.any(table["nodule_pixels"][()] > 0))
        if table is not None and hasattr(table, "keys") and "nodule_pixels" in table:
            return bool(np.any(table["nodule_pixels"][()] > 0))
    except (AttributeError, TypeError):
        pass
    nodule = store["nodule"]
    return any(np.any(nodule[z]) for z in range(nodule.shape[0]))


def patch_counts(has_nodule: Sequence[bool], patches_per_scan: int,
                 positive_fraction: float) -> list[tuple[int, int]]:
    """(positives, negatives) per scan, scans in the given order, so that the cohort's positive
    fraction is ``positive_fraction`` although scans without nodules give no positives.

    With S scans of which m have nodules and n = ``patches_per_scan``: the cohort has S * n patches,
    ``P = round(S * n * positive_fraction)`` of them positive. The S * n - P negatives are split evenly
    over all scans (every scan shows the model the same amount of normal anatomy); the P positives
    evenly over the m nodule-bearing scans (so these give more than n patches, the others fewer).
    Remainders go one each to the first scans. Without any nodule-bearing scan every scan gives n
    negatives (a warning says so).
    """
    has = np.asarray(has_nodule, dtype=bool)
    n_scans, n = len(has), int(patches_per_scan)
    bearing = np.flatnonzero(has)
    positives = np.zeros(n_scans, dtype=np.int64)
    negatives = np.full(n_scans, n, dtype=np.int64)
    wanted = int(round(n_scans * n * positive_fraction))
    if len(bearing) == 0:
        if wanted:
            log.warning("no scan has nodule pixels: no positive patches (sampling.positive_fraction = %s)",
                        positive_fraction)
        return [(0, int(v)) for v in negatives]
    base, extra = divmod(wanted, len(bearing))
    positives[bearing] = base
    positives[bearing[:extra]] += 1
    base, extra = divmod(n_scans * n - wanted, n_scans)
    negatives[:] = base
    negatives[:extra] += 1
    return [(int(p), int(q)) for p, q in zip(positives, negatives)]
