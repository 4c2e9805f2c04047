"""``noduleflow predict`` and the ``apply`` rule: the fold ensemble of the tiny run on new scans
(LIDC-IDRI-0001 as DICOM and as NIfTI), flip test-time augmentation, and the error cases.

The tiny run's models (2 folds, 3 epochs at 2 mm) are barely trained: their probability is nearly
flat (~0.01-0.03) on a real scan, so no voxel passes the default threshold 0.5. The tests pick the
threshold from the map itself (the highest stored level that still gives a few candidates), which
exercises every output with real candidates of these models. For speed they run the axial plane
only and 32 slices per pass (the default three planes are covered by tests/test_predict.py).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from noduleflow.apply import (APPLY_COLUMNS, CANDIDATES_FILE, HTML_FILE, LOG_FILE, Ensemble, PredictSettings,
                              apply_models, find_models, load_ensemble, predict_scan, write_scan_maps)
from noduleflow.io import InputError, read_image
from noduleflow.predict import PREDICT_DEFAULTS, candidates_from_probability, label_candidates, predict_volume
from realct import LIDC_0001_UID, lidc_0001_series
from workflow_helpers import REPO_ROOT, TINY_CONFIG, deep_update, snakemake, write_config

LUNA16_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
FAST = {"planes": ("axial",), "batch_size": 32}
NIFTI_UID = "lidc0001"


# --------------------------------------------------------------------------- helpers


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``noduleflow ...`` as a user runs it: a fresh process in ``cwd`` (outside the repository).
    PYTHONPATH points at this checkout's package, which is what the installed script runs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "noduleflow.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


def pick_threshold(stored: np.ndarray, geometry, min_candidates: int = 3) -> float:
    """The highest threshold between two stored levels (p = v/255) that gives ``min_candidates``."""
    for level in range(int(stored.max()), 0, -1):
        threshold = (level - 0.5) / 255.0
        if len(candidates_from_probability(stored, geometry, threshold, PREDICT_DEFAULTS["min_volume_mm3"])) \
                >= min_candidates:
            return threshold
    pytest.fail(f"the models give fewer than {min_candidates} candidates at any threshold")


def sitk_grid(image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def read_dicom(folder: Path):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


class PageParser(HTMLParser):
    """Candidate sections of predictions.html: attributes, images, text."""

    def __init__(self):
        super().__init__()
        self.scans, self.candidates, self.scan_rows, self.failed = [], [], 0, False
        self._current, self._depth, self._in_scans_table = None, 0, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "scan" in classes:
            self.scans.append(attrs["data-seriesuid"])
        if tag == "section" and attrs.get("id") == "failed":
            self.failed = True
        if tag == "section" and "candidate" in classes:
            self._current = {**attrs, "images": [], "text": ""}
            self._depth = 0
        elif tag == "section" and self._current is not None:
            self._depth += 1
        if tag == "img" and self._current is not None:
            self._current["images"].append(attrs)
        if tag == "table" and attrs.get("id") == "scans":
            self._in_scans_table = True
        if tag == "tr" and self._in_scans_table:
            self.scan_rows += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_scans_table = False
        if tag == "section" and self._current is not None:
            if self._depth == 0:
                self.candidates.append(self._current)
                self._current = None
            else:
                self._depth -= 1

    def handle_data(self, data):
        if self._current is not None:
            self._current["text"] += data


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's results/models copied to a folder outside the repository."""
    dest = tmp_path_factory.mktemp("elsewhere") / "models"
    shutil.copytree(tiny_run / "results" / "models", dest)
    assert REPO_ROOT not in dest.parents
    return dest


@pytest.fixture(scope="module")
def lidc() -> Path:
    return lidc_0001_series()


@pytest.fixture(scope="module")
def lidc_nifti(lidc, tmp_path_factory) -> Path:
    """The same scan as one .nii.gz file (what SimpleITK reads from the DICOM series)."""
    path = tmp_path_factory.mktemp("nifti") / f"{NIFTI_UID}.nii.gz"
    sitk.WriteImage(read_dicom(lidc), str(path))
    return path


@pytest.fixture(scope="module")
def small_scan(tiny_run) -> Path:
    """A second, small input in another format: a synthetic scan of the tiny run (.mhd/.raw)."""
    return sorted((tiny_run / "resources" / "synthetic" / "subset0").glob("*.mhd"))[0]


@pytest.fixture(scope="module")
def nifti_run(models, lidc_nifti):
    """The two-fold ensemble on LIDC-IDRI-0001 as NIfTI, in-process (the function the command
    runs), and the threshold the command then uses."""
    from noduleflow.scans import read_canonical

    ensemble = load_ensemble(find_models(models))
    scan = read_canonical(lidc_nifti)
    first = predict_scan(ensemble, scan, NIFTI_UID, PredictSettings(**FAST))
    threshold = pick_threshold(first.probability, first.geometry)
    # again at that threshold: the coarse pass keeps its objects above the threshold in use
    prediction = predict_scan(ensemble, scan, NIFTI_UID, PredictSettings(threshold=threshold, **FAST))
    return prediction, threshold


@pytest.fixture(scope="module")
def cli_run(models, lidc, small_scan, nifti_run):
    """``noduleflow predict`` on the scan as DICOM and on a small .mhd, from a folder outside the
    repository, with the models folder copied there."""
    _, threshold = nifti_run
    proc = run_cli("predict", "--models", "models", "--input", str(lidc), str(small_scan), "--output", "out",
                   "--threshold", repr(threshold), "--planes", "axial", "--batch-size", "32", "--threads", "2",
                   cwd=models.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return models.parent / "out", proc, threshold


def uid_of(path: Path) -> str:
    return path.name[: -len(".mhd")]


# --------------------------------------------------------------------------- the command


@pytest.mark.e2e
def test_predict_writes_every_output_from_a_copied_models_folder(cli_run, small_scan):
    out, proc, threshold = cli_run
    uids = [LIDC_0001_UID, uid_of(small_scan)]
    for uid in uids:
        assert (out / "labels" / f"{uid}.mha").is_file()
        assert (out / "probabilities" / f"{uid}.mha").is_file()
    for name in (CANDIDATES_FILE, HTML_FILE, LOG_FILE):
        assert (out / name).is_file()
    assert not [p for p in out.rglob(".*")]            # no temporary file left behind

    table = pd.read_csv(out / CANDIDATES_FILE, dtype={"seriesuid": str})
    assert list(table.columns[:5]) == LUNA16_COLUMNS and list(table.columns) == APPLY_COLUMNS
    lidc = table[table["seriesuid"] == LIDC_0001_UID]
    assert len(lidc) >= 3 and (table["mean_probability"] > threshold).all()
    assert (table["probability"] <= table["mean_probability"]).all()   # ranked by mean / elongation
    assert lidc["label"].tolist() == list(range(1, len(lidc) + 1))
    assert (lidc["probability"].diff().dropna() <= 0).all()           # most probable first
    assert set(table["seriesuid"]) <= set(uids)

    # progress per scan on the terminal, seconds per scan in the log
    assert "scan 1/2" in proc.stderr and "scan 2/2" in proc.stderr
    lines = [ln for ln in (out / LOG_FILE).read_text(encoding="utf-8").splitlines() if re.search(r"scan \d/2 \S+: \d+ candidate", ln)]
    assert len(lines) == 2 and all(re.search(r", \d+\.\d s \(preprocess", ln) for ln in lines)


@pytest.mark.e2e
def test_label_and_probability_maps_lie_on_the_input_grid(cli_run, lidc, small_scan, lidc_nifti, nifti_run,
                                                          tmp_path):
    out, _, _ = cli_run
    table = pd.read_csv(out / CANDIDATES_FILE, dtype={"seriesuid": str})
    # the NIfTI input's maps, written by the same function the command uses
    prediction, _ = nifti_run
    write_scan_maps(prediction, tmp_path)
    cases = [(LIDC_0001_UID, read_dicom(lidc), out, int((table["seriesuid"] == LIDC_0001_UID).sum())),
             (uid_of(small_scan), sitk.ReadImage(str(small_scan)), out,
              int((table["seriesuid"] == uid_of(small_scan)).sum())),
             (NIFTI_UID, sitk.ReadImage(str(lidc_nifti)), tmp_path, len(prediction.candidates))]
    for uid, source, folder, n in cases:
        labels = sitk.ReadImage(str(folder / "labels" / f"{uid}.mha"))
        probability = sitk.ReadImage(str(folder / "probabilities" / f"{uid}.mha"))
        assert sitk_grid(labels) == sitk_grid(source), uid
        assert sitk_grid(probability) == sitk_grid(source), uid
        values = sitk.GetArrayFromImage(labels)
        p = sitk.GetArrayFromImage(probability)
        assert values.dtype == np.uint16 and set(np.unique(values)) == set(range(n + 1))  # every candidate
        assert p.dtype == np.float32 and 0.0 <= p.min() and p.max() <= 1.0
        if n:
            assert p[values > 0].mean() > p[values == 0].mean()


@pytest.mark.e2e
def test_the_scan_as_dicom_and_as_nifti_gives_the_same_candidates(cli_run, nifti_run):
    out, _, _ = cli_run
    table = pd.read_csv(out / CANDIDATES_FILE, dtype={"seriesuid": str})
    dicom = table[table["seriesuid"] == LIDC_0001_UID].reset_index(drop=True)
    nifti = nifti_run[0].candidates
    assert len(dicom) == len(nifti) >= 3
    distance = np.linalg.norm(dicom[["coordX", "coordY", "coordZ"]].to_numpy()
                              - nifti[["coordX", "coordY", "coordZ"]].to_numpy(), axis=1)
    assert distance.max() < 0.5
    np.testing.assert_allclose(dicom["probability"], nifti["probability"], atol=1.0 / 255)
    np.testing.assert_allclose(dicom["diameter_mm"], nifti["diameter_mm"], rtol=0.05)


@pytest.mark.e2e
def test_the_html_page_has_a_section_per_candidate_with_three_planes(cli_run, small_scan):
    out, _, _ = cli_run
    table = pd.read_csv(out / CANDIDATES_FILE, dtype={"seriesuid": str})
    parser = PageParser()
    parser.feed((out / HTML_FILE).read_text(encoding="utf-8"))
    assert parser.scans == [LIDC_0001_UID, uid_of(small_scan)]
    assert parser.scan_rows == 1 + 2 and not parser.failed              # header + a row per scan
    assert len(parser.candidates) >= 3
    for uid in parser.scans:
        rows = table[table["seriesuid"] == uid].reset_index(drop=True)
        sections = [c for c in parser.candidates if c["data-seriesuid"] == uid]
        assert len(sections) == min(len(rows), 100)
        for section in sections:
            row = rows.iloc[int(section["data-label"]) - 1]
            assert float(section["data-probability"]) == pytest.approx(row["probability"], abs=1e-6)
            assert f"probability {row['probability']:.3f}" in section["text"]
            assert f"{row['diameter_mm']:.1f} mm" in section["text"]
            assert f"{row['coordX']:.1f}, {row['coordY']:.1f}, {row['coordZ']:.1f} mm" in section["text"]
            images = section["images"]
            assert [i["alt"].split()[0] for i in images] == ["axial", "coronal", "sagittal"]
            for image in images:
                assert image["src"].startswith("data:image/png;base64,")
                png = base64.b64decode(image["src"].split(",", 1)[1])
                assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 200


@pytest.mark.e2e
def test_a_single_fold_ensemble_equals_the_pipelines_predict_of_that_fold(models, lidc, tmp_path):
    """The scan through the pipeline's own stages (resample, lung_mask, extract_slices, predict_fold)
    and through ``noduleflow predict --folds 0``: the same probabilities and candidates."""
    from noduleflow.lungmask import lung_mask_file
    from noduleflow.model import load_model
    from noduleflow.predict import predict_fold
    from noduleflow.preprocess import resample_scan
    from noduleflow.scans import read_canonical, to_source_grid
    from noduleflow.slices import extract_slices

    _, meta = load_model(models / "fold0" / "model.pt")
    annotations = tmp_path / "annotations.csv"
    annotations.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n", encoding="utf-8")
    work = tmp_path / "pipeline"
    resample_scan(lidc, annotations, LIDC_0001_UID, work / "image.mha", work / "labels.mha",
                  spacing_mm=meta["preprocess"]["spacing_mm"])
    lung_mask_file(work / "image.mha", work / "lung.mha", **meta["lungmask"])
    store = work / "slices" / f"{LIDC_0001_UID}.h5"
    extract_slices(work / "image.mha", work / "lung.mha", work / "labels.mha", LIDC_0001_UID, store)
    folds = work / "folds.csv"
    folds.write_text(f"seriesuid,fold\n{LIDC_0001_UID},0\n", encoding="utf-8")
    predict_fold(models / "fold0" / "model.pt", folds, 0, [store], work / "candidates.csv", work / "probabilities",
                 lung_roi=meta["preprocess"]["lung_roi"], threads=2, **FAST)
    default_map, geometry = read_image(work / "probabilities" / f"{LIDC_0001_UID}.mha")
    threshold = pick_threshold(default_map, geometry)
    # the pipeline at that threshold (the coarse pass keeps its objects above the threshold in use)
    predict_fold(models / "fold0" / "model.pt", folds, 0, [store], work / "at_threshold.csv",
                 work / "probabilities_at_threshold", lung_roi=meta["preprocess"]["lung_roi"], threads=2,
                 threshold=threshold, **FAST)
    pipeline_map, _ = read_image(work / "probabilities_at_threshold" / f"{LIDC_0001_UID}.mha")
    expected = pd.read_csv(work / "at_threshold.csv", dtype={"seriesuid": str})   # what predict_fold writes

    out = tmp_path / "apply"
    result = apply_models(models, [lidc], out, folds=[0], threads=2,
                          settings=PredictSettings(threshold=threshold, **FAST))
    mine = pd.read_csv(out / CANDIDATES_FILE, dtype={"seriesuid": str})
    assert len(mine) == len(expected) >= 3 and len(result.candidates) == len(mine)
    np.testing.assert_allclose(mine[["coordX", "coordY", "coordZ"]], expected[["coordX", "coordY", "coordZ"]],
                               atol=1e-4)
    np.testing.assert_allclose(mine["probability"], expected["probability"], rtol=1e-12)
    np.testing.assert_array_equal(mine["diameter_mm"], expected["diameter_mm"])
    np.testing.assert_allclose(mine["contrast_hu"], expected["contrast_hu"], rtol=1e-12)
    # the probability map: the pipeline's, brought to the scan's grid the same way
    scan = read_canonical(lidc)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "probabilities" / f"{LIDC_0001_UID}.mha")))
    np.testing.assert_allclose(written, to_source_grid(pipeline_map.astype(np.float32) / 255, geometry, scan),
                               atol=1e-6)
    # the pipeline's own candidates file at its threshold is the same table at that threshold
    at_default = pd.read_csv(work / "candidates.csv", dtype={"seriesuid": str})
    assert len(at_default) == len(candidates_from_probability(default_map, geometry, PREDICT_DEFAULTS["threshold"]))


# --------------------------------------------------------------------------- errors


@pytest.mark.e2e
def test_an_empty_models_folder_is_named(tmp_path, lidc):
    (tmp_path / "models").mkdir()
    proc = run_cli("predict", "--models", "models", "--input", str(lidc), "--output", "out", cwd=tmp_path)
    assert proc.returncode == 1
    assert "models: no model found (expected fold{k}/model.pt" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def _rewrite_model(source: Path, dest: Path, change) -> None:
    import torch

    saved = torch.load(source, weights_only=True)
    change(saved)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, dest)


@pytest.mark.e2e
def test_missing_folds_and_models_trained_with_different_settings_are_named(models, tmp_path, lidc):
    with pytest.raises(InputError, match=r"no model of fold\(s\) 7 \(found fold\(s\) 0, 1\)"):
        find_models(models, [0, 7])

    def other_settings(saved):
        saved["preprocess"]["spacing_mm"] = [1.0, 1.0, 1.0]
        saved["lungmask"]["closing_mm"] = 8

    mixed = tmp_path / "mixed"
    shutil.copytree(models / "fold0", mixed / "fold0")
    _rewrite_model(models / "fold1" / "model.pt", mixed / "fold1" / "model.pt", other_settings)
    with pytest.raises(InputError) as info:
        apply_models(mixed, [lidc], tmp_path / "out")
    message = str(info.value)
    assert "different preprocessing settings" in message
    assert "preprocess.spacing_mm: [2.0, 2.0, 2.0] in" in message and "[1.0, 1.0, 1.0] in" in message
    assert "lungmask.closing_mm: 12 in" in message and "8 in" in message and "fold1/model.pt" in message
    assert "preprocess.lung_roi" not in message                  # only what differs
    assert not (tmp_path / "out").exists()

    def old_file(saved):
        del saved["preprocess"], saved["lungmask"]

    _rewrite_model(models / "fold0" / "model.pt", tmp_path / "old" / "fold0" / "model.pt", old_file)
    with pytest.raises(InputError, match=r"fold0/model.pt: the model file does not hold the preprocessing "
                                         r"settings .*preprocess, lungmask missing.*Retrain"):
        apply_models(tmp_path / "old", [lidc], tmp_path / "out")


@pytest.mark.e2e
def test_an_unreadable_input_is_named_and_leaves_no_output_of_its_own(models, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a NIfTI file at all" * 100)
    proc = run_cli("predict", "--models", str(models), "--input", str(broken), "--output", "out", cwd=tmp_path)
    assert proc.returncode == 1
    assert f"{broken}: cannot read image" in proc.stderr and "1 of 1 scan(s) could not be processed" in proc.stderr
    out = tmp_path / "out"
    assert not (out / "labels" / "broken.mha").exists() and not (out / "probabilities" / "broken.mha").exists()
    assert pd.read_csv(out / CANDIDATES_FILE).empty
    parser = PageParser()
    parser.feed((out / HTML_FILE).read_text(encoding="utf-8"))
    assert parser.failed and not parser.candidates
    assert "FAILED" in (out / LOG_FILE).read_text(encoding="utf-8")

    with pytest.raises(InputError, match="nowhere.mhd: input not found"):
        apply_models(models, [tmp_path / "nowhere.mhd"], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()                       # checked before anything is written


# --------------------------------------------------------------------------- test-time augmentation


class PointwiseNet:
    """A flip-equivariant stand-in model: logits from the centre channel, voxel by voxel."""

    def __call__(self, x):
        c = x.shape[1] // 2
        return 20.0 * (x[:, c:c + 1] - 0.45) + 3.0 * x[:, :1] - 2.0 * x[:, -1:]

    def eval(self):
        return self


class ShiftNet(PointwiseNet):
    """Not flip-equivariant: each pixel's logit reads its left-hand neighbour."""

    def __call__(self, x):
        import torch

        return torch.roll(super().__call__(x), shifts=1, dims=3)


META = {"model": {"depth": 2}, "label_mode": "positive", "intensity": {"window_hu": [-1000, 400]}, "context": 1,
        "context_step": 1}


def _volume(symmetric: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image int16 HU, lung uint8) (z, y, x) 12 x 24 x 24; symmetric: unchanged by flips of y and x."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 200, (12, 24, 24)).astype(np.int16)
    lung = np.zeros(image.shape, np.uint8)
    lung[2:10, 4:20, 3:21] = 1                               # symmetric around 11.5 in y and x
    if symmetric:
        image = np.maximum(np.maximum(image, image[:, ::-1]), np.maximum(image[:, :, ::-1], image[:, ::-1, ::-1]))
    return image, lung


def test_tta_of_a_flip_symmetric_input_equals_the_plain_prediction():
    image, lung = _volume(symmetric=True)
    assert np.array_equal(image, image[:, ::-1, ::-1]) and np.array_equal(lung, lung[:, ::-1, ::-1])
    plain = predict_volume(PointwiseNet(), META, image, lung, True, planes=("axial",))
    tta = predict_volume(PointwiseNet(), META, image, lung, True, planes=("axial",), tta=True)
    assert plain.max() > 0.5
    np.testing.assert_allclose(tta, plain, atol=1e-6)


def test_tta_flips_the_outputs_back():
    image, lung = _volume(symmetric=False)
    for planes in (("axial",), ("axial", "coronal", "sagittal")):
        plain = predict_volume(PointwiseNet(), META, image, lung, True, planes=planes)
        tta = predict_volume(PointwiseNet(), META, image, lung, True, planes=planes, tta=True)
        np.testing.assert_allclose(tta, plain, atol=1e-6)          # an equivariant model: nothing changes
    # a model that is not flip-equivariant: TTA is the mean of the four flipped-back maps
    plain = predict_volume(ShiftNet(), META, image, lung, True, planes=("axial",))
    tta = predict_volume(ShiftNet(), META, image, lung, True, planes=("axial",), tta=True)
    flips = []
    for axes in ((), (1,), (2,), (1, 2)):
        out = predict_volume(ShiftNet(), META, np.flip(image, axes).copy(), np.flip(lung, axes).copy(), True,
                             planes=("axial",))
        flips.append(np.flip(out, axes))
    np.testing.assert_allclose(tta, np.mean(flips, axis=0), atol=1e-6)
    assert np.abs(tta - plain).max() > 0.05


@pytest.mark.e2e
def test_tta_with_a_trained_unet_is_flip_symmetric_on_a_symmetric_input(models):
    from noduleflow.model import load_model

    model, meta = load_model(models / "fold0" / "model.pt")
    image, lung = _volume(symmetric=True, seed=1)
    tta = predict_volume(model, meta, image, lung, True, planes=("axial",), tta=True)
    np.testing.assert_allclose(tta, tta[:, ::-1], atol=1e-6)
    np.testing.assert_allclose(tta, tta[:, :, ::-1], atol=1e-6)
    plain = predict_volume(model, meta, image, lung, True, planes=("axial",))
    assert np.abs(plain - plain[:, :, ::-1]).max() > 1e-5       # the network alone is not symmetric


def test_the_label_map_numbers_candidates_by_rank():
    from noduleflow.io import Geometry

    p = np.zeros((20, 20, 20), np.float32)
    p[2:5, 2:5, 2:5] = 0.7                  # 27 voxels
    p[10:14, 10:14, 10:14] = 0.9            # 64
    p[15:18, 2:6, 2:6] = 0.6                # 48
    p[0, 19, 19] = 0.99                     # 1 voxel: below min_volume_mm3, dropped
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    table, labels = label_candidates(p, geometry, 0.5, 5.0)
    assert table["mean_probability"].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert table["probability"].is_monotonic_decreasing        # the rank: mean over elongation
    assert labels.dtype == np.uint16 and labels.max() == 3 and labels[0, 19, 19] == 0
    assert [int((labels == k).sum()) for k in (1, 2, 3)] == table["volume_mm3"].astype(int).tolist()
    assert candidates_from_probability(p, geometry, 0.5, 5.0).equals(table)


# --------------------------------------------------------------------------- configuration


def test_predict_defaults_are_the_schemas(repo_root):
    schema = yaml.safe_load((repo_root / "workflow" / "schemas" / "config.schema.yaml").read_text(encoding="utf-8"))
    defaults = {k: v["default"] for k, v in schema["properties"]["predict"]["properties"].items()}
    assert defaults == PREDICT_DEFAULTS
    config = yaml.safe_load((repo_root / "config.yaml").read_text(encoding="utf-8"))
    assert config["predict"] == PREDICT_DEFAULTS
    assert set(config["apply"]) == set(schema["properties"]["apply"]["properties"])


def test_the_console_script_is_declared(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"]["noduleflow"] == "noduleflow.cli:main"


def test_invalid_settings_are_named():
    with pytest.raises(InputError, match="predict.threshold = 1.5"):
        PredictSettings(threshold=1.5)
    with pytest.raises(InputError, match="predict.planes"):
        PredictSettings(planes=("oblique",))
    with pytest.raises(InputError, match="predict.elongation_exponent"):
        PredictSettings(elongation_exponent=-1.0)


@pytest.mark.e2e
def test_models_carry_the_preprocessing_they_were_trained_with(models, repo_root):
    from noduleflow.model import load_model

    schema = yaml.safe_load((repo_root / "workflow" / "schemas" / "config.schema.yaml").read_text(encoding="utf-8"))
    lungmask = {k: v["default"] for k, v in schema["properties"]["lungmask"]["properties"].items()}
    for k in (0, 1):
        _, meta = load_model(models / f"fold{k}" / "model.pt")
        assert meta["preprocess"] == {"spacing_mm": TINY_CONFIG["preprocess"]["spacing_mm"], "lung_roi": True}
        assert meta["lungmask"] == lungmask
    ensemble = load_ensemble(find_models(models))
    assert isinstance(ensemble, Ensemble) and ensemble.spacing_mm == (2.0, 2.0, 2.0) and ensemble.folds == [0, 1]


@pytest.mark.e2e
def test_the_apply_rule_runs_the_same_function_on_the_configs_scans(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir, symlinks=True, ignore=shutil.ignore_patterns(".snakemake"))
    scan = sorted((workdir / "resources" / "synthetic" / "subset0").glob("*.mhd"))[0]
    config = deep_update(TINY_CONFIG, {"apply": {"input": str(scan.relative_to(workdir)), "folds": [1]},
                                       "predict": {"threshold": 0.01, "planes": ["axial"]}})
    write_config(workdir, config, "apply.yaml")
    before = (workdir / "results" / "models" / "fold1" / "model.pt").stat().st_mtime
    proc = snakemake(workdir, "apply", "--cores", "2", "--configfile", "apply.yaml")
    assert "train" not in re.findall(r"^rule (\w+):", proc.stdout + proc.stderr, flags=re.M)
    assert (workdir / "results" / "models" / "fold1" / "model.pt").stat().st_mtime == before
    out = workdir / "results" / "apply"
    uid = scan.name[: -len(".mhd")]
    source = sitk.ReadImage(str(scan))
    for kind in ("labels", "probabilities"):
        assert sitk_grid(sitk.ReadImage(str(out / kind / f"{uid}.mha"))) == sitk_grid(source)
    assert "1 scan(s)" in (out / LOG_FILE).read_text(encoding="utf-8")
    # the rule's candidates are the function's on the same scan and settings
    direct = apply_models(workdir / "results" / "models", [scan], tmp_path / "direct", folds=[1],
                          settings=PredictSettings(threshold=0.01, planes=("axial",)))
    table = pd.read_csv(out / CANDIDATES_FILE, dtype={"seriesuid": str})
    assert len(table) == len(direct.candidates)
    np.testing.assert_allclose(table[["coordX", "coordY", "coordZ", "probability"]],
                               direct.candidates[["coordX", "coordY", "coordZ", "probability"]], atol=1e-9)


def test_second_stage_classifiers_rescore_new_scans_without_moving_a_candidate(models, small_scan, tmp_path):
    """``noduleflow predict --classifiers DIR``: the same candidates, labels and maps as without;
    ``detector_probability`` is the plain run's probability, ``probability`` its mean with the fold
    classifiers' mean (second_stage.combine = mean)."""
    import torch

    from noduleflow.candidate_classifier import fit_classifier, state_of

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (16, 1, 2, 16, 16, 16)).astype(np.uint8)
    labels = np.arange(16) % 2 == 0
    second = tmp_path / "second_stage"
    for k in range(TINY_CONFIG["cv"]["folds"]):
        model, _ = fit_classifier(crops, np.full(16, 8.0), labels, seed=k, epochs=1, batch_size=8, width=4)
        (second / f"fold{k}").mkdir(parents=True)
        torch.save({"fold": k, "settings": {"width": 4, "crop_voxels": 16, "combine": "mean"},
                    "classifier": state_of(model, 4)}, second / f"fold{k}" / "classifier.pt")
    common = ("predict", "--models", str(models), "--input", str(small_scan), "--planes", "axial",
              "--threshold", "0.2", "--threads", "2")
    plain = run_cli(*common, "--output", str(tmp_path / "plain"), cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    rescored = run_cli(*common, "--classifiers", str(second), "--output", str(tmp_path / "rescored"), cwd=tmp_path)
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    a = pd.read_csv(tmp_path / "plain" / CANDIDATES_FILE, dtype={"seriesuid": str})
    b = pd.read_csv(tmp_path / "rescored" / CANDIDATES_FILE, dtype={"seriesuid": str})
    assert len(a) > 0
    assert list(b.columns) == APPLY_COLUMNS + ["detector_probability", "classifier_probability"]
    pd.testing.assert_frame_equal(b[["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "label"]],
                                  a[["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "label"]])
    np.testing.assert_allclose(b["detector_probability"], a["probability"])
    np.testing.assert_allclose(b["probability"], (b["detector_probability"] + b["classifier_probability"]) / 2)
    assert b["classifier_probability"].between(0, 1).all() and b["classifier_probability"].nunique() > 1
    uid = uid_of(small_scan)
    for folder in ("labels", "probabilities"):
        x, _ = read_image(tmp_path / "plain" / folder / f"{uid}.mha")
        y, _ = read_image(tmp_path / "rescored" / folder / f"{uid}.mha")
        np.testing.assert_array_equal(x, y)
    missing = run_cli(*common, "--classifiers", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x"), cwd=tmp_path)
    assert missing.returncode == 1 and "nowhere: no fold*/classifier.pt" in missing.stderr
