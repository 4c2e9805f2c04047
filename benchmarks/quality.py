"""Detection quality over several synthetic cohorts (not part of the test suite).

The defaults must hold on cohorts they were not chosen on. This script runs the default pipeline
(``config.yaml``, plus ``--set`` overrides) on synthetic cohorts of other seeds, each in its own
folder, and prints per cohort and as mean +- sd with the worst cohort, per regime (scans / folds):

* pooled CPM with its bootstrap 95 % interval, the seven LUNA16 sensitivities (1/8 .. 8 FPs per
  scan) and the mean per-nodule Dice (from each run's ``results/reports/summary.csv``);
* sensitivity at 8 FPs per scan per nodule size (< 6, 6-10, 10-20, >= 20 mm) and per texture
  (solid, part-solid, ground glass; the synthetic cohort's ground truth): the LUNA16 subgroup
  analysis (:func:`noduleflow.froc.subgroup_froc`: the other groups' nodules count as excluded
  findings, so a hit on them is neither a detection nor a false positive). The line "pooled over
  cohorts" weights each cohort's subgroup sensitivity by its number of nodules.

Seeds: report on seeds you did not tune on. ``REPORT_SEEDS`` (the default) are for the figures that
go into the README and the issues; tune (choose a default, compare levers) with ``--seeds`` set to
``TUNE_SEEDS`` or any other seeds, never with the default cohort's seed alone.

Cost on 2 cores: a 20-scan / 5-fold cohort is one ``make run`` (about 15 min), a 12-scan / 3-fold
cohort about 7 min; the default (3 seeds x both regimes) about 1 h 10 min. ``--keep DIR`` keeps
every run, and a rerun with the same DIR only computes what is missing or out of date (Snakemake:
after a code change, the stages that run it), so a lever can be compared by a second ``--keep``
folder with ``--set`` (e.g. ``--set predict.tta=true``).

Usage::

    .venv/bin/python benchmarks/quality.py [--seeds 1 2 3] [--cohorts 20:5 12:3] [--cores 2]
        [--set section.key=value ...] [--keep DIR] [--csv table.csv]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from _workflow import REPO, run_snakemake, workflow_copy

sys.path.insert(0, str(REPO / "src"))
from noduleflow.froc import FPS_POINTS, subgroup_froc  # noqa: E402
from noduleflow.report import SIZE_BINS_MM as SIZE_EDGES_MM  # noqa: E402
from noduleflow.runconfig import deep_merge  # noqa: E402
from noduleflow.synthetic import TEXTURES  # noqa: E402

#: seeds the README's quality figures are measured on (never tuned on)
REPORT_SEEDS = (1, 2, 3)
#: seeds to tune on (choose defaults, compare levers); disjoint from REPORT_SEEDS and the default cohort's
TUNE_SEEDS = (101, 102, 103)
#: nodule size bins (mm): (lower, upper, name), [lower, upper), the report's bins
SIZE_BINS_MM = tuple((lo, hi, f">={lo:g}" if math.isinf(hi) else f"<{hi:g}" if lo == 0 else f"{lo:g}-{hi:g}")
                     for lo, hi in zip(SIZE_EDGES_MM[:-1], SIZE_EDGES_MM[1:]))
SENS_COLUMNS = [f"sens_{p:g}" for p in FPS_POINTS]


def parse_cohort(text: str) -> tuple[int, int]:
    """``"20:5"`` -> (20 scans, 5 folds)."""
    try:
        scans, folds = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cohort {text!r}: expected SCANS:FOLDS, e.g. 20:5") from None
    if folds < 2 or scans < 2 * folds:
        raise argparse.ArgumentTypeError(f"cohort {text!r}: needs >= 2 folds and >= 2 scans per fold")
    return scans, folds


def parse_setting(text: str) -> tuple[list[str], object]:
    """``"predict.tta=true"`` -> (["predict", "tta"], True): the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected section.key=value")
    return key.split("."), yaml.safe_load(value)


def nested(settings: list[tuple[list[str], object]]) -> dict:
    """The ``--set`` overrides as a nested config mapping."""
    out: dict = {}
    for path, value in settings:
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def size_bin(diameter_mm: float) -> str:
    for lower, upper, name in SIZE_BINS_MM:
        if lower <= diameter_mm < upper:
            return name
    raise ValueError(f"diameter {diameter_mm} mm outside every bin")


def cohort_truth(workdir: Path, uids: list[str]) -> pd.DataFrame:
    """The synthetic cohort's nodules (``resources/synthetic/nodules/*.csv``: annotation columns,
    ``texture``) on the scans ``uids``."""
    cohort = workdir / "resources" / "synthetic"
    truth = pd.concat([pd.read_csv(p, dtype={"seriesuid": str}) for p in sorted((cohort / "nodules").glob("*.csv"))],
                      ignore_index=True)
    return truth[truth["seriesuid"].isin(uids)].reset_index(drop=True)


def subgroup_sensitivities(truth: pd.DataFrame, candidates: pd.DataFrame, uids: list[str]) -> dict:
    """Sensitivity at 8 FPs per scan per size bin and per texture (``sens8_size_<bin>``,
    ``sens8_texture_<name>``, with ``n_...`` nodule counts; NaN where a group has no nodule)."""
    row = {}
    groupings = {"size": [size_bin(float(d)) for d in truth["diameter_mm"]],
                 "texture": truth["texture"].astype(str).tolist()}
    for kind, labels in groupings.items():
        table = subgroup_froc(truth, candidates, uids, labels).set_index("group")
        names = [b[2] for b in SIZE_BINS_MM] if kind == "size" else list(TEXTURES)
        for name in names:
            present = name in table.index
            row[f"n_{kind}_{name}"] = int(table.loc[name, "n_nodules"]) if present else 0
            row[f"sens8_{kind}_{name}"] = float(table.loc[name, "sens_8"]) if present else float("nan")
    return row


def pooled_over_cohorts(table: pd.DataFrame, kind: str, name: str) -> tuple[float, int]:
    """A subgroup's sensitivity at 8 FPs per scan pooled over the rows (cohorts), weighted by their
    nodules, and the number of nodules; NaN without any."""
    n = table[f"n_{kind}_{name}"].to_numpy(dtype=float)
    s = table[f"sens8_{kind}_{name}"].to_numpy(dtype=float)
    have = n > 0
    pooled = float(np.sum(n[have] * s[have]) / np.sum(n[have])) if have.any() else float("nan")
    return pooled, int(n.sum())


def evaluated_candidate_files(workdir: Path) -> list[Path]:
    """The candidates files the run's reports scored: the second stage's when the run enabled it
    (``second_stage.enabled`` in its ``quality.yaml``), predict's otherwise."""
    overrides = yaml.safe_load((workdir / "quality.yaml").read_text(encoding="utf-8")) or {}
    folder = "second_stage" if overrides.get("second_stage", {}).get("enabled") else "predictions"
    return sorted((workdir / "results" / folder).glob("fold*/candidates.csv"))


def cohort_metrics(workdir: Path) -> dict:
    """One finished run's figures: the pooled summary row and the subgroup sensitivities at 8 FPs
    per scan (:func:`subgroup_sensitivities` of the candidates the reports scored)."""
    summary = pd.read_csv(workdir / "results" / "reports" / "summary.csv", dtype={"fold": str}).set_index("fold")
    pooled = summary.loc["pooled"]
    row = {"cpm": pooled["cpm"], "cpm_ci_low": pooled["cpm_ci_low"], "cpm_ci_high": pooled["cpm_ci_high"],
           **{c: pooled[c] for c in SENS_COLUMNS}, "dice_per_nodule": pooled["dice_per_nodule"],
           "n_nodules": int(pooled["n_nodules"])}
    uids = pd.read_csv(workdir / "results" / "folds.csv", dtype={"seriesuid": str})["seriesuid"].tolist()
    candidates = pd.concat([pd.read_csv(p, dtype={"seriesuid": str}) for p in evaluated_candidate_files(workdir)],
                           ignore_index=True)
    return {**row, **subgroup_sensitivities(cohort_truth(workdir, uids), candidates, uids)}


def run_one(base: Path, seed: int, scans: int, folds: int, overrides: dict, cores: int) -> dict:
    workdir = workflow_copy(base / f"seed{seed}_n{scans}_k{folds}")
    config = deep_merge({"synthetic": {"seed": seed, "n_scans": scans}, "cv": {"folds": folds}}, overrides)
    wall = run_snakemake(workdir, ["all"], config, cores, "quality.yaml")
    print(f"seed {seed}, {scans} scans / {folds} folds: {wall:.0f} s wall", flush=True)
    return {"seed": seed, "scans": scans, "folds": folds, "seconds": wall, **cohort_metrics(workdir)}


def fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def print_regime(table: pd.DataFrame) -> None:
    """Per-cohort rows, mean +- sd, worst cohort, and the subgroups pooled over cohorts."""
    scans, folds = int(table["scans"].iloc[0]), int(table["folds"].iloc[0])
    print(f"\n### {scans} scans / {folds} folds ({len(table)} cohorts)\n")
    head = ["seed", "CPM [95 % CI]", *[f"sens@{p:g}" for p in FPS_POINTS], "Dice/nodule", "nodules"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for _, r in table.iterrows():
        print(f"| {int(r['seed'])} | {fmt(r['cpm'])} [{fmt(r['cpm_ci_low'], 2)}, {fmt(r['cpm_ci_high'], 2)}] | "
              + " | ".join(fmt(r[c]) for c in SENS_COLUMNS) + f" | {fmt(r['dice_per_nodule'])} | {int(r['n_nodules'])} |")
    mean, sd = table.mean(numeric_only=True), table.std(numeric_only=True, ddof=1)
    print(f"| mean ± sd | {fmt(mean['cpm'])} ± {fmt(sd['cpm'])} | "
          + " | ".join(f"{fmt(mean[c])} ± {fmt(sd[c])}" for c in SENS_COLUMNS)
          + f" | {fmt(mean['dice_per_nodule'])} ± {fmt(sd['dice_per_nodule'])} | |")
    worst = table.loc[table["cpm"].idxmin()]
    print(f"\nworst cohort: seed {int(worst['seed'])}, CPM {fmt(worst['cpm'])}")
    print("\nsensitivity at 8 FPs per scan by subgroup (cohorts' values; pooled over cohorts, weighted by nodules)\n")
    print("| subgroup | " + " | ".join(f"seed {int(s)}" for s in table["seed"]) + " | pooled | nodules |")
    print("|" + "---|" * (len(table) + 3))
    for kind, names in (("size", [b[2] for b in SIZE_BINS_MM]), ("texture", TEXTURES)):
        for name in names:
            pooled, n = pooled_over_cohorts(table, kind, name)
            label = f"{name} mm" if kind == "size" else name
            cohorts = " | ".join(fmt(v) for v in table[f"sens8_{kind}_{name}"])
            print(f"| {label} | {cohorts} | {fmt(pooled)} | {n} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(REPORT_SEEDS))
    parser.add_argument("--cohorts", type=parse_cohort, nargs="+", default=[(20, 5), (12, 3)],
                        help="SCANS:FOLDS per regime (default 20:5 12:3)")
    parser.add_argument("--set", dest="settings", type=parse_setting, action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="a config override for every run (repeatable)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs under this folder (resumable)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the per-cohort table here")
    args = parser.parse_args()

    base = args.keep or Path(tempfile.mkdtemp(prefix="noduleflow-quality-"))
    overrides = nested(args.settings)
    rows = []
    try:
        for scans, folds in args.cohorts:
            for seed in args.seeds:
                rows.append(run_one(base, seed, scans, folds, overrides, args.cores))
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    table = pd.DataFrame(rows)
    print(f"\nconfig.yaml + {yaml.safe_dump(overrides, default_flow_style=True).strip() if overrides else 'no overrides'}"
          f", --cores {args.cores}")
    for (scans, folds), regime in table.groupby(["scans", "folds"], sort=False):
        print_regime(regime.reset_index(drop=True))
    if args.csv is not None:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
