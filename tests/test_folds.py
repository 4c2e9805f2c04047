"""Cross-validation folds by scan (noduleflow.folds)."""

import numpy as np
import pandas as pd
import pytest

from noduleflow.folds import read_fold_uids, read_folds, split_folds
from noduleflow.io import InputError

UIDS = [f"1.2.{i:03d}" for i in range(23)]
WITH_NODULES = UIDS[:11]


@pytest.fixture()
def annotations(tmp_path):
    rows = [(u, 1.0, 2.0, 3.0, 6.0) for u in WITH_NODULES] + [(WITH_NODULES[0], 5.0, 5.0, 5.0, 8.0)]
    path = tmp_path / "annotations.csv"
    pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]).to_csv(path, index=False)
    return path


def test_every_scan_in_exactly_one_fold_and_nodule_scans_spread_evenly(annotations, tmp_path):
    frame = split_folds(annotations, UIDS, tmp_path / "folds.csv", folds=5, seed=0)
    written = pd.read_csv(tmp_path / "folds.csv", dtype={"seriesuid": str})
    pd.testing.assert_frame_equal(frame, written)
    assert sorted(written["seriesuid"]) == sorted(UIDS) and written["seriesuid"].is_unique
    assert set(written["fold"]) == set(range(5))
    per_fold = written[written["seriesuid"].isin(WITH_NODULES)].groupby("fold").size().reindex(range(5), fill_value=0)
    assert per_fold.max() - per_fold.min() <= 1
    sizes = written.groupby("fold").size()
    assert sizes.max() - sizes.min() <= 1


def test_same_seed_same_folds_other_seed_other_folds(annotations, tmp_path):
    a = split_folds(annotations, UIDS, tmp_path / "a.csv", folds=5, seed=3)
    b = split_folds(annotations, list(reversed(UIDS)), tmp_path / "b.csv", folds=5, seed=3)
    c = split_folds(annotations, UIDS, tmp_path / "c.csv", folds=5, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not np.array_equal(a["fold"], c["fold"])


def test_scans_of_one_patient_stay_together(annotations, tmp_path):
    groups = tmp_path / "groups.csv"
    pd.DataFrame({"seriesuid": UIDS, "patient": [f"p{i // 2}" for i in range(len(UIDS))]}).to_csv(groups, index=False)
    frame = split_folds(annotations, UIDS, tmp_path / "folds.csv", groups_path=groups, folds=4, seed=0)
    frame["patient"] = [f"p{i // 2}" for i in range(len(UIDS))]
    assert (frame.groupby("patient")["fold"].nunique() == 1).all()


def test_a_user_split_file_wins_and_is_validated(annotations, tmp_path):
    split = tmp_path / "split.csv"
    pd.DataFrame({"seriesuid": UIDS, "fold": [i % 3 for i in range(len(UIDS))]}).to_csv(split, index=False)
    frame = split_folds(annotations, UIDS, tmp_path / "folds.csv", folds=3, split_file=split)
    assert list(frame["fold"]) == [i % 3 for i in range(len(UIDS))]
    pd.DataFrame({"seriesuid": UIDS[:-1], "fold": [i % 3 for i in range(len(UIDS) - 1)]}).to_csv(split, index=False)
    with pytest.raises(InputError, match="split.csv.*no fold"):
        split_folds(annotations, UIDS, tmp_path / "bad.csv", folds=3, split_file=split)
    assert not (tmp_path / "bad.csv").exists()


def test_too_few_scans_for_the_folds_names_the_key(annotations, tmp_path):
    with pytest.raises(InputError, match="cv.folds"):
        split_folds(annotations, UIDS[:3], tmp_path / "folds.csv", folds=5)
    assert not (tmp_path / "folds.csv").exists()


@pytest.mark.parametrize("n_scans,n_nodule_scans,folds", [(10, 4, 5), (23, 11, 5), (40, 7, 5), (12, 12, 3),
                                                          (7, 3, 5), (5, 0, 5), (2, 1, 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nodule_scans_spread_within_one_per_fold_for_many_cohorts(tmp_path, n_scans, n_nodule_scans, folds, seed):
    uids = [f"9.{i:03d}" for i in range(n_scans)]
    path = tmp_path / "annotations.csv"
    rows = [(u, 0.0, 0.0, 0.0, 5.0) for u in uids[:n_nodule_scans]]
    pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]).to_csv(path, index=False)
    frame = split_folds(path, uids, tmp_path / "folds.csv", folds=folds, seed=seed)
    assert sorted(frame["seriesuid"]) == uids and set(frame["fold"]) == set(range(folds))
    per_fold = np.bincount(frame.loc[frame["seriesuid"].isin(uids[:n_nodule_scans]), "fold"], minlength=folds)
    assert per_fold.max() - per_fold.min() <= 1


def test_annotations_of_other_scans_are_ignored_and_output_is_sorted(annotations, tmp_path):
    subset = list(reversed(UIDS[5:20]))
    frame = split_folds(annotations, subset, tmp_path / "folds.csv", folds=3, seed=0)
    assert list(frame["seriesuid"]) == sorted(subset)
    assert list(frame.columns) == ["seriesuid", "fold"]


@pytest.mark.parametrize("content,message", [
    ("seriesuid,fold\n" + "".join(f"{u},{i % 3}\n" for i, u in enumerate(UIDS)) + f"{UIDS[0]},1\n", "listed twice"),
    ("seriesuid,fold\n" + "".join(f"{u},{i % 3}\n" for i, u in enumerate(UIDS)) + "7.7.7,1\n", "not scans of the data set"),
    ("seriesuid,fold\n" + "".join(f"{u},{i % 3}\n" for i, u in enumerate(UIDS[:-1])) + f"{UIDS[-1]},1.5\n", "not an integer"),
    ("seriesuid,fold\n" + "".join(f"{u},{i % 3}\n" for i, u in enumerate(UIDS[:-1])) + f"{UIDS[-1]},3\n", "not an integer in 0..2"),
    ("seriesuid,fold\n" + "".join(f"{u},{i % 2}\n" for i, u in enumerate(UIDS)), "fold 2 has no scan"),
    ("seriesuid,split\n" + "".join(f"{u},{i % 3}\n" for i, u in enumerate(UIDS)), "missing column"),
])
def test_split_file_problems_are_reported_with_the_file_name(annotations, tmp_path, content, message):
    split = tmp_path / "my_split.csv"
    split.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=f"my_split.csv.*{message}"):
        split_folds(annotations, UIDS, tmp_path / "folds.csv", folds=3, split_file=split)
    assert not (tmp_path / "folds.csv").exists()


def test_missing_split_file_or_patient_is_an_input_error(annotations, tmp_path):
    with pytest.raises(InputError, match="nowhere.csv.*not found"):
        split_folds(annotations, UIDS, tmp_path / "folds.csv", split_file=tmp_path / "nowhere.csv")
    groups = tmp_path / "groups.csv"
    pd.DataFrame({"seriesuid": UIDS[1:], "patient": "p"}).to_csv(groups, index=False)
    with pytest.raises(InputError, match=f"groups.csv.*no patient.*{UIDS[0]}"):
        split_folds(annotations, UIDS, tmp_path / "folds.csv", groups_path=groups)
    assert not (tmp_path / "folds.csv").exists()


def test_too_few_patients_for_the_folds_names_the_key(annotations, tmp_path):
    groups = tmp_path / "groups.csv"
    pd.DataFrame({"seriesuid": UIDS, "patient": [f"p{i % 3}" for i in range(len(UIDS))]}).to_csv(groups, index=False)
    with pytest.raises(InputError, match="cv.folds = 5.*only 3 patients"):
        split_folds(annotations, UIDS, tmp_path / "folds.csv", groups_path=groups, folds=5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_strata_spread_over_the_folds_and_nodule_scans_stay_balanced(annotations, tmp_path, seed):
    # the 11 nodule-bearing scans: 5 "subsolid" ones listed together, which stratifying by nodule
    # presence alone can pile into one or two folds
    subsolid = WITH_NODULES[:5]
    strata = tmp_path / "strata.csv"
    pd.DataFrame({"seriesuid": UIDS, "stratum": ["subsolid" if u in subsolid else ("solid" if u in WITH_NODULES
                                                                                     else "none") for u in UIDS]}
                 ).to_csv(strata, index=False)
    frame = split_folds(annotations, UIDS, tmp_path / "folds.csv", folds=5, seed=seed, strata_path=strata)
    assert sorted(frame["seriesuid"]) == sorted(UIDS) and set(frame["fold"]) == set(range(5))
    for members in (subsolid, WITH_NODULES):
        per_fold = np.bincount(frame.loc[frame["seriesuid"].isin(members), "fold"], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (members is subsolid, per_fold)
    again = split_folds(annotations, list(reversed(UIDS)), tmp_path / "again.csv", folds=5, seed=seed,
                        strata_path=strata)
    pd.testing.assert_frame_equal(frame, again)


def test_strata_are_honoured_by_the_greedy_split_of_small_cohorts(tmp_path):
    # 7 scans in 5 folds with 3 nodule-bearing ones (StratifiedGroupKFold refuses): the two
    # "subsolid" scans must still land in different folds
    uids = [f"8.{i}" for i in range(7)]
    path = tmp_path / "annotations.csv"
    pd.DataFrame([(u, 0.0, 0.0, 0.0, 5.0) for u in uids[:3]],
                 columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]).to_csv(path, index=False)
    strata = tmp_path / "strata.csv"
    pd.DataFrame({"seriesuid": uids, "stratum": ["subsolid", "subsolid"] + ["x"] * 5}).to_csv(strata, index=False)
    for seed in range(6):
        frame = split_folds(path, uids, tmp_path / "folds.csv", folds=5, seed=seed, strata_path=strata)
        fold = dict(zip(frame["seriesuid"], frame["fold"]))
        assert fold[uids[0]] != fold[uids[1]]
        assert np.bincount([fold[u] for u in uids[:3]], minlength=5).max() == 1


@pytest.mark.parametrize("content,message", [
    ("seriesuid,stratum\n" + "".join(f"{u},a\n" for u in UIDS[1:]), f"no stratum, e.g. {UIDS[0]}"),
    ("seriesuid,stratum\n" + "".join(f"{u},a\n" for u in UIDS) + f"{UIDS[3]},b\n", "listed twice"),
    ("seriesuid,stratum\n" + "".join(f"{u},a\n" for u in UIDS[1:]) + f"{UIDS[0]},\n", "line 24: empty stratum"),
    ("seriesuid,texture\n" + "".join(f"{u},a\n" for u in UIDS), "missing column"),
])
def test_strata_file_problems_name_the_file(annotations, tmp_path, content, message):
    strata = tmp_path / "my_strata.csv"
    strata.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=f"my_strata.csv.*{message}"):
        split_folds(annotations, UIDS, tmp_path / "folds.csv", folds=5, strata_path=strata)
    assert not (tmp_path / "folds.csv").exists()


def test_the_folds_file_reads_back_as_written(annotations, tmp_path):
    """Every later stage (train, predict, evaluate, report) reads folds.csv with read_folds."""
    written = split_folds(annotations, UIDS, tmp_path / "folds.csv", folds=5, seed=0)
    pd.testing.assert_frame_equal(read_folds(tmp_path / "folds.csv"), written)
    for k in range(5):
        assert read_fold_uids(tmp_path / "folds.csv", k) == written.loc[written["fold"] == k, "seriesuid"].tolist()


@pytest.mark.parametrize("content, message", [
    ("seriesuid,fold\na,0\nb,1\nc,0\n", "fold 3 has no scans"),
    ("seriesuid,split\na,0\n", "missing column"),
    ("seriesuid,fold\na,0\nb,x\n", "line 3: fold = x is not an integer"),
    ("seriesuid,fold\na,0\nb,-1\n", "line 3: fold = -1 is not an integer >= 0"),
    ("seriesuid,fold\na,0\n,1\n", "line 3: empty seriesuid"),
    ("seriesuid,fold\na,0\n a ,1\n", "seriesuid a is listed twice"),
    ("", "malformed CSV"),
])
def test_a_bad_folds_file_is_an_input_error_naming_it(tmp_path, content, message):
    path = tmp_path / "bad_folds.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match="bad_folds.csv") as error:
        read_fold_uids(path, 3)
    assert message in str(error.value)
    with pytest.raises(InputError, match="missing.csv: file not found"):
        read_folds(tmp_path / "missing.csv")


def test_fold_uids_keep_the_file_order_and_strip_blanks(tmp_path):
    path = tmp_path / "folds.csv"
    path.write_text("seriesuid,fold\nc ,0\nb,1\na,0\n", encoding="utf-8")
    assert read_fold_uids(path, 0) == ["c", "a"]
