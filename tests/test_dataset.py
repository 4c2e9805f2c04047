"""Real (LUNA16-layout) data: discovery, seriesuid restriction, and workflow-level input errors."""

from __future__ import annotations

import pandas as pd
import pytest

from phantom import cached_phantom
from noduleflow.io import write_image
from workflow_helpers import copy_workflow, planned_jobs, planned_rules, snakemake, write_config

UIDS = ["1.2.826.0.1.1", "1.2.826.0.1.2"]


@pytest.fixture()
def luna(tmp_path):
    """A LUNA16-style folder: subset0/ and subset1/ with one scan each, annotations.csv."""
    root = tmp_path / "luna"
    rows = []
    for i, uid in enumerate(UIDS):
        ph = cached_phantom(shape_zyx=(24, 96, 96), uid="1.2.3.4", seed=i)
        write_image(ph.image, ph.geometry, root / f"subset{i}" / f"{uid}.mhd")
        rows.append(ph.nodules.assign(seriesuid=uid))
    pd.concat(rows).to_csv(root / "annotations.csv", index=False)
    pd.concat(rows).iloc[:0].to_csv(root / "annotations_excluded.csv", index=False)
    workdir = copy_workflow(tmp_path / "wf")
    return root, workdir


def test_scans_are_found_in_subset_folders_and_can_be_restricted(luna):
    root, workdir = luna
    write_config(workdir, {"dataset": {"root": str(root), "masks": None}})
    rules = planned_rules(planned_jobs(workdir, "preprocess", "--configfile", "tiny.yaml"))
    assert rules["resample"] == 2 and "synthesize" not in rules
    write_config(workdir, {"dataset": {"root": str(root), "masks": None, "seriesuids": UIDS[:1]}})
    jobs = planned_jobs(workdir, "preprocess", "--configfile", "tiny.yaml")
    assert [w["uid"] for r, w in jobs if r == "resample"] == UIDS[:1]


def test_an_annotation_for_a_scan_that_does_not_exist_stops_the_run(luna):
    root, workdir = luna
    table = pd.read_csv(root / "annotations.csv", dtype={"seriesuid": str})
    orphan = table.iloc[:1].assign(seriesuid="9.9.9")
    pd.concat([table, orphan]).to_csv(root / "annotations.csv", index=False)
    write_config(workdir, {"dataset": {"root": str(root), "masks": None}})
    proc = snakemake(workdir, "-n", "--configfile", "tiny.yaml", check=False)
    assert proc.returncode != 0
    assert "annotations.csv" in proc.stderr + proc.stdout and "9.9.9" in proc.stderr + proc.stdout


def test_an_unknown_seriesuid_in_the_restriction_list_is_named(luna):
    root, workdir = luna
    write_config(workdir, {"dataset": {"root": str(root), "masks": None, "seriesuids": ["4.5.6"]}})
    proc = snakemake(workdir, "-n", "--configfile", "tiny.yaml", check=False)
    assert proc.returncode != 0 and "dataset.seriesuids" in proc.stderr + proc.stdout


def test_an_invalid_config_value_names_the_key(luna):
    _, workdir = luna
    write_config(workdir, {"cv": {"folds": 1}})
    proc = snakemake(workdir, "-n", "--configfile", "tiny.yaml", check=False)
    assert proc.returncode != 0 and "folds" in proc.stderr + proc.stdout


def test_a_configured_excluded_file_that_is_missing_stops_the_run(luna):
    """Scoring without LUNA16's excluded findings must be asked for (dataset.excluded: null)."""
    root, workdir = luna
    (root / "annotations_excluded.csv").unlink()
    write_config(workdir, {"dataset": {"root": str(root), "masks": None}})
    proc = snakemake(workdir, "-n", "--configfile", "tiny.yaml", check=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and "annotations_excluded.csv" in out and "dataset.excluded" in out
    write_config(workdir, {"dataset": {"root": str(root), "masks": None, "excluded": None}})
    assert planned_rules(planned_jobs(workdir, "--configfile", "tiny.yaml"))["evaluate"] == 5  # cv.folds


def test_the_excluded_file_is_an_input_of_evaluation(luna):
    """Editing annotations_excluded.csv reruns evaluate and report (it is their input, not a param)."""
    root, workdir = luna
    write_config(workdir, {"dataset": {"root": str(root), "masks": None}})
    proc = snakemake(workdir, "-n", "--cores", "2", "--configfile", "tiny.yaml", "--printshellcmds")
    blocks = (proc.stdout + proc.stderr).split("rule ")
    for rule in ("evaluate", "report"):
        block = next(b for b in blocks if b.startswith(rule + ":"))
        inputs = next(line for line in block.splitlines() if line.strip().startswith("input:"))
        assert str(root / "annotations_excluded.csv") in inputs, (rule, inputs)
