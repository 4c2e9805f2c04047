"""The article's experiments (config/paper_table2.yaml) and their side-by-side comparison
(noduleflow.experiments)."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from noduleflow.experiments import COMPARISON_COLUMNS, PAPER_CITATION, PAPER_TABLE2, compare_experiments
from noduleflow.io import InputError
from noduleflow.report import POOLED_FROC, POOLED_METRICS, summary_frame
from noduleflow.runconfig import BASE_PREFIX, deep_merge, run_configs, stage_owner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ARTICLE_NAMES = ["no_roi", "roi_positive", "roi_complementary", "roi_hybrid_positive", "roi_hybrid_negative"]


# --------------------------------------------------------------------------- config/paper_table2.yaml


@pytest.fixture(scope="module")
def paper_runs(repo_root):
    base = yaml.safe_load((repo_root / "config.yaml").read_text(encoding="utf-8"))
    overlay = yaml.safe_load((repo_root / "config" / "paper_table2.yaml").read_text(encoding="utf-8"))
    merged = deep_merge(base, overlay)  # what `--configfile config/paper_table2.yaml` gives
    return base, overlay, run_configs(merged)


def _prefix(name: str) -> str:
    return f"{BASE_PREFIX}experiments/{name}/"


def test_paper_config_defines_the_articles_five_settings_with_dice_loss(paper_runs):
    base, overlay, runs = paper_runs
    assert set(overlay) == {"experiments"}        # the base run is left as config.yaml has it
    assert list(overlay["experiments"]) == ARTICLE_NAMES
    assert set(ARTICLE_NAMES) == set(PAPER_TABLE2)   # every experiment maps to an article row
    settings = {name: runs[_prefix(name)] for name in ARTICLE_NAMES}
    for name, cfg in settings.items():
        # the article's Dice loss; for complementary labels the Dice over both classes (the plain one collapses)
        assert cfg["train"]["loss"] == ("dice_both" if name == "roi_complementary" else "dice"), name
        assert cfg["preprocess"]["lung_roi"] is (name != "no_roi"), name
        # nothing else differs from the base but what the article varies
        for block in ("sampling", "cv", "lungmask", "evaluate"):
            assert cfg[block] == base[block], (name, block)
        assert cfg["train"]["epochs"] == base["train"]["epochs"]
    assert [settings[n]["train"]["label_mode"] for n in ARTICLE_NAMES] == [
        "positive", "positive", "complementary", "hybrid", "hybrid"]
    assert settings["roi_hybrid_positive"]["predict"]["hybrid_output"] == "positive"
    assert settings["roi_hybrid_negative"]["predict"]["hybrid_output"] == "negative"


def test_paper_experiments_share_preprocessing_and_the_hybrid_model(paper_runs):
    base, _, runs = paper_runs
    for name in ARTICLE_NAMES:
        for stage in ("resample", "lung_mask", "extract_slices", "split_folds"):
            assert stage_owner(runs, _prefix(name), stage) == BASE_PREFIX, (name, stage)
        expected = _prefix("no_roi") if name == "no_roi" else BASE_PREFIX
        assert stage_owner(runs, _prefix(name), "sample_patches") == expected, name
    # one hybrid model, read at either head
    assert stage_owner(runs, _prefix("roi_hybrid_negative"), "train") == _prefix("roi_hybrid_positive")
    assert stage_owner(runs, _prefix("roi_hybrid_negative"), "predict") == _prefix("roi_hybrid_negative")
    # roi_positive is the base with the article's Dice loss: its own model under the default
    # dice_mixed_bce base, the base run itself when the base already uses dice
    assert stage_owner(runs, _prefix("roi_positive"), "train") == _prefix("roi_positive")
    dice_base = deep_merge(base, {"train": {"loss": "dice"},
                                  "experiments": yaml.safe_load(
                                      (Path(__file__).parents[1] / "config" / "paper_table2.yaml").read_text(encoding="utf-8")
                                  )["experiments"]})
    dice_runs = run_configs(dice_base)
    for stage in ("train", "predict", "evaluate", "report"):
        assert stage_owner(dice_runs, _prefix("roi_positive"), stage) == BASE_PREFIX, stage


def test_paper_experiments_validate_against_the_schema(paper_runs, repo_root):
    from snakemake.utils import validate

    _, _, runs = paper_runs
    for prefix, cfg in runs.items():
        validate(cfg, str(repo_root / "workflow" / "schemas" / "config.schema.yaml"), set_default=True)


# --------------------------------------------------------------------------- comparison


def _metrics(cpm, pixel_dice, dice_nodule=0.6, sens=None):
    sens = sens if sens is not None else ([None] * 7 if cpm is None else [cpm] * 7)
    return {"n_scans": 2, "n_nodules": 0 if cpm is None else 3, "cpm": cpm, "cpm_ci": [None, None],
            "sensitivities": sens, "dice_per_nodule_mean": None if cpm is None else dice_nodule,
            "dice_detected_nodule_mean": None if cpm is None else dice_nodule + 0.1, "dice_per_scan_mean": 0.5,
            "pixel": {"dice": pixel_dice, "accuracy": 0.999, "sensitivity": 0.9, "specificity": 0.9995}}


def _experiment(root: Path, name: str, folds: list[dict], pooled: dict, settings: dict | None,
                curve: bool = True) -> Path:
    folder = root / name / "reports"
    folder.mkdir(parents=True)
    summary_frame(list(enumerate(folds)), pooled).to_csv(folder / "summary.csv", index=False)
    if curve:
        pd.DataFrame({"fps_per_scan": [0.0, 0.5, 2.0], "sensitivity": [0.2, 0.6, 0.8],
                      "threshold": [np.inf, 0.9, 0.5]}).to_csv(folder / POOLED_FROC, index=False)
    if settings is not None:
        (folder / POOLED_METRICS).write_text(json.dumps({"fold": "pooled", **pooled, "settings": settings}), encoding="utf-8")
    return folder / "summary.csv"


@pytest.fixture()
def summaries(tmp_path) -> dict[str, Path]:
    return {
        "no_roi": _experiment(tmp_path, "no_roi", [_metrics(0.6, 0.5), _metrics(0.8, 0.7)], _metrics(0.7, 0.61),
                              {"label_mode": "positive", "lung_roi": False, "hybrid_output": "positive"}),
        # a fold without nodules: no CPM there, mean over the other fold only
        "roi_hybrid_negative": _experiment(
            tmp_path, "roi_hybrid_negative", [_metrics(None, 0.2), _metrics(0.9, 0.8)], _metrics(0.85, 0.75),
            {"label_mode": "hybrid", "lung_roi": True, "hybrid_output": "negative"}),
        # not an article setting, no curve and no settings file
        "my_idea": _experiment(tmp_path, "my_idea", [_metrics(0.5, 0.4), _metrics(0.7, 0.6)], _metrics(0.6, 0.5),
                               None, curve=False),
    }


def test_comparison_rows_put_the_articles_values_beside_ours(summaries, tmp_path):
    out = tmp_path / "out"
    table = compare_experiments(summaries, out_table=out / "comparison.csv", out_html=out / "comparison.html",
                                out_plot=out / "froc.png")
    written = pd.read_csv(out / "comparison.csv")
    assert list(written.columns) == COMPARISON_COLUMNS
    assert written["name"].tolist() == ["no_roi", "roi_hybrid_negative", "my_idea"]
    rows = written.set_index("name")
    # article values (Table 2) for the mapped experiments, empty for the others
    assert rows.loc["no_roi", ["paper_dice", "paper_accuracy", "paper_sensitivity", "paper_specificity"]].tolist() \
        == [0.573, 0.9986, 0.9033, 0.9987]
    assert rows.loc["roi_hybrid_negative", "paper_dice"] == 0.639
    assert rows.loc["roi_hybrid_negative", "paper_specificity"] == 0.9994
    assert all(math.isnan(rows.loc["my_idea", f"paper_{m}"])
               for m in ("dice", "accuracy", "sensitivity", "specificity"))
    # ours: pooled, mean and sd over folds
    assert rows.loc["no_roi", "pixel_dice_pooled"] == pytest.approx(0.61)
    assert rows.loc["no_roi", "pixel_dice_mean"] == pytest.approx(0.6)
    assert rows.loc["no_roi", "pixel_dice_sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert rows.loc["no_roi", "cpm_mean"] == pytest.approx(0.7)
    assert rows.loc["no_roi", "dice_per_nodule_mean"] == pytest.approx(0.6)
    # NaN-safe: the nodule-free fold is skipped for CPM, kept for pixel metrics
    assert rows.loc["roi_hybrid_negative", "cpm_mean"] == pytest.approx(0.9)
    assert math.isnan(rows.loc["roi_hybrid_negative", "cpm_sd"])
    assert rows.loc["roi_hybrid_negative", "pixel_dice_mean"] == pytest.approx(0.5)
    # the experiment's settings, as predict recorded them
    assert rows.loc["no_roi", "description"] == "without lung ROI, positive labels"
    assert rows.loc["roi_hybrid_negative", "description"] == "lung ROI, hybrid, negative output"
    assert rows.loc["roi_hybrid_negative", "label_mode"] == "hybrid"
    assert len(table) == 3


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.table_rows, self._ids = [], [], {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._ids.append(attrs.get("id"))
            self.table_rows[attrs.get("id")] = 0
        if tag == "tr" and self._ids:
            self.table_rows[self._ids[-1]] += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._ids.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_comparison_html_is_self_contained_with_table_and_curves(summaries, tmp_path):
    out = tmp_path / "out"
    compare_experiments(summaries, out_table=out / "comparison.csv", out_html=out / "comparison.html",
                        out_plot=out / "froc.png")
    assert (out / "froc.png").read_bytes().startswith(PNG_MAGIC)
    parser = _Tags()
    parser.feed((out / "comparison.html").read_text(encoding="utf-8"))
    assert parser.table_rows["comparison"] == 1 + 3   # header + one row per experiment
    assert parser.table_rows["detection"] == 1 + 3
    images = [a for t, a in parser.tags if t == "img"]
    assert len(images) == 1 and images[0]["src"].startswith("data:image/png;base64,")
    assert base64.b64decode(images[0]["src"].split(",", 1)[1]).startswith(PNG_MAGIC)
    for tag, attrs in parser.tags:
        assert tag not in ("script", "link", "iframe")
        for key in ("src", "href"):
            assert attrs.get(key) is None or attrs[key].startswith(("data:", "#"))
    text = " ".join(parser.text)
    assert "0.573" in text and "Scientific Reports 11:11174" in text and PAPER_CITATION in text


def test_missing_summary_is_named_and_nothing_is_written(summaries, tmp_path):
    summaries["no_roi"].unlink()
    out = tmp_path / "out"
    with pytest.raises(InputError, match="no_roi"):
        compare_experiments(summaries, out_table=out / "comparison.csv", out_html=out / "comparison.html",
                            out_plot=out / "froc.png")
    assert not out.exists() or not any(out.iterdir())


def test_compare_reads_what_the_report_writes(tmp_path):
    """build_report's outputs are exactly what compare_experiments needs (curve and settings)."""
    from test_report import make_run, run_report

    paths = {}
    for name, settings in (("roi_complementary", {"label_mode": "complementary", "lung_roi": True,
                                                  "hybrid_output": "positive"}),
                           ("no_roi", {"label_mode": "positive", "lung_roi": False, "hybrid_output": "positive"})):
        run = make_run(tmp_path / name, settings=settings)
        run_report(run, bootstrap=0)
        paths[name] = run["reports"] / "summary.csv"
    out = tmp_path / "cmp"
    table = compare_experiments(paths, out_table=out / "comparison.csv", out_html=out / "comparison.html",
                                out_plot=out / "froc.png").set_index("name")
    assert table.loc["roi_complementary", "description"] == "lung ROI, complementary labels"
    assert table.loc["roi_complementary", "paper_dice"] == 0.701
    assert table.loc["no_roi", "cpm_pooled"] == pytest.approx(0.5)
    assert table.loc["no_roi", "cpm_mean"] == pytest.approx(0.5)   # fold 1 has no nodules


def test_learning_curve_of_training_scans_per_labelling(tmp_path):
    """Experiments with train.training_scans: comparison.csv records the number, comparison.html
    adds pixel Dice and CPM against training scans per fold, one line per labelling."""
    settings = {"positive": {"label_mode": "positive", "lung_roi": True, "hybrid_output": "positive"},
                "complementary": {"label_mode": "complementary", "lung_roi": True, "hybrid_output": "positive"}}
    summaries, scans = {}, {}
    for labelling, dice in (("positive", 0.5), ("complementary", 0.4)):
        for n in (2, 4, None):
            name = f"{labelling}_{n or 'all'}"
            gain = {2: 0.0, 4: 0.1, None: 0.2}[n]
            folds = [_metrics(0.5 + gain, dice + gain), _metrics(0.7 + gain, dice + gain)]
            pooled = {**_metrics(0.6 + gain, dice + gain), "n_scans": 20}   # 10 per fold
            summaries[name] = _experiment(tmp_path, name, folds, pooled, settings[labelling])
            scans[name] = n
    out = tmp_path / "out"
    table = compare_experiments(summaries, out_table=out / "comparison.csv", out_html=out / "comparison.html",
                                out_plot=out / "froc.png", training_scans=scans).set_index("name")
    written = pd.read_csv(out / "comparison.csv").set_index("name")
    assert written.loc["positive_2", "training_scans"] == 2
    assert math.isnan(written.loc["positive_all", "training_scans"])   # all
    # all: 20 scans in 2 folds, each fold trained on the other 10
    assert written["training_scans_per_fold"].tolist() == [2, 4, 10] * 2
    assert table.loc["complementary_4", "pixel_dice_pooled"] == pytest.approx(0.5)
    parser = _Tags()
    parser.feed((out / "comparison.html").read_text(encoding="utf-8"))
    assert parser.table_rows["learning_curve"] == 1 + 6   # labelling x training scans
    images = [a for t, a in parser.tags if t == "img"]
    assert len(images) == 2   # FROC and the learning curve
    assert base64.b64decode(images[1]["src"].split(",", 1)[1]).startswith(PNG_MAGIC)
    text = " ".join(parser.text)
    assert "Learning curve" in text and "lung ROI, complementary labels" in text


def test_learning_curve_figure_draws_a_line_per_labelling():
    from noduleflow.experiments import learning_curve_figure

    table = pd.DataFrame({"description": ["lung ROI, positive labels"] * 3 + ["lung ROI, complementary labels"] * 3,
                          "label_mode": ["positive"] * 3 + ["complementary"] * 3,
                          "training_scans_per_fold": [2, 4, 16] * 2,
                          "pixel_dice_pooled": [0.3, 0.5, 0.8, 0.2, 0.4, 0.7],
                          "cpm_pooled": [0.4, 0.6, 0.9, 0.3, 0.5, 0.8]})
    fig = learning_curve_figure(table)
    dice_axes, cpm_axes = fig.axes
    assert [line.get_label() for line in dice_axes.lines] == ["lung ROI, positive labels",
                                                              "lung ROI, complementary labels"]
    assert list(dice_axes.lines[1].get_ydata()) == [0.2, 0.4, 0.7]
    assert list(cpm_axes.lines[0].get_xdata()) == [2, 4, 16]
    assert [t.get_text() for t in dice_axes.get_xticklabels()] == ["2", "4", "16"]


# --------------------------------------------------------------------------- config/paper_small_data.yaml

LABELLINGS = {"positive": "roi_positive", "complementary": "roi_complementary", "hybrid": "roi_hybrid_positive"}


@pytest.fixture(scope="module")
def small_data_runs(repo_root):
    base = yaml.safe_load((repo_root / "config.yaml").read_text(encoding="utf-8"))
    overlay = yaml.safe_load((repo_root / "config" / "paper_small_data.yaml").read_text(encoding="utf-8"))
    return base, overlay, run_configs(deep_merge(base, overlay))


def test_small_data_config_trains_each_labelling_on_2_4_8_and_all_scans(small_data_runs, paper_runs, repo_root):
    from snakemake.utils import validate

    base, overlay, runs = small_data_runs
    assert set(overlay) == {"experiments"}
    names = {(labelling, n): (f"{labelling}_{n}" if n else all_name)
             for labelling, all_name in LABELLINGS.items() for n in (2, 4, 8, None)}
    assert sorted(overlay["experiments"]) == sorted(names.values())
    for (labelling, n), name in names.items():
        cfg = runs[_prefix(name)]
        validate(cfg, str(repo_root / "workflow" / "schemas" / "config.schema.yaml"), set_default=True)
        assert cfg["train"]["label_mode"] == labelling and cfg["train"].get("training_scans") == n, name
        if labelling == "hybrid":
            assert cfg["predict"]["hybrid_output"] == "positive"
        # the same scans, folds (held-out scans) and patches as the base: only training differs
        for stage in ("resample", "lung_mask", "extract_slices", "split_folds", "sample_patches"):
            assert stage_owner(runs, _prefix(name), stage) == BASE_PREFIX, (name, stage)
    for n in (2, 4, 8, None):
        # at one size the labellings differ only in labels and their loss
        blocks = [{k: v for k, v in runs[_prefix(names[(lab, n)])]["train"].items() if k not in ("label_mode", "loss")}
                  for lab in LABELLINGS]
        assert blocks[0] == blocks[1] == blocks[2], n
    # fewer scans, more epochs of fewer batches: as many optimiser steps (early stopping scaled alike)
    epochs = [runs[_prefix(names[("positive", n)])]["train"]["epochs"] for n in (2, 4, 8, None)]
    patience = [runs[_prefix(names[("positive", n)])]["train"]["early_stopping_patience"] for n in (2, 4, 8, None)]
    assert epochs == sorted(epochs, reverse=True) and epochs[-1] == base["train"]["epochs"]
    assert patience[-1] == base["train"]["early_stopping_patience"]
    assert all(abs(p / e - patience[-1] / epochs[-1]) < 0.05 for p, e in zip(patience, epochs))
    # the "all" rows are config/paper_table2.yaml's rows: reused after `make experiments`
    _, _, table2_runs = paper_runs
    for all_name in LABELLINGS.values():
        for block in ("train", "predict", "preprocess", "sampling", "evaluate"):
            assert runs[_prefix(all_name)][block] == table2_runs[_prefix(all_name)][block], (all_name, block)
