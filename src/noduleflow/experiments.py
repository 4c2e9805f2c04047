"""Side-by-side comparison of configured experiments, with the seed article's Table 2 beside ours.

How experiments work (see also ``config/paper_table2.yaml`` and :mod:`noduleflow.runconfig`):

* ``experiments:`` in the configuration maps a name to overrides of the base configuration, e.g.
  ``no_roi: {preprocess: {lung_roi: false}}``. Each experiment is a full run of the pipeline with
  the base configuration deep-merged with its overrides; its files live under
  ``results/experiments/{name}/``.
* A run reuses another run's files for every stage whose parameters, and whose upstream stages'
  parameters, are equal (the base first, then experiments in config order). An experiment that
  only changes ``train`` therefore shares the base's resampled scans, lung masks, slices, folds and
  patches; two experiments that differ only in ``predict`` share one trained model; an experiment
  equal to the base reuses the base run completely.
* ``snakemake --configfile config/paper_table2.yaml experiments`` (or ``make experiments``) runs
  every experiment and then the rule ``compare_experiments``, which calls
  :func:`compare_experiments` with each experiment's ``reports/summary.csv``.

Inputs read per experiment, all from the folder of its ``summary.csv`` (written by
:func:`noduleflow.report.build_report`):

* ``summary.csv`` (required): the ``pooled`` row and the fold rows (mean and sd are recomputed
  here from the fold rows, NaN-skipping, ddof=1);
* ``froc_pooled.csv`` (optional): the pooled FROC curve drawn in the comparison plot (without it
  only the seven pooled sensitivities are drawn);
* ``metrics_pooled.json`` (optional): its ``settings`` (label_mode, lung_roi, hybrid_output) give
  the experiment's description.

Outputs: ``comparison.csv`` (columns :data:`COMPARISON_COLUMNS`, one row per experiment in the
given order), ``froc.png`` (every experiment's pooled FROC curve on one plot), ``comparison.html``
(self-contained: tables and the plot as a base64 data URI).

Learning curve (``config/paper_small_data.yaml``): when experiments set ``train.training_scans``
(``training_scans`` argument: name -> the configured number, None = all), ``comparison.html`` also
has the pooled pixel Dice and CPM against the number of training scans per fold, one line per
labelling (the experiment's description), and a table labelling x training scans. "All" is plotted
at the mean number of training scans per fold, ``n_scans * (n_folds - 1) / n_folds`` (every scan is
held out in exactly one fold).

An experiment maps to an article row by its **name** (the keys of :data:`PAPER_TABLE2`, the names
used in ``config/paper_table2.yaml``); other experiments get empty ``paper_*`` columns.
"""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from noduleflow.io import InputError, write_csv_atomic, write_text_atomic
from noduleflow.froc import FPS_POINTS, froc_figure
from noduleflow.report import (
    POOLED_FROC,
    POOLED_METRICS,
    SENS_COLUMNS,
    figure_png,
    fmt,
    html_page,
    html_table,
    img_tag,
    read_curve,
    write_png_atomic,
)

log = logging.getLogger(__name__)

#: the seed article this comparison reproduces
PAPER_CITATION = ("Chiu H-Y, Tsai S-W, Su C-C (2021). Automatic detect lung node with deep learning in "
                  "segmentation and imbalance data labeling. Scientific Reports 11:11174, Table 2")

#: the article's Table 2 (pixel level, whole slices), keyed by the experiment names of
#: config/paper_table2.yaml
PAPER_TABLE2: dict[str, dict] = {
    "no_roi": {"setting": "without preprocessing", "dice": 0.573, "accuracy": 0.9986,
               "sensitivity": 0.9033, "specificity": 0.9987},
    "roi_positive": {"setting": "lung ROI, positive labels", "dice": 0.790, "accuracy": 0.9997,
                     "sensitivity": 0.9614, "specificity": 0.9998},
    "roi_complementary": {"setting": "lung ROI, complementary labels", "dice": 0.701, "accuracy": 0.9997,
                          "sensitivity": 0.9724, "specificity": 0.9997},
    "roi_hybrid_positive": {"setting": "lung ROI, hybrid, positive output", "dice": 0.744,
                            "accuracy": 0.9996, "sensitivity": 0.9502, "specificity": 0.9996},
    "roi_hybrid_negative": {"setting": "lung ROI, hybrid, negative output", "dice": 0.639,
                            "accuracy": 0.9994, "sensitivity": 0.9650, "specificity": 0.9994},
}

PIXEL_METRICS = ("dice", "accuracy", "sensitivity", "specificity")
#: summary.csv columns compared (pooled, mean and sd over folds)
COMPARED = [f"pixel_{m}" for m in PIXEL_METRICS] + ["cpm", "dice_per_nodule", "dice_detected"]
COMPARISON_COLUMNS = (["name", "description", "label_mode", "lung_roi", "hybrid_output", "training_scans",
                       "training_scans_per_fold", "n_folds", "n_scans", "n_nodules"]
                      + [f"{c}_{kind}" for c in COMPARED for kind in ("pooled", "mean", "sd")]
                      + ["paper_setting"] + [f"paper_{m}" for m in PIXEL_METRICS])


def describe(settings: Mapping) -> str:
    """A short description like the article's rows, from predict's recorded settings ('' if unknown)."""
    if not settings:
        return ""
    parts = []
    roi = settings.get("lung_roi")
    if roi is not None:
        parts.append("lung ROI" if roi else "without lung ROI")
    mode = settings.get("label_mode")
    if mode == "hybrid":
        parts.append(f"hybrid, {settings.get('hybrid_output', 'positive')} output")
    elif mode:
        parts.append(f"{mode} labels")
    return ", ".join(parts)


def read_summary(path: str | Path) -> pd.DataFrame:
    """A ``summary.csv`` with a ``pooled`` row and at least one fold row (InputError naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: summary file not found")
    try:
        frame = pd.read_csv(path, dtype={"fold": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: malformed CSV: {exc}") from exc
    needed = ["fold", "n_scans", "n_nodules", *COMPARED, *SENS_COLUMNS]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (written by the report rule)")
    frame["fold"] = frame["fold"].astype(str).str.strip()
    if "pooled" not in set(frame["fold"]):
        raise InputError(f"{path}: no 'pooled' row")
    if not frame["fold"].str.fullmatch(r"\d+").any():
        raise InputError(f"{path}: no fold rows (fold = 0, 1, ...)")
    return frame


def _read_settings(folder: Path) -> dict:
    path = folder / POOLED_METRICS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: malformed JSON, experiment settings unknown", path)
        return {}
    settings = data.get("settings") if isinstance(data, dict) else None
    return settings if isinstance(settings, dict) else {}


def comparison_row(name: str, summary: pd.DataFrame, settings: Mapping, training_scans: int | None = None) -> dict:
    """One ``comparison.csv`` row: pooled value, mean and sd over folds of each compared metric,
    the recorded settings, and the article's values when ``name`` maps to a Table 2 row.
    ``training_scans``: the experiment's ``train.training_scans`` (None = all);
    ``training_scans_per_fold`` is that number, or for all the mean number of training scans per
    fold, ``n_scans * (n_folds - 1) / n_folds``."""
    folds = summary[summary["fold"].str.fullmatch(r"\d+")]
    pooled = summary[summary["fold"] == "pooled"].iloc[0]
    n_scans = float(pooled["n_scans"])
    all_scans = n_scans * (len(folds) - 1) / len(folds)
    row: dict = {"name": name, "description": describe(settings), "label_mode": settings.get("label_mode"),
                 "lung_roi": settings.get("lung_roi"), "hybrid_output": settings.get("hybrid_output"),
                 "training_scans": training_scans,
                 "training_scans_per_fold": all_scans if training_scans is None else min(float(training_scans),
                                                                                          all_scans),
                 "n_folds": len(folds), "n_scans": n_scans,
                 "n_nodules": float(pooled["n_nodules"])}
    for column in COMPARED:
        values = pd.to_numeric(folds[column], errors="coerce").astype(float)
        row[f"{column}_pooled"] = float(pd.to_numeric(pd.Series([pooled[column]]), errors="coerce").iloc[0])
        row[f"{column}_mean"] = float(values.mean(skipna=True)) if values.notna().any() else float("nan")
        row[f"{column}_sd"] = float(values.std(ddof=1, skipna=True)) if values.notna().sum() > 1 else float("nan")
    paper = PAPER_TABLE2.get(name)
    row["paper_setting"] = paper["setting"] if paper else None
    for metric in PIXEL_METRICS:
        row[f"paper_{metric}"] = paper[metric] if paper else float("nan")
    return row


def _mean_sd(row: Mapping, column: str, digits: int = 3) -> str:
    mean, sd = row[f"{column}_mean"], row[f"{column}_sd"]
    if mean is None or math.isnan(mean):
        return "–"
    return fmt(mean, digits) + ("" if sd is None or math.isnan(sd) else f" ± {fmt(sd, digits)}")


def _labelling(row: Mapping) -> str:
    """A learning-curve line's label: the experiment's description, or its label mode."""
    return str(row["description"] or row["label_mode"] or "settings unknown")


def learning_curve_figure(table: pd.DataFrame):
    """Pooled pixel Dice and CPM against training scans per fold (log2 axis), one line per labelling."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.5, 4.4))
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    xs = sorted(set(table["training_scans_per_fold"].astype(float)))
    for i, (label, group) in enumerate(table.groupby(table.apply(_labelling, axis=1), sort=False)):
        group = group.sort_values("training_scans_per_fold")
        for ax, column in zip(axes, ("pixel_dice_pooled", "cpm_pooled")):
            ax.plot(group["training_scans_per_fold"], group[column], "o-", color=f"C{i % 10}", label=label)
    for ax, name in zip(axes, ("Pixel Dice, pooled", "CPM, pooled")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, alpha=0.35)
        ax.set_xlabel("Training scans per fold")
        ax.set_title(name)
    axes[0].legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


def _learning_curve_html(table: pd.DataFrame) -> str:
    rows = []
    ordered = table.assign(_label=table.apply(_labelling, axis=1))
    ordered = ordered.sort_values(["_label", "training_scans_per_fold"], kind="stable")
    for _, r in ordered.iterrows():
        scans = "all" if r["training_scans"] is None or pd.isna(r["training_scans"]) else fmt(int(r["training_scans"]))
        rows.append([html.escape(r["_label"]), f"{scans} ({fmt(r['training_scans_per_fold'], 1)})",
                     html.escape(str(r["name"])),
                     f"<b>{fmt(r['pixel_dice_pooled'])}</b>", _mean_sd(r, "pixel_dice"),
                     f"<b>{fmt(r['cpm_pooled'])}</b>", _mean_sd(r, "cpm"),
                     f"<b>{fmt(r['dice_per_nodule_pooled'])}</b>", _mean_sd(r, "dice_per_nodule")])
    png = figure_png(learning_curve_figure(table))
    return "\n".join([
        "<h2>Learning curve: training scans per fold</h2>",
        img_tag(png, "pooled pixel Dice and CPM against training scans per fold", "plot"),
        html_table(["labelling", "training scans (per fold)", "experiment", "pixel Dice pooled",
                    "pixel Dice mean ± sd", "CPM pooled", "CPM mean ± sd", "Dice/nodule pooled",
                    "Dice/nodule mean ± sd"], rows, table_id="learning_curve",
                   caption="Every row is scored on the same held-out scans of each fold"),
        '<p class="note">Each fold trains on that many of its training scans (inner validation split '
        "included), the same held-out scans for every row; \"all\" is plotted at the mean number of "
        "training scans per fold.</p>",
    ])


def _html(table: pd.DataFrame, froc_png: bytes) -> str:
    digits = {"dice": 3, "accuracy": 4, "sensitivity": 4, "specificity": 4}
    headers = ["experiment", "setting"]
    for metric in PIXEL_METRICS:
        headers += [f"{metric} pooled", f"{metric} mean ± sd", f"{metric} article"]
    rows = []
    for _, r in table.iterrows():
        cells = [html.escape(str(r["name"])), html.escape(str(r["description"] or "–"))]
        for metric in PIXEL_METRICS:
            d = digits[metric]
            cells += [f"<b>{fmt(r[f'pixel_{metric}_pooled'], d)}</b>", _mean_sd(r, f"pixel_{metric}", d),
                      fmt(r[f"paper_{metric}"], d)]
        rows.append(cells)
    pixel_table = html_table(headers, rows, table_id="comparison",
                             caption="Pixel level over whole evaluated slices, as the article's Table 2")
    rows = []
    for _, r in table.iterrows():
        rows.append([html.escape(str(r["name"])), html.escape(str(r["paper_setting"] or "–")),
                     fmt(r["n_folds"]), fmt(r["n_scans"], 0), fmt(r["n_nodules"], 0),
                     f"<b>{fmt(r['cpm_pooled'])}</b>", _mean_sd(r, "cpm"),
                     f"<b>{fmt(r['dice_per_nodule_pooled'])}</b>", _mean_sd(r, "dice_per_nodule"),
                     fmt(r["dice_detected_pooled"]), _mean_sd(r, "dice_detected")])
    detection_table = html_table(
        ["experiment", "article row", "folds", "scans", "nodules", "CPM pooled", "CPM mean ± sd",
         "Dice/nodule pooled", "Dice/nodule mean ± sd", "Dice detected pooled", "Dice detected mean ± sd"],
        rows, table_id="detection", caption="Detection (LUNA16 CPM) and per-nodule Dice")
    body = "\n".join([
        f"<p>{len(table)} experiment(s). <b>pooled</b>: the out-of-fold predictions of all folds scored "
        "together; <b>mean ± sd</b>: over folds. Article values: " + html.escape(PAPER_CITATION) + ".</p>",
        "<h2>Pixel-level metrics beside the article</h2>",
        pixel_table,
        '<p class="note">The article measured its own data set with its own protocol; the numbers here come '
        "from this run's data (by default a small synthetic cohort). Compare how the settings rank, not the "
        "absolute values. Accuracy and specificity are dominated by the many background pixels.</p>",
        "<h2>Detection and per-nodule Dice</h2>",
        detection_table,
        "<h2>FROC, pooled, every experiment</h2>",
        img_tag(froc_png, "pooled FROC curves of every experiment", "plot"),
    ])
    if table["training_scans"].notna().any():
        body += "\n" + _learning_curve_html(table)
    return html_page("noduleflow experiments", body)


def compare_experiments(summaries: Mapping[str, str | Path], out_table: str | Path, out_html: str | Path,
                        out_plot: str | Path, training_scans: Mapping[str, int | None] | None = None) -> pd.DataFrame:
    """Write ``comparison.csv``, ``comparison.html`` and ``froc.png`` for the experiments
    ``summaries`` (name -> its ``reports/summary.csv``, in display order); see the module docstring.
    ``training_scans``: name -> the experiment's ``train.training_scans`` (missing or None = all
    training scans); any number adds the learning curve to the HTML. Every input is read and
    checked before anything is written. Returns the comparison table."""
    training_scans = dict(training_scans or {})
    if not summaries:
        raise InputError("compare_experiments: no experiments (config 'experiments:' is empty)")
    rows, curves = [], []
    for name, path in summaries.items():
        summary = read_summary(path)
        folder = Path(path).parent
        settings = _read_settings(folder)
        row = comparison_row(str(name), summary, settings, training_scans.get(name))
        rows.append(row)
        pooled = summary[summary["fold"] == "pooled"].iloc[0]
        points = pd.to_numeric(pooled[SENS_COLUMNS], errors="coerce").to_numpy(dtype=float)
        curve = read_curve(folder / POOLED_FROC)
        if curve is None:
            log.warning("%s: no %s; only the seven pooled sensitivities are drawn", folder, POOLED_FROC)
            fps, sens = np.asarray(FPS_POINTS), points
        else:
            fps, sens = curve["fps_per_scan"].to_numpy(float), curve["sensitivity"].to_numpy(float)
        curves.append({"label": f"{name} (CPM {fmt(row['cpm_pooled'])})", "fps": fps, "sensitivity": sens,
                       "points": points, "lw": 1.8})
        log.info("%s: pooled CPM %s, pixel Dice %s (%s)", name, fmt(row["cpm_pooled"]),
                 fmt(row["pixel_dice_pooled"]), row["description"] or "settings unknown")
    table = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    png = figure_png(froc_figure(curves, title="Pooled FROC of every experiment"))
    page = _html(table, png)
    write_png_atomic(png, out_plot)
    write_text_atomic(page, out_html)
    write_csv_atomic(table, out_table)
    log.info("comparison of %d experiments written to %s", len(table), out_table)
    return table
