"""The trained fold ensemble on new scans: ``noduleflow predict`` and the ``apply`` rule.

One implementation, two entry points (:mod:`noduleflow.cli` and ``workflow/rules/apply.smk``).
Per scan it runs the pipeline's own code, with the settings stored in every ``model.pt``:

1. :func:`noduleflow.scans.read_canonical` (any file format or DICOM series, HU, identity direction);
2. :func:`noduleflow.preprocess.resample_image` to the training voxel size ``preprocess.spacing_mm``
   (what the ``resample`` rule runs);
3. :func:`noduleflow.lungmask.segment_lungs` with the training ``lungmask`` block (the ``lung_mask``
   rule);
4. :func:`noduleflow.predict.predict_volume` with each fold's model (the ``predict`` rule), the
   ensemble probability being the mean of the fold maps, with the coarse pass for large nodules
   (:func:`noduleflow.coarse_pass.with_coarse_pass`, run on the ensemble's mean as the rule runs it
   on one fold's map);
5. :func:`noduleflow.predict.label_candidates` on that mean, stored as uint8 ``p = v/255`` like the
   ``predict`` rule's maps: one candidate per connected component above the threshold;
6. with second-stage classifiers (``rescore``'s ``classifier.pt`` of each fold, when
   ``second_stage.enabled``; ``noduleflow predict --classifiers``):
   :func:`noduleflow.second_stage.rescore_candidates`, the mean of the fold classifiers on crops of
   the resampled image and the ensemble probability; only ``probability`` changes.

A single-fold ensemble therefore gives exactly the ``predict`` rule's probabilities and candidates
for that fold on the same scan. Every model of an ensemble must have been trained with the same
preprocessing settings (one resampled volume and lung mask feed them all); ``context``,
``intensity`` and the architecture may differ per model (each model reads its own).

Outputs in the output folder ``DIR`` (every file written atomically; a scan that fails leaves
nothing of its own behind):

* ``candidates.csv``: the LUNA16 submission columns ``seriesuid,coordX,coordY,coordZ,probability``
  (world mm, x-y-z), then ``diameter_mm, volume_mm3, max_probability, mean_probability, elongation,
  contrast_hu`` (as the
  ``predict`` rule), ``label`` (the candidate's value in its label map: its rank in the scan,
  1 = most probable for the detector) and ``source`` (the input path); with the second stage also
  ``detector_probability`` and ``classifier_probability``;
* ``labels/{seriesuid}.mha``: the candidates' label map (uint16) and ``probabilities/{seriesuid}.mha``:
  the ensemble probability (float32 in [0, 1]), both on the scan's **own stored grid** (the size,
  spacing, origin and direction SimpleITK reads from the input), so they overlay the scan in 3D
  Slicer or ITK-SNAP; the label map by nearest neighbour, the probability by linear interpolation
  from the resampled grid;
* ``predictions.html``: one self-contained page (:mod:`noduleflow.casepage`);
* ``predict.log``: settings, a line per scan with its seconds.

Arrays are (z, y, x); world coordinates and spacings (x, y, z) mm.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from noduleflow.candidate_contrast import check_contrast_hu
from noduleflow.coarse_pass import check_coarse_settings, with_coarse_pass
from noduleflow.io import (Geometry, InputError, atomic_path, voxel_to_world, world_to_voxel, write_csv_atomic,
                          write_image, write_text_atomic)
from noduleflow.planes import check_planes
from noduleflow.predict import (CANDIDATE_COLUMNS, PREDICT_DEFAULTS, check_candidate_score, check_elongation_exponent,
                                inference_device, input_settings, label_candidates, predict_volume, to_uint8)
from noduleflow.second_stage import CLASSIFIER_COLUMN, DETECTOR_COLUMN, load_classifiers, rescore_candidates
from noduleflow.scans import DICOM_SUFFIX, SCAN_SUFFIXES, CanonicalScan, find_scans, read_canonical, scan_suffix

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
#: candidates.csv: the predict rule's columns, then the label map value and the input path
APPLY_COLUMNS = [*CANDIDATE_COLUMNS, "label", "source"]
LABELS_DIR = "labels"
PROBABILITIES_DIR = "probabilities"
CANDIDATES_FILE = "candidates.csv"
HTML_FILE = "predictions.html"
LOG_FILE = "predict.log"
#: blocks of model.pt (written by train from the config) that inference on a new scan must repeat
PREPROCESSING_BLOCKS: dict[str, tuple[str, ...] | None] = {"preprocess": ("spacing_mm", "lung_roi"),
                                                           "lungmask": None}
#: zlib level of the written maps (fast; the maps are mostly zeros)
COMPRESSION_LEVEL = 1
#: non-axial planes need near-isotropic voxels (as runconfig.check_config demands of the pipeline)
ISOTROPY_TOLERANCE = 1.05


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class PredictSettings:
    """The ``predict:`` config block (defaults :data:`noduleflow.predict.PREDICT_DEFAULTS`)."""

    threshold: float = PREDICT_DEFAULTS["threshold"]
    min_volume_mm3: float = PREDICT_DEFAULTS["min_volume_mm3"]
    candidate_score: str = PREDICT_DEFAULTS["candidate_score"]
    elongation_exponent: float = PREDICT_DEFAULTS["elongation_exponent"]
    hybrid_output: str = PREDICT_DEFAULTS["hybrid_output"]
    planes: tuple[str, ...] = tuple(PREDICT_DEFAULTS["planes"])
    amp: bool = PREDICT_DEFAULTS["amp"]
    batch_size: int = PREDICT_DEFAULTS["batch_size"]
    tta: bool = PREDICT_DEFAULTS["tta"]
    coarse_scale: float = PREDICT_DEFAULTS["coarse_scale"]
    coarse_min_diameter_mm: float = PREDICT_DEFAULTS["coarse_min_diameter_mm"]
    contrast_hu: float = PREDICT_DEFAULTS["contrast_hu"]

    def __post_init__(self) -> None:
        if not 0.0 < float(self.threshold) < 1.0:
            raise InputError(f"predict.threshold = {self.threshold} must lie strictly between 0 and 1")
        if float(self.min_volume_mm3) < 0:
            raise InputError(f"predict.min_volume_mm3 = {self.min_volume_mm3} must be >= 0")
        check_candidate_score(self.candidate_score)
        check_elongation_exponent(self.elongation_exponent)
        check_coarse_settings(self.coarse_scale, self.coarse_min_diameter_mm)
        check_contrast_hu(self.contrast_hu)
        if self.hybrid_output not in ("positive", "negative"):
            raise InputError(f"predict.hybrid_output = {self.hybrid_output!r} must be 'positive' or 'negative'")
        if int(self.batch_size) < 1:
            raise InputError(f"predict.batch_size = {self.batch_size} must be >= 1")
        try:
            object.__setattr__(self, "planes", check_planes(self.planes, "predict.planes"))
        except ValueError as exc:
            raise InputError(str(exc)) from exc

    def as_dict(self) -> dict:
        return {"threshold": float(self.threshold), "min_volume_mm3": float(self.min_volume_mm3),
                "candidate_score": self.candidate_score, "elongation_exponent": float(self.elongation_exponent),
                "hybrid_output": self.hybrid_output,
                "planes": list(self.planes), "amp": bool(self.amp), "batch_size": int(self.batch_size),
                "tta": bool(self.tta), "coarse_scale": float(self.coarse_scale),
                "coarse_min_diameter_mm": float(self.coarse_min_diameter_mm), "contrast_hu": float(self.contrast_hu)}


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class FoldModel:
    """One model of the ensemble: its file, fold (None when not stored), network and metadata."""

    path: Path
    fold: int | None
    model: object
    meta: dict


@dataclass(frozen=True)
class Ensemble:
    """Fold models trained with one set of preprocessing settings (voxel size x-y-z mm, lung ROI,
    lung-mask parameters)."""

    members: tuple[FoldModel, ...]
    spacing_mm: tuple[float, float, float]
    lung_roi: bool
    lungmask: dict

    @property
    def folds(self) -> list[int | None]:
        return [m.fold for m in self.members]


def find_models(models_dir: str | Path, folds: Sequence[int] | None = None) -> list[Path]:
    """``model.pt`` files of a models folder: ``fold{k}/model.pt`` (the pipeline's ``results/models``,
    sorted by fold), or the folder's own ``model.pt``. ``folds``: only these folds. Raises
    InputError naming the folder when there is none, or a requested fold is missing."""
    root = Path(models_dir)
    if not root.is_dir():
        raise InputError(f"{root}: models folder not found (expected the pipeline's results/models, "
                         f"holding fold{{k}}/{MODEL_FILE})")
    by_fold: dict[int, Path] = {}
    for path in root.glob(f"fold*/{MODEL_FILE}"):
        suffix = path.parent.name[len("fold"):]
        if suffix.isdigit() and path.is_file():
            by_fold[int(suffix)] = path
    if not by_fold and (root / MODEL_FILE).is_file():
        if folds is not None:
            raise InputError(f"{root}: holds a single {MODEL_FILE}, not fold{{k}}/{MODEL_FILE}; "
                             f"--folds does not apply")
        return [root / MODEL_FILE]
    if not by_fold:
        raise InputError(f"{root}: no model found (expected fold{{k}}/{MODEL_FILE}, as the pipeline's "
                         f"train rule writes them under results/models)")
    if folds is None:
        return [by_fold[k] for k in sorted(by_fold)]
    missing = [int(k) for k in folds if int(k) not in by_fold]
    if missing:
        raise InputError(f"{root}: no model of fold(s) {', '.join(map(str, missing))} "
                         f"(found fold(s) {', '.join(map(str, sorted(by_fold)))})")
    return [by_fold[int(k)] for k in dict.fromkeys(folds)]


def preprocessing_of(meta: Mapping, path: str | Path) -> dict[str, object]:
    """The preprocessing settings stored in a model file, flattened (``preprocess.spacing_mm``,
    ``preprocess.lung_roi``, ``lungmask.<key>``...). Raises InputError for a model.pt written
    before train stored them."""
    flat: dict[str, object] = {}
    missing = []
    for block, keys in PREPROCESSING_BLOCKS.items():
        stored = meta.get(block)
        if not isinstance(stored, Mapping):
            missing.append(block)
            continue
        for key in (keys if keys is not None else sorted(stored)):
            if key not in stored:
                missing.append(f"{block}.{key}")
            else:
                flat[f"{block}.{key}"] = stored[key]
    if missing:
        raise InputError(f"{path}: the model file does not hold the preprocessing settings it was trained "
                         f"with ({', '.join(missing)} missing): it was written before model.pt carried them. "
                         f"Retrain it with this version (the workflow reruns train by itself: "
                         f"`snakemake --cores 2`)")
    return flat


def _describe(value: object) -> str:
    return str(list(value)) if isinstance(value, (list, tuple)) else repr(value)


def check_same_settings(settings: Sequence[tuple[Path, Mapping[str, object]]]) -> None:
    """Raise InputError listing every setting that differs between the models (path, flattened
    :func:`preprocessing_of` dict)."""
    keys = sorted({key for _, flat in settings for key in flat})
    differ = []
    for key in keys:
        values: dict[str, list[str]] = {}
        for path, flat in settings:
            values.setdefault(_describe(flat.get(key, "<missing>")), []).append(str(path))
        if len(values) > 1:
            differ.append(f"{key}: " + "; ".join(f"{value} in {', '.join(paths)}" for value, paths in values.items()))
    if differ:
        raise InputError(f"the models were trained with different preprocessing settings, so one "
                         f"preprocessed scan cannot feed them all: {' | '.join(differ)}. Use --folds to "
                         f"pick models trained alike")


def resolve_device(device: str = "auto", setting: str = "--device") -> str:
    """``auto``: cuda when available, else cpu (as the ``predict`` rule); otherwise the named
    torch device, checked to exist (InputError naming ``setting``): the ``predict`` rule's
    function, :func:`noduleflow.predict.inference_device`."""
    return inference_device(device, setting)


def load_ensemble(model_paths: Sequence[str | Path], device: str = "cpu") -> Ensemble:
    """Load the models and check they were trained with the same preprocessing settings."""
    from noduleflow.model import load_model

    if not model_paths:
        raise InputError("no model files given")
    members, settings = [], []
    for path in map(Path, model_paths):
        model, meta = load_model(path, device)
        settings.append((path, preprocessing_of(meta, path)))
        fold = meta.get("fold")
        members.append(FoldModel(path, int(fold) if fold is not None else None, model.eval(), meta))
    check_same_settings(settings)
    flat = settings[0][1]
    spacing = tuple(float(v) for v in flat["preprocess.spacing_mm"])
    lungmask = {key.split(".", 1)[1]: value for key, value in flat.items() if key.startswith("lungmask.")}
    return Ensemble(tuple(members), spacing, bool(flat["preprocess.lung_roi"]), lungmask)


# --------------------------------------------------------------------------- inputs


def discover_inputs(paths: Sequence[str | Path]) -> dict[str, Path]:
    """seriesuid -> scan path for every input: an image file (uid = its name without the suffix), a
    DICOM series folder (uid = SeriesInstanceUID) or a data root in any layout
    (:func:`noduleflow.scans.find_scans`). Raises InputError naming a missing or unreadable path,
    a folder without scans, or a seriesuid found twice."""
    if not paths:
        raise InputError("no input given (image files, DICOM series folders or data roots)")
    found: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InputError(f"{path}: input not found")
        if path.is_file():
            suffix = scan_suffix(path)
            if suffix is None:
                hint = " (give the DICOM series folder, not one of its files)" if \
                    path.name.lower().endswith(DICOM_SUFFIX) else ""
                raise InputError(f"{path}: not a scan: expected a DICOM series folder or a file ending in "
                                 f"{', '.join(SCAN_SUFFIXES)}{hint}")
            items = {path.name[: -len(suffix)]: path}
        else:
            items = find_scans(path)
            if not items:
                raise InputError(f"{path}: no scans found (DICOM series folders, or files ending in "
                                 f"{', '.join(SCAN_SUFFIXES)})")
        for uid, scan in items.items():
            if uid in found and found[uid].resolve() != scan.resolve():
                raise InputError(f"{scan}: seriesuid {uid} also found at {found[uid]}")
            found[uid] = scan
    return found


# --------------------------------------------------------------------------- one scan


@dataclass
class ScanPrediction:
    """One scan through the ensemble, on the resampled grid (``geometry``; arrays (z, y, x)):
    ``image`` int16 HU, ``lung`` uint8 mask, ``probability`` the ensemble mean stored as uint8
    (p = v/255), ``labels`` the candidates' uint16 label map, ``candidates`` their table."""

    uid: str
    scan: CanonicalScan
    image: np.ndarray
    lung: np.ndarray
    geometry: Geometry
    probability: np.ndarray
    labels: np.ndarray
    candidates: pd.DataFrame
    seconds: dict[str, float] = field(default_factory=dict)


def preprocess_scan(scan: CanonicalScan, spacing_mm: Sequence[float],
                    lungmask: Mapping[str, object]) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """What the ``resample`` and ``lung_mask`` rules do to a scan: (image int16 HU, lung uint8,
    Geometry) on the grid of ``spacing_mm`` (x, y, z)."""
    from noduleflow.lungmask import segment_lungs
    from noduleflow.preprocess import resample_image

    image, geometry = resample_image(scan.hu, scan.geometry, spacing_mm)
    lung = segment_lungs(image, geometry.spacing, **lungmask)
    return image, lung, geometry


def predict_scan(ensemble: Ensemble, scan: CanonicalScan, uid: str, settings: PredictSettings,
                 device: str = "cpu") -> ScanPrediction:
    """Preprocess one canonical scan as in training and run every model of ``ensemble`` on it;
    the probability is the mean of the fold maps (see the module docstring)."""
    times = {}
    started = time.perf_counter()
    image, lung, geometry = preprocess_scan(scan, ensemble.spacing_mm, ensemble.lungmask)
    times["preprocess"] = time.perf_counter() - started
    started = time.perf_counter()
    # members that read the same input share each input batch (the usual case: one config's folds)
    groups: dict[tuple, list] = {}
    for member in ensemble.members:
        groups.setdefault(input_settings(member.meta), []).append(member)

    def ensemble_probability(image_grid: np.ndarray, lung_grid: np.ndarray,
                             spacing_zyx: Sequence[float]) -> np.ndarray:
        total = None
        for members in groups.values():
            prob = predict_volume([m.model for m in members], members[0].meta, image_grid, lung_grid,
                                  ensemble.lung_roi, batch_size=settings.batch_size, device=device,
                                  hybrid_output=settings.hybrid_output, planes=settings.planes, amp=settings.amp,
                                  tta=settings.tta, spacing_zyx=spacing_zyx)
            prob *= np.float32(len(members))
            total = prob if total is None else np.add(total, prob, out=total)
        total /= np.float32(len(ensemble.members))
        return total

    total = with_coarse_pass(ensemble_probability, image, lung, tuple(geometry.spacing)[::-1],
                             settings.coarse_scale, settings.coarse_min_diameter_mm, settings.threshold,
                             ensemble.lung_roi)
    stored = to_uint8(total)
    del total
    times["inference"] = time.perf_counter() - started
    candidates, labels = label_candidates(stored, geometry, settings.threshold, settings.min_volume_mm3,
                                          seriesuid=uid, score=settings.candidate_score,
                                          elongation_exponent=settings.elongation_exponent, image=image,
                                          lung=lung if ensemble.lung_roi else None,
                                          contrast_hu=settings.contrast_hu)
    return ScanPrediction(uid, scan, image, lung, geometry, stored, labels, candidates, times)


def source_grid_maps(prediction: ScanPrediction) -> tuple[np.ndarray, np.ndarray]:
    """(label map uint16, probability float32 in [0, 1]) on the scan's stored grid, (z, y, x) in
    stored order (:func:`noduleflow.scans.to_source_grid`). Every candidate keeps at least one
    voxel: one that nearest-neighbour sampling misses (a small component between the stored slices
    of a thick-slice scan) is drawn at the stored voxels nearest to its own voxels' centres, where
    no other candidate is."""
    from noduleflow.scans import to_source_grid

    labels = to_source_grid(prediction.labels, prediction.geometry, prediction.scan, labels=True)
    n = len(prediction.candidates)
    missing = np.flatnonzero(np.bincount(labels.ravel(), minlength=n + 1)[1:] == 0) + 1
    if missing.size:
        from scipy import ndimage

        grid = prediction.scan.source_geometry
        boxes = ndimage.find_objects(prediction.labels, max_label=n)
        for label in missing:
            box = boxes[label - 1]
            voxels = np.argwhere(prediction.labels[box] == label) + [b.start for b in box]
            world = voxel_to_world(voxels, prediction.geometry)
            index = np.rint(world_to_voxel(world, grid)).astype(np.int64)
            index = np.clip(index, 0, np.asarray(labels.shape) - 1)
            free = labels[tuple(index.T)] == 0
            labels[tuple(index[free].T)] = label
        log.info("%s: %d small candidate(s) fell between the stored voxels; drawn at the nearest ones",
                 prediction.uid, missing.size)
    probability = prediction.probability.astype(np.float32) / np.float32(255.0)
    probability = to_source_grid(probability, prediction.geometry, prediction.scan)
    np.clip(probability, 0.0, 1.0, out=probability)
    return labels.astype(np.uint16, copy=False), probability.astype(np.float32, copy=False)


def write_scan_maps(prediction: ScanPrediction, output: str | Path) -> tuple[Path, Path]:
    """Write ``labels/{uid}.mha`` and ``probabilities/{uid}.mha`` on the scan's stored grid, both or
    neither (renamed into place together at the end)."""
    output = Path(output)
    labels, probability = source_grid_maps(prediction)
    paths = (output / LABELS_DIR / f"{prediction.uid}.mha", output / PROBABILITIES_DIR / f"{prediction.uid}.mha")
    grid = prediction.scan.source_geometry
    with atomic_path(paths[0]) as tmp_labels, atomic_path(paths[1]) as tmp_probability:
        write_image(labels, grid, tmp_labels, compression_level=COMPRESSION_LEVEL)
        write_image(probability, grid, tmp_probability, compression_level=COMPRESSION_LEVEL)
    return paths


# --------------------------------------------------------------------------- a run


@dataclass
class ApplyResult:
    """What a run wrote: every candidate, a row per scan, and the scans that could not be read."""

    candidates: pd.DataFrame
    scans: pd.DataFrame
    failed: dict[str, str]
    output: Path


@contextlib.contextmanager
def _log_file(path: Path) -> Iterator[None]:
    """Also send the ``noduleflow`` loggers to ``path`` (overwritten) during the block."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("noduleflow")
    old_level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    except BaseException as exc:  # into the file only: the terminal shows the caller's message
        handler.emit(logging.LogRecord(log.name, logging.ERROR, __file__, 0, "failed: %s", (exc,), None))
        raise
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def check_planes_fit(settings: PredictSettings, ensemble: Ensemble) -> None:
    """Coronal/sagittal slices need (near) isotropic voxels, as in the pipeline."""
    spacing = ensemble.spacing_mm
    if set(settings.planes) - {"axial"} and max(spacing) > ISOTROPY_TOLERANCE * min(spacing):
        raise InputError(f"planes {list(settings.planes)} include coronal/sagittal slices, which need "
                         f"isotropic voxels, but the models were trained at {list(spacing)} mm: use "
                         f"--planes axial")


def apply_models(models: str | Path | Sequence[str | Path], inputs: Sequence[str | Path], output: str | Path,
                 folds: Sequence[int] | None = None, settings: PredictSettings | None = None,
                 device: str = "auto", threads: int | None = None,
                 html_max_candidates: int | None = None, log_file: bool = True,
                 classifiers: Sequence[str | Path] | None = None) -> ApplyResult:
    """Apply a fold ensemble to new scans and write the outputs of the module docstring to ``output``.

    ``models``: a models folder (:func:`find_models`, ``folds`` selects) or a list of ``model.pt``
    files. ``inputs``: see :func:`discover_inputs`. ``threads``: torch CPU threads (None: torch's
    default). ``html_max_candidates``: crops in the HTML page per scan (None:
    :data:`noduleflow.casepage.MAX_CANDIDATES`). ``log_file``: write ``output/predict.log`` (False
    when the caller already logs there, as the ``apply`` rule does). ``classifiers``: second-stage
    ``classifier.pt`` files (step 6 of the module docstring); None = the detector's probabilities.

    Models, settings and inputs are all checked before anything is written (InputError naming the
    problem). A scan that cannot be read or processed is logged and skipped, leaving nothing of its
    own; the others are written, and at the end InputError lists the failed ones.
    """
    import torch

    from noduleflow import casepage

    settings = settings or PredictSettings()
    if isinstance(models, (str, Path)):
        model_paths = find_models(models, folds)
    else:
        if folds is not None:
            raise InputError("folds select among a models folder's fold{k}/model.pt, not a list of files")
        model_paths = [Path(p) for p in models]
    device = resolve_device(device)
    ensemble = load_ensemble(model_paths, device)
    check_planes_fit(settings, ensemble)
    second_stage = load_classifiers(classifiers) if classifiers else None
    columns = APPLY_COLUMNS + ([DETECTOR_COLUMN, CLASSIFIER_COLUMN] if second_stage else [])
    scans = discover_inputs(inputs)
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)

    with _log_file(output / LOG_FILE) if log_file else contextlib.nullcontext():
        log.info("noduleflow predict: %d scan(s) -> %s", len(scans), output)
        log.info("models: %s (folds %s)", ", ".join(map(str, model_paths)), ensemble.folds)
        if second_stage:
            log.info("second stage: %d classifier(s) of %s, %s", len(second_stage[0]),
                     ", ".join(map(str, classifiers)), second_stage[1])
        log.info("preprocessing from the models: spacing %s mm, lung_roi %s, lungmask %s", list(ensemble.spacing_mm),
                 ensemble.lung_roi, ensemble.lungmask)
        log.info("settings: %s; device %s, %d CPU thread(s)", settings.as_dict(), device, torch.get_num_threads())
        frames, rows, sections, failed = [], [], [], {}
        for i, (uid, path) in enumerate(scans.items(), start=1):
            started = time.perf_counter()
            try:
                scan = read_canonical(path)
                prediction = predict_scan(ensemble, scan, uid, settings, device)
                if second_stage:
                    prediction.candidates = rescore_candidates(*second_stage, prediction.image, prediction.probability,
                                                               prediction.geometry, prediction.candidates)
                write_scan_maps(prediction, output)
                sections.append(casepage.scan_section(prediction, path, max_candidates=html_max_candidates))
            except InputError as exc:
                failed[uid] = f"{exc}"
                log.error("scan %d/%d %s: FAILED, nothing written for it: %s", i, len(scans), uid, exc)
                continue
            seconds = time.perf_counter() - started
            cands = prediction.candidates.copy()
            cands["label"] = np.arange(1, len(cands) + 1, dtype=np.int64)
            cands["source"] = str(path)
            frames.append(cands)
            top = float(cands["probability"].max()) if len(cands) else math.nan
            rows.append({"seriesuid": uid, "source": str(path), "shape_zyx": list(scan.source_shape),
                         "spacing_mm": list(scan.source_geometry.spacing), "candidates": len(cands),
                         "top_probability": top, "seconds": seconds,
                         **{f"seconds_{k}": v for k, v in prediction.seconds.items()}})
            log.info("scan %d/%d %s: %d candidate(s), top p %s, %.1f s (preprocess %.1f s, inference %.1f s)",
                     i, len(scans), uid, len(cands), "-" if math.isnan(top) else f"{top:.3f}", seconds,
                     prediction.seconds["preprocess"], prediction.seconds["inference"])
            del prediction, scan
        candidates = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        candidates = candidates[columns]
        summary = pd.DataFrame(rows, columns=["seriesuid", "source", "shape_zyx", "spacing_mm", "candidates",
                                              "top_probability", "seconds", "seconds_preprocess",
                                              "seconds_inference"])
        write_csv_atomic(candidates, output / CANDIDATES_FILE)
        page = casepage.page(sections, summary, failed, ensemble=ensemble, settings=settings.as_dict(),
                             device=device)
        write_text_atomic(page, output / HTML_FILE)
        if len(summary):
            log.info("%d scan(s), %d candidate(s), %.1f s per scan (mean) -> %s", len(summary), len(candidates),
                     float(summary["seconds"].mean()), output)
        if failed:
            raise InputError(f"{len(failed)} of {len(scans)} scan(s) could not be processed and have no "
                             f"outputs (candidates.csv and {HTML_FILE} hold the other {len(summary)}): "
                             + "; ".join(failed.values()))
    return ApplyResult(candidates, summary, failed, output)
