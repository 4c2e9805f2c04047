"""Image crops of missed nodules and false positives: drawn by ``evaluate``, shown by ``report``.

``evaluate`` has every held-out scan's probability volume and nodule labels in memory; it draws
here (:func:`render_crops`) the crops the report's gallery may show, so the report reads no
probability volume and no slice store. Which findings a fold draws (:func:`select_findings`):
every missed nodule of the fold, and its false-positive candidates down to the
:data:`GALLERY_SIZE`-th highest probability (ties included). The report shows the missed nodules
pooled over the folds, largest first, and the false positives pooled over the folds, highest
probability first, :data:`GALLERY_SIZE` of each: each of those is among its own fold's drawings.

A fold's crops (:func:`write_crops`): the PNGs in ``reports/fold{k}/crops/`` and their index
``reports/fold{k}/crops.csv``, columns :data:`CROP_COLUMNS`, one row per PNG, missed nodules first
(largest first), then false positives (highest probability first):

* ``seriesuid``; ``kind``: ``missed`` or ``false_positive``;
* ``nodule_id`` (missed: the nodule's id, its order among its scan's annotation rows from 1; empty
  for a false positive); ``candidate`` (false positive: the candidate's row in the fold's
  ``candidates.csv``, from 0; empty for a nodule) — what the report matches a finding by;
* ``coordX, coordY, coordZ`` (world mm), ``diameter_mm`` (empty for a candidate without one) and
  ``probability`` (of the candidate; of the nodule's best hit, empty for a missed nodule) — checked
  by the report against the finding it shows, and used for the caption;
* ``file``: the PNG's name in the ``crops/`` folder beside the index.

A crop (:func:`crop_png`) is one axial slice through the finding's centre, HU window
:data:`CROP_WINDOW_HU`: the nodule's label outline (green), the model's prediction outline at the
run's threshold (orange), and for false positives a circle of the candidate's equivalent diameter
(yellow). World mm (x, y, z) are mapped to voxels (z, y, x) with the slice store's geometry.
"""

from __future__ import annotations

import io as _stdio
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from noduleflow.io import Geometry, InputError, atomic_dir, open_h5, read_uid_table, world_to_voxel, write_csv_atomic

#: crops shown per group (missed nodules, false positives) in the report's gallery
GALLERY_SIZE = 12
#: HU window of the crops
CROP_WINDOW_HU = (-1000.0, 400.0)
#: half width of a crop: max(CROP_HALF_MM, 2.5 x finding radius), mm
CROP_HALF_MM = 24.0
#: circle radius for a candidate without a diameter, mm
DEFAULT_CANDIDATE_RADIUS_MM = 3.0
#: the two kinds of crop
MISSED, FALSE_POSITIVE = "missed", "false_positive"
#: columns of ``crops.csv``
CROP_COLUMNS = ["seriesuid", "kind", "nodule_id", "candidate", "coordX", "coordY", "coordZ", "diameter_mm",
                "probability", "file"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: the column holding a candidate's row in its candidates.csv while it is scored (kept by the FROC)
CANDIDATE_ROW = "_candidate_row"


def figure_png(fig, dpi: int = 110) -> bytes:
    """PNG bytes of a matplotlib Figure."""
    buffer = _stdio.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def crop_png(image: np.ndarray, labels: np.ndarray, predicted: np.ndarray | None, voxel_zyx: Sequence[float],
             spacing_xyz: Sequence[float], radius_mm: float, title: str, label_id: int | None = None,
             circle_mm: float | None = None) -> bytes:
    """PNG of a square crop of one axial slice (``image`` HU (y, x)) around ``voxel_zyx``.

    Outlines: ``labels == label_id`` (or any label when ``label_id`` is None) in green, the bool
    ``predicted`` slice in orange, a circle of radius ``circle_mm`` in yellow when given."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Ellipse

    sx, sy = float(spacing_xyz[0]), float(spacing_xyz[1])
    half_mm = max(CROP_HALF_MM, 2.5 * float(radius_mm))
    cy, cx = float(voxel_zyx[1]), float(voxel_zyx[2])
    hy, hx = int(math.ceil(half_mm / sy)), int(math.ceil(half_mm / sx))
    ny, nx = image.shape
    y0, y1 = max(0, int(round(cy)) - hy), min(ny, int(round(cy)) + hy + 1)
    x0, x1 = max(0, int(round(cx)) - hx), min(nx, int(round(cx)) + hx + 1)
    fig = Figure(figsize=(2.2, 2.2))
    ax = fig.add_axes((0, 0, 1, 0.88))
    ax.set_axis_off()
    if y1 > y0 and x1 > x0:
        extent = (x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5)
        ax.imshow(image[y0:y1, x0:x1], cmap="gray", vmin=CROP_WINDOW_HU[0], vmax=CROP_WINDOW_HU[1],
                  extent=extent, interpolation="nearest", aspect=sy / sx)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        truth = labels[y0:y1, x0:x1]
        truth = truth == label_id if label_id is not None else truth > 0
        if truth.any() and not truth.all():
            ax.contour(xx, yy, truth.astype(float), levels=[0.5], colors=["lime"], linewidths=1.2)
        if predicted is not None:
            pred = predicted[y0:y1, x0:x1]
            if pred.any() and not pred.all():
                ax.contour(xx, yy, pred.astype(float), levels=[0.5], colors=["orange"], linewidths=1.0,
                           linestyles="dashed")
        if circle_mm is not None:
            ax.add_patch(Ellipse((cx, cy), 2 * circle_mm / sx, 2 * circle_mm / sy, fill=False,
                                 edgecolor="yellow", lw=1.2))
        ax.set_xlim(x0 - 0.5, x1 - 0.5)
        ax.set_ylim(y1 - 0.5, y0 - 0.5)
    fig.text(0.5, 0.99, title, ha="center", va="top", fontsize=7)
    return figure_png(fig, dpi=90)


def candidate_radius_mm(diameter_mm) -> float:
    """Radius of a false positive's circle: half its diameter, :data:`DEFAULT_CANDIDATE_RADIUS_MM`
    when it has none."""
    d = float(diameter_mm) if diameter_mm is not None else float("nan")
    return d / 2.0 if d > 0 else DEFAULT_CANDIDATE_RADIUS_MM


# --------------------------------------------------------------------------- which crops a fold draws


def with_candidate_rows(candidates: pd.DataFrame) -> pd.DataFrame:
    """``candidates`` (one candidates.csv, in its order) with :data:`CANDIDATE_ROW` = its row, from 0."""
    return candidates.assign(**{CANDIDATE_ROW: np.arange(len(candidates), dtype=np.int64)})


def missed_order(nodules: pd.DataFrame) -> pd.DataFrame:
    """The missed nodules in the gallery's order: largest first (ties in their order)."""
    missed = nodules[~nodules["detected"].astype(bool)]
    return missed.sort_values("diameter_mm", ascending=False, kind="stable")


def false_positive_order(candidates: pd.DataFrame) -> pd.DataFrame:
    """The false-positive candidates of a FROC result's ``candidates`` in the gallery's order:
    highest probability first (ties in their order)."""
    if not len(candidates) or "label" not in candidates.columns:
        return candidates.iloc[0:0]
    fps = candidates[candidates["label"] == "fp"]
    return fps.sort_values("probability", ascending=False, kind="stable")


def select_findings(nodules: pd.DataFrame, candidates: pd.DataFrame, n: int = GALLERY_SIZE) -> pd.DataFrame:
    """The findings a fold draws (:data:`CROP_COLUMNS` but ``file``): every missed nodule of
    ``nodules`` (a FROC result's nodules), and the false positives of ``candidates`` (a FROC
    result's candidates, with :data:`CANDIDATE_ROW`) whose probability is at least the ``n``-th
    highest: whatever the pooled order of ties, the report's ``n`` highest are among them."""
    rows = []
    for _, r in missed_order(nodules).iterrows():
        rows.append({"seriesuid": str(r["seriesuid"]), "kind": MISSED, "nodule_id": int(r["nodule_id"]),
                     "candidate": pd.NA, "coordX": float(r["coordX"]), "coordY": float(r["coordY"]),
                     "coordZ": float(r["coordZ"]), "diameter_mm": float(r["diameter_mm"]),
                     "probability": float(r["probability"]) if pd.notna(r["probability"]) else float("nan")})
    fps = false_positive_order(candidates)
    if len(fps) > n:
        cut = float(fps["probability"].iloc[n - 1]) if n > 0 else math.inf
        fps = fps[fps["probability"].astype(float) >= cut]
    if len(fps) and CANDIDATE_ROW not in fps.columns:
        raise ValueError(f"candidates lack {CANDIDATE_ROW} (see with_candidate_rows)")
    for _, r in fps.iterrows():
        d = float(r["diameter_mm"]) if "diameter_mm" in r and pd.notna(r["diameter_mm"]) else float("nan")
        rows.append({"seriesuid": str(r["seriesuid"]), "kind": FALSE_POSITIVE, "nodule_id": pd.NA,
                     "candidate": int(r[CANDIDATE_ROW]), "coordX": float(r["coordX"]), "coordY": float(r["coordY"]),
                     "coordZ": float(r["coordZ"]), "diameter_mm": d, "probability": float(r["probability"])})
    frame = pd.DataFrame(rows, columns=CROP_COLUMNS[:-1])
    for column in ("nodule_id", "candidate"):
        frame[column] = frame[column].astype("Int64")
    return frame


# --------------------------------------------------------------------------- drawing (in evaluate)


def crop_slices(geometry: Geometry, nz: int, findings: pd.DataFrame) -> list[tuple[int, np.ndarray]]:
    """Per finding row (world mm coordX/Y/Z): (z index of the axial slice through its centre,
    clipped to the scan, its continuous voxel (z, y, x))."""
    out = []
    for _, r in findings.iterrows():
        voxel = world_to_voxel(np.asarray((float(r["coordX"]), float(r["coordY"]), float(r["coordZ"]))), geometry)
        out.append((int(np.clip(np.rint(voxel[0]), 0, nz - 1)), voxel))
    return out


def read_image_slices(store: str | Path, zs: Sequence[int]) -> dict[int, np.ndarray]:
    """{z: image slice HU (y, x)} of a slice store: only those axial slices (one chunk each)."""
    with open_h5(Path(store)) as f:
        if "image" not in f:
            raise InputError(f"{store}: slice store lacks dataset image")
        return {z: f["image"][z] for z in sorted({int(z) for z in zs})}


def render_crops(findings: pd.DataFrame, store: str | Path, labels: np.ndarray, predicted_at,
                 geometry: Geometry) -> list[bytes]:
    """PNG per row of ``findings`` (one scan's rows of :func:`select_findings`): the slice store's
    image slices through them (read here), the scan's nodule ``labels`` (z, y, x) and
    ``predicted_at(z)`` -> the bool prediction of slice z (``p > threshold``)."""
    if not len(findings):
        return []
    where = crop_slices(geometry, labels.shape[0], findings)
    images = read_image_slices(store, [z for z, _ in where])
    out = []
    for (_, r), (z, voxel) in zip(findings.iterrows(), where):
        if r["kind"] == MISSED:
            nid, d = int(r["nodule_id"]), float(r["diameter_mm"])
            out.append(crop_png(images[z], labels[z], predicted_at(z), voxel, geometry.spacing, d / 2.0,
                                f"missed #{nid} ({d:.1f} mm)", label_id=nid))
        else:
            radius = candidate_radius_mm(r["diameter_mm"])
            out.append(crop_png(images[z], labels[z], predicted_at(z), voxel, geometry.spacing, radius,
                                f"FP p={float(r['probability']):.3f}", label_id=None, circle_mm=radius))
    return out


def write_crops(findings: pd.DataFrame, pngs: Mapping[int, bytes], out_dir: str | Path,
                out_index: str | Path) -> pd.DataFrame:
    """Write the PNGs (``pngs``: row position in ``findings`` -> bytes, one per row) into the folder
    ``out_dir`` (replaced whole, atomically) and the index ``out_index`` (:data:`CROP_COLUMNS`).
    Returns the index."""
    index = findings.reset_index(drop=True).copy()
    index["file"] = [f"{i:04d}_{kind}.png" for i, kind in enumerate(index["kind"])]
    missing = [i for i in range(len(index)) if i not in pngs]
    if missing:
        raise ValueError(f"crop {missing[0]} was not drawn")
    with atomic_dir(out_dir) as tmp:
        for i, name in enumerate(index["file"]):
            (tmp / name).write_bytes(pngs[i])
    write_csv_atomic(index[CROP_COLUMNS], out_index)
    return index[CROP_COLUMNS]


# --------------------------------------------------------------------------- reading (in report)


def read_crop_index(path: str | Path) -> pd.DataFrame:
    """A fold's ``crops.csv`` (:data:`CROP_COLUMNS`), checked: kinds, whole ids where their kind
    needs them, numeric coordinates, a file name per row (InputError naming the file and line)."""
    path = Path(path)
    frame = read_uid_table(path, CROP_COLUMNS, not_found="crop index (crops.csv, written by evaluate) not found")

    def bad(mask, what):
        if mask.any():
            row = int(np.flatnonzero(np.asarray(mask))[0])
            raise InputError(f"{path}: line {row + 2}: {what}")

    kinds = frame["kind"].astype(str).str.strip()
    bad(~kinds.isin([MISSED, FALSE_POSITIVE]), f"kind must be {MISSED} or {FALSE_POSITIVE}")
    frame["kind"] = kinds
    for column, kind in (("nodule_id", MISSED), ("candidate", FALSE_POSITIVE)):
        values = pd.to_numeric(frame[column], errors="coerce")
        needed = (frame["kind"] == kind).to_numpy()
        bad(needed & (values.isna() | (values < 0) | (values != values.round())).to_numpy(),
            f"{column} of a {kind} row must be a whole number")
        frame[column] = values.where(needed).round().astype("Int64")
    for column in ("coordX", "coordY", "coordZ", "diameter_mm", "probability"):
        values = pd.to_numeric(frame[column], errors="coerce")
        invalid = values.isna() if column.startswith("coord") else values.isna() & frame[column].notna()
        bad(invalid.to_numpy(), f"{column} is not a number")
        frame[column] = values.astype(float)
    bad((frame["probability"].isna() & (frame["kind"] == FALSE_POSITIVE)).to_numpy(),
        "probability of a false_positive row must be a number")
    files = frame["file"].astype(str).str.strip()
    bad((frame["file"].isna() | files.str.contains(r"[/\\]") | ~files.str.endswith(".png")).to_numpy(),
        "file must be a PNG's name in the crops folder")
    frame["file"] = files
    keys = [(k, u, int(n) if k == MISSED else int(c))
            for k, u, n, c in zip(frame["kind"], frame["seriesuid"], frame["nodule_id"], frame["candidate"])]
    bad(pd.Series(keys, dtype=object).duplicated().to_numpy(), "a finding has more than one row")
    return frame[CROP_COLUMNS]


def read_crop_png(path: str | Path) -> bytes:
    """A crop's PNG bytes (InputError naming the file when it is missing or not a PNG)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: crop image not found (listed in the crops.csv beside its folder)")
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        raise InputError(f"{path}: not a PNG image")
    return data
