"""The run report (noduleflow.report): summary.csv rows, the pooled out-of-fold evaluation, and a
self-contained report.html, on a hand-made run of three tiny scans in two folds."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from noduleflow import evaluate as nf_evaluate
from noduleflow import io as nf_io
from noduleflow.crops import CROP_COLUMNS, GALLERY_SIZE, crop_png, with_candidate_rows, write_crops
from noduleflow.evaluate import SCAN_COLUMNS, evaluate_scans_detail
from noduleflow.froc import write_json_atomic
from noduleflow.io import Geometry, InputError, read_annotations, read_candidates, write_csv_atomic, write_image
from noduleflow.report import (POOLED_FROC, POOLED_METRICS, POOLED_NODULES, SUMMARY_COLUMNS, build_report,
                               summary_row)

SHAPE = (8, 32, 32)                       # z, y, x
GEOMETRY = Geometry(spacing=(1.0, 1.0, 1.0), origin=(-10.0, -20.0, -30.0))
LUNG_SLICES = slice(1, 7)                 # evaluated slices: z = 1..6 contain lung
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _world(z: int, y: int, x: int) -> tuple[float, float, float]:
    ox, oy, oz = GEOMETRY.origin
    return (ox + x, oy + y, oz + z)


def _ball(center_zyx, radius) -> np.ndarray:
    zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    cz, cy, cx = center_zyx
    return (zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2


def _write_store(path: Path, uid: str, nodule: np.ndarray) -> None:
    import h5py

    image = np.full(SHAPE, -800, dtype=np.int16)
    image[nodule > 0] = 40
    lung = np.zeros(SHAPE, dtype=np.uint8)
    lung[LUNG_SLICES] = 1
    with h5py.File(path, "w") as f:
        for name, data in (("image", image), ("lung", lung), ("nodule", nodule.astype(np.uint8))):
            f.create_dataset(name, data=data, chunks=(1, SHAPE[1], SHAPE[2]), compression="gzip")
        f.attrs["seriesuid"] = uid
        for key, value in GEOMETRY.as_attrs().items():
            f.attrs[key] = value


FOLD_METRICS = [
    {"fold": 0, "n_scans": 2, "n_nodules": 2, "n_candidates": 2, "cpm": 0.5, "cpm_ci": [0.25, 0.75],
     "fps_per_scan": [0.125, 0.25, 0.5, 1, 2, 4, 8], "sensitivities": [0.5] * 7,
     "sensitivities_ci": [[0.0, 1.0]] * 7, "dice_per_nodule_mean": 0.5, "dice_detected_nodule_mean": 1.0,
     "dice_per_scan_mean": 0.6, "pixel": {"dice": 0.7, "accuracy": 0.999, "sensitivity": 0.8,
                                          "specificity": 0.9995}, "bootstrap": 10},
    # a fold whose scans have no nodule: detection numbers are null (NaN)
    {"fold": 1, "n_scans": 1, "n_nodules": 0, "n_candidates": 1, "cpm": None, "cpm_ci": [None, None],
     "fps_per_scan": [0.125, 0.25, 0.5, 1, 2, 4, 8], "sensitivities": [None] * 7,
     "sensitivities_ci": [[None, None]] * 7, "dice_per_nodule_mean": None, "dice_detected_nodule_mean": None,
     "dice_per_scan_mean": None, "pixel": {"dice": 0.0, "accuracy": 0.9992, "sensitivity": None,
                                           "specificity": 0.9992}, "bootstrap": 10},
]


def make_run(root: Path, settings: dict | None = None) -> dict:
    """A finished run's inputs to the report: 3 scans, folds {A, C} and {B}. Each fold's
    metrics.json is hand-made; its scans.csv, nodules.csv, crops/ and crops.csv are what evaluate
    writes (measured and drawn from the fold's volumes with evaluate_scans_detail, as evaluate_fold
    does).

    A: nodule 1 (radius 3 voxels) predicted exactly, candidate p=0.9 on it (detected, Dice 1).
    B: no nodule; a 2x2x2 false blob and candidate p=0.7 (false positive).
    C: nodule 1 (radius 2) not predicted (missed, Dice 0); a false blob and candidate p=0.6.
    """
    settings = settings or {"label_mode": "positive", "lung_roi": True, "hybrid_output": "positive"}
    root.mkdir(parents=True, exist_ok=True)
    nod_a, nod_c = _ball((4, 16, 16), 3), _ball((4, 20, 20), 2)
    blob_b = np.zeros(SHAPE, bool)
    blob_b[3:5, 8:10, 8:10] = True
    blob_c = np.zeros(SHAPE, bool)
    blob_c[3:5, 6:8, 24:26] = True
    scans = {"1.2.826.A": (nod_a, nod_a), "1.2.826.B": (np.zeros(SHAPE, bool), blob_b),
             "1.2.826.C": (nod_c, blob_c)}
    fold_of = {"1.2.826.A": 0, "1.2.826.C": 0, "1.2.826.B": 1}
    (root / "slices").mkdir()
    for uid, (nodule, pred) in scans.items():
        _write_store(root / "slices" / f"{uid}.h5", uid, nodule.astype(np.uint8))
        prob_dir = root / "predictions" / f"fold{fold_of[uid]}" / "probabilities"
        prob_dir.mkdir(parents=True, exist_ok=True)
        write_image(np.where(pred, 230, 10).astype(np.uint8), GEOMETRY, prob_dir / f"{uid}.mha")
        (prob_dir / "threshold.json").write_text(json.dumps({"threshold": 0.5, "min_volume_mm3": 0.0,
                                                             "fold": fold_of[uid], **settings}))
    pd.DataFrame({"seriesuid": ["1.2.826.A", "1.2.826.C"], "coordX": [_world(4, 16, 16)[0], _world(4, 20, 20)[0]],
                  "coordY": [_world(4, 16, 16)[1], _world(4, 20, 20)[1]],
                  "coordZ": [_world(4, 16, 16)[2], _world(4, 20, 20)[2]], "diameter_mm": [6.0, 4.0]}
                 ).to_csv(root / "annotations.csv", index=False)
    pd.DataFrame({"seriesuid": list(fold_of), "fold": list(fold_of.values())}).to_csv(root / "folds.csv", index=False)
    cands = {0: [("1.2.826.A", _world(4, 16, 16), 0.9, 6.0), ("1.2.826.C", _world(3.5, 6.5, 24.5), 0.6, 2.5)],
             1: [("1.2.826.B", _world(3.5, 8.5, 8.5), 0.7, 2.5)]}
    metrics_paths, candidate_paths = [], []
    for k in (0, 1):
        rows = [{"seriesuid": u, "coordX": x, "coordY": y, "coordZ": z, "probability": p, "diameter_mm": d,
                 "volume_mm3": 8.0} for u, (x, y, z), p, d in cands[k]]
        path = root / "predictions" / f"fold{k}" / "candidates.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
        candidate_paths.append(path)
        report_dir = root / "reports" / f"fold{k}"
        report_dir.mkdir(parents=True)
        (report_dir / "metrics.json").write_text(json.dumps(FOLD_METRICS[k]), encoding="utf-8")
        sens = [0.0, 0.5, 0.5] if k == 0 else [float("nan")] * 3
        pd.DataFrame({"fps_per_scan": [0.0, 0.0, 0.5], "sensitivity": sens, "threshold": [np.inf, 0.9, 0.6]}
                     ).to_csv(report_dir / "froc.csv", index=False)
        metrics_paths.append(report_dir / "metrics.json")
    for k in (0, 1):
        ev = _from_volumes(candidate_paths, root / "folds.csv", sorted((root / "slices").glob("*.h5")),
                           root / "annotations.csv", [u for u, f in fold_of.items() if f == k], bootstrap=0,
                           crops=GALLERY_SIZE)
        write_csv_atomic(ev.scans[SCAN_COLUMNS], root / "reports" / f"fold{k}" / "scans.csv")
        write_csv_atomic(ev.nodules, root / "reports" / f"fold{k}" / "nodules.csv")
        write_crops(ev.crops, ev.crop_pngs, root / "reports" / f"fold{k}" / "crops",
                    root / "reports" / f"fold{k}" / "crops.csv")
    truth = {u: s[0] for u, s in scans.items()}
    pred = {u: s[1] for u, s in scans.items()}
    return {"metrics": metrics_paths, "candidates": candidate_paths, "folds": root / "folds.csv",
            "slices": sorted((root / "slices").glob("*.h5")), "annotations": root / "annotations.csv",
            "truth": truth, "pred": pred, "reports": root / "reports"}


def _from_volumes(candidate_paths, folds_path, slices, annotations_path, uids, bootstrap, crops=None):
    """What the report computed before it pooled evaluate's rows: the scans ``uids`` measured from
    their probability volumes and slice stores (each scan with its fold's volume and threshold);
    with ``crops``, the crops evaluate draws (a candidate known by its row in its candidates.csv)."""
    folds = pd.read_csv(folds_path, dtype={"seriesuid": str})
    fold_of = dict(zip(folds["seriesuid"], folds["fold"]))
    candidates = pd.concat([with_candidate_rows(read_candidates(p)) for p in candidate_paths], ignore_index=True)
    probabilities = {u: Path(candidate_paths[fold_of[u]]).parent / "probabilities" / f"{u}.mha" for u in uids}
    return evaluate_scans_detail(candidates, probabilities, {Path(p).name[:-3]: p for p in slices},
                                 read_annotations(annotations_path), None, uids, bootstrap=bootstrap, seed=0,
                                 dice_margin_mm=5, threshold=None, crops=crops)


def pooled_from_volumes(run: dict, bootstrap: int, tmp: Path) -> dict:
    """The pooled metrics as metrics_pooled.json held them when the report read every volume:
    every scan of folds.csv evaluated together, written and read back as JSON."""
    uids = pd.read_csv(run["folds"], dtype={"seriesuid": str})["seriesuid"].tolist()
    ev = _from_volumes(run["candidates"], run["folds"], run["slices"], run["annotations"], uids, bootstrap)
    write_json_atomic({"fold": "pooled", **ev.metrics}, tmp / "expected.json")
    return json.loads((tmp / "expected.json").read_text(encoding="utf-8"))


def same(a, b) -> bool:
    """Exact equality, NaN equal to NaN (floats of a CSV row)."""
    return all((isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)) or x == y
               for x, y in zip(a, b)) and len(a) == len(b)


def run_report(run: dict, bootstrap: int = 20) -> pd.DataFrame:
    out = run["reports"]
    return build_report(run["metrics"], run["candidates"], run["folds"], run["annotations"],
                        out_summary=out / "summary.csv", out_plot=out / "froc.png", out_html=out / "report.html",
                        bootstrap=bootstrap, seed=0, dice_margin_mm=5)


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> dict:
    run = make_run(tmp_path_factory.mktemp("run"))
    run["expected"] = pooled_from_volumes(run, 20, tmp_path_factory.mktemp("expected"))
    run_report(run)
    return run


# --------------------------------------------------------------------------- summary.csv


def test_summary_has_fold_pooled_mean_and_sd_rows(reported):
    summary = pd.read_csv(reported["reports"] / "summary.csv", dtype={"fold": str})
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary["fold"].tolist() == ["0", "1", "pooled", "mean", "sd"]
    rows = summary.set_index("fold")
    # fold rows are copied from each fold's metrics.json
    assert rows.loc["0", "cpm"] == 0.5 and rows.loc["0", "cpm_ci_low"] == 0.25
    assert rows.loc["0", "sens_0.125"] == 0.5 and rows.loc["0", "sens_8"] == 0.5
    assert rows.loc["0", "dice_detected"] == 1.0 and rows.loc["0", "pixel_dice"] == 0.7
    # a fold without nodules: NaN detection numbers, and the mean/sd skip it instead of turning NaN
    assert math.isnan(rows.loc["1", "cpm"]) and math.isnan(rows.loc["1", "sens_1"])
    assert rows.loc["mean", "cpm"] == 0.5
    assert math.isnan(rows.loc["sd", "cpm"])           # one value: no sd
    assert rows.loc["mean", "pixel_dice"] == pytest.approx(0.35)
    assert rows.loc["sd", "pixel_dice"] == pytest.approx(np.std([0.7, 0.0], ddof=1))
    assert rows.loc["mean", "n_scans"] == 1.5
    assert math.isnan(rows.loc["mean", "cpm_ci_low"])  # a mean of intervals is not an interval


def test_pooled_row_scores_all_folds_out_of_fold_results_together(reported):
    rows = pd.read_csv(reported["reports"] / "summary.csv", dtype={"fold": str}).set_index("fold")
    pooled = rows.loc["pooled"]
    assert pooled["n_scans"] == 3 and pooled["n_nodules"] == 2
    # A's nodule found at p 0.9 before any false positive, C's never: 0.5 at every FP rate
    assert pooled["cpm"] == pytest.approx(0.5)
    assert all(pooled[f"sens_{p}"] == pytest.approx(0.5) for p in ("0.125", "1", "8"))
    assert pooled["dice_per_nodule"] == pytest.approx(0.5)   # A: 1, C: 0
    assert pooled["dice_detected"] == pytest.approx(1.0)
    # pixel counts over every pixel of every evaluated slice (lung or nodule) of all scans, by hand
    truth, pred = reported["truth"], reported["pred"]
    tp = fp = fn = n = 0
    for uid in truth:
        keep = np.zeros(SHAPE[0], bool)
        keep[LUNG_SLICES] = True
        keep |= truth[uid].any(axis=(1, 2))      # A's nodule reaches z = 7, outside the lung slices
        t, p = truth[uid][keep], pred[uid][keep]
        tp, fp, fn, n = tp + int((t & p).sum()), fp + int((~t & p).sum()), fn + int((t & ~p).sum()), n + t.size
    assert n == (7 + 6 + 6) * SHAPE[1] * SHAPE[2]
    tn = n - tp - fp - fn
    assert pooled["pixel_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert pooled["pixel_accuracy"] == pytest.approx((tp + tn) / n)
    assert pooled["pixel_sensitivity"] == pytest.approx(tp / (tp + fn))
    assert pooled["pixel_specificity"] == pytest.approx(tn / (tn + fp))


def test_pooled_files_beside_the_summary(reported):
    out = reported["reports"]
    curve = pd.read_csv(out / POOLED_FROC)
    assert list(curve.columns) == ["fps_per_scan", "sensitivity", "threshold"]
    assert curve["sensitivity"].max() == pytest.approx(0.5)
    nodules = pd.read_csv(out / POOLED_NODULES)
    assert nodules.set_index("seriesuid")["detected"].to_dict() == {"1.2.826.A": True, "1.2.826.C": False}
    metrics = json.loads((out / POOLED_METRICS).read_text(encoding="utf-8"))
    assert metrics["fold"] == "pooled" and metrics["cpm"] == pytest.approx(0.5)
    assert metrics["settings"]["label_mode"] == "positive" and metrics["settings"]["lung_roi"] is True
    assert (out / "froc.png").read_bytes().startswith(PNG_MAGIC)


def test_pooled_numbers_are_exactly_those_of_the_volumes_evaluated_together(reported):
    """The report pools evaluate's scans.csv/nodules.csv rows; every pooled number (metrics_pooled.json,
    the pooled row of summary.csv, nodules_pooled.csv) is exactly what evaluating all the volumes
    together gives (the report's computation before), bootstrap intervals included."""
    out, expected = reported["reports"], reported["expected"]
    metrics = json.loads((out / POOLED_METRICS).read_text(encoding="utf-8"))
    assert metrics.pop("settings")["dice_margin_mm"] == 5
    assert metrics == expected
    assert metrics["bootstrap_used"] > 0 and metrics["pixel_counts"]["tp"] > 0
    assert metrics["dice_per_scan_mean"] is not None and metrics["threshold"] == 0.5
    pooled = pd.read_csv(out / "summary.csv", dtype={"fold": str}).set_index("fold").loc["pooled"]
    row = summary_row("pooled", expected)
    assert same([float(pooled[c]) for c in SUMMARY_COLUMNS[1:]], [float(row[c]) for c in SUMMARY_COLUMNS[1:]])
    uids = pd.read_csv(reported["folds"], dtype={"seriesuid": str})["seriesuid"].tolist()
    nodules = _from_volumes(reported["candidates"], reported["folds"], reported["slices"], reported["annotations"],
                            uids, bootstrap=0).nodules
    written = pd.read_csv(out / POOLED_NODULES, dtype={"seriesuid": str})
    assert written.columns.tolist() == nodules.columns.tolist() + ["fold"]
    for column in nodules.columns:
        assert same(written[column].tolist(), nodules[column].tolist()), column
    assert written["fold"].tolist() == [0, 0]


def _gallery_images(html_text: str) -> list[tuple[str, bytes]]:
    """(alt, PNG bytes) of every crop figure of a report.html, in the page's order."""
    parser = _Collector()
    parser.feed(html_text)
    prefix = "data:image/png;base64,"
    return [(a["alt"], base64.b64decode(a["src"][len(prefix):])) for t, a in parser.tags
            if t == "img" and a.get("class") is None and a.get("src", "").startswith(prefix)]


def delete_volumes(run: dict) -> None:
    root = run["reports"].parent
    for path in [*(root / "predictions").glob("fold*/probabilities/*.mha"), *(root / "slices").glob("*.h5")]:
        path.unlink()


def test_report_reads_no_probability_volume_nor_slice_store(tmp_path, monkeypatch):
    """With every probability volume and slice store deleted after evaluate, and every volume and
    slice store reader broken, the report has the same numbers and its crop gallery: C's missed
    nodule, then the false positives of B (p 0.7) and C (p 0.6), the PNGs evaluate drew."""
    run = make_run(tmp_path / "run")
    expected = pooled_from_volumes(run, 0, tmp_path)
    delete_volumes(run)

    def no_volume(*args, **kwargs):
        raise AssertionError("the report read a volume or a slice store")
    for module, name in ((nf_evaluate, "read_probability"), (nf_evaluate, "read_truth"), (nf_io, "open_h5"),
                         (nf_io, "read_image")):
        monkeypatch.setattr(module, name, no_volume)
    import noduleflow.crops as nf_crops
    monkeypatch.setattr(nf_crops, "open_h5", no_volume)

    run_report(run, bootstrap=0)
    metrics = json.loads((run["reports"] / POOLED_METRICS).read_text(encoding="utf-8"))
    metrics.pop("settings")
    assert metrics == expected
    gallery = _gallery_images((run["reports"] / "report.html").read_text(encoding="utf-8"))
    assert [alt for alt, _ in gallery] == ["1.2.826.C nodule 1, 4.0 mm", "1.2.826.B p=0.700, Ø 2.5 mm",
                                           "1.2.826.C p=0.600, Ø 2.5 mm"]
    drawn = {}
    for k in (0, 1):
        index = pd.read_csv(run["reports"] / f"fold{k}" / "crops.csv", dtype={"seriesuid": str})
        for _, r in index.iterrows():
            drawn[(r["seriesuid"], r["kind"])] = (run["reports"] / f"fold{k}" / "crops" / r["file"]).read_bytes()
    assert [png for _, png in gallery] == [drawn[("1.2.826.C", "missed")], drawn[("1.2.826.B", "false_positive")],
                                           drawn[("1.2.826.C", "false_positive")]]
    assert all(png.startswith(PNG_MAGIC) for _, png in gallery)


def test_crops_are_the_pictures_the_report_drew_from_the_volumes(reported):
    """The gallery's PNGs are exactly those drawn from the slice store and probability volume (as
    the report drew them before): the slice through the finding, its label and the prediction
    p > 0.5 outlined, the false positive's circle."""
    gallery = dict(_gallery_images((reported["reports"] / "report.html").read_text(encoding="utf-8")))
    z, spacing = 4, GEOMETRY.spacing
    image_c = np.where(reported["truth"]["1.2.826.C"], 40, -800).astype(np.int16)[z]
    labels_c = reported["truth"]["1.2.826.C"].astype(np.uint8)[z]
    pred_c = reported["pred"]["1.2.826.C"][z]
    assert gallery["1.2.826.C nodule 1, 4.0 mm"] == crop_png(image_c, labels_c, pred_c, (4.0, 20.0, 20.0), spacing,
                                                              2.0, "missed #1 (4.0 mm)", label_id=1)
    assert gallery["1.2.826.C p=0.600, Ø 2.5 mm"] == crop_png(image_c, labels_c, pred_c, (3.5, 6.5, 24.5), spacing,
                                                               1.25, "FP p=0.600", circle_mm=1.25)
    empty = np.zeros(SHAPE[1:], np.uint8)
    assert gallery["1.2.826.B p=0.700, Ø 2.5 mm"] == crop_png(
        np.full(SHAPE[1:], -800, np.int16), empty, reported["pred"]["1.2.826.B"][z], (3.5, 8.5, 8.5), spacing, 1.25,
        "FP p=0.700", circle_mm=1.25)


def test_crop_index_of_each_fold(reported):
    """crops.csv: every missed nodule and false positive of the fold, its id, place and file."""
    fold0 = pd.read_csv(reported["reports"] / "fold0" / "crops.csv", dtype={"seriesuid": str})
    assert fold0.columns.tolist() == CROP_COLUMNS
    assert fold0[["seriesuid", "kind", "nodule_id", "candidate"]].astype(object).where(fold0.notna(), None
                                                                                     ).values.tolist() == [
        ["1.2.826.C", "missed", 1, None], ["1.2.826.C", "false_positive", None, 1]]
    assert fold0[["coordX", "coordY", "coordZ"]].values.tolist() == [list(_world(4, 20, 20)),
                                                                      list(_world(3.5, 6.5, 24.5))]
    assert fold0["diameter_mm"].tolist() == [4.0, 2.5]
    assert np.isnan(fold0["probability"][0]) and fold0["probability"][1] == 0.6
    fold1 = pd.read_csv(reported["reports"] / "fold1" / "crops.csv", dtype={"seriesuid": str})
    assert fold1[["seriesuid", "kind", "candidate", "probability"]].values.tolist() == [
        ["1.2.826.B", "false_positive", 0, 0.7]]
    for k, index in ((0, fold0), (1, fold1)):
        folder = reported["reports"] / f"fold{k}" / "crops"
        assert sorted(p.name for p in folder.iterdir()) == sorted(index["file"])
        assert all((folder / name).read_bytes().startswith(PNG_MAGIC) for name in index["file"])


@pytest.mark.parametrize("damage, message", [
    ("delete_index", r"fold1.crops\.csv: crop index .* not found"),
    ("bad_kind", r"fold0.crops\.csv: line 2: kind must be"),
    ("bad_id", r"fold0.crops\.csv: line 2: nodule_id of a missed row must be a whole number"),
    ("missing_column", r"fold0.crops\.csv: missing column\(s\) file"),
    ("stale_row", r"fold0.crops\.csv: no crop of the false positive \(candidates.csv row 1\) of scan 1\.2\.826\.C"),
    ("moved_row", r"fold1.crops\.csv: the crop of the false positive .* at another place"),
    ("delete_png", r"fold0.crops.0000_missed\.png: crop image not found"),
    ("not_png", r"fold0.crops.0000_missed\.png: not a PNG"),
])
def test_bad_or_missing_crop_index_is_named_before_any_output(tmp_path, damage, message):
    run = make_run(tmp_path / "run")
    reports = run["reports"]
    index = reports / "fold0" / "crops.csv"
    table = pd.read_csv(index, dtype=str, keep_default_na=False)
    if damage == "delete_index":
        (reports / "fold1" / "crops.csv").unlink()
    elif damage == "bad_kind":
        table.loc[0, "kind"] = "nodule"
        table.to_csv(index, index=False)
    elif damage == "bad_id":
        table.loc[0, "nodule_id"] = "one"
        table.to_csv(index, index=False)
    elif damage == "missing_column":
        table.drop(columns="file").to_csv(index, index=False)
    elif damage == "stale_row":
        table.iloc[:1].to_csv(index, index=False)
    elif damage == "moved_row":
        other = pd.read_csv(reports / "fold1" / "crops.csv", dtype=str, keep_default_na=False)
        other.loc[0, "coordX"] = str(float(other.loc[0, "coordX"]) + 3)
        other.to_csv(reports / "fold1" / "crops.csv", index=False)
    elif damage == "delete_png":
        (reports / "fold0" / "crops" / "0000_missed.png").unlink()
    elif damage == "not_png":
        (reports / "fold0" / "crops" / "0000_missed.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match=message):
        run_report(run, bootstrap=0)
    assert not any((reports / name).exists() for name in ("summary.csv", "report.html", POOLED_METRICS))


def test_stale_per_scan_rows_are_named_before_any_output(tmp_path):
    run = make_run(tmp_path / "run")
    scans_csv = run["reports"] / "fold0" / "scans.csv"
    table = pd.read_csv(scans_csv, dtype={"seriesuid": str})
    table[table["seriesuid"] != "1.2.826.C"].to_csv(scans_csv, index=False)
    with pytest.raises(InputError, match=r"fold0.scans\.csv: fold 0 scan 1\.2\.826\.C has no row"):
        run_report(run, bootstrap=0)
    assert not (run["reports"] / "summary.csv").exists()
    (run["reports"] / "fold1" / "nodules.csv").unlink()
    table.to_csv(scans_csv, index=False)
    with pytest.raises(InputError, match="fold1.nodules.csv"):
        run_report(run, bootstrap=0)
    assert not any((run["reports"] / name).exists() for name in ("summary.csv", "report.html", POOLED_METRICS))


# --------------------------------------------------------------------------- report.html


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.tables: dict[str, int] = {}      # table id -> body rows
        self._table: str | None = None
        self._in_body = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._table = attrs.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = 0
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table:
            self.tables[self._table] += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_is_self_contained_with_tables_and_embedded_images(reported):
    parser = _Collector()
    parser.feed((reported["reports"] / "report.html").read_text(encoding="utf-8"))
    # the summary table with its five rows, and the other tables
    assert parser.tables["summary"] == 5
    for table in ("settings", "detection", "pixel", "sizes", "missed"):
        assert parser.tables.get(table, 0) >= 1, table
    # every image is an embedded PNG; nothing refers to the network or to another file
    images = [a for t, a in parser.tags if t == "img"]
    assert len(images) >= 4  # FROC, Dice scatter, one missed nodule, false positives
    for attrs in images:
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix)
        assert base64.b64decode(attrs["src"][len(prefix):]).startswith(PNG_MAGIC)
    for tag, attrs in parser.tags:
        assert tag not in ("script", "link", "iframe", "object")
        for key in ("src", "href"):
            value = attrs.get(key)
            assert value is None or value.startswith(("data:", "#")), (tag, key, value)
    text = " ".join(parser.text)
    assert "missed #1" in text or "nodule 1, 4.0 mm" in text       # the missed nodule of C has a crop
    assert "p=0.700" in text and "p=0.600" in text                  # both false positives have crops
    alts = [a.get("alt", "") for a in images]
    assert alts.index(next(a for a in alts if "p=0.700" in a)) < alts.index(next(a for a in alts if "p=0.600" in a))


def test_missing_input_raises_before_any_output(tmp_path):
    run = make_run(tmp_path / "run")
    run["metrics"][1].unlink()
    with pytest.raises(InputError, match="metrics.json"):
        run_report(run, bootstrap=0)
    assert not any((run["reports"] / name).exists()
                   for name in ("summary.csv", "froc.png", "report.html", POOLED_FROC, POOLED_METRICS))


def test_report_reads_the_evaluate_rules_real_outputs(tmp_path):
    """Fold rows from metrics.json as noduleflow.evaluate writes them (fold 1 has no nodule), and
    the crops it drew, with every probability volume and slice store deleted after it."""
    from noduleflow.evaluate import evaluate_fold

    run = make_run(tmp_path / "run")
    for k in (0, 1):
        fold_dir = run["reports"] / f"fold{k}"
        evaluate_fold(run["candidates"][k], run["candidates"][k].parent / "probabilities", run["folds"], k,
                      run["slices"], run["annotations"], out_metrics=fold_dir / "metrics.json",
                      out_froc=fold_dir / "froc.csv", out_nodules=fold_dir / "nodules.csv",
                      out_plot=fold_dir / "froc.png", bootstrap=0, seed=0, dice_margin_mm=5)
    expected = pooled_from_volumes(run, 0, tmp_path)
    delete_volumes(run)            # evaluate has measured them and drawn the crops; the report needs neither
    summary = run_report(run, bootstrap=0).set_index("fold")
    gallery = _gallery_images((run["reports"] / "report.html").read_text(encoding="utf-8"))
    assert [alt for alt, _ in gallery] == ["1.2.826.C nodule 1, 4.0 mm", "1.2.826.B p=0.700, Ø 2.5 mm",
                                           "1.2.826.C p=0.600, Ø 2.5 mm"]
    assert all(png.startswith(PNG_MAGIC) for _, png in gallery)
    pooled = json.loads((run["reports"] / POOLED_METRICS).read_text(encoding="utf-8"))
    pooled.pop("settings")
    assert pooled == expected
    fold0 = json.loads((run["reports"] / "fold0" / "metrics.json").read_text(encoding="utf-8"))
    assert summary.loc["0", "cpm"] == pytest.approx(fold0["cpm"]) == pytest.approx(0.5)
    assert summary.loc["0", "pixel_dice"] == pytest.approx(fold0["pixel"]["dice"])
    assert math.isnan(summary.loc["1", "cpm"]) and summary.loc["1", "n_nodules"] == 0
    # scans are in one fold each, so the pooled result counts what the folds count
    assert summary.loc["pooled", "n_nodules"] == summary.loc["0", "n_nodules"] + summary.loc["1", "n_nodules"]
    assert summary.loc["mean", "cpm"] == pytest.approx(0.5)
