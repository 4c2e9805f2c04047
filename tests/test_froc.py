"""LUNA16 FROC/CPM on hand-made cases whose answers are worked out by hand below."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from noduleflow.froc import FPS_POINTS, compute_froc, main, select_top_candidates, subgroup_froc
from noduleflow.io import InputError


def ann(rows):
    return pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])


def cand(rows):
    return pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"])


def test_candidate_just_inside_the_radius_hits_and_exactly_on_it_does_not():
    nodules = ann([("A", 10.0, 20.0, 30.0, 10.0)])  # radius 5 mm, squared 25
    inside = compute_froc(nodules, cand([("A", 14.999, 20.0, 30.0, 0.9)]), ["A"])
    on = compute_froc(nodules, cand([("A", 15.0, 20.0, 30.0, 0.9)]), ["A"])    # squared distance 25
    diagonal = compute_froc(nodules, cand([("A", 13.0, 24.0, 30.0, 0.9)]), ["A"])  # 9 + 16 = 25
    assert inside.n_detected == 1 and inside.n_false_positives == 0
    assert on.n_detected == 0 and on.n_false_positives == 1
    assert diagonal.n_detected == 0 and diagonal.n_false_positives == 1
    assert list(inside.candidates["label"]) == ["tp"] and list(on.candidates["label"]) == ["fp"]
    np.testing.assert_allclose(inside.sensitivities, 1.0)
    np.testing.assert_allclose(on.sensitivities, 0.0)  # a missed nodule: 0, never NaN
    assert on.cpm == 0.0


def test_two_candidates_on_one_nodule_count_once_with_the_highest_probability():
    nodules = ann([("A", 0.0, 0.0, 0.0, 8.0)])
    result = compute_froc(nodules, cand([("A", 1.0, 0.0, 0.0, 0.4), ("A", 0.0, -1.0, 1.0, 0.7)]), ["A"])
    assert result.n_nodules == 1 and result.n_detected == 1
    assert result.n_false_positives == 0
    assert list(result.candidates["label"]) == ["tp", "tp"]
    assert result.nodules["probability"].tolist() == [0.7]
    assert bool(result.nodules["detected"].iloc[0])
    np.testing.assert_allclose(result.sensitivities, 1.0)
    np.testing.assert_allclose(result.fps, 0.0)  # no false positive anywhere on the curve


def test_excluded_finding_is_neither_hit_nor_false_positive():
    nodules = ann([("A", 0.0, 0.0, 0.0, 10.0)])
    excluded = ann([("A", 100.0, 0.0, 0.0, -1.0),   # unknown diameter: 10 mm
                    ("A", 0.0, 100.0, 0.0, 4.0)])
    cands = cand([("A", 0.0, 0.0, 0.0, 0.5),        # the nodule
                  ("A", 104.0, 0.0, 0.0, 0.9),      # 4 mm from an excluded finding of unknown size
                  ("A", 0.0, 101.5, 0.0, 0.8),      # 1.5 mm from an excluded 4 mm finding
                  ("A", 0.0, 103.0, 0.0, 0.7)])     # 3 mm from it: outside its 2 mm radius -> FP
    with_exc = compute_froc(nodules, cands, ["A"], excluded=excluded)
    assert list(with_exc.candidates["label"]) == ["tp", "excluded", "excluded", "fp"]
    assert with_exc.n_excluded_hits == 2
    assert with_exc.n_detected == 1 and with_exc.n_false_positives == 1
    # identical to the same case without the two ignored candidates
    alone = compute_froc(nodules, cands.iloc[[0, 3]], ["A"])
    np.testing.assert_array_equal(with_exc.fps, alone.fps)
    np.testing.assert_array_equal(with_exc.sensitivity, alone.sensitivity)
    # without the excluded list they are false positives above the hit
    plain = compute_froc(nodules, cands, ["A"])
    assert plain.n_false_positives == 3


def test_scans_without_candidates_or_nodules_still_count_in_fps_per_scan():
    nodules = ann([("A", 0.0, 0.0, 0.0, 10.0)])
    cands = cand([("A", 50.0, 0.0, 0.0, 0.95), ("A", 80.0, 0.0, 0.0, 0.9), ("A", 0.0, 0.0, 1.0, 0.5)])
    one = compute_froc(nodules, cands, ["A"])
    four = compute_froc(nodules, cands, ["A", "B", "C", "D"])
    assert one.n_scans == 1 and four.n_scans == 4
    assert one.fps.max() == pytest.approx(2.0)    # 2 false positives / 1 scan
    assert four.fps.max() == pytest.approx(0.5)   # 2 false positives / 4 scans
    # the hit comes after both FPs: at 1 FP/scan only the 4-scan evaluation has reached it
    assert one.sensitivities[FPS_POINTS.index(1.0)] == 0.0
    assert four.sensitivities[FPS_POINTS.index(1.0)] == 1.0


def worked_example():
    """Five scans, four nodules, nine scored candidates (worked out in the test below)."""
    nodules = ann([
        ("A", 0.0, 0.0, 0.0, 10.0),     # n1: hit by c1 (0.9) and c2 (0.6) -> detected at 0.9
        ("A", 50.0, 0.0, 0.0, 6.0),     # n2: hit by c3 (0.4)
        ("B", 0.0, 0.0, 0.0, 8.0),      # n3: hit by c5 (0.5)
        ("D", 10.0, 10.0, 10.0, 20.0),  # n4: missed
    ])
    excluded = ann([("C", 200.0, 200.0, 200.0, -1.0)])
    cands = cand([
        ("A", 1.0, 0.0, 0.0, 0.9),       # c1 TP
        ("A", 0.0, 1.0, 0.0, 0.6),       # c2 second hit on n1: ignored
        ("A", 50.0, 2.0, 0.0, 0.4),      # c3 TP (4 < 9)
        ("A", 100.0, 100.0, 100.0, 0.7),  # c4 FP
        ("B", 0.0, 0.0, 3.0, 0.5),       # c5 TP (9 < 16)
        ("B", 30.0, 0.0, 0.0, 0.8),      # c6 FP
        ("C", -50.0, 0.0, 0.0, 0.5),     # c7 FP, ties with c5
        ("C", -80.0, 0.0, 0.0, 0.2),     # c8 FP
        ("C", 203.0, 200.0, 200.0, 0.95),  # c10 on the excluded finding: ignored
        ("D", 90.0, 90.0, 90.0, 0.35),   # c9 FP
        ("Z", 0.0, 0.0, 0.0, 0.99),      # a scan that is not evaluated: ignored
    ])
    return nodules, excluded, cands, ["A", "B", "C", "D", "E"]   # E: no nodule, no candidate


def test_seven_sensitivities_and_cpm_of_a_worked_example():
    nodules, excluded, cands, uids = worked_example()
    result = compute_froc(nodules, cands, uids, excluded=excluded)
    # By hand. Hits with their best probability: n1 0.9, n2 0.4, n3 0.5; n4 missed (4 nodules).
    # False positives: 0.8, 0.7, 0.5, 0.35, 0.2 (5 of them) over 5 scans.
    # Thresholds high -> low, (FP count, TP count): 0.9 (0,1); 0.8 (1,1); 0.7 (2,1);
    # 0.5 (3,2) (a hit and an FP tie: a diagonal step); 0.4 (3,3); 0.35 (4,3); 0.2 (5,3).
    # FPs/scan = FP/5, sensitivity = TP/4:
    #   (0, 1/4) (0.2, 1/4) (0.4, 1/4) (0.6, 2/4) (0.6, 3/4) (0.8, 3/4) (1.0, 3/4)
    # at 1/8 and 1/4: 0.25; at 1/2: halfway from (0.4, .25) to (0.6, .5) = 0.375; at 1..8: 0.75.
    expected = [0.25, 0.25, 0.375, 0.75, 0.75, 0.75, 0.75]
    np.testing.assert_allclose(result.sensitivities, expected, atol=1e-12)
    assert result.cpm == pytest.approx((0.25 + 0.25 + 0.375 + 4 * 0.75) / 7, abs=1e-12)  # 0.553571...
    assert (result.n_scans, result.n_nodules, result.n_detected, result.n_false_positives) == (5, 4, 3, 5)
    assert result.n_excluded_hits == 1
    assert result.fps.max() == pytest.approx(1.0)
    assert result.sensitivity.max() == pytest.approx(0.75)
    assert result.nodules["detected"].tolist() == [True, True, True, False]
    assert result.nodules["probability"].tolist()[:3] == [0.9, 0.4, 0.5]
    assert math.isnan(result.nodules["probability"].iloc[3])
    assert result.nodules["nodule_id"].tolist() == [1, 2, 1, 1]
    assert "Z" not in set(result.candidates["seriesuid"])



def test_subgroup_froc_counts_hits_on_other_groups_neither_way():
    nodules, excluded, cands, uids = worked_example()
    groups = ["large", "small", "small", "large"]   # by diameter: 10, 6, 8, 20 mm
    table = subgroup_froc(nodules, cands, uids, groups, excluded=excluded).set_index("group")
    # small (n2 at 0.4, n3 at 0.5): c1/c2 on n1 are now excluded, so the FPs stay the five of the
    # worked example: 0.8, 0.7 -> (0.4 FP/scan, 0); 0.5 -> (0.6, 1/2); 0.4 -> (0.6, 1); then 0.35, 0.2.
    small = table.loc["small"]
    assert (small["n_nodules"], small["n_detected"]) == (2, 2)
    assert [small[f"sens_{p:g}"] for p in FPS_POINTS] == pytest.approx([0.0, 0.0, 0.25, 1, 1, 1, 1])
    # large: n1 found at 0.9 before any FP, n4 missed
    large = table.loc["large"]
    assert (large["n_nodules"], large["n_detected"]) == (2, 1)
    assert [large[f"sens_{p:g}"] for p in FPS_POINTS] == pytest.approx([0.5] * 7)
    # one group holding every nodule is the plain FROC
    whole = subgroup_froc(nodules, cands, uids, ["all"] * 4, excluded=excluded).iloc[0]
    assert whole["cpm"] == pytest.approx(compute_froc(nodules, cands, uids, excluded=excluded).cpm)
    with pytest.raises(InputError, match="3 group labels for 4 annotations"):
        subgroup_froc(nodules, cands, uids, groups[:3])

def test_only_the_100_most_probable_candidates_of_a_scan_are_evaluated():
    probs = np.linspace(0.01, 0.99, 101)
    keep = select_top_candidates(probs)
    assert keep.sum() == 100 and not keep[0]
    # ties at the cut are all dropped, as in the script
    assert select_top_candidates(np.full(102, 0.5)).sum() == 0
    assert select_top_candidates(np.full(100, 0.5)).all()
    # a nodule found only by the least probable of 101 candidates is missed
    nodules = ann([("A", 0.0, 0.0, 0.0, 10.0)])
    rows = [("A", 0.0, 0.0, 0.0, 0.001)] + [("A", 100.0 + i * 20, 0.0, 0.0, 0.5 + i / 1000) for i in range(100)]
    result = compute_froc(nodules, cand(rows), ["A"])
    assert result.n_detected == 0 and result.n_candidates == 100
    assert result.candidates["label"].iloc[0] == "dropped"


def test_bootstrap_is_seeded_reproducible_and_never_nan():
    nodules, excluded, cands, uids = worked_example()
    a = compute_froc(nodules, cands, uids, excluded=excluded, bootstrap=200, seed=7)
    b = compute_froc(nodules, cands, uids, excluded=excluded, bootstrap=200, seed=7)
    c = compute_froc(nodules, cands, uids, excluded=excluded, bootstrap=200, seed=8)
    np.testing.assert_array_equal(a.sensitivities_ci, b.sensitivities_ci)
    np.testing.assert_array_equal(a.cpm_ci, b.cpm_ci)
    np.testing.assert_array_equal(a.bootstrap_cpms, b.bootstrap_cpms)
    assert not np.array_equal(a.bootstrap_cpms, c.bootstrap_cpms)   # another seed, other draws
    assert np.isfinite(a.sensitivities_ci).all() and np.isfinite(a.cpm_ci).all()
    assert a.cpm_ci[0] <= a.cpm <= a.cpm_ci[1]
    assert (a.sensitivities_ci[:, 0] <= a.sensitivities_ci[:, 1]).all()

    # one nodule scan among ten: about a third of the draws contain no nodule
    many = [f"S{i}" for i in range(10)]
    sparse = compute_froc(ann([("S0", 0.0, 0.0, 0.0, 10.0)]),
                          cand([("S0", 0.0, 0.0, 0.0, 0.6), ("S3", 5.0, 5.0, 5.0, 0.9)]),
                          many, bootstrap=300, seed=1)
    assert 0 < sparse.bootstrap_used < 300
    assert np.isfinite(sparse.sensitivities_ci).all() and np.isfinite(sparse.cpm_ci).all()
    assert np.isfinite(sparse.band_lower).all()


def test_no_nodules_gives_undefined_cpm_written_as_null(tmp_path):
    result = compute_froc(ann([]), cand([("A", 0.0, 0.0, 0.0, 0.5)]), ["A", "B"], bootstrap=20)
    assert result.n_nodules == 0 and math.isnan(result.cpm)
    summary = result.summary()
    assert summary["cpm"] is None and summary["cpm_ci"] == [None, None]
    json.dumps(summary, allow_nan=False)


def write_case(tmp_path):
    nodules, excluded, cands, uids = worked_example()
    paths = {name: tmp_path / f"{name}.csv" for name in ("annotations", "excluded", "candidates")}
    nodules.to_csv(paths["annotations"], index=False)
    excluded.to_csv(paths["excluded"], index=False)
    cands.to_csv(paths["candidates"], index=False)
    paths["seriesuids"] = tmp_path / "seriesuids.csv"
    paths["seriesuids"].write_text("\n".join(uids) + "\n", encoding="utf-8")  # LUNA16 style: one uid per line, no header
    return paths


def test_command_line_writes_metrics_and_curve(tmp_path):
    p = write_case(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "noduleflow.froc", "--annotations", str(p["annotations"]),
           "--candidates", str(p["candidates"]), "--excluded", str(p["excluded"]),
           "--seriesuids", str(p["seriesuids"]), "--bootstrap", "50", "--seed", "3", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["cpm"] == pytest.approx(3.875 / 7, abs=1e-9)
    assert metrics["sensitivities"] == pytest.approx([0.25, 0.25, 0.375, 0.75, 0.75, 0.75, 0.75])
    assert metrics["n_scans"] == 5 and metrics["bootstrap"] == 50
    froc = pd.read_csv(out / "froc.csv")
    assert list(froc.columns) == ["fps_per_scan", "sensitivity", "threshold"]
    assert froc["fps_per_scan"].is_monotonic_increasing
    assert froc["sensitivity"].iloc[-1] == pytest.approx(0.75)

    # without --seriesuids: the scans named in either file (A, B, C, D, Z; E cannot be known)
    out2 = tmp_path / "out2"
    main(["--annotations", str(p["annotations"]), "--candidates", str(p["candidates"]),
          "--excluded", str(p["excluded"]), "--out", str(out2)])
    assert json.loads((out2 / "metrics.json").read_text(encoding="utf-8"))["n_scans"] == 5


def test_malformed_csv_is_an_input_error_naming_the_file(tmp_path):
    p = write_case(tmp_path)
    bad = tmp_path / "bad_candidates.csv"
    bad.write_text("seriesuid,coordX,coordY,coordZ,probability\nA,1,2,3,high\n", encoding="utf-8")
    with pytest.raises(InputError, match="bad_candidates.csv"):
        main(["--annotations", str(p["annotations"]), "--candidates", str(bad), "--out", str(tmp_path / "o")])
    no_col = tmp_path / "no_diameter.csv"
    no_col.write_text("seriesuid,coordX,coordY,coordZ\nA,1,2,3\n", encoding="utf-8")
    with pytest.raises(InputError, match="no_diameter.csv"):
        main(["--annotations", str(no_col), "--candidates", str(p["candidates"]), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    # the CLI itself exits non-zero with the message
    proc = subprocess.run([sys.executable, "-m", "noduleflow.froc", "--annotations", str(p["annotations"]),
                           "--candidates", str(bad), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode != 0 and "bad_candidates.csv" in proc.stderr
