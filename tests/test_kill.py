"""Survive kills: SIGTERM during training and during preprocessing, then rerun.

A killed job leaves no file that looks finished; training resumes from its last checkpoint (no epoch
is run twice) and the rerun ends with exactly the metrics of an uninterrupted run (CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from workflow_helpers import SNAKEMAKE, TINY_CONFIG, snakemake

pytestmark = pytest.mark.e2e


def start(workdir: Path, *args: str) -> subprocess.Popen:
    """snakemake in its own process group, like a batch job whose whole group gets the signal."""
    log = open(workdir / "snakemake.out", "w")
    return subprocess.Popen([*SNAKEMAKE, *args, "--cores", "2", "--configfile", "tiny.yaml"], cwd=workdir,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended ({proc.returncode}) before the kill point")
        time.sleep(0.05)
    raise AssertionError("kill point not reached in time")


def terminate(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture()
def reference(tiny_run) -> Path:
    """An uninterrupted run of the tiny workflow (shared with the plan checks)."""
    return tiny_run


def copy_run(source: Path, dest: Path, drop: tuple[str, ...]) -> Path:
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns(".snakemake"))
    for name in drop:
        shutil.rmtree(dest / "results" / name, ignore_errors=True)
    # the copy keeps mtimes (copytree uses copy2), so only the dropped stages are planned
    return dest


def test_sigterm_during_training_resumes_and_matches_an_uninterrupted_run(reference, tmp_path):
    workdir = copy_run(reference, tmp_path / "run", drop=("models", "predictions", "reports"))
    checkpoints = workdir / "results" / "models" / "fold0" / "checkpoints"
    proc = start(workdir)
    wait_for(lambda: checkpoints.is_dir() and any(checkpoints.glob("*.pt")), proc)
    terminate(proc)
    assert not (workdir / "results" / "models" / "fold0" / "model.pt").exists()
    assert any(checkpoints.glob("*.pt")), "the checkpoint must survive the killed job"

    snakemake(workdir, "--cores", "2", "--configfile", "tiny.yaml")
    train_log = (workdir / "results" / "logs" / "train" / "fold0.log").read_text(encoding="utf-8")
    assert "resum" in train_log.lower(), train_log[-2000:]
    for k in range(TINY_CONFIG["cv"]["folds"]):
        history = pd.read_csv(workdir / "results" / "models" / f"fold{k}" / "history.csv")
        assert history["epoch"].is_unique
        assert list(history["epoch"]) == list(range(1, len(history) + 1))
        ours = json.loads((workdir / "results" / "reports" / f"fold{k}" / "metrics.json").read_text(encoding="utf-8"))
        theirs = json.loads((reference / "results" / "reports" / f"fold{k}" / "metrics.json").read_text(encoding="utf-8"))
        assert ours == theirs
    pd.testing.assert_frame_equal(pd.read_csv(workdir / "results" / "reports" / "summary.csv"),
                                  pd.read_csv(reference / "results" / "reports" / "summary.csv"))


def test_sigterm_during_preprocessing_leaves_no_half_written_file(reference, tmp_path):
    workdir = copy_run(reference, tmp_path / "run", drop=("resampled", "lungmask", "slices", "patches",
                                                          "models", "predictions", "reports", "logs"))
    resampled = workdir / "results" / "resampled"
    proc = start(workdir, "preprocess")
    wait_for(lambda: resampled.is_dir() and any(resampled.iterdir()), proc)
    terminate(proc)
    # whatever exists under a final name is complete: every image and slice store reads back,
    # and the killed jobs removed their temporary files
    import SimpleITK as sitk

    assert [p for p in (workdir / "results").rglob("*") if ".part" in p.name] == []
    for path in (workdir / "results").rglob("*.mha"):
        sitk.ReadImage(str(path))
    for path in (workdir / "results").rglob("*.h5"):
        with h5py.File(path, "r") as f:
            _ = f["image"][...]

    snakemake(workdir, "preprocess", "--cores", "2", "--configfile", "tiny.yaml")
    leftovers = [p for p in (workdir / "results").rglob("*") if ".part" in p.name]
    assert leftovers == []
    for path in sorted((reference / "results" / "slices").glob("*.h5")):
        with h5py.File(path, "r") as ref, h5py.File(workdir / "results" / "slices" / path.name, "r") as new:
            for name in ("image", "lung", "nodule"):
                np.testing.assert_array_equal(ref[name][...], new[name][...])
