"""What the highest-ranked false positives of finished runs are (diagnostic, not part of the tests).

For each run folder (a workdir the pipeline ran in, e.g. one that ``benchmarks/quality.py --keep
DIR`` leaves), the held-out candidates of every fold (``results/predictions/fold*/candidates.csv``)
are labelled hit / false positive under the LUNA16 rule (:func:`noduleflow.froc.candidate_outcomes`,
against the synthetic cohort's nodules). The top ``--per-scan`` x (scans) false positives by
probability, the false positives below them and the hits are then described by:

* ``inside_mm``: distance (mm) of the candidate's centre from the lung mask's edge, inside the
  mask (``results/lungmask``); 0 outside it;
* ``vessel_mm``: distance (mm) from the nearest vessel surface of the synthetic scan's plan
  (:func:`noduleflow.synthetic.plan_scan`; negative inside a vessel), and the share within 3 mm of
  a vessel thicker than 3 mm (``thick_vessel``);
* ``bronchus``: the share within 4 mm of a bronchus' axis;
* ``near_nodule``: the share within two radii of an annotated nodule;
* ``true_lung``: the share inside the synthetic scan's true lungs (``resources/synthetic/lungs``,
  the pleural cavities the cohort was drawn with), where the run's lung mask may take in more;
* ``diameter_mm``, ``elongation`` and ``probability`` from the candidates table.

With ``--montage PNG`` it also draws, for the first run, the top false positives as the model sees
them (the axial slice through the centre, 40 mm across, everything outside the lung mask set to
air, as with ``preprocess.lung_roi``) above their probability maps.

The plan-based columns need the synthetic cohort the run was made from (its ``config.yaml`` plus
``quality.yaml`` overrides, as ``benchmarks/quality.py`` writes them); they are NaN otherwise.

Usage::

    .venv/bin/python benchmarks/false_positives.py RUN_DIR [RUN_DIR ...] [--per-scan 1]
        [--montage top_fps.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from _workflow import REPO
from quality import cohort_truth

sys.path.insert(0, str(REPO / "src"))
from noduleflow import synthetic  # noqa: E402
from noduleflow.froc import candidate_outcomes  # noqa: E402
from noduleflow.io import read_image, world_to_voxel  # noqa: E402

XYZ = ["coordX", "coordY", "coordZ"]
#: vessels thicker than this (mm, diameter) count as thick
THICK_VESSEL_MM = 3.0


def voxel_indices(points_xyz: np.ndarray, geometry, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Nearest voxel (n, 3) z, y, x indices of world points (n, 3) x, y, z mm on a grid of ``shape``,
    clipped into it, and whether each point lay inside the grid before clipping."""
    index = np.rint(world_to_voxel(points_xyz, geometry)).astype(int)
    inside = ((index >= 0) & (index < np.asarray(shape))).all(axis=1)
    return np.clip(index, 0, np.asarray(shape) - 1), inside


def run_candidates(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(every fold's held-out candidates with ``fold`` and ``outcome``, the cohort's nodules, the
    run's scans)."""
    frames = [pd.read_csv(p, dtype={"seriesuid": str}).assign(fold=int(p.parent.name[4:]))
              for p in sorted(run.glob("results/predictions/fold*/candidates.csv"))]
    if not frames:
        raise SystemExit(f"{run}: no results/predictions/fold*/candidates.csv")
    candidates = pd.concat(frames, ignore_index=True)
    uids = pd.read_csv(run / "results" / "folds.csv", dtype={"seriesuid": str})["seriesuid"].tolist()
    truth = cohort_truth(run, uids)
    candidates["outcome"] = candidate_outcomes(truth, candidates)
    return candidates, truth, uids


def synthetic_config(run: Path) -> dict | None:
    """The ``synthetic`` block the run's cohort was generated with, or None."""
    config = run / "config.yaml"
    if not config.is_file():
        return None
    cfg = dict(yaml.safe_load(config.read_text(encoding="utf-8")).get("synthetic", {}))
    overrides = run / "quality.yaml"
    if overrides.is_file():
        cfg.update(yaml.safe_load(overrides.read_text(encoding="utf-8")).get("synthetic", {}))
    return synthetic.validate_config(cfg)


def segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances (k, n) mm from ``points`` (k, 3) to the segments ``start``-``end`` (n, 3), and the
    position along each segment (0 at ``start``, 1 at ``end``) of the nearest point."""
    axis = end - start
    t = ((points[:, None, :] - start[None]) * axis[None]).sum(-1) / np.maximum((axis * axis).sum(-1), 1e-9)[None]
    t = np.clip(t, 0.0, 1.0)
    nearest = start[None] + t[..., None] * axis[None]
    return np.sqrt(((points[:, None, :] - nearest) ** 2).sum(-1)), t


def describe(run: Path, candidates: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """``candidates`` with the columns of the module docstring."""
    from scipy import ndimage

    cfg = synthetic_config(run)
    out = []
    for uid, rows in candidates.groupby("seriesuid", sort=False):
        rows = rows.copy()
        points = rows[XYZ].to_numpy(float)
        lung_path = run / "results" / "lungmask" / f"{uid}.mha"
        if lung_path.is_file():
            lung, geometry = read_image(lung_path)
            inside = ndimage.distance_transform_edt(lung > 0, sampling=tuple(geometry.spacing)[::-1])
            index, _ = voxel_indices(points, geometry, lung.shape)
            rows["inside_mm"] = inside[tuple(index.T)]
        true_path = run / "resources" / "synthetic" / "lungs" / f"{uid}.mha"
        if true_path.is_file():
            true_lung, true_geometry = read_image(true_path)
            index, inside_volume = voxel_indices(points, true_geometry, true_lung.shape)
            rows["true_lung"] = inside_volume & (true_lung[tuple(index.T)] > 0)
        nodules = truth[truth["seriesuid"] == uid]
        if len(nodules):
            d = np.sqrt(((points[:, None, :] - nodules[XYZ].to_numpy(float)[None]) ** 2).sum(-1))
            rows["near_nodule"] = (d / (nodules["diameter_mm"].to_numpy(float)[None] / 2)).min(axis=1) < 2.0
        else:
            rows["near_nodule"] = False
        if cfg is not None:
            plan = synthetic.plan_scan(synthetic.scan_index(uid, cfg["seed"]), cfg, uid)
            vessels, airways = plan.vessels, plan.airways
            dist, t = segment_distance(points, vessels.start, vessels.end)
            radius = vessels.r0[None] + (vessels.r1 - vessels.r0)[None] * t
            rows["vessel_mm"] = (dist - radius).min(axis=1)
            thick = vessels.diameter_mm > THICK_VESSEL_MM
            rows["thick_vessel"] = ((dist - radius)[:, thick] < 3.0).any(axis=1) if thick.any() else False
            rows["bronchus"] = (segment_distance(points, airways.start, airways.end)[0] < 4.0).any(axis=1) \
                if len(airways) else False
        out.append(rows)
    return pd.concat(out, ignore_index=True)


def summary(run: str, described: pd.DataFrame, n_top: int) -> list[dict]:
    """One row per group (top false positives, other false positives, hits) of one run."""
    fps = described[described["outcome"] == "fp"].sort_values("probability", ascending=False)
    hits = described[described["outcome"] == "tp"]
    groups = {"top FPs": fps.head(n_top), "other FPs": fps.iloc[n_top:], "hits": hits}
    rows = []
    for name, g in groups.items():
        row = {"run": run, "group": name, "n": len(g), "probability": g["probability"].median(),
               "diameter_mm": g["diameter_mm"].median(), "elongation": g["elongation"].median()}
        for column, how in (("inside_mm", "median"), ("vessel_mm", "median"), ("thick_vessel", "mean"),
                            ("bronchus", "mean"), ("near_nodule", "mean"), ("true_lung", "mean")):
            row[column] = float(getattr(g[column].astype(float), how)()) if column in g and len(g) else np.nan
        rows.append(row)
    return rows


def montage(run: Path, described: pd.DataFrame, n: int, out_png: Path) -> None:
    """The top ``n`` false positives as the model's input (axial, lung ROI) over their probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = described[described["outcome"] == "fp"].sort_values("probability", ascending=False).head(n)
    cols = min(4, len(top))
    rows = 2 * ((len(top) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (_, row) in enumerate(top.iterrows()):
        image, geometry = read_image(run / "results" / "resampled" / f"{row['seriesuid']}.mha")
        lung, _ = read_image(run / "results" / "lungmask" / f"{row['seriesuid']}.mha")
        prob, _ = read_image(run / "results" / "predictions" / f"fold{int(row['fold'])}" / "probabilities"
                             / f"{row['seriesuid']}.mha")
        z, y, x = np.rint(world_to_voxel(row[XYZ].to_numpy(float), geometry)).astype(int)
        half = int(round(20.0 / geometry.spacing[0]))
        window = (z, slice(max(0, y - half), y + half), slice(max(0, x - half), x + half))
        seen = np.where(lung[window] > 0, image[window], -1000)
        r, c = 2 * (k // cols), k % cols
        axes[r, c].imshow(seen, cmap="gray", vmin=-1000, vmax=200)
        axes[r, c].set_title(f"p {row['probability']:.2f}, {row['diameter_mm']:.1f} mm", fontsize=8)
        axes[r + 1, c].imshow(prob[window], cmap="magma", vmin=0, vmax=255)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    print(f"wrote {out_png}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--per-scan", type=float, default=1.0, help="top false positives per scan (default 1)")
    parser.add_argument("--montage", type=Path, help="PNG of the first run's top false positives")
    args = parser.parse_args(argv)
    rows = []
    for i, run in enumerate(args.runs):
        candidates, truth, uids = run_candidates(run)
        described = describe(run, candidates, truth)
        n_top = max(1, int(round(args.per_scan * len(uids))))
        rows += summary(run.name, described, n_top)
        if i == 0 and args.montage:
            montage(run, described, min(n_top, 16), args.montage)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(2).to_string(index=False))


if __name__ == "__main__":
    main()
