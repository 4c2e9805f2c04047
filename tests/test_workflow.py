"""End to end: the whole workflow on a tiny config, then the exact rerun plan after each change.

One uninterrupted run (module-scoped fixture) is shared by the plan checks. A user's daily loop is
"change one setting, rerun": only the stages that depend on the change may be planned.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workflow_helpers import (REPO_ROOT, TINY_CONFIG, TINY_MIN_POOLED_CPM, copy_workflow, deep_update, planned_jobs,
                              planned_rules, snakemake, write_config)

pytestmark = pytest.mark.e2e

PREPROCESS = {"resample", "lung_mask", "extract_slices"}
AFTER_PATCHES = {"sample_patches", "train", "predict", "evaluate", "report"}
# when the patch plan (a checkpoint) reruns, which scans are sampled again is decided after it has run:
# a dry run shows the plan and what follows the per-scan sampling, not the per-scan jobs themselves
AFTER_PLAN = {"plan_patches", "train", "predict", "evaluate", "report"}


def plan_after(workdir: Path, change: dict, env: dict | None = None) -> list:
    write_config(workdir, deep_update(TINY_CONFIG, change), name="changed.yaml")
    return planned_jobs(workdir, "--configfile", "changed.yaml", env=env)


def test_default_target_builds_reports_and_finds_the_nodules(tiny_run):
    reports = tiny_run / "results" / "reports"
    for name in ("summary.csv", "froc.png", "report.html"):
        assert (reports / name).stat().st_size > 0
    for k in range(TINY_CONFIG["cv"]["folds"]):
        metrics = json.loads((reports / f"fold{k}" / "metrics.json").read_text(encoding="utf-8"))
        assert len(metrics["sensitivities"]) == 7
        assert metrics["n_detected"] > 0 and metrics["cpm"] > 0, metrics  # every fold finds nodules
    pooled = json.loads((reports / "metrics_pooled.json").read_text(encoding="utf-8"))
    assert pooled["n_scans"] == TINY_CONFIG["synthetic"]["n_scans"]
    assert pooled["cpm"] >= TINY_MIN_POOLED_CPM, pooled
    # nothing left to do: an unchanged rerun plans no job
    assert planned_rules(planned_jobs(tiny_run, "--configfile", "tiny.yaml")) == {}


def test_snakemake_report_holds_the_froc_plots_with_their_captions(tiny_run, tmp_path):
    """`snakemake --report report.zip` (the Snakemake catalog's browsable report): every FROC plot and
    summary.csv, byte for byte, and the captions of workflow/report/*.rst rendered with the run's
    values."""
    zipped = tmp_path / "report.zip"
    snakemake(tiny_run, "--report", str(zipped), "--configfile", "tiny.yaml")
    with zipfile.ZipFile(zipped) as archive:
        names = archive.namelist()
        page = archive.read("report/report.html").decode()
        digests = {hashlib.sha256(archive.read(n)).hexdigest() for n in names if n.startswith("report/data/")}
    reports = tiny_run / "results" / "reports"
    shown = [reports / f"fold{k}" / "froc.png" for k in range(TINY_CONFIG["cv"]["folds"])]
    shown += [reports / "froc.png", reports / "summary.csv"]
    for path in shown:
        assert hashlib.sha256(path.read_bytes()).hexdigest() in digests, (path, names)
    for k in range(TINY_CONFIG["cv"]["folds"]):
        assert f"FROC curve of fold {k}" in page
    assert "FROC curves of every fold and pooled" in page
    assert f"({TINY_CONFIG['evaluate']['bootstrap']} resamples)" in page   # the caption's template was filled
    assert "One row per fold" in page and "noduleflow: lung nodules in chest CT" in page


@pytest.mark.parametrize("change, expected", [
    ({"preprocess": {"spacing_mm": [2.5, 2.5, 2.5]}},
     PREPROCESS | AFTER_PLAN),
    ({"lungmask": {"closing_mm": 8}},
     {"lung_mask", "extract_slices"} | AFTER_PLAN),
    ({"sampling": {"positive_fraction": 0.4}}, AFTER_PLAN),
    ({"sampling": {"context_step": 3}}, AFTER_PATCHES),
    ({"cv": {"seed": 1}}, {"split_folds", "train", "predict", "evaluate", "report"}),
    ({"train": {"lr": 0.001}}, {"train", "predict", "evaluate", "report"}),
    ({"predict": {"threshold": 0.6}}, {"predict", "evaluate", "report"}),
    ({"evaluate": {"bootstrap": 11}}, {"evaluate", "report"}),
    ({"second_stage": {"enabled": True}}, {"candidate_crops", "rescore", "evaluate", "report"}),
    ({"second_stage": {"epochs": 3}}, set()),   # off: its settings touch nothing
], ids=["spacing", "lungmask", "positive_fraction", "context_step", "cv_seed", "lr", "threshold", "bootstrap",
        "second_stage_on", "second_stage_off_epochs"])
def test_a_changed_setting_reruns_exactly_its_stage_and_what_follows(tiny_run, change, expected):
    rules = planned_rules(plan_after(tiny_run, change))
    assert set(rules) == expected, rules
    if "resample" in expected:
        assert rules["resample"] == TINY_CONFIG["synthetic"]["n_scans"]
    if "train" in expected:
        assert rules["train"] == TINY_CONFIG["cv"]["folds"]
    if "sample_patches" in expected:  # one job per scan
        assert rules["sample_patches"] == TINY_CONFIG["synthetic"]["n_scans"]


def test_an_unrelated_config_edit_reruns_nothing(tiny_run):
    # experiments are separate runs: declaring one must not touch the base run's files
    rules = planned_rules(plan_after(tiny_run, {"experiments": {"x": {"train": {"lr": 0.01}}}}))
    assert rules == {}


def test_touching_one_scan_reruns_only_its_preprocessing(tiny_run):
    scans = sorted((tiny_run / "resources" / "synthetic" / "subset0").glob("*.mhd"))
    touched = scans[1]
    later = time.time() + 5
    os.utime(touched.with_suffix(".raw"), (later, later))
    try:
        jobs = planned_jobs(tiny_run, "--configfile", "tiny.yaml")
    finally:
        earlier = touched.stat().st_mtime
        os.utime(touched.with_suffix(".raw"), (earlier, earlier))
    uid = touched.name[: -len(".mhd")]
    for rule, wildcards in jobs:
        if rule in PREPROCESS:
            assert wildcards["uid"] == uid, (rule, wildcards)
    rules = planned_rules(jobs)
    assert set(rules) == PREPROCESS | AFTER_PLAN
    assert all(rules[r] == 1 for r in PREPROCESS)


def test_a_new_scan_adds_only_its_own_preprocessing(tiny_run):
    n = TINY_CONFIG["synthetic"]["n_scans"]
    jobs = plan_after(tiny_run, {"synthetic": {"n_scans": n + 1}})
    rules = planned_rules(jobs)
    assert rules["synthesize"] == 1
    assert all(rules[r] == 1 for r in PREPROCESS), rules
    assert {"plan_patches", "split_folds", "train"} <= set(rules)


def test_a_new_scan_is_sampled_alone_when_the_others_keep_their_counts(tiny_run, tmp_path):
    """Patches are sampled one job per scan from the cohort's plan: after a scan is added, the plan
    is made again and only the scans whose counts changed (here: none of the old ones, every tiny
    scan has nodules) and the new one are sampled; the other files are kept as they are."""
    from noduleflow.patchplan import read_plan

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    scans = workdir / "results" / "patches" / "scans"
    before = {p.name: p.stat().st_mtime_ns for p in scans.glob("*.h5")}
    old_plan = read_plan(workdir / "results" / "patches" / "plan.csv")
    assert len(before) == len(old_plan) == TINY_CONFIG["synthetic"]["n_scans"]
    write_config(workdir, deep_update(TINY_CONFIG, {"synthetic": {"n_scans": len(before) + 1}}), name="more.yaml")
    new_plan_path = workdir / "results" / "patches" / "plan.csv"
    snakemake(workdir, "patches", "--cores", "2", "--configfile", "more.yaml")
    new_plan = read_plan(new_plan_path)
    added = set(new_plan) - set(old_plan)
    assert len(added) == 1
    changed = {u for u in old_plan if new_plan[u] != old_plan[u]}
    after = {p.name: p.stat().st_mtime_ns for p in scans.glob("*.h5")}
    resampled = {name[:-len(".h5")] for name in after if before.get(name) != after[name]}
    assert resampled == added | changed, (resampled, added, changed)
    log = (workdir / "results" / "logs" / "plan_patches.log").read_text(encoding="utf-8")
    assert f"from {len(new_plan)} scans" in log


def test_a_changed_module_reruns_its_stage_and_what_follows(tiny_run, tmp_path):
    """Code digests follow the imports and ignore comments: a comment-only edit of io.py (imported by
    every stage) plans nothing; a changed line of code inside a function of intensity.py plans
    sample_patches onward; a code change in froc.py plans evaluation only."""
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {"PYTHONPATH": str(src)}
    io = src / "noduleflow" / "io.py"
    io.write_text(io.read_text(encoding="utf-8").replace("def atomic_path(", "# a new comment\ndef atomic_path(", 1) + "\n# more\n")
    assert planned_rules(planned_jobs(tiny_run, "--configfile", "tiny.yaml", env=env)) == {}
    intensity = src / "noduleflow" / "intensity.py"
    original = intensity.read_text(encoding="utf-8")
    marker = "def apply_roi("
    head, tail = original.split(marker, 1)
    signature_end = tail.index('"""', tail.index('"""') + 3) + 3  # after the docstring
    intensity.write_text(head + marker + tail[:signature_end] + "\n    _unused = 1" + tail[signature_end:], encoding="utf-8")
    rules = planned_rules(planned_jobs(tiny_run, "--configfile", "tiny.yaml", env=env))
    assert set(rules) == AFTER_PATCHES, rules  # the plan does not import intensity: it stays
    assert rules["sample_patches"] == TINY_CONFIG["synthetic"]["n_scans"]
    intensity.write_text(original, encoding="utf-8")
    froc = src / "noduleflow" / "froc.py"
    froc.write_text(froc.read_text(encoding="utf-8") + "\nEXTRA_CONSTANT = 1\n")
    rules = planned_rules(planned_jobs(tiny_run, "--configfile", "tiny.yaml", env=env))
    assert set(rules) == {"evaluate", "report"}, rules


def test_experiments_with_training_overrides_reuse_preprocessing_and_patches(tiny_run):
    experiments = {"experiments": {
        "complementary": {"train": {"label_mode": "complementary", "loss": "dice"}},
        "hybrid_pos": {"train": {"label_mode": "hybrid"}, "predict": {"hybrid_output": "positive"}},
        "hybrid_neg": {"train": {"label_mode": "hybrid"}, "predict": {"hybrid_output": "negative"}},
        "no_roi": {"preprocess": {"lung_roi": False}},
    }}
    write_config(tiny_run, deep_update(TINY_CONFIG, experiments), name="experiments.yaml")
    jobs = planned_jobs(tiny_run, "experiments", "--configfile", "experiments.yaml")
    rules = planned_rules(jobs)
    assert not PREPROCESS & set(rules), rules
    assert "split_folds" not in rules
    # only no_roi samples new patches (lung_roi changes what a patch shows): its own plan, then its scans
    assert rules["plan_patches"] == 1
    assert {w["prefix"] for r, w in jobs if r == "plan_patches"} == {"results/experiments/no_roi/"}
    folds = TINY_CONFIG["cv"]["folds"]
    # complementary, one shared hybrid training, no_roi
    assert rules["train"] == 3 * folds
    assert rules["predict"] == 4 * folds and rules["compare_experiments"] == 1


def test_the_second_stage_as_an_experiment_reuses_predictions_and_moves_no_candidate(tiny_run, tmp_path):
    """second_stage on, as an experiment: the base run's predictions are reused; each fold's
    re-scored candidates are predict's rows at predict's positions; the experiment's evaluation
    scores the re-scored probabilities."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True, ignore=shutil.ignore_patterns(".snakemake"))
    overrides = deep_update(TINY_CONFIG, {"experiments": {"fpr": {"second_stage": {"enabled": True, "epochs": 4}}}})
    write_config(run, overrides, name="fpr.yaml")
    folds = TINY_CONFIG["cv"]["folds"]
    rules = planned_rules(planned_jobs(run, "experiments", "--configfile", "fpr.yaml"))
    assert rules == {"candidate_crops": folds, "rescore": folds, "evaluate": folds, "report": 1,
                     "compare_experiments": 1}, rules
    snakemake(run, "experiments", "--cores", "2", "--configfile", "fpr.yaml")
    exp = run / "results" / "experiments" / "fpr"
    assert not (exp / "predictions").exists()   # predict's files are the base run's
    for k in range(folds):
        detector = pd.read_csv(run / "results" / "predictions" / f"fold{k}" / "candidates.csv", dtype={"seriesuid": str})
        rescored = pd.read_csv(exp / "second_stage" / f"fold{k}" / "candidates.csv", dtype={"seriesuid": str})
        columns = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
        pd.testing.assert_frame_equal(rescored[columns], detector[columns])
        np.testing.assert_array_equal(rescored["detector_probability"], detector["probability"])
        assert not np.array_equal(rescored["probability"], detector["probability"])
        # the experiment's evaluation ranked the re-scored probabilities: a found nodule's
        # probability is one of them
        nodules = pd.read_csv(exp / "reports" / f"fold{k}" / "nodules.csv")
        found = nodules["probability"].dropna().to_numpy()
        assert len(found) and np.isin(found, rescored["probability"].to_numpy()).all(), (found, rescored)
    # the report shows predict's settings (threshold.json beside predict's maps) and says the folds were re-scored
    settings = json.loads((exp / "reports" / "metrics_pooled.json").read_text(encoding="utf-8"))["settings"]["folds"]
    pooled = run / "results" / "reports" / "metrics_pooled.json"
    base = json.loads(pooled.read_text(encoding="utf-8"))["settings"]["folds"]
    for k in range(folds):
        assert settings[str(k)]["second_stage"] is True and base[str(k)]["second_stage"] is False
        assert settings[str(k)]["threshold"] == TINY_CONFIG["predict"]["threshold"], settings


def test_documented_experiment_commands_name_the_target_before_configfile():
    """--configfile takes every following word as a file, so a target after it is read as a config
    file ("No such file: experiments"): the Makefile, README and paper_table2.yaml must put it first."""
    commands = []
    for name in ("Makefile", "README.md", "config/paper_table2.yaml"):
        for line in (REPO_ROOT / name).read_text(encoding="utf-8").splitlines():
            for segment in line.split("#"):  # commands in comments too ("make experiments  # = snakemake ...")
                command = segment.strip().lstrip("=").split()
                if "snakemake" in " ".join(command) and "--configfile" in command and "experiments" in command:
                    commands.append(command)
    assert len(commands) >= 3
    for command in commands:
        assert "experiments" not in command[command.index("--configfile") + 1:], " ".join(command)


def test_volumes_not_kept_are_deleted_once_the_slice_stores_are_built(tmp_path):
    """preprocess.keep_volumes: false (LUNA16 scale): resampled/ and lungmask/ volumes are Snakemake
    temp files; the slice stores, which every later stage reads, stay."""
    from noduleflow.runconfig import ConfigError, check_config

    workdir = copy_workflow(tmp_path / "wf")
    config = deep_update(TINY_CONFIG, {"synthetic": {"n_scans": 3}, "preprocess": {"keep_volumes": False}})
    write_config(workdir, config)
    snakemake(workdir, "preprocess", "--cores", "2", "--configfile", "tiny.yaml")
    results = workdir / "results"
    assert len(list((results / "slices").glob("*.h5"))) == 3
    assert not list((results / "resampled").glob("*.mha")) and not list((results / "lungmask").glob("*.mha"))
    with pytest.raises(ConfigError, match="experiments.x may not set preprocess.keep_volumes"):
        check_config({"experiments": {"x": {"preprocess": {"keep_volumes": True}}}})
