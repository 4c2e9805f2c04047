"""evaluate_fold end to end on two tiny held-out scans whose every number is counted by hand."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from noduleflow.evaluate import (NODULE_COLUMNS, SCAN_COLUMNS, evaluate_fold, evaluate_from_tables, evaluate_scans,
                                  evaluate_scans_detail, pixel_counts, read_nodule_table, read_scan_table)
from noduleflow.crops import CANDIDATE_ROW, CROP_COLUMNS, select_findings, with_candidate_rows
from noduleflow.froc import compute_froc
from noduleflow.io import Geometry, InputError, read_annotations, read_candidates, voxel_to_world, write_image

GEOMETRY = Geometry(spacing=(1.0, 1.0, 1.0), origin=(10.0, -20.0, 30.0))
SHAPE = (16, 32, 32)
CONTRACT_KEYS = {"fold", "n_scans", "n_nodules", "n_candidates", "cpm", "cpm_ci", "fps_per_scan", "sensitivities",
                 "sensitivities_ci", "dice_per_nodule_mean", "dice_detected_nodule_mean", "dice_per_scan_mean",
                 "pixel", "bootstrap"}


def ball(centre, radius):
    zz, yy, xx = np.indices(SHAPE)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius ** 2


def write_store(path, uid, lung, labels):
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=np.full(SHAPE, -850, np.int16), chunks=(1, 32, 32), compression="gzip")
        f.create_dataset("lung", data=lung, chunks=(1, 32, 32), compression="gzip")
        f.create_dataset("nodule", data=labels, chunks=(1, 32, 32), compression="gzip")
        f.attrs["seriesuid"] = uid
        for key, value in GEOMETRY.as_attrs().items():
            f.attrs[key] = value


@pytest.fixture
def fold_case(tmp_path):
    """Fold 0 = scans 1.1 (two nodules) and 2.2 (none); scan 3.3 is in fold 1."""
    lung = np.zeros(SHAPE, np.uint8)
    lung[2:14, 4:28, 4:28] = 1                      # 12 lung slices per scan
    n1, n2 = ball((6, 10, 10), 3), ball((9, 22, 22), 2)
    labels = np.zeros(SHAPE, np.uint8)
    labels[n1], labels[n2] = 1, 2
    blob = np.zeros(SHAPE, bool)
    blob[12:14, 20:22, 8:10] = True                 # 8 voxels, outside nodule 1's box (y 20 > 13 + 5)
    prob = np.zeros(SHAPE, np.uint8)
    prob[n1] = 200                                  # p 0.78: nodule 1 segmented perfectly
    prob[blob] = 100                                # p 0.39: above predict's threshold 0.3 only
    probdir = tmp_path / "pred" / "probabilities"
    write_image(prob, GEOMETRY, probdir / "1.1.mha")
    write_image(np.zeros(SHAPE, np.uint8), GEOMETRY, probdir / "2.2.mha")
    (probdir / "threshold.json").write_text(json.dumps({"threshold": 0.3}), encoding="utf-8")
    stores = []
    for uid, lab in (("1.1", labels), ("2.2", np.zeros(SHAPE, np.uint8)), ("3.3", labels)):
        stores.append(tmp_path / "slices" / f"{uid}.h5")
        write_store(stores[-1], uid, lung, lab)
    w1, w2 = voxel_to_world((6, 10, 10), GEOMETRY), voxel_to_world((9, 22, 22), GEOMETRY)
    pd.DataFrame([("1.1", *w1, 6.0), ("1.1", *w2, 4.0), ("3.3", *w1, 6.0)],
                 columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]).to_csv(
        tmp_path / "annotations.csv", index=False)
    blob_w = voxel_to_world((12.5, 20.5, 8.5), GEOMETRY)
    pd.DataFrame([("1.1", *w1, 200 / 255, 6.0, 113.0), ("1.1", *blob_w, 100 / 255, 2.5, 8.0),
                  ("2.2", 0.0, 0.0, 0.0, 0.2, 3.0, 10.0), ("3.3", *w1, 0.9, 6.0, 113.0)],
                 columns=["seriesuid", "coordX", "coordY", "coordZ", "probability", "diameter_mm",
                          "volume_mm3"]).to_csv(tmp_path / "pred" / "candidates.csv", index=False)
    (tmp_path / "folds.csv").write_text("seriesuid,fold\n1.1,0\n2.2,0\n3.3,1\n", encoding="utf-8")
    return {"tmp": tmp_path, "probdir": probdir, "stores": stores, "n1": int(n1.sum()), "n2": int(n2.sum())}


def run_fold(case, bootstrap=0, **kw):
    t = case["tmp"]
    out = {k: t / "reports" / name for k, name in (("out_metrics", "metrics.json"), ("out_froc", "froc.csv"),
                                                    ("out_nodules", "nodules.csv"), ("out_plot", "froc.png"))}
    metrics = evaluate_fold(t / "pred" / "candidates.csv", case["probdir"], t / "folds.csv", 0, case["stores"],
                            t / "annotations.csv", excluded_path=None, bootstrap=bootstrap, seed=0,
                            dice_margin_mm=5, **out, **kw)
    return metrics, out


def test_evaluate_fold_numbers_and_files(fold_case):
    metrics, out = run_fold(fold_case, bootstrap=50)
    n1, n2 = fold_case["n1"], fold_case["n2"]
    saved = json.loads(out["out_metrics"].read_text(encoding="utf-8"))
    assert CONTRACT_KEYS <= set(saved)
    assert saved["fold"] == 0 and saved["n_scans"] == 2 and saved["n_nodules"] == 2
    assert saved["n_candidates"] == 3                      # scan 3.3's candidate is not in this fold
    # FROC: nodule 1 hit at 0.78 before any FP, nodule 2 missed; 2 FPs over 2 scans
    assert saved["sensitivities"] == pytest.approx([0.5] * 7)
    assert saved["cpm"] == pytest.approx(0.5)
    assert saved["fps_per_scan"] == [0.125, 0.25, 0.5, 1, 2, 4, 8]
    assert len(saved["sensitivities_ci"]) == 7 and saved["bootstrap"] == 50
    assert all(v is not None for pair in saved["sensitivities_ci"] for v in pair)
    # Dice: nodule 1 perfect, nodule 2 not found; the scan has the 8-voxel blob as FP
    assert saved["dice_per_nodule_mean"] == pytest.approx(0.5)
    assert saved["dice_detected_nodule_mean"] == pytest.approx(1.0)
    assert saved["dice_per_scan_mean"] == pytest.approx(2 * n1 / (n1 + 8 + n1 + n2))  # scan 2.2 has no nodule
    assert saved["threshold"] == 0.3
    # pixels: 2 scans x 12 lung slices x 32 x 32
    total = 2 * 12 * 32 * 32
    assert saved["pixel_counts"] == {"tp": n1, "fp": 8, "fn": n2, "tn": total - n1 - 8 - n2}
    assert saved["pixel"]["dice"] == pytest.approx(2 * n1 / (2 * n1 + 8 + n2))
    assert saved["pixel"]["accuracy"] == pytest.approx((total - 8 - n2) / total)
    assert saved["pixel"]["sensitivity"] == pytest.approx(n1 / (n1 + n2))
    assert saved["pixel"]["specificity"] == pytest.approx((total - n1 - 8 - n2) / (total - n1 - n2))

    nodules = pd.read_csv(out["out_nodules"], dtype={"seriesuid": str})
    assert list(nodules.columns) == NODULE_COLUMNS
    assert nodules["nodule_id"].tolist() == [1, 2] and nodules["detected"].tolist() == [True, False]
    assert nodules["dice"].tolist() == pytest.approx([1.0, 0.0])
    # one row per held-out scan, in the fold's order: what the pooled report sums and averages
    scans = pd.read_csv(t_scans(out), dtype={"seriesuid": str})
    assert list(scans.columns) == SCAN_COLUMNS
    lung_pixels = 12 * 32 * 32
    assert scans.drop(columns="dice").to_dict("records") == [
        {"seriesuid": "1.1", "n_nodules": 2, "has_label": True, "tp": n1, "fp": 8, "fn": n2,
         "tn": lung_pixels - n1 - 8 - n2, "threshold": 0.3},
        {"seriesuid": "2.2", "n_nodules": 0, "has_label": False, "tp": 0, "fp": 0, "fn": 0, "tn": lung_pixels,
         "threshold": 0.3}]
    assert scans["dice"][0] == saved["dice_per_scan_mean"] and np.isnan(scans["dice"][1])  # nothing to compare
    assert {k: int(scans[k].sum()) for k in ("tp", "fp", "fn", "tn")} == saved["pixel_counts"]
    froc = pd.read_csv(out["out_froc"])
    assert list(froc.columns) == ["fps_per_scan", "sensitivity", "threshold"]
    assert froc["fps_per_scan"].max() == pytest.approx(1.0)
    assert out["out_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_fold_draws_the_crops_the_report_may_show(fold_case):
    """crops.csv beside metrics.json: nodule 2 of 1.1 (missed), then the false positives by
    probability: 1.1's blob (row 1 of candidates.csv, p 0.39) and 2.2's candidate (row 2, p 0.2);
    one PNG each in crops/."""
    _, out = run_fold(fold_case)
    folder = out["out_metrics"].parent
    index = pd.read_csv(folder / "crops.csv", dtype={"seriesuid": str})
    assert index.columns.tolist() == CROP_COLUMNS
    assert index["seriesuid"].tolist() == ["1.1", "1.1", "2.2"]
    assert index["kind"].tolist() == ["missed", "false_positive", "false_positive"]
    assert index["nodule_id"].tolist()[0] == 2 and index["nodule_id"][1:].isna().all()
    assert np.isnan(index["candidate"][0]) and index["candidate"].tolist()[1:] == [1, 2]
    w2, blob = voxel_to_world((9, 22, 22), GEOMETRY), voxel_to_world((12.5, 20.5, 8.5), GEOMETRY)
    np.testing.assert_allclose(index[["coordX", "coordY", "coordZ"]].to_numpy(), [w2, blob, [0.0, 0.0, 0.0]])
    assert index["diameter_mm"].tolist() == [4.0, 2.5, 3.0]
    assert np.isnan(index["probability"][0]) and index["probability"].tolist()[1:] == pytest.approx([100 / 255, 0.2])
    assert sorted(p.name for p in (folder / "crops").iterdir()) == sorted(index["file"])
    assert all((folder / "crops" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in index["file"])
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]     # no temporary folder left


def test_crops_cover_the_top_false_positives_and_their_ties(fold_case):
    """A fold draws its false positives down to the n-th highest probability, ties included, so the
    report's n highest over all folds are drawn whatever the order of equal probabilities."""
    t = fold_case["tmp"]
    candidates = with_candidate_rows(pd.DataFrame(
        [("2.2", 0.0, 0.0, float(z), p, 3.0) for z, p in enumerate([0.2, 0.9, 0.5, 0.5, 0.1])],
        columns=["seriesuid", "coordX", "coordY", "coordZ", "probability", "diameter_mm"]))
    froc = compute_froc(read_annotations(t / "annotations.csv").iloc[0:0], candidates, ["2.2"], bootstrap=0)
    top = select_findings(froc.nodules, froc.candidates, n=1)
    assert top["candidate"].tolist() == [1] and top["kind"].tolist() == ["false_positive"]
    assert select_findings(froc.nodules, froc.candidates, n=2)["candidate"].tolist() == [1, 2, 3]
    assert select_findings(froc.nodules, froc.candidates, n=3)["candidate"].tolist() == [1, 2, 3]
    assert select_findings(froc.nodules, froc.candidates, n=12)["candidate"].tolist() == [1, 2, 3, 0, 4]
    assert CANDIDATE_ROW in froc.candidates.columns


def t_scans(out):
    return out["out_metrics"].parent / "scans.csv"


def test_metrics_from_the_saved_rows_equal_those_from_the_volumes(fold_case, monkeypatch):
    """evaluate_from_tables on the rows evaluate_fold wrote (scans.csv, nodules.csv) gives exactly the
    metrics of evaluate_scans_detail on the volumes, without reading a volume."""
    import noduleflow.evaluate as nf_evaluate

    metrics, out = run_fold(fold_case, bootstrap=30)
    t = fold_case["tmp"]
    candidates, annotations = read_candidates(t / "pred" / "candidates.csv"), read_annotations(t / "annotations.csv")
    scans, nodules = read_scan_table(t_scans(out)), read_nodule_table(out["out_nodules"])
    expected = evaluate_scans_detail(candidates, {u: fold_case["probdir"] / f"{u}.mha" for u in ("1.1", "2.2")},
                                     {p.name[:-3]: p for p in fold_case["stores"]}, annotations, None, ["1.1", "2.2"],
                                     bootstrap=30, seed=0, dice_margin_mm=5)

    def no_volume(*args, **kwargs):
        raise AssertionError("a volume was read")
    monkeypatch.setattr(nf_evaluate, "read_probability", no_volume)
    monkeypatch.setattr(nf_evaluate, "read_truth", no_volume)
    # rows in another order than the scans': the result follows ``uids``
    ev = evaluate_from_tables(candidates, scans.iloc[::-1], nodules, annotations, None, ["1.1", "2.2"],
                              bootstrap=30, seed=0, dice_margin_mm=5)
    assert json.dumps(ev.metrics, sort_keys=True) == json.dumps(expected.metrics, sort_keys=True)
    assert {"fold": 0, **ev.metrics}.keys() == metrics.keys()
    pd.testing.assert_frame_equal(ev.nodules, expected.nodules, check_exact=True)
    pd.testing.assert_frame_equal(ev.scans, expected.scans, check_exact=True)


def test_saved_rows_that_do_not_match_are_refused(fold_case):
    _, out = run_fold(fold_case)
    t = fold_case["tmp"]
    candidates, annotations = read_candidates(t / "pred" / "candidates.csv"), read_annotations(t / "annotations.csv")
    scans, nodules = read_scan_table(t_scans(out)), read_nodule_table(out["out_nodules"])
    with pytest.raises(InputError, match="scan 2.2 has no row"):
        evaluate_from_tables(candidates, scans.iloc[:1], nodules, annotations, None, ["1.1", "2.2"], bootstrap=0)
    with pytest.raises(InputError, match="nodule 2 of scan 1.1 has no row"):
        evaluate_from_tables(candidates, scans, nodules.iloc[:1], annotations, None, ["1.1", "2.2"], bootstrap=0)
    fewer = annotations.iloc[[0, 2]]                      # scan 1.1 now has one annotation, its row says 2
    with pytest.raises(InputError, match="scan 1.1 has 2 nodule"):
        evaluate_from_tables(candidates, scans, nodules, fewer, None, ["1.1", "2.2"], bootstrap=0)
    text = t_scans(out).read_text(encoding="utf-8").replace(",True,", ",yes,")
    t_scans(out).write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=r"scans.csv: line 2: has_label"):
        read_scan_table(t_scans(out))


def test_threshold_comes_from_predict(fold_case):
    (fold_case["probdir"] / "threshold.json").write_text(json.dumps({"threshold": 0.5}), encoding="utf-8")
    metrics, _ = run_fold(fold_case)
    assert metrics["pixel_counts"]["fp"] == 0                # the p = 0.39 blob is below 0.5 now


def test_missing_probability_volume_fails_before_any_output(fold_case):
    (fold_case["probdir"] / "2.2.mha").unlink()
    with pytest.raises(InputError, match="2.2.mha"):
        run_fold(fold_case)
    assert not (fold_case["tmp"] / "reports").exists()          # nor scans.csv


def test_evaluate_scans_and_pixel_counts_for_pooling(fold_case):
    t, probdir = fold_case["tmp"], fold_case["probdir"]
    slices = {p.name[:-3]: p for p in fold_case["stores"]}
    metrics, froc_df, nodules_df = evaluate_scans(
        read_candidates(t / "pred" / "candidates.csv"), {u: probdir / f"{u}.mha" for u in ("1.1", "2.2")},
        slices, read_annotations(t / "annotations.csv"), None, ["1.1", "2.2"], bootstrap=0, seed=0,
        dice_margin_mm=5)
    assert metrics["cpm"] == pytest.approx(0.5) and len(nodules_df) == 2
    assert list(froc_df.columns) == ["fps_per_scan", "sensitivity", "threshold"]
    counts = pixel_counts(probdir / "1.1.mha", slices["1.1"], threshold=0.3)
    assert (counts.tp, counts.fp, counts.fn) == (fold_case["n1"], 8, fold_case["n2"])
