"""Inference of one fold's model on that fold's held-out scans: probability volumes and candidates.

For each held-out scan (``folds.csv``), the 2D U-Net runs, in each of the slicing ``planes``
(axial, coronal, sagittal: :mod:`noduleflow.planes`), over every slice that contains lung
(``lung_roi`` true) or body (``lung_roi`` false: any voxel above
:data:`noduleflow.intensity.BODY_MIN_HU`, -500 HU); the scan's probability is the mean of the
planes' maps (a nodule is round in all three planes, a vessel only in one). Inputs as in training:
``2*context+1`` neighbouring slices, ``context_step`` apart, as channels (edge slices repeated at the
volume border; :func:`noduleflow.planes.context_offsets`), pixels outside the lung set to air
(:data:`noduleflow.intensity.AIR_HU`, -1000 HU) when ``lung_roi``
(:func:`noduleflow.intensity.apply_roi`; beyond the model's ``roi_margin_mm`` around the lung,
:func:`model_view`), then :func:`noduleflow.intensity.normalize_intensity` with
the model's ``intensity`` block, as in training. Each slice is cropped in-plane to the bounding box
of the region (lung, grown by the ROI margin, or body over the whole scan) plus a margin, and
padded with air to a multiple of ``2**depth``; voxels outside the box get probability 0. With
``lung_roi`` the probability outside the lung mask is 0, whatever the margin. With the
``lung_channel`` of the model's intensity block the lung mask of each slice is one more input channel
(:func:`noduleflow.intensity.with_lung_channel`), as training builds it from the patches' ``roi``.

A coarse pass (``coarse_scale`` > 1, ``predict.coarse_scale``; :mod:`noduleflow.coarse_pass`): the
same model also runs on the scan resampled to ``coarse_scale`` times the voxel size, and its map,
brought back to the scan's grid, counts inside its own objects of at least
``coarse_min_diameter_mm`` (voxel-wise maximum with the fine map): nodules larger than the training
folds' ones, which the fine pass sees only at their rims, are found whole.

Flip test-time augmentation (``tta``, ``predict.tta``): in each plane the model also runs on the
volume flipped along the slices' rows, their columns, and both (:data:`TTA_FLIPS`: the flips
training augments with), each output is flipped back, and the plane's map is the mean of the
four: 4x the inference time. :func:`predict_volume` is used by both the ``predict`` rule and
``noduleflow predict`` (:mod:`noduleflow.apply`).

Outputs (written atomically):

* ``out_probabilities/{uid}.mha``: nodule probability on the resampled grid, uint8, ``p = v/255``;
  ``out_probabilities/threshold.json``: the ``threshold`` (and the other settings) used here, which
  ``evaluate`` reads so its Dice uses the same cut as the candidates.
* ``out_candidates``: :data:`CANDIDATE_COLUMNS` (the LUNA16 five, then ``diameter_mm,volume_mm3,
  max_probability,mean_probability,elongation,contrast_hu``) — one
  row per 3-D connected component (26-connectivity) of ``p > threshold`` (on the stored uint8
  values) of at least ``min_volume_mm3``. ``coord*`` is the **probability-weighted** centre of mass
  in world mm (x, y, z); ``probability`` the component's mean probability (``candidate_score``
  "mean", the default: it ranks true nodules above vessel fragments better than the maximum, which
  saturates at 1 on both; ROC AUC nodule-vs-false-positive 0.95 vs 0.91 on the default cohort) or its
  maximum ("max"), divided by its ``elongation`` to the power ``elongation_exponent`` (default 1:
  round components first; CPM 0.803 -> 0.849 over five tuning cohorts, docs/results.md), both
  also as ``mean_probability``/``max_probability``; ``volume_mm3`` its voxel count x
  voxel volume; ``diameter_mm`` the diameter of the sphere of that volume; ``elongation`` its shape
  (:func:`elongation`: 1 round, larger for vessel-like components); ``contrast_hu`` how much denser
  it is than the lung around it (:mod:`noduleflow.candidate_contrast`), by which ``probability``
  is also multiplied, up to ``contrast_hu`` (the setting, default 100 HU: candidates fainter than
  that rank lower in proportion; CPM 0.860 -> 0.890 on the tuning cohorts, docs/results.md).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from noduleflow.candidate_contrast import check_contrast_hu, contrast_factor, density_contrast
from noduleflow.checks import check_number
from noduleflow.coarse_pass import check_coarse_settings, with_coarse_pass
from noduleflow.folds import read_fold_uids
from noduleflow.intensity import AIR_HU, BODY_MIN_HU, visible_region
from noduleflow.io import Geometry, InputError, atomic_dir, voxel_to_world, write_csv_atomic, write_image
from noduleflow.planes import PLANES, check_planes, context_offsets, from_plane, to_plane

log = logging.getLogger(__name__)

CANDIDATE_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "probability", "diameter_mm", "volume_mm3",
                     "max_probability", "mean_probability", "elongation", "contrast_hu"]
#: how a candidate's ``probability`` summarises its component (``predict.candidate_score``)
CANDIDATE_SCORES = ("mean", "max")
#: in-plane margin (voxels) around the lung/body bounding box
BOX_MARGIN = 8
THRESHOLD_FILE = "threshold.json"
#: axes of a plane-ordered volume (:func:`noduleflow.planes.to_plane`; axis 0 walks across the
#: slices, 1 = rows, 2 = columns) flipped by test-time augmentation: none, rows, columns, both
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (1,), (2,), (1, 2))
#: the defaults of the ``predict:`` config block (workflow/schemas/config.schema.yaml holds the
#: same; tests/test_apply.py checks they agree), also those of ``noduleflow predict``
PREDICT_DEFAULTS: dict = {"threshold": 0.5, "min_volume_mm3": 10.0, "candidate_score": "mean",
                          "elongation_exponent": 1.0, "hybrid_output": "positive", "planes": list(PLANES),
                          "amp": True, "batch_size": 8, "tta": False, "device": "auto",
                          "coarse_scale": 2.0, "coarse_min_diameter_mm": 25.0, "contrast_hu": 100.0}


# --------------------------------------------------------------------------- inputs


def paths_by_uid(files: Sequence[str | Path], suffix: str) -> dict[str, Path]:
    """``{uid}{suffix}`` files -> {uid: path}."""
    out = {}
    for f in files:
        p = Path(f)
        if not p.name.endswith(suffix):
            raise InputError(f"{p}: expected a file named {{seriesuid}}{suffix}")
        out[p.name[: -len(suffix)]] = p
    return out


def heldout_slice_paths(folds_path: str | Path, fold: int, slice_files: Sequence[str | Path]) -> dict[str, Path]:
    """uid -> slice store of every held-out scan of ``fold`` (InputError when one is missing)."""
    uids = read_fold_uids(folds_path, fold)
    stores = paths_by_uid(slice_files, ".h5")
    missing = [u for u in uids if u not in stores]
    if missing:
        raise InputError(f"{folds_path}: fold {fold} scan {missing[0]} has no slice store among the "
                         f"{len(stores)} given ({len(missing)} missing)")
    return {u: stores[u] for u in uids}


# --------------------------------------------------------------------------- candidates


def to_uint8(probability: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 0..255 (rounded), the stored form (p = v/255)."""
    return np.rint(np.clip(probability, 0.0, 1.0) * 255.0).astype(np.uint8)


def check_elongation_exponent(exponent: float) -> None:
    """InputError naming ``predict.elongation_exponent`` unless it is a finite number >= 0."""
    check_number(exponent, "predict.elongation_exponent", 0.0)


def check_candidate_score(score: str) -> None:
    """InputError naming ``predict.candidate_score`` unless ``score`` is one of :data:`CANDIDATE_SCORES`."""
    if score not in CANDIDATE_SCORES:
        raise InputError(f"predict.candidate_score = {score!r} must be one of {list(CANDIDATE_SCORES)}")


def candidates_from_probability(probability: np.ndarray, geometry: Geometry, threshold: float = 0.5,
                                min_volume_mm3: float = 10.0, seriesuid: str = "",
                                score: str = "mean", elongation_exponent: float = 1.0,
                                image: np.ndarray | None = None, lung: np.ndarray | None = None,
                                contrast_hu: float = 100.0) -> pd.DataFrame:
    """One candidate per 3-D connected component (26-connectivity) of ``probability > threshold``.

    ``probability``: (z, y, x) floats in [0, 1], or uint8 read as ``v / 255``. Components smaller
    than ``min_volume_mm3`` are dropped. Centre: probability-weighted centre of mass, world mm
    (x, y, z). ``probability``: the component's mean probability (``score`` "mean") or its maximum
    ("max"), divided by its :func:`elongation` to the power ``elongation_exponent`` (0: not at
    all; nodules are round, the pieces of vessels and airways that pass the threshold are long);
    the mean and maximum are also given as ``mean_probability`` and ``max_probability``. With the
    scan's ``image`` (HU, same grid; ``lung``: its lung mask, optional), ``contrast_hu`` is each
    candidate's :func:`noduleflow.candidate_contrast.density_contrast` and ``probability`` is also
    multiplied by its :func:`~noduleflow.candidate_contrast.contrast_factor` with
    ``full_contrast_hu = contrast_hu`` (the setting; 0: not at all): what is barely denser than the
    lung around it ranks lower. Without an image the column is NaN and nothing is multiplied. Rows
    sorted by probability, highest first; columns :data:`CANDIDATE_COLUMNS`.
    """
    return _components(probability, geometry, threshold, min_volume_mm3, seriesuid, score, elongation_exponent,
                       image, lung, contrast_hu)[0]


def merge_close_candidates(candidates: pd.DataFrame, distance_mm: float) -> pd.DataFrame:
    """Keep, of every group of candidates of one scan whose centres lie closer than ``distance_mm``
    (world mm) to a more probable kept one, only that more probable one (greedy non-maximum
    suppression, most probable first): the fragments of one nodule become one candidate.

    Kept rows are unchanged (same centre, same probability) and keep their order; ``distance_mm``
    <= 0 returns ``candidates`` unchanged. Works on any table with ``seriesuid``, ``coord*`` and
    ``probability`` columns."""
    if distance_mm <= 0 or len(candidates) < 2:
        return candidates
    keep = np.zeros(len(candidates), dtype=bool)
    xyz = candidates[["coordX", "coordY", "coordZ"]].to_numpy(dtype=float)
    prob = candidates["probability"].to_numpy(dtype=float)
    limit = float(distance_mm) ** 2
    for _, rows in candidates.groupby("seriesuid", sort=False).indices.items():
        kept: list[int] = []
        for i in rows[np.argsort(-prob[rows], kind="stable")]:
            if not kept or ((xyz[kept] - xyz[i]) ** 2).sum(axis=1).min() >= limit:
                kept.append(int(i))
        keep[kept] = True
    return candidates[keep]


def label_candidates(probability: np.ndarray, geometry: Geometry, threshold: float = 0.5,
                     min_volume_mm3: float = 10.0, seriesuid: str = "",
                     score: str = "mean", elongation_exponent: float = 1.0,
                     image: np.ndarray | None = None, lung: np.ndarray | None = None,
                     contrast_hu: float = 100.0) -> tuple[pd.DataFrame, np.ndarray]:
    """The candidates of :func:`candidates_from_probability` and their label map: uint16 (z, y, x)
    on the grid of ``probability``, voxel value ``i`` = the component of row ``i - 1`` of the
    (sorted) table, 0 elsewhere (dropped components included)."""
    frame, labels, n, components = _components(probability, geometry, threshold, min_volume_mm3, seriesuid, score,
                                               elongation_exponent, image, lung, contrast_hu)
    if len(frame) > np.iinfo(np.uint16).max:
        raise InputError(f"{seriesuid}: {len(frame)} candidates do not fit a uint16 label map; "
                         f"raise the threshold or min_volume_mm3")
    relabel = np.zeros(n + 1, dtype=np.uint16)
    relabel[components] = np.arange(1, len(frame) + 1, dtype=np.uint16)
    return frame, relabel[labels]


def _components(probability: np.ndarray, geometry: Geometry, threshold: float, min_volume_mm3: float,
                seriesuid: str, score: str, elongation_exponent: float = 1.0, image: np.ndarray | None = None,
                lung: np.ndarray | None = None,
                contrast_hu: float = 100.0) -> tuple[pd.DataFrame, np.ndarray, int, np.ndarray]:
    """(sorted candidates table, component labels (z, y, x) of ``ndimage.label``, their number, the
    component label of each table row)."""
    check_candidate_score(score)
    check_elongation_exponent(elongation_exponent)
    check_contrast_hu(contrast_hu)
    from scipy import ndimage

    from noduleflow.segmetrics import threshold_mask

    probability = np.asarray(probability)
    mask = threshold_mask(probability, threshold)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    voxel_mm3 = float(np.prod(geometry.spacing))
    rows, components = [], []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        inside = labels[box] == i
        volume = float(inside.sum()) * voxel_mm3
        if volume < min_volume_mm3:
            continue
        weights = probability[box][inside].astype(np.float64)
        if probability.dtype == np.uint8:
            weights /= 255.0
        coords = np.stack(np.nonzero(inside), axis=1).astype(np.float64) + [s.start for s in box]
        centre = (coords * weights[:, None]).sum(axis=0) / weights.sum()
        x, y, z = voxel_to_world(centre, geometry)
        summary = {"max": float(weights.max()), "mean": float(weights.mean())}
        shape = elongation(coords, geometry.spacing)
        rows.append({"seriesuid": seriesuid, "coordX": float(x), "coordY": float(y), "coordZ": float(z),
                     "probability": summary[score] / max(shape, 1.0) ** elongation_exponent,
                     "diameter_mm": float((6.0 * volume / math.pi) ** (1.0 / 3.0)), "volume_mm3": volume,
                     "max_probability": summary["max"], "mean_probability": summary["mean"],
                     "elongation": shape, "contrast_hu": float("nan")})
        components.append(i)
    frame = pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)
    if image is not None and len(frame):
        if np.shape(image) != probability.shape:
            raise ValueError(f"image {np.shape(image)} and probability {probability.shape} differ in shape (z, y, x)")
        frame["contrast_hu"] = density_contrast(image, labels, components, geometry.spacing, lung)
        frame["probability"] *= contrast_factor(frame["contrast_hu"].to_numpy(), contrast_hu)
    order = frame.sort_values("probability", ascending=False, kind="stable").index.to_numpy()
    return frame.iloc[order].reset_index(drop=True), labels, n, np.asarray(components, dtype=np.int64)[order]


def elongation(voxels_zyx: np.ndarray, spacing_xyz: Sequence[float]) -> float:
    """How elongated a component is: the square root of the ratio of the largest to the smallest
    variance of its voxels' positions along its principal axes, in mm (1 for a sphere or a cube,
    about 3 for a cylinder three times as long as wide; vessels are long, nodules round).

    ``voxels_zyx``: (n, 3) voxel indices (z, y, x); ``spacing_xyz``: voxel size in mm (x, y, z). Each
    voxel counts as a box of its size (variance ``spacing**2 / 12`` per axis), so one voxel or a thin
    line is finite."""
    spacing_zyx = np.asarray(tuple(spacing_xyz)[::-1], dtype=np.float64)
    points = np.asarray(voxels_zyx, dtype=np.float64) * spacing_zyx
    spread = np.cov(points, rowvar=False, bias=True) if len(points) > 1 else np.zeros((3, 3))
    spread = spread + np.diag(spacing_zyx ** 2 / 12.0)
    variances = np.linalg.eigvalsh(spread)
    return float(np.sqrt(variances[-1] / variances[0]))


# --------------------------------------------------------------------------- inference


def inference_region(image: np.ndarray, lung: np.ndarray, lung_roi: bool) -> np.ndarray:
    """Bool (z, y, x) region the model runs on: the lung mask, or body (HU > -500) without ROI."""
    return np.asarray(lung) > 0 if lung_roi else np.asarray(image) > BODY_MIN_HU


def _box(region: np.ndarray, multiple: int, margin: int = BOX_MARGIN) -> tuple[slice, slice, int, int]:
    """In-plane bounding box of ``region`` + margin, and the padding to a multiple of ``multiple``."""
    plane = region.any(axis=0)
    ys, xs = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    y0, y1 = max(0, ys[0] - margin), min(plane.shape[0], ys[-1] + 1 + margin)
    x0, x1 = max(0, xs[0] - margin), min(plane.shape[1], xs[-1] + 1 + margin)
    pad_y, pad_x = (-(y1 - y0)) % multiple, (-(x1 - x0)) % multiple
    return slice(y0, y1), slice(x0, x1), pad_y, pad_x


def predict_volume(model, meta: dict, image: np.ndarray, lung: np.ndarray, lung_roi: bool,
                   batch_size: int = 8, device: str = "cpu", hybrid_output: str = "positive",
                   planes: Sequence[str] = PLANES, amp: bool = True, tta: bool = False,
                   spacing_zyx: Sequence[float] | None = None) -> np.ndarray:
    """Nodule probability (z, y, x) float32 of one scan (``image`` int16 HU, ``lung`` uint8 mask, both
    (z, y, x)): the mean of the probability maps of the slicing ``planes`` (:mod:`noduleflow.planes`).

    ``model``: a torch module mapping (n, 2*context+1, h, w) inputs in [0, 1] to logits
    (n, out_channels, h, w), or a sequence of such modules (a fold ensemble) that share ``meta``'s
    input settings (:func:`input_settings`): then the mean of their probabilities, each input batch
    built once for all of them. ``meta``: the model file's metadata (``label_mode``, ``context``,
    ``intensity.window_hu``, ``model.depth``). ``amp``: mixed precision where the device has it
    (:func:`noduleflow.model.autocast_dtype`). ``tta``: flip test-time augmentation, each plane's
    map the mean over :data:`TTA_FLIPS` of the input (flipped back). See the module docstring for
    the region rules. ``spacing_zyx``: voxel size (mm, (z, y, x)), needed when the model was trained
    with ``roi_margin_mm`` > 0 (``meta``): with ``lung_roi`` it sees the image within that margin
    of the lung (:func:`noduleflow.intensity.visible_region`), as at sampling.
    """
    import torch

    from noduleflow.model import memory_format_for

    planes = check_planes(planes, "predict.planes")
    flips = TTA_FLIPS if tta else ((),)
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    # channels-last weights and inputs (batch norm; instance norm prefers NCHW): oneDNN's
    # convolutions on CPUs are ~1.5x faster in that layout; the values are those of the default
    # layout up to the bfloat16/float16 rounding of the kernels
    memory_format = memory_format_for(meta.get("model", {}).get("norm", "batch"))
    for member in models:
        if isinstance(member, torch.nn.Module):
            member.to(memory_format=memory_format)
    visible = model_view(meta, lung, spacing_zyx) if lung_roi else None
    total = None
    for plane in planes:
        plane_image, plane_lung = to_plane(np.asarray(image), plane), to_plane(np.asarray(lung), plane)
        plane_visible = None if visible is None else to_plane(visible, plane)
        for axes in flips:
            prob = predict_plane(models, meta, _flipped(plane_image, axes), _flipped(plane_lung, axes), lung_roi,
                                 batch_size=batch_size, device=device, hybrid_output=hybrid_output, amp=amp,
                                 visible=None if plane_visible is None else _flipped(plane_visible, axes))
            prob = from_plane(_flipped(prob, axes), plane)
            total = prob.copy() if total is None else np.add(total, prob, out=total)
    total /= np.float32(len(planes) * len(flips))
    return total


def model_view(meta: dict, lung: np.ndarray, spacing_zyx: Sequence[float] | None) -> np.ndarray:
    """Bool (z, y, x) region a lung-ROI model sees of a scan: ``lung`` grown by the model's
    ``roi_margin_mm`` (``meta``; 0 for models trained before it existed) with the voxel size
    ``spacing_zyx`` (mm). ValueError when a margin is set and the spacing is not given."""
    margin = float(meta.get("roi_margin_mm", 0.0))
    if margin > 0 and spacing_zyx is None:
        raise ValueError(f"the model sees {margin} mm around the lung (roi_margin_mm): the voxel spacing is needed")
    return visible_region(lung, spacing_zyx if spacing_zyx is not None else (1.0,) * np.ndim(lung), margin)


def input_settings(meta: dict) -> tuple:
    """What decides a model's input and how its output is read (context, context step, intensity
    block, depth, label mode, ROI margin): models with equal settings can share one input batch."""
    return (float(meta.get("roi_margin_mm", 0.0)), int(meta.get("context", 0)), int(meta.get("context_step", 1)),
            json.dumps(meta.get("intensity", {}), sort_keys=True), int(meta.get("model", {}).get("depth", 0)),
            meta.get("label_mode", "positive"), meta.get("model", {}).get("norm", "batch"))


def _flipped(volume: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``volume`` flipped along ``axes`` (a contiguous copy), or itself when ``axes`` is empty."""
    return np.ascontiguousarray(np.flip(volume, axes)) if axes else volume


def predict_plane(model, meta: dict, image: np.ndarray, lung: np.ndarray, lung_roi: bool,
                  batch_size: int = 8, device: str = "cpu", hybrid_output: str = "positive",
                  amp: bool = True, visible: np.ndarray | None = None) -> np.ndarray:
    """Nodule probability float32 of one scan run slice by slice along axis 0 of ``image`` and
    ``lung`` (any axis order, see :func:`noduleflow.planes.to_plane`); same shape and order.
    ``model``: a module or a sequence of modules sharing ``meta``'s input settings (their mean).
    ``visible``: with ``lung_roi``, the region whose image the model sees (:func:`model_view`, same
    shape); None = the lung mask. The probability is kept inside the lung either way."""
    import torch

    from noduleflow.intensity import apply_roi, normalize_intensity, with_lung_channel
    from noduleflow.model import autocast_dtype, memory_format_for, nodule_probability

    models = list(model) if isinstance(model, (list, tuple)) else [model]
    image = np.asarray(image)
    lung = np.asarray(lung)
    out = np.zeros(image.shape, dtype=np.float32)
    region = inference_region(image, lung, lung_roi)
    z_run = np.flatnonzero(region.reshape(region.shape[0], -1).any(axis=1))
    if len(z_run) == 0:
        log.warning("no %s voxels: probability 0 everywhere", "lung" if lung_roi else "body")
        return out
    depth = int(meta.get("model", {}).get("depth", 0))
    offsets = context_offsets(int(meta.get("context", 0)), int(meta.get("context_step", 1)))
    intensity = meta.get("intensity", {"window_hu": [-1000, 400]})
    label_mode = meta.get("label_mode", "positive")
    seen = (lung > 0 if visible is None else np.asarray(visible) > 0) if lung_roi else None
    ys, xs, pad_y, pad_x = _box(region if seen is None else seen, 2 ** depth)

    crop = image[:, ys, xs]
    roi_crop = seen[:, ys, xs] if lung_roi else np.ones(crop.shape, dtype=bool)
    hu = apply_roi(crop, roi_crop.astype(np.uint8), fill_hu=AIR_HU) if lung_roi else crop.astype(np.int16)
    if pad_y or pad_x:
        hu = np.pad(hu, ((0, 0), (0, pad_y), (0, pad_x)), constant_values=AIR_HU)
    volume = normalize_intensity(hu, intensity).astype(np.float32, copy=False)
    # the lung mask channel as training builds it from the patches' roi (all ones without lung_roi)
    lung_plane = None
    if intensity.get("lung_channel", False):
        lung_plane = (lung[:, ys, xs] > 0) if lung_roi else np.ones(crop.shape, dtype=bool)
        if pad_y or pad_x:
            lung_plane = np.pad(lung_plane, ((0, 0), (0, pad_y), (0, pad_x)), constant_values=not lung_roi)
    h, w = crop.shape[1], crop.shape[2]
    torch_device = torch.device(device)
    amp_dtype = autocast_dtype(torch_device, amp)
    memory_format = memory_format_for(meta.get("model", {}).get("norm", "batch"))
    with torch.inference_mode():
        for start in range(0, len(z_run), batch_size):
            zs = z_run[start:start + batch_size]
            index = np.clip(zs[:, None] + offsets[None, :], 0, image.shape[0] - 1)
            inputs = volume[index]
            if lung_plane is not None:
                inputs = with_lung_channel(inputs, lung_plane[zs], intensity)
            batch = torch.from_numpy(np.ascontiguousarray(inputs)).to(device)
            batch = batch.contiguous(memory_format=memory_format)
            prob = None
            for member in models:
                with torch.autocast(device_type=torch_device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    logits = member(batch)
                member_prob = nodule_probability(logits, label_mode, hybrid_output).float().cpu().numpy()[:, :h, :w]
                prob = member_prob if prob is None else np.add(prob, member_prob, out=prob)
            if len(models) > 1:
                prob /= np.float32(len(models))
            out[zs, ys, xs] = prob
    if lung_roi:
        out[lung == 0] = 0.0
    return out


def inference_device(device: str = "auto", setting: str = "config predict.device") -> str:
    """The torch device (as a string) of ``predict.device`` / ``noduleflow predict --device``:
    ``auto`` is cuda when available, else cpu; ``cpu``, ``cuda``, ``cuda:N``, ``mps`` that device,
    checked to exist. InputError naming ``setting`` otherwise
    (:func:`noduleflow.model.select_device`, the function ``train.device`` goes through too)."""
    from noduleflow.model import select_device

    return str(select_device(device, setting, auto_mps=False))


def predict_fold(model_path: str | Path, folds_path: str | Path, fold: int, slice_files: Sequence[str | Path],
                 out_candidates: str | Path, out_probabilities: str | Path, lung_roi: bool, threads: int = 1,
                 threshold: float = 0.5, min_volume_mm3: float = 10.0, batch_size: int = 8,
                 hybrid_output: str = "positive", planes: Sequence[str] = PLANES,
                 amp: bool = True, candidate_score: str = "mean", tta: bool = False,
                 device: str = "auto", elongation_exponent: float = 1.0, coarse_scale: float = 2.0,
                 coarse_min_diameter_mm: float = 25.0, contrast_hu: float = 100.0) -> pd.DataFrame:
    """Run fold ``fold``'s model on its held-out scans; write probabilities and candidates.

    ``slice_files``: slice stores ``{uid}.h5`` (any superset of the fold's scans). ``tta``: flip
    test-time augmentation (:func:`predict_volume`). ``coarse_scale``, ``coarse_min_diameter_mm``:
    the coarse pass for large nodules (:func:`noduleflow.coarse_pass.with_coarse_pass`; scale 1 =
    off). ``contrast_hu``: candidates less dense than this over their surroundings rank lower
    (:func:`candidates_from_probability`). ``device``: ``predict.device``
    (:func:`inference_device`). Returns the candidates table. See the module docstring for the
    outputs.
    """
    import torch

    from noduleflow import model as nf_model
    from noduleflow.slices import read_slice_store

    if not 0.0 < threshold < 1.0:
        raise InputError(f"predict.threshold = {threshold} must lie strictly between 0 and 1")
    planes = check_planes(planes, "predict.planes")
    check_candidate_score(candidate_score)
    check_elongation_exponent(elongation_exponent)
    check_coarse_settings(coarse_scale, coarse_min_diameter_mm)
    check_contrast_hu(contrast_hu)
    if hybrid_output not in ("positive", "negative"):
        raise InputError(f"predict.hybrid_output = {hybrid_output!r} must be 'positive' or 'negative'")
    device = inference_device(device)
    stores = heldout_slice_paths(folds_path, fold, slice_files)
    missing = [p for p in stores.values() if not p.is_file()]
    if missing:
        raise InputError(f"{missing[0]}: slice store not found")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise InputError(f"{model_path}: model file not found")
    torch.set_num_threads(max(1, int(threads)))
    model, meta = nf_model.load_model(model_path, device)
    model.eval()
    if "lung_roi" in meta and bool(meta["lung_roi"]) != bool(lung_roi):
        log.warning("%s was trained with lung_roi=%s but inference runs with lung_roi=%s",
                    model_path, meta["lung_roi"], lung_roi)
    log.info("fold %d: %d held-out scans, model %s (label_mode %s, context %s), device %s, %d threads",
             fold, len(stores), model_path, meta.get("label_mode"), meta.get("context"), device, threads)

    out_probabilities = Path(out_probabilities)
    out_probabilities.parent.mkdir(parents=True, exist_ok=True)
    def probability_map(image_grid: np.ndarray, lung_grid: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
        """The fold's model on one grid (the scan's, or the coarse pass's)."""
        return predict_volume(model, meta, image_grid, lung_grid, lung_roi, batch_size=batch_size, device=device,
                              hybrid_output=hybrid_output, planes=planes, amp=amp, tta=tta, spacing_zyx=spacing_zyx)

    frames = []
    with atomic_dir(out_probabilities) as tmp_dir:
        for i, (uid, store) in enumerate(stores.items(), start=1):
            started = time.perf_counter()
            image, lung, _nodule, geometry = read_slice_store(store)
            prob = with_coarse_pass(probability_map, image, lung, tuple(geometry.spacing)[::-1], coarse_scale,
                                    coarse_min_diameter_mm, threshold, lung_roi)
            stored = to_uint8(prob)
            write_image(stored, geometry, tmp_dir / f"{uid}.mha")
            cands = candidates_from_probability(stored, geometry, threshold, min_volume_mm3, seriesuid=uid,
                                                score=candidate_score, elongation_exponent=elongation_exponent,
                                                image=image, lung=lung if lung_roi else None,
                                                contrast_hu=contrast_hu)
            frames.append(cands)
            log.info("scan %d/%d %s: %d candidates, max p %.3f, %.1f s", i, len(stores), uid, len(cands),
                     float(stored.max()) / 255.0, time.perf_counter() - started)
        settings = {"threshold": float(threshold), "min_volume_mm3": float(min_volume_mm3),
                    "hybrid_output": hybrid_output, "lung_roi": bool(lung_roi),
                    "label_mode": meta.get("label_mode"), "fold": int(fold), "model": str(model_path),
                    "planes": list(planes), "amp": bool(amp), "candidate_score": candidate_score,
                    "elongation_exponent": float(elongation_exponent), "tta": bool(tta),
                    "coarse_scale": float(coarse_scale), "coarse_min_diameter_mm": float(coarse_min_diameter_mm),
                    "contrast_hu": float(contrast_hu)}
        (tmp_dir / THRESHOLD_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        candidates = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CANDIDATE_COLUMNS)
        candidates = candidates[CANDIDATE_COLUMNS]
        write_csv_atomic(candidates, out_candidates)
    log.info("fold %d: %d candidates written to %s", fold, len(candidates), out_candidates)
    return candidates


def read_threshold(probabilities_dir: str | Path, default: float | None = None) -> float:
    """The threshold ``predict`` used for a probabilities folder (its ``threshold.json``).

    Without the file: ``default`` when given, else InputError."""
    path = Path(probabilities_dir) / THRESHOLD_FILE
    if not path.is_file():
        if default is not None:
            log.warning("%s not found: using threshold %s", path, default)
            return float(default)
        raise InputError(f"{path}: not found (written by predict; it holds the threshold)")
    try:
        value = float(json.loads(path.read_text(encoding="utf-8"))["threshold"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: no numeric 'threshold' ({exc})") from exc
    if not 0.0 < value < 1.0:
        raise InputError(f"{path}: threshold {value} outside (0, 1)")
    return value
