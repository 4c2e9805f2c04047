"""The run's report: every fold, the pooled out-of-fold result, mean and sd over folds.

:func:`build_report` is the ``report`` rule. Inputs are the per-fold outputs of ``evaluate``
(``reports/fold{k}/metrics.json`` with ``froc.csv``, ``scans.csv``, ``nodules.csv``, ``crops.csv``
and the ``crops/`` folder beside it), the per-fold candidates of ``predict``
(``predictions/fold{k}/candidates.csv``; the settings it recorded are read from
``probabilities/threshold.json`` beside it), ``folds.csv`` and the annotations.

No probability volume and no slice store is read: ``evaluate`` already measured every scan once,
and the pooled result is computed from what it saved (:func:`noduleflow.evaluate.evaluate_from_tables`):
the FROC from the candidates and annotations, the pixel counts summed over the folds' ``scans.csv``
rows, the Dice per scan and per nodule from ``scans.csv`` and ``nodules.csv``. The crops the page
shows were drawn by ``evaluate`` too (:mod:`noduleflow.crops`): the report picks the findings it
shows (:func:`_gallery`) and embeds their PNGs from the folds' ``crops/`` folders, found through
``crops.csv``; a finding shown without a crop, or a crop that does not match it, is an error naming
the index.

Outputs (all written atomically, after every input has been read and checked):

* ``summary.csv`` (columns :data:`SUMMARY_COLUMNS`): one row per fold (``fold`` = 0..K-1, numbers
  copied from its ``metrics.json``), a row ``pooled`` — the out-of-fold results of all folds
  evaluated together over all scans of ``folds.csv`` (one FROC over all scans, pixel counts summed
  over all scans, bootstrap intervals over all scans; exactly what
  :func:`noduleflow.evaluate.evaluate_scans_detail` gives from the volumes) — and rows ``mean`` and
  ``sd`` over the fold rows
  (NaN-skipping; sd with ddof=1; a fold without nodules has no CPM and is left out of those
  columns' mean and sd; the CI columns of ``mean``/``sd`` are empty).
* ``froc.png``: the FROC curve of every fold and the pooled one (log FP axis 1/8..8 per scan, the
  seven CPM points marked, the pooled bootstrap band).
* ``report.html``: one self-contained file (inline CSS, images as base64 ``data:`` URIs, no
  script, no external resource): the run's settings, the summary table, per-fold detection
  metrics with intervals, the curves, pixel-level metrics, per-nodule highlights, and image crops
  of the missed nodules and of the highest-scoring false positives with outlines.

Files written beside ``summary.csv`` for later stages (not read by anything else in a run):

* ``froc_pooled.csv`` — the pooled FROC curve (``fps_per_scan,sensitivity,threshold``); the
  experiment comparison (:mod:`noduleflow.experiments`) draws it.
* ``nodules_pooled.csv`` — every nodule of every scan (``seriesuid,nodule_id,coordX,coordY,coordZ,
  diameter_mm,detected,probability,dice`` as a fold's ``nodules.csv``, plus ``fold``).
* ``metrics_pooled.json`` — the pooled metrics (as a fold's ``metrics.json``, ``fold`` = "pooled")
  plus ``settings``: what ``predict`` recorded in each fold's ``threshold.json`` (label_mode,
  lung_roi, hybrid_output, threshold, min_volume_mm3) and the evaluate parameters.

Crops show one axial slice through the finding's centre, HU window [-1000, 400]: the nodule's label
outline (green), the model's prediction outline at the run's threshold (orange), and for false
positives a circle of the candidate's equivalent diameter (yellow) (:func:`noduleflow.crops.crop_png`).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

# CROP_HALF_MM, CROP_WINDOW_HU, figure_png: also used through this module by casepage and experiments
from noduleflow.crops import (CANDIDATE_ROW, CROP_HALF_MM, CROP_WINDOW_HU, FALSE_POSITIVE, GALLERY_SIZE,  # noqa: F401
                              MISSED, false_positive_order, figure_png, missed_order, read_crop_index, read_crop_png,
                              with_candidate_rows)
from noduleflow.folds import read_folds
from noduleflow.froc import FPS_LABELS, FPS_POINTS, froc_figure, result_curve, write_json_atomic
from noduleflow.io import (InputError, atomic_path, read_annotations, read_candidates, write_csv_atomic,
                           write_text_atomic)

log = logging.getLogger(__name__)

SENS_COLUMNS = [f"sens_{p:g}" for p in FPS_POINTS]
SUMMARY_COLUMNS = (["fold", "n_scans", "n_nodules", "cpm", "cpm_ci_low", "cpm_ci_high"] + SENS_COLUMNS
                   + ["dice_per_nodule", "dice_detected", "dice_per_scan", "pixel_dice", "pixel_accuracy",
                      "pixel_sensitivity", "pixel_specificity"])
#: summary columns that are not averaged over folds
_CI_COLUMNS = ["cpm_ci_low", "cpm_ci_high"]
#: names of the extra files written beside summary.csv
POOLED_FROC = "froc_pooled.csv"
POOLED_NODULES = "nodules_pooled.csv"
POOLED_METRICS = "metrics_pooled.json"
#: crops shown per group (missed nodules, false positives); evaluate draws what this many may need
MAX_CROPS = GALLERY_SIZE
#: diameter bins (mm) of the per-nodule table
SIZE_BINS_MM = (0.0, 6.0, 10.0, 20.0, math.inf)


# =========================================================================== shared helpers
# (also used by noduleflow.experiments)


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI (the HTML needs no other file)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img_tag(png: bytes, alt: str, css_class: str = "") -> str:
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="{data_uri(png)}">'


def fmt(value, digits: int = 3) -> str:
    """A number for a table cell; NaN/None -> an en dash."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        value = float(value)
    except (TypeError, ValueError):
        return html.escape(str(value))
    if math.isnan(value):
        return "–"
    if value == int(value) and abs(value) < 1e9 and digits == 0:
        return str(int(value))
    return f"{value:.{digits}f}"


def short_uid(uid: str, keep: int = 12) -> str:
    """The last ``keep`` characters of a (long DICOM) seriesuid, with an ellipsis when cut."""
    uid = str(uid)
    return uid if len(uid) <= keep else "…" + uid[-keep:]


def html_table(headers: Sequence[str], rows: Iterable[Sequence[str]], table_id: str = "",
               caption: str = "") -> str:
    """An HTML table; ``headers`` are escaped, cells are inserted as given (already HTML)."""
    tid = f' id="{table_id}"' if table_id else ""
    out = [f"<table{tid}>"]
    if caption:
        out.append(f"<caption>{html.escape(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;
max-width:1200px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
tr.pooled td{font-weight:bold;background:#eef5ff}tr.agg td{background:#f8f8f8}
caption{caption-side:top;text-align:left;font-style:italic;color:#555;padding-bottom:.2em}
.note{color:#555;font-size:.9em}.crops{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;text-align:center;font-size:.8em}figure img{width:190px;height:190px;image-rendering:pixelated}
img.plot{max-width:100%}code{background:#f4f4f4;padding:0 3px}
"""


def html_page(title: str, body: str) -> str:
    """A complete self-contained HTML document (inline CSS, no scripts, no external resource)."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n")


def write_png_atomic(png: bytes, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


# =========================================================================== reading inputs


def read_metrics(path: str | Path) -> dict:
    """A fold's ``metrics.json`` (InputError naming the file when missing, malformed or incomplete)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: metrics file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: malformed JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    missing = [k for k in ("n_scans", "n_nodules", "cpm", "sensitivities") if k not in data]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(missing)}")
    if data["sensitivities"] is None or len(data["sensitivities"]) != len(FPS_POINTS):
        raise InputError(f"{path}: 'sensitivities' must hold {len(FPS_POINTS)} values")
    return data


def _num(value) -> float:
    """JSON number or null -> float (null -> NaN)."""
    if value is None:
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def summary_row(fold, metrics: Mapping) -> dict:
    """One ``summary.csv`` row from a metrics dict (``metrics.json`` layout; nulls -> NaN)."""
    ci = metrics.get("cpm_ci") or [None, None]
    pixel = metrics.get("pixel") or {}
    row = {"fold": fold, "n_scans": _num(metrics.get("n_scans")), "n_nodules": _num(metrics.get("n_nodules")),
           "cpm": _num(metrics.get("cpm")), "cpm_ci_low": _num(ci[0]), "cpm_ci_high": _num(ci[1])}
    for column, value in zip(SENS_COLUMNS, metrics.get("sensitivities") or [None] * len(FPS_POINTS)):
        row[column] = _num(value)
    row.update({"dice_per_nodule": _num(metrics.get("dice_per_nodule_mean")),
                "dice_detected": _num(metrics.get("dice_detected_nodule_mean")),
                "dice_per_scan": _num(metrics.get("dice_per_scan_mean")),
                "pixel_dice": _num(pixel.get("dice")), "pixel_accuracy": _num(pixel.get("accuracy")),
                "pixel_sensitivity": _num(pixel.get("sensitivity")),
                "pixel_specificity": _num(pixel.get("specificity"))})
    return row


def summary_frame(fold_metrics: Sequence[tuple[int, Mapping]], pooled: Mapping | None) -> pd.DataFrame:
    """``summary.csv``: fold rows, ``pooled`` (when given), ``mean`` and ``sd`` over the folds.

    Mean and sd skip NaN (a fold without nodules has no CPM); sd uses ddof=1 (NaN with fewer than
    two values). ``n_scans``/``n_nodules`` are averaged like the rest; CI columns stay empty."""
    rows = [summary_row(str(k), m) for k, m in fold_metrics]
    folds = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    numeric = [c for c in SUMMARY_COLUMNS if c not in ("fold", *_CI_COLUMNS)]
    values = folds[numeric].astype(float)
    mean = {"fold": "mean", **values.mean(skipna=True).to_dict()}
    sd = {"fold": "sd", **values.std(ddof=1, skipna=True).to_dict()}
    extra = [summary_row("pooled", pooled)] if pooled is not None else []
    frame = pd.DataFrame(rows + extra + [mean, sd], columns=SUMMARY_COLUMNS)
    frame[numeric + _CI_COLUMNS] = frame[numeric + _CI_COLUMNS].astype(float)
    return frame


def read_settings(probabilities_dir: str | Path) -> dict:
    """What ``predict`` recorded in ``threshold.json`` of a probabilities folder ({} when absent)."""
    path = Path(probabilities_dir) / "threshold.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: malformed JSON, settings not shown", path)
        return {}
    return data if isinstance(data, dict) else {}


def read_curve(path: str | Path) -> pd.DataFrame | None:
    """A ``froc.csv``-style curve (``fps_per_scan,sensitivity``), or None when absent/unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        log.warning("%s: unreadable FROC curve, not drawn", path)
        return None
    if not {"fps_per_scan", "sensitivity"} <= set(frame.columns):
        log.warning("%s: no fps_per_scan/sensitivity columns, not drawn", path)
        return None
    return frame


def _gallery(groups: Mapping[str, pd.DataFrame], indexes: Sequence[pd.DataFrame], index_paths: Sequence[Path],
             fold_of: Mapping[str, int]) -> dict[str, list[tuple[bytes, str]]]:
    """(png, caption) per finding row of each group, in the rows' order, from the crops ``evaluate``
    drew. ``groups``: kind -> findings, :data:`noduleflow.crops.MISSED` (rows of nodules:
    nodule_id, coordinates, diameter_mm) or :data:`noduleflow.crops.FALSE_POSITIVE` (rows of the
    FROC's candidates: the candidate's row in its fold's candidates.csv, coordinates, probability,
    diameter_mm optional). ``indexes``/``index_paths``: fold k's ``crops.csv`` (read) and its path;
    the PNGs are in the ``crops/`` folder beside it. A finding without a row in its fold's index, or
    whose row disagrees with it (a stale index), is an InputError naming the index; a missing or
    broken PNG one naming the PNG."""
    lookup = {}
    for k, index in enumerate(indexes):
        for _, r in index.iterrows():
            ident = int(r["nodule_id"]) if r["kind"] == MISSED else int(r["candidate"])
            lookup[(r["kind"], str(r["seriesuid"]), ident)] = (k, r)
    out: dict[str, list[tuple[bytes, str]]] = {}
    for kind, frame in groups.items():
        out[kind] = []
        for _, row in frame.iterrows():
            uid = str(row["seriesuid"])
            k = int(fold_of[uid])
            if kind == MISSED:
                ident, what = int(row["nodule_id"]), f"missed nodule {int(row['nodule_id'])} of scan {uid}"
            else:
                ident = int(row[CANDIDATE_ROW])
                what = f"false positive (candidates.csv row {ident}) of scan {uid}"
            found = lookup.get((kind, uid, ident))
            if found is None or found[0] != k:
                raise InputError(f"{index_paths[k]}: no crop of the {what} (is it older than the fold's "
                                 "evaluation?)")
            entry = found[1]
            xyz = [float(row[c]) for c in ("coordX", "coordY", "coordZ")]
            same = np.allclose(xyz, [float(entry[c]) for c in ("coordX", "coordY", "coordZ")], rtol=0, atol=1e-3)
            if kind != MISSED:
                same = same and math.isclose(float(row["probability"]), float(entry["probability"]), abs_tol=1e-9)
            if not same:
                raise InputError(f"{index_paths[k]}: the crop of the {what} is at another place or probability "
                                 "than the finding (is it older than the candidates or annotations?)")
            png = read_crop_png(Path(index_paths[k]).parent / "crops" / entry["file"])
            short = short_uid(uid, 12)
            if kind == MISSED:
                caption = f"{short} nodule {int(row['nodule_id'])}, {float(row['diameter_mm']):.1f} mm"
            else:
                d = float(row.get("diameter_mm", float("nan"))) if "diameter_mm" in row else float("nan")
                caption = f"{short} p={float(row['probability']):.3f}, Ø {fmt(d, 1)} mm"
            out[kind].append((png, caption))
    return out


def _crop_gallery(crops: list[tuple[bytes, str]], empty: str) -> str:
    if not crops:
        return f'<p class="note">{html.escape(empty)}</p>'
    figures = [f"<figure>{img_tag(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
               for png, caption in crops]
    return '<div class="crops">' + "\n".join(figures) + "</div>"


# =========================================================================== HTML sections


def _row_class(fold: str) -> str:
    return ' class="pooled"' if fold == "pooled" else (' class="agg"' if fold in ("mean", "sd") else "")


def _summary_table(summary: pd.DataFrame) -> str:
    headers = ["fold", "scans", "nodules", "CPM", "CPM 95% CI"] + [f"sens@{t}" for t in FPS_LABELS] + [
        "Dice/nodule", "Dice detected", "Dice/scan", "pixel Dice", "pixel acc.", "pixel sens.", "pixel spec."]
    lines = [f"<table id=\"summary\"><caption>summary.csv — folds, pooled out-of-fold result, mean and "
             f"sd over folds</caption><thead><tr>"
             + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for _, r in summary.iterrows():
        fold = str(r["fold"])
        counts_digits = 0 if fold not in ("mean", "sd") else 1
        ci = (f"{fmt(r['cpm_ci_low'])}–{fmt(r['cpm_ci_high'])}"
              if not (math.isnan(r["cpm_ci_low"]) or math.isnan(r["cpm_ci_high"])) else "–")
        cells = ([html.escape(fold), fmt(r["n_scans"], counts_digits), fmt(r["n_nodules"], counts_digits),
                  fmt(r["cpm"]), ci] + [fmt(r[c]) for c in SENS_COLUMNS]
                 + [fmt(r["dice_per_nodule"]), fmt(r["dice_detected"]), fmt(r["dice_per_scan"]),
                    fmt(r["pixel_dice"]), fmt(r["pixel_accuracy"], 4), fmt(r["pixel_sensitivity"], 4),
                    fmt(r["pixel_specificity"], 4)])
        lines.append(f"<tr{_row_class(fold)}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _detection_table(fold_metrics: Sequence[tuple[int, Mapping]], pooled: Mapping) -> str:
    headers = (["fold", "scans", "nodules", "detected", "candidates", "false positives", "bootstrap draws"]
               + [f"sens@{t} (95% CI)" for t in FPS_LABELS])
    rows = []
    for name, m in [(str(k), m) for k, m in fold_metrics] + [("pooled", pooled)]:
        cis = m.get("sensitivities_ci") or [[None, None]] * len(FPS_POINTS)
        sens = [fmt(_num(s)) + (f"<br><small>{fmt(_num(ci[0]))}–{fmt(_num(ci[1]))}</small>"
                                if not (math.isnan(_num(ci[0])) or math.isnan(_num(ci[1]))) else "")
                for s, ci in zip(m.get("sensitivities") or [None] * 7, cis)]
        used = m.get("bootstrap_used")
        draws = fmt(m.get("bootstrap")) + (f" ({fmt(used)} used)" if used is not None else "")
        rows.append([html.escape(name), fmt(m.get("n_scans")), fmt(m.get("n_nodules")), fmt(m.get("n_detected")),
                     fmt(m.get("n_candidates")), fmt(m.get("n_false_positives")), draws] + sens)
    return html_table(headers, rows, table_id="detection",
                      caption="LUNA16 detection per fold: sensitivity at 1/8..8 false positives per scan")


def _pixel_table(fold_metrics: Sequence[tuple[int, Mapping]], pooled: Mapping) -> str:
    headers = ["fold", "threshold", "TP", "FP", "FN", "TN", "Dice", "accuracy", "sensitivity", "specificity"]
    rows = []
    for name, m in [(str(k), m) for k, m in fold_metrics] + [("pooled", pooled)]:
        pixel = m.get("pixel") or {}
        counts = m.get("pixel_counts") or {}
        threshold = m.get("threshold")
        threshold = ", ".join(fmt(t, 2) for t in threshold) if isinstance(threshold, list) else fmt(threshold, 2)
        rows.append([html.escape(name), threshold] + [fmt(counts.get(k)) for k in ("tp", "fp", "fn", "tn")]
                    + [fmt(_num(pixel.get("dice"))), fmt(_num(pixel.get("accuracy")), 5),
                       fmt(_num(pixel.get("sensitivity")), 4), fmt(_num(pixel.get("specificity")), 5)])
    return html_table(headers, rows, table_id="pixel",
                      caption="Pixel level over every pixel of every evaluated slice (slices with lung or "
                              "nodule), counts summed over scans (as the article's Table 2)")


def _size_table(nodules: pd.DataFrame) -> str:
    rows = []
    d = nodules["diameter_mm"].astype(float)
    for lo, hi in zip(SIZE_BINS_MM[:-1], SIZE_BINS_MM[1:]):
        sel = nodules[(d >= lo) & (d < hi)]
        detected = sel["detected"].astype(bool)
        name = f"≥ {lo:g} mm" if math.isinf(hi) else f"{lo:g}–{hi:g} mm"
        sens = detected.mean() if len(sel) else float("nan")
        dice_det = sel.loc[detected, "dice"].astype(float)
        rows.append([name, fmt(len(sel)), fmt(int(detected.sum())), fmt(sens),
                     fmt(sel["dice"].astype(float).mean() if len(sel) else float("nan")),
                     fmt(dice_det.mean() if len(dice_det) else float("nan"))])
    rows.append(["all", fmt(len(nodules)), fmt(int(nodules["detected"].astype(bool).sum())),
                 fmt(nodules["detected"].astype(bool).mean() if len(nodules) else float("nan")),
                 fmt(nodules["dice"].astype(float).mean() if len(nodules) else float("nan")),
                 fmt(nodules.loc[nodules["detected"].astype(bool), "dice"].astype(float).mean()
                     if nodules["detected"].astype(bool).any() else float("nan"))])
    return html_table(["diameter", "nodules", "detected", "detection rate (any FP rate)", "mean Dice",
                       "mean Dice of detected"], rows, table_id="sizes",
                      caption="Per nodule by size (pooled; detected = hit by any candidate)")


def _nodule_list(frame: pd.DataFrame, table_id: str, caption: str) -> str:
    rows = []
    for _, r in frame.iterrows():
        uid = str(r["seriesuid"])
        rows.append([f'<span title="{html.escape(uid)}">{html.escape(short_uid(uid, 16))}</span>',
                     fmt(r.get("fold")), fmt(int(r["nodule_id"])),
                     f"{float(r['coordX']):.1f}, {float(r['coordY']):.1f}, {float(r['coordZ']):.1f}",
                     fmt(float(r["diameter_mm"]), 1), fmt(bool(r["detected"])), fmt(_num(r["probability"])),
                     fmt(_num(r["dice"]))])
    return html_table(["seriesuid", "fold", "nodule", "x, y, z (mm)", "diameter (mm)", "detected",
                       "probability", "Dice"], rows, table_id=table_id, caption=caption)


def _dice_scatter(nodules: pd.DataFrame) -> bytes | None:
    if not len(nodules):
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    det = nodules["detected"].astype(bool).to_numpy()
    d = nodules["diameter_mm"].astype(float).to_numpy()
    dice = nodules["dice"].astype(float).to_numpy()
    dice_plot = np.where(np.isnan(dice), 0.0, dice)
    ax.scatter(d[det], dice_plot[det], s=18, color="C0", label="detected")
    ax.scatter(d[~det], dice_plot[~det], s=22, marker="x", color="C3", label="missed")
    ax.set_xlabel("nodule diameter (mm)")
    ax.set_ylabel("Dice (in the nodule's box)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.35)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return figure_png(fig)


def _settings_section(settings: Mapping[str, Mapping], evaluate_params: Mapping) -> str:
    keys = ["label_mode", "lung_roi", "hybrid_output", "threshold", "min_volume_mm3", "model"]
    rows = []
    for fold, s in settings.items():
        rows.append([html.escape(str(fold))] + [html.escape(str(s.get(k, "–"))) for k in keys])
    table = (html_table(["fold"] + keys, rows, table_id="settings",
                        caption="Model and inference settings (from predict's threshold.json)")
             if any(settings.values()) else '<p class="note">No threshold.json found beside the probabilities: '
                                            'settings unknown.</p>')
    params = ", ".join(f"<code>{html.escape(k)}={html.escape(str(v))}</code>" for k, v in evaluate_params.items())
    return f"<h2>Settings</h2>\n{table}\n<p>Evaluation: {params}.</p>"


# =========================================================================== the rule


def build_report(metrics_paths: Sequence[str | Path], candidates_paths: Sequence[str | Path],
                 folds_path: str | Path, annotations_path: str | Path,
                 excluded_path: str | Path | None = None, *, out_summary: str | Path, out_plot: str | Path,
                 out_html: str | Path, scans_paths: Sequence[str | Path] | None = None,
                 nodules_paths: Sequence[str | Path] | None = None, crops_paths: Sequence[str | Path] | None = None,
                 probabilities_dirs: Sequence[str | Path] | None = None,
                 bootstrap: int = 1000, seed: int = 0, dice_margin_mm: float = 5.0) -> pd.DataFrame:
    """Write ``summary.csv``, ``froc.png``, ``report.html`` and the pooled files beside summary.csv
    (see the module docstring). ``metrics_paths``/``candidates_paths``/``scans_paths``/
    ``nodules_paths``/``crops_paths``: fold k's files at index k (``scans_paths``/``nodules_paths``/
    ``crops_paths`` None: the ``scans.csv``/``nodules.csv``/``crops.csv`` beside each
    ``metrics.json``; a ``crops.csv``'s PNGs are in the ``crops/`` folder beside it).
    ``probabilities_dirs``: predict's folders holding each fold's ``threshold.json`` (None: the
    ``probabilities`` folder beside each candidates file, which holds for predict's candidates but
    not for the second stage's). A fold whose candidates carry ``classifier_probability`` is
    recorded as re-scored (``second_stage: true`` in its settings). ``bootstrap``/``seed``: the
    pooled result's intervals; ``dice_margin_mm``: recorded in the
    settings (the per-nodule Dice in ``nodules.csv`` was measured with the evaluate rule's, the same
    config value). Returns the summary frame. Every input is read and checked before any output; no
    probability volume or slice store is read (the crops shown were drawn by evaluate, :func:`_gallery`)."""
    from noduleflow.evaluate import evaluate_from_tables, read_nodule_table, read_scan_table

    if len(metrics_paths) == 0:
        raise InputError("report: no fold metrics given")
    if len(metrics_paths) != len(candidates_paths):
        raise InputError(f"report: {len(metrics_paths)} metrics files but {len(candidates_paths)} candidate files")
    scans_paths = ([Path(p).parent / "scans.csv" for p in metrics_paths] if scans_paths is None
                   else list(scans_paths))
    nodules_paths = ([Path(p).parent / "nodules.csv" for p in metrics_paths] if nodules_paths is None
                     else list(nodules_paths))
    crops_paths = ([Path(p).parent / "crops.csv" for p in metrics_paths] if crops_paths is None
                   else [Path(p) for p in crops_paths])
    for name, paths in (("scans.csv", scans_paths), ("nodules.csv", nodules_paths), ("crops.csv", crops_paths)):
        if len(paths) != len(metrics_paths):
            raise InputError(f"report: {len(metrics_paths)} metrics files but {len(paths)} {name} files")
    fold_metrics = [(k, read_metrics(p)) for k, p in enumerate(metrics_paths)]
    for k, m in fold_metrics:
        if m.get("fold") is not None and m.get("fold") != k:
            log.warning("%s: says fold %s but is the report's fold %d (files are taken in fold order)",
                        metrics_paths[k], m.get("fold"), k)
    folds = read_folds(folds_path)
    n_folds = len(candidates_paths)
    bad = sorted(set(folds["fold"]) - set(range(n_folds)))
    if bad:
        raise InputError(f"{folds_path}: fold {bad[0]} has no candidates file (got {n_folds} folds)")
    annotations = read_annotations(annotations_path)
    excluded = None
    if excluded_path is not None and Path(excluded_path).is_file():
        excluded = read_annotations(excluded_path, allow_unknown_diameter=True)
    elif excluded_path is not None:
        raise InputError(f"{excluded_path}: excluded findings file not found")
    candidate_frames = []
    prob_dirs, rescored = [], []
    if probabilities_dirs is not None and len(probabilities_dirs) != len(candidates_paths):
        raise InputError(f"report: {len(candidates_paths)} candidates files but {len(probabilities_dirs)} "
                         f"probabilities folders")
    for k, path in enumerate(candidates_paths):
        frame = with_candidate_rows(read_candidates(path))     # a candidate's crop is found by its row
        mine = set(folds.loc[folds["fold"] == k, "seriesuid"])
        foreign = ~frame["seriesuid"].isin(mine)
        if foreign.any():
            log.warning("%s: %d candidate(s) on scans outside fold %d ignored", path, int(foreign.sum()), k)
        candidate_frames.append(frame[~foreign])
        prob_dirs.append(Path(probabilities_dirs[k]) if probabilities_dirs is not None
                         else Path(path).parent / "probabilities")
        # second_stage.CLASSIFIER_COLUMN (not imported: the report needs no torch)
        rescored.append("classifier_probability" in frame.columns)
    candidates = pd.concat(candidate_frames, ignore_index=True)
    uids = folds["seriesuid"].tolist()
    fold_of = dict(zip(folds["seriesuid"], folds["fold"]))
    # every fold's saved rows: exactly its held-out scans (a stale or foreign table is named)
    scan_frames, nodule_frames = [], []
    for k in range(n_folds):
        table = read_scan_table(scans_paths[k])
        mine = folds.loc[folds["fold"] == k, "seriesuid"].tolist()
        absent = [u for u in mine if u not in set(table["seriesuid"])]
        if absent:
            raise InputError(f"{scans_paths[k]}: fold {k} scan {absent[0]} has no row ({len(absent)} missing; "
                             "is it older than folds.csv?)")
        scan_frames.append(table[table["seriesuid"].isin(mine)])
        nodule_table = read_nodule_table(nodules_paths[k])
        nodule_frames.append(nodule_table[nodule_table["seriesuid"].isin(mine)])
    crop_indexes = [read_crop_index(p) for p in crops_paths]
    settings = {k: {**read_settings(d), "second_stage": rescored[k]} for k, d in enumerate(prob_dirs)}
    log.info("report: %d folds, %d scans, %d nodules, %d candidates; pooled evaluation with bootstrap %d "
             "from the folds' scans.csv and nodules.csv", n_folds, len(uids),
             int(annotations["seriesuid"].isin(uids).sum()), len(candidates), bootstrap)

    ev = evaluate_from_tables(candidates, pd.concat(scan_frames, ignore_index=True),
                              pd.concat(nodule_frames, ignore_index=True), annotations, excluded, uids,
                              bootstrap=bootstrap, seed=seed, dice_margin_mm=dice_margin_mm)
    pooled = dict(ev.metrics)
    summary = summary_frame(fold_metrics, pooled)
    nodules = ev.nodules.copy()
    nodules["fold"] = [int(fold_of.get(u, -1)) for u in nodules["seriesuid"]]
    froc = ev.froc

    # ---- plots
    curves = []
    for k, m in fold_metrics:
        curve = read_curve(Path(metrics_paths[k]).parent / "froc.csv")
        if curve is None:
            log.warning("fold %s: no froc.csv beside %s; only its seven points are drawn", k, metrics_paths[k])
            fps, sens = np.asarray(FPS_POINTS), np.array([_num(s) for s in m["sensitivities"]])
        else:
            fps, sens = curve["fps_per_scan"].to_numpy(float), curve["sensitivity"].to_numpy(float)
        curves.append({"label": f"fold {k} (CPM {fmt(_num(m['cpm']))})", "fps": fps, "sensitivity": sens,
                       "points": [_num(s) for s in m["sensitivities"]], "lw": 1.0, "style": "--", "ms": 3})
    curves.append(result_curve("pooled", froc, lw=2.5, color="black", ms=5))
    froc_png = figure_png(froc_figure(curves, title=f"FROC: {n_folds} folds and pooled ({len(uids)} scans, "
                                                    f"{froc.n_nodules} nodules)"))

    # ---- crops (drawn by evaluate)
    missed = missed_order(nodules)
    fps_table = false_positive_order(froc.candidates)
    log.info("report: showing %d missed-nodule and %d false-positive crops from %s",
             min(len(missed), MAX_CROPS), min(len(fps_table), MAX_CROPS), ", ".join(map(str, crops_paths)))
    crops = _gallery({MISSED: missed.head(MAX_CROPS), FALSE_POSITIVE: fps_table.head(MAX_CROPS)}, crop_indexes,
                     crops_paths, fold_of)
    missed_crops, fp_crops = crops[MISSED], crops[FALSE_POSITIVE]

    # ---- HTML
    evaluate_params = {"bootstrap": bootstrap, "seed": seed, "dice_margin_mm": dice_margin_mm}
    scatter = _dice_scatter(nodules)
    detected = nodules[nodules["detected"].astype(bool)]
    worst = detected.sort_values("dice", ascending=True, kind="stable", na_position="first").head(10)
    body = [
        f"<p>{len(uids)} scans in {n_folds} folds, {froc.n_nodules} annotated nodules, {froc.n_detected} "
        f"detected by the out-of-fold candidates, {froc.n_false_positives} false positives "
        f"(at most 100 candidates per scan, as LUNA16). Pooled CPM <b>{fmt(froc.cpm)}</b> "
        f"(95% CI {fmt(froc.cpm_ci[0])}–{fmt(froc.cpm_ci[1])}), per-nodule Dice "
        f"<b>{fmt(_num(pooled.get('dice_per_nodule_mean')))}</b> (detected nodules "
        f"{fmt(_num(pooled.get('dice_detected_nodule_mean')))}).</p>",
        _settings_section(settings, evaluate_params),
        "<h2>Summary</h2>",
        _summary_table(summary),
        '<p class="note">Fold rows: each fold\'s held-out scans (metrics.json). <b>pooled</b>: the out-of-fold '
        "candidates of all folds scored together over all scans. <b>mean</b>/<b>sd</b>: over folds (a fold "
        "without nodules has no CPM and is skipped).</p>",
        "<h2>FROC</h2>",
        img_tag(froc_png, "FROC curves of every fold and pooled", "plot"),
        "<h2>Detection per fold</h2>",
        _detection_table(fold_metrics, pooled),
        "<h2>Pixel-level metrics</h2>",
        _pixel_table(fold_metrics, pooled),
        "<h2>Per nodule</h2>",
        _size_table(nodules),
        img_tag(scatter, "Dice against nodule diameter", "plot") if scatter is not None else "",
        _nodule_list(missed, "missed", f"Missed nodules ({len(missed)}), largest first") if len(missed)
        else '<p class="note">No missed nodule.</p>',
        _nodule_list(worst, "lowest-dice", "Detected nodules with the lowest Dice") if len(worst) else "",
        f"<h2>Missed nodules ({len(missed)}; up to {MAX_CROPS} shown)</h2>",
        '<p class="note">Axial slice through the nodule centre. Green: nodule label; orange dashed: '
        "prediction above the threshold.</p>",
        _crop_gallery(missed_crops, "No missed nodule."),
        f"<h2>Highest-scoring false positives ({len(fps_table)}; up to {MAX_CROPS} shown)</h2>",
        '<p class="note">Yellow circle: the candidate (its equivalent diameter); green: any nodule label in '
        "the slice; orange dashed: prediction above the threshold.</p>",
        _crop_gallery(fp_crops, "No false positive."),
    ]
    page = html_page("noduleflow report", "\n".join(body))

    # ---- outputs (all inputs read and checked above)
    out_dir = Path(out_summary).parent
    write_csv_atomic(ev.froc.curve_frame(), out_dir / POOLED_FROC)
    write_csv_atomic(nodules, out_dir / POOLED_NODULES)

    write_json_atomic({"fold": "pooled", **pooled,
                       "settings": {"folds": {str(k): s for k, s in settings.items()}, **_common(settings),
                                    **evaluate_params}},
                      out_dir / POOLED_METRICS)
    write_png_atomic(froc_png, out_plot)
    write_text_atomic(page, out_html)
    write_csv_atomic(summary, out_summary)
    log.info("report: pooled CPM %s, pixel Dice %s; wrote %s, %s, %s", fmt(froc.cpm),
             fmt(_num(pooled["pixel"].get("dice"))), out_summary, out_plot, out_html)
    return summary


def _common(settings: Mapping[int, Mapping]) -> dict:
    """Settings equal in every fold (label_mode, lung_roi, hybrid_output, threshold, ...)."""
    values = [s for s in settings.values() if s]
    if not values:
        return {}
    out = {}
    for key in ("label_mode", "lung_roi", "hybrid_output", "threshold", "min_volume_mm3"):
        seen = {json.dumps(s.get(key)) for s in values}
        if len(seen) == 1 and values[0].get(key) is not None:
            out[key] = values[0][key]
    return out
